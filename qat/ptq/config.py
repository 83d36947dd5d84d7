"""The `ptq` config section: which PTQ method(s), the calibration set, and each algorithm's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

# A method is one algorithm or a composition the literature uses: a transform (smoothquant / awq)
# followed by a weight rounding (rtn / gptq / hqq). A bare transform rounds with rtn.
BASE_METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8", "hqq")
TRANSFORMS = ("smoothquant", "awq")
ROUNDERS = ("rtn", "gptq", "hqq")
METHODS = BASE_METHODS + ("smoothquant+rtn", "smoothquant+gptq", "awq+rtn", "awq+gptq", "smoothquant+awq+gptq")


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
    # GPTQ. act_order and damp 0.1 (not the paper's 0.01) measured best on held-out text: with a few thousand
    # calibration tokens the error feedback otherwise overfits them (docs/PTQ_RESULTS.md).
    damp: float = field(default=0.1, metadata={"range": (0.0, 10.0)})
    block_size: int = field(default=128, metadata={"range": (1, 1 << 20)})
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    # AWQ
    awq_grid: int = field(default=20, metadata={"range": (1, 1000)})
    awq_clip: bool = True
    awq_clip_grid: int = field(default=20, metadata={"range": (1, 1000)})
    awq_max_shrink: float = field(default=0.5, metadata={"range": (0.0, 0.99)})
    # SmoothQuant
    smooth_alpha: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    # LLM.int8()
    int8_threshold: float = field(default=6.0, metadata={"range": (0.0, 1e9)})
    # HQQ
    hqq_iters: int = field(default=20, metadata={"range": (1, 10000)})
    hqq_lp_norm: float = field(default=0.7, metadata={"range": (0.01, 2.0)})
    hqq_beta: float = field(default=10.0, metadata={"range": (1e-6, 1e9)})
    hqq_kappa: float = field(default=1.01, metadata={"range": (1.0, 10.0)})
    progress: bool = True


def parse_method(method: Union[str, list, tuple]) -> list[str]:
    """'awq+gptq' or ['awq', 'gptq'] -> ['awq', 'gptq'] (transforms first, then one rounding); ValueError if invalid."""
    parts = [str(p).strip().lower() for p in (method if isinstance(method, (list, tuple)) else str(method).split("+"))]
    parts = [p for p in parts if p]
    bad = [p for p in parts if p not in BASE_METHODS]
    if bad or not parts:
        raise ValueError(f"ptq.method={method!r}: unknown method {bad[0] if bad else ''!r}; use one of {list(METHODS)}")
    if "llm_int8" in parts and len(parts) > 1:
        raise ValueError(f"ptq.method={method!r}: llm_int8 is a runtime int8 matmul and composes with nothing")
    rounders = [p for p in parts if p in ROUNDERS]
    if len(rounders) > 1:
        raise ValueError(f"ptq.method={method!r}: pick one weight rounding of {list(ROUNDERS)}, got {rounders}")
    transforms = [p for p in TRANSFORMS if p in parts]
    if rounders and "hqq" in rounders and transforms:
        raise ValueError(f"ptq.method={method!r}: hqq is calibration-free and does not compose with {transforms}")
    if parts == ["llm_int8"]:
        return parts
    return transforms + (rounders or ["rtn"])
