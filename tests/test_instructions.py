"""Instruction data (data/instructions.py): conversations from files, the assistant mask of the chat template,
packing and padding with masks, BlockData with format="instructions", and the bundled instruction set."""

from __future__ import annotations

import copy
import json
import random

import datasets
import pytest
import torch
import transformers
from helpers.models import save_tiny_teacher

from data import text
from data.blocks import BlockData
from data.instructions import (
    BUNDLED_INSTRUCTIONS,
    load_bundled_instructions,
    load_conversations,
    pad_examples,
    render,
)
from data.packing import pack_bins
from data.sources import load_documents, load_records
from data.text import build_instruction_dataset, load_bundled_text, split_sentences
from qat.keys import COMPLETE_MARKER

END = "<|im_end|>\n"  # what closes a turn in the bundled tokenizer's template
# Regression guard: these change only if the bundled text, the tasks or the split rule change.
EXPECTED_ROWS = {"train": 3704, "test": 530}
EXPECTED_TASKS = {"train": {"title": 1244, "continue": 1228, "section": 1232},
                  "test": {"title": 178, "continue": 174, "section": 178}}

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]


def runs(ids, mask, tokenizer):
    """The decoded text of each maximal run of masked tokens."""
    out, cur = [], []
    for t, m in zip([*ids, None], [*mask, 0]):
        if m:
            cur.append(t)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out


def template_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def with_template(tokenizer, template):
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    return tok


# -- render ---------------------------------------------------------------------------------------------------


def test_render_masks_exactly_the_assistant_turns(bundled_tokenizer):
    one = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    ids, mask = render(one, bundled_tokenizer)
    assert ids == template_ids(bundled_tokenizer, one) and set(mask) == {0, 1}
    assert runs(ids, mask, bundled_tokenizer) == ["Hello there!" + END]
    assert mask[-len(bundled_tokenizer("Hello there!" + END, add_special_tokens=False)["input_ids"]):] == [1] * 5
    prompt = bundled_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "the header is not learned"

    ids, mask = render(CHAT, bundled_tokenizer)
    assert ids == template_ids(bundled_tokenizer, CHAT)
    assert runs(ids, mask, bundled_tokenizer) == ["4, of course." + END, "Six." + END]
    assert "Be brief." in bundled_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    # A conversation may end with a user turn: it is prompt, not answer.
    ids, mask = render(CHAT[:4], bundled_tokenizer)
    assert runs(ids, mask, bundled_tokenizer) == ["4, of course." + END]


def test_render_answers_that_start_with_whitespace(bundled_tokenizer):
    # "\n" of the header and "\n" of the answer merge into one token: the boundary falls by character offsets.
    for answer, learned in [("\nHello", "\nHello"), ("\n\nHello", "\nHello"), ("  x", " x")]:
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
        ids, mask = render(chat, bundled_tokenizer)
        assert ids == template_ids(bundled_tokenizer, chat)
        assert runs(ids, mask, bundled_tokenizer) == [learned + END], answer


def test_render_errors(bundled_tokenizer):
    with pytest.raises(ValueError, match="data.format=instructions needs a tokenizer with a chat template; "):
        render(CHAT, with_template(bundled_tokenizer, None))
    # A template that marks the last turn renders each prefix differently from the whole.
    marks_last = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %}!{% endif %}|{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-consistent") as e:
        render(CHAT, with_template(bundled_tokenizer, marks_last))
    assert "\n" not in str(e.value)


# -- records -> conversations ---------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def test_load_conversations_from_every_form(tmp_path):
    chats = [CHAT, CHAT[1:3]]
    want = [[{"role": t["role"], "content": t["content"]} for t in c] for c in chats]
    assert load_conversations(write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in chats])) == want
    (tmp_path / "m.json").write_text(json.dumps([{"messages": c, "id": i} for i, c in enumerate(chats)]))
    assert load_conversations(str(tmp_path / "m.json")) == want
    datasets.Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "m.parquet"))
    assert load_conversations(str(tmp_path / "m.parquet")) == want
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": chats[:1]}),
                                  "test": datasets.Dataset.from_dict({"messages": chats[1:]})})
    saved.save_to_disk(str(tmp_path / "d"))
    assert load_conversations(str(tmp_path / "d"), "test") == want[1:]

    records = [{"instruction": "Add them.", "input": "2 and 2", "output": "4"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "Count.", "output": "1 2"}]
    assert load_conversations(write_jsonl(tmp_path / "i.jsonl", records)) == [
        [{"role": "user", "content": "Add them.\n\n2 and 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2"}]]


