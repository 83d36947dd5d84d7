"""Text sources by `data.path`: the bundled text, or local text/json/jsonl/parquet files or a saved dataset."""

from __future__ import annotations

from pathlib import Path

BUNDLED_TEXT = "bundled:wikitext"
LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_texts(path: str, split: str = "test", text_field: str = "text") -> list[str]:
    """The documents of one split as strings (no tokenization)."""
    import datasets

    if path == BUNDLED_TEXT:
        from .text import load_bundled_text

        dd = load_bundled_text()
        if split not in dd:
            raise ValueError(f"the bundled text has splits {list(dd)}, not {split!r}")
        return list(dd[split]["text"])
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; give a local file/folder or {BUNDLED_TEXT}")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{p} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        fmt = LOCAL_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ValueError(f"data.path={path!r}: unsupported file type {p.suffix!r}; use {sorted(LOCAL_FORMATS)}")
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    if text_field not in ds.column_names:
        raise ValueError(f"{p} has no field {text_field!r} (fields: {ds.column_names}); set data.text_field")
    return [t for t in ds[text_field] if t]


def is_generated(path: Path) -> bool:
    """A folder written by `distqat generate` (already tokenized by the teacher)."""
    return path.is_dir() and (path / "settings.json").exists() and any(path.glob("shard-*.parquet"))


def load_documents(
    path: str, tokenizer, split: str = "train", text_field: str = "text", chat_template: bool = False
) -> list[list[int]]:
    """Token ids per document: self-generated samples as written, chat `messages` through the chat
    template (when data.chat_template is on), text fields through the tokenizer."""
    import datasets

    from .packing import tokenize_texts

    p = Path(path).expanduser()
    if path != BUNDLED_TEXT and is_generated(p):
        ds = datasets.load_dataset("parquet", data_files=sorted(str(f) for f in p.glob("shard-*.parquet")),
                                   split="train")
        return [list(x) for x in ds["input_ids"]]
    if path != BUNDLED_TEXT and p.is_file() and p.suffix.lower() in (".json", ".jsonl"):
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
        if "messages" in ds.column_names and text_field not in ds.column_names:
            if not chat_template:
                raise ValueError(f"{p} holds chat `messages`; set data.chat_template=true to render them")
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
            return tokenize_texts(texts, tokenizer)
    texts = load_texts(path, split, text_field)
    if not texts:
        raise ValueError(f"data.path={path!r} holds no text")
    return tokenize_texts(texts, tokenizer)


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None, separator: str = "\n\n") -> list[int]:
    """The documents joined by `separator` as token ids (no special tokens), the first `max_tokens` if given."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + separator, add_special_tokens=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise ValueError("the text holds fewer than 2 tokens: nothing to evaluate")
    return ids if max_tokens is None else ids[:max_tokens]


def spread_windows(ids: list[int], seq_len: int, max_tokens: int) -> list[list[int]]:
    """About `max_tokens` tokens as non-overlapping windows of `seq_len`, spread evenly over the whole stream.

    The first articles of a split are not a fair sample of it (on the bundled test split the first
    8k tokens score 14.8 perplexity, the whole split 17.9): evenly spaced windows are.
    """
    full = len(ids) // seq_len
    if full == 0:
        return [ids]
    want = max(1, min(full, -(-max_tokens // seq_len)))
    if want == 1:
        starts = [0]
    else:
        starts = [round(i * (full - 1) / (want - 1)) * seq_len for i in range(want)]
    return [ids[s : s + seq_len] for s in starts]
