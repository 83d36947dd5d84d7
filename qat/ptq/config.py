"""The `ptq` config section: the method, the calibration set, and each method's own settings under its name.

Every method's settings live here rather than beside its algorithm, so the run-config schema reads them without
importing torch (`distqat --help` stays fast); each method module imports its section from here. A new part
adds its name to PART_NAMES, its section below and a field of its name in PTQConfig; qat.ptq.registry lists its
class and checks the two name lists agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..options import setting

# The parts a ptq.method composes (qat.ptq.registry holds their classes; its import checks these names).
ROUNDING_NAMES = ("rtn", "gptq", "hqq", "aqlm")
TRANSFORM_NAMES = ("smoothquant", "awq")  # in the order they apply
BASELINE_NAMES = ("llm_int8",)
MODEL_TRANSFORM_NAMES = ("rotate",)  # before the block loop
BASE_METHODS = (*ROUNDING_NAMES, *TRANSFORM_NAMES, *BASELINE_NAMES, *MODEL_TRANSFORM_NAMES)
METHODS = BASE_METHODS + ("smoothquant+rtn", "smoothquant+gptq", "awq+rtn", "awq+gptq", "smoothquant+awq+gptq",
                          "rotate+rtn", "rotate+gptq", "rotate+hqq", "rotate+smoothquant+gptq", "rotate+awq+gptq")
ROTATE_KINDS = ("hadamard", "random")
ONLINE_ROTATIONS = ("down", "qk")  # qat.online.ONLINE: R4 on down_proj inputs, R3 on queries and keys


@dataclass
class GPTQConfig:
    """`ptq.gptq`. act_order and damp 0.1 (not the paper's 0.01) measured best on held-out text: with a few
    thousand calibration tokens the error feedback otherwise overfits them (docs/PTQ_RESULTS.md)."""

    damp: float = setting(0.1, range=(0.0, 10.0), help="adds damp x mean(diag H) to the Hessian's diagonal")
    block_size: int = setting(128, range=(1, 1 << 20), help="columns rounded per lazy-update block")
    act_order: bool = setting(True, help="visit columns by decreasing Hessian diagonal")
    static_groups: bool = setting(True, help="each group's scale from the weight before any update (always on "
                                  "with act_order, so groups stay contiguous and pack)")
    true_sequential: bool = setting(True, help="quantize a block's linears in order, each calibrated on the "
                                    "outputs of the ones already quantized")
    # On the bundled model the search shrank the median row's int4 range to 0.75 (0.78 after the rotation), and
    # rotate+gptq scored 22.16 with it against 26.39 without (docs/ACCURACY.md). Off here, as in the GPTQ
    # reference, so the library's `gptq` is the published algorithm; the run config turns it on
    # (trainer/schema.py's recommended recipe).
    clip: bool = setting(False, help="search each row's (group's) clipping range rather than take its min/max, "
                         "which spends the grid on a few large weights")
    # Below one token per column X_e^T X_e is singular, and near it GPTQ's error feedback fits the few tokens it saw:
    # on tiny random Qwen3-MoE models (hidden 64, 8-16 experts, 16-64 routed tokens per expert on average, w4, 3 seeds)
    # falling back below 2 tokens per column cut the experts' held-out output error by 15-30% against never falling
    # back, and matched falling back always to within 2%.
    moe_min_tokens_per_column: float = setting(
        2.0, range=(0.0, 1e6), help="MoE experts: an expert routed fewer calibration tokens than this many times a "
        "projection's input width is rounded with the layer's pooled Hessian (every token that reached the MoE "
        "layer, run through that expert) instead of its own; ptq_report.json counts them per layer. An expert no "
        "token reached always is; 0 falls back for those only")


@dataclass
class AWQConfig:
    """`ptq.awq`: grid points of the scale exponent alpha; the clipping search (on/off, its grid, the
    largest shrink of a row's range)."""

    grid: int = setting(20, range=(1, 1000), help="grid points of the scale exponent alpha in [0, 1)")
    clip: bool = setting(True, help="search each row's clipping range after scaling")
    clip_grid: int = setting(20, range=(1, 1000), help="grid points of the clipping search")
    max_shrink: float = setting(0.5, range=(0.0, 0.99), help="the largest share of a row's range the search cuts")


@dataclass
class SmoothQuantConfig:
    """`ptq.smoothquant`: alpha, how much of the outliers' range moves from the activations to the weights."""

    alpha: float = setting(0.5, range=(0.0, 1.0), help="how much of the activation outliers' range moves into "
                           "the weights (0: none, 1: all)")


@dataclass
class HQQConfig:
    """`ptq.hqq`: the half-quadratic solver's iterations, l_p norm of the outlier term, and its penalty
    beta, multiplied by kappa every iteration."""

    iters: int = setting(20, range=(1, 10000), help="half-quadratic solver iterations")
    lp_norm: float = setting(0.7, range=(0.01, 2.0), help="p of the l_p norm on the outlier term")
    beta: float = setting(10.0, range=(1e-6, 1e9), help="the outlier term's starting penalty")
    kappa: float = setting(1.01, range=(1.0, 10.0), help="beta is multiplied by kappa every iteration")


@dataclass
class LLMInt8Config:
    """`ptq.llm_int8`: input features above `threshold` in magnitude run in fp16 (the paper's 6.0)."""

    threshold: float = setting(6.0, range=(0.0, 1e9), help="input features above this magnitude run in fp16")


@dataclass
class AQLMConfig:
    """`ptq.aqlm`: M codebooks of 2^B codewords of `in_group_size` weights (2x8: ~2 bits a weight plus codebooks
    and scales; 1x16 is the paper's other setting but needs a GPU); the search and update knobs; `damp` adds
    that fraction of mean(diag H) to H's diagonal (held-out text, as GPTQ's damp)."""

    num_codebooks: int = setting(2, range=(1, 8), help="M: codebooks summed per weight group")
    nbits_per_codebook: int = setting(8, range=(1, 16), help="B: each codebook holds 2^B codewords")
    in_group_size: int = setting(8, range=(1, 64), help="weights per codeword")
    beam_size: int = setting(4, range=(1, 256), help="the beam search's width over codes")
    iterations: int = setting(3, range=(0, 1000), help="alternations of code search and codebook update")
    kmeans_iters: int = setting(10, range=(0, 1000), help="k-means iterations of the codebooks' initialisation")
    adam_steps: int = setting(40, range=(0, 100000), help="Adam steps of each codebook and scale update")
    lr: float = setting(1e-2, range=(0.0, 1.0), help="the codebook update's learning rate")
    damp: float = setting(0.01, range=(0.0, 10.0), help="adds damp x mean(diag H) to the Hessian's diagonal")
    seed: int = setting(0, help="seed of the initialisation")


@dataclass
class RotateConfig:
    """`ptq.rotate`: which orthogonal matrices turn the model (hadamard or random), per-head values too, the seed,
    and the online Hadamards (R4 on down_proj inputs, R3 on queries and keys)."""

    kind: str = setting("hadamard", choices=ROTATE_KINDS, help="Hadamard with random signs (QuaRot) or a random "
                        "orthogonal matrix")
    heads: bool = setting(True, help="also turn each attention head's values (v_proj rows, o_proj columns)")
    seed: int = setting(0, help="seed of the signs or the matrix: the same settings give the same rotation")
    # The rotations no weight can absorb, run at inference (qat.online): they matter once activations or the KV
    # cache are 4-bit. [] keeps a rotated model the plain architecture every reader runs.
    online: list[str] = setting(factory=list, choices=ONLINE_ROTATIONS, help="online Hadamards: down (R4, each "
                                "MLP down_proj's input; its weight columns turn offline) and qk (R3, queries and "
                                "keys after RoPE, so a quantized KV cache holds turned keys); the converted folder "
                                "needs distqat's reader for them")
    online_block: int = setting(0, range=(0, 1 << 20), help="R4's Hadamard: 0 one of the MLP's full width (1536 = "
                                "12 x 128 has one), else a block size dividing it (kron(I, H_block)), a power of two "
                                "or a Paley order p + 1")


@dataclass
class BlockwiseConfig:
    """`train.blockwise`: block-wise reconstruction (EfficientQAT's Block-AP) before distillation
    (qat.ptq.blockwise)."""

    steps: int = setting(0, range=(0, 1 << 30), help="optimizer steps per decoder block; 0 skips the stage")
    lr: float = setting(1e-4, range=(0.0, 1.0), help="learning rate of the block's weights")
    quantizer_lr: float = setting(1e-3, range=(0.0, 1.0), help="learning rate of its quantizer parameters "
                                  "(LSQ scales and zero points, LWC clipping)")
    samples: int = setting(64, range=(2, 1 << 24), help="training-text sequences the stage runs on, held-out "
                           "ones included")
    seq_len: int = setting(256, range=(8, 1 << 20), help="tokens per sequence")
    batch_size: int = setting(4, range=(1, 1 << 16), help="sequences per step")
    held_out: int = setting(4, range=(1, 1 << 16), help="sequences kept out of training; each block's error is "
                            "reported on them")
    progress: bool = setting(True, help="a progress line per block")


@dataclass
class PTQConfig:
    method: str = setting("gptq", choices=METHODS, help="the method: a rounding after any transforms, e.g. "
                          "awq+gptq, rotate+gptq; llm_int8 is a baseline of its own")
    calib_data: str = setting("", help='calibration text: "" uses data.path; a local text/json/jsonl/parquet file '
                              'or saved dataset; bundled:wikitext; or "generate" (the model samples its own text)')
    calib_split: str = setting("calib", help="the split of the calibration text to draw from")
    n_samples: int = setting(128, range=(1, 1 << 20), help="calibration sequences")
    seq_len: int = setting(512, range=(8, 1 << 20), help="tokens per calibration sequence")
    batch_size: int = setting(8, range=(1, 1 << 16), help="calibration sequences per forward")
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), help="where a block runs (auto: a GPU if any)")
    seed: int = setting(0, help="seed of the calibration sample")
    progress: bool = setting(True, help="a progress line per block")
    gptq: GPTQConfig = setting(factory=GPTQConfig, help="GPTQ's settings")
    awq: AWQConfig = setting(factory=AWQConfig, help="AWQ's settings")
    smoothquant: SmoothQuantConfig = setting(factory=SmoothQuantConfig, help="SmoothQuant's settings")
    hqq: HQQConfig = setting(factory=HQQConfig, help="HQQ's settings")
    llm_int8: LLMInt8Config = setting(factory=LLMInt8Config, help="LLM.int8()'s settings")
    aqlm: AQLMConfig = setting(factory=AQLMConfig, help="AQLM's settings")
    rotate: RotateConfig = setting(factory=RotateConfig, help="the rotation's settings")

    # Keys of the flat layout before each method had its own section: the config loader names the new key.
    moved_keys: ClassVar[dict[str, str]] = {
        **{k: f"gptq.{k}" for k in ("damp", "block_size", "act_order", "static_groups", "true_sequential")},
        **{f"awq_{k}": f"awq.{k}" for k in ("grid", "clip", "clip_grid", "max_shrink")},
        **{f"hqq_{k}": f"hqq.{k}" for k in ("iters", "lp_norm", "beta", "kappa")},
        "smooth_alpha": "smoothquant.alpha",
        "int8_threshold": "llm_int8.threshold",
    }
