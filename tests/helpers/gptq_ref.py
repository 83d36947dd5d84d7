"""GPTQ as qat/ptq/gptq.py computed it before it was made faster (column by column in the weight's own layout, the
clipping search as `mse_qparams`' loop over its shrink factors): the reference tests/test_gptq_speed.py holds the
fast path to."""

from __future__ import annotations

from typing import Optional

import torch

from qat.fp4 import fp4_codes, fp4_round
from qat.ptq.fp4grid import is_fp4, tensor_exponent
from qat.ptq.gptq import damped_inverse_cholesky
from qat.ptq.grid import qparams
from qat.quantizers import NF4_LEVELS
from qat.spec import TensorSpec


@torch.no_grad()
def gptq_reference(
    w: torch.Tensor, h: torch.Tensor, spec: TensorSpec, damp: float = 0.01, block_size: int = 128,
    act_order: bool = False, static_groups: bool = True, scale_dtype: Optional[torch.dtype] = None,
    nvfp4_exp: Optional[torch.Tensor] = None,
):
    """The previous `qat.ptq.gptq.gptq`, line for line."""
    if spec.format == "fp8":
        raise ValueError("gptq rounds onto an integer, nf4 or fp4 grid; fp8 weights take rtn")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dt).clone()
    H = h.detach().to(dt).clone()
    n_out, n_in = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    gran, gs = spec.granularity, spec.group_size
    fp4 = is_fp4(spec)
    if spec.format == "nvfp4" and nvfp4_exp is None:
        nvfp4_exp = tensor_exponent(W.reshape(-1, gs))
    S = Z = None
    if gran == "tensor":
        s, z = qparams(W.reshape(1, -1), spec, scale_dtype)
        S, Z = s.expand(n_out, 1), None if z is None else z.expand(n_out, 1)
        tensor_qparams = (s.float(), None if z is None else z.float())
    elif gran == "channel":
        S, Z = qparams(W, spec, scale_dtype)
    else:
        if act_order or static_groups:
            s, z = qparams(W.reshape(-1, gs), spec, scale_dtype, nvfp4_exp)
            S, Z = s.reshape(n_out, -1), None if z is None else z.reshape(n_out, -1)
        else:
            ng = n_in // gs
            S = torch.zeros(n_out, ng, dtype=torch.float32, device=W.device)
            Z = None if spec.symmetric else torch.zeros_like(S)
            block_size = max(1, block_size // gs) * gs  # keep every group inside one block

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = damped_inverse_cholesky(H, damp)

    Q = torch.zeros_like(W)
    # fp4 keeps each column's e2m1 values (in W's dtype) and packs them into nibbles once at the end
    codes = torch.zeros(W.shape, dtype=dt if fp4 else torch.int32, device=W.device)
    cols = perm.tolist() if perm is not None else range(n_in)
    cols = list(cols)
    Sf = S.to(dt)
    Zf = None if Z is None else Z.to(dt)
    qmin, qmax = spec.qmin, spec.qmax
    nf4 = spec.format == "nf4"
    if nf4:
        levels = NF4_LEVELS.to(W.device, dt)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            k = 0 if gran != "group" else col // gs
            if gran == "group" and not (act_order or static_groups) and col % gs == 0:
                s, z = qparams(W1[:, i : i + gs], spec, scale_dtype, nvfp4_exp)
                S[:, k : k + 1] = s
                Sf[:, k : k + 1] = s.to(dt)
                if z is not None:
                    Z[:, k : k + 1] = z
                    Zf[:, k : k + 1] = z.to(dt)
            wcol = W1[:, i]
            s = Sf[:, k]
            if fp4:
                y = fp4_round(wcol / s)
                c, q = y, y * s
            elif nf4:
                c = (wcol / s).unsqueeze(-1).sub(levels).abs().argmin(-1)
                q = levels[c] * s
            else:
                z = 0 if Zf is None else Zf[:, k]
                c = torch.clamp(torch.round(wcol / s) + z, qmin, qmax)
                q = (c - z) * s
            Q[:, i1 + i] = q
            codes[:, i1 + i] = c.to(codes.dtype)
            err = (wcol - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if fp4:
        codes = fp4_codes(codes)
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]
    if gran == "tensor":
        return Q, codes, *tensor_qparams
    return Q, codes, S.reshape(-1, 1).float(), None if Z is None else Z.reshape(-1, 1).float()

