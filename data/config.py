"""The `generate` config section, apart from the generator so the run-config schema imports no heavy modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qat.options import setting


@dataclass
class GenerateConfig:
    n_samples: int = setting(1024, range=(1, 1 << 40), help="samples the teacher writes")
    max_length: int = setting(1024, range=(6, 1 << 20), help="tokens per sample, all in")
    batch_size: int = setting(32, range=(1, 1 << 16), help="samples generated at once")
    shard_size: int = setting(256, range=(1, 1 << 30), help="samples per shard file")
    first_token: str = setting("sample", choices=("sample", "word", "enumerate"),
                               help="each sample's first token: uniform over the vocabulary (LLM-QAT), over the "
                               "entries that spell a capitalised word (' The', 'Paris': samples open as prose), or "
                               "in id order")
    greedy_lengths: list[int] = setting(factory=lambda: [3, 4, 5], help="LLM-QAT's hybrid sampling: the first "
                                        "tokens picked greedily, one length per sample in turn; the rest sampled")
    temperature: float = setting(1.0, range=(1e-4, 100.0), help="sampling temperature")
    top_k: int = setting(0, range=(0, 1 << 30), help="sample from the k likeliest tokens; 0: the full softmax")
    top_p: float = setting(1.0, range=(1e-6, 1.0), help="nucleus sampling's probability mass")
    on_eos: str = setting("stop", choices=("stop", "continue"), help="a sample that writes EOS ends there, or "
                          "goes on past it")
    chat_template: bool = setting(False, help="samples start as an assistant turn of the teacher's chat template")
    out_dir: Optional[str] = setting(None, help="where the shards go; null: <output_dir>/generated")
    # "always"/"never" rather than on/off, which YAML reads as booleans
    compile: str = setting("auto", choices=("auto", "always", "never"), help="CUDA graphs for decode (auto: on "
                           "CUDA only)")
    progress_every_s: float = setting(30.0, range=(0.0, 86400.0), help="where stderr is not a terminal (a log): "
                                      "seconds between progress lines, instead of a progress bar")
