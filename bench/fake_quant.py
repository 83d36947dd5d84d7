"""Benchmark: QuantLinear forward+backward (fused fake-quant kernel vs reference ops) against bf16 nn.Linear.

    python -m bench.fake_quant [--tokens 8192] [--json results.json]

For each shape (in -> out) and scheme it times, with triton.testing.do_bench (median ms):
  bf16   nn.Linear forward + backward (bf16 weight and input, input requires grad)
  naive  QuantLinear with the kernel disabled (the reference torch ops of qat.quantizers)
  fused  QuantLinear with the fused Triton kernel
and a second table of the fake-quant step alone (kernel vs reference) with the kernel's bandwidth: the int
cases of the schemes, and NVFP4 / MXFP4 block rows of the input (per-token scales) and the weight (one scale).
Needs one CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from bench._common import heat, kernel_disabled, matrix_shapes, missing_gpu_stack


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="rows of the input (batch * sequence)")
    p.add_argument("--shapes", default="4096x4096,4096x11008", type=matrix_shapes,
                   help="comma-separated in_features x out_features")
    p.add_argument("--schemes", default="w4a8,w4g128a8", help="comma-separated short scheme names")
    p.add_argument("--bias", action="store_true", help="linears with a bias (LLM linears usually have none)")
    p.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each variant's median is reported")
    p.add_argument("--heat", type=float, default=3.0, help="seconds of matmuls before timing (settles the clocks)")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return p.parse_args(argv)


def bench_ms(fn, grads, rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, grad_to_none=grads, return_mode="median"))


def fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        module(x).backward(dy)

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_gpu_stack("bench.fake_quant", need_cuda=True, hint="; nothing to do")
    if missing:
        print(missing, file=sys.stderr)
        return 1
    import triton

    from qat.kernels import fused_fake_quant_rows, fused_fp4_fake_quant_rows
    from qat.linear import QuantLinear
    from qat.quantizers import act_rows, fake_quant, weight_rows
    from qat.spec import FP4_FORMATS, TensorSpec, parse

    dev, dt = torch.device("cuda"), torch.bfloat16
    shapes = args.shapes
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    results, kernel_results = [], []
    print(f"device: {torch.cuda.get_device_name()}  tokens: {args.tokens}  torch {torch.__version__}  "
          f"triton {triton.__version__}  (median of {args.rounds} interleaved rounds of do_bench medians)")
    heat(args.heat)
    print(f"{'shape':>12} {'scheme':>10} {'bf16 ms':>9} {'naive ms':>9} {'fused ms':>9} "
          f"{'fused/bf16':>10} {'naive/bf16':>10} {'qgemm ms':>9} {'qgemm/bf16':>10}")
    for fin, fout in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(fin, fout, bias=args.bias, device=dev, dtype=dt)
        x = torch.randn(args.tokens, fin, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(args.tokens, fout, device=dev, dtype=dt)
        for scheme in schemes:
            spec = parse(scheme)
            ql = QuantLinear.from_linear(lin, spec.weight, spec.activation)
            with torch.no_grad():  # the fused and reference paths must agree before timing them
                y_fused = ql(x)
                with kernel_disabled():
                    y_ref = ql(x)
                same = bool(torch.equal(y_fused, y_ref))
                # The same matmuls on already fake-quantized tensors: the floor for any fake-quant code,
                # since matmuls on quantized values do not run at the speed of matmuls on random ones.
                wq = ql.quantized_weight().detach().clone().requires_grad_(True)
                xq = ql.input_quantizer(x).detach().clone().requires_grad_(True)
                bq = None if lin.bias is None else lin.bias.detach().clone().requires_grad_(True)
            del y_fused, y_ref

            def qgemm(xq=xq, wq=wq, bq=bq, dy=dy):
                nn.functional.linear(xq, wq, bq).backward(dy)

            def naive(ql=ql, x=x, dy=dy):
                with kernel_disabled():
                    ql(x).backward(dy)

            variants = {
                "bf16": (fwd_bwd(lin, x, dy), [x, *lin.parameters()]),
                "naive": (naive, [x, *ql.parameters()]),
                "fused": (fwd_bwd(ql, x, dy), [x, *ql.parameters()]),
                "qgemm": (qgemm, [t for t in (xq, wq, bq) if t is not None]),
            }
            times = {k: [] for k in variants}
            for _ in range(args.rounds):
                for k, (fn, grads) in variants.items():
                    times[k].append(bench_ms(fn, grads, args.rep))
            t = {k: statistics.median(v) for k, v in times.items()}
            row = dict(shape=f"{fin}x{fout}", tokens=args.tokens, scheme=scheme, bf16_ms=t["bf16"],
                       naive_ms=t["naive"], fused_ms=t["fused"], qgemm_ms=t["qgemm"],
                       fused_over_bf16=t["fused"] / t["bf16"], naive_over_bf16=t["naive"] / t["bf16"],
                       qgemm_over_bf16=t["qgemm"] / t["bf16"], fused_equals_reference=same,
                       rounds={k: v for k, v in times.items()})
            results.append(row)
            print(f"{row['shape']:>12} {scheme:>10} {t['bf16']:9.3f} {t['naive']:9.3f} {t['fused']:9.3f} "
                  f"{row['fused_over_bf16']:10.3f} {row['naive_over_bf16']:10.3f} {t['qgemm']:9.3f} "
                  f"{row['qgemm_over_bf16']:10.3f}" + ("" if same else "  (fused output differs from the reference!)"))
            del ql, xq, wq, bq, variants
        # The fake-quant step alone: activation rows and each scheme's weight rows.
        cases = []
        for scheme in schemes:
            acts = parse(scheme).activation
            if acts is not None and acts.format == "int" and acts.granularity == "token":
                cases.append((f"act a{acts.bits} per-token", act_rows(x.detach(), acts), acts, None))
                break
        for scheme in schemes:
            ws = parse(scheme).weight
            if ws is not None and ws.format == "int" and ws.scale_method == "minmax":
                cases.append((f"weight {scheme}", weight_rows(lin.weight.detach(), ws), ws, dt))
        # NVFP4 / MXFP4 blocks: per-token activation scales (global_rows: one token's blocks), one weight scale.
        for fmt, block in FP4_FORMATS.items():
            fp4 = TensorSpec(bits=4, granularity="group", group_size=block, format=fmt)
            cases.append((f"act {fmt}", act_rows(x.detach(), fp4), fp4, fin // block))
            cases.append((f"weight {fmt}", weight_rows(lin.weight.detach(), fp4), fp4, None))
        for name, rows, spec, extra in cases:
            if spec.format in FP4_FORMATS:  # extra: global_rows
                kernel = lambda r=rows, s=spec, e=extra: fused_fp4_fake_quant_rows(r, s.format, e)
                ref = lambda r=rows, s=spec, e=extra: fake_quant(r, s, use_kernel=False, global_rows=e)
            else:  # extra: the scale dtype
                kernel = lambda r=rows, s=spec, d=extra: fused_fake_quant_rows(r, s.bits, s.symmetric, d)
                ref = lambda r=rows, s=spec, d=extra: fake_quant(r, s, d, use_kernel=False)
            kernel()  # compile outside the timing
            t_k = bench_ms(kernel, None, args.rep)
            t_r = bench_ms(ref, None, args.rep)
            gbs = 2 * rows.numel() * rows.element_size() / (t_k * 1e-3) / 1e9
            kernel_results.append(dict(shape=f"{fin}x{fout}", case=name, rows=list(rows.shape), kernel_ms=t_k,
                                       reference_ms=t_r, kernel_gb_s=gbs))
        del lin, x, dy
        torch.cuda.empty_cache()

    print(f"\nfake quant alone (rows {args.tokens} tokens / weights):")
    print(f"{'shape':>12} {'case':>20} {'rows':>16} {'kernel ms':>10} {'ref ms':>9} {'kernel GB/s':>12}")
    for r in kernel_results:
        print(f"{r['shape']:>12} {r['case']:>20} {str(tuple(r['rows'])):>16} {r['kernel_ms']:10.4f} "
              f"{r['reference_ms']:9.4f} {r['kernel_gb_s']:12.0f}")
    if args.json:
        payload = dict(device=torch.cuda.get_device_name(), tokens=args.tokens, torch=torch.__version__,
                       triton=triton.__version__, linear=results, fake_quant=kernel_results)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
