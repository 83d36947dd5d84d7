"""Perplexity of the full-precision and the fake-quantized model; results as JSON, a table and a plot."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from data.sources import load_texts, spread_windows, token_stream
from qat.apply import quantize_model
from qat.io.atomic import atomic_file, write_json, write_text
from qat.io.folders import Folder, Kind, spec_label
from qat.io.models import check_spec_fits, load_model, load_tokenizer
from qat.load import inspect, load

from .config import RunConfig, save_config


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, windows: list[list[int]], batch_size: int = 1, desc: str = "ppl", progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over independent windows of token ids (each scored from its own start)."""
    device = next(model.parameters()).device
    tensors = [torch.tensor(w, dtype=torch.long) for w in windows if len(w) > 1]
    # Windows of one length batch together; a different (short) one goes alone rather than padded.
    by_len: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_len.setdefault(len(t), []).append(t)
    batches = [group[i : i + batch_size] for group in by_len.values() for i in range(0, len(group), batch_size)]
    nll, count = 0.0, 0
    total = sum(len(t) for t in tensors)
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for group in batches:
        batch = torch.stack(group).to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        bar.update(batch.numel())
    bar.close()
    return math.exp(nll / count)


def plot_bars(results: dict[str, float], path: Path, title: str) -> Optional[Path]:
    """A bar chart of perplexities (lower is better), written atomically; None without matplotlib."""
    try:
        # lazy: matplotlib costs about a second to import and sets a process-wide backend; only plots need it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(results) + 2), 3.5))
    names, values = list(results), list(results.values())
    bars = ax.bar(names, values, color=["#888888" if n == "fp" else "#3b7dd8" for n in names])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def run_eval(cfg: RunConfig) -> dict:
    """`distqat eval`: score each of cfg.eval.compare on the same tokens, save JSON + plot + config; a saved
    quantized folder (train, ptq, convert) is scored as it is."""
    unknown = set(cfg.eval.compare) - {"fp", "quant"}
    if unknown or not cfg.eval.compare:
        raise ValueError(f"eval.compare={cfg.eval.compare}: allowed entries are 'fp' and 'quant'")
    folder = inspect(cfg.model.name_or_path)
    if folder.kind is not Kind.BASE:
        return score_models(cfg, [saved_model(cfg, folder)])
    if "quant" in cfg.eval.compare:  # before anything is scored: a spec that does not fit fails in seconds
        check_spec_fits(folder.path, cfg.quant, cfg.model.trust_remote_code)
    return score_models(cfg, [base_model(cfg, what == "quant") for what in cfg.eval.compare])


def base_model(cfg: RunConfig, quantized: bool) -> tuple[str, Callable[[], torch.nn.Module]]:
    """(label, loader) of cfg.model as loaded ("fp") or fake-quantized with cfg.quant (the RTN start)."""

    def load_base() -> torch.nn.Module:
        m = cfg.model
        model = load_model(m.name_or_path, m.dtype, m.attn_implementation, m.trust_remote_code)
        if quantized:
            print(quantize_model(model, cfg.quant), file=sys.stderr)
        return model

    return (spec_label(cfg.quant) if quantized else "fp"), load_base


def saved_model(cfg: RunConfig, path: Union[str, Folder]) -> tuple[str, Callable[[], torch.nn.Module]]:
    """(label, loader) of a folder written by train, ptq or convert, loaded with cfg.model's settings. The
    label comes from its config.json, so nothing loads before score_models asks for the model."""
    folder = path if isinstance(path, Folder) else inspect(path)
    m = cfg.model

    def load_saved() -> torch.nn.Module:
        return load(folder, m.dtype, attn_implementation=m.attn_implementation,
                    trust_remote_code=m.trust_remote_code)

    return folder.label, load_saved


MIN_TOKENS = 64  # fewer scored tokens than this make a perplexity that means nothing


