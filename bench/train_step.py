"""Benchmark: the QAT distillation step against the same KD step without fake quant, and memory.

    python bench/train_step.py [--shape smollm2-135m|llama-1b] [--batch 4] [--seq 1024] [--scheme w4a8kv8]

On one GPU, in one process, bf16 (BF16 master weights, AdamWBF16 with Kahan compensation):
  kd     teacher forward (no grad) + student forward + KL + backward + optimizer step, student not quantized
  qat    the same with the student fake-quantized (`--scheme`)
Prints median step time, tokens/s, peak memory and the qat/kd ratio; then a table of the memory per
GPU that weights + gradients + optimizer state need for Llama 1B/7B/70B shapes under ZeRO-2/3 on 8
GPUs (activations excluded), with the formula checked against the measured optimizer state here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import SHAPES  # noqa: E402

PARAMS = {"1B": 1.24e9, "7B": 6.74e9, "70B": 70.6e9}
# Bytes per parameter of the student (weights, grads, optimizer state) and of the frozen bf16 teacher.
PER_PARAM = {
    # name: (replicated under ZeRO-2, sharded under ZeRO-2, total under ZeRO-3 (all sharded))
    "bf16 master, kahan": {"weights": 2, "grads": 2, "state": 2 + 2 + 2},
    "bf16 master, stochastic": {"weights": 2, "grads": 2, "state": 2 + 2},
    "fp32 master (mixed)": {"weights": 2, "grads": 4, "state": 4 + 4 + 4},
}


def memory_gb(params: float, per: dict[str, int], stage: int, gpus: int) -> float:
    """Weights + grads + optimizer state per GPU, student and frozen bf16 teacher, in GB."""
    teacher = 2 * params
    if stage == 2:  # ZeRO-2: weights replicated, gradients and optimizer state sharded
        total = per["weights"] * params + teacher + (per["grads"] + per["state"]) * params / gpus
    else:  # ZeRO-3: everything sharded, the teacher too
        total = (per["weights"] * params + teacher + (per["grads"] + per["state"]) * params) / gpus
    return total / 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--scheme", default="w4a8kv8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="kd,qat",
                   help="comma-separated of kd, qat, kd-compile, qat-compile (student and teacher under "
                        "torch.compile; the fake quant then runs as traced torch ops Inductor can fuse)")
    p.add_argument("--profile", metavar="DIR", help="also write torch.profiler tables of two steps per variant here")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def make_module(shape: str, scheme: str | None, compile: bool = False):
    import transformers as tf

    from qat.apply import quantize_model
    from trainer.config import load_config
    from trainer.module import QATModule

    def model():
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
        cfg._attn_implementation = "sdpa"
        return tf.LlamaForCausalLM(cfg).to(torch.bfloat16).cuda()

    teacher, student = model(), model()
    if scheme:
        quantize_model(student, scheme)
    train = load_config(None, ["train.lr=1e-5"]).train
    module = QATModule(student, teacher, train)
    if compile:
        student.compile()
        teacher.compile()
    opt = module.configure_optimizers()["optimizer"]
    return module, opt


def time_steps(module, opt, batch, steps: int, profile: str | None = None) -> tuple[float, float, float]:
    def step():
        loss = module.losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        # Host time to issue the step: when it is close to the GPU time, launches bound the step.
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 1e9
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        ka = p.key_averages()
        Path(profile).write_text(
            ka.table(sort_by="self_cuda_time_total", row_limit=35) + "\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=35))
    return statistics.median(times), peak, statistics.median(host)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/train_step.py needs a CUDA GPU", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g).cuda()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {}
    for label in args.variants.split(","):
        scheme = None if label.startswith("kd") else args.scheme
        module, opt = make_module(args.shape, scheme, compile=label.endswith("-compile"))
        t0 = time.perf_counter()
        profile = str(Path(args.profile) / f"{label}.txt") if args.profile else None
        if profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        ms, peak, host_ms = time_steps(module, opt, batch, args.steps, profile)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
        n = sum(p.numel() for p in module.student.parameters())
        rows[label] = dict(ms=ms, host_ms=host_ms, tokens_per_s=ids.numel() / ms * 1e3, peak_gb=peak, params=n,
                           optimizer_bytes_per_param=state / n, wall_s=time.perf_counter() - t0)
        print(f"{label}: {ms:.2f} ms/step (host {host_ms:.2f} ms), {time.perf_counter() - t0:.0f} s incl. "
              "warm-up/compile", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        del module, opt
        torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}  shape {args.shape}  batch {args.batch} x {args.seq}  "
          f"scheme {args.scheme}  torch {torch.__version__}")
    print(f"{'step':>12} {'ms':>9} {'host ms':>8} {'tokens/s':>10} {'peak GB':>8} {'opt B/param':>12} {'x kd':>6}")
    for label, r in rows.items():
        base = rows.get("kd-compile" if label.endswith("-compile") else "kd")
        ratio = f"{r['ms'] / base['ms']:.3f}" if base else "-"
        print(f"{label:>12} {r['ms']:>9.2f} {r['host_ms']:>8.2f} {r['tokens_per_s']:>10.0f} {r['peak_gb']:>8.2f} "
              f"{r['optimizer_bytes_per_param']:>12.2f} {ratio:>6}")
    for q in ("qat", "qat-compile"):
        k = q.replace("qat", "kd")
        if q in rows and k in rows:
            print(f"{q} / {k} step time: {rows[q]['ms'] / rows[k]['ms']:.3f}")
    print("\nweights + grads + optimizer state per GPU (GB), student + frozen bf16 teacher, 8 GPUs:")
    print(f"{'model':>5} {'master weights':>26} {'ZeRO-2':>8} {'ZeRO-3':>8}")
    for name, p in PARAMS.items():
        for mw, per in PER_PARAM.items():
            print(f"{name:>5} {mw:>26} {memory_gb(p, per, 2, 8):>8.1f} {memory_gb(p, per, 3, 8):>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
