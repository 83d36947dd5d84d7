"""Benchmark: peak memory and step time of QLoRA (packed int4 / NF4 base) against LoRA on a bf16 base.

    python -m bench.qlora_memory [--shapes smollm2-135m,llama-1b] [--batch 1] [--seq 256] [--json out.json]
        [--variants lora,qlora-int4,qlora-int4+ckpt+chunk,...]

For each shape (random init: speed and memory do not depend on the weights), the same model, batch and
LoRA adapters (rank --rank on every linear of the decoder, fp32, AdamW) train for --steps steps as
  lora        the base's linears as frozen nn.Linear in the model dtype (--dtype: bf16 on a GPU, fp32 on CPU)
  qlora-int4  the base packed to int4 groups of 64 (qat.qlora: codes dequantized per matmul)
  qlora-nf4   the base packed to NF4 groups of 64 with double-quantized scales,
  bnb-nf4     peft + bitsandbytes as users run it: the model saved, loaded again with transformers'
              BitsAndBytesConfig (NF4, blocks of 64, double quant, compute in the model dtype), then peft's
              prepare_model_for_kbit_training (its gradient checkpointing with `+ckpt`) and LoRA on the same
              linears (needs bitsandbytes importable; refused with `+chunk`, which is distqat's loss),
each optionally with `+ckpt` (transformers' gradient checkpointing of every decoder layer, the QLoRA recipes'
default) and `+chunk` (the loss from the hidden states a chunk of tokens at a time, trainer/qlora.py's
ChunkedCE, as train.mode=qlora computes it; without it the loss is the fp32 cross-entropy of the full logits).
Besides the resident set, each run counts the bytes autograd saves for backward in its first step (distinct
storages, parameters and buffers excluded): a deterministic measure of the activations a step keeps.
Each variant runs in a process of its own, so that one's peak cannot hide another's; the ratios are to the
`lora` run of the same invocation. Memory: on CUDA `torch.cuda.max_memory_allocated` over the training steps
and the memory allocated before them; on CPU the process's resident set (VmHWM, reset after the model is
built and freed memory returned to the system, and VmRSS), which also counts the Python runtime and
libraries (about 0.5 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench._common import SHAPES, model_shapes

VARIANTS = {"lora": None, "qlora-int4": "w4g64", "qlora-nf4": "wnf4g64", "bnb-nf4": "bitsandbytes"}
OPTIONS = ("ckpt", "chunk")
DEFAULT = "lora,qlora-int4+ckpt+chunk,qlora-nf4+ckpt+chunk"  # the QLoRA recipes as they train
GB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,llama-1b", type=model_shapes)
    p.add_argument("--variants", default=DEFAULT, type=variants,
                   help=f"comma-separated {'/'.join(VARIANTS)}, each with optional +ckpt and +chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="of the base and the activations; auto: bf16 on a GPU, fp32 on CPU (faster there)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def variants(text: str) -> list[str]:
    out = []
    for v in text.split(","):
        name, *opts = v.split("+")
        if name not in VARIANTS or any(o not in OPTIONS for o in opts):
            raise argparse.ArgumentTypeError(f"unknown variant {v!r}: {'/'.join(VARIANTS)} with +ckpt and/or +chunk")
        if name == "bnb-nf4" and "chunk" in opts:
            raise argparse.ArgumentTypeError(f"{v}: +chunk is distqat's loss; bitsandbytes runs take the full logits")
        out.append(v)
    return out


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active, `exclude`'s tensors left out."""

    def __init__(self, exclude: torch.nn.Module) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _status(field: str) -> float:
    """VmHWM / VmRSS of this process in GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def _bitsandbytes(model: torch.nn.Module, dtype: torch.dtype, targets: list[str], ckpt: bool, rank: int):
    """The same model through transformers + bitsandbytes NF4 + peft, the way a peft user builds QLoRA."""
    # lazy: only this variant needs bitsandbytes, which distqat does not depend on
    import tempfile

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        gc.collect()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=dtype, device_map="cpu"
                                                     if not torch.cuda.is_available() else "cuda")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


def worker(variant: str, shape: str, args: argparse.Namespace) -> dict:
    # lazy: the parent process only launches workers and needs none of these
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.apply import quantize_model
    from qat.qlora.adapters import add_adapters
    from qat.qlora.base import pack_model
    from qat.qlora.config import LoRAConfig
    from qat.spec import parse
    from trainer.models import enable_checkpointing
    from trainer.qlora import ChunkedCE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    name, *opts = variant.split("+")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(2048, args.seq))
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    if "ckpt" in opts and name != "bnb-nf4":
        enable_checkpointing(model)  # before peft wraps it, as trainer/qlora.py does
    if name == "bnb-nf4":
        model = _bitsandbytes(model, dtype, targets, "ckpt" in opts, args.rank)
    elif VARIANTS[name] is None:
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    else:
        quantize_model(model, parse(VARIANTS[name]), include=targets)
        pack_model(model, double_quant=True)
        model = add_adapters(model, LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0))
    model.train()
    chunked = ChunkedCE.of(model) if "chunk" in opts else None
    if "chunk" in opts and chunked is None:
        raise SystemExit(f"{variant}: the model's logits are not head(hidden state); no chunked loss")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated() / GB
    else:
        # The fp model the packed base was built from is freed, but glibc keeps freed pages in the process
        # unless asked: without this the resident set would still count it.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        resident = _status("VmRSS")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    _reset_peak(device)
    times = []
    saved = SavedBytes(model)
    for step in range(args.steps + 1):  # the first step (allocating optimizer state) is not timed
        t0 = time.perf_counter()
        with saved.hooks if not step else contextlib.nullcontext():
            if chunked is not None:
                loss = chunked({"input_ids": ids}, None)
            else:
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
                del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
        del loss
    peak = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else _status("VmHWM")
    step_s = statistics.median(times)
    return {"variant": variant, "shape": shape, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads", "dtype": str(dtype).replace("torch.", ""),
            "resident_gb": resident, "peak_gb": peak, "step_s": step_s, "saved_gb": saved.total / GB,
            "tokens_per_s": args.batch * args.seq / step_s, "trainable": sum(p.numel() for p in params)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return 0
    rows = []
    if importlib.util.find_spec("bitsandbytes") is None and any(v.startswith("bnb-") for v in args.variants):
        print("bench.qlora_memory: bitsandbytes is not installed; its variants are skipped", file=sys.stderr)
        args.variants = [v for v in args.variants if not v.startswith("bnb-")]
    for shape in args.shapes:
        for variant in args.variants:
            # -m from this checkout's root: the worker imports this tree's qat, not whichever one is installed
            cmd = [sys.executable, "-m", "bench.qlora_memory", "--worker", variant, shape, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank), "--dtype", args.dtype]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"{shape} {variant}: peak {rows[-1]['peak_gb']:.2f} GB, saved for backward "
                  f"{rows[-1]['saved_gb'] * 1024:.0f} MB, {rows[-1]['step_s']:.3f} s/step",
                  file=sys.stderr, flush=True)
    print(format_table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"device: {rows[0]['device']}, {rows[0]['dtype']} base, batch {args.batch} x {args.seq} tokens, "
             f"LoRA rank {args.rank}", "",
             "| shape | variant | resident GB | peak GB | peak / lora | saved MB | s/step | step / lora | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["shape"]: r for r in rows if r["variant"] == "lora"}
    for r in rows:
        ref = base.get(r["shape"])
        mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}" if ref else "-"
        speed = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['resident_gb']:.2f} | {r['peak_gb']:.2f} | {mem} | "
                     f"{r['saved_gb'] * 1024:.0f} | {r['step_s']:.3f} | {speed} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
