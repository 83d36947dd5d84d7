"""GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback.

H = 2/n X^T X from the calibration inputs of the layer; damping adds `damp` * mean(diag H) to the
diagonal; columns are processed in blocks of `block_size` with lazy updates of the rest of the
matrix; `act_order` visits columns by decreasing diag(H). With groups, `static_groups` (always on
with act_order, so the groups stay contiguous and the result packs) takes each group's scale from
the weight before any update; otherwise a group's scale is computed when GPTQ reaches it. `clip` picks
each row's (group's) scale by the clipping search of `scale_method=mse` instead of its min/max, as the GPTQ
reference's `mse` quantizer and QuaRot's `w_clip` do. fp4 (NVFP4, MXFP4) rounds each column onto e2m1 times its
block's scale, the scales and their search in block-scale space from `fp4grid.py`.

The loop runs over the rows of the transposed weight with a few in-place tensor operations per column, the update
operator comes from one Cholesky factorization and a triangular inverse, and the clipping search evaluates all its
shrink factors at once (`gptq_clip.py`): on the bundled model's projections about 3x faster on one CPU thread than
the straightforward version (tests/helpers/gptq_ref.py, which gives the same codes in float64; bench/gptq_speed.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Optional

import torch

from ..fp4 import fp4_codes, fp4_round
from ..quantizers import NF4_LEVELS
from ..spec import QuantSpec, TensorSpec
from .config import GPTQConfig
from .fp4grid import is_fp4, tensor_exponent
from .gptq_clip import clip_qparams
from .grid import qparams
from .parts import Rounded, Rounding

# Columns per inner lazy-update block (measured on the bundled model's shapes, one CPU thread: 16 beats 8 and 32).
SUB_BLOCK = 16


@torch.no_grad()
def damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, GPTQ's column-update operator (H damped in
    place).

    With J the order-reversing permutation and M the lower Cholesky factor of J H J, U = J M^-1 J is upper
    triangular with a positive diagonal and U^T U = J M^-T M^-1 J = H^-1: that factor, from one factorization and
    one triangular inverse, where the reference's Cholesky, inverse and second Cholesky take twice the arithmetic.
    """
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        M = torch.linalg.cholesky(H.flip(0, 1))
    except RuntimeError as e:
        raise ValueError(f"gptq: the damped Hessian is not positive definite ({e}); raise ptq.gptq.damp") from None
    return _lower_inverse(M).flip(0, 1)


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """The inverse of a lower-triangular L, by halves ([[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]) so
    that most of its arithmetic is matrix products."""
    n = L.shape[0]
    if n <= 256:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    k = n // 2
    out = torch.zeros_like(L)
    out[:k, :k] = a_inv = _lower_inverse(L[:k, :k])
    out[k:, k:] = c_inv = _lower_inverse(L[k:, k:])
    torch.matmul(c_inv, L[k:, :k] @ a_inv, out=out[k:, :k])
    out[k:, :k].neg_()
    return out


def _qparams(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype],
             nvfp4_exp: Optional[torch.Tensor] = None):
    """`grid.qparams`, the clipping search of integer and nf4 grids vectorized over its shrink factors (the same
    choice, `gptq_clip.py`)."""
    if spec.scale_method == "mse" and spec.format in ("int", "nf4"):
        return clip_qparams(rows, spec, scale_dtype)
    return qparams(rows, spec, scale_dtype, nvfp4_exp)


def _round_column(w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: TensorSpec,
                  levels: Optional[torch.Tensor], c: torch.Tensor, q: torch.Tensor) -> None:
    """One column onto its grid, written in place: its codes into c (integer codes, nf4 indices or e2m1 values, in
    w's dtype) and its dequantized values into q."""
    if is_fp4(spec):
        c.copy_(fp4_round(w / s))
        torch.mul(c, s, out=q)
    elif levels is not None:
        idx = (w / s).unsqueeze(-1).sub(levels).abs().argmin(-1)
        c.copy_(idx)
        torch.mul(levels[idx], s, out=q)
    else:
        torch.div(w, s, out=c).round_()
        if z is not None:
            c.add_(z)
        c.clamp_(spec.qmin, spec.qmax)
        if z is not None:
            torch.sub(c, z, out=q).mul_(s)
        else:
            torch.mul(c, s, out=q)


