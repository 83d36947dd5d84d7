"""Benchmark: bf16 against fp32 on this CPU, the measurement behind train.autocast=auto.

    python -m bench.cpu_precision [--shape smollm2-135m|llama-1b|tiny] [--batch 4] [--seq 256] [--steps 3]
                                  [--scheme w4a8kv8] [--threads N]

Two tables, each with the ratio to fp32 measured in the same process:
  matmul   the bundled model's MLP and head shapes (tokens = batch x seq), fp32 against bf16 operands
  step     the QAT distillation step (teacher forward + fake-quantized student forward + KL + backward + AdamW)
           with fp32 master weights, computing in fp32 (precision 32-true) and in bf16 autocast (bf16-mixed)
Also prints whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which is what
train.autocast=auto decides on. Wall-clock medians; random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench._common import SHAPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--scheme", default="w4a8kv8")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    return p.parse_args(argv)


def median_s(fn, reps: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rows(tokens: int, shape: dict, reps: int) -> list[tuple[str, float, float, float]]:
    """(name, fp32 ms, bf16 ms, GFLOP) for x @ w.T at the MLP's up-projection and the head's shapes."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in {"mlp up": (shape["hidden_size"], shape["intermediate_size"]),
                         "head": (shape["hidden_size"], shape["vocab_size"])}.items():
        x, w = torch.randn(tokens, k, generator=g), torch.randn(n, k, generator=g)
        ms = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = x.to(dt), w.to(dt)
            ms[dt] = median_s(lambda a=a, b=b: a @ b.t(), reps) * 1e3
        rows.append((f"{name} {tokens}x{k} @ {k}x{n}", ms[torch.float32], ms[torch.bfloat16], 2 * tokens * k * n / 1e9))
    return rows


def step_ms(shape: dict, scheme: str, batch: int, seq: int, steps: int, autocast: bool) -> float:
    import transformers as tf

    from qat.apply import quantize_model
    from trainer.config import load_config
    from trainer.module import QATModule

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**shape, max_position_embeddings=4096)
        cfg._attn_implementation = "sdpa"
        return tf.LlamaForCausalLM(cfg)

    teacher, student = model(), model()
    quantize_model(student, scheme)
    module = QATModule(student, teacher, load_config(None, ["train.lr=1e-5", "train.master_weights=fp32"]).train)
    opt = module.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g)
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> None:
        # What Lightning's bf16-mixed does on CPU: the forward under autocast, backward and step outside it.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = module.losses(batch_)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_s(step, steps) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.optim import cpu_multiplies_bf16

    shape = SHAPES[args.shape]
    tokens = args.batch * args.seq
    print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 dot-product instructions (AVX512-BF16/AMX): "
          f"{cpu_multiplies_bf16()}")
    print(f"\n{'matmul':>36} {'fp32 ms':>9} {'bf16 ms':>9} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13} {'bf16/fp32':>10}")
    for name, f32, b16, gflop in matmul_rows(tokens, shape, max(args.steps, 5)):
        print(f"{name:>36} {f32:>9.2f} {b16:>9.2f} {gflop / f32 * 1e3:>13.0f} {gflop / b16 * 1e3:>13.0f} "
              f"{b16 / f32:>10.3f}")
    f32 = step_ms(shape, args.scheme, args.batch, args.seq, args.steps, autocast=False)
    b16 = step_ms(shape, args.scheme, args.batch, args.seq, args.steps, autocast=True)
    print(f"\nQAT step, shape {args.shape}, {args.scheme}, batch {args.batch} x {args.seq}, fp32 masters:")
    print(f"{'precision':>12} {'ms/step':>9} {'tokens/s':>9} {'x fp32':>7}")
    for name, ms in (("32-true", f32), ("bf16-mixed", b16)):
        print(f"{name:>12} {ms:>9.0f} {tokens / ms * 1e3:>9.0f} {ms / f32:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