def eval_windows(cfg: RunConfig, tokenizer) -> list[list[int]]:
    """The windows of cfg.data an eval scores; refused when the text holds almost nothing, and loudly warned
    about when it holds less than half of eval.max_tokens."""
    ids = token_stream(load_texts(cfg.data.path, cfg.eval.split, cfg.data.text_field), tokenizer)
    windows = spread_windows(ids, cfg.eval.seq_len, cfg.eval.max_tokens)
    n = sum(len(w) for w in windows)
    where = f"data.path={cfg.data.path!r} (split {cfg.eval.split!r})"
    if n < MIN_TOKENS:
        raise ValueError(f"{where} gives {n} tokens to score, too few for a perplexity that means anything "
                         f"(at least {MIN_TOKENS}); give more text")
    if n < cfg.eval.max_tokens // 2:
        print(f"warning: {where} gives {n} tokens to score, under half of eval.max_tokens={cfg.eval.max_tokens}: "
              "compare its perplexities with care", file=sys.stderr)
    return windows


def score_models(cfg: RunConfig, entries: list[tuple[str, Callable[[], torch.nn.Module]]]) -> dict:
    """Perplexity of each (label, loader) on the same windows of cfg.data (one model in memory at a time);
    eval.json, eval.png and config.yaml under cfg.output_dir."""
    out_dir = Path(cfg.output_dir)
    save_config(cfg, out_dir)
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    windows = eval_windows(cfg, tok)
    n_tokens = sum(len(w) for w in windows)
    results: dict[str, float] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for label, loader in entries:
        model = loader().to(device)
        t0 = time.perf_counter()
        results[label] = perplexity(model, windows, cfg.eval.batch_size, desc=label)
        secs = time.perf_counter() - t0
        print(f"{label}: perplexity {results[label]:.3f} ({n_tokens / secs:.0f} tokens/s)", file=sys.stderr)
        del model
    record = {
        "model": cfg.model.name_or_path, "split": cfg.eval.split, "tokens": n_tokens,
        "seq_len": cfg.eval.seq_len, "perplexity": results,
    }
    write_json(out_dir / "eval.json", record)
    if cfg.eval.plot:
        plot_bars(results, out_dir / "eval.png", f"{cfg.model.name_or_path}, {n_tokens} tokens of {cfg.eval.split}")
    print(format_table([(cfg.name, record)]))
    print(f"results: {out_dir / 'eval.json'}", file=sys.stderr)
    return record


def format_table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table: run, model, tokens, then one column per scheme."""
    schemes: list[str] = []
    for _, rec in rows:
        schemes += [s for s in rec["perplexity"] if s not in schemes]
    head = "| run | model | tokens | " + " | ".join(schemes) + " |"
    lines = [head, "|" + "---|" * (3 + len(schemes))]
    for name, rec in rows:
        cells = [f"{rec['perplexity'][s]:.2f}" if s in rec["perplexity"] else "" for s in schemes]
        lines.append(f"| {name} | {rec['model']} | {rec['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_eval(path: Path) -> dict:
    """An eval.json as `distqat eval` writes it; ValueError naming the file otherwise."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or run distqat eval again") from None
    ok = isinstance(record, dict) and isinstance(record.get("perplexity"), dict) and \
        all(isinstance(v, (int, float)) for v in record["perplexity"].values()) and \
        {"model", "tokens"} <= record.keys()
    if not ok:
        raise ValueError(f"{path} is not an eval.json written by distqat eval (it needs model, tokens and a "
                         "perplexity per model); move it out of the runs folder or run distqat eval again")
    return record


def run_report(cfg: RunConfig) -> str:
    """`distqat report`: every runs/*/eval.json under the parent of output_dir in one table and plot."""
    root = Path(cfg.output_dir).parent
    rows = [(f.parent.name, read_eval(f)) for f in sorted(root.glob("*/eval.json"))]
    if not rows:
        raise FileNotFoundError(f"no */eval.json under {root}; run `distqat eval` first")
    table = format_table(rows)
    write_text(root / "report.md", table + "\n")
    merged = {f"{name}:{s}": v for name, rec in rows for s, v in rec["perplexity"].items()}
    plot_bars(merged, root / "report.png", f"perplexity of {len(rows)} runs")
    print(table)
    return table
