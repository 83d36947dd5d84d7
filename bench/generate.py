"""Benchmark: tokens/s of distqat's data-free generation against transformers' generate.

    python -m bench.generate [--model bundled:smollm2-135m | --random] [--batch 64] [--length 256]

Same teacher, same settings (full-softmax sampling after a greedy prefix, every sample run to
max length) in one process:
  distqat     data.generate.generate_batch: static KV cache + CUDA graphs (torch.compile) on CUDA
  hf-batch    model.generate on the same batch (do_sample, top_k=0, min_new_tokens = max_new_tokens)
  hf-single   model.generate one sample at a time (how the LLM-QAT reference generates)
and the bytes/s the decode steps move (weights + KV cache read once per step) against the device's
memory bandwidth. `--random` uses a random-init model of the bundled model's shape (speed does not
depend on the weights), so no model files are needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench._common import SHAPES

# SmolLM2-135M's shape (the bundled model), for --random.
SMOLLM2_135M = {**SHAPES["smollm2-135m"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--random", action="store_true", help="random-init model of the bundled model's shape")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=256, help="tokens per sample")
    p.add_argument("--single", type=int, default=4, help="samples for the one-at-a-time baseline")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="device memory bandwidth, bytes/s")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def load(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if args.random:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)
    else:
        from qat.io.models import load_model

        model = load_model(args.model, "bfloat16" if dtype == torch.bfloat16 else "float32")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(dev).eval(), torch.device(dev)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_distqat(model, device, batch, length, compiled):
    from data.generate import Decoder, GenerateConfig, generate_batch

    g = GenerateConfig(n_samples=batch, max_length=length, batch_size=batch, on_eos="continue")
    decoder = Decoder(model, length, device, compiled)
    ids = torch.arange(batch)
    first = (ids * 7919 % 40000) + 100
    greedy = torch.full((batch,), 4)

    def go():
        return generate_batch(model, ids, first, greedy, [], g, 0, None, decoder)

    go()  # warm-up: compile and capture the graphs
    sync(device)
    t0 = time.perf_counter()
    out = go()
    sync(device)
    return sum(len(s) - 1 for s in out), time.perf_counter() - t0


def run_hf(model, device, batch, length):
    prompt = ((torch.arange(batch) * 7919 % 40000) + 100)[:, None].to(device)
    kw = dict(max_new_tokens=length - 1, min_new_tokens=length - 1, do_sample=True, top_k=0, top_p=1.0,
              temperature=1.0, pad_token_id=0)
    model.generate(prompt, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, **kw)
    sync(device)
    return out[:, 1:].numel(), time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    model, device = load(args)
    from data.generate import GenerateConfig, compiled_forward

    compiled = compiled_forward(model, GenerateConfig(compile="auto"), device)
    rows = []
    n, s = run_distqat(model, device, args.batch, args.length, compiled)
    rows.append(("distqat", args.batch, n, s))
    n, s = run_hf(model, device, args.batch, args.length)
    rows.append(("hf-batch", args.batch, n, s))
    tot_n, tot_s = 0, 0.0
    for _ in range(args.single):
        n, s = run_hf(model, device, 1, args.length)
        tot_n, tot_s = tot_n + n, tot_s + s
    rows.append(("hf-single", 1, tot_n, tot_s))

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    kv_per_token *= next(model.parameters()).element_size()
    base = rows[1][2] / rows[1][3]
    name = "random SmolLM2-135M shape" if args.random else args.model
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  model: {name}  "
          f"batch {args.batch}  length {args.length}  torch {torch.__version__}")
    print(f"{'variant':>10} {'batch':>6} {'tokens':>8} {'s':>8} {'tok/s':>10} {'vs hf-batch':>12} {'GB/s':>8} "
          f"{'of peak':>8}")
    results = []
    for label, b, n, s in rows:
        steps = n / b
        # Each decode step reads every weight once and, on average, half the final KV cache of each sample.
        moved = steps * (params + b * kv_per_token * args.length / 2)
        rate = moved / s
        results.append(dict(variant=label, batch=b, tokens=n, seconds=s, tokens_per_s=n / s,
                            vs_hf_batch=n / s / base, bytes_per_s=rate))
        print(f"{label:>10} {b:>6} {n:>8} {s:>8.3f} {n / s:>10.0f} {n / s / base:>12.2f} {rate / 1e9:>8.0f} "
              f"{rate / args.bandwidth:>8.1%}")
    d, hb, hs = (r["tokens_per_s"] for r in results)
    print(f"distqat / hf-batch: {d / hb:.2f}x   distqat / hf-single: {d / hs:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "model": name, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
