"""AdamW for BF16 master weights, which master weights and precision a run uses, parameter groups, and the
warmup + cosine schedule.

BF16 master weights keep parameters (and Adam's moments) in bf16: 2 bytes each instead of 4. A bf16
weight has 8 significant bits, so an update smaller than half its spacing (|w| * 2^-9) rounds away
and training silently stalls. The compensated update keeps what rounding dropped:
- kahan: a bf16 buffer per parameter carries the lost low bits into the next step (Kahan summation);
- stochastic: round the fp32 result up or down at random, with the probability that makes the
  rounding unbiased (no extra memory).

Bytes per parameter, weights + gradient + optimizer state (ZeRO shards the last two across ranks):
  fp32 master (mixed precision):  bf16 weight 2 + fp32 master 4 + grad 4 (DeepSpeed keeps fp32 grads
                                   in the optimizer) + exp_avg 4 + exp_avg_sq 4 = 18 (16 without the
                                   bf16 copy when the model itself is fp32)
  bf16 master, kahan:             weight 2 + grad 2 + exp_avg 2 + exp_avg_sq 2 + compensation 2 = 10
  bf16 master, stochastic:        weight 2 + grad 2 + exp_avg 2 + exp_avg_sq 2 = 8

train.master_weights=auto picks bf16 masters on CUDA and fp32 masters on CPU: fp32 is the dtype every CPU
computes natively, and it needs no compensation. Where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX)
train.autocast=auto still runs the matmuls in bf16 autocast, as on CUDA: the masters stay fp32 and the fake
quantizers compute in fp32 (QuantLinear casts their output to the autocast dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from qat.apply import quantizer_keys
from qat.coverage import routers
from qat.experts import QuantExperts

COMPENSATION = ("kahan", "stochastic", "none")


def resolve_master_weights(choice: str, offload: bool = False) -> str:
    """train.master_weights as a run uses it, "bf16" or "fp32". Given ones are kept; auto is bf16 on CUDA (10
    bytes a parameter instead of 18), fp32 on CPU (see the module's docstring) and fp32 when DeepSpeed
    offloads (it offloads bf16 masters only with its own CPU Adam, which has no compensated update)."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and not offload else "fp32"


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). With them a bf16 matmul ran 4.4x as
    fast as fp32 (954 against 216 GFLOP/s, 1024x576 @ 576x1536 on 2 EPYC cores, bench/cpu_precision.py); without
    them oneDNN converts every operand and bf16 is no faster than fp32."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def lightning_precision(master: str, autocast: str = "auto", deepspeed: bool = False) -> str:
    """Lightning's precision for resolved master weights: bf16 throughout; fp32 masters computing in bf16 autocast
    (classic mixed precision) or in plain fp32. train.autocast=auto takes autocast on CUDA and on a CPU that
    multiplies bf16 in hardware, except under DeepSpeed on CPU, whose fp32 ZeRO path is the one tested there."""
    if master == "bf16":
        return "bf16-true"
    if deepspeed and autocast == "always" and not torch.cuda.is_available():
        raise ValueError("train.autocast=always: DeepSpeed on CPU trains in fp32 ZeRO only; use train.autocast=auto "
                         "or never, or distributed.strategy=ddp for bf16 autocast on CPU")
    if autocast == "auto":
        cuda = torch.cuda.is_available()
        autocast = "always" if cuda or (cpu_multiplies_bf16() and not deepspeed) else "never"
    return "bf16-mixed" if autocast == "always" else "32-true"


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose state lives in the parameter's dtype, with a compensated update for bf16 parameters.

    fp32 parameters are updated exactly as torch.optim.AdamW (no compensation needed).
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, compensation: str = "kahan", seed: int = 0,
    ) -> None:
        if compensation not in COMPENSATION:
            raise ValueError(f"compensation={compensation!r} is not one of {COMPENSATION}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.compensation = compensation
        self._gen: dict[torch.device, torch.Generator] = {}
        self.seed = seed

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gen:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gen[device] = g
        return self._gen[device]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if self.compensation == "kahan" and p.dtype != torch.float32:
                        state["comp"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - b1**t)).div_(denom).mul_(-group["lr"])
                w = p.float()
                if group["weight_decay"]:
                    update.add_(w, alpha=-group["lr"] * group["weight_decay"])
                self._apply(p, w, update, state)
        return loss

    def _apply(self, p: torch.Tensor, w: torch.Tensor, update: torch.Tensor, state: dict) -> None:
        if p.dtype == torch.float32 or self.compensation == "none":
            p.copy_(w + update)
        elif self.compensation == "kahan":
            comp = state["comp"]
            total = update + comp.float()  # this step's update plus what earlier roundings dropped
            new = (w + total).to(p.dtype)
            comp.copy_(total - (new.float() - w))
            p.copy_(new)
        else:
            p.copy_(stochastic_round(w + update, p.dtype, self._generator(p.device)))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 to bf16 up or down with probability proportional to the distance (unbiased)."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    # Adding uniform noise below the kept 16 bits, then truncating, rounds up with the right probability.
    return ((bits + noise) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def param_groups(model: nn.Module, lr: float, weight_decay: float, quantizer_lr: float,
                 fp_lr: Optional[float] = None, lr_relative: bool = False) -> list[dict]:
    """Weights with decay; norms, biases and other 1-D tensors without; quantizer parameters (LSQ scales,
    clipping logits) without decay at their own learning rate. With `fp_lr`, the parameters that stay in full
    precision (embeddings, norms, an unquantized head) train at fp_lr and only the quantized linears' weights at
    lr: an on-grid weight must travel half a grid step before its code changes, a full-precision one need not.

    With `lr_relative`, each quantized linear gets a group of its own: its weight at lr and its weight
    quantizer's parameters at quantizer_lr, both times (the weight's RMS / the median RMS of the quantized
    weights). Adam moves every parameter by about lr a step whatever its size, so a linear whose weights are 4x
    smaller (a rotation folded a norm of 0.25 into them) would cross 4x more of its grid per step; scaled, every
    linear moves the same share of its grid."""
    decay, fp_decay, no_decay, quant = [], [], [], []
    quantizers = quantizer_keys(model)
    # Each quantized weight by name: a linear's, and each fake-quantized stack of fused MoE experts.
    weights = {f"{n}.weight": (m.weight, m.weight_quantizer) for n, m in model.named_modules()
               if getattr(m, "weight_quantizer", None) is not None}
    weights.update({f"{n}.{p}": (getattr(m, p), m.weight_quantizers[p]) for n, m in model.named_modules()
                    if isinstance(m, QuantExperts) for p in m.quantized_params()})
    quantized = set(weights)
    split = fp_lr is not None
    # lr_relative: the parameters that take a quantized weight's rate (the weight, its quantizer's parameters)
    owner = {} if not lr_relative else {
        **{w: w for w in weights},
        **{f"{w.rsplit('.', 1)[0]}.{_quantizer_name(w)}.{k}": w for w, (_, q) in weights.items()
           for k, _ in q.named_parameters()},
    }
    own: dict[str, list] = {}
    # MoE routers train at lr x their weights' RMS / the median quantized weight's: Adam moves each parameter by
    # about lr a step whatever its size, and a router whose logits differ by 1e-5 (the bundled MoE's) would route
    # every token elsewhere after one step at the weights' rate.
    router_of = {f"{m}.{k}": m for m in routers(model) for k, _ in model.get_submodule(m).named_parameters(
        recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in router_of and p.ndim >= 2:
            own.setdefault(f"router:{router_of[name]}", []).append((name, p))
        elif name in owner:
            own.setdefault(owner[name], []).append((name, p))
        elif name in quantizers:
            quant.append(p)
        elif p.ndim < 2 or "norm" in name.lower():
            no_decay.append(p)
        elif split and name not in quantized:
            fp_decay.append(p)
        else:
            decay.append(p)
    other = fp_lr if split else lr
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
        {"params": fp_decay, "weight_decay": weight_decay, "lr": other, "name": "fp_decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": other, "name": "no_decay"},
        {"params": quant, "weight_decay": 0.0, "lr": quantizer_lr, "name": "quantizer"},
    ]
    if own:
        rms = {w: _rms(weights[w][0] if w in weights else params[0][1]) for w, params in own.items()}
        quantized_rms = [rms[w] if w in rms else _rms(t) for w, (t, _) in weights.items()]
        median = float(torch.tensor(sorted(quantized_rms or [1.0])).median().item()) or 1.0
        for w, params in own.items():
            ratio = rms[w] / median
            if w.startswith("router:"):
                groups.append({"params": [p for _, p in params], "weight_decay": 0.0, "lr": other * ratio,
                               "name": w})
                continue
            ws = [p for n, p in params if n in quantized]
            scales = [p for n, p in params if n not in quantized]
            groups.append({"params": ws, "weight_decay": weight_decay, "lr": lr * ratio, "name": w})
            groups.append({"params": scales, "weight_decay": 0.0, "lr": quantizer_lr * ratio,
                           "name": f"{w.rsplit('.', 1)[0]}.{_quantizer_name(w)}"})
    return [g for g in groups if g["params"]]


def _rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def _quantizer_name(weight: str) -> str:
    """Where a quantized weight's quantizer sits beside it: a linear's `weight_quantizer`, a fused experts
    module's `weight_quantizers.<parameter>`."""
    param = weight.rsplit(".", 1)[1]
    return "weight_quantizer" if param == "weight" else f"weight_quantizers.{param}"


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
