"""Instruction data (`data.format=instructions`): conversations -> token ids with an assistant mask -> blocks.

Records come from any source `data.sources.load_records` reads (json / jsonl / parquet / a saved `datasets`
folder, or `bundled:instructions`), each either a chat `messages` list of {role, content} (roles system, user,
assistant, with "model" read as assistant; at least one assistant turn), a ShareGPT `conversations` list of
{from, value} (from: system; human or user; gpt, assistant, model, chatgpt, bing, bard or claude; see
SHAREGPT_ROLES), or `instruction` / optional `input` / `output` fields.

`render` puts a conversation through the tokenizer's chat template and marks the tokens the model learns to
write: the content of each assistant turn and the template's tokens that close that turn (its end-of-turn
token(s)), never the role header that opens it. The mask comes from the template itself, rendering the
conversation up to each assistant turn (with the generation prompt) and through it, so it needs no
`{% generation %}` support in the template, only that each rendering is a prefix of the whole. A template that
refuses a conversation (Gemma's has no system role) is reported in one line with its own words.

Blocks: `data.packing.pack_bins` (whole examples per block, per-example positions) or `pad_examples` (one per
block); ids int64 (the caller stores int32), masks bool: `assistant` (train on this token) and `attention` (a
real token, not padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .sources import load_records
from .text import BUNDLED_INSTRUCTIONS, load_bundled_instructions

__all__ = ["BUNDLED_INSTRUCTIONS", "ROLES", "SHAREGPT_ROLES", "load_bundled_instructions", "load_conversations",
           "render", "pad_examples"]

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"model": "assistant"}  # Gemma's name for the assistant turn
# ShareGPT's `from` values seen in the common sets, by the role they play.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "claude": "assistant"}
Example = tuple[Sequence[int], Sequence[int]]  # (token ids, assistant mask) of one conversation


# -- records -> conversations -----------------------------------------------------------------------------


def _from_instruction(record: dict) -> list[dict[str, str]]:
    prompt, extra, output = (str(record.get(k) or "") for k in ("instruction", "input", "output"))
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _check(path: str, i: int, messages, sharegpt: bool = False) -> list[dict[str, str]]:
    """One conversation as plain {role, content} dicts, or a one-line error naming the record and the fix."""
    where = f"data.path={path!r}: record {i}"
    field, keys = ("conversations", ("from", "value")) if sharegpt else ("messages", ("role", "content"))
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{where} has `{field}` of type {type(messages).__name__}; give a list of "
                         f"{{{', '.join(keys)}}} turns")
    out = []
    for turn in messages:
        role, content = (turn.get(keys[0]), turn.get(keys[1])) if isinstance(turn, dict) else (None, None)
        if sharegpt and role is None and isinstance(turn, dict):  # some ShareGPT sets carry {role, content} turns
            role, content = turn.get("role"), turn.get("content")
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise ValueError(f"{where} has a turn from {role!r}; ShareGPT `from` values read are "
                                 f"{', '.join(SHAREGPT_ROLES)}: rename it in the file or drop the record")
            role = SHAREGPT_ROLES[role]
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ValueError(f"{where} has a turn with role {role!r}; data.format=instructions takes the roles "
                             f"{', '.join(ROLES)}: rename it in the file")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where} has a {role} turn whose content is a {type(content).__name__}, not text; "
                             "give each turn's content as a string")
        out.append({"role": role, "content": content or ""})
    if not any(t["role"] == "assistant" for t in out):
        raise ValueError(f"{where} has no assistant turn, so nothing to train on; add the answer as an assistant "
                         "turn or drop the record")
    return out


def load_conversations(path: str, split: str = "train") -> list[list[dict[str, str]]]:
    """Every record of `data.path` (one split) as a list of {role, content} turns."""
    ds = load_records(path, split)
    columns = ds.column_names
    if "messages" in columns:
        # Arrow gives every turn the union of keys over the file; keys a turn lacked come back as None.
        chats = [_check(path, i, m) for i, m in enumerate(ds["messages"])]
    elif "conversations" in columns:  # ShareGPT
        chats = [_check(path, i, m, sharegpt=True) for i, m in enumerate(ds["conversations"])]
    elif "instruction" in columns and "output" in columns:
        chats = [_from_instruction(r) for r in ds.select_columns(
            [c for c in ("instruction", "input", "output") if c in columns])]
    else:
        raise ValueError(f"data.path={path!r} has none of the fields `messages`, `conversations` (ShareGPT) or "
                         f"`instruction`/`output` (fields: {columns}); give records in one of those forms, or use "
                         "data.format=text for plain text")
    if not any(t["content"].strip() for chat in chats for t in chat if t["role"] == "assistant"):
        raise ValueError(f"data.path={path!r}: every assistant turn is empty, so there is nothing to train on; "
                         "fill in the answers (`output` or the assistant turns' content)")
    return chats


# -- conversations -> (ids, assistant mask) ---------------------------------------------------------------


def _template(tokenizer, messages, add_generation_prompt: bool = False, tokenize: bool = True):
    try:
        out = tokenizer.apply_chat_template(list(messages), tokenize=tokenize, return_dict=False,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError and friends: keep one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        roles = [t["role"] for t in messages]
        fix = ("drop the system turns or fold them into the first user turn" if "system" in roles
               and "system" in reason.lower() else "give conversations in the form this template accepts")
        raise ValueError(f"the tokenizer's chat template cannot render a conversation with roles {roles}: {reason}; "
                         f"{fix}") from e
    return [int(x) for x in out] if tokenize else out


def _token_starts(tokenizer, text: str, ids: list[int]) -> list[int]:
    """Where each token of `ids` (the template's tokenization of `text`) starts in `text`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the chat template's turns merge into shared tokens at a turn boundary and the tokenizer "
                         "gives no character offsets to split them; use a fast tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError("the chat template's tokens differ from the tokenizer's tokens of its text; cannot place "
                         "the assistant turns")
    return [start for start, _ in enc["offset_mapping"]]