def test_bad_records_each_give_one_clear_error(tmp_path):
    def fails(records, match):
        path = write_jsonl(tmp_path / f"bad{random.random()}.jsonl", records)
        with pytest.raises(ValueError, match=match) as e:
            load_conversations(path)
        msg = str(e.value)
        assert "\n" not in msg and f"data.path={path!r}" in msg, msg

    fails([{"text": "plain"}], r"none of the fields `messages`, `conversations` \(ShareGPT\) or `instruction`/`output` "
                               r"\(fields: \['text'\]\); give")
    fails([{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}],
          "record 1 has no assistant turn, so nothing to train on; add the answer")
    fails([{"messages": [{"role": "bot", "content": "hi"}]}], "role 'bot'; .* rename it in the file")
    fails([{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}],
          "every assistant turn is empty.*fill in the answers")
    fails([{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}], "every assistant turn is empty")


# -- examples -> blocks ---------------------------------------------------------------------------------------

EOS = 0


def test_pad_examples_truncates_and_masks_padding():
    examples = [([5, 6, 7], [0, 1, 1]), ([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]), ([], [])]
    blocks, assistant, attention = pad_examples(examples, 4, pad_id=9)
    assert blocks.tolist() == [[5, 6, 7, 9], [1, 2, 3, 4], [9, 9, 9, 9]]
    assert assistant.int().tolist() == [[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert attention.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert assistant.dtype == attention.dtype == torch.bool and blocks.dtype == torch.long


# -- BlockData -------------------------------------------------------------------------------------------------


@pytest.fixture
def instruction_file(tmp_path):
    records = [{"instruction": f"Question {i}: what comes after {i}?", "output": f"{i + 1}, then {i + 2}."}
               for i in range(60)]
    return write_jsonl(tmp_path / "inst.jsonl", records)


@pytest.mark.parametrize("packing", [True, False])
def test_block_data_round_trip(tmp_path, instruction_file, bundled_tokenizer, monkeypatch, packing):
    kw = dict(path=instruction_file, seq_len=50, micro_batch_size=2, seed=3, tokenizer=bundled_tokenizer,
              cache_dir=tmp_path / "cache", val_fraction=0.1, format="instructions", packing=packing)
    dm = BlockData(**kw)
    dm.setup()
    s, (tensors, _) = dm.stats, dm.packed_tensors()
    assert s["examples"] == 60 and s["assistant_tokens"] == int(tensors["assistant"].sum()) > 0
    assert s["blocks"] == s["train_blocks"] + s["val_blocks"] and s["val_blocks"] == round(0.1 * s["blocks"])
    assert tensors["blocks"].dtype == torch.int32 and tensors["assistant"].dtype == torch.bool
    assert ("positions" in tensors) == packing
    examples = [render(c, bundled_tokenizer) for c in load_conversations(instruction_file)]
    if packing:  # 48 to 52 tokens each: one per block, the longer ones cut, their prompt-only heads dropped
        want, counts = pack_bins(examples, 50, bundled_tokenizer.eos_token_id)
        assert all(torch.equal(tensors[k].to(v.dtype), v) for k, v in want.items()) and set(tensors) == set(want)
        assert s["split_examples"] == counts["split_examples"] > 0 and s["padding_tokens"] == counts["padding_tokens"]
    else:  # 48 to 52 tokens each: some padded, some truncated (their answers survive, so no block is dropped)
        lengths = [len(ids) for ids, _ in examples]
        assert s["blocks"] == 60 and s["no_answer_blocks"] == 0
        assert s["truncated_examples"] == sum(n > 50 for n in lengths) > 0
        assert s["padding_tokens"] == sum(max(0, 50 - n) for n in lengths) > 0

    loaded = list(dm.dataloader())
    keys = {"input_ids", "attention_mask", "labels", "assistant_mask"} | ({"position_ids"} if packing else set())
    assert all(set(b) == keys for b in loaded)
    assert all(v.dtype == torch.long and v.shape == (2, 50) for b in loaded for v in b.values())
    batch = {k: torch.cat([b[k] for b in loaded]) for k in loaded[0]}
    ids, labels, answer = batch["input_ids"], batch["labels"], batch["assistant_mask"].bool()
    assert torch.equal(labels[answer], ids[answer]) and labels[~answer].eq(-100).all() and answer.any()
    real = batch["attention_mask"].bool()
    assert not real.all() and not answer[~real].any(), "padding is neither attended nor learned"
    assert all(r.tolist() == sorted(r.tolist(), reverse=True) for r in real), "right-padded"
    for row, learned_bits in zip(ids, answer):  # answers ("k, then k+1.") and their end of turn, never prompts
        learned = bundled_tokenizer.decode(row[learned_bits])
        assert not any(word in learned for word in ("Question", "assistant", "user", "helpful")), learned

    # Two ranks read disjoint shares of the training blocks.
    loaders = [dm.dataloader(rank=r, world_size=2) for r in range(2)]
    seen = [tuple(row) for dl in loaders for b in dl for row in b["input_ids"].tolist()]
    train = {tuple(row) for row in dm.train_blocks.long().tolist()}
    assert len(seen) == len(set(seen)) and set(seen) <= train and len(train) - len(seen) < 2 * 2

    # The second setup reads the cache; the text format and the other packing mode have files of their own.
    monkeypatch.setattr("data.blocks.load_conversations", lambda *a, **k: pytest.fail("rendered again"))
    dm2 = BlockData(**kw)
    dm2.setup()
    assert dm2.stats == s and torch.equal(dm2.train_blocks, dm.train_blocks)
    assert all(torch.equal(dm2.train_masks[k], dm.train_masks[k]) for k in dm.train_masks)
    other = BlockData(**{**kw, "packing": not packing}).cache_file()
    plain = BlockData(**{**kw, "format": "text", "packing": True}).cache_file()
    assert len({dm.cache_file(), other, plain}) == 3


def test_text_format_and_settings_are_checked(instruction_file, bundled_tokenizer):
    with pytest.raises(ValueError, match="data.format='chat'"):
        BlockData(path=instruction_file, tokenizer=bundled_tokenizer, format="chat")
    with pytest.raises(ValueError, match="data.packing=false applies to data.format=instructions only"):
        BlockData(path=instruction_file, tokenizer=bundled_tokenizer, packing=False)


def test_teacher_topk_on_padded_instructions(tmp_path, instruction_file, bundled_tokenizer):
    teacher = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(teacher).eval()  # noqa: E731
    dm = BlockData(path=instruction_file, seq_len=48, micro_batch_size=2, tokenizer=bundled_tokenizer,
                   cache_dir=tmp_path / "cache", format="instructions", packing=False, teacher_topk=4,
                   teacher=str(teacher), load_teacher=load)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.dataloader()))
    with torch.no_grad():
        logits = load()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    want = logits.topk(4, dim=-1).values.to(torch.bfloat16)
    # Right padding under causal attention: the teacher's logits at real tokens ignore the padding.
    torch.testing.assert_close(batch["teacher_topk_values"][real].float(), want[real].float(), atol=2e-2, rtol=1e-2)


