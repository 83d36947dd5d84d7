"""The `generate` config section, apart from the generator so the run-config schema imports no heavy modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class GenerateConfig:
    n_samples: int = field(default=1024, metadata={"range": (1, 1 << 40)})
    max_length: int = field(default=1024, metadata={"range": (6, 1 << 20)})  # tokens per sample, all in
    batch_size: int = field(default=32, metadata={"range": (1, 1 << 16)})
    shard_size: int = field(default=256, metadata={"range": (1, 1 << 30)})  # samples per shard file
    # sample: uniform over the vocabulary (LLM-QAT); word: uniform over the entries that spell a capitalised word
    # (" The", "Paris"), so samples open as prose rather than mid-word or in code; enumerate: id order
    first_token: str = field(default="sample", metadata={"choices": ("sample", "word", "enumerate")})
    greedy_lengths: list[int] = field(default_factory=lambda: [3, 4, 5])
    temperature: float = field(default=1.0, metadata={"range": (1e-4, 100.0)})
    top_k: int = field(default=0, metadata={"range": (0, 1 << 30)})  # 0: the full softmax
    top_p: float = field(default=1.0, metadata={"range": (1e-6, 1.0)})
    on_eos: str = field(default="stop", metadata={"choices": ("stop", "continue")})
    chat_template: bool = False  # samples start as an assistant turn of the teacher's chat template
    out_dir: Optional[str] = None  # default: <output_dir>/generated
    # CUDA graphs for decode: auto on CUDA only; "always"/"never" rather than on/off, which YAML reads as booleans
    compile: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})
    # Where stderr is not a terminal (a log): seconds between progress lines, instead of a progress bar.
    progress_every_s: float = field(default=30.0, metadata={"range": (0.0, 86400.0)})
