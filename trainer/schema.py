"""The run configuration's schema: one dataclass per section (OmegaConf structured configs), each key declared
once with `qat.options.setting`: its default, its help text (which `--help` prints) and its allowed values or
range (which trainer.config checks). Loading, composition and validation are in trainer.config.

The defaults are the recommended recipe: `distqat train` or `pipeline` with no recipe does what the laptop recipe
(configs/default.yaml, which holds only sizes) does at full size. Where a lower layer's own default is the
published algorithm rather than the recommendation (W4 weight-only specs, GPTQ without a clipping search,
LLM-QAT's uniform first token), the section's default below says which differs.

Importing this module imports no torch and no transformers (tests/test_config.py holds it to that), so
`distqat --help` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from data.config import GenerateConfig
from qat.options import SPEEDUPS, setting
from qat.ptq.config import METHODS, BlockwiseConfig, GPTQConfig, PTQConfig
from qat.qlora.config import LoRAConfig
from qat.spec import QuantSpec, parse

RECOMMENDED_SCHEME = "w4a8kv8"
# rotate+gptq with the clipping search: 22.00 before training and 21.15 after 55 steps on the laptop recipe,
# against 37.89 for the RTN start (README; docs/ACCURACY.md).
RECOMMENDED_INIT = "rotate+gptq"
PTQ_START_LR = 6e-4
RTN_START_LR = 1e-4


@dataclass(frozen=True)
class Start:
    """train.init read once: `rtn`, a PTQ `method` (its name in .method), or a `folder` (its path in .path; that it
    holds a start is checked by trainer.init before any model loads)."""

    kind: str
    method: Optional[str] = None
    path: Optional[str] = None

    @classmethod
    def parse(cls, value: str) -> Start:
        name = str(value).strip().lower()
        if name == "rtn":
            return cls("rtn")
        if name in METHODS:
            return cls("method", method=name)
        return cls("folder", path=str(value))

    @property
    def rotates(self) -> bool:
        """Whether a PTQ start turns the model (a folder's rotation is read from its config by trainer.init)."""
        return self.method is not None and "rotate" in self.method.split("+")


@dataclass(frozen=True)
class Resume:
    """train.resume read once: `auto` (the newest checkpoint, if any), `never`, or a checkpoint `path`."""

    kind: str
    path: Optional[str] = None

    @classmethod
    def parse(cls, value: str) -> Resume:
        name = str(value).strip()
        return cls(name) if name in ("auto", "never") else cls("path", path=name)


@dataclass
class ModelConfig:
    name_or_path: str = setting("bundled:smollm2-135m", help="a local Hugging Face folder, or bundled:<name> "
                                "(bundled:smollm2-135m ships with the project; bundled:smollm2-135m-moe is it as "
                                "a mixture of 8 experts, top-6, built from it once)")
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float16", "float32"), help="the weights' dtype "
                         "as loaded (auto: bfloat16 on a GPU, float32 on CPU; training may still multiply in bf16 "
                         "there: train.autocast)")
    attn_implementation: str = setting("sdpa", choices=("sdpa", "eager"), help="transformers' attention kernel")
    trust_remote_code: bool = setting(False, help="run code shipped with the model folder; off unless you ask")


@dataclass
class DataConfig:
    path: str = setting("bundled:wikitext", group="text", help="the text: bundled:wikitext, or a local "
                        "text/json/jsonl/parquet file or datasets folder")
    text_field: str = setting("text", group="text", help="the field holding the text in json/jsonl/parquet")
    seq_len: int = setting(1024, range=(8, 1 << 20), help="tokens per training sequence (packed block)")
    chat_template: bool = setting(False, help="wrap plain text in the tokenizer's chat template")
    val_fraction: float = setting(0.05, range=(0.0, 0.5), help="share of the blocks held out for validation")
    format: str = setting("text", choices=("text", "instructions"), help="text: plain text; instructions: records "
                          "of chat `messages`, ShareGPT `conversations` or instruction/input/output, through the chat "
                          "template, with the loss on assistant tokens only (bundled:instructions is a small offline "
                          "set)")
    packing: bool = setting(True, help="instructions: whole examples packed several to a block, each attending only "
                            "to itself (an example longer than a block is cut); false: one example per block, padded")


