"""Packing that keeps example boundaries (data.packing.pack_bins, model_inputs): whole examples per block, positions
restarting at each example, attention that never crosses examples, labels that never cross a boundary, and the
same inputs for the student, the teacher, the teacher's top-k cache and KV-quantized attention."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from helpers.models import save_tiny_teacher, tiny_config

from data import blocks as data_blocks
from data.blocks import BlockData
from data.packing import model_inputs, pack_bins
from qat.apply import quantize_model
from trainer.config import TrainConfig
from trainer.losses import kd_loss, next_token_ce
from trainer.module import QATModule

PAD = 0


def random_examples(rng: random.Random, n: int, longest: int, vocab: int = 128):
    out = []
    for _ in range(n):
        k = rng.randrange(1, longest + 1)
        out.append(([rng.randrange(1, vocab) for _ in range(k)], [int(rng.random() < 0.6) for _ in range(k)]))
    return out


def segments(positions: torch.Tensor, attention: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each real piece in a block: a run that starts at position 0, padding excluded."""
    starts = [j for j in range(len(positions)) if positions[j] == 0 and attention[j]]
    ends = [next((k for k in range(s + 1, len(positions)) if positions[k] == 0 or not attention[k]), len(positions))
            for s in starts]
    return list(zip(starts, ends))


def test_pack_bins_keeps_examples_whole_and_pads_the_tail():
    rng = random.Random(0)
    for trial in range(150):
        seq_len = rng.randrange(2, 24)
        examples = random_examples(rng, rng.randrange(1, 15), 2 * seq_len + 3)
        t, stats = pack_bins(examples, seq_len, PAD, need_answer=False)
        blocks, assistant, attention, positions = t["blocks"], t["assistant"], t["attention"], t["positions"]
        assert blocks.dtype == torch.long and positions.dtype == torch.int32 and assistant.dtype == torch.bool
        pieces = []
        for row in range(len(blocks)):
            real = int(attention[row].sum())
            assert attention[row, :real].all() and not attention[row, real:].any(), "real tokens first, then padding"
            assert blocks[row, real:].eq(PAD).all() and not assistant[row, real:].any()
            assert positions[row, real:].tolist() == list(range(seq_len - real)), "the tail is a sequence of its own"
            for lo, hi in segments(positions[row], attention[row]):
                assert positions[row, lo:hi].tolist() == list(range(hi - lo))
                assert not assistant[row, lo], "a piece's first token is never a target"
                pieces.append((blocks[row, lo:hi].tolist(), assistant[row, lo + 1:hi].tolist()))
        # Every example is one piece (if it fits a block) or its consecutive block-long cuts, nothing else.
        want = []
        for ids, mask in examples:
            want += [(ids[lo:lo + seq_len], mask[lo + 1:lo + seq_len]) for lo in range(0, len(ids), seq_len)]
        assert sorted(pieces) == sorted(want), trial
        assert stats["split_examples"] == sum(len(ids) > seq_len for ids, _ in examples)
        assert stats["padding_tokens"] == int((~attention).sum()) and stats["dropped_tokens"] == 0
        # Best fit never opens a block that an earlier one had room for: no two blocks would fit in one.
        used = attention.sum(1).tolist()
        assert all(a + b > seq_len for i, a in enumerate(used) for b in used[i + 1:]), used
    with pytest.raises(ValueError, match="data.seq_len >= 2"):
        pack_bins([([1, 2], [0, 1])], 1, PAD)


