"""Information dynamics: matrix-based alpha-entropy and effective rank of a token/prompt matrix.

Conventions (SPEC "Information dynamics"): centre every feature over the ``n`` rows, L2-normalise
each row, take the Gram ``G = Z Z^T`` divided by its trace; its eigenvalues ``lambda_i`` (tiny
negatives clamped to 0) form a distribution whose Renyi entropy is the matrix entropy. The
``paper`` preset reproduces the paper code instead: rows normalised but not centred,
``G/d + 1e-6 I``. Every reduction runs in float64 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from sftlens.errors import SftlensError

Preset = Literal["default", "paper"]
ErankVariant = Literal["roy_vetterli", "sigma2"]

PAPER_RIDGE = 1e-6


def _matrix(z: Tensor, name: str = "z") -> Tensor:
    """Validate a 2-D, non-empty, finite matrix and return it as float64."""
    if not isinstance(z, Tensor):
        raise SftlensError(
            f"{name} must be a torch.Tensor, got {type(z).__name__}; convert it with torch.as_tensor"
        )
    if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise SftlensError(
            f"{name} must be a non-empty (n, d) matrix, got shape {tuple(z.shape)}; flatten tokens to rows first"
        )
    z = z.detach().to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise SftlensError(
            f"{name} contains NaN or inf; run the model in float32/bfloat16 instead of float16 or check its inputs"
        )
    return z


def normalize_rows(z: Tensor, *, center: bool = True) -> Tensor:
    """Subtract the mean row (if ``center``), then L2-normalise each row; zero rows stay zero.

    ``z_i <- (z_i - mean_j z_j) / ||z_i - mean_j z_j||_2``, (n, d) -> (n, d) float64.

    Example:
        >>> z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> normalize_rows(z, center=False)
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    z = _matrix(z)  # (n, d)
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)  # (n, 1)
    return z / torch.where(norms > 0, norms, torch.ones_like(norms))


def gram_eigenvalues(
    z: Tensor, *, center: bool = True, ridge: float = 0.0, scale_by_d: bool = False
) -> Tensor:
    """Eigenvalues of the trace-normalised Gram of the prepared rows, float64, >= 0, sum 1.

    ``G = Z Z^T`` (``/ d`` if ``scale_by_d``, ``+ ridge * I_n`` if ``ridge``), divided by its
    trace. The eigenvalues come from the smaller of ``Z Z^T`` and ``Z^T Z`` (same non-zero
    spectrum). Eigenvalues below ``m * eps * max`` (numpy's ``matrix_rank`` tolerance) are
    rounding noise and set to 0, negatives included, so that ``alpha < 1`` does not amplify
    them (the centred Gram always has an exact zero). Without a ridge the ``min(n, d)`` values
    are returned (the others are 0 and change no entropy); with a ridge the ``n`` eigenvalues of
    the ``n x n`` Gram, since the ridge lifts its null space too. A matrix with no spread (all
    rows equal, e.g. ``n == 1`` with centring) has the degenerate spectrum ``[1, 0, ...]``.

    Example:
        >>> gram_eigenvalues(torch.eye(3), center=False)
        tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """
    if not ridge >= 0.0:
        raise SftlensError(
            f"ridge must be >= 0, got {ridge}; use 0 (default) or a small value like 1e-6"
        )
    zn = normalize_rows(z, center=center)  # (n, d)
    n, d = zn.shape
    small = zn @ zn.T if n <= d else zn.T @ zn  # (m, m), m = min(n, d)
    eig = torch.linalg.eigvalsh(small).flip(0)  # (m,) descending
    tol = eig.numel() * torch.finfo(torch.float64).eps * eig[0].clamp_min(0.0)
    eig = torch.where(eig > tol, eig, torch.zeros_like(eig))  # rounding noise -> exact 0
    if scale_by_d:
        eig = eig / d
    if ridge > 0.0:
        eig = torch.cat([eig, eig.new_zeros(n - eig.numel())]) + ridge  # (n,)
    total = eig.sum()
    if total <= 0:
        eig = torch.zeros_like(eig)
        eig[0] = 1.0
        return eig
    return eig / total


