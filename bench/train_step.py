"""Benchmark: the QAT distillation step against the same KD step without fake quant, and memory.

    python -m bench.train_step [--shape smollm2-135m|llama-1b|tiny] [--batch 4] [--seq 1024] [--scheme w4a8kv8]
                               [--variants kd,qat,qat+compile,qat+norm_quant,...] [--device cuda|cpu]

On one GPU, in one process, bf16 (BF16 master weights, AdamWBF16 with Kahan compensation):
  kd     teacher forward (no grad) + student forward + KL + backward + optimizer step, student not quantized
  qat    the same with the student fake-quantized (`--scheme`)
A variant is kd or qat followed by +<part>s: `+compile` puts student and teacher under torch.compile
(`kd-compile`/`qat-compile` are the old spellings of kd+compile/qat+compile); any other part is a speed-up of
qat.fast (`qat.fast.enable(student, parts)`, e.g. qat+norm_quant+weight_batch+kv_direct). Each variant's
ratio is to kd, or to kd+compile when it is compiled.
Prints median step time, tokens/s, peak memory and the qat/kd ratio; then a table of the memory per
GPU that weights + gradients + optimizer state need for Llama 1B/7B/70B shapes under ZeRO-2/3 on 8
GPUs (activations excluded), with the formula checked against the measured optimizer state here.
`--device cpu` times with the wall clock (no CUDA events, no peak memory): a smoke run of the code paths
(`--shape tiny`), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._common import SHAPES

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
                   help="comma-separated labels kd|qat[+compile][+<qat.fast speed-up>...]: +compile puts student "
                        "and teacher under torch.compile (the fake quant then runs as traced torch ops Inductor can "
                        "fuse); kd-compile and qat-compile are aliases of kd+compile and qat+compile")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: wall-clock timing, for smoke runs of the code paths")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the +compile variants (smoke runs: eager)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--profile", metavar="DIR", help="also write torch.profiler tables of two steps per variant here")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def parse_variant(label: str) -> tuple[str, bool, list[str]]:
    """(kd|qat, compiled, qat.fast speed-ups) of a label such as qat+compile+norm_quant; ValueError if malformed."""
    label = label.strip()
    if label in ("kd-compile", "qat-compile"):
        label = label.replace("-", "+")
    base, *parts = label.split("+")
    if base not in ("kd", "qat") or any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"variant {label!r}: kd or qat followed by distinct +<part>s, e.g. qat+compile")
    return base, "compile" in parts, [p for p in parts if p != "compile"]


def canonical(label: str) -> str:
    base, compiled, speedups = parse_variant(label)
    return "+".join([base] + (["compile"] if compiled else []) + speedups)


def make_module(shape: str, scheme: str | None, compile: bool = False, speedups: list[str] | None = None,
                device: str = "cuda", backend: str = "inductor"):
    import transformers as tf

    from qat.apply import quantize_model
    from trainer.config import load_config
    from trainer.module import QATModule

    def model():
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
        cfg._attn_implementation = "sdpa"
        return tf.LlamaForCausalLM(cfg).to(torch.bfloat16).to(device)

    teacher, student = model(), model()
    if scheme:
        quantize_model(student, scheme)
    enabled = []
    if speedups:
        from qat import fast  # lazy: being written alongside; only the speed-up variants need it

        enabled = list(fast.enable(student, speedups))
    # bf16 masters (AdamWBF16) on CPU too, so that a smoke run takes the optimizer path a GPU run takes
    train = load_config(None, ["train.lr=1e-5", "train.master_weights=bf16"]).train
    module = QATModule(student, teacher, train)
    if compile:
        student.compile(backend=backend)
        teacher.compile(backend=backend)
    opt = module.configure_optimizers()["optimizer"]
    return module, opt, enabled


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(module, opt, batch, steps: int, profile: str | None = None, device: str = "cuda",
               warmup: int = 3) -> tuple[float, float | None, float]:
    cuda = device == "cuda"

    def step():
        loss = module.losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        # Host time to issue the step: when it is close to the GPU time, launches bound the step.
        host.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(host[-1])
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    if profile:
        from torch.profiler import ProfilerActivity  # lazy: only with --profile
        from torch.profiler import profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with prof(activities=acts) as p:
            for _ in range(2):
                step()
            sync(device)
        ka = p.key_averages()
        Path(profile).write_text(
            (ka.table(sort_by="self_cuda_time_total", row_limit=35) + "\n" if cuda else "")
            + ka.table(sort_by="self_cpu_time_total", row_limit=35))
    return statistics.median(times), peak, statistics.median(host)


def ratio_base(label: str) -> str:
    """The kd variant a label's step time is compared with: kd, or kd+compile for a compiled one."""
    return "kd+compile" if parse_variant(label)[1] else "kd"


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/train_step.py needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 1
    try:
        labels = [canonical(v) for v in args.variants.split(",") if v.strip()]
    except ValueError as e:
        print(f"bench/train_step.py: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {}
    for label in labels:
        base, compiled, speedups = parse_variant(label)
        scheme = None if base == "kd" else args.scheme
        t0 = time.perf_counter()
        module, opt, enabled = make_module(args.shape, scheme, compiled, speedups, dev, args.compile_backend)
        profile = str(Path(args.profile) / f"{label}.txt") if args.profile else None
        if profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        ms, peak, host_ms = time_steps(module, opt, batch, args.steps, profile, dev, args.warmup)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
        n = sum(p.numel() for p in module.student.parameters())
        rows[label] = dict(ms=ms, host_ms=host_ms, tokens_per_s=ids.numel() / ms * 1e3, peak_gb=peak, params=n,
                           optimizer_bytes_per_param=state / n, wall_s=time.perf_counter() - t0,
                           speedups=enabled, device=dev)
        for r_label, r in rows.items():  # a variant's ratio as soon as both it and its kd are in
            b = rows.get(ratio_base(r_label))
            r["ratio_vs"], r["ratio"] = (ratio_base(r_label), r["ms"] / b["ms"]) if b else (None, None)
        print(f"{label}: {ms:.2f} ms/step (host {host_ms:.2f} ms), {time.perf_counter() - t0:.0f} s incl. "
              "build, warm-up/compile", flush=True)
        if args.json:  # after every variant: a run stopped at its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))
        del module, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (wall clock: a smoke run)"
    print(f"device: {name}  shape {args.shape}  batch {args.batch} x {args.seq}  "
          f"scheme {args.scheme}  torch {torch.__version__}")
    print(f"{'step':>40} {'ms':>9} {'host ms':>8} {'tokens/s':>10} {'peak GB':>8} {'opt B/param':>12} {'x kd':>6}")
    for label, r in rows.items():
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"{label:>40} {r['ms']:>9.2f} {r['host_ms']:>8.2f} {r['tokens_per_s']:>10.0f} {peak:>8} "
              f"{r['optimizer_bytes_per_param']:>12.2f} {ratio:>6}")
    for label, r in rows.items():
        if label.startswith("qat") and r["ratio"] is not None:
            print(f"{label} / {r['ratio_vs']} step time: {r['ratio']:.3f}")
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
