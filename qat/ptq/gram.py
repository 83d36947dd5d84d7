"""X^T X, the Hessian GPTQ and AWQ's statistics are built from, with half the arithmetic of one matrix product.

X^T X is symmetric, so only the blocks on and above the diagonal are multiplied (a column split into k chunks takes
k(k+1)/2 of the k^2 block products) and the lower triangle is copied from the upper once the sum is complete. Each
block is a product of the same columns the full product would multiply; on the bundled model's widths (576, 1536)
at one CPU thread it takes 0.6-0.85x the time of the full product (bench/hessian.py).
"""

from __future__ import annotations

import torch

CHUNK = 192  # columns per block; edges on multiples of 64, and at most MAX_CHUNKS blocks a side
MAX_CHUNKS = 8  # bounds the number of kernel launches per batch on a GPU at large widths


def edges(width: int) -> list[int]:
    """The column edges of the blocks for a Hessian of this width."""
    k = min(MAX_CHUNKS, max(1, -(-width // CHUNK)))
    step = -(-width // (64 * k)) * 64
    return sorted({min(width, i * step) for i in range(k)} | {width})


def add_upper_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h[i, j] += (x^T x)[i, j] for the blocks on and above the diagonal; `symmetrize` completes h afterwards."""
    e = edges(x.shape[-1])
    for i in range(len(e) - 1):
        xi = x[:, e[i] : e[i + 1]]
        for j in range(i, len(e) - 1):
            h[e[i] : e[i + 1], e[j] : e[j + 1]].addmm_(xi.T, x[:, e[j] : e[j + 1]])


def symmetrize(h: torch.Tensor) -> torch.Tensor:
    """h with its lower triangle (below the diagonal blocks `add_upper_gram` fills) copied from its upper, in place."""
    low = torch.ones_like(h, dtype=torch.bool).tril_(-1)
    h[low] = h.T[low]
    return h


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of an (n, c) x."""
    h = torch.zeros(x.shape[-1], x.shape[-1], dtype=x.dtype, device=x.device)
    add_upper_gram(h, x)
    return symmetrize(h)
