"""PackedLinear: the frozen base of QLoRA-style finetuning (`qat.qlora`), a linear held as integer codes.

The codes, scales and zero points are those `convert` writes (an `IntLinear` layout: 2-8 bit codes packed
into int32 words, 8-bit codes as int8, group or channel scales, optional zero points), or NF4 indices
with group scales, optionally double-quantized to int8 as in the QLoRA paper. Forward dequantizes the
weight for one matmul; backward dequantizes it again for the input gradient (`_PackedMatmul`), a tile of at
most TILE_ELEMENTS weights at a time, so no weight-sized tensor outlives the matmul that needed it, and a large
layer's dequantized weight never exists whole. The weight of a frozen fake-quant `QuantLinear`
would stay in memory next to its quantized copy.

The buffers are not persistent: a checkpoint of a QLoRA run holds its adapters and a fingerprint of the
base (`qat.qlora.base.fingerprint`), never the base, which is rebuilt from its folder.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..device import device_path
from ..linear import QuantLinear
from ..quantizers import NF4_LEVELS, ActQuantizer, quantize_codes, weight_rows
from ..spec import TensorSpec
from . import ops
from .int_linear import IntLinear
from .pack import pack_int32, unpack_int32

DQ_BLOCK = 256  # group scales per second-level scale in double quantization (the QLoRA paper's)
TILE_ELEMENTS = 1 << 22  # weights dequantized at once by a matmul of the packed base: 8 MB in bf16


class _PackedMatmul(torch.autograd.Function):
    """y = x @ W^T + b with W dequantized in forward and again in backward, a tile of at most TILE_ELEMENTS
    weights at a time; nothing weight-sized is saved or, for a layer of more than one tile, ever held.

    Forward tiles W by output rows, backward (grad_x = grad @ W) by input columns whole groups at a time: either
    way each output element is one dot product over the whole reduction, as with the untiled weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        x = x.to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        n, step = layer.out_features, layer.tile_rows()
        if step >= n:
            return F.linear(x, layer.dequantized_weight(dtype), bias)
        y = x.new_empty(*x.shape[:-1], n)
        for r in range(0, n, step):
            rows = slice(r, min(r + step, n))
            y[..., rows] = F.linear(x, layer.dequantized_weight(dtype, rows=rows), None if bias is None else bias[rows])
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer, dtype = ctx.layer, ctx.dtype
        grad = grad.to(dtype)
        k, step = layer.in_features, layer.tile_cols()
        if step >= k:
            return (grad @ layer.dequantized_weight(dtype)).to(ctx.x_dtype), None, None
        out = grad.new_empty(*grad.shape[:-1], k, dtype=ctx.x_dtype)
        for c in range(0, k, step):
            c1 = min(c + step, k)
            out[..., c:c1] = grad @ layer.dequantized_weight(dtype, cols=(c, c1))
        return out, None, None


def _nonpersistent(module: nn.Module, name: str) -> None:
    module.register_buffer(name, module._buffers.pop(name), persistent=False)



_TABLES: dict[tuple, torch.Tensor] = {}  # by (kind, bits, dtype, device): 1 MB for 4-bit codes in fp32


