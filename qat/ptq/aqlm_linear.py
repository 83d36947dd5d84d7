"""The AQLM layer and folder: the layout transformers' AQLM integration (the `aqlm` package) reads, and a
reference runtime that needs no `aqlm`: dequantize codes + codebooks + scales to a weight, then F.linear.

Parameters of one layer, as `aqlm.QuantizedLinear` (out_group_size 1):
  codes      (out, in // g, M)  int8 for B <= 8, int16 for B <= 16; a code c >= 2^(B-1) stored as c - 2^B
  codebooks  (M, 2^B, 1, g)     the dtype of the model
  scales     (out, 1, 1, 1)
  bias       (out,) when the linear has one
config.json holds transformers' `quantization_config` {"quant_method": "aqlm", ...} and distqat's AQLM_KEY
record (the kind `qat.io.folders.inspect` names aqlm). It lives beside the PTQ part that writes it (as
LLM.int8() does): `qat.ptq` and `qat.export` are independent layers, and `qat.load` reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..io.models import ModelError, check_remote_code
from ..keys import AQLM_KEY, HF_QUANT_KEY
from ..linear import QuantLinear


def code_dtype(nbits: int) -> torch.dtype:
    if nbits <= 8:
        return torch.int8
    if nbits <= 16:
        return torch.int16
    raise ValueError(f"aqlm: {nbits}-bit codebooks do not fit int16 codes")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes in [0, 2^B) as aqlm stores them: signed, c >= 2^(B-1) wrapped to c - 2^B."""
    c = codes.to(torch.int64)
    return torch.where(c >= 1 << (nbits - 1), c - (1 << nbits), c).to(code_dtype(nbits))


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (1 << nbits)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight (out, in) of stored codes (out, G, M), codebooks (M, K, 1, g) and scales (out, 1, 1, 1)."""
    m_books, k, _, g = codebooks.shape
    c = unpack_codes(codes, k.bit_length() - 1)
    v = sum(codebooks[m, :, 0, :][c[..., m]] for m in range(m_books))  # (out, G, g)
    return (v * scales.reshape(-1, 1, 1)).reshape(codes.shape[0], -1)


class AQLMLinear(nn.Module):
    """A linear whose weight is AQLM-coded; forward dequantizes it (the reference runtime) and runs F.linear."""

    def __init__(self, in_features: int, out_features: int, num_codebooks: int, nbits_per_codebook: int,
                 in_group_size: int = 8, bias: bool = False, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if in_features % in_group_size:
            raise ValueError(f"aqlm: in_features={in_features} is not a multiple of in_group_size={in_group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.in_group_size = in_group_size
        kw = {"dtype": dtype, "device": device}
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks, 1 << nbits_per_codebook, 1, in_group_size, **kw),
                                      requires_grad=False)
        self.codes = nn.Parameter(torch.zeros(out_features, in_features // in_group_size, num_codebooks,
                                              dtype=code_dtype(nbits_per_codebook), device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, 1, 1, 1, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   bias: Optional[torch.Tensor], dtype: torch.dtype, nbits: int) -> AQLMLinear:
        """From codes (out, G, M) in [0, 2^B), codebooks (M, 2^B, g), scales (out,)."""
        out, groups, m_books = codes.shape
        g = codebooks.shape[-1]
        m = cls(groups * g, out, m_books, nbits, g, bias is not None, dtype, codes.device)
        m.codes.data = pack_codes(codes, nbits)
        m.codebooks.data = codebooks.reshape(m.codebooks.shape).to(dtype).clone()
        m.scales.data = scales.reshape(-1, 1, 1, 1).to(dtype).clone()
        if bias is not None:
            m.bias.data = bias.detach().to(dtype).clone()
        return m

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, aqlm "
                f"{self.num_codebooks}x{self.nbits_per_codebook} g{self.in_group_size}")


def bits_per_weight(m: AQLMLinear) -> float:
    """(code bits + codebook bits + scale bits) / weights, each counted as stored (bias not counted: not a weight)."""
    bits = m.codes.numel() * m.nbits_per_codebook
    bits += m.codebooks.numel() * m.codebooks.element_size() * 8 + m.scales.numel() * m.scales.element_size() * 8
    return bits / (m.in_features * m.out_features)


def aqlm_config(num_codebooks: int, nbits: int, in_group_size: int, skip: list[str]) -> dict[str, Any]:
    """transformers' AqlmConfig as config.json holds it. `skip` names the linears left in full precision (both
    as modules, which transformers 5 matches, and as `.weight`, the form older versions compared)."""
    return {"quant_method": "aqlm", "in_group_size": in_group_size, "out_group_size": 1,
            "num_codebooks": num_codebooks, "nbits_per_codebook": nbits,
            "linear_weights_not_to_quantize": [f for n in skip for f in (n, n + ".weight")]}


def finish_model(model: nn.Module, num_codebooks: int, nbits: int, in_group_size: int) -> dict[str, Any]:
    """Record the AQLM layout in model.config; returns distqat's record (total bits per weight included)."""
    left = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    if left:
        raise ValueError(f"ptq.method=aqlm codes the decoder layers' linears only; exclude {left[:3]} in quant.exclude")
    coded = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    weights = sum(m.in_features * m.out_features for m in coded)
    bits = sum(bits_per_weight(m) * m.in_features * m.out_features for m in coded)
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    record = {"num_codebooks": num_codebooks, "nbits_per_codebook": nbits, "in_group_size": in_group_size,
              "bits_per_weight": bits / max(weights, 1), "coded_weights": weights}
    setattr(model.config, HF_QUANT_KEY, aqlm_config(num_codebooks, nbits, in_group_size, skip))
    setattr(model.config, AQLM_KEY, record)
    return record


def load_aqlm(path: Path, record: dict[str, Any], dtype: Optional[torch.dtype] = None,
              **kwargs: Any) -> nn.Module:
    """An AQLM folder with AQLMLinear layers (no `aqlm` package needed), in eval mode; kwargs as from_config's
    (attn_implementation, trust_remote_code)."""
    remote = kwargs.get("trust_remote_code", False)
    check_remote_code(Path(path), remote)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
    if hasattr(cfg, HF_QUANT_KEY):
        delattr(cfg, HF_QUANT_KEY)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    if dtype is None:
        dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".codebooks")), torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)
    m_books, nbits, g = record["num_codebooks"], record["nbits_per_codebook"], record["in_group_size"]
    for name in [k[: -len(".codes")] for k in tensors if k.endswith(".codes")]:
        lin = model.get_submodule(name)
        model.set_submodule(name, AQLMLinear(lin.in_features, lin.out_features, m_books, nbits, g,
                                             lin.bias is not None, dtype))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = [k for k in missing if not (k in tied and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ModelError(f"{path}: AQLM folder does not match its model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()
