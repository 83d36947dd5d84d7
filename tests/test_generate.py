"""Data-free generation: the LLM-QAT sampling rule, determinism across ranks, kill and resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from data.generate import GenerateError, candidate_first_tokens, counter_uniform, sample_next
from trainer.commands import run_generate
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, bundled_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"), bundled_tokenizer)


def cfg_for(teacher, out, *extra):
    return load_config(PUBLISHED, [f"model.name_or_path={teacher}", "model.dtype=float32", f"generate.out_dir={out}",
                              "generate.n_samples=10", "generate.max_length=24", "generate.batch_size=4",
                              "generate.shard_size=4", *extra])


def read(out: Path) -> dict[int, list[int]]:
    rows = {}
    for f in sorted(out.glob("shard-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            assert r["sample_id"] not in rows, "a sample appears twice"
            rows[r["sample_id"]] = r["input_ids"]
    return rows


def test_greedy_prefix_then_sampling(tiny_teacher, tmp_path):
    out = run_generate(cfg_for(tiny_teacher, tmp_path / "g", "generate.on_eos=continue"), progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    table = {r["sample_id"]: r for f in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()}
    assert sorted(table) == list(range(10))
    sampled_not_greedy = 0
    for r in table.values():
        ids = r["input_ids"]
        assert len(ids) == 24 and r["greedy_len"] in (3, 4, 5)
        with torch.no_grad():
            argmax = model(torch.tensor([ids])).logits[0].argmax(-1)
        # Tokens 1 .. greedy_len-1 are the teacher's top-1 choice; later ones are sampled.
        for t in range(1, r["greedy_len"]):
            assert ids[t] == argmax[t - 1]
        sampled_not_greedy += sum(ids[t] != argmax[t - 1] for t in range(r["greedy_len"], 24))
    assert sampled_not_greedy > 50, "after the greedy prefix the tokens are sampled, not greedy"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 10 and manifest["tokens"] == 240 and len(manifest["shards"]) == 3


def test_first_tokens_enumerate_and_skip_special(tiny_teacher, tmp_path, bundled_tokenizer):
    out = run_generate(cfg_for(tiny_teacher, tmp_path / "e", "generate.first_token=enumerate"), progress=False)
    firsts = [ids[0] for _, ids in sorted(read(out).items())]
    special = set(bundled_tokenizer.all_special_ids) | {
        i for i, t in bundled_tokenizer.added_tokens_decoder.items() if t.special}
    expected = [i for i in range(len(bundled_tokenizer)) if i not in special][:10]
    assert firsts == expected
    sampled = run_generate(cfg_for(tiny_teacher, tmp_path / "s"), progress=False)
    assert not set(ids[0] for ids in read(sampled).values()) & special
    # word: every sample opens with a vocabulary entry that spells a capitalised word, and not all the same one.
    words = run_generate(cfg_for(tiny_teacher, tmp_path / "w", "generate.first_token=word"), progress=False)
    opening = [bundled_tokenizer.decode([ids[0]]) for ids in read(words).values()]
    assert all(re.fullmatch(r" ?[A-Z][a-z]+", w) for w in opening), opening
    assert len(set(opening)) >= 8, opening


def test_same_seed_same_samples_and_ranks_do_not_matter(tiny_teacher, tmp_path):
    one = read(run_generate(cfg_for(tiny_teacher, tmp_path / "a"), progress=False))
    again = read(run_generate(cfg_for(tiny_teacher, tmp_path / "b"), progress=False))
    assert one == again
    # Two ranks writing into one folder make exactly the same set of samples.
    for rank in (1, 0):
        run_generate(cfg_for(tiny_teacher, tmp_path / "two"), rank=rank, world=2, progress=False)
    assert read(tmp_path / "two") == one
    assert (tmp_path / "two" / "manifest.json").exists()
    other = read(run_generate(cfg_for(tiny_teacher, tmp_path / "c", "seed=1"), progress=False))
    assert other != one


def test_kill_and_resume_gives_every_sample_once(tiny_teacher, tmp_path):
    reference = read(run_generate(cfg_for(tiny_teacher, tmp_path / "ref", "generate.n_samples=24",
                                          "generate.max_length=48"), progress=False))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "trainer", "generate", PUBLISHED,
            f"model.name_or_path={tiny_teacher}", "model.dtype=float32",
            f"generate.out_dir={out}", "generate.n_samples=24", "generate.max_length=48", "generate.batch_size=4",
            "generate.shard_size=4"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard-*.parquet")))
    assert 2 <= done < 6, f"the kill should land mid-run ({done} shards)"
    assert not (out / "manifest.json").exists()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read(out) == reference
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp file left behind"


def test_bad_inputs_write_nothing(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="generate.n_samples"):
        cfg_for(tiny_teacher, tmp_path / "x", "generate.n_samples=0")
    with pytest.raises(GenerateError, match="above the teacher's context of 128"):
        run_generate(cfg_for(tiny_teacher, tmp_path / "y", "generate.max_length=4096"), progress=False)
    assert not (tmp_path / "y").exists()
    run_generate(cfg_for(tiny_teacher, tmp_path / "z"), progress=False)
    with pytest.raises(GenerateError, match="other settings \\(temperature\\)"):
        run_generate(cfg_for(tiny_teacher, tmp_path / "z", "generate.temperature=0.5"), progress=False)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).log_softmax(-1).expand(20000, 4)
    u = counter_uniform(7, torch.arange(20000), 3)
    tokens = sample_next(logits, u, 1.0, 0, 1.0)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    top1 = sample_next(logits, u, 1.0, 1, 1.0)
    assert (top1 == 2).all()
    top_p = sample_next(logits, u, 1.0, 0, 0.6)  # p(2) = 0.665 covers 0.6 alone
    assert (top_p == 2).all()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0


@pytest.mark.slow
def test_bundled_teacher_writes_english(tmp_path):
    # Its speed is bench/generate.py's to measure (a timed test fails on shared cores, not on slow code).
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "trainer", "generate", "configs/default.yaml",
                        f"generate.out_dir={tmp_path}", "generate.n_samples=16", "generate.max_length=64",
                        "generate.batch_size=16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    secs = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    texts = [row["text"] for row in pq.read_table(tmp_path / "shard-00000.parquet").to_pylist()]
    assert len(texts) == 16
    stop = {"the", "and", "of", "to", "a", "in", "is", "that", "for", "with"}
    english = sum(len(stop & set(t.lower().split())) >= 2 for t in texts)
    ascii_share = sum(c.isascii() for t in texts for c in t) / sum(len(t) for t in texts)
    print(f"\n16 x 64 tokens in {secs:.1f} s; {english}/16 samples with English function words\n" + texts[0][:200])
    assert english >= 12 and ascii_share > 0.95


def test_two_processes_make_the_same_set_as_one(tiny_teacher, tmp_path):
    """Two real processes (as launch.sh/torchrun start them: RANK, WORLD_SIZE) share one folder."""
    one = read(run_generate(cfg_for(tiny_teacher, tmp_path / "one"), progress=False))
    cmd = [sys.executable, "-m", "trainer", "generate", PUBLISHED,
           f"model.name_or_path={tiny_teacher}", "model.dtype=float32",
           f"generate.out_dir={tmp_path / 'two'}", "generate.n_samples=10", "generate.max_length=24",
           "generate.batch_size=4", "generate.shard_size=4"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert read(tmp_path / "two") == one
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["samples"] == 10


def test_word_openings_need_a_capitalised_word_in_the_vocabulary():
    class LowercaseTokenizer:  # a vocabulary of lowercase pieces only
        all_special_ids = [0]
        added_tokens_decoder: dict = {}

        def __len__(self):
            return 4

        def batch_decode(self, rows):
            return [["<s>", " the", "cat", "ing"][r[0]] for r in rows]

    assert candidate_first_tokens(LowercaseTokenizer(), 4).tolist() == [1, 2, 3]
    with pytest.raises(GenerateError, match="first_token=sample"):
        candidate_first_tokens(LowercaseTokenizer(), 4, words_only=True)
