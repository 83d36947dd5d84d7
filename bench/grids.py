"""Benchmark: which symmetric integer grid RTN weights score best on, per scheme, on the bundled model.

    python -m bench.grids [--schemes w4,w4g64,w4g32,w3g64] [--grids signed,full,qmax] [--json out.json]

For each weight-only scheme and each `sym_range` (signed: max(max / qmax, min / qmin), the weights' default; full:
absmax / (qmax + 1/2), compressed-tensors' and torchao's; qmax: absmax / qmax), the bundled model's decoder linears
are put on that grid by RTN and scored by `distqat eval`'s windows and perplexity (bench/_peers_run.py's Scorer:
its FP row is `distqat eval`'s). The table's ratio is each row's perplexity over the full range's at the same
scheme (below 1: better than the reference tools' grid). RTN is deterministic, but a tie at a negative absmax on
the full range rounds by the last bit of a division, so its rows move by a few tenths with arithmetic that differs
in that bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace

import torch

from bench._peers_run import Scorer
from qat.apply import quantize_model
from qat.spec import parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--schemes", default="w4,w4g64,w4g32,w3g64", help="weight-only symmetric int short names")
    p.add_argument("--grids", default="signed,full,qmax")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    grids = [g for g in a.grids.split(",") if g]
    specs = {}
    for name in [s for s in a.schemes.split(",") if s]:
        base = parse(name)
        if base.activation is not None or base.kv is not None or base.weight is None or not base.weight.symmetric:
            print(f"grids.py: error: --schemes {name}: give weight-only symmetric int schemes (e.g. w4g64)",
                  file=sys.stderr)
            return 2
        specs[name] = {g: replace(base, weight=replace(base.weight, sym_range=g)).check() for g in grids}
    scorer = Scorer(a.model)
    fp_model = scorer.load_fp()
    rows = [{"scheme": "FP", "grid": "", "ppl": scorer.score(fp_model)}]
    print(f"FP: {rows[0]['ppl']:.3f}", file=sys.stderr, flush=True)
    for name, by_grid in specs.items():
        for grid, spec in by_grid.items():
            model = copy.deepcopy(fp_model)
            quantize_model(model, spec)
            t0 = time.perf_counter()
            rows.append({"scheme": name, "grid": grid, "ppl": scorer.score(model)})
            print(f"{name} {grid}: {rows[-1]['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
            del model
    print(table(rows))
    if a.json:
        info = {"model": a.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "machine": platform.processor() or platform.machine()}
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


def table(rows: list[dict]) -> str:
    """The markdown table: one line per scheme and grid, the ratio to the full range's perplexity at that scheme."""
    full = {r["scheme"]: r["ppl"] for r in rows if r["grid"] == "full"}
    best = {}
    for r in rows[1:]:
        best[r["scheme"]] = min(best.get(r["scheme"], float("inf")), r["ppl"])
    out = ["| RTN, weight-only | grid | perplexity | / full range |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / full[r['scheme']]:.3f}x" if r["scheme"] in full else ""
        mark = "**" if r["grid"] and r["ppl"] == best[r["scheme"]] else ""
        out.append(f"| {r['scheme']} | {r['grid']} | {mark}{r['ppl']:.3f}{mark} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
