"""`lora.requant=gptq-grid` and `gptq-keep`: re-rounding base + adapter onto the base's own grid with GPTQ's error
feedback, on the calibration text.

Rounding the merged weight W_base + dW to nearest on the base's grid (`rtn`) gives back the base's codes almost
everywhere: an adapter moves most weights by far less than half a step, so the merge loses what training gained.
Here the target is the same merged weight on the same grid (the base's scales and zero points, widened only where
the merged weight leaves it, as `rtn` does), but the codes are chosen column by column with GPTQ's error feedback
(`qat.ptq.gptq.gptq_on_grid`) on the merged model's own calibration inputs: the rounding error of each column is
pushed into the columns not yet rounded, so many small moves add up to codes that change where the layer's output
needs them to. Since the base sits on its grid exactly, a zero adapter gives the base back bit for bit.

- `gptq-grid`: every code may move.
- `gptq-keep`: a code stays the base's wherever the merged weight still rounds to it (RTN's choice); only the codes
  whose merged value crossed a rounding boundary are chosen again, from the weight with the error of every column
  before them fed forward. It moves only codes that `rtn` moves (so no more of them), placed to compensate.

Blocks run in order, each calibrated on the outputs of the blocks already rounded (and, with
`ptq.gptq.true_sequential`, each linear on the outputs of the ones before it), as `run_ptq` does. A linear that
never runs on the calibration text (no Hessian) and packed MoE expert stacks round as `rtn` does; the report says
so per layer (`algorithm`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..ptq.blocks import block_groups, capture_inputs, collect, decoder_layers, run_block
from ..ptq.gptq import GPTQConfig, gptq_on_grid
from ..quantizers import dequantize_codes, quantize_codes, weight_rows
from ..runtime.packed import PackedLinear

GRID_METHODS = ("gptq-grid", "gptq-keep")
CALIB_BATCH = 8  # calibration sequences per forward
Grid = tuple[torch.Tensor, Optional[torch.Tensor]]  # (scale rows, zero rows or None) as `weight_rows` lays them out


def _round(base: PackedLinear, target: torch.Tensor, w0: torch.Tensor, grid: Grid, method: str,
           h: Optional[torch.Tensor], cfg: GPTQConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the merged weight `target` rounded onto `grid`, its report fields) of one packed linear."""
    spec, (s, z) = base.weight_spec, grid
    rows, base_rows = weight_rows(target, spec), weight_rows(w0, spec)
    c0 = quantize_codes(base_rows, s, z, spec)
    # rows whose grid is the base's own (not widened for this merge): the base's codes sit on it exactly
    own = (dequantize_codes(c0, s, z, spec) == base_rows).all(-1, keepdim=True)
    rtn = quantize_codes(rows, s, z, spec)
    if h is None:  # never ran on the calibration text: nothing to weigh the error by
        codes, algorithm = rtn, "rtn-grid"
    else:
        fixed = None
        if method == "gptq-keep":
            fixed = (c0.reshape(target.shape), ((rtn == c0) & own).reshape(target.shape))
        _, codes = gptq_on_grid(target, h, s, z, spec, cfg.damp, cfg.block_size, cfg.act_order, fixed)
        codes, algorithm = weight_rows(codes, spec), method
    w = dequantize_codes(codes, s, z, spec).reshape(target.shape)
    moved = float(((codes != c0) & own).float().mean())  # of the codes, the base's that changed
    return w, {"algorithm": algorithm, "codes_moved": moved}


@torch.no_grad()
def requant_on_grid(model: nn.Module, targets: dict[str, tuple[PackedLinear, torch.Tensor, torch.Tensor]],
                    grids: dict[str, Grid], method: str, calib_ids: torch.Tensor,
                    cfg: GPTQConfig) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
    """Name -> (rounded weight, report fields) for every packed linear of `targets` (name -> (the packed base layer,
    the merged weight, the base's dequantized weight)), each rounded onto its grid of `grids` by `method`.
    `model` is the unloaded base: each of these linears is left an nn.Linear holding its rounded weight (the
    caller turns them into frozen fake-quant layers); the rest of the model is run as it is."""
    if method not in GRID_METHODS:
        raise ValueError(f"lora.requant={method!r}: the grid re-roundings are {', '.join(GRID_METHODS)}")
    for name, (base, target, _) in targets.items():  # merged, in full precision: what calibration runs
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.compute_dtype,
                        device=target.device)
        lin.weight.copy_(target)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin.requires_grad_(False))
    out: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}

    def finish(name: str, h: Optional[torch.Tensor]) -> None:
        base, target, w0 = targets[name]
        out[name] = _round(base, target, w0, grids[name], method, h, cfg)
        model.get_submodule(name).weight.copy_(out[name][0])  # what the layers after it are calibrated on

    device = next(model.parameters()).device
    layers = decoder_layers(model)
    inputs, kwargs = capture_inputs(model, calib_ids, CALIB_BATCH, device)
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        groups = block_groups(layer)
        collect(layer, groups, inputs, kwargs, want_h=True)
        for gi, g in enumerate(groups):
            names = [n for n in g.names if prefix + n in targets]
            if names and gi > 0 and cfg.true_sequential:
                collect(layer, [g], inputs, kwargs, want_h=True, stop_early=True)
            for n in names:
                finish(prefix + n, g.stats.h if g.stats is not None and g.stats.n else None)
        if i + 1 < len(layers):
            inputs = run_block(layer, inputs, kwargs)
    for name in targets:  # outside the decoder layers (an lm_head the spec quantizes), or in no group
        if name not in out:
            finish(name, None)
    return out
