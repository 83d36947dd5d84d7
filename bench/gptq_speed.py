"""Benchmark: distqat's GPTQ of one weight against llm-compressor's, on the same weight and Hessian, on the CPU.

    python -m bench.gptq_speed [--threads 1,2] [--rounds 3] [--layer 15] [--peer-python PATH] [--json out.json]

The inputs are real: the bundled model's q_proj (576 x 576), gate_proj (1536 x 576) and down_proj (576 x 1536) of
one decoder layer, each with the Hessian of its inputs on --n-samples x --seq-len tokens of the bundled calibration
split. Both sides round them at w4g64 symmetric, weight-only, with act-order (static groups: llm-compressor's
`actorder="static"`), blocks of 128 columns and the same damping; distqat with and without its clipping search
(`ptq.gptq.clip`), llm-compressor with its min/max observer (it has no search inside GPTQ). llm-compressor runs in
its own virtualenv (--peer-python, default /work/peers/llmc/bin/python) as a subprocess of this script that reads
the saved weights and Hessians (safetensors) and imports nothing from distqat; without that interpreter its column
is skipped with a line. Each time is the median of --rounds runs at OMP/torch threads 1 and 2 (--threads), the two
libraries' runs alternating so that both share whatever else the cores run; the ratio is ours / theirs (below 1:
distqat is faster). `err` is each result's output error tr(dW H dW^T) over llm-compressor's, a check that both
sides solved the same problem.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEER_PYTHON = "/work/peers/llmc/bin/python"
PROJECTIONS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--layer", type=int, default=15, help="the decoder layer whose projections are rounded")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--damp", type=float, default=0.1, help="both sides' damping (fraction of mean diag H)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--peer-python", default=PEER_PYTHON, help="the interpreter of llm-compressor's virtualenv")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    p.add_argument("--peer-worker", metavar="DIR", help=argparse.SUPPRESS)  # the llm-compressor side (subprocess)
    return p.parse_args(argv)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (q.double() - w.double())
    return float(((d @ h.double()) * d).sum())


# ---------------------------------------------------------------------------------------------
# The llm-compressor side: runs in its own virtualenv, so it imports only torch, safetensors and llm-compressor.
# It reads a weight's name per line and answers with the seconds one GPTQ of it took, so that its rounds and
# distqat's alternate and share whatever else the cores are running; at the end of input it saves its results.


ANSWER = "gptq_speed: "  # llm-compressor logs to stdout too: the worker's answers are the lines with this prefix


def answer(d: dict) -> None:
    print(ANSWER + json.dumps(d), flush=True)


def peer_worker(folder: Path, threads: int, damp: float, block_size: int) -> None:
    # lazy: these exist only in llm-compressor's virtualenv
    import compressed_tensors
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    torch.set_num_threads(threads)
    inputs = load_file(str(folder / "inputs.safetensors"))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64,
                            actorder="static")
    out = {}

    def run(name: str) -> None:
        w, h = inputs[name + ".w"], inputs[name + ".h"]
        # The observer's scales (min/max of each group of the weight before any update, as GPTQModifier's
        # memoryless observer takes them) count as part of the quantization, as distqat's do.
        g = w.reshape(w.shape[0], -1, 64)
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
        q = quantize_weight(w.clone()[None], h.clone()[None], scale[None], zero[None], None, args,
                            blocksize=block_size, percdamp=damp)[0]
        out[name] = q[0].contiguous()

    answer({"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__})
    for line in sys.stdin:
        name = line.strip()
        answer({"seconds": timed(lambda name=name: run(name))})
    save_file(out, str(folder / f"peer_t{threads}.safetensors"))


class Peer:
    """llm-compressor's worker process at `threads` threads."""

    def __init__(self, python: str, folder: Path, threads: int, args: argparse.Namespace) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": ""}
        cmd = [python, str(Path(__file__).resolve()), "--peer-worker", str(folder), "--threads", str(threads),
               "--damp", str(args.damp), "--block-size", str(args.block_size)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=folder)
        self.versions = self._answer()
        self.folder, self.threads = folder, threads

    def _answer(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"llm-compressor's worker exited ({self.proc.wait()}); see its stderr above")
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER):])

    def time(self, name: str) -> float:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def results(self) -> dict[str, torch.Tensor]:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError("llm-compressor's worker failed saving its results")
        return load_file(str(self.folder / f"peer_t{self.threads}.safetensors"))


# ---------------------------------------------------------------------------------------------
# The distqat side.


