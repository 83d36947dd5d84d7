"""Benchmark: distqat side by side with llm-compressor (PTQ) and torchao (QAT) on the bundled model.

    python -m bench.peers [--parts ptq,qat] [--rows ...] [--qat-steps 55] [--qat-lrs 1e-4,6e-4] [--json out.json]

PTQ table, w4g64 weight-only symmetric: FP, RTN / GPTQ / AWQ by llm-compressor and by distqat, and distqat's GPTQ
with its clipping search, all calibrated on the same --n-samples x --seq-len tokens of the bundled `calib` split.
QAT table, 8da4w (int4 g64 weights, int8 per-token asymmetric activations): torchao's QAT and distqat's, each from
its own RTN start, distilled from the FP model on the same generated text (distqat's data-free text, the default
job's), blocks, steps, batch and learning rate, at each --qat-lrs.
Peers run in their own virtualenvs (--llmc-venv, --torchao-venv) as subprocesses at this process's thread count and
write dequantized weights; a venv that is absent is skipped with one line. ONE scorer scores every row: `distqat
eval`'s windows and loader (trainer.eval), so the FP row is distqat eval's perplexity. With --json, rows accumulate
in that file across runs (a row is replaced when rerun), each with the distqat commit it came from.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import transformers
from safetensors.torch import save_file

from bench._peers_run import Scorer, peer_python, peer_versions, ptq_table, qat_table, run_peer, train_elapsed

REPO = Path(__file__).resolve().parents[1]
# key: (label, peer or "distqat", method, GPTQ clipping search)
PTQ_ROWS = {
    "fp": ("FP", "distqat", "fp", False),
    "rtn-llmc": ("RTN, llm-compressor", "llmc", "rtn", False),
    "rtn": ("RTN, distqat", "distqat", "rtn", False),
    "gptq-llmc": ("GPTQ, llm-compressor", "llmc", "gptq", False),
    "gptq": ("GPTQ, distqat", "distqat", "gptq", False),
    "gptq-clip": ("GPTQ with the clipping search, distqat", "distqat", "gptq", True),
    "awq": ("AWQ, distqat", "distqat", "awq", False),
    "awq-llmc": ("AWQ, llm-compressor", "llmc", "awq", False),
}
QAT_SCHEME = "w4g64a8"  # distqat's 8da4w: int4 g64 symmetric weights, int8 per-token asymmetric activations
ACTIVATIONS = "w16a8"  # the same activations alone, put on a peer's dequantized weights by the scorer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--parts", default="ptq,qat", help="ptq, qat or both")
    p.add_argument("--rows", default=",".join(PTQ_ROWS), help=f"PTQ rows, of {','.join(PTQ_ROWS)}")
    p.add_argument("--llmc-venv", default="/work/peers/llmc", help="llm-compressor's virtualenv")
    p.add_argument("--torchao-venv", default="/work/peers/torchao", help="torchao's virtualenv")
    p.add_argument("--n-samples", type=int, default=32, help="calibration sequences (every PTQ row)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--qat-peers", default="torchao,distqat")
    p.add_argument("--qat-steps", type=int, default=55, help="optimizer steps of each QAT row (the default job's)")
    p.add_argument("--qat-batch", type=int, default=4, help="sequences per step (the default job's)")
    p.add_argument("--qat-seq-len", type=int, default=256, help="tokens per training sequence (the default job's)")
    p.add_argument("--qat-warmup", type=int, default=4)
    p.add_argument("--qat-lrs", default="1e-4,6e-4")
    p.add_argument("--generated", help="a `distqat generate` folder (default: generate the default job's into the "
                   "work folder, a few minutes)")
    p.add_argument("--work", help="keep the peers' files here (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="rows accumulate in this JSON file (written after every row)")
    return p.parse_args(argv)


def distqat_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--", "qat", "trainer",
                                                                 "data") else "")


class Record:
    """The JSON record: environment, settings, and rows by key (rerun rows replace theirs)."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = Path(path) if path else None
        self.data: dict = {"ptq": {}, "qat": {}, "skipped": {}, "versions": {}}
        if self.path and self.path.exists():
            self.data.update(json.loads(self.path.read_text()))

    def put(self, part: str, key: str, row: dict) -> None:
        row.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=torch.get_num_threads(),
                   distqat_commit=distqat_commit())
        self.data[part][key] = row
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=2))


def _peer(rec, venv: str, name: str):
    """The peer's python, its versions recorded once; None (and one printed line, recorded) when it is absent."""
    python, skip = peer_python(venv, name)
    if skip:
        print(skip, file=sys.stderr, flush=True)
        rec.data["skipped"][name] = skip
        return None
    if name not in rec.data["versions"]:
        rec.data["versions"][name] = peer_versions(python, name)
    return python

