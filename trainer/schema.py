"""The run configuration's schema: one dataclass per section (OmegaConf structured configs), with each key's
default, its allowed values or range (field metadata, which trainer.config checks) and a comment saying what it
does. Loading, composition and validation are in trainer.config, which re-exports these classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.config import GenerateConfig
from qat.fast import SPEEDUPS
from qat.ptq.config import PTQConfig
from qat.qlora.config import LoRAConfig
from qat.spec import QuantSpec


@dataclass
class ModelConfig:
    name_or_path: str = "bundled:smollm2-135m"  # a local HF folder, or a bundled:<name>
    # auto: bfloat16 on a GPU, float32 on CPU (training may still multiply in bf16 there: train.autocast)
    dtype: str = field(default="auto", metadata={"choices": ("auto", "bfloat16", "float16", "float32")})
    attn_implementation: str = field(default="sdpa", metadata={"choices": ("sdpa", "eager")})
    trust_remote_code: bool = False  # off unless the user asks: it runs code shipped with the model


@dataclass
class DataConfig:
    path: str = "bundled:wikitext"  # bundled text, or local text/json/jsonl/parquet/datasets folder
    text_field: str = "text"
    seq_len: int = field(default=1024, metadata={"range": (8, 1 << 20)})
    chat_template: bool = False
    val_fraction: float = field(default=0.05, metadata={"range": (0.0, 0.5)})
    # instructions: records of chat `messages` or instruction/input/output, through the chat template, with
    # the loss on assistant tokens only (bundled:instructions is a small offline set); text: plain text.
    format: str = field(default="text", metadata={"choices": ("text", "instructions")})
    packing: bool = True  # instructions: several examples per block; false: one example per block, padded


@dataclass
class TrainConfig:
    # qat: distil the teacher into the fake-quantized student; qlora: train LoRA adapters (the lora section)
    # on a frozen base held packed, quantized at load by the quant section or taken from a quantized folder.
    mode: str = field(default="qat", metadata={"choices": ("qat", "qlora")})
    max_steps: int = field(default=1000, metadata={"range": (1, 1 << 40)})
    micro_batch_size: int = field(default=1, metadata={"range": (1, 1 << 20)})
    grad_accum: int = field(default=1, metadata={"range": (1, 1 << 20)})
    lr: float = field(default=2e-5, metadata={"range": (0.0, 1.0)})
    quantizer_lr: float = field(default=1e-4, metadata={"range": (0.0, 1.0)})
    # The parameters that stay full precision (embeddings, norms, an unquantized head); null: train.lr for all.
    fp_lr: Optional[float] = field(default=None, metadata={"range": (0.0, 1.0)})
    # Each quantized linear's weight and scales at lr x its weight RMS / the median (rotated starts need it).
    lr_relative: bool = False
    warmup_steps: int = field(default=0, metadata={"range": (0, 1 << 40)})
    weight_decay: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    grad_clip: float = field(default=1.0, metadata={"range": (0.0, 1e9)})
    kd_temperature: float = field(default=1.0, metadata={"range": (1e-3, 1e3)})
    ce_weight: float = field(default=0.0, metadata={"range": (0.0, 1e3)})
    # > 0: run the teacher once before training and distil from its cached top-k logits per position
    # (stored beside the packed data); no teacher in memory while training. 0: live teacher forward.
    teacher_topk: int = field(default=0, metadata={"range": (0, 1 << 24)})
    min_lr_ratio: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    # bf16: parameters and Adam state in bf16 with a compensated update; fp32: fp32 parameters; auto: bf16 on CUDA,
    # fp32 on CPU and under DeepSpeed offload.
    master_weights: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})
    # With fp32 masters, whether matmuls run in bf16 autocast (fake quant stays fp32). auto: on CUDA, and on CPUs
    # that multiply bf16 in hardware (AVX512-BF16, AMX; not under DeepSpeed), where a step ran 2.1x as fast.
    # always/never rather than on/off, which YAML reads as booleans.
    autocast: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})
    compensation: str = field(default="kahan", metadata={"choices": ("kahan", "stochastic", "none")})
    gradient_checkpointing: bool = False
    save_every: int = field(default=200, metadata={"range": (1, 1 << 40)})
    val_every: int = field(default=200, metadata={"range": (1, 1 << 40)})  # steps between validations
    val_batches: int = field(default=8, metadata={"range": (0, 1 << 30)})
    stats_every: int = field(default=100, metadata={"range": (1, 1 << 40)})  # per-layer quantizer statistics
    keep_last: int = field(default=2, metadata={"range": (1, 1000)})
    resume: str = "auto"  # auto | never | a checkpoint path
    # A non-finite loss or gradient stops the run; N > 0 skips up to N such batches first (not under DeepSpeed).
    skip_nonfinite: int = field(default=0, metadata={"range": (0, 1 << 30)})
    # Where stderr is not a terminal (a log): seconds between progress lines, instead of a progress bar.
    progress_every_s: float = field(default=30.0, metadata={"range": (0.0, 86400.0)})
    # Faster ways to compute the same QAT step (qat/fast.py; train.mode=qat), e.g. [norm_quant,weight_batch]:
    # norm_quant fuses the activation fake quant into the RMSNorm before q/k/v and gate/up, weight_batch
    # fake-quantizes a layer's weights in one call, kv_direct scales K/V without reshaping them, compile
    # runs the student under torch.compile.
    speedups: list[str] = field(default_factory=list, metadata={"choices": ("compile",) + SPEEDUPS})
    # Where the student starts (trainer/init.py): rtn (the base, fake-quantized), a PTQ method (gptq, rotate+gptq,
    # aqlm ...; run first on the training text or ptq.calib_data) or a folder of distqat ptq / distqat train.
    init: str = "rtn"
    # > 0: before distillation each decoder block trains this many steps to reproduce the full-precision block
    # (EfficientQAT's Block-AP) on blockwise_samples x blockwise_seq_len training tokens, some held out; 0: none.
    blockwise_steps: int = field(default=0, metadata={"range": (0, 1 << 30)})
    blockwise_lr: float = field(default=1e-4, metadata={"range": (0.0, 1.0)})
    blockwise_quantizer_lr: float = field(default=1e-3, metadata={"range": (0.0, 1.0)})
    blockwise_samples: int = field(default=64, metadata={"range": (2, 1 << 24)})
    blockwise_seq_len: int = field(default=256, metadata={"range": (8, 1 << 20)})
    blockwise_batch_size: int = field(default=4, metadata={"range": (1, 1 << 16)})
    blockwise_held_out: int = field(default=4, metadata={"range": (1, 1 << 16)})


@dataclass
class DistributedConfig:
    strategy: str = field(default="auto", metadata={"choices": ("auto", "deepspeed", "ddp", "single")})
    zero_stage: int = field(default=2, metadata={"choices": (2, 3)})
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class EvalConfig:
    split: str = field(default="test", metadata={"choices": ("train", "test", "calib")})
    max_tokens: int = field(default=8192, metadata={"range": (1, 1 << 40)})
    seq_len: int = field(default=1024, metadata={"range": (8, 1 << 20)})
    batch_size: int = field(default=1, metadata={"range": (1, 1 << 16)})  # windows; for eval.tasks, requests
    # What to score: "fp" (the model as loaded) and/or "quant" (fake-quantized with the quant section).
    compare: list[str] = field(default_factory=lambda: ["fp", "quant"])
    plot: bool = True
    # lm-evaluation-harness tasks scored on each model besides perplexity (the extra: pip install
    # 'distqat[eval]'), e.g. [arc_easy,hellaswag]: names lm_eval knows or the task YAMLs in task_dir define.
    # Offline, a task's data must be local (a task YAML with dataset_path: json) or in the datasets cache.
    tasks: list[str] = field(default_factory=list)
    task_dir: Optional[str] = None  # a folder of task YAMLs (lm_eval's include_path)
    task_limit: Optional[int] = field(default=None, metadata={"range": (1, 1 << 40)})  # examples per task; None: all
    num_fewshot: Optional[int] = field(default=None, metadata={"range": (0, 1 << 10)})  # None: each task's own


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/${name}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantSpec = field(default_factory=QuantSpec)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
