"""Hadamard matrices, the orthogonal rotations built from them, and applying one to a tensor's last dimension.

`hadamard(n)` builds a +-1 matrix of order n from Kronecker factors: powers of two (Sylvester) and Paley orders
p + 1 with p a prime = 3 mod 4 (the bundled model's 576 = 12 * 12 * 4, its MLP's 1536 = 12 * 128). `orthogonal`
gives the random-sign Hadamard (or Haar-random) matrix the folded rotations (qat.ptq.rotate's R1/R2) use.

`Rotation` is an online rotation (QuaRot/SpinQuant's R3 and R4): x -> x R with R = kron(I_{n/b}, H_b) / sqrt(b), a
full Hadamard when b = n. It is applied factor by factor (x viewed as (..., n/b, f1, f2, ...), one small matmul per
Kronecker factor), so a 1536-wide R costs (12 + 128) multiply-adds a feature rather than 1536.

Precision: `Rotation.__call__` computes in float32 (float64 for a float64 input) with the factors cast to it, and
rounds the result once to the input's dtype. A bf16 activation is then rounded once after the whole turn, not after
each factor. Every path that turns an activation (the QAT fake-quant forward, PTQ's calibration, the converted
runtime's IntLinear, the integer KV cache) calls this one function, so the converted model and its int cache compute
the numbers the fake-quant model computed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

ORTHOGONAL_KINDS = ("hadamard", "random")  # qat.ptq.config.ROTATE_KINDS, which cannot import torch


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, int(n**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)[diff]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi
    return torch.eye(q + 1, dtype=torch.float64) + s


@lru_cache(maxsize=8)
def _hadamard_factors(n: int) -> Optional[tuple[int, ...]]:
    """Orders whose Kronecker product is n: powers of two (Sylvester) and Paley orders p + 1; None if none fit."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return (n,)
    for m in range(4, n + 1, 4):
        if n % m == 0 and m & (m - 1) and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = _hadamard_factors(n // m)
            if rest is not None:
                return (m, *rest)
    return None


def _factor(m: int) -> torch.Tensor:
    if m & (m - 1) == 0:
        f = torch.ones(1, 1, dtype=torch.float64)
        while f.shape[0] < m:
            f = torch.cat([torch.cat([f, f], 1), torch.cat([f, -f], 1)], 0)
        return f
    return _paley(m - 1)


def hadamard(n: int) -> torch.Tensor:
    """An n x n matrix of +-1 with H H^T = n I (float64); ValueError for an order this construction lacks."""
    factors = _hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} here (products of 2^k and p + 1, p a prime = 3 mod 4); "
                         "use ptq.rotate.kind=random")
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        h = torch.kron(h, _factor(m))
    return h


def block_hadamard(n: int, block: int) -> torch.Tensor:
    """kron(I_{n/block}, H_block) / sqrt(block), orthogonal (float64); block = n gives the full normalised H."""
    return Rotation(n, block).matrix()


def orthogonal(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """An n x n orthogonal matrix (float64): a Hadamard matrix with random signs on its rows, or Haar-random."""
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return signs[:, None] * hadamard(n) / n**0.5
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]  # Haar: fix QR's sign ambiguity
    raise ValueError(f"ptq.rotate.kind={kind!r}: use one of {ORTHOGONAL_KINDS}")


def hadamard_orders(n: int) -> list[int]:
    """The block sizes b dividing n with a Hadamard matrix here (n itself included when it has one)."""
    return [b for b in range(1, n + 1) if n % b == 0 and _hadamard_factors(b) is not None]


class Rotation:
    """x -> x R on the last dimension, R = kron(I_{n/block}, H_block) / sqrt(block) (block 0 or n: one Hadamard of
    order n). Orthogonal (x R R^T = x); symmetric only when every factor is a Sylvester order (a power of two)."""

    def __init__(self, n: int, block: int = 0, what: str = "ptq.rotate.online_block", fix: str = "") -> None:
        b = block or n
        if not fix and (b < 1 or n % b or _hadamard_factors(b) is None):
            fix = f"set {what} to a block size with one ({', '.join(map(str, hadamard_orders(n)[-6:]))})"
        if b < 1 or n % b:
            raise ValueError(f"{what}={block}: a block must divide the width {n}; {fix}")
        if _hadamard_factors(b) is None:
            raise ValueError(f"{what}={block}: no Hadamard matrix of order {b} here (products of 2^k and p + 1, p a "
                             f"prime = 3 mod 4) for width {n}; {fix}")
        factors = _hadamard_factors(b)
        self.n, self.block = n, b
        self.factors = [_factor(m) / math.sqrt(m) for m in factors]  # float64, each orthogonal
        self._cast: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}

    def key(self) -> tuple[int, int]:
        return self.n, self.block

    def matrix(self) -> torch.Tensor:
        """R as a dense float64 matrix (for folding R's inverse into a weight, and for tests)."""
        h = torch.ones(1, 1, dtype=torch.float64)
        for f in self.factors:
            h = torch.kron(h, f)
        return torch.kron(torch.eye(self.n // self.block, dtype=torch.float64), h)

    def _factors(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        k = (device, dtype)
        if k not in self._cast:
            self._cast[k] = [f.to(device, dtype) for f in self.factors]
        return self._cast[k]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"a rotation of width {self.n} got a tensor of shape {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        fs = self._factors(x.device, dtype)
        y = x.to(dtype)
        sizes = [f.shape[0] for f in fs]
        for i, f in enumerate(fs):
            post = math.prod(sizes[i + 1:])
            if post == 1:  # the last factor: a plain matmul on (rows, f)
                y = y.reshape(-1, sizes[i]) @ f
            else:  # (A kron B) turns x viewed as (a, b) into A^T x B: this factor acts on the middle axis
                y = torch.matmul(f.T, y.reshape(-1, sizes[i], post))
        return y.reshape(x.shape).to(x.dtype)

    def __repr__(self) -> str:
        return f"Rotation(n={self.n}, block={self.block}, factors={[f.shape[0] for f in self.factors]})"
