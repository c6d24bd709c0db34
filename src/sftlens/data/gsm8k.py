"""GSM8K examples and a validating jsonl loader.

Each line of a GSM8K jsonl file is an object with a ``question`` and an ``answer``; the answer
is the worked solution whose last line is ``#### N``. Every problem found is reported as ONE
:class:`~sftlens.errors.SftlensError` line naming the file, the 1-based line and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sftlens.errors import SftlensError

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Example:
    """One word problem: the question and its full solution text ending with ``#### N``."""

    question: str
    answer: str

    @property
    def final_answer(self) -> str:
        """The text after the last ``####``, stripped (e.g. ``"18"``)."""
        return self.answer.rpartition(ANSWER_MARK)[2].strip()


def check_limit(limit: int | None) -> None:
    """Raise :class:`SftlensError` unless ``limit`` is None or a positive integer."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SftlensError(f"limit={limit!r} is invalid; pass a positive integer or None for all")


def example_from_record(obj: object, where: str) -> Example:
    """Validate one decoded record (``where`` names it in errors) and build an :class:`Example`."""
    if not isinstance(obj, dict):
        raise SftlensError(
            f"{where}: expected a JSON object, got {type(obj).__name__}; "
            'each line must be one object like {"question": "...", "answer": "... #### 18"}'
        )
    for key in ("question", "answer"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            problem = "is missing" if key not in obj else "is not a non-empty string"
            raise SftlensError(
                f"{where}: key {key!r} {problem}; every record needs non-empty string "
                "'question' and 'answer' fields"
            )
    if ANSWER_MARK not in obj["answer"]:
        raise SftlensError(
            f"{where}: 'answer' has no '{ANSWER_MARK}' final-answer marker; "
            f"end each answer with a line like '{ANSWER_MARK} 18'"
        )
    return Example(question=obj["question"], answer=obj["answer"])


def _parse_line(line: str, where: str) -> Example:
    """Turn one jsonl line into an :class:`Example`; ``where`` is ``file:line`` for errors."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SftlensError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
            'each line must be one object like {"question": "...", "answer": "... #### 18"}'
        ) from None
    return example_from_record(obj, where)


def load_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[Example]:
    """Load GSM8K-style examples from a jsonl file, validating each line read.

    Blank lines are skipped. With ``limit`` the first ``limit`` examples in file order are
    returned and reading stops there. A file with no examples is an error.
    """
    check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise SftlensError(f"dataset file {path} does not exist; pass the path of a .jsonl file")
    examples: list[Example] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                examples.append(_parse_line(line, f"{path}:{lineno}"))
                if limit is not None and len(examples) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise SftlensError(
            f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8 jsonl"
        ) from None
    if not examples:
        raise SftlensError(
            f"{path} holds no examples; add one JSON object per line with 'question' and 'answer'"
        )
    return examples
