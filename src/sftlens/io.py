"""Atomic file writes and run folders.

Every result file is written to a temporary name in the same folder and then renamed,
so a crash never leaves a half-written result and readers see old or new, never a mix.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

METRICS_COLUMNS = ("model", "layer", "metric", "value")
#: ``experts.csv``: per-expert rows of mixture-of-experts models (weights and routing).
EXPERTS_COLUMNS = ("model", "layer", "expert", "metric", "value")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets the permissions a plain ``open(path, "w")`` gives: a new file ``0o666`` less
    the user's umask (the kernel applies it, as for any new file; ``mkstemp``'s private ``0o600``
    would hide run folders from a group), an existing file keeps its mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, unique, writable file next to ``path``, created with mode ``0o666 & ~umask``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # vanishingly rare: another writer drew the same name
            continue


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def format_value(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def write_metrics_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the documented ``metrics.csv`` (columns ``model, layer, metric, value``).

    ``layer`` is the block index (``-1`` for the embeddings) or ``None`` for a
    whole-model row, written as an empty cell.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for r in rows:
        layer = r.get("layer")
        w.writerow(
            [r["model"], "" if layer is None else int(layer), r["metric"], format_value(r["value"])]
        )
    return atomic_write_text(path, buf.getvalue())


def write_rows_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: tuple[str, ...]
) -> Path:
    """Write dict rows as a CSV with the given columns (None -> empty cell), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(
            [
                ""
                if r.get(c) is None
                else (format_value(r[c]) if isinstance(r[c], float) else r[c])
                for c in columns
            ]
        )
    return atomic_write_text(path, buf.getvalue())


def update_rows_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    columns: tuple[str, ...],
    replace: Iterable[str],
) -> Path:
    """Write ``rows`` into the CSV at ``path`` atomically, keeping the rows already there whose
    metric is not in ``replace`` (two commands that share a file, e.g. ``experts.csv`` of
    ``weights`` and ``analyze`` in one run folder, keep each other's rows)."""
    drop = set(replace)
    old: list[dict[str, Any]] = []
    if Path(path).is_file():
        with open(path, encoding="utf-8", newline="") as f:
            old = [r for r in csv.DictReader(f) if r.get("metric") not in drop]
    return write_rows_csv(path, [*old, *rows], columns)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``metrics.csv`` back into dicts (layer as int or None, value as float)."""
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            out.append(
                {
                    "model": r["model"],
                    "layer": int(r["layer"]) if r["layer"] != "" else None,
                    "metric": r["metric"],
                    "value": float(r["value"]) if r["value"] != "" else float("nan"),
                }
            )
    return out


def merge_metric_rows(
    old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Rows of ``new`` replace rows of ``old`` with the same (model, layer, metric)."""
    merged: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for r in list(old) + list(new):
        merged[(r["model"], r.get("layer"), r["metric"])] = dict(r)
    return list(merged.values())


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config, used to decide whether a step can be resumed."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
