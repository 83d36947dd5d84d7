"""The commands that load a model and hand it to a lower layer: generate, ptq.

Each takes the run config and passes the lower layer only what it needs (a GenerateConfig, a QuantSpec and
a PTQConfig, a model, a tokenizer, paths).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from data.calib import calibration_ids, resolve_calib_path
from data.generate import check as check_generate
from data.generate import generate
from qat.io.atomic import atomic_dir, check_dir, clean_stale, write_json
from qat.io.env import rank_world
from qat.io.models import load_model, load_tokenizer
from qat.keys import COVERAGE_KEY
from qat.load import load
from qat.ptq import check as check_ptq
from qat.ptq import needs_calibration, run_ptq
from qat.qlora.use import with_adapter

from .config import RunConfig, save_config

PTQ_PROGRESS_DIR = "ptq_progress"


def wait_for(path: Path, timeout_s: float, what: str, ready: Optional[Callable[[], bool]] = None) -> None:
    """Poll until `path` exists (another rank writes it) and `ready()` holds; a clear error after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and (ready is None or ready())):
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path} did not appear within {timeout_s:.0f} s: {what}")
        time.sleep(2.0)


def prepare_output(out_dir: Path, what: str = "output_dir") -> Path:
    """The run's folder, checked writable before any work; rank 0 removes what a killed earlier run left
    half-written there (other ranks may be writing once it has started)."""
    check_dir(out_dir, what)
    if rank_world()[0] == 0:
        clean_stale(out_dir)
    return Path(out_dir)


def run_generate(cfg: RunConfig, rank: Optional[int] = None, world: Optional[int] = None,
                 progress: bool = True) -> Path:
    """`distqat generate`: this rank's shards of the teacher's own text in generate.out_dir (default
    <output_dir>/generated), the manifest once every rank's shards exist."""
    g, m = cfg.generate, cfg.model
    check_generate(g)  # before the teacher loads
    out_dir = Path(g.out_dir) if g.out_dir else Path(cfg.output_dir) / "generated"
    check_dir(out_dir, "generate.out_dir")  # every rank writes shards here: no cleaning
    tok = load_tokenizer(m.name_or_path, m.trust_remote_code)
    if cfg.lora.adapter:  # the base held packed with the adapter on it, un-merged (qat.qlora.use)
        model = with_adapter(m.name_or_path, cfg.lora.adapter, None, m.dtype, m.attn_implementation,
                             m.trust_remote_code)
    else:
        model = load(m.name_or_path, m.dtype, attn_implementation=m.attn_implementation,
                     trust_remote_code=m.trust_remote_code)
    return generate(model, tok, g, out_dir, cfg.seed, m.name_or_path, rank, world, progress)


def ptq_command(cfg: RunConfig) -> dict:
    """`distqat ptq`: load, quantize with ptq.method, save <output_dir>/model and <output_dir>/ptq_report.json.

    Bad input (the method, a spec it cannot produce, a calibration text shorter than ptq.n_samples *
    ptq.seq_len) fails in one line before the model loads. Evaluates nothing (`distqat eval` on the folder does).
    """
    spec, p, m = cfg.quant, cfg.ptq, cfg.model
    check_ptq(spec, p)
    out = prepare_output(Path(cfg.output_dir))
    tok = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
    calib = None
    calibrate = needs_calibration(spec, p)
    if calibrate and p.calib_data != "generate":
        path = resolve_calib_path(p.calib_data, cfg.data.path)
        if not path.startswith("bundled:") and not Path(path).expanduser().exists():
            key = "ptq.calib_data" if p.calib_data else "data.path (ptq.calib_data is empty)"
            raise ValueError(f"{key}={path!r} does not exist; give a local text file or folder, bundled:wikitext, "
                             "or ptq.calib_data=generate")
        calib = calibration_ids(tok, p.n_samples, p.seq_len, path, p.calib_split, cfg.data.text_field, seed=p.seed)
    model = load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                       trust_remote_code=m.trust_remote_code)
    if calibrate and calib is None:  # the full-precision model writes its own calibration text
        calib = calibration_ids(tok, p.n_samples, p.seq_len, "generate", model=model, seed=p.seed)
    progress = out / PTQ_PROGRESS_DIR  # a stopped run's finished blocks, for the rerun
    model, report = run_ptq(model, spec, p, calib, progress_dir=progress)
    with atomic_dir(out / "model", need=sum(t.numel() * t.element_size() for t in model.state_dict().values())) \
            as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # An earlier run's report goes before its model is replaced, so that a report beside model/ is always
        # that model's (this one is written once model/ is in place).
        (out / "ptq_report.json").unlink(missing_ok=True)
    # Once model/ is in place: a run refused for want of space writes nothing, and one that fails leaves the
    # earlier run's config beside the earlier run's model.
    save_config(cfg, out)
    coverage = getattr(model.config, COVERAGE_KEY, None)
    result = {**report.to_dict(), "coverage": coverage, "model_dir": str(out / "model")}
    write_json(out / "ptq_report.json", result)
    shutil.rmtree(progress, ignore_errors=True)
    print(f"ptq {report.method} ({report.spec}): {len(report.layers)} layers in {report.seconds:.1f}s "
          f"-> {out / 'model'}", file=sys.stderr)
    if coverage:
        print(f"ptq: {coverage['share']:.2%} of the decoder's {coverage['weight_elements']:,} weight elements "
              "quantized", file=sys.stderr)
    return result
