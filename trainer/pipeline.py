"""`distqat pipeline`: LLM-QAT end to end on one recipe.

1. generate: the full-precision teacher writes the training text itself (data-free, resumable);
2. train: the student starts from train.init (RTN, or a PTQ method run first on the generated text), is
   reconstructed block by block when train.blockwise.steps > 0, and QAT distils the teacher into it on
   that text (trainer/init.py, trainer/train.py);
3. eval (rank 0): the full-precision model, its RTN start (the same spec, fake-quantized before any
   training), the PTQ baseline at the same spec (the PTQ start, or smoothquant+gptq when the student starts
   from RTN; gptq for a weight-only spec) and the trained student, scored on the same windows of `data.path`
   (the bundled Wikipedia test split by default), as one eval.json (with the share of the log-perplexity gap
   each closes), one bar plot and one markdown table.

In this command `data.path` is the text it evaluates on; the training text is always the generated one.
Each step resumes: finished shards are kept and `train.resume=auto` continues from the newest checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from data.sources import load_texts
from qat.io.env import rank_world
from qat.io.folders import inspect
from qat.io.models import check_spec_fits
from qat.keys import MANIFEST_FILE
from qat.ptq import check as check_ptq

from .commands import prepare_output, run_generate, wait_for
from .config import RunConfig
from .eval import base_model, saved_model, score_models
from .init import check_init, prepare_start
from .tasks import plan_tasks
from .train import run_train

# The PTQ row when the student starts from RTN: the first of these the spec allows (SmoothQuant needs quantized
# activations, GPTQ an integer grid).
BASELINES = ("smoothquant+gptq", "gptq", "smoothquant+rtn")


def baseline_method(cfg: RunConfig) -> Optional[str]:
    """The PTQ method the pipeline scores beside an RTN-started student, or None when the spec takes none."""
    for method in BASELINES:
        try:
            check_ptq(cfg.quant, replace(cfg.ptq, method=method))
        except ValueError:
            continue
        return method
    return None


def run_pipeline(cfg: RunConfig, manifest_timeout_s: float = 24 * 3600) -> dict:
    """generate -> [PTQ start, block-wise] -> train -> eval of fp / RTN start / PTQ / trained; returns the eval
    record (empty off rank 0)."""
    if cfg.train.mode != "qat":
        raise ValueError(f"pipeline runs LLM-QAT; train.mode={cfg.train.mode} trains with `distqat train`")
    # Everything the last step needs is checked before the first one spends minutes: the output folder,
    # the spec against the model's layer widths, the start, the text it scores on, the eval.tasks and their data.
    prepare_output(Path(cfg.output_dir))
    check_spec_fits(cfg.model.name_or_path, cfg.quant, cfg.model.trust_remote_code)
    check_init(cfg)
    load_texts(cfg.data.path, cfg.eval.split, cfg.data.text_field)
    plan_tasks(cfg.eval)
    gen_dir = run_generate(cfg)
    # Every rank's shards must exist before anyone trains on them; the last rank to finish writes it.
    wait_for(gen_dir / MANIFEST_FILE, manifest_timeout_s,
             "a generate rank did not finish; rerun the same command to resume it")
    train_cfg = replace(cfg, data=replace(cfg.data, path=str(gen_dir)))
    model_dir = run_train(train_cfg)
    rank, _ = rank_world()
    if rank != 0:
        return {}
    fp, rtn = base_model(cfg, False), base_model(cfg, True)
    trained = (f"{rtn[0]} (qat)", saved_model(cfg, str(model_dir))[1])
    entries, roles = [fp, rtn], {"fp": fp[0], "rtn": rtn[0]}
    baseline = ptq_baseline(train_cfg)
    if baseline is not None:
        method, folder = baseline
        # Named from the folder's own record: every start, built here or given, says there how it was made.
        ptq = (f"{rtn[0]} ({ptq_label(method, inspect(folder, 'the PTQ row').record)})",
               saved_model(cfg, str(folder))[1])
        entries.append(ptq)
        roles["ptq"] = ptq[0]
    else:
        print(f"pipeline: no PTQ method of {list(BASELINES)} takes {rtn[0]}; no PTQ row", file=sys.stderr)
    entries.append(trained)
    roles["qat"] = trained[0]
    print(f"pipeline: scoring {', '.join(f'{label} ({role})' for role, label in roles.items())} on {cfg.data.path}",
          file=sys.stderr)
    return score_models(cfg, entries, roles=roles)


def ptq_label(method: str, settings: dict[str, Any]) -> str:
    """The PTQ row's name: the method, and ", clip" where its GPTQ searched the clipping (`ptq.gptq.clip`), which
    moves a start by more than the choice of method does."""
    clipped = "gptq" in method.split("+") and bool(settings.get("gptq", {}).get("clip"))
    return f"{method}, clip" if clipped else method


def ptq_baseline(train_cfg: RunConfig) -> Optional[tuple[str, Path]]:
    """(method, folder) of the PTQ row: the student's PTQ start when it has one, else the first of BASELINES the
    spec allows at the same spec, calibrated as a PTQ start would be (on the generated text, data-free)."""
    start = train_cfg.train.start
    if start.method is not None:
        return start.method, Path(train_cfg.output_dir) / "init" / "model"
    if start.kind == "folder":
        folder = inspect(start.path, "train.init")
        return str(folder.record.get("method", folder.kind.value)), Path(start.path)
    method = baseline_method(train_cfg)
    if method is None:
        return None
    # The same stage a train.init=<method> run builds (and reuses), scored but not trained from.
    baseline = replace(train_cfg, output_dir=str(Path(train_cfg.output_dir) / "baseline"),
                       train=replace(train_cfg.train, init=method,
                                     blockwise=replace(train_cfg.train.blockwise, steps=0)))
    return method, prepare_start(baseline)
