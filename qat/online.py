"""Online rotations (QuaRot/SpinQuant's R4 and R3): the Hadamards no weight can absorb, run in the forward.

- R4 (`down`): each decoder layer's MLP down_proj reads x H instead of x, its weight holding W H (folded offline by
  qat.ptq.rotate), so x W^T is unchanged while the activation its input quantizer sees has lost its outlier channels.
  H is one Hadamard of the MLP's width, or kron(I, H_block) (`block`).
- R3 (`qk`): queries and keys turn by a Hadamard of head_dim after RoPE (q H (k H)^T = q k^T), so a quantized KV
  cache holds turned keys. It runs in qat.kv's attention wrapper, before K is fake-quantized; the integer cache
  (qat.runtime.kv_cache) turns keys with the same function before it stores them.

Why a forward pre-hook for R4 rather than a module of our own: the hook sits in front of whatever down_proj is (a
Linear, a QuantLinear whose input quantizer must see the turned activation, the runtime's IntLinear after convert),
so one mechanism serves QAT, PTQ and the converted model, and the state dict and module tree stay the model's own
(every loader, convert and DeepSpeed see the architecture they know). The price is that the hook lives on the module
object: code that replaces down_proj must call `reinstall` (qat.apply.quantize_model does).

What is installed is recorded twice: on the model object (`ATTR`, for reinstall after a module swap in memory) and,
by the rotation that folded R4, in config.json's rotation record (qat.keys.ROTATE_KEY inside the PTQ or init record),
from which every load path reinstalls it (`reinstall`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import kv as kv_quant
from .experts import experts_modules
from .hadamard import Rotation
from .keys import INIT_KEY, PTQ_KEY, ROTATE_KEY

ONLINE = ("down", "qk")  # qat.ptq.config.ONLINE_ROTATIONS
ATTR = "_online_rotations"  # on the model: the OnlineSpec installed
_MLP = re.compile(r"(^|\.)layers\.\d+\.mlp$")


@dataclass(frozen=True)
class OnlineSpec:
    """Which online rotations a model runs (a subset of ONLINE) and R4's block size (0: the full width)."""

    ops: tuple[str, ...]
    block: int = 0


class InputRotation:
    """The forward pre-hook of R4: the module's first argument turned by `rotation` (autograd flows through it)."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.rotation(args[0]), *args[1:])

    def __repr__(self) -> str:
        return f"InputRotation({self.rotation!r})"


def online_of(config: Any) -> Optional[OnlineSpec]:
    """The online rotations a saved model's config records (PTQ result, a student started from one, or a converted
    folder of either); None if none. Records written before online rotations existed have none."""
    for key in (PTQ_KEY, INIT_KEY):
        rec = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(rec, dict) and isinstance(rec.get(ROTATE_KEY), dict):
            r = rec[ROTATE_KEY]
            ops = tuple(r.get("online") or ())
            return OnlineSpec(ops, int(r.get("online_block") or 0)) if ops else None
    return None


def _mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _MLP.search(n)]


def _check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    bad = [o for o in ops if o not in ONLINE]
    if bad:
        raise ValueError(f"ptq.rotate.online={list(ops)}: {bad[0]!r} is not an online rotation; use a subset of "
                         f"{list(ONLINE)}")
    return tuple(o for o in ONLINE if o in ops)


def turns_input(module: nn.Module) -> Optional[Rotation]:
    """The rotation R4 applies to this module's input, or None."""
    for h in module._forward_pre_hooks.values():
        if isinstance(h, InputRotation):
            return h.rotation
    return None