@torch.no_grad()
def gptq(
    w: torch.Tensor, h: torch.Tensor, spec: TensorSpec, damp: float = 0.01, block_size: int = 128,
    act_order: bool = False, static_groups: bool = True, scale_dtype: Optional[torch.dtype] = None,
    nvfp4_exp: Optional[torch.Tensor] = None,
):
    """GPTQ of one weight (out, in) with Hessian h (in, in).

    Returns (dequantized weight, int32 codes or None, scale rows, zero rows or None), the scale/zero
    rows laid out as `weight_rows` of the spec (what WeightQuantizer stores). fp4 columns round onto e2m1 times
    their block's scale; every NVFP4 block scale is over one tensor scale 2^nvfp4_exp (None: from this weight
    before any update), groups computed as GPTQ reaches them (static_groups=False) included.
    """
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
    dynamic = gran == "group" and not (act_order or static_groups)  # a group's scale when GPTQ reaches it
    if gran == "tensor":
        s, z = _qparams(W.reshape(1, -1), spec, scale_dtype)
        S, Z = s.expand(n_out, 1), None if z is None else z.expand(n_out, 1)
        tensor_qparams = (s.float(), None if z is None else z.float())
    elif gran == "channel":
        S, Z = _qparams(W, spec, scale_dtype)
    elif not dynamic:
        s, z = _qparams(W.reshape(-1, gs), spec, scale_dtype, nvfp4_exp)
        S, Z = s.reshape(n_out, -1), None if z is None else z.reshape(n_out, -1)
    else:
        S = torch.zeros(n_out, n_in // gs, dtype=torch.float32, device=W.device)
        Z = None if spec.symmetric else torch.zeros_like(S)
        block_size = max(1, block_size // gs) * gs  # keep every group inside one block

    perm = None
    if act_order:  # index_select: the values of W[:, perm] and H[perm][:, perm], several times faster
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W.index_select(1, perm), H.index_select(0, perm).index_select(1, perm)
    Hinv = damped_inverse_cholesky(H, damp)

    # Column j (in visiting order) is row j of these (in, out) matrices: contiguous, so each column's rounding and
    # the updates of the columns after it run over contiguous memory, and every column's scale is one row.
    WT = W.T.contiguous()
    if dynamic:
        ST = torch.empty_like(WT)
        ZT = None if Z is None else torch.empty_like(WT)
    else:
        col = torch.arange(n_in, device=W.device) if perm is None else perm
        group = col // gs if gran == "group" else torch.zeros_like(col)
        ST = S.T.to(dt).contiguous().index_select(0, group)
        ZT = None if Z is None else Z.T.to(dt).contiguous().index_select(0, group)

    def group_qparams(j: int, rows: torch.Tensor) -> None:
        """Group j // gs's scale (and zero) from its columns as GPTQ reaches them."""
        s, z = _qparams(rows.T, spec, scale_dtype, nvfp4_exp)
        k = j // gs
        S[:, k : k + 1] = s
        ST[j : j + gs] = s.to(dt).reshape(1, -1)
        if z is not None:
            Z[:, k : k + 1] = z
            ZT[j : j + gs] = z.to(dt).reshape(1, -1)

    QT, CT = _columns(WT, Hinv, ST, ZT, spec, block_size, gs if dynamic else None, group_qparams)
    if perm is not None:
        inv = torch.argsort(perm)
        QT, CT = QT.index_select(0, inv), CT.index_select(0, inv)
    Q = QT.T.contiguous()
    codes = (fp4_codes(CT) if fp4 else CT.to(torch.int32)).T.contiguous()
    if gran == "tensor":
        return Q, codes, *tensor_qparams
    return Q, codes, S.reshape(-1, 1).float(), None if Z is None else Z.reshape(-1, 1).float()


def _columns(WT: torch.Tensor, Hinv: torch.Tensor, ST: torch.Tensor, ZT: Optional[torch.Tensor], spec: TensorSpec,
             block_size: int, dynamic_gs: Optional[int], group_qparams) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop over the columns of WT (in visiting order, one per row; updated in place), each rounded onto the
    scale row ST[j] (and zero row ZT[j]). dynamic_gs: groups of that many columns whose scales
    `group_qparams(j, rows)` fills in when the loop reaches their first column j. Returns the rows of
    (dequantized weight, codes in WT's dtype)."""
    n_in, n_out = WT.shape
    QT, CT = torch.empty_like(WT), torch.empty_like(WT)  # fp4 keeps e2m1 values, packed into nibbles at the end
    ET = torch.empty(min(block_size, n_in), n_out, dtype=WT.dtype, device=WT.device)
    levels = NF4_LEVELS.to(WT.device, WT.dtype) if spec.format == "nf4" else None
    # Views made once: indexing a tensor costs a few microseconds, indexing a list of its rows nothing.
    w_rows, q_rows, c_rows, s_rows = WT.unbind(0), QT.unbind(0), CT.unbind(0), ST.unbind(0)
    z_rows = None if ZT is None else ZT.unbind(0)
    h_rows = Hinv.unbind(0)
    diag = Hinv.diagonal().clone().reshape(-1, 1).unbind(0)  # (1,)-tensors: a Python float divides slower
    e_rows = ET.unbind(0)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, Hinv1, E1 = WT[i1:i2], Hinv[i1:i2, i1:i2], ET[: i2 - i1]
        # The block's own updates are lazy too, in sub-blocks of SUB_BLOCK columns: each column's rank-1 update
        # reaches only the rest of its sub-block, and one matrix product per sub-block the rest of the block.
        a = i1
        while a < i2:
            b = min(a + SUB_BLOCK, i2)
            if dynamic_gs:  # a group starts a sub-block, so its columns have every earlier column's update
                b = min(b, (a // dynamic_gs + 1) * dynamic_gs)
            for j in range(a, b):
                if dynamic_gs and j % dynamic_gs == 0:
                    group_qparams(j, WT[j : j + dynamic_gs])
                wj, qj, e = w_rows[j], q_rows[j], e_rows[j - i1]
                _round_column(wj, s_rows[j], None if z_rows is None else z_rows[j], spec, levels, c_rows[j], qj)
                torch.sub(wj, qj, out=e).div_(diag[j])
                if j + 1 < b:
                    WT[j + 1 : b].addr_(h_rows[j][j + 1 : b], e, alpha=-1)
            if b < i2:
                W1[b - i1 :].addmm_(Hinv1[a - i1 : b - i1, b - i1 :].T, E1[a - i1 : b - i1], alpha=-1)
            a = b
        if i2 < n_in:
            WT[i2:].addmm_(Hinv[i1:i2, i2:].T, E1, alpha=-1)
    return QT, CT


class GPTQ(Rounding):
    name: ClassVar[str] = "gptq"
    handles_experts: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True

    def __init__(self, cfg: GPTQConfig) -> None:
        self.cfg = cfg
        self.sequential = cfg.true_sequential
        self.moe_min_tokens_per_column = cfg.moe_min_tokens_per_column

    def check(self, spec: QuantSpec) -> None:
        if spec.weight is not None and spec.weight.format == "fp8":
            raise ValueError("ptq.method=gptq rounds onto an integer, nf4 or fp4 grid; fp8 weights take rtn")

    def round(self, weight: torch.Tensor, spec: TensorSpec, h: Optional[torch.Tensor],
              nvfp4_exp: Optional[torch.Tensor] = None) -> Rounded:
        c = self.cfg
        if c.clip and spec.scale_method == "minmax":  # a scale method the user chose is kept
            spec = replace(spec, scale_method="mse")
        return gptq(weight, h, spec, c.damp, c.block_size, c.act_order, c.static_groups, weight.dtype, nvfp4_exp)


def _grid_columns(t: Optional[torch.Tensor], spec: TensorSpec, n_out: int, n_in: int) -> Optional[torch.Tensor]:
    """Scale or zero rows laid out as `weight_rows` of the spec -> (n_out, groups): column j reads group j // gs."""
    if t is None:
        return None
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(n_out, 1)
    if spec.granularity == "channel":
        return t.reshape(n_out, 1)
    return t.reshape(n_out, n_in // spec.group_size)


@torch.no_grad()
def gptq_on_grid(
    w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec,
    damp: float = 0.01, block_size: int = 128, act_order: bool = False,
    fixed: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column-by-column rounding with error feedback onto a grid that is given, not chosen: `scale` (and
    the unsigned `zero`) as `weight_rows` of the spec lays them out, e.g. a packed base's own grid, so that only
    the codes move. `fixed` = (codes, mask), both (out, in): where mask is true the code is `codes` whatever the
    updated weight rounds to (its rounding error is still fed forward). Integer and nf4 grids.

    Returns (dequantized weight, int32 codes), in w's shape; a weight already on the grid comes back unchanged.
    """
    if spec.format not in ("int", "nf4"):
        raise ValueError(f"gptq_on_grid rounds onto an integer or nf4 grid, not {spec.format}")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dt).clone()
    H = h.detach().to(dt).clone()
    n_out, n_in = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # an input that never fires carries no error forward; its weight still rounds (kept as is)
    S = _grid_columns(scale.detach(), spec, n_out, n_in).to(dt)
    Z = _grid_columns(None if zero is None else zero.detach(), spec, n_out, n_in)
    Z = None if Z is None else Z.to(dt)
    gs = spec.group_size if spec.granularity == "group" else n_in
    cols = list(range(n_in))
    if act_order:  # the grid is fixed, so visiting columns out of order needs no static groups
        cols = torch.argsort(torch.diag(H), descending=True).tolist()
    perm = torch.tensor(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    if fixed is not None:
        fixed = (fixed[0][:, perm], fixed[1][:, perm])
    Hinv = damped_inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.int32, device=W.device)
    levels = NF4_LEVELS.to(W.device, dt) if spec.format == "nf4" else None
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(n_out, i2 - i1, dtype=dt, device=W.device), \
            Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = 0 if S.shape[1] == 1 else cols[i1 + i] // gs
            s = S[:, k]
            if levels is not None:
                c = (W1[:, i] / s).unsqueeze(-1).sub(levels).abs().argmin(-1)
            else:
                c = torch.clamp(torch.round(W1[:, i] / s) + (0 if Z is None else Z[:, k]), spec.qmin, spec.qmax)
            if fixed is not None:
                c = torch.where(fixed[1][:, i1 + i], fixed[0][:, i1 + i].to(c.dtype), c)
            q = levels[c.long()] * s if levels is not None else (c - (0 if Z is None else Z[:, k])) * s
            Q[:, i1 + i], codes[:, i1 + i] = q, c.to(torch.int32)
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].to(w.dtype), codes[:, inv]
