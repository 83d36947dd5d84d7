"""Data-free training text (LLM-QAT): the full-precision teacher writes its own samples.

Sample i starts from one vocabulary token (enumerated or drawn uniformly, special tokens skipped),
continues greedily until it is 3, 4 or 5 tokens long (drawn per sample), then samples from the
softmax up to `max_length` tokens.

Determinism: every random choice of sample i comes from a counter-based hash of (seed, i, step),
and samples are generated in fixed batches (b * batch_size ...) grouped in fixed shards, so the set
of samples depends on neither the number of ranks nor which rank made which shard.

Output folder: `shard-00000.parquet` ... (columns sample_id, input_ids, text, greedy_len), each written
to a temp file and renamed, its settings (`qat.keys.SETTINGS_FILE`: what the samples were made with) and, once
every shard exists, its manifest (`qat.keys.MANIFEST_FILE`: counts and token totals). A rerun skips finished shards.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import datasets
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache, StaticCache

from qat.io.atomic import atomic_file, write_json
from qat.io.env import rank_world
from qat.io.models import cache_kwarg
from qat.io.progress import ProgressLines, bars_wanted
from qat.io.signals import Stopped
from qat.keys import MANIFEST_FILE, SETTINGS_FILE

from .config import GenerateConfig

M32 = 0xFFFFFFFF


class GenerateError(ValueError):
    """Bad generation settings; raised before anything is written."""


# ---------------------------------------------------------------------------------------------
# Counter-based randomness: a 32-bit integer hash, vectorised, with no int64 overflow.


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def counter_hash(seed: int, ids: torch.Tensor, step: int) -> torch.Tensor:
    """A 32-bit hash of (seed, sample id, step) per sample id."""
    h = _hash32(torch.full_like(ids, seed & M32) ^ _hash32(torch.full_like(ids, (seed >> 32) & M32)))
    h = _hash32(h ^ (ids & M32))
    return _hash32(h ^ (step & M32))


def counter_uniform(seed: int, ids: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) per sample, from two hashes (53 bits), as float64."""
    hi = counter_hash(seed, ids, 2 * step + 1)
    lo = counter_hash(seed, ids, 2 * step + 2) >> 11
    return (hi.double() * 2.0**21 + lo.double()) / 2.0**53


# ---------------------------------------------------------------------------------------------
# Sampling.


def sample_next(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Inverse-CDF sampling with the given uniforms: the token depends only on its row's logits and u."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


_CAPITALISED_WORD = re.compile(r"^ ?[A-Z][a-z]+$")


def candidate_first_tokens(tokenizer, vocab_size: int, words_only: bool = False) -> torch.Tensor:
    """Vocabulary ids a sample may start with: every id the tokenizer knows, special tokens skipped; with
    `words_only`, only those that decode to a capitalised word, space-led or not."""
    special = set(tokenizer.all_special_ids)
    # Added tokens flagged special (SmolLM2's <repo_name>, <filename> ...) are not always listed above.
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    n = min(vocab_size, len(tokenizer))
    ids = [i for i in range(n) if i not in special]
    if words_only:
        ids = [i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])) if _CAPITALISED_WORD.match(text)]
        if not ids:
            raise GenerateError("generate.first_token=word: no vocabulary entry of the teacher's tokenizer spells a "
                                "capitalised Latin-script word; use generate.first_token=sample")
    return torch.tensor(ids, dtype=torch.long)


