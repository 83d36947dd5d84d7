"""Packing, local formats, the self-generated folder, the cached DataModule and its rank-sharded order."""

import json
import random

import datasets
import pytest
import torch
from torch.utils.data import DistributedSampler

from data.blocks import ResumableSampler
from data.packing import pack, tokenize_texts
from data.sources import load_documents
from trainer.datamodule import TextDataModule

EOS = 0


def reference_stream(docs):
    """What packing must read: each non-empty document, then EOS unless it already ends with one."""
    return [t for d in docs if d for t in (*d, *([] if d[-1] == EOS else [EOS]))]


def test_pack_loses_and_duplicates_nothing():
    rng = random.Random(0)
    for _ in range(200):
        docs = [[rng.randrange(0, 50) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(0, 20))]
        block = rng.randrange(2, 17)
        blocks, dropped = pack(docs, block, eos_id=EOS)
        stream = reference_stream(docs)
        assert blocks.dtype == torch.long and blocks.shape == (len(stream) // block, block)
        assert dropped == len(stream) % block
        assert blocks.flatten().tolist() == stream[: len(stream) - dropped]


def test_pack_separates_documents_and_rejects_tiny_blocks():
    blocks, dropped = pack([[5, 6, 7], [8], [9, EOS], []], 3, EOS)
    assert blocks.tolist() == [[5, 6, 7], [EOS, 8, EOS]] and dropped == 2  # [9, EOS]: no second EOS, dropped
    assert pack([], 4, EOS)[0].shape == (0, 4)
    with pytest.raises(ValueError, match="data.seq_len"):
        pack([[1, 2]], 1, EOS)


def test_tokenize_texts_in_batches(bundled_tokenizer):
    texts = ["Hello world.", "A second, longer document about packing.", "x", "<|im_start|> special"]
    one_by_one = [bundled_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tokenize_texts(texts, bundled_tokenizer, batch_size=3) == one_by_one


@pytest.fixture
def docs_dir(tmp_path):
    texts = [f"Document number {i} talks about topic {i % 3} at some length." for i in range(6)]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "other": datasets.Dataset.from_dict({"text": ["no"]})}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path, texts


def test_every_local_format_gives_the_same_documents(docs_dir, bundled_tokenizer):
    d, texts = docs_dir
    expected = [bundled_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for name in ["a.txt", "a.jsonl", "a.json", "a.parquet", "saved", "dd"]:
        assert load_documents(str(d / name), bundled_tokenizer) == expected, name
    with pytest.raises(ValueError, match="splits"):
        load_documents(str(d / "dd"), bundled_tokenizer, split="test")


def test_chat_messages_go_through_the_chat_template(tmp_path, bundled_tokenizer):
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in chats))
    with pytest.raises(ValueError, match="data.chat_template=true"):
        load_documents(str(tmp_path / "chat.jsonl"), bundled_tokenizer)
    docs = load_documents(str(tmp_path / "chat.jsonl"), bundled_tokenizer, chat_template=True)
    assert len(docs) == 2
    text = bundled_tokenizer.decode(docs[0])
    assert "<|im_start|>user\nHi<|im_end|>" in text and "<|im_start|>assistant\nHello!<|im_end|>" in text
    assert bundled_tokenizer.convert_tokens_to_ids("<|im_start|>") in docs[0], "markers are single special tokens"


def fake_generated(folder, rows, manifest=True):
    folder.mkdir()
    (folder / "settings.json").write_text("{}")
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "shard-00000.parquet"))
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00000.parquet"}]}))
    return folder


def test_generated_folder_tokens_arrive_unchanged(tmp_path, bundled_tokenizer, monkeypatch):
    eos = bundled_tokenizer.eos_token_id
    ids = [[5, 6, 7, eos], [9, 10], [11] * 20]
    gen = fake_generated(tmp_path / "gen", {"input_ids": ids, "text": ["x", "y", "z"]})
    monkeypatch.setattr("data.sources.tokenize_texts", lambda *a, **k: pytest.fail("generated ids re-tokenized"))
    assert load_documents(str(gen), bundled_tokenizer) == ids
    dm = TextDataModule(path=str(gen), seq_len=4, tokenizer=bundled_tokenizer, cache_dir=tmp_path / "c",
                        val_fraction=0)
    dm.setup()
    # The sample that stopped at EOS gets no second one.
    assert dm.packed()[0].flatten().tolist() == [5, 6, 7, eos, 9, 10, eos, *[11] * 20, eos]
    unfinished = fake_generated(tmp_path / "partial", {"input_ids": ids, "text": ["x", "y", "z"]}, manifest=False)
    with pytest.raises(ValueError, match="unfinished"):
        load_documents(str(unfinished), bundled_tokenizer)


def test_bad_inputs_each_give_one_clear_error(tmp_path, bundled_tokenizer):
    def fails(exc, match, name, **kw):
        with pytest.raises(exc, match=match) as e:
            load_documents(str(tmp_path / name), bundled_tokenizer, **kw)
        assert "\n" not in str(e.value)

    fails(FileNotFoundError, "does not exist", "none.txt")
    (tmp_path / "x.xml").write_text("<a/>")
    fails(ValueError, "unsupported file type '.xml'", "x.xml")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "text"}))
    fails(ValueError, r"no field 'text' \(fields: \['body'\]\); set data.text_field", "b.jsonl")
    (tmp_path / "m.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    fails(ValueError, "set data.chat_template=true", "m.json")
    (tmp_path / "empty.txt").write_text("")
    fails(ValueError, "is empty", "empty.txt")
    (tmp_path / "blank.txt").write_text("\n\n")
    fails(ValueError, "no text", "blank.txt")
    (tmp_path / "bad.json").write_text("{not json")
    fails(ValueError, "cannot be read as json", "bad.json")
    (tmp_path / "folder").mkdir()
    fails(ValueError, "neither a saved `datasets` folder", "folder")


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"Line {i} of a small corpus for packing tests." for i in range(200)))
    return text