def render(messages: Sequence[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """(token ids of the conversation through the chat template, 0/1 mask with 1 on assistant-turn tokens).

    For assistant turn i the assistant tokens run from the end of the rendering of turns [:i] with the
    generation prompt to the end of the rendering of turns [:i + 1]. Each must be a prefix of the whole
    (else a ValueError); where the tokenizer merges characters across such a boundary (an answer starting with
    whitespace), the boundary is placed by character offsets and a shared token counts where it starts.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.format=instructions needs a tokenizer with a chat template; use a chat/instruct "
                         "model's tokenizer, or data.format=text")
    ids = _template(tokenizer, messages)
    mask = [0] * len(ids)
    starts: list[int] | None = None
    text: str | None = None
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        bounds = []
        for prefix, gen in ((messages[:i], True), (messages[: i + 1], False)):
            p = ids if len(prefix) == len(messages) and not gen else _template(tokenizer, prefix, gen)
            if ids[: len(p)] == p:
                bounds.append(len(p))
                continue
            text = text if text is not None else _template(tokenizer, messages, tokenize=False)
            p_text = _template(tokenizer, prefix, gen, tokenize=False)
            if not text.startswith(p_text):
                raise ValueError(f"the chat template is not prefix-consistent: rendering the first {len(prefix)} "
                                 f"turns{' with the generation prompt' if gen else ''} does not begin the "
                                 "rendering of the whole conversation, so the assistant tokens cannot be found; "
                                 "use a model whose template renders earlier turns unchanged")
            starts = starts if starts is not None else _token_starts(tokenizer, text, ids)
            bounds.append(next((k for k, s in enumerate(starts) if s >= len(p_text)), len(ids)))
        lo, hi = bounds
        mask[lo:hi] = [1] * (hi - lo)
    return ids, mask


# -- examples -> blocks -----------------------------------------------------------------------------------


def pad_examples(
    examples: Iterable[Example], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example per block: its first `seq_len` tokens (a longer one is truncated), right-padded with `pad_id`.

    Returns (blocks (n, seq_len) int64, assistant (n, seq_len) bool, attention (n, seq_len) bool), both masks
    False on padding; n counts every example, empty ones too (all padding). The caller counts truncations
    (examples longer than seq_len).
    """
    if seq_len < 2:
        raise ValueError(f"block length {seq_len} is too short; use data.seq_len >= 2")
    examples = list(examples)
    blocks = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    assistant = torch.zeros(len(examples), seq_len, dtype=torch.bool)
    attention = torch.zeros(len(examples), seq_len, dtype=torch.bool)
    for row, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"an example has {len(ids)} tokens but {len(mask)} mask bits")
        k = min(len(ids), seq_len)
        blocks[row, :k] = torch.as_tensor(list(ids[:k]), dtype=torch.long)
        assistant[row, :k] = torch.as_tensor(list(mask[:k]), dtype=torch.bool)
        attention[row, :k] = True
    return blocks, assistant, attention
