"""Benchmark: the calibration Hessian X^T X as the PTQ loop accumulates it (`qat.ptq.gram`, the blocks on and above
the diagonal) against the plain product, on the CPU.

    python -m bench.hessian [--widths 576,1536] [--tokens 4096] [--threads 1,2] [--rounds 7]

Each row is one width (the bundled model's hidden and MLP widths by default) at one thread count: the median of
--rounds interleaved timings of `h.addmm_(x.T, x)` and of `add_upper_gram` + `symmetrize` on the same (tokens, width)
float32 x, their ratio (below 1: the blocked form is faster), and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qat.ptq.gram import add_upper_gram, edges, symmetrize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="576,1536")
    p.add_argument("--tokens", type=int, default=4096, help="rows of x (one calibration batch: 8 x 512)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    print("| width | threads | blocks | X^T X ms | upper blocks ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for width in [int(w) for w in a.widths.split(",")]:
            x = torch.randn(a.tokens, width, generator=torch.Generator().manual_seed(width))
            full, blocked = torch.zeros(width, width), torch.zeros(width, width)
            t_full, t_blocked = [], []
            for _ in range(a.rounds):
                full.zero_()
                t0 = time.perf_counter()
                full.addmm_(x.T, x)
                t_full.append(time.perf_counter() - t0)
                blocked.zero_()
                t0 = time.perf_counter()
                add_upper_gram(blocked, x)
                symmetrize(blocked)
                t_blocked.append(time.perf_counter() - t0)
            f, b = statistics.median(t_full), statistics.median(t_blocked)
            diff = (full - blocked).abs().max().item()
            print(f"| {width} | {threads} | {len(edges(width)) - 1} | {f * 1e3:.3g} | {b * 1e3:.3g} | {b / f:.2f}x | "
                  f"{diff:.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
