"""Offline instruction evaluation (`trainer.instruct_eval`): held-out questions, batched greedy answers, exact match."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from data.sources import load_records
from data.text import BUNDLED_INSTRUCTIONS
from trainer.instruct_eval import TASKS, exact_match, greedy_answers, held_out_questions, normalize


@pytest.mark.parametrize("a,b", [("The Beatles", "beatles"), ("  Early  life.", "early life"),
                                 ("\u201cHistory\u201d", "history"), ("An Apple, a day", "apple day")])
def test_normalize_drops_case_punctuation_articles_and_spacing(a, b):
    assert normalize(a) == b


def test_exact_match_counts_per_task():
    qs = [{"task": "title", "answer": "Paris"}, {"task": "title", "answer": "Rome"},
          {"task": "section", "answer": "History"}]
    got = exact_match(["paris.", "Milan", "the history"], qs)
    assert got == {"exact_match": 2 / 3, "by_task": {"title": 0.5, "section": 1.0}, "n": 3}
    with pytest.raises(ValueError, match="2 answers for 3 questions"):
        exact_match(["a", "b"], qs)


def test_held_out_questions_come_from_the_test_split_with_their_answers():
    qs = held_out_questions(5)
    assert [q["task"] for q in qs] == [t for t in TASKS for _ in range(5)]
    test = load_records(BUNDLED_INSTRUCTIONS, "test")
    train_answers = {m[-1]["content"] for m in load_records(BUNDLED_INSTRUCTIONS, "train")["messages"]}
    pairs = {(m[-2]["content"], m[-1]["content"]) for m in test["messages"]}
    for q in qs:
        assert q["messages"][-1]["role"] == "user" and (q["messages"][-1]["content"], q["answer"]) in pairs
    # held-out articles: no title answer of the test questions is a training answer
    assert not {q["answer"] for q in qs if q["task"] == "title"} & train_answers


def test_batched_greedy_answers_equal_one_at_a_time(bundled_tokenizer):
    """Left padding must not change a prompt's greedy answer: batched answers equal unbatched ones."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(bundled_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, eos_token_id=bundled_tokenizer.eos_token_id)
    model = tf.LlamaForCausalLM(cfg).eval()
    qs = held_out_questions(2)
    batched = greedy_answers(model, bundled_tokenizer, qs, batch_size=4, max_new_tokens=6)
    alone = [greedy_answers(model, bundled_tokenizer, [q], batch_size=1, max_new_tokens=6)[0] for q in qs]
    assert batched == alone and len(batched) == len(qs) and any(a.strip() for a in batched)