def test_pack_bins_drops_the_prompt_only_pieces_of_a_cut_example():
    # 10 tokens in blocks of 4: [1 2 3 4] has no answer, [5 6 7 8] starts one, [9 10] continues it.
    t, stats = pack_bins([(list(range(1, 11)), [0] * 5 + [1] * 5), ([11, 12], [0, 1])], 4, PAD)
    assert t["blocks"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert t["assistant"].int().tolist() == [[0, 1, 1, 1], [0, 1, 0, 1]]
    assert t["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert stats == {"split_examples": 1, "dropped_tokens": 4, "padding_tokens": 0}


def model(family: str, attention: str, kv: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, cfg = tiny_config(family)
    m = cls(cfg).double().eval()
    m.set_attn_implementation(attention)
    if kv:
        quantize_model(m, "w4a8kv8")  # per-token activations and KV: each token's codes depend on it alone
    return m


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logits_of_a_packed_block_equal_each_example_run_alone(family, attention):
    t, _ = pack_bins(random_examples(random.Random(1), 9, 20), 32, PAD)
    m = model(family, attention)
    atol = 1e-12 if attention == "sdpa" else 1e-6  # eager attention takes its softmax in float32
    batch = {"input_ids": t["blocks"], "attention_mask": t["attention"].long(), "position_ids": t["positions"].long()}
    with torch.no_grad():
        packed = m(**model_inputs(batch)).logits
        concatenated = m(input_ids=t["blocks"]).logits  # the old packing: examples attend to each other
        checked = 0
        for row in range(len(t["blocks"])):
            for lo, hi in segments(t["positions"][row], t["attention"][row]):
                alone = m(input_ids=t["blocks"][row:row + 1, lo:hi]).logits[0]
                torch.testing.assert_close(packed[row, lo:hi], alone, rtol=0, atol=atol)
                checked += lo > 0
        assert checked >= 3, "some examples start inside a block"
        assert (packed - concatenated).abs().max() > 1e-3, "the check can tell the two apart"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_quantized_attention_keeps_the_boundaries(family):
    t, _ = pack_bins(random_examples(random.Random(2), 7, 20), 32, PAD)
    m = model(family, "sdpa", kv=True)
    assert m.config._attn_implementation.endswith("sdpa") and m.config._attn_implementation != "sdpa"
    batch = {"input_ids": t["blocks"], "position_ids": t["positions"].long()}
    with torch.no_grad():
        packed = m(**model_inputs(batch)).logits
        for row in range(len(t["blocks"])):
            for lo, hi in segments(t["positions"][row], t["attention"][row]):
                alone = m(input_ids=t["blocks"][row:row + 1, lo:hi]).logits[0]
                torch.testing.assert_close(packed[row, lo:hi], alone, rtol=0, atol=1e-10)


def test_model_inputs_of_text_blocks_are_unchanged():
    ids = torch.tensor([[5, 6, 7]])
    assert model_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["attention_mask"].eq(1).all()
    packed = model_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": ids * 0})
    assert packed["attention_mask"] is None and packed["use_cache"] is False and packed["position_ids"] is not None


@pytest.fixture
def instruction_file(tmp_path):
    lines = [json.dumps({"instruction": f"Q{i}: count on from {i}" + " and on" * (i % 5), "output": f"{i + 1}."})
             for i in range(40)]
    (tmp_path / "inst.jsonl").write_text("\n".join(lines))
    return str(tmp_path / "inst.jsonl")


def test_block_data_batches_train_each_example_as_if_alone(tmp_path, instruction_file, bundled_tokenizer):
    """End to end: BlockData's packed batches, the teacher's cached top-k, and QATModule's losses (live teacher
    and KV-quantized student) equal the same examples run one at a time."""
    teacher_dir = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()  # noqa: E731
    dm = BlockData(path=instruction_file, seq_len=128, micro_batch_size=4, tokenizer=bundled_tokenizer,
                   cache_dir=tmp_path / "cache", val_fraction=0.0, format="instructions", packing=True,
                   teacher_topk=8, teacher=str(teacher_dir), load_teacher=load)
    dm.prepare_data()
    dm.setup()
    assert dm.stats["split_examples"] == 0 and dm.stats["blocks"] <= dm.stats["examples"] / 2, dm.stats
    batch = next(iter(dm.dataloader()))
    teacher, student = load(), load()
    quantize_model(student, "w4a8kv8")
    module = QATModule(student, teacher, TrainConfig(ce_weight=0.5))
    live = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}  # the teacher runs in the step
    with torch.no_grad():
        got = module.losses(live)
        kd_terms, ce_terms, pieces = [], [], 0
        for row in range(len(batch["input_ids"])):
            pos, real, labels = batch["position_ids"][row], batch["attention_mask"][row], batch["labels"][row]
            for lo, hi in segments(pos, real):
                pieces += 1
                assert labels[lo] == -100, "the first token of an example is never a target"
                ids = batch["input_ids"][row:row + 1, lo:hi]
                s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
                want = t[0].float().topk(8, dim=-1)  # compute_topk's own path, on the example alone
                assert torch.equal(batch["teacher_topk_indices"][row, lo:hi], want.indices.to(torch.int32))
                assert torch.equal(batch["teacher_topk_values"][row, lo:hi], want.values.to(torch.bfloat16))
                answer = batch["assistant_mask"][row:row + 1, lo:hi]
                kd_mask = torch.nn.functional.pad(answer[:, 1:], (0, 1))
                kd_terms.append(kd_loss(s, t, kd_mask) * kd_mask.sum())
                ce_terms.append(next_token_ce(s, ids, answer) * answer[:, 1:].sum())
        assert pieces > len(batch["input_ids"]), "blocks hold several examples"
        targets = batch["assistant_mask"][:, 1:].sum()
        # The losses reduce in float32 (trainer.losses), hence float32's tolerance.
        for key, terms in (("kd", kd_terms), ("ce", ce_terms)):
            torch.testing.assert_close(got[key], torch.stack(terms).sum() / targets, rtol=1e-5, atol=0)
        torch.testing.assert_close(got["loss"], got["kd"] + 0.5 * got["ce"])
        leaky = module.losses({k: v for k, v in live.items() if k != "position_ids"})  # the old packing
        print(f"\nkd {got['kd']:.6g} alone vs {leaky['kd']:.6g} across examples; "
              f"ce {got['ce']:.6g} vs {leaky['ce']:.6g}")
        assert abs(leaky["kd"] / got["kd"] - 1) > 1e-3 and abs(leaky["ce"] / got["ce"] - 1) > 1e-5


def test_caches_of_boundary_free_blocks_are_not_read(tmp_path, instruction_file, bundled_tokenizer, monkeypatch):
    kw = dict(path=instruction_file, seq_len=64, tokenizer=bundled_tokenizer, cache_dir=tmp_path, format="instructions")
    now = BlockData(**kw).cache_file()
    monkeypatch.setattr(data_blocks, "INSTRUCTION_BLOCKS_VERSION", 1)  # what packed examples across boundaries
    assert BlockData(**kw).cache_file() != now
