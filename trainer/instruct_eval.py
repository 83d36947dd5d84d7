"""Instruction evaluation offline: greedy answers to the bundled instruction set's held-out questions, scored by
normalized exact match.

The `test` split of `bundled:instructions` comes from held-out articles (the QLoRA recipes train on `train` and
score their held-out loss on `test`). Its `title` and `section` tasks have one short right answer (an article's
title, one of the section names the prompt lists), so exact match means something there; `continue` (write the
next sentences) has no single answer and is left out. Answers and references are compared after `normalize`
(case, punctuation, articles and spacing dropped), as SQuAD's exact match does.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any

import torch
from torch import nn

from data.sources import load_records
from data.text import BUNDLED_INSTRUCTIONS

TASKS = ("title", "section")  # the tasks with one short right answer
MAX_NEW_TOKENS = 24  # titles and section names are a few tokens; a longer answer is wrong anyway
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalization, plus NFKC)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def held_out_questions(n_per_task: int, path: str = BUNDLED_INSTRUCTIONS, split: str = "test") -> list[dict[str, Any]]:
    """Up to `n_per_task` examples of each of TASKS, spread evenly over the split: {task, messages (the turns
    before the answer), answer}."""
    ds = load_records(path, split)
    if "task" not in ds.column_names or "messages" not in ds.column_names:
        raise ValueError(f"{path} ({split}) has no `task`/`messages` columns; instruction evaluation reads the "
                         f"bundled instruction set ({BUNDLED_INSTRUCTIONS})")
    out = []
    for task in TASKS:
        idx = [i for i, t in enumerate(ds["task"]) if t == task]
        step = max(1, len(idx) // max(1, n_per_task))
        for i in idx[::step][:n_per_task]:
            messages = ds[i]["messages"]
            *prompt, answer = messages
            if answer["role"] != "assistant":
                raise ValueError(f"{path} ({split}) record {i} does not end with the assistant's answer")
            out.append({"task": task, "messages": [{"role": m["role"], "content": m["content"]} for m in prompt],
                        "answer": answer["content"]})
    return out


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, questions: list[dict[str, Any]], batch_size: int = 8,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The model's greedy answer to each question (its chat template with the generation prompt), batched with
    left padding so every prompt ends where generation starts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers = []
    for b0 in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template(q["messages"], tokenize=True, add_generation_prompt=True,
                                                 return_dict=False) for q in questions[b0 : b0 + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def exact_match(answers: list[str], questions: list[dict[str, Any]]) -> dict[str, Any]:
    """{"exact_match": share over all questions, "by_task": {task: share}, "n": count}."""
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    hits: dict[str, list[bool]] = {}
    for a, q in zip(answers, questions):
        hits.setdefault(q["task"], []).append(normalize(a) == normalize(q["answer"]))
    every = [h for v in hits.values() for h in v]
    return {"exact_match": sum(every) / max(1, len(every)),
            "by_task": {t: sum(v) / len(v) for t, v in hits.items()}, "n": len(every)}


def evaluate_instructions(model: nn.Module, tokenizer, questions: list[dict[str, Any]],
                          batch_size: int = 8) -> dict[str, Any]:
    """Greedy answers of `model` scored by exact match (`exact_match`'s dict, plus the answers)."""
    was_training = model.training
    model.eval()
    try:
        answers = greedy_answers(model, tokenizer, questions, batch_size)
    finally:
        model.train(was_training)
    return {**exact_match(answers, questions), "answers": answers}
