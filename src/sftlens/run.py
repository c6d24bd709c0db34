"""A run folder: ``config.json``, ``metrics.csv``, ``summary.json``, ``plots/``, ``report.html``.

Each step of a run records the hash of the inputs it depends on in ``config.json``; a rerun
with the same inputs skips finished steps and keeps their rows (resume), a changed input
recomputes that step. All files are written atomically.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from importlib import metadata
from pathlib import Path
from typing import Any

from sftlens.errors import SftlensError
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


# What decides a checkpoint's numbers: weights (safetensors, or trusted pickle), shard indexes,
# the model config, and the tokenizer (it decides which tokens an analysis feeds the model).
FINGERPRINT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def fingerprint(folder: str | Path) -> dict[str, Any]:
    """sha256 of a checkpoint's weight, config and tokenizer files (identifies exactly what was
    compared; a step that depends on it reruns when any of these bytes change)."""
    folder = Path(folder)
    files = sorted({f for pattern in FINGERPRINT_PATTERNS for f in folder.glob(pattern)})
    return {
        "path": str(folder.resolve()),
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
    }


_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered for this process while its inode, size and times are unchanged."""
    st = path.stat()  # a rewrite changes the ctime even where the mtime is coarse or reset
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def make_out_folder(out: str | Path) -> Path:
    """Create the ``--out`` folder (and its parents); a path that cannot be one is a one-line
    :class:`SftlensError` instead of a traceback."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SftlensError(
            f"--out {path} is a file, not a folder; pass a folder for the results "
            "(a new one is created)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SftlensError(
            f"cannot create the --out folder {path}: part of its path is a file; "
            "pass a path under a folder"
        ) from None
    except PermissionError:
        raise SftlensError(
            f"cannot create the --out folder {path}: permission denied; "
            "pass a folder you can write to"
        ) from None
    return path


class RunFolder:
    def __init__(self, out: str | Path) -> None:
        self.path = make_out_folder(out)
        (self.path / "plots").mkdir(exist_ok=True)
        self.config_path = self.path / "config.json"
        self.state: dict[str, Any] = {"steps": {}}
        if self.config_path.is_file():
            try:
                self.state = read_json(self.config_path)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SftlensError(
                    f"{self.config_path} is not valid JSON (edited by hand?); fix it, or delete "
                    "it to recompute every step of this run"
                ) from None
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
        # rows this step wrote from other inputs are stale, even those the new inputs do not
        # produce (e.g. attention metrics after a rerun with --no-attention, or a lost layer)
        self.add_metrics(rows, drop=set(done.get("metrics", [])) if done else set())
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

    def add_metrics(self, rows: Iterable[Row], drop: Set[str] = frozenset()) -> None:
        """Merge ``rows`` into ``metrics.csv``, first removing old rows of the metrics in ``drop``."""
        old = [r for r in self.metrics() if r["metric"] not in drop]
        write_metrics_csv(self.path / "metrics.csv", _sorted(merge_metric_rows(old, rows)))

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


class ItemLog:
    """Finished items of one experiment or sweep, keyed by the hash of their inputs (an atomic JSON).

    Items recorded under another key (other data, models, dtype...) are discarded.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        data = read_json(path) if path.is_file() else {}
        self.items: dict[str, dict[str, Any]] = (
            dict(data.get("items", {})) if data.get("key") == key else {}
        )

    def __contains__(self, item: str) -> bool:
        return item in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __getitem__(self, item: str) -> dict[str, Any]:
        return self.items[item]

    def put(self, item: str, result: dict[str, Any]) -> None:
        self.items[item] = result
        atomic_write_json(self.path, {"key": self.key, "items": self.items})
