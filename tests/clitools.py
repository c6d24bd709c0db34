"""Helpers for tests that drive the CLI."""

from __future__ import annotations


def error_line(stderr: str) -> str:
    """The CLI's one ``error: ...`` line, checked to be the last line of ``stderr`` and the only
    error (progress bars of the libraries may come before it; a traceback may not)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: "), stderr[-2000:]
    assert sum(line.startswith("error") for line in lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]
