"""Attention statistics per head: entropy of each query's distribution, and base-vs-SFT JS.

``attn`` is a batch of attention probabilities (B, H, Q, K) as returned by eager attention.
Only real tokens count: each real query's distribution is restricted to the real keys and
renormalised there; padded queries are dropped (whatever they hold, NaN included), so left and
right padding give the same numbers. The ``*_sums`` variants return ``(sum per head (H,), count
of real queries)`` for streaming; the plain functions return the mean per head. All float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sftlens.errors import SftlensError


def _masks(
    attn: Tensor, key_mask: Tensor | None, query_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validate shapes and return boolean (B, K) key and (B, Q) query masks."""
    if attn.dim() != 4:
        raise SftlensError(
            f"attention must be (batch, heads, queries, keys), got shape {tuple(attn.shape)}; pass one layer's attention weights"
        )
    b, _, q, k = attn.shape
    if key_mask is None:
        key_mask = torch.ones(b, k, dtype=torch.bool, device=attn.device)
    if key_mask.shape != (b, k):
        raise SftlensError(
            f"key_mask has shape {tuple(key_mask.shape)} but attention needs ({b}, {k}); pass the batch's attention_mask"
        )
    if query_mask is None:
        if q != k:
            raise SftlensError(
                f"attention has {q} queries but {k} keys; pass query_mask (batch, {q}) of real queries"
            )
        query_mask = key_mask
    if query_mask.shape != (b, q):
        raise SftlensError(
            f"query_mask has shape {tuple(query_mask.shape)} but attention needs ({b}, {q}); pass a (batch, queries) mask"
        )
    return key_mask.to(attn.device).bool(), query_mask.to(attn.device).bool()


def _real_rows(attn: Tensor, key_mask: Tensor, query_mask: Tensor) -> Iterator[Tensor]:
    """Yield per batch item the float64 (H, q_real, k_real) attention, renormalised over real keys."""
    for i in range(attn.shape[0]):  # one item at a time keeps the float64 copy small
        a = attn[i][:, query_mask[i]][:, :, key_mask[i]].to(torch.float64)  # (H, q_real, k_real)
        if bool((a < 0).any()):
            raise SftlensError(
                "attention has negative entries; pass softmax probabilities, not scores"
            )
        total = a.sum(dim=-1, keepdim=True)  # (H, q_real, 1)
        yield a / torch.where(total > 0, total, torch.ones_like(total))


def _same_shape(p: Tensor, q: Tensor) -> None:
    if p.shape != q.shape:
        raise SftlensError(
            f"base attention {tuple(p.shape)} and sft attention {tuple(q.shape)} differ; run both models on the same batch"
        )


def attention_entropy_sums(
    attn: Tensor, key_mask: Tensor | None = None, query_mask: Tensor | None = None
) -> tuple[Tensor, int]:
    """Sum over real queries of ``-sum_k p_k log p_k`` per head, and the number of real queries.

    ``key_mask`` (B, K) marks real tokens (an HF ``attention_mask`` works); ``query_mask``
    (B, Q) defaults to ``key_mask`` for self-attention (Q == K).

    Example:
        >>> s, c = attention_entropy_sums(torch.full((1, 2, 3, 3), 1 / 3))
        >>> c, [round(v, 4) for v in (s / c).tolist()]
        (3, [1.0986, 1.0986])
    """
    kmask, qmask = _masks(attn, key_mask, query_mask)
    total = torch.zeros(attn.shape[1], dtype=torch.float64, device=attn.device)
    count = 0
    for a in _real_rows(attn, kmask, qmask):  # (H, q, k)
        total = total + torch.special.entr(a).sum(dim=(-1, -2))  # (H,)
        count += a.shape[1]
    return total, count


def attention_entropy(
    attn: Tensor, key_mask: Tensor | None = None, query_mask: Tensor | None = None
) -> Tensor:
    """Mean entropy (natural log) of the real queries' attention over real keys, per head (H,).

    Example:
        >>> attn = torch.full((1, 1, 4, 4), 0.25)
        >>> mask = torch.tensor([[True, True, False, False]])  # 2 real tokens
        >>> round(float(attention_entropy(attn, mask)[0]), 4)  # log 2
        0.6931
    """
    total, count = attention_entropy_sums(attn, key_mask, query_mask)
    if count == 0:
        raise SftlensError(
            "no real queries in this batch; check the attention mask (1 = real token)"
        )
    return total / count


def attention_js_sums(
    p: Tensor, q: Tensor, key_mask: Tensor | None = None, query_mask: Tensor | None = None
) -> tuple[Tensor, int]:
    """Sum over real queries of JS(p, q) per head (natural log, in [0, log 2]), and the count.

    ``JS = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``, both distributions restricted
    to the real keys and renormalised.

    Example:
        >>> p = torch.tensor([1.0, 0.0]).expand(1, 1, 2, 2)
        >>> s, c = attention_js_sums(p, p.flip(-1))
        >>> c, round(float(s[0] / c), 4)  # disjoint supports: log 2
        (2, 0.6931)
    """
    _same_shape(p, q)
    kmask, qmask = _masks(p, key_mask, query_mask)
    total = torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
    count = 0
    for a, b in zip(_real_rows(p, kmask, qmask), _real_rows(q, kmask, qmask)):  # (H, q, k) each
        m = 0.5 * (a + b)
        m = torch.where(m > 0, m, torch.ones_like(m))  # where m == 0, a == b == 0 too
        js = 0.5 * (torch.xlogy(a, a / m) + torch.xlogy(b, b / m)).sum(dim=-1)  # (H, q)
        total = total + js.clamp_min(0.0).sum(dim=-1)  # (H,)
        count += a.shape[1]
    return total, count


def attention_js(
    p: Tensor, q: Tensor, key_mask: Tensor | None = None, query_mask: Tensor | None = None
) -> Tensor:
    """Mean Jensen-Shannon divergence between base ``p`` and SFT ``q`` attention, per head (H,).

    Example:
        >>> p = torch.full((1, 3, 4, 4), 0.25)
        >>> attention_js(p, p)
        tensor([0., 0., 0.], dtype=torch.float64)
    """
    total, count = attention_js_sums(p, q, key_mask, query_mask)
    if count == 0:
        raise SftlensError(
            "no real queries in this batch; check the attention mask (1 = real token)"
        )
    return total / count