# -- the bundled instruction set ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    return load_bundled_instructions()


def test_bundled_instruction_set(bundled):
    assert set(bundled) == {"train", "test"}
    articles = {split: dict(zip(load_bundled_text()[split]["source"], load_bundled_text()[split]["text"]))
                for split in ("train", "test")}
    for split, ds in bundled.items():
        assert ds.num_rows == EXPECTED_ROWS[split], split
        tasks = {t: ds["task"].count(t) for t in set(ds["task"])}
        assert tasks == EXPECTED_TASKS[split], split
        assert set(ds["source"]) <= set(articles[split]), "test rows come from held-out articles only"
        for row in ds:
            (user, answer), source = row["messages"], row["source"]
            assert user["role"] == "user" and answer["role"] == "assistant" and answer["content"]
            assert len(user["content"].split()) < 200 and len(answer["content"].split()) <= 60
            if row["task"] == "title":
                assert answer["content"] == articles[split][source].split("\n", 1)[0] == source.split(":", 1)[1]
            elif row["task"] == "section":
                assert f"\n\n{answer['content']}\n\n" in articles[split][source]
            else:
                assert answer["content"] in articles[split][source]
    assert load_records(BUNDLED_INSTRUCTIONS, "test")["messages"] == bundled["test"]["messages"]
    assert load_conversations(BUNDLED_INSTRUCTIONS, "test")[0] == bundled["test"][0]["messages"]
    with pytest.raises(ValueError, match="the bundled instruction set has splits"):
        load_records(BUNDLED_INSTRUCTIONS, "calib")


