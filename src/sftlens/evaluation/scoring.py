"""GSM8K answer extraction, matching and accuracy with a 95% interval.

Two scores, always both: *strict* reads the first ``#### N`` in a completion, *flexible* the
last number anywhere in it. Numbers are compared as values after stripping ``,``, ``$`` and a
trailing ``.``, so ``18``, ``18.0`` and ``$18.00`` agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

STRICT_PATTERN = re.compile(r"#### (-?[0-9.,]+)")
# A number: optional minus (not after a word or ')' where '-' is an operator), optional '$',
# digits with thousands commas inside, optional decimals. A trailing '.' or ',' is not taken.
NUMBER_PATTERN = re.compile(r"(?:(?<![\w)])-)?\$?[0-9](?:[0-9,]*[0-9])?(?:\.[0-9]+)?")
_PLAIN = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def extract_strict(text: str) -> str | None:
    """The number after the first ``#### `` in ``text``, as written, or None."""
    match = STRICT_PATTERN.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in ``text``, as written (``$`` and commas kept), or None."""
    matches = NUMBER_PATTERN.findall(text)
    return matches[-1] if matches else None


def _to_decimal(s: str | None) -> Decimal | None:
    """Exact value of ``s`` after stripping spaces, ``,``, ``$`` and a trailing ``.``."""
    if s is None:
        return None
    s = s.strip().replace(",", "").replace("$", "")
    if s.endswith("."):
        s = s[:-1]
    if not _PLAIN.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - _PLAIN admits only valid decimals
        return None


def normalize_number(s: str | None) -> float | None:
    """``s`` as a float after stripping ``,``, ``$`` and a trailing ``.``; None if not a number."""
    value = _to_decimal(s)
    return None if value is None else float(value)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when both are numbers of equal value (compared exactly); None never matches."""
    p, g = _to_decimal(pred), _to_decimal(gold)
    return p is not None and g is not None and p == g


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (95% for ``z=1.96``).

    ``n == 0`` carries no information and gives ``(0.0, 1.0)``.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Accuracy:
    """``correct`` out of ``total``, printed with its count and 95% Wilson interval."""

    correct: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 0 or not 0 <= self.correct <= self.total:
            raise ValueError(f"need 0 <= correct <= total, got {self.correct}/{self.total}")

    @classmethod
    def from_flags(cls, flags: Iterable[bool]) -> Accuracy:
        """Count the true values among per-example correctness flags."""
        values = [bool(f) for f in flags]
        return cls(sum(values), len(values))

    @property
    def value(self) -> float:
        """The fraction correct; NaN when ``total`` is 0."""
        return self.correct / self.total if self.total else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson score interval."""
        return wilson_interval(self.correct, self.total)

    def __str__(self) -> str:
        if not self.total:
            return "0/0 = n/a"
        lo, hi = self.interval
        return f"{self.correct}/{self.total} = {self.value:.1%} [{lo:.1%}, {hi:.1%}]"


def truncate_completion(text: str, stops: Sequence[str] = ("Question:",)) -> str:
    """``text`` up to the earliest occurrence of any non-empty stop string."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
