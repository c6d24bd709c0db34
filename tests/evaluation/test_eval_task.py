"""The GSM8K task as data: every field is hashed, prompts match training, stops resolve."""

from __future__ import annotations

import dataclasses

import pytest

from sftlens.data.gsm8k import Example
from sftlens.data.prompts import few_shot_prefix, format_chat, format_question, format_target
from sftlens.errors import SftlensError
from sftlens.evaluation import task as task_mod
from sftlens.evaluation.scoring import NUMBER_PATTERN, STRICT_PATTERN, extract_strict
from sftlens.evaluation.task import GSM8KTask, chat_end_text, render_chat
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


def test_to_dict_is_every_field_and_the_filter_patterns():
    d = GSM8KTask(filters=("flexible",)).to_dict()
    assert set(d) == set(OTHER) | {"filter_patterns"}
    assert d["filter_patterns"] == {"flexible": NUMBER_PATTERN.pattern + " (last match)"}
    assert GSM8KTask().to_dict()["filter_patterns"] == {
        "strict": STRICT_PATTERN.pattern + " (first match)",
        "flexible": NUMBER_PATTERN.pattern + " (last match)",
    }


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
        ({"greedy": False}, r"^only greedy decoding is implemented; keep greedy=True$"),
        ({"filters": ("strict", "fuzzy")}, "unknown"),
        (
            {"question_template": "Q: {q}"},
            r"^templates need '\{question\}' \(question_template\) and '\{answer\}' \(target_template\)$",
        ),
    ],
)
def test_invalid_task_is_refused(kwargs, message):
    with pytest.raises(SftlensError, match=message):
        GSM8KTask(**kwargs)


# -- chat templates of other shapes -----------------------------------------------------------
# Llama-2 style: roles must alternate user/assistant and each content is .strip()-ed
ALTERNATING = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'].strip() }} <eos>{% endif %}"
    "{% endfor %}"
)


def tokenizer_with(template: str | None, name: str = ""):
    tok = tiny_tokenizer()
    tok.chat_template = template
    tok.name_or_path = name
    return tok


class DuckChatTokenizer:
    """A tokenizer-like object with ChatML in Python and only the attributes it is given."""

    eos_token_id = 1

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def convert_tokens_to_ids(self, token):
        return {"<|im_end|>": 7}[token]


def test_chat_end_text_of_other_templates():
    # the probe conversation is a valid user/assistant exchange with non-empty contents
    assert chat_end_text(tokenizer_with(ALTERNATING)) == "<eos>"
    assert chat_end_text(DuckChatTokenizer()) == "<|im_end|>"
    # the end-of-turn text follows the LAST place the assistant's text appears
    header = "last: {{ messages[-1]['content'] }}\n" + CHATML
    assert chat_end_text(tokenizer_with(header)) == "<|im_end|>"
    # no end-of-turn text: nothing after the assistant turn, no assistant turn, a failing template
    assert (
        chat_end_text(tokenizer_with("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"))
        == ""
    )
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert chat_end_text(tokenizer_with(users_only)) == ""
    failing = tokenizer_with("{{ raise_exception('no chat here') }}")
    assert chat_end_text(failing) == ""
    assert GSM8KTask(prompt_format="chat").resolved_stops(failing) == (
        ("Question:",),
        frozenset({1}),
    )


def test_chat_end_token_id_from_special_or_added_tokens():
    chat = GSM8KTask(shots=0, prompt_format="chat")
    # an added token that is not special (listed in added_tokens_decoder only)
    tok = tokenizer_with(CHATML)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    assert "<|im_end|>" not in tok.all_special_tokens
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat.resolved_stops(tok) == (("Question:", "<|im_end|>"), frozenset({1, end_id}))
    # a special token that the tokenizer lists in all_special_tokens only
    duck = DuckChatTokenizer(all_special_tokens=["<|im_end|>"])
    assert chat.resolved_stops(duck) == (("Question:", "<|im_end|>"), frozenset({1, 7}))
    # neither list: the text still stops generation, no id does
    assert chat.resolved_stops(DuckChatTokenizer()) == (("Question:", "<|im_end|>"), frozenset({1}))


def test_chat_template_errors_name_the_tokenizer_and_the_fix():
    fix = "drop --chat to use the plain Question/Answer prompt"
    msgs = [{"role": "user", "content": "q"}]
    no_template = (
        f"has no chat template; {fix}, or pass an instruct model whose tokenizer defines one$"
    )
    with pytest.raises(SftlensError, match="^tokenizer 'org/tiny' " + no_template):
        render_chat(tokenizer_with(None, name="org/tiny"), msgs)
    with pytest.raises(SftlensError, match="^tokenizer 'TokenizersBackend' " + no_template):
        render_chat(tokenizer_with(None), msgs)  # no name: the class names it
    with pytest.raises(SftlensError, match="^tokenizer 'DuckChatTokenizer' " + no_template):
        render_chat(DuckChatTokenizer(), msgs)  # neither name_or_path nor chat_template
    with pytest.raises(
        SftlensError,
        match=r"^tokenizer 'org/tiny' could not apply its chat template \(no chat here\); "
        + fix
        + "$",
    ):
        render_chat(tokenizer_with("{{ raise_exception('no chat here') }}", name="org/tiny"), msgs)

    class ListChat(DuckChatTokenizer):
        chat_template = "ids"

        def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
            return [1, 2, 3]

    with pytest.raises(
        SftlensError, match=f"^tokenizer 'ListChat' chat template returned list, not text; {fix}$"
    ):
        render_chat(ListChat(), msgs)
