"""FP4 (e2m1) checkpoints: the compressed-tensors `nvfp4-pack-quantized` and `mxfp4-pack-quantized` layouts of a layer.

One converted layer holds `weight_packed` uint8 (out, in / 2; two e2m1 codes a byte, low nibble first, code = sign << 3
| magnitude index) and `weight_scale` (out, in / block): NVFP4 e4m3 block scales with `weight_global_scale` fp32 (1,),
the dequantized weight being e2m1 * weight_scale / weight_global_scale; MXFP4 e8m0 biased exponents (uint8), the
weight e2m1 * 2^(weight_scale - 127). W4A4 NVFP4 layers also hold `input_global_scale` (fp32 (1,), vLLM's static
activation global scale), written 1.0: see `readers` for what that means for vLLM's activations.

The codes and block scales are the layer's own `WeightQuantizer.quantize` (the fake quant's): an NVFP4 effective block
scale is s / G with s an e4m3 value and G a power of two (`qat.fp4`), split back into (s, G) bit for bit by
`qat.fp4.nvfp4_split`; an MXFP4 one is a power of two (`qat.fp4.mxfp4_exponents`). vLLM keeps one weight global scale
per fused layer (q/k/v, gate/up: the largest of theirs), so convert writes one G shared by such siblings wherever
their block scales stay exact e4m3 values under it (`share_globals`). The layer that runs the folder is
`qat.runtime.fp4.Fp4Linear`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..fp4 import mxfp4_exponents, nvfp4_split
from ..linear import QuantLinear
from ..runtime.fp4 import FP4_SUPPORTED, SCALE_DTYPES, Fp4Linear, fp4_block_scales, fp4_unsupported, pack_fp4
from ..spec import TensorSpec
from .format import FormatError

__all__ = ["FP4_LAYOUTS", "fp4_scheme", "compress_fp4", "compress_fp4_linear", "load_fp4_linear", "share_globals"]

FP4_LAYOUTS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_STRATEGY = {"nvfp4": "tensor_group", "mxfp4": "group"}
# Siblings vLLM fuses into one layer (its packed_modules_mapping: qkv_proj, gate_up_proj), which then keeps one
# weight global scale.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _args(fmt: str, block: int, act: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": block,
                            "strategy": _STRATEGY[fmt], "dynamic": False, "observer": None,
                            "scale_dtype": f"torch.{str(SCALE_DTYPES[fmt]).split('.')[-1]}"}
    if act:  # compressed-tensors' NVFP4 / MXFP4 presets: NVFP4 block scales per call over a static global
        args["dynamic"] = "local" if fmt == "nvfp4" else True
    return args


def fp4_scheme(w: TensorSpec, a: Optional[TensorSpec], name: str) -> dict[str, Any]:
    """The config group (without targets) of an fp4 layer; FormatError for an fp4 spec the runtime lacks."""
    problem = fp4_unsupported(w, a)
    if problem is not None:
        raise FormatError(f"{name}: {problem}: {FP4_SUPPORTED}")
    return {"weights": _args(w.format, w.group_size, False),
            "input_activations": _args(w.format, w.group_size, True) if a is not None else None,
            "output_activations": None, "format": FP4_LAYOUTS[w.format]}


def _entries(fmt: str, codes: torch.Tensor, eff: torch.Tensor, global_k: Optional[int], a: Optional[TensorSpec],
             bias: Optional[torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of one layer from its (N, K) codes and (N, K / block) effective block scales."""
    out = {"weight_packed": pack_fp4(codes)}
    rows = eff.reshape(-1, 1).float()
    if fmt == "mxfp4":
        out["weight_scale"] = mxfp4_exponents(rows).reshape(eff.shape).contiguous()
    else:
        try:
            s, g = nvfp4_split(rows) if global_k is None else _split_at(rows, global_k)
        except ValueError as e:
            raise FormatError(f"{name}: {e}") from None
        out["weight_scale"] = s.reshape(eff.shape).contiguous()
        out["weight_global_scale"] = g.reshape(1).float().contiguous()
        if a is not None:
            out["input_global_scale"] = torch.ones(1, dtype=torch.float32)
    if bias is not None:
        out["bias"] = bias.detach().contiguous()
    return out


