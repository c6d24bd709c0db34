"""A run folder: ``config.json``, ``metrics.csv``, ``summary.json``, ``plots/``, ``report.html``.

Each step of a run records the hash of the inputs it depends on in ``config.json``; a rerun
with the same inputs skips finished steps and keeps their rows (resume), a changed input
recomputes that step. All files are written atomically.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from sftlens.io import (
    atomic_write_json,
    config_hash,
    merge_metric_rows,
    read_json,
    read_metrics_csv,
    sha256_file,
    write_metrics_csv,
)

Row = dict[str, Any]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("sftlens", "torch", "transformers", "peft", "safetensors", "accelerate", "gguf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def fingerprint(folder: str | Path) -> dict[str, Any]:
    """sha256 of a checkpoint's config and weight files (identifies exactly what was compared)."""
    folder = Path(folder)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")])
    return {
        "path": str(folder.resolve()),
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
    }


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered for this process while its size and mtime are unchanged."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


class RunFolder:
    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)
        self.config_path = self.path / "config.json"
        self.state: dict[str, Any] = (
            read_json(self.config_path) if self.config_path.is_file() else {"steps": {}}
        )
        self.state.setdefault("steps", {})
        self.state["versions"] = versions()

    # -- resume -------------------------------------------------------------------------------
    def step(
        self,
        name: str,
        inputs: Mapping[str, Any],
        compute: Callable[[], list[Row]],
        write: bool = True,
    ) -> list[Row]:
        """Run ``compute`` unless step ``name`` already finished with the same ``inputs``.

        ``write=False`` (non-zero ranks of a distributed run) computes without writing.
        """
        key = config_hash(inputs)
        done = self.state["steps"].get(name)
        if done and done.get("hash") == key and (self.path / "metrics.csv").is_file():
            rows = [r for r in self.metrics() if r["metric"] in set(done.get("metrics", []))]
            if rows:
                return rows
        t0 = time.perf_counter()
        rows = compute()
        if not write:
            return rows
        self.add_metrics(rows)
        self.state["steps"][name] = {
            "hash": key,
            "inputs": dict(inputs),
            "metrics": sorted({r["metric"] for r in rows}),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.save_config()
        return rows

    # -- files --------------------------------------------------------------------------------
    def save_config(self, **extra: Any) -> None:
        self.state.update(extra)
        atomic_write_json(self.config_path, self.state)

    def metrics(self) -> list[Row]:
        path = self.path / "metrics.csv"
        return read_metrics_csv(path) if path.is_file() else []

    def add_metrics(self, rows: Iterable[Row]) -> None:
        write_metrics_csv(
            self.path / "metrics.csv", _sorted(merge_metric_rows(self.metrics(), rows))
        )

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        old = (
            read_json(self.path / "summary.json") if (self.path / "summary.json").is_file() else {}
        )
        atomic_write_json(self.path / "summary.json", {**old, **summary})

    def summary(self) -> dict[str, Any]:
        p = self.path / "summary.json"
        return read_json(p) if p.is_file() else {}


def _sorted(rows: list[Row]) -> list[Row]:
    order = {"base": 0, "sft": 1, "pair": 2}

    def key(r: Row) -> tuple[Any, ...]:
        layer = r.get("layer")
        return (
            r["metric"],
            order.get(r["model"], 3),
            layer is None,
            layer if layer is not None else 0,
        )

    return sorted(rows, key=key)