def down_rotations(model: nn.Module, block: int = 0) -> list[tuple[str, nn.Module, Rotation]]:
    """(name, down_proj, R4) per decoder layer; ValueError (one line, naming the fix) for a fused-experts MLP, an MLP
    without down_proj, or a width with no Hadamard of the block size."""
    out, made = [], {}
    for name, mlp in _mlps(model):
        if experts_modules(mlp):
            raise ValueError(f"ptq.rotate.online=[down]: model {name} holds fused MoE experts, whose down projections "
                             "get no online Hadamard here; drop down from ptq.rotate.online")
        down = getattr(mlp, "down_proj", None)
        width = getattr(down, "in_features", None)
        if width is None:
            raise ValueError(f"ptq.rotate.online=[down]: {name} has no down_proj linear to turn the input of; drop "
                             "down from ptq.rotate.online")
        if width not in made:
            made[width] = Rotation(width, block)
        out.append((f"{name}.down_proj", down, made[width]))
    if not out:
        raise ValueError(f"ptq.rotate.online=[down]: {type(model).__name__} has no model.layers.<i>.mlp to turn; drop "
                         "down from ptq.rotate.online")
    return out


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def check(model: nn.Module, ops: Sequence[str], block: int = 0) -> None:
    """What `install` would refuse, before anything changes (one-line ValueErrors)."""
    ops = _check_ops(ops)
    if "down" in ops:
        down_rotations(model, block)
    if "qk" in ops:
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(f"ptq.rotate.online=[qk]: {type(model).__name__} does not route attention through "
                             "transformers' AttentionInterface; drop qk from ptq.rotate.online")
        if not kv_quant.attention_modules(model):
            raise ValueError(f"ptq.rotate.online=[qk]: found no attention modules in {type(model).__name__}; drop qk "
                             "from ptq.rotate.online")
        for _, attn in kv_quant.attention_modules(model):
            Rotation(_head_dim(model, attn), 0, "R3 of head_dim", "drop qk from ptq.rotate.online")


def install(model: nn.Module, ops: Sequence[str], block: int = 0) -> list[str]:
    """Attach the online rotations `ops` (a subset of ONLINE) to `model`, whose weights already hold their folded
    part; idempotent (a module turned already is left alone). Returns the modules turned."""
    ops = _check_ops(ops)
    check(model, ops, block)
    done: list[str] = []
    if "down" in ops:
        for name, down, rot in down_rotations(model, block):
            have = turns_input(down)
            if have is not None:
                if have.key() != rot.key():
                    raise ValueError(f"{name} already turns its input by {have}; the model was rotated with another "
                                     "online_block")
                continue
            down.register_forward_pre_hook(InputRotation(rot), prepend=True)  # before any hook reading the input
            done.append(name)
    if "qk" in ops:
        made: dict[int, Rotation] = {}
        for name, attn in kv_quant.attention_modules(model):
            hd = _head_dim(model, attn)
            if getattr(attn, kv_quant.QK_ROTATION, None) is None:
                if hd not in made:
                    made[hd] = Rotation(hd)
                setattr(attn, kv_quant.QK_ROTATION, made[hd])
                done.append(name)
        base = getattr(model.config, "_attn_implementation", None) or "sdpa"
        kv_quant.set_attention(model, kv_quant.register(base))
    old = getattr(model, ATTR, None) or OnlineSpec(())
    merged = tuple(o for o in ONLINE if o in ops or o in old.ops)
    setattr(model, ATTR, OnlineSpec(merged, block if "down" in ops else old.block))
    return done


def reinstall(model: nn.Module) -> list[str]:
    """Install what the model records (in memory, else its config's rotation record) again: after a load, or after
    code replaced the modules that carried the hooks. Nothing for a model without online rotations."""
    spec = getattr(model, ATTR, None) or online_of(getattr(model, "config", None) or {})
    return install(model, spec.ops, spec.block) if spec is not None and spec.ops else []


def installed(model: nn.Module) -> Optional[OnlineSpec]:
    return getattr(model, ATTR, None)


def key_rotation(model: nn.Module) -> Optional[Rotation]:
    """The R3 rotation the model's attention applies (what an integer KV cache must turn keys by), or None."""
    for _, attn in kv_quant.attention_modules(model):
        rot = getattr(attn, kv_quant.QK_ROTATION, None)
        if rot is not None:
            return rot
    return None


def fold_down(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W H for a (out, in) float64 weight: what a down_proj reading x H must hold to compute x W^T."""
    return weight @ rotation.matrix().to(weight.device, weight.dtype)
