"""Quantized folders in other tools' layouts, built from a tiny model with packers written here from those tools'
published pack code (AutoGPTQ's `QuantLinear.pack`, AutoAWQ's `WQLinear_GEMM.from_linear`), in numpy with explicit
loops, apart from distqat's reader; and a compressed-tensors folder written by that library itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize(w: torch.Tensor, bits: int, group: int, sym: bool, min_zero: int = 0, seed: int = 0):
    """Round-to-nearest of an (out, in) weight as GPTQ's quantizer does: (codes (out, in), zero points and fp16
    scales (out, groups)), as numpy. min_zero keeps zero points at or above it (a v1 folder cannot hold 0)."""
    maxq = 2 ** bits - 1
    w = w.double().numpy()
    out, k = w.shape
    g = k if group == -1 else group
    rows = w.reshape(out, k // g, g)
    if sym:
        hi = np.maximum(np.abs(rows.min(-1)), rows.max(-1))
        scale = (2 * hi / maxq).astype(np.float16)
        zero = np.full(scale.shape, (maxq + 1) // 2)
    else:
        lo, hi = np.minimum(rows.min(-1), 0), np.maximum(rows.max(-1), 0)
        scale = ((hi - lo) / maxq).astype(np.float16)
        zero = np.clip(np.round(-lo / scale.astype(np.float64)), min_zero, maxq).astype(np.int64)
    s = scale.astype(np.float64)[..., None]
    codes = np.clip(np.round(rows / s) + zero[..., None], 0, maxq).astype(np.int64).reshape(out, k)
    return codes, zero, scale


def dequantized(codes, zero, scale) -> np.ndarray:
    """(q - z) s in float64: the folder's weight."""
    out, k = codes.shape
    g = k // scale.shape[1]
    w = (codes.reshape(out, -1, g) - zero[..., None]) * scale.astype(np.float64)[..., None]
    return w.reshape(out, k)


def gptq_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing loop over dim 0 of an (R, C) array of unsigned values (R a multiple of 32): (R * bits /
    32, C) int32; 3-bit values straddle words as its loop writes them."""
    v = values.astype(np.uint32)
    out = np.zeros((v.shape[0] // 32 * bits, v.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= v[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # bits == 3: 10 codes, one split, 10 codes, one split, 10 codes per 3 words
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i))
            i += 10
            out[row] |= v[i] << 30
            row += 1
            out[row] |= (v[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= v[i] << 31
            row += 1
            out[row] |= (v[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return out.view(np.int32)


def gptq_layer(codes, zero, scale, bits: int, v1: bool, g_idx=None) -> dict[str, torch.Tensor]:
    """The tensors AutoGPTQ saves for one layer: qweight (in * bits / 32, out), qzeros (groups, out * bits / 32)
    holding zero - 1 in v1 (as uint32, so a zero of 0 smears ones over the word, as its packer does), scales
    (groups, out) fp16, g_idx (in,)."""
    k = codes.shape[1]
    g = k // scale.shape[1]
    stored = (zero.T.astype(np.int64) - (1 if v1 else 0)).astype(np.uint32)  # (groups, out)
    if v1 and bits != 3:  # AutoGPTQ's zero loop: OR each value shifted into its word (-1 sets every higher bit)
        q = np.zeros((stored.shape[0], stored.shape[1] // 32 * bits), dtype=np.uint32)
        per = 32 // bits
        for col in range(q.shape[1]):
            for j in range(per):
                q[:, col] |= (stored[:, col * per + j] << (bits * j)).astype(np.uint32)
        qzeros = q.view(np.int32)
    else:
        qzeros = gptq_pack(stored.T & (2 ** bits - 1), bits).T.copy()
    gi = np.arange(k) // g if g_idx is None else g_idx
    return {"qweight": torch.from_numpy(gptq_pack(codes.T, bits).copy()), "qzeros": torch.from_numpy(qzeros),
            "scales": torch.from_numpy(scale.T.copy()), "g_idx": torch.from_numpy(gi.astype(np.int32))}


def awq_layer(codes, zero, scale) -> dict[str, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM tensors: qweight (in, out / 8), qzeros (groups, out / 8) with nibble i of word col
    holding column 8 col + AWQ_ORDER[i], scales (groups, out) fp16."""

    def pack(v: np.ndarray) -> np.ndarray:  # (rows, out) -> (rows, out / 8)
        v = v.astype(np.uint32)
        q = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
        for col in range(q.shape[1]):
            for i in range(8):
                q[:, col] |= v[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
        return q.view(np.int32)

    return {"qweight": torch.from_numpy(pack(codes.T)), "qzeros": torch.from_numpy(pack(zero.T)),
            "scales": torch.from_numpy(scale.T.copy())}


def quantized_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def write_folder(model, path: Path, qconfig: dict, layer) -> dict[str, np.ndarray]:
    """Save `model` (fp16) with each decoder linear replaced by `layer(name, weight)` -> (tensors, float64 weight);
    returns {name: the folder's dequantized weight}."""
    model.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    expected = {}
    for name in quantized_linears(model):
        del state[f"{name}.weight"]
        tensors, w = layer(name, model.get_submodule(name).weight.detach())
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        expected[name] = w
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return expected


def gptq_folder(model, path: Path, bits: int = 4, group: int = 32, sym: bool = False, v2: bool = False,
                **extra) -> dict[str, np.ndarray]:
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
          "checkpoint_format": "gptq_v2" if v2 else "gptq", **extra}

    def layer(name, w):
        codes, zero, scale = quantize(w, bits, group, sym, min_zero=0 if v2 else 1)
        return gptq_layer(codes, zero, scale, bits, v1=not v2), dequantized(codes, zero, scale)

    return write_folder(model, path, qc, layer)


def awq_folder(model, path: Path, group: int = 32) -> dict[str, np.ndarray]:
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}

    def layer(name, w):
        codes, zero, scale = quantize(w, 4, group, sym=False)
        return awq_layer(codes, zero, scale), dequantized(codes, zero, scale)

    return write_folder(model, path, qc, layer)


def compressed_tensors_folder(model, path: Path, bits: int = 4, group: int = 32, sym: bool = False
                              ) -> dict[str, np.ndarray]:
    """A pack-quantized folder written by compressed-tensors itself (its scales from its own calculate_qparams on
    each group's min/max); returns {name: the folder's dequantized weight, unpacked by the library, in float64}."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, cfg)
    names = quantized_linears(model)
    for name in names:
        m = model.get_submodule(name)
        rows = m.weight.detach().float().reshape(m.weight.shape[0], -1, group)
        scale, zp = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
        m.weight_scale.data = scale.to(m.weight_scale.dtype)
        m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    # The folder's own numbers, unpacked by the library: signed codes q and zero points z, W = (q - z) s.
    tensors = load_file(str(path / "model.safetensors"))
    expected = {}
    for name in names:
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape).double()
        s = tensors[f"{name}.weight_scale"].double()
        z = torch.zeros_like(s) if sym else unpack_from_int32(
            tensors[f"{name}.weight_zero_point"], bits, s.shape, packed_dim=0).double()
        expected[name] = ((q.reshape(shape[0], -1, group) - z[..., None]) * s[..., None]).reshape(shape).numpy()
    return expected
