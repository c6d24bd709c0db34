"""GSM8K evaluation: answer extraction, matching and accuracy with its interval."""

from __future__ import annotations

from sftlens.evaluation.scoring import (
    Accuracy,
    answers_match,
    extract_flexible,
    extract_strict,
    normalize_number,
    truncate_completion,
    wilson_interval,
)

__all__ = [
    "Accuracy",
    "answers_match",
    "extract_flexible",
    "extract_strict",
    "normalize_number",
    "truncate_completion",
    "wilson_interval",
]
