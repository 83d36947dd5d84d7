"""Rotation (QuaRot, SpinQuant's R1/R2, and optionally R3/R4): fold orthogonal matrices into the weights so the
full-precision model computes the same function while the weights and activations that get quantized lose their
outlier channels.

The residual stream turns by one orthogonal Q (hidden x hidden): every RMSNorm weight is first folded into the
linears it feeds (so the norms are plain x / rms(x), which commutes with Q), the embedding rows and the head's
columns turn by Q, each linear reading the stream turns its input columns (W Q) and each linear writing it turns its
output rows (Q^T W). With `heads`, each attention head's values turn by one head_dim x head_dim matrix too (v_proj's
rows, o_proj's columns). In a mixture-of-experts layer the fused experts' up (gate-and-up) weights read the stream and
their down weights and biases write it, expert by expert, and the router reads it too: turned with them, its scores
and so the routing are unchanged (`mlp_tensors`). Q is a Hadamard matrix with random signs (`kind=hadamard`,
QuaRot's choice; sizes that are products of 2^k and orders p + 1 with p a prime = 3 mod 4, e.g. 576 = 12 * 12 * 4)
or a random orthogonal matrix (`kind=random`). Both come from `seed`, so the same settings give the same rotation
in any process (block-wise training rotates its full-precision reference with the start's record).

The rotated model is the original architecture with its norm weights at 1 and its head untied from the embedding
(the final norm's weight is folded into the head), so every loader, `convert` and the int kernels take it as it
is. What it costs: the untied head's parameters (vocab x hidden more floats).

`online` adds the Hadamards no weight absorbs (qat.online): R4 folds H into each down_proj's weight (W H, one
rounding with R1) and turns its input online; R3 turns queries and keys after RoPE. The model then needs distqat's
reader, which reinstalls them from the record this returns (`online`, `online_block`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import online
from ..experts import describe, experts_modules
from ..hadamard import _hadamard_factors, _paley, hadamard, orthogonal  # noqa: F401 (their home before qat.hadamard)
from ..keys import INIT_KEY, PTQ_KEY, ROTATE_KEY
from ..spec import QuantSpec
from .blocks import check_foldable, decoder_layers
from .config import ONLINE_ROTATIONS, ROTATE_KINDS, RotateConfig
from .parts import ModelTransform

KINDS = ROTATE_KINDS
READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
WRITES = ("self_attn.o_proj",)


def _head_dims(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, hd


def check_rotatable(model: nn.Module, method: str = "rotate") -> None:
    """One-line ValueError unless the model is a pre-norm Llama-layout decoder with plain RMSNorms (where the fold
    is exact); the rotation itself checks the logits afterwards."""
    check_foldable(model, method, "rotations", experts=True)
    layers = decoder_layers(model)
    hidden = int(model.config.hidden_size)
    for i, layer in enumerate(layers):
        mlp_tensors(layer.mlp, hidden, f"model.layers.{i}.mlp", method)
    norms = [(f"layers.{i}.{n}", layer.get_submodule(n)) for i, layer in enumerate(layers)
             for n in ("input_layernorm", "post_attention_layernorm")]
    final = getattr(model.model, "norm", None)
    norms.append(("norm", final))
    for name, norm in norms:
        if norm is None or "rmsnorm" not in type(norm).__name__.lower() or getattr(norm, "bias", None) is not None:
            raise ValueError(f"ptq.method={method}: model.{name} is {type(norm).__name__}, not a bias-free RMSNorm; "
                             "the rotation needs one before each group of linears (drop rotate from the method)")
    if model.get_output_embeddings() is None or getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"ptq.method={method}: the model needs a bias-free linear head (lm_head)")


def mlp_tensors(mlp: nn.Module, hidden: int, name: str = "mlp", method: str = "rotate"
                ) -> list[tuple[torch.Tensor, str, bool]]:
    """The MLP's tensors the rotation turns: (tensor, "read" | "write" | "bias", stored transposed).

    A dense MLP's gate/up read the stream and its down_proj writes it. In an MoE layer the fused experts' up
    (gate-and-up) parameter reads it and their down parameter (and its bias) writes it; the router reads it too
    (turned with them, the scores are unchanged), as do shared experts' gate/up and their gate, and shared experts'
    down_proj writes it. Biases of what reads the stream stay; ValueError for a tensor of unknown role.
    """
    out: list[tuple[torch.Tensor, str, bool]] = []
    fused: set[int] = set()
    for n, m in experts_modules(mlp):
        full = f"{name}.{n}" if n else name
        lay = describe(m, full)
        if lay.post_norm:
            raise ValueError(f"ptq.method={method}: {full} normalises each expert's output, which the rotation does "
                             "not commute with; drop rotate from the method")
        out += [(getattr(m, lay.up), "read", lay.transposed), (getattr(m, lay.down), "write", lay.transposed)]
        if lay.bias:
            out.append((getattr(m, f"{lay.down}_bias"), "bias", False))
        fused |= {id(p) for p in m.parameters()}
    for n, m in mlp.named_modules():
        writes = isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] == "down_proj"
        for pn, p in m.named_parameters(recurse=False):
            if id(p) in fused or p.dim() < 2 and not writes:
                continue  # a reader's bias, a router's correction bias: the input's turn leaves them alone
            if writes:
                out.append((p, "write" if pn == "weight" else "bias", False))
            elif p.dim() == 2 and p.shape[-1] == hidden:
                out.append((p, "read", False))
            else:
                raise ValueError(f"ptq.method={method}: {name}.{n}.{pn} {tuple(p.shape)} neither reads nor writes "
                                 "the residual stream as far as distqat knows; drop rotate from the method")
    return out


def _probe(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(16, device=model.get_input_embeddings().weight.device).mul(7919).remainder(vocab)[None]
    return model(ids, use_cache=False).logits.float()


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: RotateConfig, device: Optional[torch.device] = None) -> dict:
    """Turn `model` in place (full-precision model, before quantization) and return the record of the turn.

    The arithmetic runs in float64 on `device` (the weights' own device when None), one weight at a time, and the
    results are cast back to each weight's dtype. Checks the logits on a probe before and after: a layer this
    fold does not describe (a norm after the attention, say) fails with a ValueError instead of a broken model.
    """
    check_rotatable(model)
    online.check(model, cfg.online, cfg.online_block)
    layers = decoder_layers(model)
    config = model.config
    hidden = int(config.hidden_size)
    heads, kv_heads, hd = _head_dims(config)
    if cfg.heads and (layers[0].get_submodule("self_attn.v_proj").out_features != kv_heads * hd
                      or layers[0].get_submodule("self_attn.o_proj").in_features != heads * hd):
        raise ValueError("ptq.rotate.heads=true: v_proj/o_proj do not have num_key_value_heads/num_attention_heads "
                         f"x head_dim={hd} features; set ptq.rotate.heads=false")
    was_training = model.training
    model.eval()
    before = _probe(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = device or next(model.parameters()).device
    q = orthogonal(hidden, cfg.kind, gen).to(dev)
    qh = orthogonal(hd, cfg.kind, gen).to(dev) if cfg.heads else None
    # R4: down_proj reads x H online, so its weight holds W H (one rounding with R1's turn of its rows).
    r4 = {id(down.weight): rot.matrix().to(dev) for _, down, rot in online.down_rotations(model, cfg.online_block)} \
        if "down" in cfg.online else {}

    def update(p: torch.Tensor, fn) -> None:
        p.copy_(fn(p.detach().to(dev, torch.float64)).to(p.device, p.dtype))

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    text = getattr(config, "text_config", None)
    for c in [config] + ([text] if text is not None and text is not config else []):
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False  # else loading the saved folder would tie the head back to the embedding

    def take_norm(norm: nn.Module) -> torch.Tensor:
        g = norm.weight.detach().to(dev, torch.float64).clone()
        norm.weight.fill_(1.0)
        return g[None, :]

    # Each linear reading the stream: its norm's weight folded into its columns, then turned (one rounding).
    g = take_norm(model.model.norm)
    update(head.weight, lambda w: (w * g) @ q)
    update(embed.weight, lambda w: w @ q)
    for layer in layers:
        g_attn, g_mlp = take_norm(layer.input_layernorm), take_norm(layer.post_attention_layernorm)
        for n in READS:
            update(layer.get_submodule(n).weight, lambda w, g=g_attn: (w * g) @ q)
        for n in WRITES:
            lin = layer.get_submodule(n)
            update(lin.weight, lambda w: q.T @ w)
            if lin.bias is not None:
                update(lin.bias, lambda b: b @ q)
        # Stacked experts (E, out, in) turn expert by expert through matmul's broadcast; stored (E, in, out), the
        # same maths transposed.
        for p, role, transposed in mlp_tensors(layer.mlp, hidden):
            if role == "read":
                update(p, (lambda w, g=g_mlp: q.T @ (g.T * w)) if transposed else (lambda w, g=g_mlp: (w * g) @ q))
            elif role == "write" and id(p) in r4:
                h4 = r4[id(p)]
                update(p, lambda w, h=h4: q.T @ w @ h)
            elif role == "write":
                update(p, (lambda w: w @ q) if transposed else (lambda w: q.T @ w))
            else:
                update(p, lambda b: b @ q)
        if qh is not None:
            v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
            update(v.weight, lambda w: torch.einsum("ji,hjc->hic", qh, w.view(kv_heads, hd, -1)).reshape(w.shape))
            if v.bias is not None:
                update(v.bias, lambda b: (b.view(kv_heads, hd) @ qh).reshape(b.shape))
            update(o.weight, lambda w: (w.view(w.shape[0], heads, hd) @ qh).reshape(w.shape))

    online.install(model, cfg.online, cfg.online_block)
    after = _probe(model)
    err = ((after - before).norm() / before.norm().clamp_min(1e-12)).item()
    tol = 1e-3 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 5e-2
    model.train(was_training)
    if not err <= tol:
        raise ValueError(f"ptq.method=rotate: the rotated {type(model).__name__} is not the same function (relative "
                         f"logit change {err:.3g} > {tol:g}); its layers are not the pre-norm layout the rotation "
                         "assumes: drop rotate from the method")
    return {**asdict(cfg), "hidden": hidden, "head_dim": hd, "probe_rel_change": err}


def rotation_of(config: Any) -> Optional[RotateConfig]:
    """The rotation a saved model's config records (PTQ result, or a student started from one); None if none."""
    for key in (PTQ_KEY, INIT_KEY):
        rec = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(rec, dict) and isinstance(rec.get(ROTATE_KEY), dict):
            r = rec[ROTATE_KEY]
            return RotateConfig(kind=r["kind"], heads=bool(r["heads"]), seed=int(r["seed"]),
                                online=list(r.get("online") or []), online_block=int(r.get("online_block") or 0))
    return None


class Rotate(ModelTransform):
    """The `rotate` part of a PTQ method (`rotate+gptq`): turns the model before the block loop's first block."""

    name: ClassVar[str] = "rotate"

    def __init__(self, cfg: Optional[RotateConfig] = None) -> None:
        self.cfg = cfg or RotateConfig()

    handles_experts: ClassVar[bool] = True

    def check(self, spec: QuantSpec) -> None:
        if self.cfg.kind not in KINDS:
            raise ValueError(f"ptq.rotate.kind={self.cfg.kind!r}: use one of {KINDS}")
        bad = [o for o in self.cfg.online if o not in ONLINE_ROTATIONS]
        if bad:
            raise ValueError(f"ptq.rotate.online={list(self.cfg.online)}: {bad[0]!r} is not an online rotation; use a "
                             f"subset of {list(ONLINE_ROTATIONS)}")

    def apply_model(self, model: nn.Module, device: torch.device) -> dict:
        return rotate_model(model, self.cfg, device)