def capture(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The projections' weights and the Hessians X^T X / n of their inputs (as distqat's calibration takes them;
    llm-compressor's 2/n scale cancels out of GPTQ), from the bundled model on calibration text."""
    # lazy: the peer side runs without distqat
    from data.calib import calibration_ids
    from qat.io.models import load_model, load_tokenizer
    from qat.ptq.blocks import decoder_layers

    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32").eval()
    ids = calibration_ids(tok, args.n_samples, args.seq_len)
    layer = decoder_layers(model)[args.layer]
    sums, handles = {}, []

    class Done(Exception):
        pass

    for name in PROJECTIONS:
        def hook(m, inp, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            n, s = sums.get(name, (0, 0.0))
            sums[name] = (n + x.shape[0], s + x.T @ x)
            if name == PROJECTIONS[-1]:
                raise Done  # the rest of the model is not needed

        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            try:
                model(row[None])
            except Done:
                pass
    for h in handles:
        h.remove()
    out = {}
    for name in PROJECTIONS:
        n, s = sums[name]
        out[name + ".w"] = layer.get_submodule(name).weight.detach().float().contiguous()
        out[name + ".h"] = (s / n).float().contiguous()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        peer_worker(Path(args.peer_worker), int(args.threads), args.damp, args.block_size)
        return 0
    # lazy: the peer side runs without distqat
    from dataclasses import replace

    from qat.ptq.gptq import gptq
    from qat.spec import parse

    threads = [int(t) for t in args.threads.split(",") if t]
    spec = parse("w4g64").weight
    specs = {"gptq": spec, "gptq+clip": replace(spec, scale_method="mse")}
    python = args.peer_python if Path(args.peer_python).exists() else None
    if python is None:
        print(f"llm-compressor: no interpreter at {args.peer_python} (pass --peer-python); its column is skipped",
              file=sys.stderr)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
              "layer": args.layer, "calib_tokens": args.n_samples * args.seq_len, "damp": args.damp,
              "rounds": args.rounds, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = capture(args)
        save_file(inputs, str(folder / "inputs.safetensors"))
        for t in threads:
            torch.set_num_threads(t)
            peer = Peer(python, folder, t, args) if python else None
            if peer:
                result["peer_versions"] = peer.versions
            rows, ours_q = [], {}
            for name in PROJECTIONS:
                w, h = inputs[name + ".w"], inputs[name + ".h"]

                def run(method: str, w=w, h=h, name=name, ours_q=ours_q) -> None:
                    ours_q[name, method] = gptq(w, h, specs[method], args.damp, args.block_size, act_order=True,
                                                static_groups=True, scale_dtype=torch.float32)[0]

                # a warm-up of each (first-call allocations and lazy imports are not the algorithm's), then the
                # rounds alternating between the two libraries
                theirs = [peer.time(name)] if peer else []
                ours = {m: [timed(lambda m=m: run(m))] for m in specs}
                for _ in range(args.rounds):
                    if peer:
                        theirs.append(peer.time(name))
                    for m in specs:
                        ours[m].append(timed(lambda m=m: run(m)))
                for m in specs:
                    row = {"threads": t, "weight": name.rsplit(".", 1)[-1], "shape": list(w.shape), "method": m,
                           "ours_s": statistics.median(ours[m][1:]),
                           "theirs_s": statistics.median(theirs[1:]) if peer else None, "name": name}
                    row["ratio"] = row["ours_s"] / row["theirs_s"] if peer else None
                    rows.append(row)
                    print(_line(row), file=sys.stderr, flush=True)
            qs = peer.results() if peer else {}
            for row in rows:
                name = row.pop("name")
                w, h = inputs[name + ".w"], inputs[name + ".h"]
                row["err"] = (output_error(w, ours_q[name, row["method"]], h) / output_error(w, qs[name], h)
                              if name in qs else None)
            result["rows"] += rows
    _table(result["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _line(r: dict) -> str:
    theirs = "skipped" if r["theirs_s"] is None else f"{r['theirs_s']:.3f}s"
    return f"{r['threads']} thr {r['weight']} {r['method']}: ours {r['ours_s']:.3f}s, llm-compressor {theirs}"


def _table(rows: list[dict]) -> None:
    print("| threads | weight | shape | method | distqat | llm-compressor | ratio | err vs llm-compressor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        theirs = "skipped" if r["theirs_s"] is None else f"{r['theirs_s']:.3f} s"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        err = "" if r["err"] is None else f"{r['err']:.3f}"
        shape = "x".join(map(str, r["shape"]))
        print(f"| {r['threads']} | {r['weight']} | {shape} | {r['method']} | {r['ours_s']:.3f} s | {theirs} | "
              f"{ratio} | {err} |")


if __name__ == "__main__":
    sys.exit(main())
