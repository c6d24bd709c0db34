"""Prompt formats for GSM8K: zero-shot, k-shot and chat.

The plain format is ``Question: {q}\\nAnswer:`` followed by the target `` {solution}``; a
k-shot prompt prefixes k solved exemplars, each followed by a blank line. Training, teacher-
forced scoring and generation all build prompts here, so they agree token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftlens.data.gsm8k import Example
from sftlens.errors import SftlensError


def format_question(question: str) -> str:
    """The zero-shot prompt: ``"Question: {question}\\nAnswer:"``."""
    return f"Question: {question}\nAnswer:"


def format_target(answer: str) -> str:
    """What follows the prompt (and is trained on): a space, then the full solution."""
    return " " + answer


def few_shot_prefix(exemplars: Sequence[Example]) -> str:
    """Solved exemplars in the given order, each as ``"Question: ...\\nAnswer: ...\\n\\n"``."""
    return "".join(
        format_question(e.question) + format_target(e.answer) + "\n\n" for e in exemplars
    )


def format_prompt(tokenizer: Any, question: str, prompt_format: str = "qa") -> str:
    """The prompt that ``sftlens sft`` trains after: :func:`format_question` (``qa``) or
    :func:`format_chat` (``chat``). ``dpo`` samples and pairs after the same text.

    >>> format_prompt(None, "2 + 2?")
    'Question: 2 + 2?\\nAnswer:'
    """
    return (
        format_chat(tokenizer, question) if prompt_format == "chat" else format_question(question)
    )


def format_chat(tokenizer: Any, question: str) -> str:
    """The question as one user turn in ``tokenizer``'s chat template, ready for generation."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise SftlensError(
            f"tokenizer {name!r} has no chat template; use the plain Question/Answer prompt "
            "format, or pass an instruct model whose tokenizer defines one"
        )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2 TemplateError, ValueError, ...: the template's own fault
        raise SftlensError(
            f"tokenizer {name!r} could not apply its chat template ({e}); "
            "use the plain Question/Answer prompt format instead"
        ) from e
    if not isinstance(text, str):
        raise SftlensError(
            f"tokenizer {name!r} chat template returned {type(text).__name__}, not text; "
            "use the plain Question/Answer prompt format instead"
        )
    return text
