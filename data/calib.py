"""PTQ calibration token ids: text from the bundled `calib` split, any local dataset, or self-generated."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import datasets
import torch

from qat.io.models import cache_kwarg

from .generate import candidate_first_tokens
from .sources import load_texts, token_stream


def calibration_ids(
    tokenizer, n_samples: int, seq_len: int, path: str = "bundled:wikitext", split: str = "calib",
    text_field: str = "text", model=None, seed: int = 0,
) -> torch.Tensor:
    """(n_samples, seq_len) token ids: consecutive chunks of the split's token stream (documents joined).

    path="generate" lets `model` sample its own text (LLM-QAT style data-free calibration).
    ValueError (one line) when the text holds fewer than n_samples * seq_len tokens.
    """
    if path == "generate":
        if model is None:
            raise ValueError("ptq.calib_data=generate needs the model to sample from")
        return generated_ids(model, tokenizer, n_samples, seq_len, seed)
    need = n_samples * seq_len
    with _quiet_datasets():  # no "Generating train split" bars ahead of a one-line error
        ids = token_stream(load_texts(path, split, text_field), tokenizer, max_tokens=need)
    if len(ids) < need:
        raise ValueError(
            f"calibration text {path!r} (split {split!r}) has {len(ids)} tokens, fewer than "
            f"ptq.n_samples * ptq.seq_len = {n_samples} * {seq_len} = {need}; lower ptq.n_samples or ptq.seq_len"
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n_samples, seq_len)


@torch.no_grad()
def generated_ids(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                  batch_size: int = 8, top_k: int = 50, greedy: int = 3) -> torch.Tensor:
    """The model writes its own calibration text: a random first token, `greedy` greedy steps, then top-k sampling."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    first = candidate_first_tokens(tokenizer, vocab) if tokenizer is not None else torch.arange(vocab)
    out = []
    arg = cache_kwarg(model)  # `cache` on current transformers, `past_key_values` on older ones
    for b0 in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - b0)
        ids = first[torch.randint(len(first), (b, 1), generator=g)].to(device)
        past = None
        x = ids
        for pos in range(1, seq_len):
            o = model(x, **{arg: past}, use_cache=True)
            past, logits = o[arg], o.logits[:, -1].float()
            if pos <= greedy:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                probs = torch.softmax(top.values, -1).cpu()
                nxt = top.indices.gather(-1, torch.multinomial(probs, 1, generator=g).to(device))
            ids = torch.cat([ids, nxt], 1)
            x = nxt
        out.append(ids.cpu())
    return torch.cat(out)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def resolve_calib_path(calib_data: str, data_path: Optional[str]) -> str:
    return calib_data or data_path or "bundled:wikitext"
