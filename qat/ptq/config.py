"""The `ptq` config section: the method, the calibration set, and each method's own knobs under its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .aqlm import AQLMConfig
from .awq import AWQConfig
from .gptq import GPTQConfig
from .hqq import HQQConfig
from .llm_int8 import LLMInt8Config
from .registry import METHODS
from .rotate import RotateConfig
from .smoothquant import SmoothQuantConfig


@dataclass
class PTQConfig:
    method: str = field(default="gptq", metadata={"choices": METHODS})
    # Calibration text: "" uses data.path; a local text/json/jsonl/parquet file or saved dataset;
    # "bundled:wikitext"; or "generate" (the model samples its own text, LLM-QAT style).
    calib_data: str = ""
    calib_split: str = "calib"
    n_samples: int = field(default=128, metadata={"range": (1, 1 << 20)})
    seq_len: int = field(default=512, metadata={"range": (8, 1 << 20)})
    batch_size: int = field(default=8, metadata={"range": (1, 1 << 16)})  # calibration sequences per forward
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})  # where a block runs
    seed: int = 0
    progress: bool = True
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    hqq: HQQConfig = field(default_factory=HQQConfig)
    llm_int8: LLMInt8Config = field(default_factory=LLMInt8Config)
    aqlm: AQLMConfig = field(default_factory=AQLMConfig)
    rotate: RotateConfig = field(default_factory=RotateConfig)

    # Keys of the flat layout before each method had its own section: the config loader names the new key.
    moved_keys: ClassVar[dict[str, str]] = {
        **{k: f"gptq.{k}" for k in ("damp", "block_size", "act_order", "static_groups", "true_sequential")},
        **{f"awq_{k}": f"awq.{k}" for k in ("grid", "clip", "clip_grid", "max_shrink")},
        **{f"hqq_{k}": f"hqq.{k}" for k in ("iters", "lp_norm", "beta", "kappa")},
        "smooth_alpha": "smoothquant.alpha",
        "int8_threshold": "llm_int8.threshold",
    }