@dataclass
class TrainConfig:
    mode: str = setting("qat", choices=("qat", "qlora"), help="qat: distil the teacher into the fake-quantized "
                        "student; qlora: train LoRA adapters (the lora section) on a frozen base held packed, "
                        "quantized at load by the quant section or taken from a quantized folder")
    init: Optional[str] = setting(None, help="where the student starts: rtn (the base, fake-quantized), a PTQ "
                                  f"method ({', '.join(m for m in METHODS if m != 'llm_int8')}; run first on the "
                                  "training text or ptq.calib_data, with the ptq section's settings), or a folder "
                                  "written by distqat ptq or distqat train, or an AQLM folder; null: "
                                  f"{RECOMMENDED_INIT} for train.mode=qat (qlora trains on its own base)")
    max_steps: int = setting(1000, range=(1, 1 << 40), help="optimizer steps")
    micro_batch_size: int = setting(1, range=(1, 1 << 20), help="sequences per device per forward")
    grad_accum: int = setting(1, range=(1, 1 << 20), help="micro-batches per optimizer step")
    # From a PTQ start the weights sit on the grid: lr must move them across rounding boundaries. 1.2e-3
    # diverged and 3e-4 ended worse on the laptop recipe (docs/ACCURACY.md). From RTN 6e-4 is too high: the
    # distillation loss stalled near 0.28 against 0.15-0.17 at 1e-4, for torchao's QAT as for ours (issue 31).
    lr: Optional[float] = setting(None, range=(0.0, 1.0), help="peak learning rate of the quantized linears' "
                                  f"weights; null: {PTQ_START_LR} from a PTQ or folder start (and in qlora mode), "
                                  f"{RTN_START_LR} from train.init=rtn")
    quantizer_lr: float = setting(1e-5, range=(0.0, 1.0), help="learning rate of the quantizers' parameters "
                                  "(LSQ scales and zero points, LWC clipping)")
    fp_lr: Optional[float] = setting(None, range=(0.0, 1.0), help="learning rate of the parameters that stay "
                                     "full precision (embeddings, norms, an unquantized head); null: train.lr")
    # The rotation folds the norms into q/k/v/gate/up, which leaves those weights 4-25x smaller than o/down:
    # without relative rates the loss jumped 0.24 -> 0.88 in 6 steps (docs/ACCURACY.md).
    lr_relative: Optional[bool] = setting(None, help="each quantized linear's weight and scales at lr x its "
                                          "weight RMS / the median; null: on for a rotated start (train.init "
                                          "rotates, or its folder was rotated), off otherwise")
    warmup_steps: int = setting(0, range=(0, 1 << 40), help="linear warm-up steps of the learning rate")
    min_lr_ratio: float = setting(0.1, range=(0.0, 1.0), help="the cosine schedule ends at lr x this")
    weight_decay: float = setting(0.0, range=(0.0, 1.0), help="AdamW weight decay")
    grad_clip: float = setting(1.0, range=(0.0, 1e9), help="gradient norm clipping; 0: none")
    kd_temperature: float = setting(1.0, range=(1e-3, 1e3), help="temperature of the distillation's softmax")
    ce_weight: float = setting(0.0, range=(0.0, 1e3), help="weight of a cross-entropy loss on the data's next "
                               "tokens, added to the distillation loss")
    router_kd: float = setting(0.0, range=(0.0, 1e3), help="MoE students: weight of a routing-agreement loss, the "
                               "mean over MoE layers of KL(teacher's router softmax || student's); 0: off; needs "
                               "a live teacher (train.teacher_topk=0)")
    teacher_topk: int = setting(0, range=(0, 1 << 24), help="> 0: run the teacher once before training and distil "
                                "from its cached top-k logits per position (stored beside the packed data; no "
                                "teacher in memory while training); 0: a live teacher forward")
    master_weights: str = setting("auto", choices=("auto", "bf16", "fp32"), help="bf16: parameters and Adam state "
                                  "in bf16 with a compensated update; fp32: fp32 parameters; auto: bf16 on CUDA, "
                                  "fp32 on CPU and under DeepSpeed offload")
    # always/never rather than on/off, which YAML reads as booleans.
    autocast: str = setting("auto", choices=("auto", "always", "never"), help="with fp32 masters, whether matmuls "
                            "run in bf16 autocast (fake quant stays fp32); auto: on CUDA, and on CPUs that "
                            "multiply bf16 in hardware (AVX512-BF16, AMX; not under DeepSpeed)")
    compensation: str = setting("kahan", choices=("kahan", "stochastic", "none"), help="bf16 masters: how the "
                                "update's rounding error is kept (Kahan sums, stochastic rounding, or not)")
    gradient_checkpointing: bool = setting(False, help="recompute the decoder's activations in backward (less "
                                           "memory, more time)")
    save_every: int = setting(200, range=(1, 1 << 40), help="steps between checkpoints")
    val_every: int = setting(200, range=(1, 1 << 40), help="steps between validations")
    val_batches: int = setting(8, range=(0, 1 << 30), help="batches per validation")
    stats_every: int = setting(100, range=(1, 1 << 40), help="steps between per-layer quantizer statistics")
    keep_last: int = setting(2, range=(1, 1000), help="checkpoints kept")
    resume: str = setting("auto", help="auto: the newest checkpoint in output_dir/checkpoints, if any; never: start "
                          "afresh; or a checkpoint's path")
    stop_signals: list[str] = setting(
        factory=lambda: ["TERM", "USR1"], choices=("TERM", "USR1", "USR2", "HUP"),
        help="signals that stop training after the current step with a checkpoint and exit code 75 (SLURM: "
        "--signal=USR1@120; Kubernetes sends TERM); train.resume=auto continues it exactly")
    skip_nonfinite: int = setting(0, range=(0, 1 << 30), help="a non-finite loss or gradient stops the run; N > 0 "
                                  "skips up to N such batches first (not under DeepSpeed)")
    progress_every_s: float = setting(30.0, range=(0.0, 86400.0), help="where stderr is not a terminal (a log): "
                                      "seconds between progress lines, instead of a progress bar")
    speedups: list[str] = setting(factory=list, choices=("compile",) + SPEEDUPS, help="faster ways to compute the "
                                  "same QAT step (qat/fast.py), e.g. [norm_quant,weight_batch]: norm_quant fuses the "
                                  "activation fake quant into the RMSNorm, weight_batch fake-quantizes a layer's "
                                  "weights in one call, kv_direct scales K/V without reshaping them, compile runs "
                                  "the student under torch.compile")
    blockwise: BlockwiseConfig = setting(factory=BlockwiseConfig, help="block-wise reconstruction of the start "
                                         "before distillation (EfficientQAT's Block-AP), on blockwise.samples x "
                                         "blockwise.seq_len training tokens")

    @property
    def peak_lr(self) -> float:
        """train.lr, null resolved by the start."""
        if self.lr is not None:
            return self.lr
        return RTN_START_LR if self.mode == "qat" and self.start.kind == "rtn" else PTQ_START_LR

    @property
    def start(self) -> Start:
        if self.init is None:
            return Start.parse(RECOMMENDED_INIT if self.mode == "qat" else "rtn")
        return Start.parse(self.init)

    @property
    def resume_from(self) -> Resume:
        return Resume.parse(self.resume)

    moved_keys: ClassVar[dict[str, str]] = {
        f"blockwise_{k}": f"blockwise.{k}"
        for k in ("steps", "lr", "quantizer_lr", "samples", "seq_len", "batch_size", "held_out")}


