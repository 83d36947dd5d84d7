"""lm-evaluation-harness tasks (`eval.tasks`) on the models an eval scores: the names and their data are checked
before any model loads, then each loaded model object is wrapped as lm_eval's HFLM and scored, giving
{task: {metric: value}}.

lm_eval is an optional extra (`pip install 'distqat[eval]'`): it is imported here, and only when eval.tasks
names a task, so an eval without tasks never needs it.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch

from .config import ConfigError, EvalConfig

INSTALL = "pip install 'distqat[eval]'"


@dataclass(frozen=True)
class TaskPlan:
    """eval.tasks checked: every name is one lm_eval knows, every task's data loads. `manager` is the
    lm_eval TaskManager that resolves them (eval.task_dir's YAMLs, and lm_eval's own when a name needs them)."""

    names: tuple[str, ...]
    manager: Any
    limit: Optional[int]
    num_fewshot: Optional[int]
    batch_size: int


def _lm_eval(names: list[str]) -> Any:
    try:
        import lm_eval  # lazy: an optional extra, imported only when eval.tasks names tasks
        import lm_eval.tasks  # lazy: as above
    except ImportError:
        raise ConfigError(f"eval.tasks={names} needs lm-evaluation-harness, which is not installed; "
                          f"{INSTALL} (or leave eval.tasks empty)") from None
    return lm_eval


_MANAGERS: dict[tuple, Any] = {}


def _manager(lm_eval: Any, task_dir: Optional[Path], defaults: bool) -> Any:
    """lm_eval's TaskManager over task_dir (and its built-in tasks when `defaults`), built once per process for
    the same YAML files: indexing the built-in tasks takes seconds."""
    yamls = sorted(task_dir.rglob("*.yaml")) if task_dir else []
    key = (str(task_dir), defaults, tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in yamls))
    if key not in _MANAGERS:
        include = str(task_dir) if task_dir else None
        _MANAGERS[key] = lm_eval.tasks.TaskManager(include_path=include, include_defaults=defaults)
    return _MANAGERS[key]


def _entry_field(manager: Any, name: str, key: str) -> Optional[str]:
    """A field of a task's YAML as lm_eval indexed it (newer versions: an object with .cfg; older: a dict); None
    where this version does not say."""
    entry = manager.task_index.get(name)
    if isinstance(entry, dict):
        value, cfg = entry.get(key), entry.get("cfg")
    else:
        value, cfg = getattr(entry, key, None), getattr(entry, "cfg", None)
    if value is None and isinstance(cfg, dict):
        value = cfg.get(key)
    return None if value is None else str(value)


def _offline() -> bool:
    flags = (os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
             for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flags) or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _data_error(name: str, manager: Any, e: Exception) -> str:
    """One line saying which task's data did not load and what to do about it."""
    data = _entry_field(manager, name, "dataset_path")
    what = f"its dataset {data!r}" if data else "its data"
    reason = " ".join(str(e).split()) or type(e).__name__
    # Offline, datasets says a hub dataset it has not cached is unreachable; a missing local file is another story.
    if _offline() and (isinstance(e, ConnectionError) or "offline" in reason.lower()):
        return (f"eval.tasks: task {name!r} needs {what}, which is not in the local datasets cache and the run is "
                f"offline ({reason}); download it once with network (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                "or give a local task YAML in eval.task_dir")
    yaml = _entry_field(manager, name, "yaml_path")
    return (f"eval.tasks: task {name!r} cannot load {what}: {reason}; fix dataset_path / dataset_kwargs in its task "
            f"YAML{f' ({yaml})' if yaml else ''}")


def plan_tasks(cfg: EvalConfig) -> Optional[TaskPlan]:
    """Check eval.tasks before any model loads: lm_eval installed, eval.task_dir a folder, every name known,
    every task's data loading (local files, the datasets cache, or the hub when online). None without tasks."""
    names = list(dict.fromkeys(cfg.tasks))  # once each, in the order given
    if not names:
        return None
    lm_eval = _lm_eval(names)
    task_dir = None
    if cfg.task_dir is not None:
        task_dir = Path(cfg.task_dir).expanduser()
        if not task_dir.is_dir():
            raise ConfigError(f"eval.task_dir={cfg.task_dir}: no such folder; give a folder of lm-eval task YAMLs")
        if not any(task_dir.rglob("*.yaml")):
            raise ConfigError(f"eval.task_dir={cfg.task_dir} holds no *.yaml; give a folder of lm-eval task YAMLs")
    # Names the local YAMLs all define need no index of lm_eval's thousands of built-in tasks (seconds to build).
    manager = _manager(lm_eval, task_dir, False) if task_dir else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = _manager(lm_eval, task_dir, True)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            where = f", nor does a YAML in eval.task_dir={cfg.task_dir}" if task_dir else ""
            version = getattr(lm_eval, "__version__", "")
            raise ConfigError(f"eval.tasks: unknown task {name!r} (lm_eval {version} does not define it{where}); "
                              f"{hint}give a task lm_eval knows or a task YAML in eval.task_dir")
    # Newer lm_eval builds tasks with TaskManager.load (and deprecates get_task_dict); older has only the latter.
    build = manager.load if hasattr(manager, "load") else lambda n: lm_eval.tasks.get_task_dict(n, manager)
    for name in names:  # builds the task, which loads its data: a missing dataset fails here, not after a model
        try:
            build([name])
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError... by cause
            raise ValueError(_data_error(name, manager, e)) from None
    return TaskPlan(tuple(names), manager, cfg.task_limit, cfg.num_fewshot, cfg.batch_size)


def run_tasks(plan: TaskPlan, model: torch.nn.Module, tokenizer: Any) -> dict:
    """Score one loaded model (a transformers model: fp, fake-quantized or IntLinear layers) on the plan's tasks,
    on the device it is on; simple_evaluate's output (task_metrics, task_setup and task_groups read it)."""
    lm_eval = _lm_eval(list(plan.names))
    from lm_eval.models.huggingface import HFLM  # lazy: the optional extra, as above

    # HFLM warns that it was given a model object rather than a name: that is what this bridge is for.
    hf_log = logging.getLogger(HFLM.__module__)
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.batch_size, device=str(model.device))
    finally:
        hf_log.setLevel(level)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(plan.names), task_manager=plan.manager,
                                  num_fewshot=plan.num_fewshot, limit=plan.limit, log_samples=False)
    return out


