"""What several benchmarks share: the model shapes they build at random init, and GPU warm-up."""

from __future__ import annotations

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
