"""Where the QAT student starts (`train.init`) and the block-wise reconstruction stage before distillation.

train.init:
- `rtn`: the base model fake-quantized by the quant section (round to nearest), as LLM-QAT starts;
- a PTQ method (`gptq`, `awq`, `smoothquant+gptq`, `aqlm` ...): that method runs first, calibrated on the
  training text (the generated text in the pipeline: data-free end to end) or on `ptq.calib_data`, and writes
  <output_dir>/init/model; the student starts there. Its frozen grid (the lsq scales and zero points PTQ
  chose, the on-grid weights) is the trainable starting point, so step 0 computes exactly the PTQ model;
- a folder written by `distqat ptq` or `distqat train` (or an AQLM folder): the student starts from it;
- another tool's GPTQ, AWQ or compressed-tensors folder: its codes, scales and zero points become a frozen lsq
  grid (`qat.export.foreign`), so step 0 computes the folder's dequantized weights.
An AQLM start trains its codebooks and scales only (the codes stay frozen), as AQLM's fine-tuning does.

With train.blockwise.steps > 0, the start is then reconstructed block by block against the full-precision
model (qat.ptq.blockwise) into <output_dir>/blockwise/model before the end-to-end distillation.

Each stage's folder carries the settings that made it (start.json); a rerun reuses it when they match (a
resumed run does not redo minutes of PTQ) and redoes it otherwise. Rank 0 builds the folders, the other ranks
wait for them.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch

from data.calib import calibration_ids
from qat.apply import quantize_model
from qat.export.foreign import inexact_layer, load_foreign_fake_quant
from qat.io.atomic import atomic_dir, clean_stale, write_json
from qat.io.env import rank_world
from qat.io.folders import Folder, Kind, inspect, spec_label
from qat.io.models import load_model, load_tokenizer, resolve_dtype
from qat.keys import INIT_KEY, PTQ_KEY, START_FILE
from qat.load import load
from qat.ptq import check as check_ptq
from qat.ptq.aqlm import prepare_finetune
from qat.ptq.blockwise import reconstruct
from qat.ptq.registry import BASELINES, METHODS
from qat.ptq.rotate import rotate_model, rotation_of

from .commands import ptq_command, wait_for
from .config import RunConfig

ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size")


def check_init(cfg: RunConfig) -> None:
    """train.init and the blockwise settings are usable: a one-line error naming the key and the fix, before any
    model loads."""
    start, init = cfg.train.start, cfg.train.init
    if cfg.train.mode != "qat" and (init not in (None, "rtn") or cfg.train.blockwise.steps):
        raise ValueError(f"train.init and train.blockwise.steps set up a QAT student; train.mode={cfg.train.mode} "
                         "trains adapters on its own base: leave them at null (or rtn) and 0")
    if start.kind == "rtn":
        pass
    elif (method := start.method) is not None:
        if method in BASELINES:
            raise ValueError(f"train.init={init}: {method} keeps full-precision weights and trains nothing; "
                             f"use rtn, a PTQ rounding ({', '.join(m for m in METHODS if m not in BASELINES)}) "
                             "or a PTQ folder")
        check_ptq(cfg.quant, replace(cfg.ptq, method=method))
    else:
        folder = start_folder_of(init, "train.init")
        check_same_model(folder, cfg)
        if folder.kind in (Kind.PTQ, Kind.QAT, Kind.FOREIGN) and folder.spec is not None:
            if _spec_key(folder.spec) != _spec_key(cfg.quant):
                raise ValueError(f"train.init={init} was quantized as {spec_label(folder.spec, 'custom settings')}, "
                                 f"but quant asks for {spec_label(cfg.quant, 'custom settings')}; set quant to the "
                                 "folder's scheme or start from rtn")
    if cfg.train.blockwise.steps and init_is_aqlm(cfg):
        raise ValueError("train.blockwise.steps reconstructs fake-quantized blocks; an AQLM start has none: "
                         "set train.blockwise.steps=0")


def init_is_aqlm(cfg: RunConfig) -> bool:
    start = cfg.train.start
    if start.method == "aqlm":
        return True
    return start.kind == "folder" and inspect(start.path, "train.init").kind is Kind.AQLM


def lr_relative(cfg: RunConfig) -> bool:
    """train.lr_relative, null resolved: on for a rotated start (a rotating PTQ method, or a folder that was
    rotated), whose folded norms leave q/k/v/gate/up weights several times smaller than o/down, with one line
    saying so; off otherwise."""
    t = cfg.train
    if t.lr_relative is not None:
        return t.lr_relative
    start = t.start
    rotated = t.mode == "qat" and (start.rotates or (
        start.kind == "folder" and Path(start.path).expanduser().exists()
        and rotation_of(inspect(start.path, "train.init").config) is not None))
    if rotated and rank_world()[0] == 0:
        print(f"train: train.lr_relative=true, as a rotated start (train.init={start.method or start.path}) needs; "
              "set train.lr_relative=false to turn it off", file=sys.stderr)
    return rotated


def start_folder_of(path: str, key: str) -> Folder:
    """A folder a student can start from (PTQ, QAT or AQLM), or a one-line error naming key."""
    if not Path(path).expanduser().exists():
        raise ValueError(f"{key}={path!r} is neither rtn, a PTQ method ({', '.join(METHODS)}) nor an existing "
                         "folder; give one of those")
    folder = inspect(path, key)
    if folder.kind is Kind.FOREIGN and folder.spec is None:
        raise ValueError(f"{key}={path!r} is a {folder.record['format']} folder without one integer weight-only "
                         "scheme; a student starts from a GPTQ, AWQ or compressed-tensors folder of one int scheme")
    if folder.kind not in (Kind.PTQ, Kind.QAT, Kind.AQLM, Kind.FOREIGN):
        raise ValueError(f"{key}={path!r} is a {folder.kind.value} folder; a student starts from a folder written by "
                         "distqat ptq or distqat train (fake-quantized), a GPTQ, AWQ or compressed-tensors folder, or "
                         "an AQLM folder, not from "
                         f"{'a base model (use train.init=rtn)' if folder.kind is Kind.BASE else 'integer weights'}")
    return folder


def check_same_model(folder: Folder, cfg: RunConfig) -> None:
    """The start folder is the teacher's architecture (the distillation compares their logits)."""
    base = inspect(cfg.model.name_or_path)
    differ = [k for k in ARCH_KEYS if folder.config.get(k) != base.config.get(k)]
    if differ:
        k = differ[0]
        raise ValueError(f"train.init={folder.name} is not a quantized {cfg.model.name_or_path}: its {k} is "
                         f"{folder.config.get(k)}, the model's {base.config.get(k)}; start from a folder made from "
                         "model.name_or_path")


