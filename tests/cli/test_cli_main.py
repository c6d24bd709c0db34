"""``sftlens.cli.main`` itself: what every command shares (library bars, a closed pipe)."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import transformers.utils.logging as hf_logging

from sftlens import cli


def _fake_command(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    name = "weights"
    cls, _, help_text = cli.COMMANDS[name]
    monkeypatch.setitem(cli.COMMANDS, name, (cls, run, help_text))


@pytest.mark.parametrize("flag, bars_inside", [("--no-progress", False), ("--progress", True)])
def test_no_progress_silences_library_bars_and_restores_them(
    monkeypatch: pytest.MonkeyPatch, flag: str, bars_inside: bool
) -> None:
    seen: dict[str, Any] = {}

    def run(ns: Any) -> None:
        seen["bars"] = hf_logging.is_progress_bar_enabled()
        seen["env"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    _fake_command(monkeypatch, run)
    assert cli.main(["weights", "a", "b", flag]) == 0
    assert seen["bars"] is bars_inside
    assert seen["env"] == (None if bars_inside else "1")  # for a transformers imported later
    assert hf_logging.is_progress_bar_enabled()  # an in-process caller gets its bars back
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ


def test_no_progress_keeps_bars_off_that_were_off(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_command(monkeypatch, lambda ns: None)
    hf_logging.disable_progress_bar()
    try:
        assert cli.main(["weights", "a", "b", "--no-progress"]) == 0
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        return 99


def test_closed_stdout_pipe_is_a_quiet_exit(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """``sftlens ... | head``: the reader went away; no traceback, stdout pointed at devnull."""
    _fake_command(monkeypatch, lambda ns: "runs/somewhere")
    dup2: list[int] = []
    monkeypatch.setattr(cli.os, "dup2", lambda fd, target: dup2.append(target))
    monkeypatch.setattr(cli.sys, "stdout", _ClosedPipe())
    assert cli.main(["weights", "a", "b", "--no-progress"]) == 1
    assert dup2 == [99]