def task_metrics(out: dict) -> dict[str, dict[str, float]]:
    """{task or group: {metric: value}} from simple_evaluate's output: the numbers only, "acc,none" read as
    "acc" (another filter stays: "exact_match,strict-match"), stderr as "acc_stderr"; NaN and "N/A" left out."""
    metrics: dict[str, dict[str, float]] = {}
    for task, row in out["results"].items():
        values = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # alias, name, sample_len: not metrics
            values[metric if filt == "none" else key] = float(value)
        if values:  # a group that aggregates nothing has none; its tasks have theirs
            metrics[task] = values
    return metrics


def task_setup(out: dict) -> dict[str, dict]:
    """{task: {"samples": n scored, "fewshot": k, "version": v}} from simple_evaluate's output, so a number
    says what it was measured on."""
    setup = {}
    for task, n in out.get("n-samples", {}).items():
        setup[task] = {"samples": n.get("effective", n.get("original")) if isinstance(n, dict) else n,
                       "fewshot": out.get("n-shot", {}).get(task), "version": out.get("versions", {}).get(task)}
    return setup


def task_groups(out: dict) -> dict[str, list[str]]:
    """{group: [its tasks and subgroups]} from simple_evaluate's output (groups only)."""
    return {g: list(members) for g, members in out.get("group_subtasks", {}).items() if members}


def headline(record: dict) -> list[str]:
    """The tasks of an eval.json worth a table column: each not inside a group that has a score of its own."""
    scored = {t for by_task in record.get("tasks", {}).values() for t in by_task}
    inside = {t for g, members in record.get("task_groups", {}).items() if g in scored for t in members}
    seen: list[str] = []
    for by_task in record.get("tasks", {}).values():
        seen += [t for t in by_task if t not in inside and t not in seen]
    return seen