def _split_at(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 block scales, G) at the given G = 2^k; ValueError where a scale is not an e4m3 value under it."""
    g = torch.ldexp(torch.ones(1), torch.tensor([k], dtype=torch.int32))
    s = rows * g
    s8 = s.clamp_max(448.0).to(torch.float8_e4m3fn)
    if not torch.equal(s8.float(), s):
        raise ValueError(f"block scales are not e4m3 values under a global scale 2^{k}")
    return s8, g


@torch.no_grad()
def compress_fp4(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The fp4 tensors of one fp4 QuantLinear (packed codes, block scales, global scales, bias) and its scheme."""
    w_spec = layer.weight_spec
    scheme = fp4_scheme(w_spec, layer.act_spec, name)
    codes, eff, _ = layer.weight_quantizer.quantize(layer.weight.detach())
    return _entries(w_spec.format, codes, eff, None, layer.act_spec, layer.bias, name), scheme


def compress_fp4_linear(layer: Fp4Linear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An Fp4Linear's tensors and scheme, the inverse of `load_fp4_linear`."""
    scheme = fp4_scheme(layer.weight_spec, layer.act_spec, name)
    out = {"weight_packed": layer.qweight.contiguous(), "weight_scale": layer.scale.contiguous()}
    if layer.format == "nvfp4":
        out["weight_global_scale"] = layer.global_scale.reshape(1).contiguous()
        if layer.act_spec is not None:
            out["input_global_scale"] = torch.ones(1, dtype=torch.float32)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    return out, scheme


def share_globals(tensors: dict[str, torch.Tensor], prefixes: list[str]) -> list[str]:
    """Give the NVFP4 siblings vLLM fuses (q/k/v, gate/up under one parent) one weight global scale, the smallest of
    theirs, where every block scale stays an exact e4m3 value under it: the weights do not change, and vLLM's one
    global per fused layer is then right. Returns the fused groups left with different globals (vLLM would scale
    all but the largest-global sibling wrongly)."""
    left = []
    for parent in sorted({p.rpartition(".")[0] for p in prefixes}):
        for group in FUSED:
            names = [f"{parent}.{c}" if parent else c for c in group]
            keys = [f"{n}.weight_global_scale" for n in names]
            if not all(k in tensors for k in keys):
                continue
            gs = torch.cat([tensors[k] for k in keys])
            if bool((gs == gs[0]).all()):
                continue
            k = int(torch.frexp(gs.min())[1]) - 1
            try:
                new = {n: _split_at(fp4_block_scales("nvfp4", tensors[f"{n}.weight_scale"],
                                                     tensors[f"{n}.weight_global_scale"]).reshape(-1, 1), k)
                       for n in names}
            except ValueError:
                left.append(f"{parent}.{{{','.join(group)}}}")
                continue
            for n, (s, g) in new.items():
                tensors[f"{n}.weight_scale"] = s.reshape(tensors[f"{n}.weight_scale"].shape).contiguous()
                tensors[f"{n}.weight_global_scale"] = g.reshape(1).float()
    return left


@torch.no_grad()
def load_fp4_linear(layer: Fp4Linear, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Fill an Fp4Linear's buffers from one layer's fp4 entries, checking every shape and dtype."""
    n, k, fmt = layer.out_features, layer.in_features, layer.format

    def need(key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if key not in tensors:
            raise FormatError(f"{name}: the checkpoint lacks {name}.{key}; it is incomplete or not written by "
                              "distqat convert")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise FormatError(f"{name}.{key}: found {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}; the "
                              "checkpoint does not match its config")
        return t

    layer.qweight = need("weight_packed", (n, k // 2), torch.uint8).contiguous()
    layer.scale = need("weight_scale", (n, k // layer.weight_spec.group_size), SCALE_DTYPES[fmt]).contiguous()
    if fmt == "nvfp4":
        g = need("weight_global_scale", (1,), torch.float32)
        if not (bool(torch.isfinite(g).all()) and float(g) > 0):
            raise FormatError(f"{name}.weight_global_scale is {float(g)}; the checkpoint is corrupt")
        layer.global_scale = g.contiguous()
        if layer.act_spec is not None and "input_global_scale" in tensors and float(tensors["input_global_scale"]) != 1:
            raise FormatError(f"{name}.input_global_scale is {float(tensors['input_global_scale'])}: distqat runs "
                              "NVFP4 activations with a power-of-two scale per token (written as 1.0); this folder "
                              "was calibrated by another tool: run it with vLLM or transformers")
    if "weight_zero_point" in tensors:
        raise FormatError(f"{name}: an fp4 layer has no zero point; the checkpoint does not match its config")
    if layer.bias is not None:
        bias = tensors.get("bias")
        if bias is None or tuple(bias.shape) != (n,):
            raise FormatError(f"{name}.bias: missing or not of shape {(n,)}; the checkpoint does not match its config")
        layer.bias.data = bias.to(layer.bias.dtype)
