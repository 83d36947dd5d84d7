"""Run by bench/peers.py inside llm-compressor's virtualenv (not distqat's): one PTQ method (rtn, gptq, awq) at
w<bits>g<group> weight-only symmetric on an HF folder, calibrated on the token ids the bench wrote; writes the
quantized linears' weights, dequantized (fake-quant values in fp32), to a safetensors file for distqat's scorer, and
a JSON line (wall time, versions, settings) to stdout's last line."""

from __future__ import annotations

import argparse
import json
import time

import compressed_tensors
import llmcompressor
import torch
import transformers
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from safetensors.torch import load_file, save_file


def recipe(method: str, bits: int, group: int) -> list:
    groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}}
    quant = dict(config_groups=groups, ignore=["lm_head"])
    if method == "rtn":
        return [QuantizationModifier(**quant)]
    if method == "gptq":
        return [GPTQModifier(**quant)]  # its defaults: block 128, dampening 0.01, static act-order
    if method == "awq":
        return [AWQModifier(), QuantizationModifier(**quant)]
    raise SystemExit(f"unknown method {method!r}")


def cpu_pinning_off() -> bool:
    """AWQ's smoothing pins its cached activations for host-to-device copies, which fails with no accelerator
    (llm-compressor 0.14): on a CPU-only machine there is nothing to copy to, so pinning becomes a no-op."""
    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--calib", required=True, help="safetensors with 'ids' (n, seq_len)")
    p.add_argument("--method", required=True, choices=("rtn", "gptq", "awq"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    ids = load_file(a.calib)["ids"].long()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    patched = cpu_pinning_off() if a.method == "awq" else False
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe(a.method, a.bits, a.group),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
                continue
            zp = getattr(m, "weight_zero_point", None)
            out[name + ".weight"] = fake_quantize(m.weight.float(), m.weight_scale.float(), zp,
                                                  scheme.weights).float().contiguous()
    save_file(out, a.out)
    print(json.dumps({"seconds": seconds, "cpu_pinning_patched": patched, "linears": len(out),
                      "threads": torch.get_num_threads(),
                      "settings": "GPTQModifier defaults" if a.method == "gptq" else a.method,
                      "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__,
                                   "compressed_tensors": compressed_tensors.__version__}}))


if __name__ == "__main__":
    main()
