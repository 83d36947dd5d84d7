"""Block-wise reconstruction before end-to-end distillation (EfficientQAT's Block-AP).

Decoder block by block, the fake-quantized student's block trains its weights and quantizer parameters
(straight-through) so that its output on the student's own inputs reproduces the full-precision block's
output on the full-precision inputs, by squared error with each hidden channel weighted by the inverse of its
mean square (see channel_weights: EfficientQAT's plain MSE, measured on the bundled model, spent every block
after the 12th on one outlier channel it could not move). It walks the blocks as the PTQ loop does: layer 0's
inputs are captured once, then one student block and its teacher block sit on the device at a time, and the
trained block's outputs become the next block's inputs, so each block also learns to undo the error the
blocks before it left. Some calibration sequences are held out: each block's error on them, before and after,
is what the report gives (an error measured on the training sequences would reward overfitting).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..linear import QuantLinear
from ..quantizers import ActQuantizer, WeightQuantizer
from .blocks import capture_inputs, decoder_layers, outside_layers, run_block
from .config import BlockwiseConfig


@dataclass
class BlockResult:
    index: int
    # held-out squared error against the full-precision block, each channel's divided by its mean square in
    # the full-precision outputs (channel_weights), before training
    before: float
    after: float  # after; a block whose held-out error did not fall is put back as it came (after == before)
    seconds: float


@dataclass
class BlockwiseReport:
    blocks: list[BlockResult] = field(default_factory=list)
    train_sequences: int = 0
    held_out_sequences: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def param_groups(layer: nn.Module, cfg: BlockwiseConfig) -> list[dict]:
    """The block's trainable tensors: quantizer parameters at quantizer_lr, every other float parameter
    (the linears' weights, the norms) at lr."""
    quant_ids = {id(p) for m in layer.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))
                 for p in m.parameters(recurse=False)}
    weights, quant = [], []
    for p in layer.parameters():
        if not p.is_floating_point():
            continue
        (quant if id(p) in quant_ids else weights).append(p)
    groups = [{"params": weights, "lr": cfg.lr}]
    if quant:
        groups.append({"params": quant, "lr": cfg.quantizer_lr})
    return groups


def channel_weights(targets: list[torch.Tensor]) -> torch.Tensor:
    """1 / (each hidden channel's mean square over the full-precision block's outputs): a few channels of the
    residual stream carry activations hundreds of times larger than the rest (at the first token), and in plain
    MSE their error, which no later block can remove, would be the whole loss."""
    sq = sum(y.float().pow(2).sum(dim=tuple(range(y.dim() - 1))) for y in targets)
    n = sum(y.numel() // y.shape[-1] for y in targets)
    return 1.0 / (sq / n).clamp_min(1e-12)


def normalised_error(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of (out - y)^2 / (the channel's mean square): 1 is an error as large as the signal."""
    return ((out.float() - y.float()).pow(2) * w).mean()


def _mse(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
         w: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs):
            out = run_block(layer, [x], [kw])[0]
            total += float(normalised_error(out, y, w)) * y.numel()
            count += y.numel()
    return total / max(count, 1)


def reconstruct(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: BlockwiseConfig,
                device: Optional[torch.device] = None, seed: int = 0) -> BlockwiseReport:
    """Train each decoder block of `student` (fake-quantized, in place) to reproduce `teacher`'s block on the
    token ids (n, seq_len); the last `cfg.held_out` sequences only measure. Returns the per-block errors."""
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise ValueError(f"blockwise: the student has {len(s_layers)} decoder layers, the teacher {len(t_layers)}")
    if not any(isinstance(m, QuantLinear) for m in student.modules()):
        raise ValueError("blockwise reconstruction trains fake-quantized (QuantLinear) blocks; this student has none")
    b = cfg.batch_size
    n_train = (ids.shape[0] - cfg.held_out) // b * b
    if n_train < b or cfg.held_out < 1:
        raise ValueError(f"blockwise: {ids.shape[0]} sequences leave no full batch of {b} beside "
                         f"{cfg.held_out} held out; give more sequences or lower the batch")
    ids = torch.cat([ids[:n_train], ids[ids.shape[0] - cfg.held_out:]])
    home = next(student.parameters()).device
    device = device or home
    s_dtype = next(p for p in student.parameters() if p.is_floating_point()).dtype
    t_dtype = next(p for p in teacher.parameters() if p.is_floating_point()).dtype
    t0_all = time.perf_counter()
    # The embedding and rotary tables run once, on the teacher (the student's are the same, untrained).
    outside = outside_layers(teacher)
    for c in outside:
        c.to(device)
    inputs, kwargs = capture_inputs(teacher, ids.to(device), b, device)
    for c in outside:
        c.to(home)
    n_batches = n_train // b  # then the held-out batches; kwargs[j] (mask, positions) belong to batch j
    fp_in = [x.to(t_dtype) for x in inputs]
    q_in = [x.to(s_dtype) for x in inputs]
    report = BlockwiseReport(train_sequences=n_train, held_out_sequences=cfg.held_out)
    gen = torch.Generator().manual_seed(seed)
    for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
        t0 = time.perf_counter()
        s_layer.to(device)
        t_layer.to(device)
        fp_out = run_block(t_layer, fp_in, kwargs)
        target = [y.to(s_dtype) for y in fp_out]
        train, held = slice(0, n_batches), slice(n_batches, None)
        w = channel_weights(target[train])
        before = _mse(s_layer, q_in[held], target[held], kwargs[held], w)
        after = before
        if cfg.steps:
            saved = {k: v.detach().clone() for k, v in s_layer.state_dict().items()}
            _train_block(s_layer, q_in[train], target[train], kwargs[train], w, cfg, gen)
            after = _mse(s_layer, q_in[held], target[held], kwargs[held], w)
            if not after < before:  # it overfitted or diverged: the block stays as it came
                s_layer.load_state_dict(saved)
                after = before
        # The next block learns on what this trained block now gives, as the student will run.
        q_in = [y.to(s_dtype) for y in run_block(s_layer, q_in, kwargs)]
        fp_in = fp_out
        s_layer.to(home)
        t_layer.to(home)
        dt = time.perf_counter() - t0
        report.blocks.append(BlockResult(i, before, after, dt))
        if cfg.progress:
            print(f"blockwise: block {i + 1}/{len(s_layers)} held-out mse {before:.4g} -> {after:.4g} "
                  f"({dt:.1f}s)", file=sys.stderr, flush=True)
    report.seconds = time.perf_counter() - t0_all
    return report


def _train_block(layer: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], kwargs: list[dict],
                 w: torch.Tensor, cfg: BlockwiseConfig, gen: torch.Generator) -> None:
    """cfg.steps AdamW steps on random training batches, cosine-decayed learning rates, the channel-normalised
    squared error to the targets."""
    opt = torch.optim.AdamW(param_groups(layer, cfg), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
    was_training = layer.training
    layer.train()
    with torch.enable_grad():
        for _ in range(cfg.steps):
            j = int(torch.randint(len(xs), (1,), generator=gen))
            out = layer(xs[j], **kwargs[j])
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = normalised_error(out, ys[j], w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    layer.train(was_training)
    for p in layer.parameters():
        p.grad = None
