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


def token_stream(texts: list[str], tokenizer, max_tokens: int, separator: str = "\n\n") -> list[int]:
    """The first `max_tokens` tokens of the documents joined by `separator` (no special tokens)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + separator, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise ValueError("the text holds fewer than 2 tokens: nothing to evaluate")
    return ids[:max_tokens]
