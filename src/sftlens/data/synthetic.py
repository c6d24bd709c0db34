"""A built-in generator of GSM8K-style arithmetic word problems.

Each problem takes 3-4 reasoning steps (shopping, sharing, rates, ages, savings, travel) and
comes with a worked solution in GSM8K's style: every step carries a calculator annotation
``<<a*b=c>>`` and the last line is ``#### N``. Answers and every intermediate value are
non-negative integers, divisions are exact, and the output is a pure function of the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sftlens.data.gsm8k import Example
from sftlens.errors import SftlensError

_SHE = ("Maya", "Priya", "Ana", "Elena", "Sofia")
_HE = ("Liam", "Tom", "Kofi", "Jamal", "Hiro")
_PEOPLE = tuple((n, "she") for n in _SHE) + tuple((n, "he") for n in _HE)
_ITEMS = ("notebooks", "pencils", "apples", "mugs", "candles", "socks", "plants", "books")
_THINGS = ("bike", "guitar", "tablet", "skateboard", "telescope", "camera")
_PLACES = ("juice factory", "dairy", "bottling plant", "soda factory")
_VEHICLES = ("car", "bus", "truck", "van")


def _calc(a: int, op: str, b: int, unit: str = "") -> tuple[str, int]:
    """Return ``("a op b = <<a op b=c>>c", c)``, the GSM8K way of showing one calculation."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise AssertionError(f"inexact division {a}/{b}")  # a bug in a template
        c = a // b
    else:
        raise AssertionError(f"unknown operator {op!r}")
    if c < 0:
        raise AssertionError(f"negative intermediate {a}{op}{b}={c}")
    return f"{a} {op} {b} = {unit}<<{a}{op}{b}={c}>>{c}", c


def _solution(lines: list[str], answer: int) -> str:
    return "\n".join([*lines, f"#### {answer}"])


