"""Documents by `data.path`: the bundled text or instruction set, local text/json/jsonl/parquet files, a saved
`datasets` folder, or a `distqat generate` folder (already tokenized by the teacher).

Formats: `.txt` is one document per line (blank lines skipped); `.json` (a list of records) and `.jsonl`
hold a text field (`data.text_field`) or chat `messages`; `.parquet` and saved datasets hold a text field.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from qat.keys import MANIFEST_FILE, SETTINGS_FILE

from .packing import tokenize_texts
from .text import BUNDLED_INSTRUCTIONS, BUNDLED_TEXT, load_bundled_instructions, load_bundled_text

LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The data.path names of the bundled sets (data/text.py), each a DatasetDict of splits.
BUNDLED = {BUNDLED_TEXT: ("text", load_bundled_text),
           BUNDLED_INSTRUCTIONS: ("instruction set", load_bundled_instructions)}


def is_generated(path: Path) -> bool:
    """A folder written by `distqat generate`: shards plus its manifest (or, while unfinished, its settings)."""
    return (path.is_dir() and any(path.glob("shard-*.parquet"))
            and ((path / MANIFEST_FILE).exists() or (path / SETTINGS_FILE).exists()))


def generated_shards(path: Path) -> list[Path]:
    """The shard files a finished `distqat generate` folder lists in its manifest."""
    manifest = path / MANIFEST_FILE
    if not manifest.exists():
        # Training on a partial set would silently differ from what was asked for.
        raise ValueError(f"data.path={str(path)!r} is an unfinished `distqat generate` folder (no {MANIFEST_FILE}); "
                         "rerun the same generate command to finish it")
    try:
        listed = json.loads(manifest.read_text()).get("shards")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{manifest} is not a manifest written by distqat generate ({e}); delete it and rerun the "
                         "same generate command") from None
    files = [path / s["file"] for s in listed] if listed else sorted(path.glob("shard-*.parquet"))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"{manifest} lists shards that are missing ({', '.join(missing[:3])}); rerun generate")
    for f in files:  # a damaged shard is named here, not deep inside datasets' reader
        try:
            pq.read_metadata(f)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f} cannot be read as parquet ({' '.join(str(e).split())}); delete it and rerun the "
                             "same generate command to write it again") from None
    return files


def load_records(path: str, split: str = "train"):
    """The records of `data.path` as a `datasets.Dataset` (local files have one split; `split` picks one of
    a bundled set or of a saved DatasetDict)."""
    if path in BUNDLED:
        what, load = BUNDLED[path]
        dd = load()
        if split not in dd:
            raise ValueError(f"the bundled {what} has splits {list(dd)}, not {split!r}")
        return dd[split]
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; give a local file/folder or one of "
                                f"{', '.join(BUNDLED)}")
    if is_generated(p):
        files = [str(f) for f in generated_shards(p)]
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    elif p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError:
            raise ValueError(f"data.path={path!r} is a folder but neither a saved `datasets` folder (save_to_disk) "
                             "nor a `distqat generate` output; point it at a file or such a folder") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{p} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        fmt = LOCAL_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ValueError(f"data.path={path!r}: unsupported file type {p.suffix!r}; use {sorted(LOCAL_FORMATS)}")
        if p.stat().st_size == 0:
            raise ValueError(f"data.path={path!r} is empty; give a file with some text")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as e:  # datasets wraps parse errors in long chains; keep one line that names the file
            root = e
            while root.__cause__ is not None or root.__context__ is not None:  # the parser's own words
                root = root.__cause__ or root.__context__
            reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise ValueError(f"data.path={path!r} cannot be read as {fmt}: {reason}") from e
    if len(ds) == 0:
        raise ValueError(f"data.path={path!r} holds no records; give a file with some text")
    return ds


def _missing_field(path: str, text_field: str, columns: list[str]) -> ValueError:
    return ValueError(f"data.path={path!r} has no field {text_field!r} (fields: {columns}); set data.text_field")


def load_texts(path: str, split: str = "test", text_field: str = "text") -> list[str]:
    """The non-empty documents of one split as strings (no tokenization)."""
    ds = load_records(path, split)
    if text_field not in ds.column_names:
        raise _missing_field(path, text_field, ds.column_names)
    return [t for t in ds[text_field] if t]


def render_chats(chats, tokenizer) -> list[str]:
    """Each conversation (a list of {role, content}) through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template=true but the model's tokenizer has no chat template; "
                         "give a text field instead (data.text_field)")
    # Arrow gives every turn the union of keys over the file; keys a turn lacked come back as None.
    return [tokenizer.apply_chat_template([{k: v for k, v in turn.items() if v is not None} for turn in chat],
                                          tokenize=False) for chat in chats]


def load_documents(
    path: str, tokenizer, split: str = "train", text_field: str = "text", chat_template: bool = False
) -> list[list[int]]:
    """Token ids per non-empty document, no special tokens added: self-generated samples as written (the
    teacher's ids), chat `messages` through the chat template (when data.chat_template is on), text as is."""
    ds = load_records(path, split)
    columns = ds.column_names
    if path not in BUNDLED and is_generated(Path(path).expanduser()):
        if "input_ids" not in columns:
            raise ValueError(f"data.path={path!r}: the generated shards have no input_ids (fields: {columns})")
        return [list(ids) for ids in ds["input_ids"] if len(ids)]
    if chat_template and "messages" in columns:
        texts = render_chats(ds["messages"], tokenizer)
    elif text_field in columns:
        texts = [t for t in ds[text_field] if t]
    elif "messages" in columns:
        raise ValueError(f"data.path={path!r} holds chat `messages`; set data.chat_template=true to render them")
    else:
        raise _missing_field(path, text_field, columns)
    if not texts:
        raise ValueError(f"data.path={path!r} holds no text in field {text_field!r}")
    return [ids for ids in tokenize_texts(texts, tokenizer) if ids]


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