def ptq_part(args: argparse.Namespace, scorer: Scorer, rec: Record, work: Path) -> None:
    from data.calib import calibration_ids  # lazy: only the PTQ part calibrates
    from qat.ptq import PTQConfig, run_ptq
    from qat.ptq.gptq import GPTQConfig
    from qat.spec import parse

    calib = calibration_ids(scorer.tokenizer, args.n_samples, args.seq_len, "bundled:wikitext", "calib")
    calib_file = work / "calib.safetensors"
    save_file({"ids": calib.to(torch.int32).contiguous()}, str(calib_file))
    rec.data["calibration"] = {"text": "bundled:wikitext split calib", "n_samples": args.n_samples,
                               "seq_len": args.seq_len}
    from qat.io.models import bundled_model_path, resolve_model_path  # lazy: as above

    folder = bundled_model_path(args.model) if args.model.startswith("bundled:") else resolve_model_path(args.model)
    llmc = _peer(rec, args.llmc_venv, "llmc")
    base = None
    for key in [k for k in args.rows.split(",") if k]:
        label, peer, method, clip = PTQ_ROWS[key]
        row: dict = {"label": label, "peer": peer, "method": method}
        if peer == "llmc":
            if llmc is None:
                continue
            out = work / f"{key}.safetensors"
            info = run_peer(llmc, "llmc_ptq.py", ["--model", str(folder), "--calib", str(calib_file), "--method",
                                                  method, "--out", str(out)], log=work / f"{key}.log")
            row.update(seconds=info["seconds"], peer_info=info, ppl=scorer.score_state(out))
        elif method == "fp":
            row["ppl"] = scorer.fp()
        else:
            base = base if base is not None else scorer.load_fp()
            model = copy.deepcopy(base)
            cfg = PTQConfig(method=method, n_samples=args.n_samples, seq_len=args.seq_len, progress=False,
                            gptq=GPTQConfig(clip=clip))
            t0 = time.perf_counter()
            model, _ = run_ptq(model, parse("w4g64"), cfg, calib)
            row.update(seconds=time.perf_counter() - t0, ppl=scorer.score(model),
                       gptq={k: getattr(cfg.gptq, k) for k in ("act_order", "damp", "clip")})
            del model
        print(f"{label}: ppl {row['ppl']:.3f}" + (f", quantize {row['seconds']:.1f} s" if "seconds" in row else ""),
              file=sys.stderr, flush=True)
        rec.put("ptq", key, row)


def ptq_baseline(rows: dict) -> Callable[[dict], Optional[dict]]:
    peer_row = {"rtn": "rtn-llmc", "gptq": "gptq-llmc", "awq": "awq-llmc"}

    def baseline(row: dict) -> Optional[dict]:
        return rows.get(peer_row.get(row["method"], ""))

    return baseline


def training_blocks(args: argparse.Namespace, generated: Path, tokenizer, seed: int) -> torch.Tensor:
    """The blocks distqat's train reads, in its order (data.blocks with the run's seed, val split, batch and
    step count): every QAT row trains on exactly these."""
    from data.blocks import BlockData  # lazy: only the QAT part trains

    data = BlockData(path=str(generated), seq_len=args.qat_seq_len, micro_batch_size=args.qat_batch, seed=seed,
                     tokenizer=tokenizer, total_samples=args.qat_steps * args.qat_batch)
    data.setup()
    ids = [b["input_ids"] for _, b in zip(range(args.qat_steps), data.dataloader(0, 1))]
    return torch.cat(ids).to(torch.int32).contiguous()


def distqat_train(args: argparse.Namespace, generated: Path, lr: float, work: Path) -> tuple[Path, float, float]:
    """`distqat train` from the RTN start at `lr` on the generated text: (its output folder, the seconds of its
    training loop from its log, the seconds of the whole command)."""
    out, log = work / f"distqat-{lr:g}", work / f"distqat-{lr:g}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([
            sys.executable, "-m", "trainer", "train", "configs/default.yaml", f"model.name_or_path={args.model}",
            f"quant.scheme={QAT_SCHEME}", "train.init=rtn", f"data.path={generated}",
            f"data.seq_len={args.qat_seq_len}", f"train.lr={lr}", f"train.max_steps={args.qat_steps}",
            f"train.micro_batch_size={args.qat_batch}",
            f"train.warmup_steps={args.qat_warmup}", "train.save_every=1000000", "train.val_every=1000000",
            "train.val_batches=0", "train.resume=never", f"output_dir={out}"],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"distqat train failed (exit {rc}); its log: {log}")
    return out, train_elapsed(log.read_text()), time.perf_counter() - t0


