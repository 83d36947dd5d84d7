"""What several benchmarks share: the model shapes they build at random init, and GPU warm-up."""

from __future__ import annotations

import argparse
import time

import torch

# Random-init shapes (speed does not depend on the weights, so no model files are needed).
SHAPES = {
    # The bundled model's shape (576-wide: groups of 64).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama-3.2-1B's shape.
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def heat(seconds: float) -> None:
    """Run bf16 matmuls for a while first: an H100's clocks settle lower once it is warm, which else
    favours whatever is timed first."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def model_shapes(text: str) -> list[str]:
    """--shapes of model names (argparse type): each one of SHAPES, or a usage error naming the bad one."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown shape {bad[0] if bad else text!r}; use one of {sorted(SHAPES)}")
    return names


def matrix_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes of matrices "<in>x<out>,..." (argparse type), or a usage error naming the malformed one."""
    out = []
    for s in [s.strip() for s in text.split(",") if s.strip()]:
        parts = s.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{s!r} is not <in_features>x<out_features>, e.g. 4096x11008")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise argparse.ArgumentTypeError("give at least one <in_features>x<out_features> shape")
    return out
