"""Every runnable docstring example in the package runs (they are documentation that must not lie)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sftlens

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(sftlens.__path__, "sftlens.")
    if m.name != "sftlens.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