def _spec_key(spec) -> dict:
    d = spec.to_dict()
    if d.get("weight"):  # PTQ stores its grid as lsq parameters whatever the recipe's learnable says
        d["weight"] = {**d["weight"], "learnable": None}
    return d


# ---------------------------------------------------------------------------------------------
# Building the start folders.


def _settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """What a stage's folder depends on: reused only when all of it matches."""
    s: dict[str, Any] = {"stage": stage, "model": cfg.model.name_or_path, "quant": cfg.quant.to_dict(),
                         "init": cfg.train.init, "data": cfg.data.path, "seed": cfg.seed}
    if cfg.train.start.method:
        s["ptq"] = json.loads(json.dumps(asdict(cfg.ptq), default=str))
    if stage == "blockwise":
        # progress changes no number: toggling it must not redo the stage
        s["blockwise"] = {k: v for k, v in asdict(cfg.train.blockwise).items() if k != "progress"}
    return s


def _reusable(stage_dir: Path, settings: dict[str, Any]) -> bool:
    f = stage_dir / START_FILE
    if not (stage_dir / "model" / "config.json").exists() or not f.exists():
        return False
    try:
        return json.loads(f.read_text()) == settings
    except json.JSONDecodeError:
        return False


def prepare_start(cfg: RunConfig, timeout_s: float = 24 * 3600) -> Optional[Path]:
    """The folder the student starts from (None: RTN on the base model), built on rank 0 where it is missing or
    was made with other settings; the other ranks wait until it is there with this run's settings."""
    check_init(cfg)
    out = Path(cfg.output_dir)
    rank = rank_world()[0]
    init = cfg.train.start
    start: Optional[Path] = None
    stages: list[tuple[Path, dict[str, Any]]] = []
    if (method := init.method) is not None:
        stage = out / "init"
        stages.append((stage, _settings(cfg, "init")))
        if rank == 0 and not _reusable(*stages[-1]):
            print(f"train: the student starts from ptq.method={method}, calibrated on "
                  f"{cfg.ptq.calib_data or cfg.data.path}", file=sys.stderr)
            clear_stage(stage)
            ptq_command(replace(cfg, output_dir=str(stage), ptq=replace(cfg.ptq, method=method)))
            write_json(stage / START_FILE, stages[-1][1])
        start = stage / "model"
    elif init.kind == "folder":
        start = Path(init.path)
    if cfg.train.blockwise.steps:
        stage = out / "blockwise"
        stages.append((stage, _settings(cfg, "blockwise")))
        if rank == 0 and not _reusable(*stages[-1]):
            clear_stage(stage)
            run_blockwise(cfg, start, stage)
            write_json(stage / START_FILE, stages[-1][1])
        start = stage / "model"
    if rank != 0:
        for stage, settings in stages:
            wait_for(stage / START_FILE, timeout_s, "rank 0 did not finish building the student's start",
                     ready=lambda stage=stage, settings=settings: _reusable(stage, settings))
    return start