def _shopping(rng: random.Random) -> Example:
    name, he = rng.choice(_PEOPLE)
    item1, item2 = rng.sample(_ITEMS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(1, 12), rng.randint(2, 9), rng.randint(1, 15)
    s1, c1 = _calc(a, "*", p, "$")
    s2, c2 = _calc(b, "*", q, "$")
    s3, total = _calc(c1, "+", c2, "$")
    bill = next(x for x in (20, 50, 100, 200, 500) if x > total)
    s4, change = _calc(bill, "-", total, "$")
    question = (
        f"{name} buys {a} {item1} for ${p} each and {b} {item2} for ${q} each. "
        f"{he.capitalize()} pays with a ${bill} bill. How much change, in dollars, does {he} get?"
    )
    his = "her" if he == "she" else "his"
    lines = [
        f"The {item1} cost {s1}.",
        f"The {item2} cost {s2}.",
        f"Altogether {he} spends {s3}.",
        f"So {his} change is {s4}.",
    ]
    return Example(question, _solution(lines, change))


def _sharing(rng: random.Random) -> Example:
    name, he = rng.choice(_PEOPLE)
    a, n, k = rng.randint(2, 6), rng.randint(6, 24), rng.randint(2, 8)
    s1, cookies = _calc(a, "*", n)
    eaten = cookies % k + k * rng.randint(0, 2)
    while eaten >= cookies:
        eaten -= k
    eaten = eaten or k  # eat at least one; k < 12 <= cookies
    s2, left = _calc(cookies, "-", eaten)
    s3, each = _calc(left, "/", k)
    question = (
        f"{name} bakes {a} batches of cookies with {n} cookies in each batch. {he.capitalize()} "
        f"eats {eaten} of them and shares the rest equally among {k} friends. "
        "How many cookies does each friend get?"
    )
    lines = [
        f"{name} bakes {s1} cookies.",
        f"After eating {eaten}, {he} has {s2} cookies left.",
        f"Each friend gets {s3} cookies.",
    ]
    return Example(question, _solution(lines, each))


def _rates(rng: random.Random) -> Example:
    place = rng.choice(_PLACES)
    r, h, brk, d = rng.randint(3, 15), rng.randint(2, 8), 5 * rng.randint(2, 10), rng.randint(2, 7)
    s1, minutes = _calc(h, "*", 60)
    s2, worked = _calc(minutes, "-", brk)
    s3, per_day = _calc(worked, "*", r)
    s4, total = _calc(per_day, "*", d)
    question = (
        f"A machine at a {place} fills {r} bottles every minute. It runs for {h} hours each "
        f"day, minus a {brk}-minute break. How many bottles does it fill in {d} days?"
    )
    lines = [
        f"The machine is on for {s1} minutes a day.",
        f"Taking out the break, it works {s2} minutes a day.",
        f"Each day it fills {s3} bottles.",
        f"In {d} days it fills {s4} bottles.",
    ]
    return Example(question, _solution(lines, total))


def _ages(rng: random.Random) -> Example:
    (a_name, _), (b_name, _), (c_name, _) = rng.sample(_PEOPLE, 3)
    c, m, x, y = rng.randint(2, 12), rng.randint(2, 4), rng.randint(2, 15), rng.randint(2, 10)
    s1, b = _calc(c, "*", m)
    s2, a = _calc(b, "+", x)
    s3, future = _calc(a, "+", y)
    question = (
        f"{a_name} is {x} years older than {b_name}. {b_name} is {m} times as old as {c_name}, "
        f"who is {c} years old. How old will {a_name} be in {y} years?"
    )
    lines = [
        f"{b_name} is {s1} years old.",
        f"{a_name} is {s2} years old.",
        f"In {y} years {a_name} will be {s3} years old.",
    ]
    return Example(question, _solution(lines, future))


def _savings(rng: random.Random) -> Example:
    name, he = rng.choice(_PEOPLE)
    thing = rng.choice(_THINGS)
    saved, weeks = rng.randint(5, 40), rng.randint(2, 12)
    have, spend = 5 * rng.randint(2, 20), rng.randint(5, 30)
    cost, wage = saved * weeks + have, spend + saved
    s1, need = _calc(cost, "-", have, "$")
    s2, per_week = _calc(wage, "-", spend, "$")
    s3, n_weeks = _calc(need, "/", per_week)
    question = (
        f"{name} wants a {thing} that costs ${cost} and already has ${have}. {he.capitalize()} "
        f"earns ${wage} a week and spends ${spend} of it. "
        f"How many weeks must {he} save to buy the {thing}?"
    )
    lines = [
        f"{name} still needs {s1}.",
        f"Each week {he} saves {s2}.",
        f"So {he} needs {s3} weeks.",
    ]
    return Example(question, _solution(lines, n_weeks))


def _travel(rng: random.Random) -> Example:
    vehicle = rng.choice(_VEHICLES)
    speed, t, t2 = rng.randint(20, 70), rng.randint(2, 5), rng.randint(1, 6)
    dist = speed * t
    s1, v = _calc(dist, "/", t)
    s2, more = _calc(v, "*", t2)
    s3, total = _calc(dist, "+", more)
    question = (
        f"A {vehicle} travels {dist} miles in {t} hours. At the same speed it drives {t2} more "
        "hours. How many miles does it travel in total?"
    )
    lines = [
        f"Its speed is {s1} miles per hour.",
        f"In {t2} more hours it goes {s2} miles.",
        f"In total it travels {s3} miles.",
    ]
    return Example(question, _solution(lines, total))


TEMPLATES: tuple[Callable[[random.Random], Example], ...] = (
    _shopping,
    _sharing,
    _rates,
    _ages,
    _savings,
    _travel,
)
"""The problem templates; each draws its numbers from the ``random.Random`` it is given."""


def generate_problems(n: int, seed: int = 0) -> list[Example]:
    """Return ``n`` synthetic GSM8K-style problems, the same ones for the same ``seed``.

    The first ``k`` problems do not depend on ``n``, so a larger ``n`` extends a smaller one.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SftlensError(f"n={n!r} problems is invalid; pass a non-negative integer")
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES)(rng) for _ in range(n)]
