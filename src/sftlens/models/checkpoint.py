"""Stream tensors out of a checkpoint folder, one at a time.

Reads sharded safetensors (``model.safetensors.index.json``) or single files through
``safetensors.safe_open`` (memory-mapped), so looking at one tensor never loads the model.
GGUF files are first resolved to their cached safetensors conversion
(:func:`sftlens.models.loading.resolve_model`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sftlens.errors import SftlensError

log = logging.getLogger("sftlens.checkpoint")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it promises.

    Returns ``{tensor name: {"dtype", "shape", "data_offsets"}}`` with offsets made absolute
    (from the start of the file). A truncated or corrupt shard raises a one-line
    :class:`SftlensError` naming the file.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("header length beyond end of file")
            header: dict[str, Any] = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SftlensError(
            f"{path} is not a valid safetensors file ({str(exc)[:80]}); "
            "re-copy or re-download this shard"
        ) from None
    header.pop("__metadata__", None)
    need = 8 + header_len + max((v["data_offsets"][1] for v in header.values()), default=0)
    if size < need:
        raise SftlensError(
            f"{path} is truncated ({size} bytes, its header promises {need}); "
            "re-copy or re-download this shard"
        )
    for meta in header.values():
        begin, stop = meta["data_offsets"]
        meta["data_offsets"] = [8 + header_len + begin, 8 + header_len + stop]
    return header


class CheckpointReader:
    """Index of ``tensor name -> shard file`` with lazy, one-tensor-at-a-time reads.

    >>> reader = CheckpointReader("path/to/model")            # doctest: +SKIP
    >>> reader.get("model.layers.0.self_attn.q_proj.weight")   # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise SftlensError(
                f"{self.folder} has no config.json; pass a Hugging Face model folder"
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise SftlensError(
                f"{config_path} is not valid JSON ({exc}); re-copy the file"
            ) from None
        self._headers: dict[Path, dict[str, Any]] = {}
        self.shard_of = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise SftlensError(
                    f"{index} is not a valid safetensors index ({exc}); re-copy the file"
                ) from None
            shards = {name: self.folder / file for name, file in weight_map.items()}
            missing = sorted({p.name for p in shards.values() if not p.is_file()})
            if missing:
                raise SftlensError(
                    f"{self.folder} is missing shard(s) {', '.join(missing)} named in "
                    f"{index.name}; copy or download the missing files"
                )
            for shard in sorted(set(shards.values())):
                self._headers[shard] = read_header(shard)  # fail now, not halfway through
            return shards
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise SftlensError(
                f"{self.folder} has no *.safetensors files; convert the checkpoint to safetensors "
                "(pickle *.bin files are not read)"
            )
        for f in files:
            self._headers[f] = read_header(f)
        return {name: f for f in files for name in self._headers[f]}

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta(name)["shape"])

    def _meta(self, name: str) -> dict[str, Any]:
        if name not in self.shard_of:
            raise SftlensError(f"tensor '{name}' is not in {self.folder}")
        return self._headers[self.shard_of[name]][name]

    def get(self, name: str) -> torch.Tensor:
        """Read one whole tensor (see :meth:`get_rows`)."""
        shape = self.shape(name)
        return self.get_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of a tensor, with a plain file read.

        Deliberately not memory-mapped: pages of a mapped file stay in the process's resident
        memory once touched, so streaming two mapped checkpoints ends up as resident as loading
        both. A plain read of a row range keeps only that range in memory.
        """
        meta = self._meta(name)
        path = self.shard_of[name]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise SftlensError(
                f"tensor '{name}' in {path.name} has dtype {meta['dtype']}, which sftlens does "
                f"not read; supported: {', '.join(_DTYPES)}"
            )
        shape = list(meta["shape"]) or [1]
        row_bytes = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        begin = meta["data_offsets"][0] + start * row_bytes
        buf = bytearray((stop - start) * row_bytes)
        with path.open("rb") as f:
            f.seek(begin)
            if f.readinto(buf) != len(buf):
                raise SftlensError(f"{path} is truncated; re-copy or re-download this shard")
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return flat.reshape([stop - start, *shape[1:]])

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shard_of:
            yield name, self.get(name)

    def close(self) -> None:
        """Nothing stays open between reads; kept for the context-manager protocol."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-STEP`` subfolders of ``folder`` as ``(step, path)``, by step.

    Ordered by the number, not the name (``checkpoint-100`` after ``checkpoint-20``); a save
    that was killed (no ``trainer_state.json`` yet, or a ``.tmp`` folder) is left out. Reads
    the folders of ``sftlens sft`` and of transformers' Trainer alike.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("checkpoint-100", "checkpoint-20", "checkpoint-5.tmp", "checkpoint-7"):
    ...     (d / name).mkdir()
    >>> for name in ("checkpoint-100", "checkpoint-20"):
    ...     _ = (d / name / "trainer_state.json").write_text("{}")
    >>> [step for step, _ in list_checkpoints(d)]
    [20, 100]
    """
    found = []
    for path in Path(folder).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and (path / "trainer_state.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_stale_checkpoints(folder: str | Path) -> None:
    """Remove the ``checkpoint-STEP`` folders (and killed ``.tmp`` saves) an earlier run left in
    ``folder``: a new run's snapshots must not join another run's trajectory."""
    import shutil

    folder = Path(folder)
    stale = [p for _, p in list_checkpoints(folder)] + list(folder.glob("checkpoint-*.tmp"))
    if stale:
        log.warning("removing %d checkpoint folder(s) of an earlier run in %s", len(stale), folder)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
