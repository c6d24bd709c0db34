"""Which layers: depth blocks, masks and spans (pure, no torch).

SPEC "Names": with ``K`` depth blocks of ``L`` layers, block ``k`` holds layers
``floor(k*L/K) .. floor((k+1)*L/K) - 1``. A mask is ``K`` characters ``0``/``1``, the leftmost
the BOTTOM block (next to the embeddings). A span ``i:j`` is the half-open layer range
``[i, j)``, as the swap and interpolation experiments take it.

>>> [s.name for s in depth_blocks(30, 5)]
['0:6', '6:12', '12:18', '18:24', '24:30']
>>> depth_blocks(30, 5)[0].mask
'10000'
>>> [s.name for s in parse_spans("0:6, 24:30", 30)]
['0:6', '24:30']
>>> mask_layers("01110", 10)
[2, 3, 4, 5, 6, 7]
>>> parse_layer_selection("01100", 30).describe()
'01100 -> layers 6-17 of 30'
>>> parse_layer_selection("0.2-0.5", 10).layers
(2, 3, 4)
>>> parse_layer_selection("3,4,9:11", 12).describe()
'3,4,9:11 -> layers 3-4, 9-10 of 12'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from sftlens.errors import SftlensError

__all__ = [
    "SELECTION_FORMS",
    "Selection",
    "Span",
    "block_bounds",
    "depth_blocks",
    "mask_layers",
    "layer_ranges",
    "parse_alphas",
    "parse_layer_selection",
    "parse_spans",
]


@dataclass(frozen=True)
class Span:
    """The layers ``[start, stop)``; ``mask`` is the depth-block mask when it is one block."""

    start: int
    stop: int
    mask: str = ""

    @property
    def name(self) -> str:
        """``"start:stop"``, the form :func:`parse_spans` reads."""
        return f"{self.start}:{self.stop}"

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def first(self) -> int:
        return self.start

    @property
    def last(self) -> int:
        return self.stop - 1

    def depth(self, num_layers: int) -> tuple[float, float]:
        """The slice of relative depth it covers: ``(start / L, stop / L)``."""
        return self.start / num_layers, self.stop / num_layers


def _check_counts(num_layers: int, k: int) -> None:
    if num_layers < 1:
        raise SftlensError(f"a model needs at least 1 layer, got L={num_layers}")
    if not 1 <= k <= num_layers:
        raise SftlensError(
            f"K={k} depth blocks do not fit a model of {num_layers} layers; pass 1 <= K <= {num_layers}"
        )


def block_bounds(k: int, num_layers: int, num_blocks: int) -> tuple[int, int]:
    """``(start, stop)`` of depth block ``k`` of ``K``: ``floor(k*L/K), floor((k+1)*L/K)``."""
    _check_counts(num_layers, num_blocks)
    if not 0 <= k < num_blocks:
        raise SftlensError(f"depth block {k} does not exist; pass 0 <= k < K={num_blocks}")
    return (k * num_layers) // num_blocks, ((k + 1) * num_layers) // num_blocks


def depth_blocks(num_layers: int, num_blocks: int) -> list[Span]:
    """The ``K`` depth blocks of ``L`` layers, bottom first, each with its one-hot mask.

    ``K`` must be between 1 and ``L`` so that no block is empty.
    """
    _check_counts(num_layers, num_blocks)
    out = []
    for k in range(num_blocks):
        start, stop = block_bounds(k, num_layers, num_blocks)
        mask = "0" * k + "1" + "0" * (num_blocks - k - 1)
        out.append(Span(start, stop, mask))
    return out


def mask_layers(mask: str, num_layers: int) -> list[int]:
    """The layers a mask selects (leftmost character = bottom block), in order."""
    if not mask or set(mask) - {"0", "1"}:
        raise SftlensError(
            f"mask {mask!r} is not a string of 0/1 characters; pass e.g. 01110 "
            "(leftmost character = bottom block)"
        )
    _check_counts(num_layers, len(mask))
    return [
        layer
        for k, bit in enumerate(mask)
        if bit == "1"
        for layer in range(*block_bounds(k, num_layers, len(mask)))
    ]


_SPAN = re.compile(r"^(\d+):(\d+)$")


def parse_spans(text: str, num_layers: int | None) -> list[Span]:
    """Parse ``"i:j,k:l"`` into half-open layer spans ``[i, j)``.

    Empty text gives ``[]``. Each span must be non-empty (``i < j``) and, when ``num_layers``
    is given, lie inside ``0..L``; a span listed twice is an error. With ``num_layers=None``
    only the syntax and the order of ``i`` and ``j`` are checked (what a config can check
    before the model is known).
    """
    out: list[Span] = []
    if not text.strip():
        return out
    for part in text.split(","):
        item = part.strip().replace(" ", "")
        m = _SPAN.match(item)
        if m is None:
            raise SftlensError(
                f"span {part.strip()!r} is malformed; write layer spans as i:j "
                "(half-open, e.g. '0:6,24:30')"
            )
        start, stop = int(m.group(1)), int(m.group(2))
        if start == stop:
            raise SftlensError(
                f"span {item} is empty (it holds layers {start} to {stop - 1}); "
                f"write i:j with i < j, e.g. {start}:{start + 1}"
            )
        if start > stop:
            raise SftlensError(f"span {item} is reversed; write it as {stop}:{start}")
        if num_layers is not None and stop > num_layers:
            raise SftlensError(
                f"span {item} is out of range for a model of {num_layers} layers; "
                f"use layers 0..{num_layers} (e.g. {min(start, num_layers - 1)}:{num_layers})"
            )
        span = Span(start, stop)
        if span in out:
            raise SftlensError(f"span {item} is listed twice; list each span once")
        out.append(span)
    return out


def parse_alphas(text: str) -> list[float]:
    """Parse interpolation weights ``"0,0.25,0.5"`` (finite numbers, each once, any order).

    Values outside [0, 1] are allowed (extrapolation beyond an endpoint).
    """
    out: list[float] = []
    for part in text.split(","):
        item = part.strip()
        try:
            value = float(item)
        except ValueError:
            raise SftlensError(
                f"alpha {item!r} is not a number; pass comma-separated weights like "
                "'0,0.25,0.5,0.75,1'"
            ) from None
        if not math.isfinite(value):
            raise SftlensError(f"alpha {item!r} is not finite; pass finite weights like '0,0.5,1'")
        if value in out:
            raise SftlensError(f"alpha {item} is listed twice; list each weight once")
        out.append(value)
    return out


# -- layer selections: masks, layer lists, depth ranges -------------------------------------------

#: The forms :func:`parse_layer_selection` reads, for error messages and ``--help``.
SELECTION_FORMS = (
    "a depth-block mask of 0/1 (e.g. 01100, any length K, leftmost = bottom block), "
    "layers (e.g. 3,4,5 or 6:18, half-open), or a relative-depth range a-b in [0, 1] "
    "(e.g. 0.2-0.8 or 1/3-2/3: layers floor(a*L) .. floor(b*L)-1)"
)
_NUMBER = r"(\d*\.?\d+(?:/\d+)?)"  # 0.2, .5, 1, 1/3
_DEPTH = re.compile(rf"^{_NUMBER}-{_NUMBER}$")
_LAYER_ITEM = re.compile(r"^(\d+)(?::(\d+))?$")


@dataclass(frozen=True)
class Selection:
    """Which layers an option selects: ``text`` as given (normalised), its kind and the layers."""

    text: str
    kind: str  # "mask", "layers" or "depth"
    layers: tuple[int, ...]
    num_layers: int

    def describe(self) -> str:
        """``"01100 -> layers 6-17 of 30"``: the selection with the layers it means."""
        return f"{self.text} -> layers {layer_ranges(self.layers)} of {self.num_layers}"


def layer_ranges(layers: tuple[int, ...] | list[int]) -> str:
    """Compact inclusive ranges of sorted layer indices.

    >>> layer_ranges([0, 1, 2, 5, 7, 8])
    '0-2, 5, 7-8'
    """
    parts: list[str] = []
    run: list[int] = []
    for layer in sorted(layers):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)


def _bad(text: str, why: str) -> SftlensError:
    return SftlensError(f"layer selection {text!r} {why}; pass {SELECTION_FORMS}")


def parse_layer_selection(
    text: str, num_layers: int | None, num_blocks: int | None = None
) -> Selection:
    """Parse a layer selection into sorted layer indices (see :data:`SELECTION_FORMS`).

    - Text made only of ``0``/``1`` is a depth-block mask of ``K = len(text)`` blocks (SPEC
      "Names"; ``num_blocks``, when given, is the length it must have). ``1`` alone is the
      one-block mask (every layer); to name layer 1, 10 or 11 alone write ``1:2``, ``10:11``.
    - Comma-separated layer indices and half-open spans ``i:j`` (``3,4,5``, ``6:18``).
    - ``a-b`` with ``0 <= a < b <= 1`` (decimals or fractions: ``0.2-0.8``, ``1/3-2/3``) is a
      relative-depth range, half-open like the blocks: layers ``floor(a*L) .. floor(b*L) - 1``
      (computed exactly, no float rounding), so ``k/K-(k+1)/K`` is exactly depth block ``k``.

    With ``num_layers=None`` only the syntax is checked (what a config can check before the
    model is known); the returned selection then has no layers. ``auto`` is not a selection:
    the tune command resolves it (``--mask auto --from RUN``) before calling this.
    """
    raw = text
    text = text.strip().replace(" ", "")
    if not text:
        raise _bad(raw, "is empty")
    if text.lower() == "auto":
        raise _bad(raw, "needs an analysis run: write --mask auto --from RUN_DIR")
    if set(text) <= {"0", "1"}:
        if num_blocks is not None and len(text) != num_blocks:
            raise _bad(raw, f"has {len(text)} blocks, not the K={num_blocks} expected")
        if "1" not in text:
            raise _bad(raw, "selects no block (it has no 1)")
        layers = mask_layers(text, num_layers) if num_layers is not None else []
        return Selection(text, "mask", tuple(layers), num_layers or 0)
    if text.isdigit() and len(text) > 1 and text[0] == "0":
        raise _bad(raw, "is malformed: a mask holds only 0 and 1")
    m = _DEPTH.match(text)
    if m is not None:
        try:
            lo, hi = Fraction(m.group(1)), Fraction(m.group(2))
        except ZeroDivisionError:
            raise _bad(raw, "divides by zero") from None
        if not 0 <= lo < hi <= 1:
            raise _bad(raw, "is not a depth range 0 <= a < b <= 1 (for layers write 3,4,5 or 3:6)")
        if num_layers is None:
            return Selection(text, "depth", (), 0)
        _check_counts(num_layers, 1)
        layers = list(range(math.floor(lo * num_layers), math.floor(hi * num_layers)))
        if not layers:
            raise _bad(raw, f"holds no layer of a model of {num_layers} layers; widen it")
        return Selection(text, "depth", tuple(layers), num_layers)
    chosen: list[int] = []
    for part in text.split(","):
        item = _LAYER_ITEM.match(part)
        if item is None:
            raise _bad(raw, f"is malformed at {part!r}")
        start = int(item.group(1))
        stop = int(item.group(2)) if item.group(2) is not None else start + 1
        if stop <= start:
            raise _bad(raw, f"has an empty or reversed span {part!r}")
        if num_layers is not None and stop > num_layers:
            raise _bad(raw, f"names layer {stop - 1}, but the model has layers 0..{num_layers - 1}")
        new = range(start, stop)
        if set(new) & set(chosen):
            raise _bad(raw, f"lists a layer twice at {part!r}")
        chosen.extend(new)
    if num_layers is None:
        return Selection(text, "layers", (), 0)
    return Selection(text, "layers", tuple(sorted(chosen)), num_layers)