STAGE_REPORTS = ("ptq_report.json", "blockwise_report.json")


def clear_stage(stage: Path) -> None:
    """Rank 0, before it builds the stage (the other ranks wait): the stage's folder, record and report (an earlier
    build's, which a kill before this build's own would leave beside it), and the temp folders a killed build left."""
    clean_stale(stage)
    for name in ("model", START_FILE, *STAGE_REPORTS):
        p = stage / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_blockwise(cfg: RunConfig, start: Optional[Path], stage: Path) -> Path:
    """Reconstruct the start (or the RTN student) block by block against the base model on the training text;
    writes stage/model and stage/blockwise_report.json."""
    m, b = cfg.model, cfg.train.blockwise
    tok = load_tokenizer(m.name_or_path, m.trust_remote_code)
    ids = calibration_ids(tok, b.samples, b.seq_len, cfg.data.path, "train",
                          cfg.data.text_field, seed=cfg.seed)
    student = load_student(cfg, start, "float32")
    teacher = load_model(m.name_or_path, "float32", m.attn_implementation, m.trust_remote_code).eval()
    if start is not None and (turn := rotation_of(inspect(start, "train.init").config)) is not None:
        # A rotated start's blocks compute in the turned basis: compare them with the teacher turned the same way
        # (the same settings give the same matrices; the teacher's function does not change).
        rotate_model(teacher, turn)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"train: block-wise reconstruction, {b.steps} steps a block on {ids.shape[0]} x "
          f"{ids.shape[1]} tokens of {cfg.data.path}", file=sys.stderr)
    report = reconstruct(student, teacher, ids, b, device, cfg.seed)
    with atomic_dir(stage / "model") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    write_json(stage / "blockwise_report.json", report.to_dict())
    mean_before = sum(b.before for b in report.blocks) / len(report.blocks)
    mean_after = sum(b.after for b in report.blocks) / len(report.blocks)
    print(f"train: block-wise done in {report.seconds:.0f}s; mean held-out block mse {mean_before:.4g} -> "
          f"{mean_after:.4g}", file=sys.stderr)
    return stage / "model"


def load_student(cfg: RunConfig, start: Optional[Path], dtype: str) -> torch.nn.Module:
    """The student to train: the base fake-quantized by cfg.quant (start None), or the start folder's model made
    trainable (a fake-quant folder: every float parameter; AQLM: codebooks and scales only)."""
    m = cfg.model
    if start is None:
        student = load_model(m.name_or_path, dtype, m.attn_implementation, m.trust_remote_code)
        quantize_model(student, cfg.quant)
        return student
    folder = inspect(start, "train.init")
    if folder.kind is Kind.FOREIGN:  # its codes as a frozen lsq grid: step 0 computes the folder's weights
        student = load_foreign_fake_quant(folder, resolve_dtype(dtype))
        if (layer := inexact_layer(student)) is not None and rank_world()[0] == 0:
            print(f"train: train.init={start}: its scales do not fit {dtype} exactly ({layer}), so the student starts "
                  "from the folder's weights rounded to that grid; train.master_weights=fp32 starts exactly there",
                  file=sys.stderr)
    else:
        student = load(folder, dtype, attn_implementation=m.attn_implementation,
                       trust_remote_code=m.trust_remote_code)
    if folder.kind is Kind.AQLM:
        return prepare_finetune(student, folder.record, start)
    for p in student.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    # What it is now: a student in training (a QAT folder once saved), started from that PTQ result.
    record = getattr(student.config, PTQ_KEY, None)
    if record is not None:
        delattr(student.config, PTQ_KEY)
        setattr(student.config, INIT_KEY, {"from": "ptq", **record})
    return student
