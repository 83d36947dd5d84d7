"""Text sources and evaluation windows."""

import json

import pytest

from data.sources import load_texts, spread_windows, token_stream


def test_spread_windows_cover_the_stream_evenly():
    ids = list(range(10_000))
    w = spread_windows(ids, 1000, 4000)
    assert [x[0] for x in w] == [0, 3000, 6000, 9000]
    assert all(len(x) == 1000 for x in w)
    assert spread_windows(ids, 1000, 10**9) == [ids[i : i + 1000] for i in range(0, 10_000, 1000)]
    assert spread_windows(ids, 1000, 1) == [ids[:1000]]
    assert spread_windows(ids[:10], 1000, 5000) == [ids[:10]]


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(t) for t in text.split(" ")]}


def test_token_stream_joins_documents_and_truncates():
    tok = WordTokenizer()
    assert token_stream(["a bb", "ccc"], tok, separator=" ") == [1, 2, 0, 3, 0]
    assert token_stream(["a bb", "ccc"], tok, max_tokens=2, separator=" ") == [1, 2]
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        token_stream(["x"], tok, separator="")


def test_local_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)))
    assert load_texts(str(tmp_path / "a.jsonl"), text_field="body") == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(ValueError, match="no field 'text'"):
        load_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "t.txt").write_text("line one\nline two\n")
    assert load_texts(str(tmp_path / "t.txt")) == ["line one", "line two"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(str(tmp_path / "x.csv"))


def test_json_list_parquet_and_generated_text(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": ""}, {"text": "two"}]))
    assert load_texts(str(tmp_path / "a.json")) == ["one", "two"]
    gen = tmp_path / "gen"
    gen.mkdir()
    datasets.Dataset.from_dict({"input_ids": [[1, 2]], "text": ["hello"]}).to_parquet(str(gen / "shard-00000.parquet"))
    (gen / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00000.parquet"}]}))
    assert load_texts(str(gen)) == ["hello"], "eval can read the teacher's samples as text"
