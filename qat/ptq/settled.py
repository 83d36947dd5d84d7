"""Reusing what a block's later passes would compute again, once the linears behind it are rounded (true-sequential
rounding).

True-sequential GPTQ collects each group's inputs again after the groups before it are rounded, and then runs the
block once more for the next block's inputs. Two things in those passes are the same every time:
- once q/k/v/o are rounded, nothing that feeds the attention changes again in this block, so its output for each
  calibration batch is the same in the MLP groups' collects and in the final pass: computed once, then returned;
- the last group's collect sees down_proj's input (act(gate) * up, with gate/up rounded) for every batch; the final
  pass then computes the MLP as down_proj of that input instead of running gate_proj and up_proj again.
On the bundled model that is two of a block's four attention passes with their q/k/v/o products, and two of the
final pass's three MLP products. Kept attention outputs take as much memory as the block's inputs; down_proj's
inputs are kept only when they fit in a quarter of the memory free on their device (else the MLP runs).

Only the Llama layout's `self_attn` and `mlp` (each called once per layer forward) are reused. The MLP's shortcut is
checked on the first batch against the MLP's own forward (bitwise: the same products on the same tensors) and
dropped if they differ. Dynamic activation quantizers are on for rounded linears in the collects as in the final
pass; static ones are switched on only after rounding (and calibrated on the finished block), so with them nothing
kept is used after the rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory free on the device (CUDA: the allocator's view; CPU: Linux's MemAvailable), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Patched:
    """A module whose forward is replaced by `fn` until `restore` (an instance attribute, which nn.Module.__call__
    reads before the class's; an instance-level forward someone else put there, e.g. an offloading hook, comes
    back)."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.module, self.own, self.inner = module, module.__dict__.get("forward"), module.forward
        module.forward = fn

    def restore(self) -> None:
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own


class BlockReuse:
    """Kept per-batch attention outputs and down_proj inputs of one block.

    Each replay of the block runs every calibration batch once, in order, so the n-th call of a patched forward
    is batch n mod n_batches; a kept tensor whose shape does not match the call's input is an error, not a silent
    reuse.
    """

    def __init__(self, layer: nn.Module, n_batches: int) -> None:
        self.attn: nn.Module = layer.self_attn
        self.mlp: Optional[nn.Module] = getattr(layer, "mlp", None)  # a layout may name its MLP otherwise
        self.n = n_batches
        self.kept: list[Any] = [None] * n_batches
        self.down_in: list[torch.Tensor] = []
        self.calls = self.mlp_calls = 0
        self.patches: dict[str, _Patched] = {}
        self.pending = {f"self_attn.{n}" for n, m in self.attn.named_modules() if isinstance(m, nn.Linear)}

    @property
    def active(self) -> bool:
        return "attn" in self.patches

    def rounded(self, names: list[str]) -> None:
        """These linears are rounded and frozen; once all of the attention's are, later forwards reuse its output."""
        self.pending -= set(names)
        if not self.pending and not self.active:
            self.patches["attn"] = _Patched(self.attn, self._attention)

    def _attention(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        i = self.calls % self.n
        self.calls += 1
        kept = self.kept[i]
        if kept is None:
            out = self.patches["attn"].inner(hidden_states, *args, **kwargs)
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:  # eager attention's probabilities are (batch, heads, seq, seq): not kept
                self.kept[i] = out
            return out
        _same_rows(kept[0] if isinstance(kept, tuple) else kept, hidden_states, i, "attention output")
        return kept

    def keep_down_inputs(self, names: list[str]) -> Optional[torch.utils.hooks.RemovableHandle]:
        """Before the collect of the group `names`: when it is down_proj alone, keep its input per batch (a hook
        to remove after the collect), unless they would not fit."""
        if names != ["mlp.down_proj"] or not self.active or self.mlp is None:
            return None

        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            if not self.down_in:
                free = free_bytes(x.device)
                if free is None or x.numel() * x.element_size() * self.n > free // 4:
                    handle.remove()
                    return
            self.down_in.append(x.detach())

        # Before any hook of its own (R4's online Hadamard): the kept input is what down_proj is called with.
        handle = self.mlp.down_proj.register_forward_pre_hook(hook, prepend=True)
        return handle

    def final_pass(self) -> None:
        """The block is rounded: its final pass computes the MLP from the kept down_proj inputs (if all were kept)."""
        if len(self.down_in) == self.n and "mlp" not in self.patches:
            self.patches["mlp"] = _Patched(self.mlp, self._mlp)

    def _mlp(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        i = self.mlp_calls % self.n
        self.mlp_calls += 1
        down_in = self.down_in[i]
        _same_rows(down_in, x, i, "down_proj input")
        out = self.mlp.down_proj(down_in)
        if i == 0 and self.mlp_calls == 1:
            real = self.patches["mlp"].inner(x, *args, **kwargs)
            if not (isinstance(real, torch.Tensor) and torch.equal(real, out)):
                self.patches.pop("mlp").restore()  # the MLP is not down_proj(act(gate) * up) here: run it
                self.down_in = []
                return real
        return out

    def close(self) -> None:
        """Forget everything kept and give the modules their own forwards back."""
        for p in self.patches.values():
            p.restore()
        self.patches = {}
        self.kept = [None] * self.n
        self.down_in = []


def _same_rows(kept: torch.Tensor, x: torch.Tensor, i: int, what: str) -> None:
    if kept.shape[:-1] != x.shape[:-1]:
        raise RuntimeError(f"ptq: the {what} kept for calibration batch {i} has shape {tuple(kept.shape)}, the "
                           f"call's input {tuple(x.shape)}: the block's replays did not run the batches in order")
