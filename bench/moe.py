"""Benchmark: what quantizing one MoE layer's experts costs, as ratios against the model's own experts module timed
in the same process.

    python -m bench.moe [--shape qwen3-30b-a3b-layer|small|tiny] [--tokens N] [--schemes w4a8,w4g128]
                        [--int-schemes w4g128,w8a8] [--infer-tokens 16,N] [--device cuda|cpu] [--json PATH]

The experts module is `mlp.experts` of a one-layer random-init transformers Qwen3-MoE model at the shape
(`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), bf16 on CUDA, fp32 on CPU. Routing is uniform: each token
gets a random set of top-k experts, with routing weights that sum to 1.

QAT step: forward + backward, the tokens and the routing weights requiring grad, a random upstream gradient:
  own        the model's own experts module, in its default experts implementation (transformers' grouped_mm
             where torch has it): the baseline
  own-loop   the same module through its eager per-expert loop (the loop QuantExperts runs, so what the loop
             alone costs)
  fused      QuantExperts (qat.apply.quantize_model on the layer) with the fused fake-quant kernel: CUDA only
  reference  the same QuantExperts with the kernel switched off (the reference torch ops)
Inference: forward without grad, at each of --infer-tokens:
  own, own-loop as above
  int        IntExperts of the layer converted and loaded back (qat.export.convert_model + load_quantized) at
             each --int-schemes (a group size that does not divide both widths is halved until it does); its
             projections run qat.runtime.ops: the int kernels on CUDA, the torch reference (or tinygemm's CPU
             variant) on CPU; `impl` is what the dispatcher picks at the mean routed tokens per expert.
ratio = time / own time. CUDA: triton.testing.do_bench medians after --heat seconds of matmuls; CPU: the median
of --repeats wall-clock calls. Either way each variant runs once untimed, then the median of --rounds
interleaved rounds is reported. Before timing, fused is checked equal to reference and each int module against
the fake-quant module it was converted from (max relative difference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from bench._common import heat, kernel_disabled

# hidden, moe intermediate, experts, top-k
SHAPES = {
    "qwen3-30b-a3b-layer": dict(hidden=2048, inter=768, experts=128, top_k=8),  # Qwen3-30B-A3B's MoE layer
    "small": dict(hidden=576, inter=192, experts=8, top_k=2),  # the CPU default: SmolLM2-135M's width
    "tiny": dict(hidden=64, inter=32, experts=4, top_k=2),  # smoke runs
}
EXPERTS = "model.layers.0.mlp.experts"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), help="default: qwen3-30b-a3b-layer on CUDA, small on CPU")
    p.add_argument("--tokens", type=int, help="tokens of the QAT step and the largest inference batch "
                                              "(default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--infer-tokens", help="comma-separated token counts of the inference forward (default 16,<tokens>)")
    p.add_argument("--schemes", default="w4a8,w4g128", help="fake-quant schemes of the QAT step")
    p.add_argument("--int-schemes", default="w4g128,w8a8", help="converted schemes of the inference forward")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where there is one")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms), CUDA")
    p.add_argument("--repeats", type=int, default=5, help="wall-clock calls per round, CPU")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each variant's median is reported")
    p.add_argument("--heat", type=float, default=2.0, help="seconds of matmuls before timing, CUDA")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file (after every part)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False; --device cpu runs on CPU")
    args.shape = args.shape or ("qwen3-30b-a3b-layer" if args.device == "cuda" else "small")
    args.tokens = args.tokens or (8192 if args.device == "cuda" else 1024)
    counts = args.infer_tokens or f"16,{args.tokens}"
    try:
        args.infer_tokens = sorted({int(v) for v in counts.split(",") if v.strip()})
    except ValueError:
        p.error(f"--infer-tokens {counts!r}: comma-separated token counts, e.g. 16,512")
    if min([args.tokens, *args.infer_tokens, args.rounds, args.repeats, args.rep]) < 1:
        p.error("--tokens, --infer-tokens, --rounds, --repeats and --rep take positive numbers")
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    args.int_schemes = [s.strip() for s in args.int_schemes.split(",") if s.strip()]
    return args


def fit_group(scheme: str, widths: tuple[int, ...]) -> str:
    """The scheme with its group size halved until it divides every input width (w4g128 -> w4g64 at 576)."""
    m = re.search(r"g(\d+)", scheme)
    if m is None:
        return scheme
    g = int(m.group(1))
    while g > 1 and any(w % g for w in widths):
        g //= 2
    return scheme[: m.start(1)] + str(g) + scheme[m.end(1):]


def layer_model(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """A one-layer Qwen3-MoE at the shape, random init, on CPU; its attention and vocabulary are tiny (unused)."""
    import transformers as tf  # lazy: after the argument checks (transformers takes seconds to import)

    s = SHAPES[shape]
    cfg = tf.Qwen3MoeConfig(vocab_size=256, hidden_size=s["hidden"], num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=s["inter"],
                            moe_intermediate_size=s["inter"], num_experts=s["experts"], num_experts_per_tok=s["top_k"],
                            max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def routed_inputs(tokens: int, shape: str, dtype: torch.dtype, device: str):
    """(tokens, routing indices, routing weights, upstream gradient): uniform random top-k routing."""
    s = SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, s["hidden"], generator=gen)
    index = torch.rand(tokens, s["experts"], generator=gen).topk(s["top_k"], dim=-1).indices
    weights = torch.rand(tokens, s["top_k"], generator=gen) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    dy = torch.randn(tokens, s["hidden"], generator=gen)
    return (x.to(device, dtype), index.to(device), weights.to(device, dtype), dy.to(device, dtype))


def make_timer(device: str, rep: int, repeats: int) -> Callable[[Callable], float]:
    """fn -> milliseconds: do_bench's median on CUDA, the median of `repeats` wall-clock calls on CPU."""
    if device == "cuda":
        from triton.testing import do_bench  # lazy: triton only where there is a GPU

        return lambda fn: float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))

    def wall(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def measure(variants: dict[str, Callable], rounds: int, timer: Callable) -> dict[str, tuple[float, list[float]]]:
    """{name: (median ms, per-round ms)}: every variant once untimed, then `rounds` interleaved rounds."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timer(fn))
    return {k: (statistics.median(v), v) for k, v in times.items()}


def eager_loop(module: torch.nn.Module) -> Optional[Callable]:
    """The module's own per-expert loop, bypassing transformers' experts-implementation dispatch (None if absent)."""
    loop = getattr(type(module).forward, "__wrapped__", None)
    return None if loop is None else (lambda *a: loop(module, *a))


def train_step(fn: Callable, grads: list[torch.Tensor], x, index, weights, dy, off: bool = False) -> Callable:
    def step():
        for t in grads:
            t.grad = None
        if off:
            with kernel_disabled():
                fn(x, index, weights).backward(dy)
        else:
            fn(x, index, weights).backward(dy)

    return step


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def qat_rows(args, base, own, dtype) -> list[dict]:
    from qat.apply import quantize_model  # lazy: qat after the argument checks
    from qat.device import device_path  # lazy: as above

    x, index, weights, dy = routed_inputs(args.tokens, args.shape, dtype, args.device)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    own_params = list(own.parameters())
    variants = {("own", "-"): train_step(own, [x, weights, *own_params], x, index, weights, dy)}
    if (loop := eager_loop(own)) is not None:
        variants[("own-loop", "-")] = train_step(loop, [x, weights, *own_params], x, index, weights, dy)
    notes: dict[tuple, str] = {}
    kernel = device_path(own.gate_up_proj, "fake_quant")
    s = SHAPES[args.shape]
    for scheme in args.schemes:
        used = fit_group(scheme, (s["hidden"], s["inter"]))
        model = copy.deepcopy(base)
        quantize_model(model, used, include=[EXPERTS])
        qe = model.get_submodule(EXPERTS)
        grads = [x, weights, *qe.parameters()]
        if kernel:
            with torch.no_grad():
                same = torch.equal(qe(x, index, weights), kernel_off(qe, x, index, weights))
            variants[("fused", used)] = train_step(qe, grads, x, index, weights, dy)
            notes[("fused", used)] = "equals reference" if same else "DIFFERS from reference"
        variants[("reference", used)] = train_step(qe, grads, x, index, weights, dy, off=True)
    timed = measure(variants, args.rounds, make_timer(args.device, args.rep, args.repeats))
    base_ms = timed[("own", "-")][0]
    return [dict(variant=v, scheme=sch, tokens=args.tokens, ms=ms, ratio=ms / base_ms, note=notes.get((v, sch), ""),
                 rounds=r) for (v, sch), (ms, r) in timed.items()]


def kernel_off(module, *inputs) -> torch.Tensor:
    with kernel_disabled():
        return module(*inputs)


def int_modules(args, base, dtype) -> dict[str, tuple[torch.nn.Module, float, float]]:
    """{scheme used: (IntExperts on the device, seconds to convert and load, max rel diff to its fake quant)}."""
    from qat.apply import quantize_model  # lazy: qat after the argument checks
    from qat.export import convert_model, load_quantized  # lazy: as above

    s = SHAPES[args.shape]
    out = {}
    x, index, weights, _ = routed_inputs(min(args.tokens, 256), args.shape, dtype, args.device)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        for scheme in args.int_schemes:
            used = fit_group(scheme, (s["hidden"], s["inter"]))
            fq = copy.deepcopy(base)
            quantize_model(fq, used, include=[EXPERTS])
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # convert's notes on which readers run the folder
                folder = convert_model(fq, Path(tmp) / used)
            ie = load_quantized(folder, device=args.device).get_submodule(EXPERTS)
            took = time.perf_counter() - t0
            fe = fq.get_submodule(EXPERTS).to(args.device)
            with torch.no_grad():
                diff = rel_diff(ie(x, index, weights), fe(x, index, weights))
            out[used] = (ie, took, diff)
            del fq, fe
    return out


def dispatched(ie, tokens: int, top_k: int, device: str) -> str:
    """What qat.runtime.ops runs for the experts' projections at the mean routed tokens per expert."""
    from qat.runtime import ops  # lazy: qat after the argument checks

    lay, picks = ie.expert_layout, []
    m = max(1, round(tokens * top_k / lay.num_experts))
    for p in lay.params:
        wspec, aspec = ie.int_specs[p]
        n, k = ie.out_in(p)
        g = wspec.group_size if wspec.granularity == "group" else k
        x = torch.empty(m, k, device=device, dtype=ie.compute_dtype)
        picks.append(ops.resolve_impl(None, wspec.bits, aspec is not None, m, n, k, g, x))
    return "/".join(dict.fromkeys(picks))


def infer_rows(args, own, ints: dict, dtype) -> list[dict]:
    x, index, weights, _ = routed_inputs(max(args.infer_tokens), args.shape, dtype, args.device)
    timer, top_k = make_timer(args.device, args.rep, args.repeats), SHAPES[args.shape]["top_k"]
    loop, rows = eager_loop(own), []
    for n in args.infer_tokens:
        inputs = (x[:n], index[:n], weights[:n])
        variants = {("own", "-"): (lambda inputs=inputs: own(*inputs))}
        if loop is not None:
            variants[("own-loop", "-")] = lambda inputs=inputs: loop(*inputs)
        variants.update({("int", used): (lambda ie=ie, inputs=inputs: ie(*inputs))
                         for used, (ie, _, _) in ints.items()})
        with torch.no_grad():
            timed = measure(variants, args.rounds, timer)
        base_ms = timed[("own", "-")][0]
        for (v, sch), (ms, r) in timed.items():
            row = dict(variant=v, scheme=sch, tokens=n, ms=ms, ratio=ms / base_ms, rounds=r)
            if v == "int":
                ie, took, diff = ints[sch]
                row.update(impl=dispatched(ie, n, top_k, args.device), max_rel_diff=diff, convert_s=took)
            rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], extra: Callable[[dict], str]) -> None:
    print(f"\n{title}")
    print(f"{'tokens':>7} {'variant':>10} {'scheme':>8} {'ms':>10} {'ratio':>7}  note")
    for r in rows:
        print(f"{r['tokens']:>7} {r['variant']:>10} {r['scheme']:>8} {r['ms']:10.3f} {r['ratio']:7.3f}  {extra(r)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and (problem := missing_triton()):
        print(problem, file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if cuda else torch.float32
    s = SHAPES[args.shape]
    base = layer_model(args.shape, dtype)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    payload = dict(device=name, torch=torch.__version__, shape=args.shape, **s, dtype=str(dtype).split(".")[-1],
                   tokens=args.tokens, own_impl=base.config._experts_implementation, complete=False)
    print(f"device: {name}  torch {torch.__version__}  shape {args.shape} (hidden {s['hidden']}, {s['experts']} "
          f"experts of {s['inter']}, top-{s['top_k']})  {payload['dtype']}  own experts: {payload['own_impl']}  "
          f"(median of {args.rounds} interleaved rounds; ratio = time / own)")
    ints = int_modules(args, base, dtype)
    base.to(args.device)
    own = base.get_submodule(EXPERTS)
    if cuda:
        heat(args.heat)
    payload["qat_step"] = qat_rows(args, base, own, dtype)
    write(args.json, payload)
    print_table("QAT step: forward + backward", payload["qat_step"], lambda r: r["note"])
    payload["inference"] = infer_rows(args, own, ints, dtype)
    payload["complete"] = True
    write(args.json, payload)
    if cuda:
        where = "the int kernels of qat.runtime.ops"
    else:
        where = "CPU: " + ("the Triton kernels in the interpreter" if interpret_mode() else "no int kernels")
    print_table(f"inference: forward ({where})", payload["inference"], int_note)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def int_note(r: dict) -> str:
    if r["variant"] != "int":
        return ""
    return f"impl {r['impl']}, max rel diff to fake quant {r['max_rel_diff']:.1e}, convert+load {r['convert_s']:.1f} s"


def interpret_mode() -> bool:
    from qat.device import interpret_mode as on  # lazy: qat after the argument checks

    return on()


def missing_triton() -> Optional[str]:
    from bench._common import missing_gpu_stack  # lazy: only a CUDA run needs triton

    return missing_gpu_stack("bench.moe", need_cuda=True)


def write(path: Optional[str], payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    sys.exit(main())
