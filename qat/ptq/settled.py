"""Reusing a decoder layer's attention output once its linears are rounded (true-sequential rounding).

True-sequential GPTQ collects each group's inputs again after the groups before it are rounded, and then runs the
block once more for the next block's inputs. Once q/k/v/o are rounded nothing that feeds the attention changes
again in this block, so its output for each calibration batch is the same in the MLP groups' collects and in the
final pass: computed once and kept (as much memory as the block's inputs), each later forward returns it. On the
bundled model that is two of a block's four attention passes, with their q/k/v/o products.

Only the Llama layout's `self_attn` (called once per layer forward, after the groups that round it) is reused, and
only while the attention runs without activation quantizers: with them the final pass differs from the collects'
(which run with quantizers off), so the kept outputs are dropped before it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..quantizers import ActQuantizer


class AttentionReuse:
    """Keeps `layer.self_attn`'s output per calibration batch from the forward after its last linear is rounded.

    The layer's replays each run every calibration batch once, in order, so the n-th attention call after
    activation is batch n mod n_batches; a kept output whose shape does not match the call's input is an error, not
    a silent reuse.
    """

    def __init__(self, layer: nn.Module, n_batches: int) -> None:
        self.attn: Optional[nn.Module] = getattr(layer, "self_attn", None)
        self.n = n_batches
        self.kept: list[Any] = [None] * n_batches
        self.calls = 0
        self.active = False
        self._own: Any = None  # an instance-level forward someone else put there (e.g. an offloading hook)
        self.pending = set() if self.attn is None else {
            f"self_attn.{n}" for n, m in self.attn.named_modules() if isinstance(m, nn.Linear)}

    def rounded(self, names: list[str]) -> None:
        """These linears are rounded and frozen; once all of the attention's are, later forwards reuse its output."""
        if self.attn is None or self.active or not self.pending:
            return
        self.pending -= set(names)
        if not self.pending:
            self.active = True
            self._own = self.attn.__dict__.get("forward")
            self._inner = self.attn.forward
            self.attn.forward = self._forward  # an instance attribute: nn.Module.__call__ reads self.forward

    def _forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        i = self.calls % self.n
        self.calls += 1
        kept = self.kept[i]
        if kept is None:
            out = self._inner(hidden_states, *args, **kwargs)
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:  # eager attention's probabilities are (batch, heads, seq, seq): not kept
                self.kept[i] = out
            return out
        first = kept[0] if isinstance(kept, tuple) else kept
        if first.shape[:-1] != hidden_states.shape[:-1]:
            raise RuntimeError(f"ptq: the attention output kept for calibration batch {i} has shape "
                               f"{tuple(first.shape)}, the call's input {tuple(hidden_states.shape)}: the block's "
                               "replays did not run the batches in order")
        return kept

    def valid_with_quantizers(self) -> bool:
        """Whether the kept outputs still hold with the layer's quantizers switched back on."""
        return self.attn is not None and not any(isinstance(m, ActQuantizer) for m in self.attn.modules())

    def close(self) -> None:
        """Forget the kept outputs and give the attention its own forward back."""
        if self.active and self.attn is not None:
            if self._own is None:
                del self.attn.forward
            else:
                self.attn.forward = self._own
        self.active = False
        self.kept = [None] * self.n