def alpha_entropy_from_eigenvalues(lam: Tensor, alpha: float = 1.0) -> Tensor:
    """Renyi alpha-entropy (natural log) of a non-negative spectrum, normalised here to sum 1.

    ``S_alpha = 1/(1-alpha) * log(sum_i lambda_i^alpha)``; ``alpha = 1`` gives the limit
    ``-sum_i lambda_i log lambda_i`` (with ``0 log 0 = 0``), ``alpha = inf`` gives
    ``-log max_i lambda_i``. Computed as ``log1p(sum_i lambda_i expm1((alpha-1) log lambda_i))``
    so that it is continuous (and accurate) around ``alpha = 1``.

    Example:
        >>> lam = torch.full((4,), 0.25)
        >>> round(float(alpha_entropy_from_eigenvalues(lam, 2.0)), 6) == round(math.log(4), 6)
        True
    """
    if not alpha > 0:
        raise SftlensError(
            f"alpha must be > 0, got {alpha}; use alpha=1 (Shannon/von Neumann) or e.g. 2"
        )
    lam = torch.as_tensor(lam).detach().to(torch.float64).reshape(-1)
    if lam.numel() == 0 or not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise SftlensError(
            "eigenvalues must be finite and >= 0; clamp tiny negatives to 0 first (gram_eigenvalues does)"
        )
    total = lam.sum()
    if total <= 0:
        raise SftlensError(
            "eigenvalues sum to 0, so there is no distribution; pass a non-zero spectrum"
        )
    p = lam[lam > 0] / total  # zeros contribute nothing for any alpha > 0
    if alpha == 1.0:
        return -(p * p.log()).sum() + 0.0  # + 0.0 turns -0.0 into 0.0
    if math.isinf(alpha):
        return -p.max().log()
    s_minus_1 = (p * torch.expm1((alpha - 1.0) * p.log())).sum()  # sum p^alpha - 1
    return torch.log1p(s_minus_1) / (1.0 - alpha)


def normalize_entropy(value: Tensor, n: int, d: int) -> Tensor:
    """Divide an entropy by its maximum ``log(min(n, d))``; 0 when ``min(n, d) <= 1``.

    Example:
        >>> float(normalize_entropy(torch.tensor(math.log(4), dtype=torch.float64), 4, 10))
        1.0
    """
    value = torch.as_tensor(value, dtype=torch.float64)
    m = min(n, d)
    return value / math.log(m) if m > 1 else torch.zeros_like(value)


def matrix_entropy(
    z: Tensor, alpha: float = 1.0, *, preset: Preset = "default", normalized: bool = False
) -> Tensor:
    """Matrix-based alpha-entropy of the rows of ``z`` (n, d) as a 0-d float64 tensor.

    ``default``: centre, row-normalise, ``G / tr G``. ``paper``: row-normalise without centring,
    ``G / d + 1e-6 I``, then trace-normalise. ``normalized`` divides by ``log(min(n, d))``.

    Example:
        >>> z = torch.eye(4)  # 4 orthogonal unit rows, no centring: uniform spectrum
        >>> round(float(matrix_entropy(z, preset="paper", normalized=True)), 4)
        1.0
    """
    if preset == "default":
        lam = gram_eigenvalues(z, center=True)
    elif preset == "paper":
        lam = gram_eigenvalues(z, center=False, ridge=PAPER_RIDGE, scale_by_d=True)
    else:
        raise SftlensError(f"unknown entropy preset {preset!r}; use 'default' or 'paper'")
    value = alpha_entropy_from_eigenvalues(lam, alpha)
    return normalize_entropy(value, z.shape[0], z.shape[1]) if normalized else value


def effective_rank(
    z: Tensor, *, variant: ErankVariant = "roy_vetterli", center: bool = True
) -> Tensor:
    """Effective rank (Roy & Vetterli 2007) of ``z`` (n, d) as a 0-d float64 tensor.

    ``erank = exp(-sum_i p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j``, ``sigma`` the
    singular values of ``z`` (columns centred if ``center``). ``variant="sigma2"`` uses
    ``sigma^2`` instead (the paper code's convention). A zero matrix has effective rank 0.

    Example:
        >>> round(float(effective_rank(torch.eye(3), center=False)), 6)
        3.0
    """
    if variant not in ("roy_vetterli", "sigma2"):
        raise SftlensError(
            f"unknown effective-rank variant {variant!r}; use 'roy_vetterli' or 'sigma2'"
        )
    x = _matrix(z)  # (n, d)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    sigma = torch.linalg.svdvals(x)  # (min(n, d),)
    weights = sigma if variant == "roy_vetterli" else sigma.square()
    if float(weights.sum()) <= 0.0:
        return x.new_zeros(())
    return alpha_entropy_from_eigenvalues(weights, 1.0).exp()
