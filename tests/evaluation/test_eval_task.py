"""The GSM8K task as data: every field is hashed, prompts match training, stops resolve."""

from __future__ import annotations

import dataclasses

import pytest

from sftlens.data.gsm8k import Example
from sftlens.data.prompts import few_shot_prefix, format_chat, format_question, format_target
from sftlens.errors import SftlensError
from sftlens.evaluation import task as task_mod
from sftlens.evaluation.scoring import extract_strict
from sftlens.evaluation.task import GSM8KTask, chat_end_text
from tiny_models import tiny_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EXEMPLARS = [
    Example("how many is 1 + 2 ?", "1 + 2 = 3 .\n#### 3"),
    Example("how many is 4 + 4 ?", "4 + 4 = 8 .\n#### 8"),
]

# one different, valid value per field; a new field must be added here (and so be hashed)
OTHER = {
    "version": 2,
    "shots": 3,
    "fewshot_split": "dev",
    "fewshot_order": "random",  # not accepted by validation; set directly below
    "prompt_format": "chat",
    "question_template": "Q: {question}\nA:",
    "target_template": "{answer}",
    "fewshot_separator": "\n",
    "stop_strings": ("Question:", "\n\n\n"),
    "stop_at_eos": False,
    "stop_at_chat_end": False,
    "max_new_tokens": 128,
    "greedy": False,  # not accepted by validation; set directly below
    "filters": ("strict",),
}


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_hash_changes_with_each_field():
    base = GSM8KTask()
    assert set(OTHER) == {f.name for f in dataclasses.fields(GSM8KTask)}
    assert GSM8KTask().hash() == base.hash()
    hashes = {base.hash()}
    for name, value in OTHER.items():
        try:
            changed = dataclasses.replace(base, **{name: value})
        except SftlensError:  # a value validation refuses: still, it must be hashed
            changed = dataclasses.replace(base)
            object.__setattr__(changed, name, value)
        assert changed.hash() != base.hash(), name
        hashes.add(changed.hash())
    assert len(hashes) == len(OTHER) + 1


def test_hash_follows_the_filter_patterns(monkeypatch):
    before = GSM8KTask().hash()
    monkeypatch.setitem(task_mod.ANSWER_FILTERS, "strict", (extract_strict, r"#### (\d+)"))
    assert GSM8KTask().hash() != before


def test_qa_prompts_are_the_training_format():
    tok = tiny_tokenizer()
    q = "how many is 2 + 5 ?"
    k2 = GSM8KTask(shots=2)
    assert k2.prompt(tok, EXEMPLARS, q) == few_shot_prefix(EXEMPLARS) + format_question(q)
    assert k2.prompt(tok, EXEMPLARS, q) == (
        "Question: how many is 1 + 2 ?\nAnswer: 1 + 2 = 3 .\n#### 3\n\n"
        "Question: how many is 4 + 4 ?\nAnswer: 4 + 4 = 8 .\n#### 8\n\n"
        "Question: how many is 2 + 5 ?\nAnswer:"
    )
    assert GSM8KTask(shots=0).prompt(tok, [], q) == format_question(q)
    assert k2.target(EXEMPLARS[0].answer) == format_target(EXEMPLARS[0].answer)
    with pytest.raises(ValueError, match="2 exemplars"):
        k2.prompt(tok, EXEMPLARS[:1], q)


def test_chat_prompts_and_stops():
    tok = chat_tokenizer()
    q = "how many is 2 + 5 ?"
    zero = GSM8KTask(shots=0, prompt_format="chat")
    assert zero.prompt(tok, [], q) == format_chat(tok, q)  # as `sft --prompt-format chat` trains
    two = GSM8KTask(shots=2, prompt_format="chat")
    assert two.prompt(tok, EXEMPLARS, q) == (
        "<|im_start|>user\nhow many is 1 + 2 ?<|im_end|>\n"
        "<|im_start|>assistant\n1 + 2 = 3 .\n#### 3<|im_end|>\n"
        "<|im_start|>user\nhow many is 4 + 4 ?<|im_end|>\n"
        "<|im_start|>assistant\n4 + 4 = 8 .\n#### 8<|im_end|>\n"
        "<|im_start|>user\nhow many is 2 + 5 ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_end_text(tok) == "<|im_end|>"
    strings, ids = two.resolved_stops(tok)
    assert strings == ("Question:", "<|im_end|>")
    assert ids == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    # the plain format stops at EOS and Question: only
    assert GSM8KTask().resolved_stops(tok) == (("Question:",), frozenset({tok.eos_token_id}))
    assert GSM8KTask(stop_at_eos=False).resolved_stops(tok) == (("Question:",), frozenset())


def test_chat_without_template_is_one_line_error():
    with pytest.raises(SftlensError, match="no chat template; drop --chat") as e:
        GSM8KTask(shots=0, prompt_format="chat").prompt(tiny_tokenizer(), [], "q")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shots": -1}, "--shots must be >= 0"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"prompt_format": "xml"}, "use 'qa' or 'chat'"),
        ({"fewshot_order": "random"}, "use 'first'"),
        ({"greedy": False}, "only greedy"),
        ({"filters": ("strict", "fuzzy")}, "unknown"),
        ({"question_template": "Q: {q}"}, "templates need"),
    ],
)
def test_invalid_task_is_refused(kwargs, message):
    with pytest.raises(SftlensError, match=message):
        GSM8KTask(**kwargs)
