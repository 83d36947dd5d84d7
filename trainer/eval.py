"""Perplexity of the full-precision and the fake-quantized model, and lm-eval tasks (eval.tasks); results as
JSON (with the versions and device they were measured with), tables and a plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from data.sources import load_texts, spread_windows, token_stream
from qat.apply import coverage_of, quantize_model
from qat.io.atomic import atomic_file, disk_full, temp_beside, write_text
from qat.io.env import device_name, versions
from qat.io.folders import Folder, Kind, spec_label
from qat.io.models import check_spec_fits, load_model, load_tokenizer
from qat.io.progress import ProgressLines, bars_wanted
from qat.load import inspect, load
from qat.qlora.use import adapter_spec, base_label, check_adapter, with_adapter

from .config import RunConfig, to_yaml
from .tasks import headline, plan_tasks, run_tasks, task_groups, task_metrics, task_setup


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
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not (progress and bars_wanted()), file=sys.stderr,
               dynamic_ncols=True)
    # In a log (stderr not a terminal): a whole line every 30 s instead of the bar's carriage returns.
    lines = ProgressLines(desc, total, 30.0, unit="tokens") if progress and not bars_wanted() else None
    done = 0
    for group in batches:
        batch = torch.stack(group).to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        bar.update(batch.numel())
        done += batch.numel()
        if lines is not None and done < total:  # the caller prints the result line at the end
            lines.update(done, batch.numel())
    bar.close()
    return math.exp(nll / count)


def plot_bars(results: dict[str, float], path: Path, title: str, closed: Optional[dict[str, float]] = None,
              stage: Optional[Callable[[Path], Path]] = None) -> Optional[Path]:
    """A bar chart of perplexities (lower is better), each bar labelled with its value (and, given `closed`, the
    share of the gap to FP it closes), written atomically (or to `stage(path)`: see staged_files); None without
    matplotlib."""
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
    closed = closed or {}
    ax.bar_label(bars, labels=[f"{v:.2f}" + (f"\n{100 * closed[n]:.0f}% closed" if n in closed else "")
                               for n, v in zip(names, values)])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if stage is not None:
        fig.savefig(stage(path), dpi=120)
    else:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


@contextmanager
def staged_files() -> Iterator[Callable[[Path], Path]]:
    """`stage(path)` gives a temp file beside `path` to write. When the block ends without error the temps are
    renamed onto their paths in the order they were staged, otherwise removed: an error while writing any of them
    (a full disk: a one-line DiskFull naming the file) leaves every file already there as it was."""
    staged: list[tuple[Path, Path]] = []

    def stage(path: Path) -> Path:
        tmp = temp_beside(path)
        staged.append((path, tmp))
        return tmp

    try:
        yield stage
        for path, tmp in staged:
            os.replace(tmp, path)
    except OSError as e:
        full = disk_full(e, *staged[-1]) if staged else None  # the file being written: the last one staged
        if full is None:
            raise
        raise full from e
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)


def run_eval(cfg: RunConfig) -> dict:
    """`distqat eval`: score each of cfg.eval.compare on the same tokens, save JSON + plot + config; a saved
    quantized folder (train, ptq, convert) is scored as it is."""
    unknown = set(cfg.eval.compare) - {"fp", "quant"}
    if unknown or not cfg.eval.compare:
        raise ValueError(f"eval.compare={cfg.eval.compare}: allowed entries are 'fp' and 'quant'")
    folder = inspect(cfg.model.name_or_path)
    if cfg.lora.adapter:
        return score_models(cfg, adapter_models(cfg, folder))
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


def adapter_models(cfg: RunConfig, folder: Folder) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """(label, loader) of the packed base of `folder`, then of the same base with lora.adapter on it, un-merged
    (qat.qlora.use: what the adapter gains, on the same tokens)."""
    m, adapter = cfg.model, cfg.lora.adapter
    check_adapter(adapter)  # before anything loads
    spec = adapter_spec(folder, adapter, cfg.quant)
    label = base_label(folder, spec)

    def loader(attach: bool) -> Callable[[], torch.nn.Module]:
        return lambda: with_adapter(folder, adapter, spec, m.dtype, m.attn_implementation, m.trust_remote_code,
                                    attach=attach)

    return [(f"{label} packed", loader(False)), (f"{label} + adapter {Path(adapter).name}", loader(True))]


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


def gap_closed(ppl: dict[str, float], fp: str, rtn: str) -> dict[str, float]:
    """For each model but fp: the share of the RTN start's log-perplexity gap to FP it closes,
    (ln RTN - ln model) / (ln RTN - ln FP); 1 is FP's perplexity, 0 the RTN start's, < 0 worse than RTN."""
    gap = math.log(ppl[rtn]) - math.log(ppl[fp])
    if gap <= 0:  # RTN is no worse than FP: there is no gap to close
        return {}
    return {k: (math.log(ppl[rtn]) - math.log(v)) / gap for k, v in ppl.items() if k != fp}


def gap_table(record: dict) -> str:
    """Markdown: one row per model with its role (fp, rtn, ptq, qat), perplexity and the gap closed."""
    role_of = {label: role for role, label in record.get("roles", {}).items()}
    closed = record.get("gap_closed", {})
    lines = ["| model | role | perplexity | log-perplexity gap to FP closed |", "|---|---|---|---|"]
    for label, v in record["perplexity"].items():
        share = f"{100 * closed[label]:.0f}%" if label in closed else ""
        lines.append(f"| {label} | {role_of.get(label, '')} | {v:.2f} | {share} |")
    return "\n".join(lines)


def score_models(cfg: RunConfig, entries: list[tuple[str, Callable[[], torch.nn.Module]]],
                 roles: Optional[dict[str, str]] = None) -> dict:
    """Perplexity of each (label, loader) on the same windows of cfg.data (one model in memory at a time), and
    its eval.tasks scores; eval.json, eval.png and config.yaml under cfg.output_dir (see write_results). With
    `roles` ({"fp": label, "rtn": label, ...}) the record also holds each model's share of the log-perplexity gap
    closed, and eval.md the table of them."""
    out_dir = Path(cfg.output_dir)
    plan = plan_tasks(cfg.eval)  # before any model loads: lm_eval there, every task known, its data loading
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    windows = eval_windows(cfg, tok)
    n_tokens = sum(len(w) for w in windows)
    results: dict[str, float] = {}
    tasks: dict[str, dict[str, dict[str, float]]] = {}
    setup: dict[str, dict] = {}
    groups: dict[str, list[str]] = {}
    covered: dict[str, dict] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for label, loader in entries:
        model = loader().to(device)
        t0 = time.perf_counter()
        results[label] = perplexity(model, windows, cfg.eval.batch_size, desc=label)
        secs = time.perf_counter() - t0
        print(f"{label}: perplexity {results[label]:.3f} ({n_tokens / secs:.0f} tokens/s)", file=sys.stderr)
        covered[label] = coverage_of(model)
        if covered[label]["quantized_elements"]:
            print(f"{label}: {covered[label]['share']:.2%} of the decoder's weight elements quantized", file=sys.stderr)
        if plan is not None:
            out = run_tasks(plan, model, tok)
            tasks[label], setup, groups = task_metrics(out), task_setup(out), task_groups(out)
            scores = [f"{t}/{m} {v:.4f}" for t in plan.names for m, v in tasks[label].get(t, {}).items()
                      if "_stderr" not in m]
            print(f"{label}: {', '.join(scores) or 'no task scores'}", file=sys.stderr)
        del model
    record = {
        "model": cfg.model.name_or_path, "split": cfg.eval.split, "tokens": n_tokens,
        "seq_len": cfg.eval.seq_len, "perplexity": results, "coverage": covered,
    }
    if plan is not None:
        record.update(tasks=tasks, task_setup=setup, **({"task_groups": groups} if groups else {}))
    if roles and {"fp", "rtn"} <= roles.keys():
        record.update(roles=roles, gap_closed=gap_closed(results, roles["fp"], roles["rtn"]))
    record.update(versions=versions(), device=device_name())
    write_results(cfg, out_dir, record)
    if "gap_closed" in record:
        print(gap_table(record))
    print(format_table([(cfg.name, record)]))
    print(f"results: {out_dir / 'eval.json'}", file=sys.stderr)
    return record


def write_results(cfg: RunConfig, out_dir: Path, record: dict) -> None:
    """eval.png, eval.md, config.yaml and eval.json (what `distqat report` reads), all written whole to temp files
    first, then renamed into place, eval.json last: a failure while writing them (a full disk) leaves the earlier
    run's files as they were. Once all are whole, the earlier eval.json goes first, so that no eval.json stands
    beside another run's plot or table; a plot or table this run does not write goes too."""
    plot, table, result = out_dir / "eval.png", out_dir / "eval.md", out_dir / "eval.json"
    title = f"{cfg.model.name_or_path}, {record['tokens']} tokens of {cfg.eval.split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with staged_files() as stage:
        drawn = cfg.eval.plot and plot_bars(record["perplexity"], plot, title, record.get("gap_closed"), stage)
        if "gap_closed" in record:
            stage(table).write_text(gap_table(record) + "\n")
        stage(out_dir / "config.yaml").write_text(to_yaml(cfg))
        stage(result).write_text(json.dumps(record, indent=2) + "\n")
        result.unlink(missing_ok=True)
        for path, written in ((plot, drawn), (table, "gap_closed" in record)):
            if not written:
                path.unlink(missing_ok=True)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: the perplexity table (a row per run: run, model, tokens, then a column per scheme); where runs
    scored lm-eval tasks, a second table (a row per run and scheme, a column per task/metric); then the
    package versions and device the runs were measured with."""
    schemes: list[str] = []
    for _, rec in rows:
        schemes += [s for s in rec["perplexity"] if s not in schemes]
    head = "| run | model | tokens | " + " | ".join(schemes) + " |"
    lines = [head, "|" + "---|" * (3 + len(schemes))]
    for name, rec in rows:
        cells = [f"{rec['perplexity'][s]:.2f}" if s in rec["perplexity"] else "" for s in schemes]
        lines.append(f"| {name} | {rec['model']} | {rec['tokens']} | " + " | ".join(cells) + " |")
    parts = ["\n".join(lines), task_table(rows), provenance(rows)]
    return "\n\n".join(p for p in parts if p)


def task_table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of lm-eval scores: run, scheme, then a column per task/metric (stderr left to eval.json);
    empty when no run scored tasks."""
    columns: list[tuple[str, str]] = []
    for _, rec in rows:
        for task in headline(rec):
            for by_task in rec["tasks"].values():
                columns += [(task, m) for m in by_task.get(task, {}) if "_stderr" not in m and (task, m) not in columns]
    if not columns:
        return ""
    lines = ["| run | scheme | " + " | ".join(f"{t}/{m}" for t, m in columns) + " |", "|" + "---|" * (2 + len(columns))]
    for name, rec in rows:
        for label, by_task in rec.get("tasks", {}).items():
            cells = [f"{by_task[t][m]:.4f}" if m in by_task.get(t, {}) else "" for t, m in columns]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(rows: list[tuple[str, dict]]) -> str:
    """A line per distinct set of versions and device the runs recorded, naming the runs when they differ; empty
    for eval.json files older than the record."""
    seen: dict[str, list[str]] = {}
    for name, rec in rows:
        if "versions" in rec or "device" in rec:
            text = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
            seen.setdefault(f"{text}; device: {rec.get('device', 'not recorded')}", []).append(name)
    if len(seen) == 1 and len(next(iter(seen.values()))) == len(rows):
        return f"versions: {next(iter(seen))}"
    return "\n".join(f"- versions of {', '.join(names)}: {text}" for text, names in seen.items())


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
    # Written by newer evals only; an older eval.json without them still reads.
    tasks, vers = record.get("tasks", {}), record.get("versions", {})
    ok = isinstance(tasks, dict) and all(
        isinstance(by_task, dict) and all(isinstance(m, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values()) for m in by_task.values())
        for by_task in tasks.values())
    ok = ok and isinstance(record.get("task_groups", {}), dict) and isinstance(vers, dict) and \
        isinstance(record.get("device", ""), str)
    if not ok:
        raise ValueError(f"{path} has malformed tasks, task_groups, versions or device entries (tasks must be "
                         "{scheme: {task: {metric: number}}}); run distqat eval again or delete them")
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
