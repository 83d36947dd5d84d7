"""`distqat ptq <config>`: load, quantize with the configured PTQ method, save an HF folder."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Union

from .loop import PTQ_KEY, run_ptq


def ptq_command(cfg) -> dict:
    """Run PTQ for a full RunConfig (model, quant, data, ptq, output_dir); writes <output_dir>/model and
    <output_dir>/ptq_report.json. Evaluates nothing (`distqat eval` on the folder does)."""
    from trainer.models import load_model, load_tokenizer

    from .calib import calibration_ids, resolve_calib_path
    from .config import parse_method
    from .grid import frozen_spec
    from .loop import _unpack, check_spec, needs_calibration

    # Bad input fails in one line before the model loads: the method, the spec it cannot produce, a
    # calibration text shorter than ptq.n_samples * ptq.seq_len.
    spec, pcfg, data_path, text_field = _unpack(cfg)
    steps = parse_method(pcfg.method)
    check_spec(spec, steps)
    if steps != ["llm_int8"]:
        frozen_spec(spec)
    m = cfg.model
    tok = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
    calib_ids = None
    if needs_calibration(spec, steps) and pcfg.calib_data != "generate":
        calib_ids = calibration_ids(tok, pcfg.n_samples, pcfg.seq_len, resolve_calib_path(pcfg.calib_data, data_path),
                                    pcfg.calib_split, text_field, seed=pcfg.seed)
    model = load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                       trust_remote_code=m.trust_remote_code)
    model, report = run_ptq(cfg, model, tok, calib_ids=calib_ids)
    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    # Written whole into a temp folder, then renamed: a crash never leaves half a model behind.
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        os.replace(tmp, out / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = report.to_dict()
    result["model_dir"] = str(out / "model")
    fd, tmp_json = tempfile.mkstemp(dir=out, prefix=".ptq_report.")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp_json, out / "ptq_report.json")
    print(f"ptq {report.method} ({report.spec}): {len(report.layers)} layers in {report.seconds:.1f}s "
          f"-> {out / 'model'}", file=sys.stderr)
    return result


def load_ptq_model(path: Union[str, Path], dtype=None, **kwargs):
    """Reload a ptq output folder: QuantLinear models via qat.apply.load_quantized_model, llm_int8 ones by
    re-wrapping the saved fp linears in Int8OutlierLinear."""
    from transformers import AutoModelForCausalLM

    from ..apply import CONFIG_KEY, load_quantized_model

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if CONFIG_KEY in cfg:
        return load_quantized_model(path, dtype=dtype, **kwargs)
    info = cfg.get(PTQ_KEY) or {}
    if info.get("method") != "llm_int8":
        raise ValueError(f"{path} is not a distqat ptq output (no {CONFIG_KEY} or {PTQ_KEY} in config.json)")
    from types import SimpleNamespace

    from .llm_int8 import convert_llm_int8

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    spec = SimpleNamespace(include=info.get("include"), exclude=info.get("exclude"), weight=None, kv=None)
    convert_llm_int8(model, spec, info.get("threshold", 6.0))
    model.eval()
    return model
