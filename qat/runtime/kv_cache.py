"""An integer KV cache for transformers' `generate`: keys and values stored as int8 (or packed int4) codes.

Each new token's K/V are quantized once, when they enter the cache, with the same numerics as the
fake-quant attention wrapper (qat.kv): per-token or per-(head, token) scales from the token's own
min/max. What attention reads back is the dequantized cache, which equals the fake-quantized K/V
bit for bit; the tensors are marked so that the wrapper does not quantize them a second time.

A model with the online R3 rotation (qat.online) quantizes turned keys: the cache takes that rotation
(`key_rotation`), turns each new token's keys with the function the wrapper uses before quantizing them, and marks
what it returns as turned, so the attention reads back exactly the fake-quant model's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..kv import QUANTIZED_MARK, ROTATED_MARK, kv_rows
from ..quantizers import dequantize_codes, minmax_qparams, quantize_codes
from ..spec import TensorSpec


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    u = codes.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


class IntKVLayer(DynamicLayer):
    """One layer's cache: codes (b, h, t, d) int8, or (b, h, t, d/2) uint8 for 4-bit; scales per row."""

    def __init__(self, spec: TensorSpec, key_rotation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        self.key_rotation = key_rotation
        if spec.bits not in (4, 8) or spec.format != "int" or spec.granularity not in ("token", "head"):
            raise ValueError(f"IntKVLayer stores int8 or int4 codes per token or per head; got {spec}")
        self.spec = spec
        self.length = 0
        self._k: Optional[tuple] = None
        self._v: Optional[tuple] = None

    # Codes are stored unsigned-shifted for symmetric specs so 4-bit codes pack into nibbles.
    def _quantize(self, x: torch.Tensor) -> tuple:
        spec = self.spec
        b, h, t, d = x.shape
        rows = kv_rows(x, spec)
        scale, zero = minmax_qparams(rows, spec)
        codes = quantize_codes(rows, scale, zero, spec) - spec.qmin
        if spec.granularity == "token":  # rows are (b*t, h*d): back to (b, h, t, d)
            codes = codes.reshape(b, t, h, d).transpose(1, 2)
            scale = scale.reshape(b, t, 1, 1).transpose(1, 2)
            zero = None if zero is None else zero.reshape(b, t, 1, 1).transpose(1, 2)
        else:
            codes = codes.reshape(b, h, t, d)
            scale = scale.reshape(b, h, t, 1)
            zero = None if zero is None else zero.reshape(b, h, t, 1)
        codes = codes.to(torch.uint8)
        if spec.bits == 4:
            codes = _pack_nibbles(codes)
        return codes.contiguous(), scale.contiguous(), None if zero is None else zero.to(torch.uint8).contiguous()

    def _dequantize(self, q: tuple) -> torch.Tensor:
        codes, scale, zero = q
        if self.spec.bits == 4:
            codes = _unpack_nibbles(codes)
        signed = codes.to(torch.int32) + self.spec.qmin
        return dequantize_codes(signed, scale, None if zero is None else zero.float(), self.spec).to(self.dtype)

    @staticmethod
    def _cat(a: Optional[tuple], b: tuple) -> tuple:
        if a is None:
            return b
        return tuple(None if x is None else torch.cat([x, y], dim=-2) for x, y in zip(a, b))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.key_rotation is not None:
            key_states = self.key_rotation(key_states)
        self._k = self._cat(self._k, self._quantize(key_states))
        self._v = self._cat(self._v, self._quantize(value_states))
        self.length += key_states.shape[-2]
        keys, values = self._dequantize(self._k), self._dequantize(self._v)
        setattr(keys, QUANTIZED_MARK, True)
        setattr(values, QUANTIZED_MARK, True)
        if self.key_rotation is not None:
            setattr(keys, ROTATED_MARK, True)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or self._k is None:
            return
        n = self.length + tokens_to_remove
        self._k = tuple(None if x is None else x[..., :n, :] for x in self._k)
        self._v = tuple(None if x is None else x[..., :n, :] for x in self._v)
        self.length = n

    def _select(self, fn) -> None:
        if self._k is not None:
            self._k = tuple(None if x is None else fn(x) for x in self._k)
            self._v = tuple(None if x is None else fn(x) for x in self._v)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda x: x[indices, ...])

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self._k or ()) + (self._v or ()) if x is not None)


class IntKVCache(Cache):
    """A Cache of IntKVLayer, one per decoder layer; pass it as generate's cache (`cache_kwarg` names the argument)
    or let load_quantized do it. `key_rotation`: the model's R3 (`qat.online.key_rotation(model)`), for a model
    that has one."""

    def __init__(self, spec: TensorSpec, num_layers: int,
                 key_rotation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__(layers=[IntKVLayer(spec, key_rotation) for _ in range(num_layers)])
        self.spec = spec

    def nbytes(self) -> int:
        """Bytes held by the codes, scales and zero points of every layer."""
        return sum(layer.nbytes() for layer in self.layers)
