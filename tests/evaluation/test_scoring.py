"""GSM8K answer extraction, number matching, Wilson intervals and accuracy strings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftlens.evaluation import (
    Accuracy,
    answers_match,
    extract_flexible,
    extract_strict,
    normalize_number,
    truncate_completion,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 9 * 2 = 18\n#### 18", "18"),
        ("#### 1,234", "1,234"),
        ("#### -5 apples", "-5"),
        ("#### 3.50", "3.50"),
        ("#### 3\nQuestion: ...\n#### 4", "3"),  # first match
        ("The answer is 18.", None),
        ("####18", None),  # the pattern needs the space
    ],
)
def test_extract_strict(text: str, expected: str | None) -> None:
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I had 3 apples and bought 5 more, so 8 in all", "8"),  # last number
        ("It costs $1,234.50.", "$1,234.50"),
        ("The answer is 18.", "18"),
        ("x = -7", "-7"),
        ("16-3=13", "13"),
        ("16-3", "3"),  # a minus between numbers is an operator
        ("pick 1, 2, 3, ", "3"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_flexible(text: str, expected: str | None) -> None:
    assert extract_flexible(text) == expected


def test_strict_first_versus_flexible_last() -> None:
    text = "He pays 2 * 9 = 18 dollars.\n#### 18\nQuestion: Ann has 5 pens."
    assert extract_strict(text) == "18"
    assert extract_flexible(text) == "5"


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("1,234", 1234.0),
        ("$18.00", 18.0),
        ("18.", 18.0),
        ("18..", 18.0),  # one trailing '.' is stripped; "18." is then a number
        (" 18 ", 18.0),
        ("-5", -5.0),
        ("-$5", -5.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("abc", None),
        ("", None),
        (".", None),
        ("$", None),
        ("nan", None),
        ("inf", None),
        ("1.2.3", None),
        (None, None),
    ],
)
def test_normalize_number(s: str | None, expected: float | None) -> None:
    assert normalize_number(s) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("$18.00", "18", True),
        ("18.", "18", True),
        ("1,000", "1000", True),
        ("-3", "-3", True),
        ("18", "19", False),
        ("-5", "5", False),
        ("18.01", "18", False),
        # equal as floats, different as numbers
        ("12345678901234567890", "12345678901234567891", False),
        (None, "18", False),
        ("18", None, False),
        (None, None, False),
        ("abc", "abc", False),
    ],
)
def test_answers_match(pred: str | None, gold: str | None, expected: bool) -> None:
    assert answers_match(pred, gold) is expected


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson bounds as the roots p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    phat = k / n
    roots = np.roots([1 + z * z / n, -(2 * phat + z * z / n), phat * phat])
    lo, hi = sorted(float(r.real) for r in roots)
    return lo, hi


@pytest.mark.parametrize(("k", "n"), [(1, 2), (37, 100), (5, 10), (3, 1319), (1300, 1319)])
def test_wilson_matches_independent_formula(k: int, n: int) -> None:
    assert wilson_interval(k, n) == pytest.approx(wilson_by_quadratic(k, n, 1.96), abs=1e-12)
    assert wilson_interval(k, n, z=2.5) == pytest.approx(wilson_by_quadratic(k, n, 2.5), abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (37, 100), (10, 10), (1, 1319)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    z = float(stats.norm.ppf(0.975))
    assert wilson_interval(k, n, z=z) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_edges() -> None:
    assert wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(37, 100)
    assert lo < 0.37 < hi
    assert wilson_interval(370, 1000)[1] - wilson_interval(370, 1000)[0] < hi - lo
    with pytest.raises(ValueError, match=r"^need 0 <= k <= n, got k=5, n=4$"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match=r"^need 0 <= k <= n, got k=-1, n=4$"):
        wilson_interval(-1, 4)


def test_wilson_bounds_are_exact_at_the_edges() -> None:
    # centre -/+ half rounds to a few ulps off 0 or 1 for many n (e.g. n = 11 and n = 6):
    # k = 0 and k = n must still give exactly 0 and 1
    for n in range(1, 100):
        assert wilson_interval(0, n)[0] == 0.0, n
        assert wilson_interval(n, n)[1] == 1.0, n
    # and an interval never leaves [0, 1], even where k < n rounds above 1
    n = 5000760961864921
    assert wilson_interval(n - 1, n)[1] == 1.0


def test_accuracy() -> None:
    acc = Accuracy(37, 100)
    assert str(acc) == "37/100 = 37.0% [28.2%, 46.8%]"
    assert acc.value == 0.37
    assert acc.interval == pytest.approx(wilson_by_quadratic(37, 100, 1.96), abs=1e-12)  # 95%
    assert Accuracy.from_flags([True, False, True]) == Accuracy(2, 3)
    assert str(Accuracy(0, 4)) == "0/4 = 0.0% [0.0%, 49.0%]"
    assert math.isnan(Accuracy(0, 0).value) and str(Accuracy(0, 0)) == "0/0 = n/a"
    with pytest.raises(ValueError, match=r"^need 0 <= correct <= total, got 5/4$"):
        Accuracy(5, 4)


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        (" 2+2=4\n#### 4\n\nQuestion: next", ("Question:",), " 2+2=4\n#### 4\n\n"),
        ("x </s> y Question: z", ("Question:", "</s>"), "x "),  # earliest stop wins
        ("no stop here", ("Question:",), "no stop here"),
        ("Question: at start", ("Question:",), ""),
        ("keep all", ("", "zzz"), "keep all"),  # an empty stop is ignored
        ("A Question: B Question: C", ("Question:",), "A "),  # a stop's first occurrence
    ],
)
def test_truncate_completion(text: str, stops: tuple[str, ...], expected: str) -> None:
    assert truncate_completion(text, stops) == expected


def test_truncate_default_stop() -> None:
    assert truncate_completion("A: 5\nQuestion: B") == "A: 5\n"
