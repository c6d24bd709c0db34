"""Atomic writes: the permissions a plain ``open(path, "w")`` gives, nothing half-written."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftlens.io import atomic_write_bytes, atomic_write_json, read_json
from sftlens.run import RunFolder


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_file_gets_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    os.umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what any program would create
        f.write("x")
    atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~mask


def test_existing_file_keeps_its_mode_like_open_w(tmp_path, umask):
    os.umask(0o022)
    target = tmp_path / "kept.json"
    target.write_text("{}")
    target.chmod(0o640)
    atomic_write_json(target, {"a": 1})
    assert mode(target) == 0o640 and read_json(target) == {"a": 1}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_run_file_follows_the_umask(tmp_path, umask, mask):
    os.umask(mask)
    run = RunFolder(tmp_path / "run")
    run.step("s", {"x": 1}, lambda: [{"model": "pair", "layer": 0, "metric": "m", "value": 1.0}])
    run.write_summary({"k": 1})
    from sftlens.reporting.build import build_report

    build_report(run.path)
    for name in ("config.json", "metrics.csv", "summary.json", "report.html"):
        assert mode(run.path / name) == 0o666 & ~mask, name


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"old": True})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"new": True})
    assert read_json(target) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