def rows(blocks):
    return [tuple(r) for r in blocks.tolist()]


def batches(loader):
    return [b["input_ids"] for b in loader]


def test_datamodule_split_order_and_cache(tmp_path, corpus, bundled_tokenizer, monkeypatch):
    kw = dict(path=str(corpus), seq_len=16, micro_batch_size=2, seed=3, tokenizer=bundled_tokenizer,
              cache_dir=tmp_path / "cache", val_fraction=0.1)
    dm = TextDataModule(**kw)
    dm.setup()
    train, val, s = dm.train_blocks, dm.val_blocks, dm.stats
    assert s["blocks"] == s["tokens"] // 16 and s["documents"] == 200 and 0 <= s["dropped_tokens"] < 16
    assert len(train) == s["train_blocks"] and len(val) == s["val_blocks"] == round(0.1 * s["blocks"])
    everything = dm.packed()[0]
    assert sorted(rows(torch.cat([train, val]))) == sorted(rows(everything)), "disjoint, and cover every block"

    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, 16)
    assert torch.equal(b["labels"], b["input_ids"]) and b["attention_mask"].eq(1).all()
    order = batches(dm.dataloader())
    seen = rows(torch.cat(order))
    assert len(seen) == len(train) // 2 * 2 and len(set(seen)) == len(seen) and set(seen) <= set(rows(train))

    # The second setup reads the cached blocks (tokenizing again fails here); a writer's leftover is ignored.
    (tmp_path / "cache" / ".packed-leftover.safetensors").write_bytes(b"half")
    monkeypatch.setattr("data.blocks.load_documents", lambda *a, **k: pytest.fail("tokenized again"))
    dm2 = TextDataModule(**kw)
    dm2.setup()
    assert torch.equal(dm2.train_blocks, train) and dm2.stats == s
    assert all(torch.equal(x, y) for x, y in zip(order, batches(dm2.dataloader())))

    other = TextDataModule(**{**kw, "seed": 4})
    other.setup()
    assert not torch.equal(torch.cat(batches(other.dataloader())), torch.cat(order))
    assert len(list((tmp_path / "cache").glob("[!.]*.safetensors"))) == 1, "the seed splits, it does not re-pack"


def test_cache_key_follows_the_file_and_settings(tmp_path, corpus, bundled_tokenizer, monkeypatch):
    monkeypatch.setenv("DISTQAT_HOME", str(tmp_path / "home"))
    dm = TextDataModule(path=str(corpus), seq_len=16, tokenizer=bundled_tokenizer)
    key = dm.cache_file()
    assert key.parent == tmp_path / "home" / "cache" / "packed"
    assert TextDataModule(path=str(corpus), seq_len=32, tokenizer=bundled_tokenizer).cache_file() != key
    assert TextDataModule(path=str(corpus), seq_len=16, tokenizer=bundled_tokenizer, seed=9).cache_file() == key
    corpus.write_text(corpus.read_text() + "\nOne more line.")
    assert dm.cache_file() != key


def test_two_ranks_get_disjoint_halves_of_the_train_set(tmp_path, corpus, bundled_tokenizer):
    dm = TextDataModule(path=str(corpus), seq_len=16, micro_batch_size=2, seed=1, tokenizer=bundled_tokenizer,
                        cache_dir=tmp_path / "cache", val_fraction=0.05)
    dm.setup()
    loaders = [dm.dataloader(rank=r, world_size=2) for r in range(2)]
    assert all(isinstance(dl.sampler, DistributedSampler) for dl in loaders), "Lightning leaves these alone"
    r0, r1 = (torch.cat(batches(dl)) for dl in loaders)
    assert len(r0) == len(r1)
    seen, train = rows(torch.cat([r0, r1])), rows(dm.train_blocks)
    assert len(set(seen)) == len(seen) and set(seen) <= set(train)
    assert len(train) - len(seen) < 2 * 2, "only what makes no full batch on both ranks is left out"
    loaders[0].sampler.set_epoch(1)
    assert not torch.equal(torch.cat(batches(loaders[0])), r0), "each epoch its own order"


def test_step_mode_ranks_interleave_and_resume_continues_the_order():
    n, total = 10, 24
    full = list(ResumableSampler(n, 7, 0, 1, total))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    r0, r1 = list(ResumableSampler(n, 7, 0, 2, total)), list(ResumableSampler(n, 7, 1, 2, total))
    assert [x for pair in zip(r0, r1) for x in pair] == full
    # Resuming after 12 consumed samples yields exactly the rest of the uninterrupted order.
    assert list(ResumableSampler(n, 7, 0, 1, total, consumed=lambda: 12)) == full[12:]
    assert len(ResumableSampler(n, 7, 1, 2, total, consumed=lambda: 12)) == 6


def test_lightning_fit_reads_the_datamodule_order(tmp_path, corpus, bundled_tokenizer):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), []

        def training_step(self, batch, i):
            self.seen.append(batch["input_ids"].clone())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = TextDataModule(path=str(corpus), seq_len=16, micro_batch_size=2, seed=5, tokenizer=bundled_tokenizer,
                        cache_dir=tmp_path / "cache", total_samples=3 * 2)
    module = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=True)
    trainer.fit(module, datamodule=dm)
    expected = batches(dm.dataloader())
    assert len(expected) == 3 and all(torch.equal(a, b) for a, b in zip(module.seen, expected))
    # What a run resumed after step 2 reads: the third batch and nothing else.
    assert [torch.equal(b, expected[2]) for b in batches(dm.dataloader(consumed=lambda: 4))] == [True]