def qat_part(args: argparse.Namespace, scorer: Scorer, rec: Record, work: Path) -> None:
    from qat.apply import quantize_model  # lazy: only the QAT part quantizes
    from qat.io.models import bundled_model_path, resolve_model_path
    from qat.spec import parse
    from trainer.eval import saved_model

    generated = Path(args.generated) if args.generated else work / "generated"
    if not (generated / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "trainer", "generate", "configs/default.yaml",
                        f"model.name_or_path={args.model}", f"output_dir={work}"], check=True, cwd=REPO)
    rec.data["qat_text"] = str(generated)
    blocks = training_blocks(args, generated, scorer.tokenizer, scorer.cfg.seed)
    train_file, windows_file = work / "train.safetensors", work / "windows.safetensors"
    save_file({"ids": blocks}, str(train_file))
    save_file({"ids": torch.tensor(scorer.windows, dtype=torch.int32)}, str(windows_file))
    folder = bundled_model_path(args.model) if args.model.startswith("bundled:") else resolve_model_path(args.model)
    peers = [p for p in args.qat_peers.split(",") if p]
    torchao = _peer(rec, args.torchao_venv, "torchao") if "torchao" in peers else None
    distqat_start = torchao_start = None  # each start is the same at every lr: scored once
    for lr in [float(x) for x in args.qat_lrs.split(",") if x]:
        common = dict(lr=lr, steps=args.qat_steps, batch=args.qat_batch, seq_len=args.qat_seq_len)
        if torchao is not None:
            start, end = work / f"torchao-{lr:g}-start.safetensors", work / f"torchao-{lr:g}.safetensors"
            own = ["--windows", str(windows_file)] if torchao_start is None else []
            info = run_peer(torchao, "torchao_qat.py", [
                "--model", str(folder), "--train", str(train_file), *own,
                "--steps", str(args.qat_steps), "--batch", str(args.qat_batch), "--lr", str(lr),
                "--warmup", str(args.qat_warmup), "--start-out", str(start), "--out", str(end)],
                log=work / f"torchao-{lr:g}.log")
            if torchao_start is None:
                torchao_start = scorer.score_state(start, ACTIVATIONS)
            row = dict(label=f"torchao QAT from its RTN, lr {lr:g}", peer="torchao", **common,
                       seconds=info["train_seconds"], start_ppl=torchao_start,
                       end_ppl=scorer.score_state(end, ACTIVATIONS), peer_info=info)
            print(f"{row['label']}: {row['start_ppl']:.3f} -> {row['end_ppl']:.3f}", file=sys.stderr, flush=True)
            rec.put("qat", f"torchao-{lr:g}", row)
        if "distqat" in peers:
            if distqat_start is None:
                model = scorer.load_fp()
                quantize_model(model, parse(QAT_SCHEME))
                distqat_start = scorer.score(model)
                del model
            out, seconds, command_seconds = distqat_train(args, generated, lr, work)
            _, load = saved_model(scorer.cfg, out / "model")
            row = dict(label=f"distqat QAT from its RTN, lr {lr:g}", peer="distqat", **common, seconds=seconds,
                       command_seconds=command_seconds, start_ppl=distqat_start, end_ppl=scorer.score(load()))
            print(f"{row['label']}: {row['start_ppl']:.3f} -> {row['end_ppl']:.3f}", file=sys.stderr, flush=True)
            rec.put("qat", f"distqat-{lr:g}", row)


def main(argv=None) -> int:
    args = parse_args(argv)
    rec = Record(args.json)
    rec.data["versions"]["distqat env"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    rec.data.update(device=f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
                    command="python -m bench.peers " + " ".join(sys.argv[1:]))
    scorer = Scorer(args.model)
    rec.data["eval"] = {"windows": len(scorer.windows), "tokens": sum(len(w) for w in scorer.windows),
                        "text": "bundled:wikitext split test (distqat eval's defaults)"}
    parts = {p for p in args.parts.split(",") if p}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "ptq" in parts:
            ptq_part(args, scorer, rec, work)
        if "qat" in parts:
            qat_part(args, scorer, rec, work)
    rec.save()  # the skips and versions too, when no row ran
    print(format_tables(rec.data))
    return 0


def format_tables(data: dict) -> str:
    ptq = data.get("ptq", {})
    rows = [ptq[k] for k in PTQ_ROWS if k in ptq]
    out = [ptq_table(rows, ptq_baseline(ptq))] if rows else []
    if data.get("qat"):
        out.append(qat_table(list(data["qat"].values())))
    out += [f"skipped: {v}" for v in data.get("skipped", {}).values()]
    out.append("versions: " + json.dumps(data.get("versions", {})))
    return "\n\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
