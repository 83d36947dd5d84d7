"""Benchmark: decode tokens/s of a converted (integer) model against its bf16 original, on one GPU.

    python -m bench.decode [--shapes smollm2-135m,llama-1b] [--batches 1,16] [--scheme w4g128] [--json out.json]

Both models run the same decode step — one token per sequence against a static KV cache (bf16 for
both, so the comparison is about the linear layers) — captured once as a CUDA graph and replayed,
so Python and launch overhead are out of both numbers. Models are random-init with the named
shapes (speed does not depend on the weights); the integer model is the bf16 one quantized with
RTN by `--scheme`, converted with qat.export.convert_model and loaded with load_quantized. The table
also gives the time a step would take if it only read the weights at `--bandwidth` bytes/s.
`--device cpu` (e.g. with `--shapes tiny`) runs the same steps eagerly with no CUDA graph, on what the
integer layers run on CPU: a smoke run of the code paths, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import SHAPES, model_shapes
from qat.io.models import cache_kwarg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,llama-1b", type=model_shapes)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--scheme", default="w4g128", help="RTN scheme of the integer model (g64 for 576-wide)")
    p.add_argument("--lm-heads", default="bf16,w8",
                   help="lm_head of the integer model: bf16 (left out, as PTQ usually does) and/or w8 (int8)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--bandwidth", type=float, default=3.0e12)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: eager steps, for smoke runs")
    return p.parse_args(argv)


def build(shape: str, scheme: str, lm_heads: list[str], tmp: Path, device: str = "cuda"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qat.apply import quantize_model
    from qat.export import convert_model, load_quantized

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # random init and quantization on the GPU: seconds, not minutes, for 1B
        bf16 = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    if SHAPES[shape]["hidden_size"] % 128:  # e.g. the bundled model's 576 columns: groups of 64
        scheme = scheme.replace("g128", "g64")
    ints = {}
    for head in lm_heads:
        with torch.device(device):
            q = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16).eval()
        q.load_state_dict(bf16.state_dict())
        if head == "bf16":
            quantize_model(q, scheme)
        else:  # the 1B shape's tied 128k-vocabulary head is a third of what a decode step reads
            quantize_model(q, scheme, exclude=[], overrides={"lm_head": head})
        ints[head] = load_quantized(convert_model(q, tmp / f"{shape}-{scheme}-{head}"), device=device)
        del q
    return bf16, ints, scheme


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every linear's weights (the embedding lookup reads one row)."""
    from qat.runtime.int_linear import IntLinear

    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, IntLinear)):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if t is not None and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    n += t.numel() * t.element_size()
    return n


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_time(model, batch: int, prompt: int, steps: int, device: str = "cuda") -> tuple[float, bool]:
    """Seconds per decode step (CUDA graph replay; eager if capture fails or on CPU) and whether a graph ran."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    arg = {cache_kwarg(model): cache}  # `cache` on current transformers, `past_key_values` on older ones
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    model(input_ids=ids, **arg, cache_position=torch.arange(prompt, device=device), use_cache=True)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.tensor([prompt], device=device)

    def step():
        return model(input_ids=tok, **arg, cache_position=pos, use_cache=True).logits

    run, graphed = (graph_of(step) if device == "cuda" else (step, False))
    for _ in range(5):
        run()
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        pos.fill_(prompt + (i % 8))  # the written slot moves; the cost per step does not depend on it
        run()
    sync(device)
    return (time.perf_counter() - t0) / steps, graphed


def graph_of(step):
    """(replay of step captured as a CUDA graph, True), or (step, False) when capture fails."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        run, graphed = graph.replay, True
    except Exception as e:  # noqa: BLE001 - report eager timing rather than nothing
        print(f"  CUDA graph capture failed ({type(e).__name__}: {e}); timing eager steps", file=sys.stderr)
        run, graphed = step, False
    return run, graphed


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU (integer kernels and CUDA graphs; --device cpu for a smoke run); "
              "none found", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            bf16, ints, scheme = build(shape, args.scheme, args.lm_heads.split(","), Path(tmp), dev)
            for b in [int(x) for x in args.batches.split(",")]:
                t_bf, g1 = decode_time(bf16, b, args.prompt, args.steps, dev)
                for head, intm in ints.items():
                    t_int, g2 = decode_time(intm, b, args.prompt, args.steps, dev)
                    rows.append(dict(shape=shape, scheme=scheme, lm_head=head, batch=b, bf16_tok_s=b / t_bf,
                                     int_tok_s=b / t_int, speedup=t_bf / t_int, bf16_ms=t_bf * 1e3,
                                     int_ms=t_int * 1e3, roofline_bf16_ms=weight_bytes(bf16) / args.bandwidth * 1e3,
                                     roofline_int_ms=weight_bytes(intm) / args.bandwidth * 1e3, graphs=g1 and g2))
                    print(f"  {shape} lm_head={head} batch {b}: bf16 {t_bf * 1e3:.3f} ms, int {t_int * 1e3:.3f} ms",
                          file=sys.stderr, flush=True)
                    if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                        Path(args.json).write_text(json.dumps(rows, indent=2))
            del bf16, ints
            if dev == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (eager, wall clock: a smoke run)"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'shape':<14}{'scheme':<8}{'lm_head':<8}{'batch':>6}{'bf16 tok/s':>12}{'int tok/s':>12}{'int/bf16':>10}"
          f"{'bf16 ms':>9}{'int ms':>8}{'roof bf16':>10}{'roof int':>9}  graphs")
    for r in rows:
        print(f"{r['shape']:<14}{r['scheme']:<8}{r['lm_head']:<8}{r['batch']:>6}{r['bf16_tok_s']:>12.0f}{r['int_tok_s']:>12.0f}"
              f"{r['speedup']:>10.2f}{r['bf16_ms']:>9.3f}{r['int_ms']:>8.3f}{r['roofline_bf16_ms']:>10.3f}"
              f"{r['roofline_int_ms']:>9.3f}  {r['graphs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