def _code_values(codes: torch.Tensor, kind: str, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned codes as values: NF4 levels ("nf4"), codes less 2**(bits - 1) ("centered") or as they are ("raw")."""
    if kind == "nf4":
        return NF4_LEVELS.to(codes.device, dtype)[codes.long()]
    return (codes.long() - (1 << (bits - 1)) if kind == "centered" else codes).to(dtype)


def _decode_table(kind: str, bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(65536, 16 // bits) values (`_code_values`) of the codes in each 16-bit unsigned chunk of a packed stream,
    lowest bits first."""
    key = (kind, bits, dtype, device)
    if key not in _TABLES:
        chunk = torch.arange(1 << 16, device=device)
        codes = torch.stack([(chunk >> (bits * j)) & ((1 << bits) - 1) for j in range(16 // bits)], dim=-1)
        _TABLES[key] = _code_values(codes, kind, bits, dtype)
    return _TABLES[key]


def decode_packed(qweight: torch.Tensor, bits: int, k: int, dtype: torch.dtype, kind: str = "raw") -> torch.Tensor:
    """(rows, k) values (`_code_values`) of packed codes in `dtype`, a new tensor.

    On a little-endian host the words' 16-bit halves are the code stream in order, so for 1/2/4-bit codes one
    lookup per half decodes 16 // bits codes: a single pass that writes the values, where shifting, masking,
    widening and centring took four (this runs three times a training step under checkpointing)."""
    if sys.byteorder != "little" or bits not in (1, 2, 4):
        return _code_values(unpack_int32(qweight, bits, k), kind, bits, dtype)
    chunks = qweight.contiguous().view(torch.uint16).to(torch.int32)
    values = F.embedding(chunks, _decode_table(kind, bits, dtype, qweight.device)).view(qweight.shape[0], -1)
    return values if values.shape[1] == k else values[:, :k].contiguous()


def nf4_levels(qweight: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 levels of packed indices, (rows, k) in `dtype`."""
    return decode_packed(qweight, 4, k, dtype, "nf4")


class PackedLinear(IntLinear):
    """A frozen linear stored as integer codes (or NF4 indices) and dequantized on the fly; trainable inputs.

    It computes exactly what the fake-quant `QuantLinear` it was packed from computes: the same codes times
    the same scales in fp32, cast to the compute dtype, then the same matmul (int formats; NF4 up to the
    fp32 rounding of the fake-quant STE expression, and exactly levels x scales against its own reference).
    """

    def __init__(
        self, in_features: int, out_features: int, weight_spec: TensorSpec, act_spec: Optional[TensorSpec],
        bias: bool, dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None,
    ) -> None:
        self.nf4 = weight_spec.format == "nf4"
        # NF4 indices use the 4-bit layout of symmetric int codes (an unsigned index per weight, no zero point).
        layout = replace(weight_spec, format="int", bits=4, symmetric=True) if self.nf4 else weight_spec
        super().__init__(in_features, out_features, layout, act_spec, bias, dtype, device)
        self.weight_spec = weight_spec
        self.compute_dtype = dtype
        for name in ("qweight", "scale", "zero", "offset"):
            _nonpersistent(self, name)
        self.input_quantizer = ActQuantizer(act_spec) if act_spec is not None else None
        # Double-quantized NF4 scales: int8 codes of (scale - mean) per block of DQ_BLOCK groups.
        self.register_buffer("scale_codes", None, persistent=False)
        self.register_buffer("scale_absmax", None, persistent=False)
        self.register_buffer("scale_mean", None, persistent=False)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: QuantLinear, double_quant: bool = False) -> PackedLinear:
        """Pack a fake-quant QuantLinear: its weight quantizer's own codes, scales and zero points."""
        spec, w = q.weight_spec, q.weight.detach()
        m = cls(q.in_features, q.out_features, spec, q.act_spec, q.bias is not None, w.dtype, w.device)
        if m.nf4 and double_quant:
            m._pack_nf4_double_quant(w)
        else:
            codes, scale, zero = q.weight_quantizer.quantize(w)
            if not m.nf4 and spec.symmetric:
                codes = codes + (1 << (spec.bits - 1))
            # per tensor: the one scale (and zero point) repeated on every row
            m._store(codes, scale.expand_as(m.scale).to(w.dtype), None if zero is None else zero.expand_as(m.scale))
        if q.bias is not None:
            m.bias.data = q.bias.detach().clone()
        return m

    @classmethod
    @torch.no_grad()
    def from_int_linear(cls, layer: IntLinear) -> PackedLinear:
        """The packed base of an integer checkpoint's layer: its buffers as they are."""
        m = cls(layer.in_features, layer.out_features, layer.weight_spec, layer.act_spec, layer.bias is not None,
                layer.scale.dtype, layer.scale.device)
        m.qweight, m.scale, m.zero, m.offset = layer.qweight, layer.scale, layer.zero, layer.offset
        if layer.bias is not None:
            m.bias.data = layer.bias.detach().clone()
        return m

    def _store(self, unsigned: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> None:
        """Unsigned codes (N, K), scales and unsigned zero points (N, G) into the IntLinear layout."""
        if self.bits == 8:
            self.qweight = (unsigned.to(torch.int16) - 128).to(torch.int8).contiguous()
            self.zero = None if zero is None else (zero.to(torch.int16) - 128).to(torch.int8).contiguous()
        else:
            self.qweight = pack_int32(unsigned.to(torch.int32), self.bits)
            self.zero = None if zero is None else zero.to(torch.uint8).contiguous()
        self.scale = scale.contiguous()

    def _pack_nf4_double_quant(self, w: torch.Tensor) -> None:
        """NF4 codes against double-quantized group scales: each group's absmax scale, less their mean, as
        int8 with one fp32 absmax per DQ_BLOCK scales; the codes are chosen against the scales as stored."""
        rows = weight_rows(w.float(), self.weight_spec)
        s = rows.abs().amax(-1).clamp_min(1e-8)  # absmax per group: NF4's levels span [-1, 1]
        mean = s.mean()
        d = torch.nn.functional.pad(s - mean, (0, (-len(s)) % DQ_BLOCK)).reshape(-1, DQ_BLOCK)
        absmax = d.abs().amax(-1).clamp_min(1e-12)
        self.scale_codes = (d / absmax[:, None] * 127).round().clamp(-127, 127).to(torch.int8).flatten()[: len(s)]
        self.scale_absmax, self.scale_mean = absmax.float(), mean.float().reshape(1)
        codes = quantize_codes(rows, self.group_scales().reshape(-1, 1), None, self.weight_spec)
        self._store(codes.reshape(w.shape), torch.ones_like(self.scale), None)
        self.scale = None  # the double-quantized scales stand in for it

    def group_scales(self, rows: slice = slice(None)) -> torch.Tensor:
        """(N, G) fp32 scales of the output `rows`: the stored ones, or the double-quantized ones reconstructed
        (only those rows' codes: a packed experts stack asks one expert's rows at a time)."""
        if self.scale_codes is None:
            return self.scale[rows].float()
        g = len(self.scale_codes) // self.out_features
        lo, hi, _ = rows.indices(self.out_features)
        idx = torch.arange(lo * g, hi * g, device=self.scale_codes.device)
        s = self.scale_codes[lo * g: hi * g].float() / 127 * self.scale_absmax[idx // DQ_BLOCK] + self.scale_mean
        return s.reshape(hi - lo, g)

    # -- compute ---------------------------------------------------------------------------------

    def tile_rows(self) -> int:
        """Output rows per forward tile: at least one."""
        return max(1, TILE_ELEMENTS // self.in_features)

    def tile_cols(self) -> int:
        """Input columns per backward tile: whole groups covering whole int32 words (a multiple of 32 columns), or
        the whole width where groups do not tile it (per channel, or a width that is not a multiple of them)."""
        k, g = self.in_features, self.group_size
        align = math.lcm(g, 32)
        if k % g or align >= k:
            return k
        return max(align, TILE_ELEMENTS // self.out_features // align * align)

    def _block(self, rows: slice, cols: Optional[tuple[int, int]]):
        """(codes, scales, zero points, offsets, width) of the weight block rows x cols, as stored (packed)."""
        k, g = self.in_features, self.group_size
        c0, c1 = cols or (0, k)
        groups = slice(c0 // g, -(-c1 // g))
        words = slice(c0, c1) if self.bits == 8 else slice(c0 * self.bits // 32, -(-c1 * self.bits // 32))
        whole = (c0, c1) == (0, k)

        def take(t: Optional[torch.Tensor], cut: slice) -> Optional[torch.Tensor]:
            if t is None:
                return None
            t = t[rows]
            return t if whole else t[:, cut].contiguous()

        scale = self.group_scales(rows) if self.nf4 else self.scale[rows]
        return (take(self.qweight, words), scale if whole else scale[:, groups].contiguous(), take(self.zero, groups),
                take(self.offset, groups), c1 - c0)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None, rows: slice = slice(None),
                           cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """(N, K) weight in `dtype`: codes times scales in fp32 (fp64 for an fp64 model), plus the offset; or its
        block `rows` x `cols` (columns [c0, c1), c0 a multiple of the group size and of 32: see tile_cols)."""
        dtype = dtype or self.compute_dtype
        qweight, scale, zero, offset, k = self._block(rows, cols)
        n, g = qweight.shape[0], self.group_size
        wide = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        if self.nf4:
            w = nf4_levels(qweight, k, wide).reshape(n, -1, g).mul_(scale.to(wide).unsqueeze(-1))
        elif (wide == torch.float32 and offset is None and ops.kernels_enabled()
              and device_path(qweight, "int_linear")):
            # The runtime's dequantization (its Triton kernel on the device path): the numbers below, bit for bit.
            return ops.dequantize_weight(qweight, scale, zero, self.bits, g, k, dtype)
        else:
            # (code - zero) * scale with the codes widened once. The integers (|code - zero| <= 255) are exact in
            # every float dtype, and a product of two bf16/fp16 values is exact in fp32, so computing in the
            # scales' own dtype rounds once, as fake quant's fp32 product cast to that dtype does: the same bits
            # at half the memory traffic (this runs three times a step under checkpointing).
            work = dtype if offset is None and scale.dtype == dtype else wide
            if self.bits == 8:
                w = qweight.to(work).reshape(n, -1, g)
                center = zero
            else:
                # the codes less 2**(bits - 1) straight from the table when symmetric; in place from there on
                w = decode_packed(qweight, self.bits, k, work, "raw" if zero is not None else "centered")
                w, center = w.reshape(n, -1, g), zero
            if center is not None:
                w = w.sub_(center.to(w.device, work).unsqueeze(-1))
            w = w.mul_(scale.to(work).unsqueeze(-1))
        if offset is not None:
            w = w + offset.to(wide).unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if dt is not None:
            x = x.to(dt)  # as QuantLinear: quantize in the dtype the matmul sees
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return _PackedMatmul.apply(x, self, dt or self.compute_dtype)

    def packed_bytes(self) -> int:
        """Bytes of the frozen weight as held: codes, scales, zero points, offsets."""
        tensors = (self.qweight, self.scale, self.zero, self.offset, self.scale_codes, self.scale_absmax)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        fmt = "nf4" + (" double-quantized scales" if self.scale_codes is not None else "") if self.nf4 else ""
        base = super().extra_repr() if not self.nf4 else f"in={self.in_features}, out={self.out_features}, {fmt}"
        # peft names the layer in its "not supported" error: say how to load adapters onto it.
        return f"{base}, frozen (adapters: qat.qlora.add_adapters / load_adapters)"


def weight_bytes_ratio(model: nn.Module) -> float:
    """Bytes of the packed linears over what their weights would take in bf16."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    packed = sum(m.packed_bytes() for m in layers)
    return packed / max(1, sum(2 * m.in_features * m.out_features for m in layers))