def test_bundled_instructions_as_chat_text(bundled_tokenizer):
    # data.format=text with data.chat_template=true reads the same set as plain chat documents.
    docs = load_documents(BUNDLED_INSTRUCTIONS, bundled_tokenizer, "test", chat_template=True)
    assert len(docs) == EXPECTED_ROWS["test"] and "<|im_start|>assistant\n" in bundled_tokenizer.decode(docs[0])


def test_bundled_instructions_are_built_once_and_deterministic(tmp_path, bundled, monkeypatch):
    monkeypatch.setattr(text, "load_bundled_text", lambda cache_dir=None: load_bundled_text())
    (tmp_path / "bundled_instructions").mkdir()
    (tmp_path / "bundled_instructions" / "junk").write_text("a killed build")
    first = load_bundled_instructions(tmp_path)
    assert (tmp_path / "bundled_instructions" / COMPLETE_MARKER).read_text().strip() == text.INSTRUCTIONS_VERSION
    assert not (tmp_path / "bundled_instructions" / "junk").exists()
    assert first["train"]["messages"] == bundled["train"]["messages"], "the same rows every time"
    marker = tmp_path / "bundled_instructions" / COMPLETE_MARKER
    marker.write_text("0\n")  # another version's set is built again
    assert load_bundled_instructions(tmp_path)["test"]["task"] == bundled["test"]["task"]
    assert marker.read_text().strip() == text.INSTRUCTIONS_VERSION
    monkeypatch.setattr(text, "build_instruction_dataset", lambda *a: pytest.fail("built again"))
    assert load_bundled_instructions(tmp_path)["test"]["source"] == bundled["test"]["source"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundled_instructions"]


def test_sentences_and_tasks_on_a_small_article():
    assert split_sentences("Dr. Smith met J. R. Doe in the U.S. in 1990. They talked! Then? No.") == [
        "Dr. Smith met J. R. Doe in the U.S. in 1990.", "They talked!", "Then?", "No."]
    para = " ".join(f"Sentence number {i} says a little more about the subject at hand." for i in range(4))
    article = f"Topic\n\n{para}\n\nHistory\n\n{para}\n\nUses\n\nfirst item\nsecond item\n\n{para}"
    dd = build_instruction_dataset(datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"text": [article], "source": ["wikipedia:Topic"]}) for s in ("train", "test")}))
    tasks = dd["train"]["task"]
    assert sorted(tasks) == ["continue", "section", "title"], "one task a paragraph, the least used one first"
    sec = dd["train"][tasks.index("section")]["messages"]
    assert sec[1]["content"] in ("History", "Uses") and "History, Uses" in sec[0]["content"]
