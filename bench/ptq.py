"""Benchmark: perplexity of PTQ baselines on the bundled model, and quantization time per layer.

    python -m bench.ptq [--settings w4g64,w3g64,...] [--methods rtn,gptq,awq,hqq] [--json out.json]
    python -m bench.ptq --settings nvfp4,mxfp4,w4a4kv4 --methods rtn,gptq,rotate+gptq --w8a8 ''

FP, then for each setting (any short name: weight-only, fp4 nvfp4/mxfp4/wnvfp4/wmxfp4, w4a4kv4 ...) each method
(RTN, GPTQ, AWQ, HQQ, or any ptq.method) skipping the pairs a method refuses (HQQ at fp4), then W8A8 RTN vs
SmoothQuant;
perplexity with trainer.eval.perplexity on spread windows (1024 tokens, 8192 in all) of the bundled
Wikipedia test split; calibration: --n-samples x --seq-len tokens of --calib (default: the bundled `calib`
split; a `distqat generate` folder calibrates data-free, as a QAT run's train.init does).
Results are appended to the JSON after every run, so a partial run still leaves a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--settings", default="w4g64,w3g64,w4,w3g64asym,w4g64asym,w4asym",
                   help="short names (weight-only ones, nvfp4, mxfp4, wnvfp4, wmxfp4, w4a4kv4 ...)")
    p.add_argument("--methods", default="rtn,gptq,awq,hqq")
    p.add_argument("--w8a8", default="w8a8", help="scheme for the RTN vs SmoothQuant comparison ('' skips)")
    p.add_argument("--w8a8-methods", default="rtn,smoothquant")
    p.add_argument("--calib", default="bundled:wikitext",
                   help="calibration text: bundled:wikitext (its --calib-split), a local file or a distqat generate "
                        "folder (e.g. runs/default/generated: the data-free calibration of train.init)")
    p.add_argument("--calib-split", default="calib")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order (static groups); default: ptq.gptq's (on)")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ damping (fraction of mean diag H); default: ptq.gptq's (0.1)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ's clipping search; default: ptq.gptq's (off)")
    p.add_argument("--no-fp", action="store_true", help="skip the FP evaluation")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file (after every run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from data.calib import calibration_ids
    from data.sources import load_texts, spread_windows, token_stream
    from qat.io.models import load_model, load_tokenizer
    from qat.ptq import PTQConfig, run_ptq
    from qat.ptq import check as check_ptq
    from qat.ptq.gptq import GPTQConfig
    from qat.spec import parse
    from trainer.eval import perplexity

    tok = load_tokenizer(args.model)
    base = load_model(args.model, dtype="float32")
    windows = spread_windows(token_stream(load_texts("bundled:wikitext", "test"), tok),
                             args.eval_seq_len, args.eval_tokens)
    calib = calibration_ids(tok, args.n_samples, args.seq_len, args.calib, args.calib_split)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": f"{platform.processor() or platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "command": "python " + " ".join(sys.argv), "calib": args.calib, "calib_tokens": int(calib.numel()),
        "eval_tokens": sum(len(w) for w in windows),
        "gptq": {k: getattr(GPTQConfig(), k) if getattr(args, k) is None else getattr(args, k)
                 for k in ("act_order", "damp", "clip")},
        "runs": [], "skipped": [],
    }

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    if not args.no_fp:
        t0 = time.perf_counter()
        fp = perplexity(base, windows, progress=False)
        result["runs"].append({"scheme": "fp", "method": "fp", "ppl": fp, "quant_seconds": 0.0,
                               "eval_seconds": time.perf_counter() - t0})
        print(f"fp: ppl {fp:.2f}", file=sys.stderr, flush=True)
        save()
    jobs = []
    settings = [s for s in args.settings.split(",") if s]
    for i, s in enumerate(settings):
        jobs += [(s, m) for m in args.methods.split(",") if m]
        if i == 1 and args.w8a8:
            jobs += [(args.w8a8, m) for m in args.w8a8_methods.split(",") if m]
    if len(settings) < 2 and args.w8a8:
        jobs += [(args.w8a8, m) for m in args.w8a8_methods.split(",") if m]
    for scheme, method in jobs:
        model = copy.deepcopy(base)
        gptq_opts = {k: v for k, v in (("act_order", args.act_order), ("damp", args.damp), ("clip", args.clip))
                     if v is not None}
        cfg = PTQConfig(method=method, n_samples=args.n_samples, seq_len=args.seq_len, progress=False,
                        gptq=GPTQConfig(**gptq_opts))
        try:
            check_ptq(parse(scheme), cfg)
        except ValueError as e:  # a method that cannot produce the scheme (hqq at fp4): the rest still run
            result["skipped"].append({"scheme": scheme, "method": method, "reason": str(e)})
            print(f"{scheme} {method}: skipped ({e})", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        model, report = run_ptq(model, parse(scheme), cfg, calib)
        tq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = perplexity(model, windows, progress=False)
        te = time.perf_counter() - t0
        per_layer = {}
        for d in report.layers:
            kind = d["name"].rsplit(".", 1)[-1]
            per_layer.setdefault(kind, []).append(d["seconds"])
        per_layer = {k: sum(v) / len(v) for k, v in per_layer.items()}
        result["runs"].append({"scheme": scheme, "method": method, "ppl": ppl, "quant_seconds": tq,
                               "eval_seconds": te, "seconds_per_layer": per_layer, "layers": report.layers,
                               "seconds_per_block": sum(b["seconds"] for b in report.blocks)
                               / max(len(report.blocks), 1)})
        print(f"{scheme} {method}: ppl {ppl:.2f}  quant {tq:.1f}s  "
              + " ".join(f"{k} {v * 1000:.0f}ms" for k, v in per_layer.items()), file=sys.stderr, flush=True)
        save()
        del model
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    runs = result["runs"]
    schemes = list(dict.fromkeys(r["scheme"] for r in runs if r["scheme"] != "fp"))
    methods = list(dict.fromkeys(r["method"] for r in runs if r["method"] != "fp"))
    ppl = {(r["scheme"], r["method"]): r["ppl"] for r in runs}
    fp = ppl.get(("fp", "fp"))
    lines = [f"FP perplexity: {fp:.2f}" if fp else "FP not measured", "",
             "| scheme | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in schemes:
        cells = [f"{ppl[(s, m)]:.2f}" if (s, m) in ppl else "-" for m in methods]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| scheme | method | quant s | s/block | ms per layer (mean by kind) |", "|---|---|---|---|---|"]
    for r in runs:
        if r["method"] == "fp":
            continue
        pl = ", ".join(f"{k} {v * 1000:.0f}" for k, v in r.get("seconds_per_layer", {}).items())
        lines.append(f"| {r['scheme']} | {r['method']} | {r['quant_seconds']:.1f} | "
                     f"{r.get('seconds_per_block', 0):.2f} | {pl} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
