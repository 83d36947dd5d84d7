"""`distqat pipeline`: LLM-QAT end to end on one recipe.

1. generate: the full-precision teacher writes the training text itself (data-free, resumable);
2. train: QAT distils the teacher into the fake-quantized student on that text;
3. eval (rank 0): the full-precision model, its RTN start (the same spec, fake-quantized before any
   training) and the trained student, scored on the same windows of `data.path` (the bundled
   Wikipedia test split by default), as one eval.json and one bar plot.

In this command `data.path` is the text it evaluates on; the training text is always the generated one.
Each step resumes: finished shards are kept and `train.resume=auto` continues from the newest checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from data.sources import load_texts
from qat.io.env import rank_world
from qat.io.models import check_spec_fits

from .commands import prepare_output, run_generate
from .config import RunConfig
from .eval import base_model, saved_model, score_models
from .tasks import plan_tasks
from .train import run_train


def wait_for(path: Path, timeout_s: float, what: str) -> None:
    """Poll until `path` exists (another rank writes it); a clear error after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path} did not appear within {timeout_s:.0f} s: {what}")
        time.sleep(2.0)


def run_pipeline(cfg: RunConfig, manifest_timeout_s: float = 24 * 3600) -> dict:
    """generate -> train -> eval of fp / RTN start / trained; returns the eval record (empty off rank 0)."""
    if cfg.train.mode != "qat":
        raise ValueError(f"pipeline runs LLM-QAT; train.mode={cfg.train.mode} trains with `distqat train`")
    # Everything the last step needs is checked before the first one spends minutes: the output folder,
    # the spec against the model's layer widths, the text it scores on, the eval.tasks and their data.
    prepare_output(Path(cfg.output_dir))
    check_spec_fits(cfg.model.name_or_path, cfg.quant, cfg.model.trust_remote_code)
    load_texts(cfg.data.path, cfg.eval.split, cfg.data.text_field)
    plan_tasks(cfg.eval)
    gen_dir = run_generate(cfg)
    # Every rank's shards must exist before anyone trains on them; the last rank to finish writes it.
    wait_for(gen_dir / "manifest.json", manifest_timeout_s,
             "a generate rank did not finish; rerun the same command to resume it")
    train_cfg = replace(cfg, data=replace(cfg.data, path=str(gen_dir)))
    model_dir = run_train(train_cfg)
    rank, _ = rank_world()
    if rank != 0:
        return {}
    fp, rtn = base_model(cfg, False), base_model(cfg, True)
    trained = (f"{rtn[0]} (qat)", saved_model(cfg, str(model_dir))[1])
    print(f"pipeline: scoring {fp[0]}, {rtn[0]} (RTN start) and {trained[0]} on {cfg.data.path}", file=sys.stderr)
    return score_models(cfg, [fp, rtn, trained])
