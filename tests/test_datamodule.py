"""Packing, local formats, the self-generated folder, and the resumable, rank-sharded data order."""

import json
import random

import datasets
import pytest
import torch

from data.datamodule import ResumableSampler, TextDataModule
from data.packing import pack
from data.sources import load_documents


def test_pack_loses_and_duplicates_nothing():
    rng = random.Random(0)
    for _ in range(50):
        docs = [[rng.randrange(1, 100) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(1, 20))]
        block = rng.randrange(2, 17)
        blocks, dropped = pack(docs, block, eos_id=0)
        stream = [t for d in docs for t in (*d, 0)]
        assert blocks.shape[1] == block and blocks.numel() + dropped == len(stream)
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
        assert dropped < block


@pytest.fixture
def docs_dir(tmp_path):
    texts = [f"Document number {i} talks about topic {i % 3} at some length." for i in range(6)]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path, texts


def test_every_local_format_gives_the_same_documents(docs_dir, bundled_tokenizer):
    d, texts = docs_dir
    expected = [bundled_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for name in ["a.txt", "a.jsonl", "a.json", "a.parquet", "saved", "dd"]:
        assert load_documents(str(d / name), bundled_tokenizer) == expected, name


def test_chat_messages_and_generated_folders(tmp_path, bundled_tokenizer):
    msgs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(msgs[0]))
    with pytest.raises(ValueError, match="data.chat_template=true"):
        load_documents(str(tmp_path / "chat.jsonl"), bundled_tokenizer)
    ids = load_documents(str(tmp_path / "chat.jsonl"), bundled_tokenizer, chat_template=True)
    assert "<|im_start|>assistant" in bundled_tokenizer.decode(ids[0])
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "settings.json").write_text("{}")
    rows = {"sample_id": [0, 1], "input_ids": [[5, 6, 7], [9, 10]], "text": ["x", "y"], "greedy_len": [3, 3]}
    datasets.Dataset.from_dict(rows).to_parquet(str(gen / "shard-00000.parquet"))
    assert load_documents(str(gen), bundled_tokenizer) == [[5, 6, 7], [9, 10]]


def test_bad_inputs(tmp_path, bundled_tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "none.txt"), bundled_tokenizer)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_documents(str(tmp_path / "x.xml"), bundled_tokenizer)
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "text"}))
    with pytest.raises(ValueError, match="no field 'text'.*data.text_field"):
        load_documents(str(tmp_path / "b.jsonl"), bundled_tokenizer)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError):
        load_documents(str(tmp_path / "empty.txt"), bundled_tokenizer)


def test_datamodule_split_cache_and_order(tmp_path, bundled_tokenizer, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"Line {i} of a small corpus for packing tests." for i in range(200)))
    kw = dict(path=str(text), seq_len=16, micro_batch_size=2, seed=3, tokenizer=bundled_tokenizer,
              cache_dir=tmp_path / "cache", val_fraction=0.1)
    dm = TextDataModule(**kw)
    dm.setup()
    train, val = dm.train_blocks, dm.val_blocks
    assert len(train) + len(val) == dm.stats["blocks"] and len(val) == round(0.1 * dm.stats["blocks"])
    rows = {tuple(r) for r in torch.cat([train, val]).tolist()}
    assert len(rows) == dm.stats["blocks"], "train and val are disjoint and cover every block"
    # The second setup reads the cached blocks: tokenizing again would fail here.
    (tmp_path / "cache" / ".packed-leftover.safetensors").write_bytes(b"half")
    monkeypatch.setattr("data.datamodule.load_documents", lambda *a, **k: (_ for _ in ()).throw(RuntimeError))
    dm2 = TextDataModule(**kw)
    dm2.setup()
    assert torch.equal(dm2.train_blocks, train)
    order = [b["input_ids"] for b in dm.dataloader()]
    assert [torch.equal(a, b) for a, b in zip(order, [b["input_ids"] for b in dm2.dataloader()])] == [True] * len(order)
    other = TextDataModule(**{**kw, "seed": 4, "cache_dir": tmp_path / "cache"})
    other.setup()
    assert not torch.equal(torch.cat([b["input_ids"] for b in other.dataloader()]), torch.cat(order))


def test_ranks_are_disjoint_and_resume_continues_the_order():
    n, total = 10, 25
    full = list(ResumableSampler(n, 7, 0, 1, total))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    r0, r1 = list(ResumableSampler(n, 7, 0, 2, total)), list(ResumableSampler(n, 7, 1, 2, total))
    merged = [x for pair in zip(r0, r1) for x in pair] + r0[len(r1):]
    assert merged == full
    # Resuming after 12 consumed samples yields exactly the rest of the uninterrupted order.
    assert list(ResumableSampler(n, 7, 0, 1, total, consumed=lambda: 12)) == full[12:]