@dataclass
class DistributedConfig:
    strategy: str = setting("auto", choices=("auto", "deepspeed", "ddp", "single"), help="auto: DeepSpeed on "
                            "several GPUs, one process otherwise")
    zero_stage: int = setting(2, choices=(2, 3), help="DeepSpeed ZeRO stage: 2 shards optimizer state and "
                              "gradients, 3 the parameters too")
    offload_optimizer: bool = setting(False, help="DeepSpeed: the optimizer state in CPU memory")
    offload_params: bool = setting(False, help="DeepSpeed ZeRO-3: the parameters in CPU memory")
    timeout_s: float = setting(1800.0, range=(1.0, 7 * 86400.0), help="seconds a collective (gloo, NCCL) may wait "
                               "for the other ranks before it fails")
    peer_timeout_s: float = setting(120.0, range=(1.0, 86400.0), help="seconds without a heartbeat from another "
                                    "rank before this one ends, naming it (killed, OOM, node lost)")


@dataclass
class EvalConfig:
    split: str = setting("test", choices=("train", "test", "calib"), help="the split of data.path scored")
    max_tokens: int = setting(8192, range=(1, 1 << 40), help="tokens scored")
    seq_len: int = setting(1024, range=(8, 1 << 20), help="tokens per scored window")
    batch_size: int = setting(1, range=(1, 1 << 16), help="windows per forward; for eval.tasks, requests")
    compare: list[str] = setting(factory=lambda: ["fp", "quant"], help='what to score: "fp" (the model as loaded) '
                                 'and/or "quant" (fake-quantized with the quant section)')
    plot: bool = setting(True, help="draw the perplexities as a plot beside the table")
    tasks: list[str] = setting(factory=list, help="lm-evaluation-harness tasks scored on each model besides "
                               "perplexity (pip install 'distqat[eval]'), e.g. [arc_easy,hellaswag]; offline, a "
                               "task's data must be local or in the datasets cache")
    task_dir: Optional[str] = setting(None, help="a folder of task YAMLs (lm_eval's include_path)")
    task_limit: Optional[int] = setting(None, range=(1, 1 << 40), help="examples per task; null: all")
    num_fewshot: Optional[int] = setting(None, range=(0, 1 << 10), help="few-shot examples; null: each task's own")


