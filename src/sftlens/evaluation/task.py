"""The GSM8K task declared as data: one frozen, versioned dataclass, hashed into the run.

Everything that decides what a model is asked and how its answer is read lives in
:class:`GSM8KTask`: the prompt templates, k, where the exemplars come from and in which order,
the stop strings, the token bound, greedy decoding and the two named answer filters. Its
:meth:`GSM8KTask.hash` enters the eval step's inputs, so changing any field (or the filters'
patterns in :mod:`sftlens.evaluation.scoring`) recomputes the step. Bump ``version`` when the
code that applies the task changes what it produces.

Prompt formats:

- ``qa``, zero-shot: ``Question: {q}\\nAnswer:``.
- ``qa``, k-shot: the first k problems of the train split, in file order, each as
  ``Question: {q}\\nAnswer: {solution}`` followed by a blank line, then the zero-shot prompt
  (:func:`sftlens.data.prompts.few_shot_prefix`, the text SFT trains on).
- ``chat``: the tokenizer's chat template; each exemplar is a user turn (the question) and an
  assistant turn (the solution), then the question as a user turn and the generation prompt.
  The user turn holds the bare question, as ``sftlens sft --prompt-format chat`` trains it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sftlens.data.gsm8k import Example
from sftlens.errors import SftlensError
from sftlens.evaluation.scoring import (
    NUMBER_PATTERN,
    STRICT_PATTERN,
    extract_flexible,
    extract_strict,
)
from sftlens.io import config_hash

#: The named answer filters: name -> (extractor, the pattern it applies, for the hash).
ANSWER_FILTERS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "strict": (extract_strict, STRICT_PATTERN.pattern + " (first match)"),
    "flexible": (extract_flexible, NUMBER_PATTERN.pattern + " (last match)"),
}


@dataclass(frozen=True)
class GSM8KTask:
    """How GSM8K is asked and scored (see the module doc for the prompt formats)."""

    version: int = 1
    shots: int = 5
    fewshot_split: str = "train"
    fewshot_order: str = "first"  # the first `shots` problems of fewshot_split, in file order
    prompt_format: str = "qa"  # "qa" or "chat"
    question_template: str = "Question: {question}\nAnswer:"
    target_template: str = " {answer}"
    fewshot_separator: str = "\n\n"
    stop_strings: tuple[str, ...] = ("Question:",)
    stop_at_eos: bool = True
    stop_at_chat_end: bool = True  # chat format: also stop at the template's end-of-turn text
    max_new_tokens: int = 256
    greedy: bool = True
    filters: tuple[str, ...] = ("strict", "flexible")

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise SftlensError(f"--shots must be >= 0, got {self.shots}")
        if self.max_new_tokens < 1:
            raise SftlensError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_format not in ("qa", "chat"):
            raise SftlensError(
                f"prompt format {self.prompt_format!r} is unknown; use 'qa' or 'chat'"
            )
        if self.fewshot_order != "first":
            raise SftlensError(
                f"few-shot order {self.fewshot_order!r} is unknown; use 'first' (file order)"
            )
        if not self.greedy:
            raise SftlensError("only greedy decoding is implemented; keep greedy=True")
        unknown = [f for f in self.filters if f not in ANSWER_FILTERS]
        if unknown:
            raise SftlensError(
                f"answer filters {unknown} are unknown; use some of {sorted(ANSWER_FILTERS)}"
            )
        if "{question}" not in self.question_template or "{answer}" not in self.target_template:
            raise SftlensError(
                "templates need '{question}' (question_template) and '{answer}' (target_template)"
            )

    # -- identity --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, plus the patterns of the named filters."""
        d = dataclasses.asdict(self)
        d["filter_patterns"] = {f: ANSWER_FILTERS[f][1] for f in self.filters}
        return d

    def hash(self) -> str:
        """Short stable hash of :meth:`to_dict`: a changed task recomputes the eval step."""
        return config_hash(self.to_dict())

    # -- prompts ---------------------------------------------------------------------------
    def question(self, question: str) -> str:
        return self.question_template.format(question=question)

    def target(self, answer: str) -> str:
        """What follows the prompt in teacher-forced scoring: `` {solution}``."""
        return self.target_template.format(answer=answer)

    def prefix(self, exemplars: Sequence[Example]) -> str:
        """The plain-text k-shot prefix (``qa`` format)."""
        return "".join(
            self.question(e.question) + self.target(e.answer) + self.fewshot_separator
            for e in exemplars
        )

    def prompt(self, tokenizer: Any, exemplars: Sequence[Example], question: str) -> str:
        """The full prompt text for ``question`` after ``exemplars`` (``len == shots``)."""
        if len(exemplars) != self.shots:
            raise ValueError(f"task wants {self.shots} exemplars, got {len(exemplars)}")
        if self.prompt_format == "qa":
            return self.prefix(exemplars) + self.question(question)
        messages: list[dict[str, str]] = []
        for e in exemplars:
            messages += [
                {"role": "user", "content": e.question},
                {"role": "assistant", "content": e.answer},
            ]
        messages.append({"role": "user", "content": question})
        return render_chat(tokenizer, messages)

    def resolved_stops(self, tokenizer: Any) -> tuple[tuple[str, ...], frozenset[int]]:
        """(stop strings, stop token ids) for this tokenizer.

        Ids: the tokenizer's EOS (``stop_at_eos``) and, in chat format, the end-of-turn text
        when it is one special token. Strings: ``stop_strings`` and that end-of-turn text.
        """
        strings = list(self.stop_strings)
        ids: set[int] = set()
        if self.stop_at_eos and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if self.prompt_format == "chat" and self.stop_at_chat_end:
            end = chat_end_text(tokenizer)
            if end:
                special = set(getattr(tokenizer, "all_special_tokens", []))
                special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
                if end in special:
                    ids.add(int(tokenizer.convert_tokens_to_ids(end)))
                strings.append(end)
        return tuple(dict.fromkeys(strings)), frozenset(ids)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` through the tokenizer's chat template, with the generation prompt."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise SftlensError(
            f"tokenizer {name!r} has no chat template; drop --chat to use the plain "
            "Question/Answer prompt, or pass an instruct model whose tokenizer defines one"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError, ValueError, ...: the template's own fault
        raise SftlensError(
            f"tokenizer {name!r} could not apply its chat template ({e}); drop --chat to use "
            "the plain Question/Answer prompt"
        ) from e
    if not isinstance(text, str):
        raise SftlensError(
            f"tokenizer {name!r} chat template returned {type(text).__name__}, not text; "
            "drop --chat to use the plain Question/Answer prompt"
        )
    return text


def chat_end_text(tokenizer: Any) -> str:
    """The text the chat template puts right after an assistant turn (e.g. ``<|im_end|>``)."""
    marker = "Zq7xK"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:
        return ""
    if not isinstance(text, str) or marker not in text:
        return ""
    after = text.rsplit(marker, 1)[1].strip()
    return after.split()[0] if after else ""