def chat_prefix(tokenizer) -> list[int]:
    """Tokens that open an assistant turn in the teacher's chat template (empty user turn before it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateError("generate.chat_template=true but the teacher's tokenizer has no chat template")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------------------------
# Generation of one batch.


@torch.no_grad()
def generate_batch(
    model, sample_ids: torch.Tensor, first: torch.Tensor, greedy_len: torch.Tensor, prefix: list[int],
    cfg: GenerateConfig, seed: int, eos_id: Optional[int], decoder: Decoder,
) -> list[list[int]]:
    """Token ids of each sample (prefix included); one forward per position for the whole batch."""
    device = next(model.parameters()).device
    b = len(sample_ids)
    prompt = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(b, len(prefix)), first[:, None]], 1).to(device)
    p = len(prefix)
    out = torch.full((b, cfg.max_length), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
    out[:, : p + 1] = prompt
    lengths = torch.full((b,), cfg.max_length, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    greedy_len, ids = greedy_len.to(device), sample_ids.to(device)
    logits = decoder.prefill(prompt)
    for pos in range(p + 1, cfg.max_length):
        n_gen = pos - p  # tokens of the sample proper so far, the first one included
        greedy = logits.argmax(-1)
        sampled = sample_next(logits, counter_uniform(seed, ids, pos), cfg.temperature, cfg.top_k, cfg.top_p)
        nxt = torch.where(n_gen < greedy_len, greedy, sampled.to(device))
        if cfg.on_eos == "stop" and eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            lengths = torch.where(~finished & (nxt == eos_id), torch.full_like(lengths, pos + 1), lengths)
            finished |= nxt == eos_id
        out[:, pos] = nxt
        if pos + 1 == cfg.max_length or bool(finished.all()):
            break
        logits = decoder.step(nxt, pos)
    return [row[:n].tolist() for row, n in zip(out.cpu(), lengths.cpu())]


class Decoder:
    """Prefill + one-token decode steps over a KV cache: a static cache (and CUDA graphs) on CUDA."""

    def __init__(self, model, max_length: int, device: torch.device, compiled=None) -> None:
        self.model, self.static = model, device.type == "cuda"
        # One static cache for the whole run: CUDA graphs replay over the same buffers every batch.
        self.cache = StaticCache(config=model.config, max_cache_len=max_length) if self.static else None
        self.forward = compiled or model
        self.arg = cache_kwarg(model)  # `cache` on current transformers, `past_key_values` on older ones

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        if self.static:
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.model.config)
        pos = torch.arange(prompt.shape[1], device=prompt.device)
        out = self.model(input_ids=prompt, **{self.arg: self.cache}, cache_position=pos, use_cache=True)
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        cache_position = torch.tensor([pos], device=tokens.device)
        out = self.forward(input_ids=tokens[:, None], **{self.arg: self.cache}, cache_position=cache_position,
                           use_cache=True)
        return out.logits[:, -1].float()


# ---------------------------------------------------------------------------------------------
# Shards, ranks, resume.


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.parquet"


def _write_shard(path: Path, rows: dict) -> None:
    # Encoded in memory, then written by Python: datasets' parquet writer can abort the process (SIGABRT, no
    # message, the temp file left) when a write to a full disk fails mid-column (seen with 200,000 samples a
    # shard); here a full disk is an OSError, which atomic_file makes a one-line DiskFull naming the shard. The
    # bytes are those datasets writes to a path.
    data = io.BytesIO()
    datasets.Dataset.from_dict(rows).to_parquet(data)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.getbuffer())


def drop_stale_temps(out_dir: Path, shards: list[int]) -> None:
    """Remove the temp files a killed run left of these shards (atomic_file's, beside each shard): each rank
    removes its own shards' only, as the other ranks may be writing theirs in the same folder now."""
    for k in shards:
        stem = shard_path(out_dir, k).stem
        for p in out_dir.glob(f".{stem}.*.parquet"):
            if re.fullmatch(rf"\.{stem}\.[A-Za-z0-9_]{{8}}\.parquet", p.name):  # mkstemp's 8 characters
                p.unlink(missing_ok=True)


def settings_record(cfg: GenerateConfig, seed: int, teacher: str, prefix: list[int]) -> dict:
    d = asdict(cfg)
    d.pop("out_dir")
    d.pop("compile")  # how fast, not what: a rerun may change it
    d.pop("progress_every_s")  # how it is shown, not what
    return {"teacher": teacher, "seed": seed, "prefix": prefix, **d}


def check(g: GenerateConfig) -> None:
    """GenerateError for settings that make no samples; before the teacher loads."""
    if not g.greedy_lengths or min(g.greedy_lengths) < 1:
        raise GenerateError(f"generate.greedy_lengths={g.greedy_lengths}: give lengths >= 1, e.g. [3, 4, 5]")


def generate(
    model: nn.Module, tokenizer, g: GenerateConfig, out_dir: Path, seed: int, teacher: str,
    rank: Optional[int] = None, world: Optional[int] = None, progress: bool = True,
) -> Path:
    """This rank's shards of the dataset the teacher `model` writes into `out_dir`; the manifest once all
    shards exist. `teacher` names the model in settings.json, so a rerun with another one is refused."""
    check(g)
    if rank is None or world is None:
        rank, world = rank_world()
    out_dir = Path(out_dir)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and g.max_length > context:
        raise GenerateError(f"generate.max_length={g.max_length} is above the teacher's context of {context} tokens")
    prefix = chat_prefix(tokenizer) if g.chat_template else []
    if len(prefix) + max(g.greedy_lengths) >= g.max_length:
        raise GenerateError(f"generate.max_length={g.max_length} leaves no room after the prompt and greedy prefix")
    settings = settings_record(g, seed, teacher, prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_file = out_dir / SETTINGS_FILE
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise GenerateError(f"{out_dir} holds samples made with other settings ({', '.join(diff)}); "
                                "use another generate.out_dir or delete it")
    elif rank == 0:
        write_json(settings_file, settings)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    eos_id = tokenizer.eos_token_id
    firsts = candidate_first_tokens(tokenizer, model.config.vocab_size, words_only=g.first_token == "word")
    shard_size = max(g.batch_size, g.shard_size // g.batch_size * g.batch_size)  # whole batches per shard
    n_shards = -(-g.n_samples // shard_size)
    drop_stale_temps(out_dir, [k for k in range(n_shards) if k % world == rank])
    mine = [k for k in range(n_shards) if k % world == rank and not shard_path(out_dir, k).exists()]
    compiled = compiled_forward(model, g, device)
    todo = sum(min(shard_size, g.n_samples - k * shard_size) for k in mine)
    show = progress and rank == 0
    bar = _progress(todo, show and bars_wanted())
    # A log (stderr not a terminal) gets whole lines at a steady rate instead of the bar's carriage returns.
    lines = ProgressLines("generate", todo, g.progress_every_s, unit="samples") if show and not bars_wanted() else None
    made_samples = 0
    t0, made_tokens = time.perf_counter(), 0
    decoder = Decoder(model, g.max_length, device, compiled)
    try:  # the bar closes before an interrupt's message, not after it
        for k in mine:
            rows: dict[str, list] = {"sample_id": [], "input_ids": [], "text": [], "greedy_len": []}
            for start in range(k * shard_size, min((k + 1) * shard_size, g.n_samples), g.batch_size):
                # Always a full batch of consecutive ids (past the end: generated, then dropped), so each
                # sample is computed with the same companions whatever the number of ranks.
                ids = torch.arange(start, start + g.batch_size)
                keep = int((ids < g.n_samples).sum())
                if g.first_token == "enumerate":
                    first = firsts[ids % len(firsts)]
                else:
                    first = firsts[counter_hash(seed, ids, 0) % len(firsts)]
                lengths = torch.tensor(g.greedy_lengths)[counter_hash(seed, ids, 1) % len(g.greedy_lengths)]
                samples = generate_batch(model, ids, first, lengths, prefix, g, seed, eos_id, decoder)[:keep]
                rows["sample_id"] += ids[:keep].tolist()
                rows["input_ids"] += samples
                rows["text"] += tokenizer.batch_decode(samples)
                rows["greedy_len"] += lengths[:keep].tolist()
                new_tokens = sum(len(x) for x in samples)
                made_tokens += new_tokens
                made_samples += keep
                bar.update(keep)
                bar.set_postfix_str(f"{made_tokens / (time.perf_counter() - t0):.0f} tok/s")
                if lines is not None:
                    lines.update(made_samples, new_tokens)
            _write_shard(shard_path(out_dir, k), rows)
    except Stopped as e:  # a cluster's stop signal: the shards written so far are whole and kept
        done = sum(shard_path(out_dir, k).exists() for k in range(n_shards))
        e.detail = f"{done} of {n_shards} shards written to {out_dir}; the same command writes the rest"
        raise
    finally:
        bar.close()
    write_manifest(out_dir, n_shards, settings)
    return out_dir


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="generate", unit="sample", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def compiled_forward(model, g: GenerateConfig, device: torch.device):
    """On CUDA, the decode step as CUDA graphs (torch.compile, reduce-overhead); None elsewhere."""
    if g.compile == "never" or (g.compile == "auto" and device.type != "cuda"):
        return None
    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def write_manifest(out_dir: Path, n_shards: int, settings: dict) -> Optional[Path]:
    """Once every shard exists: counts and token totals (written by whichever rank finishes last)."""
    paths = [shard_path(out_dir, k) for k in range(n_shards)]
    if not all(p.exists() for p in paths):
        return None
    shards, total, tokens = [], 0, 0
    for p in paths:
        t = pq.read_table(p, columns=["input_ids"])
        n = t.num_rows
        ntok = sum(len(x) for x in t.column("input_ids").to_pylist())
        shards.append({"file": p.name, "samples": n, "tokens": ntok})
        total, tokens = total + n, tokens + ntok
    manifest = {"settings": settings, "samples": total, "tokens": tokens, "shards": shards}
    write_json(out_dir / MANIFEST_FILE, manifest)
    return out_dir / MANIFEST_FILE
