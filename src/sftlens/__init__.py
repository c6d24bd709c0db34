"""sftlens: where, layer by layer, did supervised fine-tuning change a model?

The public API lives in :mod:`sftlens.api`; names are imported lazily so that
``import sftlens`` stays cheap (transformers costs seconds to import).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "weights",
    "analyze",
    "sft",
    "demo",
    "dpo",
    "evaluate",
    "probe",
    "swap",
    "interpolate",
    "tune",
    "suggest",
    "sweep",
    "trajectory",
    "report",
    "load_model",
    "resolve_model",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        from sftlens import api

        return getattr(api, name)
    raise AttributeError(f"module 'sftlens' has no attribute {name!r}")


__all__ = sorted(_API | {"__version__"})
