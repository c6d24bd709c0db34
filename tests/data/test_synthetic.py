"""The built-in problem generator: correct, GSM8K-shaped, and deterministic by seed."""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from sftlens.data import Example, generate_problems, load_jsonl, resolve_dataset
from sftlens.data.synthetic import TEMPLATES
from sftlens.errors import SftlensError
from sftlens.evaluation import extract_strict

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>([0-9]+)")
OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression of integers, and the integer operands it uses."""
    operands: list[int] = []

    def walk(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            operands.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr, mode="eval").body), operands


def check_problem(e: Example) -> None:
    """Every calculator step recomputes, uses only known numbers, and ends at ``#### N``."""
    *steps, last = e.answer.split("\n")
    assert re.fullmatch(r"#### [0-9]+", last), last
    assert 2 <= len(steps) <= 4
    known = {int(n) for n in re.findall(r"[0-9]+", e.question)} | {60}
    result = None
    for line in steps:
        (expr, stated, shown), *more = ANNOTATION.findall(line)
        assert not more, line
        value, operands = evaluate(expr)
        assert value == int(stated) == int(shown), line
        assert set(operands) <= known, f"{line!r} uses a number from nowhere"
        known.add(int(stated))
        result = int(stated)
    assert result is not None and result >= 0
    assert int(e.final_answer) == result
    assert extract_strict(e.answer) == e.final_answer


def test_answers_recompute_over_200_problems() -> None:
    problems = generate_problems(200, seed=0)
    assert len(problems) == 200
    for e in problems:
        check_problem(e)
    assert len({e.question for e in problems}) >= 190


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.__name__.strip("_"))
def test_every_template_is_correct(template: Callable[[random.Random], Example]) -> None:
    rng = random.Random(123)
    for _ in range(40):
        check_problem(template(rng))


def test_deterministic_by_seed() -> None:
    a = generate_problems(30, seed=7)
    assert a == generate_problems(30, seed=7)
    assert a[:10] == generate_problems(10, seed=7)
    assert a != generate_problems(30, seed=8)
    assert generate_problems(0) == []
    with pytest.raises(SftlensError, match="non-negative"):
        generate_problems(-1)


def test_resolve_synthetic_splits_and_limit() -> None:
    train = resolve_dataset("synthetic")
    assert train == generate_problems(256, seed=0)
    assert resolve_dataset("synthetic", limit=12, seed=5) == generate_problems(12, seed=5)
    test = resolve_dataset("Synthetic", split="test", limit=50)
    assert len(test) == 50 and not {e.question for e in test} & {e.question for e in train}
    assert test == resolve_dataset("synthetic", split="test", limit=50)


def test_problems_pass_the_jsonl_validator(tmp_path: Path) -> None:
    problems = generate_problems(20, seed=1)
    f = tmp_path / "synthetic.jsonl"
    f.write_text("".join(json.dumps(vars(e)) + "\n" for e in problems), encoding="utf-8")
    assert load_jsonl(f) == problems
