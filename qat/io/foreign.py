"""Quantized folders other tools wrote: GPTQ (AutoGPTQ / GPTQModel), AWQ (AutoAWQ, GEMM) and compressed-tensors
(llm-compressor) without distqat's own record. What each declares, checked against what we read exactly, and the
unpacking of GPTQ's and AWQ's integer words into plain codes.

`inspect` (`qat.io.folders`) calls `describe` for a folder whose config holds another tool's quantization_config;
a setting we cannot compute exactly is refused here, in one line naming the field and what is supported, before
any tensor is read. The tensors are read by `qat.export.foreign`, which builds the runtime's layers from the
codes, scales and zero points unpacked here: the folder's numbers as they are, never rounded again.

The layouts, as their writers pack them (the tests pack with independent loops written from those sources):
- GPTQ: `qweight` (in * bits / 32, out) int32, each column's codes a little-endian bit stream along the input
  (3-bit codes straddle words); `qzeros` (groups, out * bits / 32) the zero points' stream along the output;
  `scales` (groups, out); `g_idx` (in,) each input's group. The original (v1) format stores zero - 1 (the
  `checkpoint_format: gptq_v2` format stores the zero point itself), so a v1 reader adds 1.
- AWQ GEMM: `qweight` (in, out / 8) int32 of 4-bit codes, nibble i of word j holding output 8 j + [0, 2, 4, 6, 1,
  3, 5, 7][i]; `qzeros` (groups, out / 8) likewise; `scales` (groups, out). W = (q - z) s, no offset by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..keys import HF_QUANT_KEY
from ..spec import QuantSpec, TensorSpec
from .models import ModelError

GPTQ_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ's own file, beside a config.json without quantization_config
FOREIGN_METHODS = ("gptq", "awq", "compressed-tensors")
GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column of each nibble, within a word (AutoAWQ's GEMM pack)


def foreign_config(cfg: dict[str, Any], path: Path) -> Optional[dict[str, Any]]:
    """The quantization_config of another tool in this folder (AutoGPTQ's quantize_config.json when config.json
    has none), or None."""
    q = cfg.get(HF_QUANT_KEY)
    if q is None and (path / GPTQ_CONFIG_FILE).is_file():
        try:
            q = {"quant_method": "gptq", **json.loads((path / GPTQ_CONFIG_FILE).read_text())}
        except json.JSONDecodeError as e:
            raise ModelError(f"{path / GPTQ_CONFIG_FILE} is not valid JSON ({e}); restore it from the model's "
                             "source") from None
    if not isinstance(q, dict) or str(q.get("quant_method", "")).lower() not in FOREIGN_METHODS:
        return None
    if str(q["quant_method"]).lower() == "compressed-tensors" and (
            q.get("quantization_status", "compressed") != "compressed" or q.get("format") == "dense"):
        return None  # float weights (llm-compressor's dense or frozen save): a plain model, as transformers reads it
    return q


def _refuse(path: Path, method: str, field: str, value: Any, supported: str) -> ModelError:
    return ModelError(f"{path}: {method} folder with {field}={value!r} cannot be read exactly; distqat reads "
                      f"{supported}")


def describe(q: dict[str, Any], path: Path) -> tuple[Optional[QuantSpec], dict[str, Any]]:
    """(the weight spec, the record the loader follows) of a foreign quantization_config; ModelError (one line)
    for a layout not read exactly."""
    method = str(q["quant_method"]).lower()
    if method == "gptq":
        return _gptq(q, path)
    if method == "awq":
        return _awq(q, path)
    return _compressed_tensors(q, path)


def _int_spec(bits: int, group: int, symmetric: bool) -> QuantSpec:
    gran = "channel" if group in (-1, 0, None) else "group"
    w = TensorSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group if gran == "group" else None)
    return QuantSpec(weight=w.check("weight"))


def _gptq(q: dict[str, Any], path: Path) -> tuple[QuantSpec, dict[str, Any]]:
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if q.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
        raise _refuse(path, "gptq", "checkpoint_format", "marlin" if q.get("is_marlin_format") else fmt,
                      "checkpoint_format gptq (v1) or gptq_v2; save it in one of those with GPTQModel")
    bits = int(q.get("bits", 4))
    if bits not in GPTQ_BITS:
        raise _refuse(path, "gptq", "bits", bits, f"bits {', '.join(map(str, GPTQ_BITS))}")
    group = int(q.get("group_size", 128))
    if group not in (-1, 0) and (group < 1 or group & (group - 1)):
        raise _refuse(path, "gptq", "group_size", group, "group_size -1 (per channel) or a power of two")
    pack = str(q.get("pack_dtype") or "int32").replace("torch.", "")
    if pack != "int32":  # GPTQModel can pack into other word sizes; the layout above is int32 words
        raise _refuse(path, "gptq", "pack_dtype", pack, "pack_dtype int32")
    if q.get("dynamic"):
        raise _refuse(path, "gptq", "dynamic", "per-module overrides", "one bits/group_size for every module")
    sym = bool(q.get("sym", True))
    record = {"format": "gptq", "bits": bits, "group_size": group, "sym": sym, "v1": fmt == "gptq",
              "desc_act": bool(q.get("desc_act", False))}
    return _int_spec(bits, group, sym), record


def _awq(q: dict[str, Any], path: Path) -> tuple[QuantSpec, dict[str, Any]]:
    version = str(q.get("version") or q.get("format") or "gemm").lower()
    if version != "gemm":
        raise _refuse(path, "awq", "version", version, "version gemm (AutoAWQ's WQLinear_GEMM packing)")
    backend = str(q.get("backend") or "autoawq").lower()
    if backend != "autoawq":
        raise _refuse(path, "awq", "backend", backend, "backend autoawq (the GEMM layout)")
    bits = int(q.get("bits", q.get("w_bit", 4)))
    if bits != 4:
        raise _refuse(path, "awq", "bits", bits, "bits 4 (the GEMM layout packs 4-bit codes)")
    if not q.get("zero_point", True):
        raise _refuse(path, "awq", "zero_point", False, "zero_point true (GEMM folders store a zero point)")
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    if group not in (-1, 0) and (group < 1 or group & (group - 1)):
        raise _refuse(path, "awq", "group_size", group, "group_size -1 (per channel) or a power of two")
    return _int_spec(bits, group, False), {"format": "awq", "bits": bits, "group_size": group, "sym": False}


CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized")


def _compressed_tensors(q: dict[str, Any], path: Path) -> tuple[Optional[QuantSpec], dict[str, Any]]:
    if q.get("kv_cache_scheme"):
        raise _refuse(path, "compressed-tensors", "kv_cache_scheme", "set", "weight (and dynamic activation) "
                      "schemes; its calibrated KV-cache scales have no place in distqat's runtime")
    if q.get("sparsity_config"):
        raise _refuse(path, "compressed-tensors", "sparsity_config", "set", "dense quantized weights")
    top = q.get("format")
    specs = set()
    for name, group in (q.get("config_groups") or {}).items():
        fmt = group.get("format") or top
        if fmt not in CT_FORMATS:
            raise _refuse(path, "compressed-tensors", f"config_groups.{name}.format", fmt, ", ".join(CT_FORMATS))
        w = group.get("weights") or {}
        if w.get("actorder") not in (None, "static"):
            raise _refuse(path, "compressed-tensors", f"config_groups.{name}.weights.actorder", w.get("actorder"),
                          "actorder null or static (groups of consecutive inputs)")
        if w.get("type", "int") == "int" and w.get("strategy") in ("group", "channel") and not group.get(
                "input_activations"):
            specs.add((int(w.get("num_bits", 8)), int(w.get("group_size") or -1), bool(w.get("symmetric", True))))
    # One integer weight-only scheme has a spec (a QLoRA base, a QAT start); others load for eval as they are.
    spec = _int_spec(*specs.pop()) if len(specs) == 1 and len(q.get("config_groups") or {}) == 1 else None
    return spec, {"format": "compressed-tensors"}


# ---------------------------------------------------------------------------------------------
# Unpacking.


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(W, C) int32 words holding, down each column, a little-endian stream of `bits`-bit codes -> (count, C)
    int32 codes (GPTQ's qweight; qzeros transposed)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    word, off = start // 32, (start % 32)[:, None]
    if w.shape[0] < -(-count * bits // 32):
        raise ValueError(f"{w.shape[0]} words cannot hold {count} codes of {bits} bits")
    lo = w[word] >> off
    nxt = w[(word + 1).clamp_max(w.shape[0] - 1)] << (32 - off)
    spill = (off + bits) > 32
    return ((lo | torch.where(spill, nxt, torch.zeros_like(nxt))) & ((1 << bits) - 1)).to(torch.int32)


def gptq_codes(t: dict[str, torch.Tensor], record: dict[str, Any], name: str, n: int, k: int
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(codes (n, k), zero points (n, groups) or None where symmetric, scales (n, groups)) of one GPTQ layer,
    ValueError (one line) where the layer is not the declared layout."""
    bits, group = record["bits"], record["group_size"]
    g = k if group in (-1, 0) else group
    if k % g:
        raise ValueError(f"{name}: {k} inputs are not a whole number of groups of {g}")
    ng = k // g
    _shape(t, name, "qweight", (k * bits // 32, n), torch.int32)
    _shape(t, name, "qzeros", (ng, n * bits // 32), torch.int32)
    _shape(t, name, "scales", (ng, n), None)
    if "g_idx" in t:
        gi = t["g_idx"].to(torch.int64).reshape(-1)
        if gi.shape != (k,) or not torch.equal(gi, torch.arange(k) // g):
            raise ValueError(f"{name}.g_idx is not each input's position // group_size (act-order, desc_act=true): "
                             "its groups are not consecutive inputs, which distqat's layers hold; use a GPTQ folder "
                             "quantized with desc_act=false or static_groups=true")
    codes = unpack_stream(t["qweight"], bits, k).t().contiguous()
    stored = unpack_stream(t["qzeros"].t().contiguous(), bits, n).t().contiguous()  # (ng, n)
    if record["v1"]:
        if bool((stored == (1 << bits) - 1).any()):
            # v1 writes zero - 1: a zero point of 0 underflows (and AutoGPTQ's packer smears it over the word's
            # higher codes), and readers disagree on it (masked back to 0, or 2^bits)
            raise ValueError(f"{name}.qzeros holds {(1 << bits) - 1} in a v1 (checkpoint_format gptq) folder: a zero "
                             "point of 0 underflowed when it was written and is ambiguous; re-save the model with "
                             "GPTQModel in checkpoint_format gptq_v2")
        stored = stored + 1
    zero = stored.t().contiguous()
    if record["sym"]:
        if not bool((zero == 1 << (bits - 1)).all()):
            raise ValueError(f"{name}.qzeros: the config says sym=true but some zero point is not "
                             f"{1 << (bits - 1)}; the folder does not match its config")
        zero = None
    return codes, zero, t["scales"].t().contiguous()


def awq_codes(t: dict[str, torch.Tensor], record: dict[str, Any], name: str, n: int, k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (n, k), zero points (n, groups), scales (n, groups)) of one AWQ GEMM layer."""
    group = record["group_size"]
    g = k if group in (-1, 0) else group
    if k % g or n % 8:
        raise ValueError(f"{name}: {k} inputs in groups of {g}, {n} outputs in words of 8: not an AWQ GEMM layout")
    ng = k // g
    _shape(t, name, "qweight", (k, n // 8), torch.int32)
    _shape(t, name, "qzeros", (ng, n // 8), torch.int32)
    _shape(t, name, "scales", (ng, n), None)
    inverse = [AWQ_ORDER.index(c) for c in range(8)]  # the nibble that holds each output column of a word

    def unpack(words: torch.Tensor) -> torch.Tensor:
        w = words.to(torch.int64) & 0xFFFFFFFF
        nibbles = torch.stack([(w >> (4 * i)) & 15 for i in range(8)], -1)  # (rows, n / 8, nibble)
        return nibbles[..., inverse].reshape(w.shape[0], n).to(torch.int32)

    return unpack(t["qweight"]).t().contiguous(), unpack(t["qzeros"]).t().contiguous(), t["scales"].t().contiguous()


def _shape(t: dict[str, torch.Tensor], name: str, key: str, shape: tuple, dtype: Optional[torch.dtype]) -> None:
    if key not in t:
        raise ValueError(f"{name}: the folder lacks {name}.{key}; it is incomplete")
    x = t[key]
    if tuple(x.shape) != tuple(shape) or (dtype is not None and x.dtype != dtype) or (
            dtype is None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(f"{name}.{key}: found {tuple(x.shape)} {x.dtype}, expected {tuple(shape)} "
                         f"{dtype or 'float16/bfloat16/float32'}; the folder does not match its config")
