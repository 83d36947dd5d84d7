"""Benchmark: perplexity of the bundled model split into experts (`bundled:smollm2-135m-moe`) against the dense one.

    python -m bench.moe_ppl [--variants coactivation:8:6,coactivation:8:4,gate-kmeans:8:6] [--windows 8]
                            [--spread 1e-5] [--json out.json]

Each variant (method:experts:top_k) is built by qat.io.moe.build_moe from the cached dense folder into a temp
folder, timed, loaded in fp32 and scored the way `distqat eval` scores a model: trainer.eval.perplexity on windows
of 1,024 tokens spread over the bundled Wikipedia test split (8 windows: the default eval). The table gives each
perplexity, its ratio to the dense model's, the build seconds, and how evenly the router spreads the tokens: the
least and the most used expert's share of the tokens, over every layer (a dead expert shows as 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.sources import load_texts, spread_windows, token_stream
from qat.io.env import device_name, versions
from qat.io.models import DERIVED, bundled_model_path, load_model, load_tokenizer
from qat.io.moe import build_moe
from trainer.eval import perplexity

SHIPPED = "bundled:smollm2-135m-moe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="coactivation:8:6,coactivation:8:4,gate-kmeans:8:6,gate-kmeans:8:4",
                   help="comma-separated method:experts:top_k (methods: qat.io.moe.METHODS)")
    p.add_argument("--windows", type=int, default=8, help="windows of 1,024 tokens scored (8: the default eval)")
    p.add_argument("--spread", type=float, default=None, help="router logit spread (default: the shipped one)")
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error(f"--windows {args.windows}: give at least 1")
    return args


def expert_shares(model: torch.nn.Module, windows: list[list[int]]) -> tuple[float, float]:
    """(least, most) share of the tokens any one expert of any layer is sent to, over `windows`."""
    counts = []

    def count(module, args, output):
        counts.append(torch.bincount(output[2].flatten(), minlength=module.num_experts).float() / len(output[2]))

    hooks = [layer.mlp.gate.register_forward_hook(count) for layer in model.model.layers]
    try:
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([w]))
    finally:
        for h in hooks:
            h.remove()
    shares = torch.stack(counts)
    return float(shares.min()), float(shares.max())


def main(argv) -> int:
    args = parse_args(argv)
    base, shipped = DERIVED[SHIPPED]
    spread = shipped.spread if args.spread is None else args.spread
    dense = bundled_model_path(base)
    tok = load_tokenizer(base)
    windows = spread_windows(token_stream(load_texts("bundled:wikitext", "test"), tok), 1024, 1024 * args.windows)
    rows = [{"model": base, "ppl": perplexity(load_model(base, dtype="float32"), windows, progress=False)}]
    print(f"{base}: perplexity {rows[0]['ppl']:.3f}", file=sys.stderr, flush=True)
    for variant in args.variants.split(","):
        method, experts, top_k = variant.split(":")
        split = dataclasses.replace(shipped, method=method, experts=int(experts), top_k=int(top_k), spread=spread)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            build_moe(dense, Path(tmp), split)
            secs = time.perf_counter() - t0
            model = load_model(tmp, dtype="float32")
            ppl = perplexity(model, windows, progress=False)
            least, most = expert_shares(model, windows[:1])
        rows.append({"model": f"{method} E={experts} k={top_k}", "ppl": ppl, "build_s": secs, "split": split.describe(),
                     "least_share": least, "most_share": most})
        print(f"{rows[-1]['model']}: perplexity {ppl:.3f}, built in {secs:.0f} s", file=sys.stderr, flush=True)
    print(f"{len(windows)} windows x 1,024 tokens of the bundled Wikipedia test split; {device_name()}; "
          f"router spread {spread:g}")
    print("| model | perplexity | x dense | build s | expert share min..max (window 1) |")
    print("|---|---|---|---|---|")
    for r in rows:
        extra = (f"{r['build_s']:.0f} | {r['least_share']:.3f}..{r['most_share']:.3f}" if "build_s" in r else "- | -")
        print(f"| {r['model']} | {r['ppl']:.2f} | {r['ppl'] / rows[0]['ppl']:.2f} | {extra} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": device_name(), "versions": versions()},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