def recommended_quant() -> QuantSpec:
    """W4A8KV8, LLM-QAT's headline setting (the quant spec's own default is W4 weight-only)."""
    return parse(RECOMMENDED_SCHEME)


def recommended_ptq() -> PTQConfig:
    """GPTQ with its clipping search (the library's GPTQConfig keeps the published algorithm's min/max)."""
    return PTQConfig(gptq=GPTQConfig(clip=True))


def recommended_generate() -> GenerateConfig:
    # Samples opening with a capitalised word: 23.61 against 23.73 after 55 steps from one start, 23.30 against
    # 23.54 after 140 (docs/ACCURACY.md).
    """Samples that open with a capitalised word (the generator's own default is LLM-QAT's uniform token)."""
    return GenerateConfig(first_token="word")


@dataclass
class RunConfig:
    name: str = setting("run", help="the run's name (output_dir's default uses it)")
    output_dir: str = setting("runs/${name}", help="where the run writes")
    seed: int = setting(0, help="the run's seed (data order, generation, initialisation)")
    model: ModelConfig = setting(factory=ModelConfig, help="the model")
    quant: QuantSpec = setting(factory=recommended_quant, help="what is quantized and how (quant.scheme=<short "
                               "name> sets it at once)")
    data: DataConfig = setting(factory=DataConfig, help="the training text")
    generate: GenerateConfig = setting(factory=recommended_generate, help="the teacher's own training text "
                                       "(LLM-QAT data-free)")
    train: TrainConfig = setting(factory=TrainConfig, help="training")
    lora: LoRAConfig = setting(factory=LoRAConfig, help="QLoRA adapters (train.mode=qlora)")
    ptq: PTQConfig = setting(factory=recommended_ptq, help="post-training quantization")
    distributed: DistributedConfig = setting(factory=DistributedConfig, help="multi-GPU training")
    eval: EvalConfig = setting(factory=EvalConfig, help="scoring")
