"""Memory budgets: sizes in text, the memory a process may still use, and what a run will hold.

Pure helpers for ``analyze``'s memory estimate (:mod:`sftlens.analysis`): the estimate is made
before any weight is read, from the checkpoint headers, the config and the tokenised prompts.

>>> parse_size("24GiB"), parse_size("512M"), parse_size("1e9"), parse_size("")
(25769803776, 536870912, 1000000000, None)
>>> format_bytes(3 * 2**30 + 2**29)
'3.5 GiB'
>>> format_bytes(1536)
'1.5 KiB'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.errors import SftlensError

__all__ = ["Budget", "available_memory", "format_bytes", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """Bytes of a size like ``24GiB``, ``24G`` (binary), ``24GB`` (decimal) or ``1e9``; empty
    text gives None (no figure: measure the machine)."""
    if not text.strip():
        return None
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise SftlensError(
            f"memory size {text!r} is malformed; write a number with an optional unit, "
            "e.g. 24GiB, 512MiB, 24GB or 1e9 (bytes)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """A byte count for logs: ``B``, ``KiB``, ``MiB``, ``GiB`` or ``TiB`` with one decimal."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_dirs(root: Path = Path("/sys/fs/cgroup")) -> list[tuple[Path, str, str]]:
    """This process's memory cgroup and its ancestors, as ``(folder, limit file, usage file)``
    (v2 ``memory.max``; v1 ``memory.limit_in_bytes``), from ``/proc/self/cgroup``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, str, str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (unified)
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            out.append((folder, *files))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return out


def _cgroup_room() -> int | None:
    """Room left under the tightest memory limit of this process's cgroups, or None."""
    rooms = []
    for folder, limit_file, usage_file in _cgroup_dirs():
        limit = _read_int(folder / limit_file)
        if limit is not None and limit < 2**60:  # v1 writes "no limit" as ~2^63, v2 "max"
            rooms.append(max(0, limit - (_read_int(folder / usage_file) or 0)))
    return min(rooms, default=None)


def _rlimit_room() -> int | None:
    """Address space left under ``RLIMIT_AS`` (``prlimit --as``, ``ulimit -v``), or None."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        size = 0
    return max(0, soft - size)


def available_memory() -> int:
    """Bytes this process can still allocate: ``MemAvailable`` of ``/proc/meminfo``, lowered to
    the room left under a cgroup memory limit or an address-space limit (``RLIMIT_AS``) when
    one is set, shared among the ranks of this node (``LOCAL_WORLD_SIZE``, set by ``torchrun``)."""
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info["MemAvailable"]
    for room in (_cgroup_room(), _rlimit_room()):
        if room is not None:
            avail = min(avail, room)
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class Budget:
    """What a run will hold, by part, against the memory available.

    >>> b = Budget("in memory", {"models": 3 * 2**30, "activations": 2**30}, available=2**32)
    >>> b.total, b.fits
    (4294967296, True)
    >>> b.describe()
    'in memory: 4.0 GiB (models 3.0 GiB, activations 1.0 GiB) of 4.0 GiB available'
    """

    name: str
    parts: Mapping[str, int] = field(default_factory=dict)
    available: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def describe(self) -> str:
        inside = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)
        return (
            f"{self.name}: {format_bytes(self.total)} ({inside}) "
            f"of {format_bytes(self.available)} available"
        )


def nbytes(shapes: Iterable[tuple[int, ...]], element_size: int) -> int:
    """Bytes of tensors of these shapes at ``element_size`` bytes per element.

    >>> nbytes([(2, 3), (4,)], 4)
    40
    """
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total * element_size
