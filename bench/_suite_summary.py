"""bench/suite.py's summary.md: one table row per part with the figures it exists for, then a table per part that
measured a grid (train_step, kernels, decode, moe), then the log tail of each part that failed or timed out."""

from __future__ import annotations


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def key_numbers(rec: dict) -> str:
    """One cell of the summary table: the figures a part exists for."""
    name = rec["part"]
    if rec["status"] == "skipped":
        return rec["reason"] or ""
    if name == "cuda_tests" and "passed" in rec:
        text = f"{rec['passed']} passed, {rec['failed']} failed, {rec['errors']} errors, {rec['skipped']} skipped"
        if rec["failing"]:
            text += f"; failing: {', '.join(rec['failing'][:5])}"
        return text
    if name == "train_step" and rec.get("variants"):
        kd = rec["variants"].get("kd")
        ratios = "; ".join(f"{k} {fmt(v, '.3f')}x" for k, v in rec["ratios"].items())
        return (f"kd {fmt(kd['ms'], '.1f')} ms/step; " if kd else "") + ratios
    if name == "kernels" and rec.get("rows"):
        return kernel_numbers(rec["rows"])
    if name == "decode" and rec.get("rows"):
        return "; ".join(f"{r['shape']} b{r['batch']} {r['lm_head']} {r['int_tok_s']:.0f} tok/s ({r['speedup']:.2f}x)"
                         for r in rec["rows"])
    if name == "model":
        return f"{rec.get('what', '')}: {rec.get('path', '')}"
    if name.startswith("zero") and rec.get("tokens_per_s_warm_median") is not None:
        return f"{rec['tokens_per_s_warm_median']:.0f} tokens/s (median after the first step), {rec['steps']} steps"
    if name == "qlora" and rec.get("rows"):
        return qlora_numbers(rec["rows"])
    if name == "moe" and (rec.get("qat_step") or rec.get("inference")):
        return moe_numbers(rec)
    return rec.get("reason") or ""


def kernel_numbers(rows: list[dict]) -> str:
    """The figures asked for, x bf16 per K x N shape, and how often the chosen implementation lost to bf16."""
    top = max(r["M"] for r in rows)
    picks = [("w4a16", "gemv", 1), ("w4a16", "tinygemm", 1), ("w8a8", "triton", top), ("w8a8", "int_mm", top),
             ("w4a8", "triton", top)]
    cells = []
    for path, impl, m in picks:
        figures = [fmt(r["speedup"][impl]) for r in rows
                   if (r["path"], r["M"]) == (path, m) and impl in r["speedup"]]
        if figures:
            cells.append(f"{path} {impl} M={m} " + "/".join(figures) + "x")
    slower = sum(1 for r in rows if (r["chosen_speedup"] or 0) < 1)
    return "; ".join(cells) + f"; chosen < bf16 in {slower} of {len(rows)}"


def qlora_numbers(rows: list[dict]) -> str:
    """Each variant's peak memory, and its peak and step time as ratios to LoRA at the same shape."""
    lora = {r["shape"]: r for r in rows if r["variant"] == "lora"}
    cells = []
    for r in rows:
        cell = f"{r['shape']} {r['variant']} peak {r['peak_gb']:.2f} GB"
        if r["shape"] in lora:
            base = lora[r["shape"]]
            cell += f" ({r['peak_gb'] / base['peak_gb']:.2f}x, step {r['step_s'] / base['step_s']:.2f}x)"
        cells.append(cell)
    return "; ".join(cells)


def moe_numbers(rec: dict) -> str:
    """Each quantized variant's time as a ratio to the model's own experts, QAT step then inference."""
    qat = [f"{r['variant']} {r['scheme']} {r['ratio']:.2f}x" for r in rec.get("qat_step") or []
           if r["variant"] == "fused" or r["variant"] == "reference"]
    inf = [f"{r['scheme']} M={r['tokens']} {r['ratio']:.2f}x" for r in rec.get("inference") or []
           if r["variant"] == "int"]
    return f"QAT step x own: {', '.join(qat) or '-'}; int inference x own: {', '.join(inf) or '-'}"


def head(*cols: str) -> list[str]:
    return ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def summary(meta: dict, records: dict) -> str:
    v = meta["versions"]
    lines = [f"# distqat GPU suite: {meta['device']}, {meta['date']}", "",
             ", ".join(f"{k} {x}" for k, x in v.items() if x) + f"; {meta.get('wall_s', 0):.0f} s in all."]
    if meta["smoke"]:
        lines.append("CPU smoke run (tiny shapes, a tiny random model): it checks code paths; no figures.")
    lines += head("part", "status", "wall s", "limit s", "key numbers")
    for r in records.values():
        lines.append(f"| {r['part']} | {r['status']} | {r['wall_s']:.0f} | {r['budget_s']:.0f} | "
                     f"{key_numbers(r).replace('|', '/')} |")
    ts = records.get("train_step", {}).get("variants")
    if ts:
        lines += ["", "## train_step", *head("variant", "ms/step", "tokens/s", "peak GB", "ratio", "vs")]
        for k, r in ts.items():
            lines.append(f"| {k} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {fmt(r['peak_gb'])} | "
                         f"{fmt(r['ratio'], '.3f')} | {r['ratio_vs'] or '-'} |")
        if records["train_step"].get("variants_left_out"):
            lines.append(f"\nLeft out: {records['train_step']['variants_left_out']}.")
    kr = records.get("kernels", {}).get("rows")
    if kr:
        lines += ["", "## kernels (speedup = bf16 time / implementation time)",
                  *head("K x N", "path", "M", "bf16 us", "chosen", "x bf16", "best", "all")]
        for r in kr:
            every = ", ".join(f"{i} {x:.2f}" for i, x in r["speedup"].items())
            lines.append(f"| {r['shape']} | {r['path']} | {r['M']} | {r['bf16_us']:.1f} | {r['chosen']} | "
                         f"{fmt(r['chosen_speedup'])} | {r['best']} | {every} |")
    dr = records.get("decode", {}).get("rows")
    if dr:
        lines += ["", "## decode",
                  *head("shape", "scheme", "lm_head", "batch", "bf16 tok/s", "int tok/s", "int / bf16", "graphs")]
        for r in dr:
            lines.append(f"| {r['shape']} | {r['scheme']} | {r['lm_head']} | {r['batch']} | {r['bf16_tok_s']:.0f} | "
                         f"{r['int_tok_s']:.0f} | {r['speedup']:.2f} | {r['graphs']} |")
    moe = records.get("moe", {})
    if moe.get("qat_step") or moe.get("inference"):
        lines += ["", f"## moe ({moe['shape']}; own experts: {moe['own_impl']}; ratio = time / own)",
                  *head("part", "tokens", "variant", "scheme", "ms", "x own", "note")]
        for part in ("qat_step", "inference"):
            for r in moe.get(part) or []:
                note = r.get("note") or (f"impl {r['impl']}, rel diff {r['max_rel_diff']:.1e}" if "impl" in r else "")
                lines.append(f"| {part} | {r['tokens']} | {r['variant']} | {r['scheme']} | {r['ms']:.3f} | "
                             f"{r['ratio']:.3f} | {note} |")
    for name, r in records.items():
        if r["status"] in ("failed", "timeout"):
            tail = r.get("log_tail") or ""
            lines += ["", f"## {name}: {r['status']} ({r['reason']})", "", "```", *tail.splitlines()[-15:], "```"]
    return "\n".join(lines) + "\n"
