"""Benchmark: the integer runtime linears (qat.runtime.ops) against bf16 F.linear, per path, shape and M.

    python -m bench.int_kernels [--m 1,16,64,256,1024,4096] [--json results.json]

For each (K, N) shape and each runtime path
  w4a16  int4 weights, group 128, bf16 activations
  w8a16  int8 per-channel weights, bf16 activations
  w8a8   int8 per-channel weights, int8 per-token activations
  w4a8   int4 weights, group 128, int8 per-token activations
it times, with triton.testing.do_bench (median µs), bf16 F.linear on a weight of the same shape and every
implementation of the path that takes the shape (qat.runtime.ops.IMPLS: tinygemm, gemv, triton, dequant,
int_mm; the CPU-style reference is left out on CUDA; tinygemm is missing from a row when its first-use self-check
failed, which it warns about once), prints speedup = bf16 time / implementation time (> 1: faster than bf16), which
implementation the dispatcher (qat.runtime.ops.DISPATCH) runs at that M and the best one measured, and
for M = 1 the roofline of reading the weight once (packed codes + bf16 scales at 3.0e12 B/s).
The a8 timings include quantizing the activations (the fused per-token kernel).
Set the thresholds of DISPATCH from this table: the chosen implementation should be the fastest, and
no chosen one slower than bf16. Needs one CUDA GPU; `--device cpu` (or `--cpu-smoke`, with tiny shapes)
times with the wall clock what runs on CPU (the reference, tinygemm's CPU variant, and the Triton kernels
under TRITON_INTERPRET=1): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._common import heat, matrix_shapes, missing_gpu_stack

HBM_BYTES_PER_S = 3.0e12  # H100 SXM HBM3, what a weight-bound kernel can hope for
PATHS = {  # name -> (bits, group (None: per channel), int8 activations)
    "w4a16": (4, 128, False),
    "w8a16": (8, None, False),
    "w8a8": (8, None, True),
    "w4a8": (4, 128, True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,16,64,256,1024,4096", help="comma-separated token counts M")
    p.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", type=matrix_shapes,
                   help="comma-separated in_features x out_features (K x N)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {list(PATHS)}")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--heat", type=float, default=2.0, help="seconds of matmuls before timing (settles the clocks)")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: wall-clock timing of the implementations available on CPU")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="--device cpu with tiny shapes (TRITON_INTERPRET=1 to include the kernels): checks this "
                        "script, measures nothing")
    return p.parse_args(argv)


def bench_us(fn, rep: int, cuda: bool = True) -> float:
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def roofline_weight_bytes(n: int, k: int, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Bytes a linear must read at least for its weight: packed codes plus scales (the roofline)."""
    return n * math.ceil(k * bits / 8) + n * (k // group_size) * scale_bytes


def make_layer(k: int, n: int, bits: int, group, seed: int, device: str = "cuda"):
    """Random converted weights in the runtime layout (symmetric), and their bf16 dequantization."""
    from qat.runtime.pack import pack_int32

    g = group or k
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.randint(0, 1 << bits, (n, k), device=device, generator=gen, dtype=torch.int32)
    qweight = (u - 128).to(torch.int8) if bits == 8 else pack_int32(u, bits)
    scale = (torch.rand(n, k // g, device=device, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    return qweight, scale, None, g


def available(impl: str, dev: str) -> bool:
    """Whether an implementation can run here: on CPU the Triton ones only under TRITON_INTERPRET=1."""
    from qat.kernels import interpret_mode  # lazy: after the CUDA check, like the other qat imports

    return dev == "cuda" or impl not in ("triton", "gemv", "int_mm") or interpret_mode()


def write(path: str, device: str, triton, ops, results: list[dict], complete: bool) -> None:
    payload = dict(device=device, torch=torch.__version__, triton=triton.__version__, complete=complete,
                   dispatch={p: [list(e) for e in v] for p, v in ops.DISPATCH.items()}, results=results)
    Path(path).write_text(json.dumps(payload, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = "cpu" if args.cpu_smoke else args.device
    if args.cpu_smoke:  # tiny shapes unless given: the interpreter runs a 4096-wide kernel for hours
        defaults = parse_args([])
        args.m = "1,5" if args.m == defaults.m else args.m
        args.shapes = [(128, 64)] if args.shapes == defaults.shapes else args.shapes
        args.rep, args.rounds, args.heat = 1, 1, 0.0
    missing = missing_gpu_stack("bench.int_kernels", need_cuda=dev == "cuda", hint="; --device cpu for a smoke run")
    if missing:
        print(missing, file=sys.stderr)
        return 1
    import triton

    from qat.runtime import ops

    ms = [int(v) for v in args.m.split(",") if v.strip()]
    shapes = args.shapes
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            print(f"unknown path {p!r}; one of {list(PATHS)}", file=sys.stderr)
            return 2
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke run: the times mean nothing)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"(median µs of {args.rounds} interleaved rounds of do_bench medians; speedup = bf16 / impl)")
    if dev == "cuda":
        heat(args.heat)
    results = []
    head = (f"{'K x N':>12} {'path':>6} {'M':>5} {'bf16 us':>9} {'impl':>8} {'us':>9} {'speedup':>8} "
            f"{'maxrel':>8}  {'chosen':>8} {'best':>8}")
    print(head)
    for k, n in shapes:
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for path in paths:
            bits, group, a8 = PATHS[path]
            qweight, scale, zero, g = make_layer(k, n, bits, min(group or k, k), seed=k + n, device=dev)
            wbytes = roofline_weight_bytes(n, k, bits, g)
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

                def run(impl, x=x, qweight=qweight, scale=scale, zero=zero, bits=bits, g=g, a8=a8, k=k):
                    if a8:
                        return ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_symmetric=True, impl=impl)
                    return ops.linear_a16(x, qweight, scale, zero, bits, g, k, impl=impl)

                impls = []
                for impl in ops.IMPLS[path]:
                    if (impl == "reference" and dev == "cuda") or not available(impl, dev):
                        continue
                    if ops.resolve_impl(impl, bits, a8, m, n, k, g, x) != impl:
                        continue  # the shape is not one this implementation takes
                    impls.append(impl)
                chosen = ops.resolve_impl(None, bits, a8, m, n, k, g, x)
                with torch.no_grad():
                    base = run("dequant").float()
                    err = {}
                    for impl in impls:  # every implementation agrees before it is timed
                        out = run(impl).float()
                        err[impl] = float((out - base).abs().max() / base.abs().max().clamp_min(1e-30))
                variants = {"bf16": lambda x=x, w16=w16: F.linear(x, w16)}
                variants.update({impl: (lambda impl=impl: run(impl)) for impl in impls})
                for fn in variants.values():  # compile and autotune outside the timing
                    fn()
                times = {key: [] for key in variants}
                for _ in range(args.rounds):
                    for key, fn in variants.items():
                        times[key].append(bench_us(fn, args.rep, dev == "cuda"))
                t = {key: statistics.median(v) for key, v in times.items()}
                best = min(impls, key=lambda i: t[i])
                row = dict(K=k, N=n, path=path, M=m, bits=bits, group_size=g, bf16_us=t["bf16"],
                           impl_us={i: t[i] for i in impls},
                           speedup={i: t["bf16"] / t[i] for i in impls}, max_rel_diff=err,
                           chosen=chosen, best=best, chosen_speedup=t["bf16"] / t[chosen] if chosen in t else None,
                           rounds=times)
                if m == 1:
                    row["roofline_us"] = wbytes / HBM_BYTES_PER_S * 1e6
                results.append(row)
                if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                    write(args.json, name, triton, ops, results, complete=False)
                for j, impl in enumerate(impls):
                    lead = f"{k}x{n}" if j == 0 else ""
                    tail = f"  {chosen:>8} {best:>8}" if j == 0 else ""
                    bf = f"{t['bf16']:9.1f}" if j == 0 else ""
                    print(f"{lead:>12} {path if j == 0 else '':>6} {m if j == 0 else '':>5} "
                          f"{bf:>9} {impl:>8} {t[impl]:9.1f} "
                          f"{t['bf16'] / t[impl]:8.2f} {err[impl]:8.1e}{tail}")
                if m == 1:
                    print(f"{'':>12} {'':>6} {'':>5} {'':>9} {'roofline':>8} {row['roofline_us']:9.1f}  "
                          f"(weight {wbytes / 2**20:.1f} MiB at {HBM_BYTES_PER_S / 1e12:.1f} TB/s)")
                del x
            del qweight, scale
        del w16
        if dev == "cuda":
            torch.cuda.empty_cache()

    slower = [r for r in results if r["chosen_speedup"] is not None and r["chosen_speedup"] < 1.0]
    print(f"\nchosen implementation slower than bf16 in {len(slower)} of {len(results)} cases"
          + "".join(f"\n  {r['K']}x{r['N']} {r['path']} M={r['M']}: {r['chosen']} {r['chosen_speedup']:.2f}x"
                    for r in slower))
    mismatched = [r for r in results if r["chosen"] != r["best"]]
    print(f"chosen != fastest measured in {len(mismatched)} cases"
          + "".join(f"\n  {r['K']}x{r['N']} {r['path']} M={r['M']}: chose {r['chosen']}, best {r['best']}"
                    for r in mismatched))
    if args.json:
        write(args.json, name, triton, ops, results, complete=True)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
