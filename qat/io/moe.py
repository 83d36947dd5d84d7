"""A dense Llama model turned into a Mixtral mixture of experts from its own weights (MoEfication).

`qat.io.models` names the result `bundled:smollm2-135m-moe` and caches it like the dense bundled model; this module
only builds a folder from a folder (see `build_moe` for the construction).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig

from ..keys import COMPLETE_MARKER

METHODS = ("coactivation", "gate-kmeans")


class MoEError(ValueError):
    """Settings a dense model cannot be split with; the message names the fix."""


@dataclass(frozen=True)
class MoESplit:
    """How `build_moe` splits a model; the defaults are what `bundled:smollm2-135m-moe` ships (docs/ACCURACY.md
    compares them with other choices)."""

    experts: int = 8  # E: each expert holds intermediate_size / E neurons of the dense MLP
    top_k: int = 6  # k: experts each token goes through
    spread: float = 1e-5  # the router logits' spread across experts (per token std, on the calibration text)
    sequences: int = 16  # calibration text the model writes itself: this many samples ...
    length: int = 256  # ... of this many tokens each
    seed: int = 0
    method: str = "coactivation"  # or "gate-kmeans": see build_moe

    def describe(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def check_split(config: PretrainedConfig, split: MoESplit) -> None:
    """MoEError before any work when `split` cannot turn the model of `config` into a Mixtral model."""
    if config.model_type != "llama":
        raise MoEError(f"build_moe splits Llama models (whose attention is Mixtral's); this one is a "
                       f"{config.model_type!r} model: give a Llama model folder")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise MoEError("the model has attention or MLP biases, which Mixtral has no place for: give a model without")
    size = config.intermediate_size
    if split.experts < 1 or size % split.experts:
        fits = [e for e in range(2, 65) if size % e == 0]
        raise MoEError(f"the intermediate size {size} does not split into experts={split.experts} equal experts: "
                       f"choose a number of experts that divides it ({', '.join(map(str, fits))})")
    if not 1 <= split.top_k <= split.experts:
        raise MoEError(f"top_k={split.top_k} must be between 1 and experts={split.experts}: choose one in that range")
    if split.method not in METHODS:
        raise MoEError(f"method={split.method!r} is not one of {list(METHODS)}")
    if split.spread < 0 or split.sequences < 1 or split.length < 1:
        raise MoEError(f"spread must be >= 0 and sequences, length >= 1; got {split.describe()}")


def mixtral_config(config: PretrainedConfig, split: MoESplit) -> PretrainedConfig:
    """The Mixtral config that computes what the Llama `config` does, with its MLP as `split.experts` experts."""
    check_split(config, split)
    from transformers import MixtralConfig  # lazy: every command imports this module; only a build needs Mixtral

    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None), hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings, attention_dropout=config.attention_dropout,
        rope_parameters=dict(config.rope_parameters), sliding_window=None,  # Llama attends to the whole context
        intermediate_size=config.intermediate_size // split.experts,
        num_local_experts=split.experts, num_experts_per_tok=split.top_k, router_jitter_noise=0.0,
        dtype=config.dtype,
    )


@torch.no_grad()
def calibration_inputs(model: nn.Module, split: MoESplit) -> list[Tensor]:
    """Each layer's MLP inputs (tokens, hidden) on text the model writes itself: `split.sequences` samples of
    `split.length` tokens from its BOS token at temperature 1, under `split.seed` (the global RNG is left as it
    was). The inputs are caught while the text is sampled (one token per sequence and step), so the text is never
    run again; the BOS position is left out (an outlier no text repeats)."""
    layers = model.model.layers
    steps: list[list[Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0].float()))
             for layer, seen in zip(layers, steps)]
    start = torch.full((split.sequences, 1), model.config.bos_token_id, dtype=torch.long)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(split.seed)
            model.generate(
                start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=split.length, min_new_tokens=split.length, pad_token_id=model.config.pad_token_id,
            )
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(seen, dim=1)[:, 1:].reshape(-1, model.config.hidden_size) for seen in steps]


def balanced_assign(cost: Tensor, size: int) -> Tensor:
    """Each row's column (rows, cols) -> (rows,), `size` rows per column, the cheapest (row, column) pairs taken
    first: a greedy balanced assignment, exact enough for k-means and deterministic (a stable sort)."""
    rows, cols = cost.shape
    owner, room, left = [-1] * rows, [size] * cols, rows
    for pair in torch.argsort(cost.flatten(), stable=True).tolist():
        row, col = divmod(pair, cols)
        if owner[row] < 0 and room[col]:
            owner[row], room[col], left = col, room[col] - 1, left - 1
            if not left:
                break
    return torch.tensor(owner)


def balanced_kmeans(features: Tensor, clusters: int, seed: int, iters: int = 30) -> Tensor:
    """Each row's cluster, every cluster the same size: spherical k-means (cosine similarity) on unit rows, the
    centroids started at `clusters` rows drawn under `seed`."""
    features = F.normalize(features.float(), dim=1).contiguous()  # a transposed view multiplies 20x slower
    n = features.shape[0]
    centroids = features[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:clusters]]
    owner = torch.full((n,), -1)
    for _ in range(iters):
        new = balanced_assign(-features @ centroids.T, n // clusters)
        if torch.equal(new, owner):
            break
        owner = new
        centroids = F.normalize(F.one_hot(owner, clusters).float().T @ features, dim=1)
    return owner


def split_neurons(features: Tensor, experts: int, seed: int) -> Tensor:
    """(experts, neurons per expert) neuron indices, ascending in each row: the neurons whose feature rows
    (neurons, features) point the same way share an expert."""
    owner = balanced_kmeans(features, experts, seed)
    return torch.stack([torch.nonzero(owner == e).flatten() for e in range(experts)])


def fit_router(x: Tensor, act: Tensor, down: Tensor, groups: Tensor, spread: float) -> Tensor:
    """The router weight (experts, hidden): a ridge least-squares fit of each expert's log output norm from the MLP
    input x, scaled by `scale_router`."""
    gram = torch.stack([down[:, g].T @ down[:, g] for g in groups])  # ||a W^T||^2 = a (W^T W) a^T: no output built
    a = act[:, groups]  # tokens, experts, neurons
    norms = torch.einsum("tei,eij,tej->te", a, gram, a).clamp_min(0).sqrt()
    target = torch.log(norms + 1e-6 * norms.mean())
    xtx = x.T @ x
    ridge = 1e-2 * xtx.diagonal().mean()  # a few thousand tokens for 576 inputs: keeps rare directions tame
    weight = torch.linalg.solve(xtx + ridge * torch.eye(x.shape[1]), x.T @ target).T
    return scale_router(weight, x, spread)


def scale_router(weight: Tensor, x: Tensor, spread: float) -> Tensor:
    """The router weight centred across experts (a shift of every logit ranks nothing) and scaled so that its
    logits on the inputs x have a per-token std of `spread`."""
    weight = weight - weight.mean(0, keepdim=True)
    scale = (x @ weight.T).std(dim=1).mean()
    return weight * (spread / scale) if scale > 0 else torch.zeros_like(weight)


def split_mlp(mlp: nn.Module, x: Tensor, split: MoESplit) -> dict[str, Tensor]:
    """One Llama MLP (gate/up/down_proj) as a Mixtral sparse block's tensors (`gate.weight`, `experts.gate_up_proj`,
    `experts.down_proj`), its neurons grouped and its router fitted on the MLP inputs x (tokens, hidden)."""
    gate, up, down = (mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float())
    if split.method == "gate-kmeans":  # MoEfication's parameter clustering and similarity routing
        groups = split_neurons(gate, split.experts, split.seed)
        router = scale_router(torch.stack([F.normalize(gate[g], dim=1).mean(0) for g in groups]), x, split.spread)
    else:
        act = F.silu(x @ gate.T) * (x @ up.T)
        # Neurons whose activation magnitudes rise and fall together share an expert, so a token needs few.
        groups = split_neurons(act.abs().T, split.experts, split.seed)
        router = fit_router(x, act, down, groups, split.spread)
    return {
        "gate.weight": router,
        "experts.gate_up_proj": torch.cat([gate[groups], up[groups]], dim=1),  # (E, 2 I/E, H): [gate; up] rows
        # top_k times each expert's share: Mixtral weighs the k experts it runs by ~1/k each.
        "experts.down_proj": torch.stack([down[:, g] for g in groups]) * split.top_k,  # (E, H, I/E)
    }


@torch.no_grad()
def build_moe(dense: Path, out: Path, split: MoESplit = MoESplit()) -> None:
    """Write into `out` a Mixtral model folder built from the Llama model folder `dense` (MoEfication).

    Everything but the MLPs is copied as it is (Mixtral's attention, norms, rotary embedding and tied head are
    Llama's; the config carries rope, norm eps, head dim, tying and token ids over). Each MLP's I intermediate
    neurons are split into E experts of I/E neurons: an expert holds its neurons' gate and up rows and their
    down columns, so the sum of all experts' outputs is the dense MLP's output exactly. The routing makes that sum
    what the model computes when k = E and a sum over the k experts chosen when k < E:
    - Mixtral weighs the k experts it runs by their softmax probabilities renormalised over the k, about 1/k each
      when the router logits are nearly equal; each expert's down projection is multiplied by k, and the router
      weight scaled so that its logits differ by about `spread` (1e-5): the weights are k * p = 1 + O(spread).
      With k = E the model is the dense one up to that and float rounding; the ranking is what the logits keep.
    - The ranking: a linear fit of each expert's log output norm from the MLP input, so a token runs the experts
      that would contribute most. The neurons are grouped so that few experts matter per token: balanced k-means
      (cosine) of each neuron's activation magnitudes over the calibration tokens, i.e. neurons that fire
      together share an expert.
    - Data-free: the calibration tokens are text the dense model samples itself from its BOS token (16 x 256
      tokens under a fixed seed), the MLP inputs those of the dense model on that text.
    `method="gate-kmeans"` is MoEfication's weights-only alternative, kept for comparison: k-means of the gate rows,
    each router row the mean of its expert's unit gate rows. At E = 8 it scores far worse (docs/ACCURACY.md, "The
    bundled MoE model", which also has the k and E measured).
    Deterministic for a given split, torch build and thread count (sampling follows float rounding). The
    weights are saved in the dense folder's dtype (bf16: the down projections times k round there unless k is a
    power of two), with the dense folder's tokenizer and generation settings.
    """
    dense, out = Path(dense), Path(out)
    config = AutoConfig.from_pretrained(dense, local_files_only=True)
    moe_config = mixtral_config(config, split)  # refuses a split that does not fit before anything loads
    # lazy: every command imports this module (qat.io.models); only a build needs the model classes (1-3 s)
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, local_files_only=True).eval()
    inputs = calibration_inputs(model, split)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, (layer, x) in enumerate(zip(model.model.layers, inputs)):
        state.update({f"model.layers.{i}.mlp.{k}": v for k, v in split_mlp(layer.mlp, x, split).items()})
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    with torch.device("meta"):
        moe = MixtralForCausalLM(moe_config)
    moe.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    moe.tie_weights()
    moe.save_pretrained(out)
    for f in dense.iterdir():  # the tokenizer, chat template and generation settings are the dense model's
        if f.is_file() and f.name != "config.json" and f.name != COMPLETE_MARKER and ".safetensors" not in f.name:
            shutil.copy2(f, out / f.name)
