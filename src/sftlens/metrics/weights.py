"""Weight-space distances between two checkpoints (pure functions on tensors).

``dW_l = sqrt( sum_{P in q,k,v,o} ||W_P^sft - W_P^base||_F^2 )`` is built from the squared
pieces below, so every projection, layer and group shares one float64 accumulation.
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per chunk


def frobenius_sq_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F^2`` accumulated in float64, chunked so memory stays near one chunk.

    The difference is taken in float32 (exact for weights within a factor 2 of each other,
    Sterbenz) and its squares are summed in float64.

    >>> frobenius_sq_diff(torch.ones(2, 3), torch.zeros(2, 3))
    6.0
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.dtype not in (torch.float32, torch.float64):
        fa, fb = fa.float(), fb.float()
    total = 0.0
    for start in range(0, fa.numel(), _CHUNK_ELEMENTS):
        d = (fa[start : start + _CHUNK_ELEMENTS] - fb[start : start + _CHUNK_ELEMENTS]).double()
        total += float(torch.dot(d, d))  # squares summed directly: no sqrt-then-square rounding
    return total


def frobenius_sq(a: torch.Tensor) -> float:
    """``||a||_F^2`` in float64.

    >>> frobenius_sq(torch.tensor([[3.0, 4.0]]))
    25.0
    """
    fa = a.reshape(-1)
    if fa.dtype not in (torch.float32, torch.float64):
        fa = fa.float()
    total = 0.0
    for start in range(0, fa.numel(), _CHUNK_ELEMENTS):
        chunk = fa[start : start + _CHUNK_ELEMENTS].double()
        total += float(torch.dot(chunk, chunk))
    return total


def relative_change(diff_sq: float, base_sq: float) -> float:
    """``||W_sft - W_base||_F / ||W_base||_F`` from squared norms (nan if the base is zero).

    >>> relative_change(1.0, 4.0)
    0.5
    """
    return math.sqrt(diff_sq) / math.sqrt(base_sq) if base_sq > 0 else float("nan")


def lora_delta_norm(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    """``||scaling * B A||_F`` for one LoRA-adapted module, via the r x r Grams (no d x d product).

    ``||BA||_F^2 = trace(B^T B A A^T)``; A is (r, in), B is (out, r).

    >>> a, b = torch.eye(2, 3), torch.eye(3, 2)
    >>> round(lora_delta_norm(a, b, 2.0), 6)  # ||2 * B A||_F = 2 * sqrt(2)
    2.828427
    """
    a, b = lora_a.double(), lora_b.double()
    sq = float(torch.trace((b.T @ b) @ (a @ a.T)))
    return abs(scaling) * math.sqrt(max(sq, 0.0))
