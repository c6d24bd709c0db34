"""Datasets: GSM8K jsonl files, the built-in problem generator, and prompt formats.

:func:`resolve_dataset` turns what a user types (a path, ``gsm8k``, ``synthetic`` or ``auto``)
into a list of :class:`Example`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import zlib
from pathlib import Path

from sftlens.data.gsm8k import Example, check_limit, example_from_record, load_jsonl
from sftlens.data.prompts import (
    few_shot_prefix,
    format_chat,
    format_prompt,
    format_question,
    format_target,
)
from sftlens.data.synthetic import generate_problems
from sftlens.errors import SftlensError

__all__ = [
    "GSM8K_DIR_ENV",
    "Example",
    "few_shot_prefix",
    "find_gsm8k_dir",
    "format_chat",
    "format_prompt",
    "format_question",
    "format_target",
    "generate_problems",
    "load_jsonl",
    "resolve_dataset",
]

logger = logging.getLogger("sftlens.data")

GSM8K_DIR_ENV = "SFTLENS_GSM8K_DIR"
SYNTHETIC_DEFAULT_SIZE = 256
_HUB_ID, _HUB_CONFIG = "openai/gsm8k", "main"
_KEYWORDS = ("auto", "gsm8k", "synthetic")


def find_gsm8k_dir(split: str = "train") -> Path | None:
    """The first local folder holding GSM8K's ``{split}.jsonl``, or None.

    Looks in ``$SFTLENS_GSM8K_DIR`` (an error if set but lacking the file), then
    ``./shared/data/gsm8k`` and ``../shared/data/gsm8k`` relative to the working directory.
    """
    env = os.environ.get(GSM8K_DIR_ENV)
    if env:
        folder = Path(env).expanduser()
        if not (folder / f"{split}.jsonl").is_file():
            raise SftlensError(
                f"${GSM8K_DIR_ENV}={env} has no {split}.jsonl; "
                "point it at the folder holding GSM8K's train.jsonl and test.jsonl, or unset it"
            )
        return folder
    for folder in (Path.cwd() / "shared/data/gsm8k", Path.cwd().parent / "shared/data/gsm8k"):
        if (folder / f"{split}.jsonl").is_file():
            return folder
    return None


def _hub_unavailable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used, or None if it can."""
    if importlib.util.find_spec("datasets") is None:
        return "the 'datasets' package is not installed"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var} is set"
    return None


def _load_hub(split: str, limit: int | None) -> list[Example]:
    """GSM8K from the Hugging Face hub; every failure becomes one :class:`SftlensError`."""
    try:
        import datasets

        rows = datasets.load_dataset(_HUB_ID, _HUB_CONFIG, split=split)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        where = f"{_HUB_ID}[{split}] row"
        return [example_from_record(dict(r), f"{where} {i}") for i, r in enumerate(rows)]
    except SftlensError:
        raise
    except Exception as e:
        raise SftlensError(
            f"could not load {_HUB_ID} ({_HUB_CONFIG}, split {split!r}) from the Hugging Face "
            f"hub ({type(e).__name__}: {e}); pass a local path to GSM8K jsonl files "
            f"or set ${GSM8K_DIR_ENV}"
        ) from e


def _load_gsm8k(split: str, limit: int | None) -> list[Example]:
    folder = find_gsm8k_dir(split)
    if folder is not None:
        return load_jsonl(folder / f"{split}.jsonl", limit)
    reason = _hub_unavailable_reason()
    if reason is not None:
        raise SftlensError(
            f"GSM8K {split}.jsonl not found in ${GSM8K_DIR_ENV}, ./shared/data/gsm8k or "
            f"../shared/data/gsm8k, and the hub cannot be used ({reason}); pass a path to a "
            f"GSM8K .jsonl file or folder, or set ${GSM8K_DIR_ENV}"
        )
    return _load_hub(split, limit)


def _synthetic(split: str, limit: int | None, seed: int) -> list[Example]:
    """Generated problems; splits other than train draw from a disjoint seed stream."""
    if split != "train":
        seed += (zlib.crc32(split.encode()) + 1) << 32
    return generate_problems(limit or SYNTHETIC_DEFAULT_SIZE, seed)


def _load_path(path: Path, split: str, limit: int | None) -> list[Example]:
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise SftlensError(
                f"folder {path} has no {split}.jsonl; add it or pass the .jsonl file itself"
            )
        return load_jsonl(file, limit)
    if path.is_file():
        return load_jsonl(path, limit)
    raise SftlensError(
        f"dataset {str(path)!r} is neither a file, a folder, nor one of {', '.join(_KEYWORDS)}; "
        f"pass a .jsonl path, a folder holding {split}.jsonl, or one of those names"
    )


def resolve_dataset(
    spec: str | os.PathLike[str], split: str = "train", limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load the examples ``spec`` names; ``limit`` keeps the first N in file order.

    ``spec`` is a ``.jsonl`` file (``split`` is then ignored), a folder holding
    ``{split}.jsonl``, ``"gsm8k"`` (local copy, see :func:`find_gsm8k_dir`, else the hub
    ``openai/gsm8k``), ``"synthetic"`` (:func:`generate_problems`, ``limit`` defaulting to 256,
    train and other splits from disjoint seed streams) or ``"auto"`` (GSM8K if it can be
    found, else synthetic). The names are matched case-insensitively; write ``./gsm8k`` for a
    folder of that name. An empty dataset is an error.
    """
    check_limit(limit)
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise SftlensError(f"split {split!r} is invalid; pass a name such as 'train' or 'test'")
    key = spec.strip().lower() if isinstance(spec, str) else None
    if key == "synthetic":
        examples = _synthetic(split, limit, seed)
    elif key == "gsm8k":
        examples = _load_gsm8k(split, limit)
    elif key == "auto":
        examples = _resolve_auto(split, limit, seed)
    else:
        examples = _load_path(Path(spec).expanduser(), split, limit)
    if not examples:
        raise SftlensError(f"dataset {str(spec)!r} ({split}) is empty; pass one with examples")
    return examples


def _resolve_auto(split: str, limit: int | None, seed: int) -> list[Example]:
    folder = find_gsm8k_dir(split)
    if folder is not None:
        logger.info("dataset 'auto': using GSM8K from %s (%s split)", folder, split)
        return load_jsonl(folder / f"{split}.jsonl", limit)
    reason = _hub_unavailable_reason()
    level = logging.INFO
    if reason is None:
        try:
            examples = _load_hub(split, limit)
            logger.info("dataset 'auto': using GSM8K from the hub %s (%s split)", _HUB_ID, split)
            return examples
        except SftlensError as e:
            reason, level = str(e), logging.WARNING
    logger.log(
        level,
        "dataset 'auto': GSM8K not found locally or on the hub (%s); using synthetic problems "
        "(%s split, seed %d)",
        reason,
        split,
        seed,
    )
    return _synthetic(split, limit, seed)
