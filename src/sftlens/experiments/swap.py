"""Placeholder: ``run_swap`` is being built (see the issue). Keep the two public names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftlens.config import SwapConfig
from sftlens.errors import SftlensError


def run_swap(cfg: SwapConfig) -> Path:
    raise SftlensError("this command is not built yet")


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of this experiment's report section, or None when the run has no such files."""
    return None
