"""The ``gsm8k_dir`` fixture: skips say where the data goes; under CI a missing copy fails."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

NEEDS_DATA = """
def test_needs_data(gsm8k_dir):
    assert (gsm8k_dir / "test.jsonl").is_file()
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throwaway suite with this repository's conftest and one test that needs GSM8K."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # seconds saved per inner run
    pytester.makepyfile(NEEDS_DATA)
    return pytester


@pytest.mark.parametrize(("ci", "outcome"), [("false", "skipped"), ("true", "errors")])
def test_missing_data_skips_locally_and_fails_under_ci(suite, monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setenv("SFTLENS_GSM8K_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CI", ci)
    result = suite.runpytest_inprocess("-rs")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*../shared/data/gsm8k/{train,test}.jsonl*$SFTLENS_GSM8K_DIR*"])


def test_data_found_through_the_environment(suite, monkeypatch, tmp_path):
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("{}\n")
    monkeypatch.setenv("SFTLENS_GSM8K_DIR", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    suite.runpytest_inprocess().assert_outcomes(passed=1)
