"""Routing shift of mixture-of-experts layers: how differently BASE and SFT route the same tokens.

``logits`` are one MoE layer's router logits, ``(B, T, E)`` for a padded batch (with a
``(B, T)`` mask of real tokens) or ``(N, E)`` for real tokens only. All float64:

- ``route_js``: mean over real tokens of the Jensen-Shannon divergence (natural log, in
  ``[0, log 2]``) between the base and SFT router distributions ``softmax(logits)``;
- expert load: the fraction of the top-k assignments that went to each expert (each real
  token makes ``k`` assignments, to the ``k`` experts with the largest logits, as the router
  picks them), one vector per model; ``route_load_tv`` is the total variation
  ``1/2 sum_e |load_base[e] - load_sft[e]|`` between the two.

The ``*_sums`` function returns sums and counts (for streaming and all-reduce); the others
return means. Padding never counts, so left and right padding give the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sftlens.errors import SftlensError


def _real(logits: Tensor, mask: Tensor | None) -> Tensor:
    """The real tokens' logits as (N, E) float64."""
    if logits.dim() == 3:
        if mask is None:
            mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        if mask.shape != logits.shape[:2]:
            raise SftlensError(
                f"mask has shape {tuple(mask.shape)} but router logits need "
                f"{tuple(logits.shape[:2])}; pass the batch's attention_mask"
            )
        logits = logits[mask.to(logits.device).bool()]
    elif logits.dim() != 2 or mask is not None:
        raise SftlensError(
            f"router logits must be (batch, tokens, experts) with a mask or (tokens, experts) "
            f"without, got shape {tuple(logits.shape)}"
        )
    return logits.to(torch.float64)


def _log_mean_ratio(d: Tensor) -> Tensor:
    """``log((1 + e^d) / 2)``, stable for any ``d`` and exactly 0 at ``d = 0``."""
    return d.clamp_min(0.0) + torch.log1p(torch.expm1(-d.abs()) / 2)


def token_js(logits_base: Tensor, logits_sft: Tensor) -> Tensor:
    """JS divergence per row between ``softmax`` of two (N, E) logit matrices, in log space.

    ``JS = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``. With ``d = log q - log p``,
    ``log p - log m = -log((1 + e^d) / 2)`` (and the same with ``-d`` for ``q``), computed so
    that equal distributions give exactly 0.

    >>> z = torch.tensor([[0.0, 0.0], [50.0, -50.0]], dtype=torch.float64)
    >>> [round(v, 4) for v in token_js(z, z.flip(-1)).tolist()]  # equal; disjoint: log 2
    [0.0, 0.6931]
    """
    logp = torch.log_softmax(logits_base.to(torch.float64), dim=-1)
    logq = torch.log_softmax(logits_sft.to(torch.float64), dim=-1)
    d = logq - logp
    kl_p = -(logp.exp() * _log_mean_ratio(d)).sum(dim=-1)
    kl_q = -(logq.exp() * _log_mean_ratio(-d)).sum(dim=-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0) + 0.0  # + 0.0: no -0.0


def expert_counts(logits: Tensor, top_k: int) -> Tensor:
    """Top-k assignments per expert of (N, E) logits: (E,) float64 counts summing to ``N * k``.

    >>> expert_counts(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), 2).tolist()
    [1.0, 2.0, 1.0]
    """
    num = logits.shape[-1]
    if not 1 <= top_k <= num:
        raise SftlensError(f"top_k={top_k} does not fit {num} experts; pass 1 <= k <= {num}")
    picked = logits.topk(top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(picked, minlength=num).to(torch.float64)


def routing_sums(
    logits_base: Tensor, logits_sft: Tensor, top_k: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(sum of JS over real tokens, base counts (E,), SFT counts (E,), real tokens)``.

    >>> z = torch.randn(2, 5, 4)
    >>> js, cb, cs, n = routing_sums(z, z, 2, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    >>> float(js), n, float(cb.sum()), bool(torch.equal(cb, cs))
    (0.0, 8, 16.0, True)
    """
    if logits_base.shape != logits_sft.shape:
        raise SftlensError(
            f"base router logits {tuple(logits_base.shape)} and sft {tuple(logits_sft.shape)} "
            "differ; run both models on the same batch"
        )
    a, b = _real(logits_base, mask), _real(logits_sft, mask)
    return (
        token_js(a, b).sum(),
        expert_counts(a, top_k),
        expert_counts(b, top_k),
        a.shape[0],
    )


def route_js(logits_base: Tensor, logits_sft: Tensor, mask: Tensor | None = None) -> float:
    """Mean JS divergence between the two routers' distributions over real tokens.

    >>> z = torch.randn(3, 4)
    >>> route_js(z, z)
    0.0
    """
    a, b = _real(logits_base, mask), _real(logits_sft, mask)
    if a.shape[0] == 0:
        raise SftlensError("no real tokens; check the attention mask (1 = real token)")
    return float(token_js(a, b).mean())


def load_tv(load_base: Tensor, load_sft: Tensor) -> float:
    """Total variation ``1/2 sum |a - b|`` between two expert-load vectors (fractions).

    >>> load_tv(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5]))
    0.5
    """
    return float(0.5 * (load_base.double() - load_sft.double()).abs().sum())
