"""Fixtures for the evaluation tests: one torch thread, the tiny tokenizer, a model folder + data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eval_helpers import problem, tiny_lm, write_jsonl
from tiny_models import save_model, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core box: one torch thread is much faster (and repeatable).

    Module scope, so module-scoped runs share the setting with the tests that compare to them.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def eval_setup(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, data folder with train.jsonl (3 problems) and test.jsonl (7 problems))."""
    root = tmp_path_factory.mktemp("eval")
    model = save_model(tiny_lm("llama"), root / "model")
    data = root / "data"
    write_jsonl(data / "train.jsonl", [problem(a, 2) for a in range(3)])
    tests = [problem(a, (3 * a) % 5) for a in range(7)]
    tests[2] = problem(2, 2, " <b>bold</b> & more")  # the report must escape it
    write_jsonl(data / "test.jsonl", tests)
    return model, data
