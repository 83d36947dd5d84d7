"""Chat formats of instruction data: ShareGPT `conversations` records, and the assistant mask under three chat
templates written here (ChatML, Llama-3, Gemma) into a copy of the bundled tokenizer, checked token by token
against the character spans of each assistant turn's content and end-of-turn marker."""

from __future__ import annotations

import copy
import json

import pytest

from data.instructions import SHAREGPT_ROLES, load_conversations, render

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 Instruct's layout: a header per turn, trimmed content, <|eot_id|> closing each turn, BOS once.
LLAMA3 = ("{% for m in messages %}{% set c = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set c = bos_token + c %}{% endif %}"
          "{{ c }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# Gemma's layout: no system role (refused by the template), the assistant's turns under the role "model".
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TEMPLATES = {  # name: (template, its special tokens, BOS, what closes an assistant turn)
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>\n"),
}

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."},
         {"role": "user", "content": "And 3+3, in words?"}, {"role": "assistant", "content": "Six.\nThat is all."}]


@pytest.fixture(scope="module")
def tokenizers(bundled_tokenizer):
    out = {}
    for name, (template, special, bos, _) in TEMPLATES.items():
        tok = copy.deepcopy(bundled_tokenizer)  # adding tokens must not touch the session's tokenizer
        tok.add_tokens(special, special_tokens=True)
        if bos is not None:
            tok.bos_token = bos
        tok.chat_template = template
        out[name] = tok
    return out


def expected_mask(tok, chat, end: str) -> tuple[list[int], list[int]]:
    """The template's tokens, 1 on those that start inside an assistant turn's content + end-of-turn marker."""
    text = tok.apply_chat_template(chat, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, at = [], 0
    for turn in chat:
        if turn["role"] == "assistant":
            piece = turn["content"].strip() + end
            lo = text.index(piece, at)
            spans.append((lo, lo + len(piece)))
            at = lo + len(piece)
    return list(enc["input_ids"]), [int(any(lo <= s < hi for lo, hi in spans)) for s, _ in enc["offset_mapping"]]


def runs(ids, mask, tok) -> list[str]:
    out, cur = [], []
    for t, m in zip([*ids, None], [*mask, 0]):
        if m:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_assistant_mask_is_exactly_each_answer_and_its_end_of_turn(tokenizers, name):
    tok, end = tokenizers[name], TEMPLATES[name][3]
    chats = [TURNS[:2], TURNS, TURNS[:3]] + ([[SYSTEM, *TURNS]] if name != "gemma" else [])
    for chat in chats:
        ids, mask = render(chat, tok)
        want_ids, want_mask = expected_mask(tok, chat, end)
        assert ids == want_ids and mask == want_mask, (name, chat)
        answers = [t["content"] + end for t in chat if t["role"] == "assistant"]
        assert runs(ids, mask, tok) == answers, name
        header = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  "gemma": "<start_of_turn>model\n"}[name]
        prompt = tok.decode([t for t, m in zip(ids, mask) if not m])
        assert prompt.count(header) == len(answers) and "4, of course" not in prompt, "headers are prompt"


def test_gemma_refuses_a_system_turn_in_one_line_and_reads_model_turns(tmp_path, tokenizers):
    with pytest.raises(ValueError, match="System role not supported; drop the system turns or fold them into the "
                                         "first user turn") as e:
        render([SYSTEM, *TURNS[:2]], tokenizers["gemma"])
    assert "\n" not in str(e.value) and "['system', 'user', 'assistant']" in str(e.value)
    # Records written for Gemma name the answer's role "model": read as the assistant.
    path = tmp_path / "gemma.jsonl"
    gemma_turns = [{**t, "role": "model" if t["role"] == "assistant" else t["role"]} for t in TURNS]
    path.write_text(json.dumps({"messages": gemma_turns}))
    (chat,) = load_conversations(str(path))
    assert chat == TURNS
    assert render(chat, tokenizers["gemma"]) == expected_mask(tokenizers["gemma"], chat, "<end_of_turn>\n")


def sharegpt(turns, names=("system", "human", "gpt")):
    by_role = dict(zip(("system", "user", "assistant"), names))
    return [{"from": by_role[t["role"]], "value": t["content"]} for t in turns]


def test_sharegpt_records_read_as_conversations(tmp_path, tokenizers):
    records = [{"conversations": sharegpt([SYSTEM, *TURNS]), "id": "a"},
               {"conversations": sharegpt(TURNS[:2], ("system", "user", "chatgpt"))},
               {"conversations": sharegpt(TURNS[:2], ("system", "human", "bing"))},
               {"conversations": sharegpt(TURNS[:2], ("system", "user", "assistant"))},
               {"conversations": [{**t, "weight": 0} if t["from"] == "human" else t for t in sharegpt(TURNS)]},
               {"conversations": TURNS[:2]}]  # {role, content} turns under `conversations`
    path = tmp_path / "share.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    chats = load_conversations(str(path))
    assert chats == [[SYSTEM, *TURNS], TURNS[:2], TURNS[:2], TURNS[:2], TURNS, TURNS[:2]]
    # Through a template, a ShareGPT record is the same example as its `messages` twin.
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [SYSTEM, *TURNS]}))
    assert render(chats[0], tokenizers["llama3"]) == render(load_conversations(str(tmp_path / "m.jsonl"))[0],
                                                            tokenizers["llama3"])
    assert set(SHAREGPT_ROLES.values()) == {"system", "user", "assistant"}


@pytest.mark.parametrize("record, match", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "tool", "value": "{}"}]},
     "record 1 has a turn from 'tool'; ShareGPT `from` values read are system, human, .*: rename it"),
    ({"conversations": "human: hi"}, "record 1 has `conversations` of type str; give a list of {from, value} turns"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "record 1 has no assistant turn"),
])
def test_bad_sharegpt_records_are_refused_in_one_line(tmp_path, record, match):
    good = {"conversations": sharegpt(TURNS[:2])}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, record)))
    with pytest.raises(ValueError, match=match) as e:
        load_conversations(str(path))
    assert "\n" not in str(e.value) and f"data.path={str(path)!r}" in str(e.value)
