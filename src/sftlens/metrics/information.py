"""Information dynamics: matrix-based alpha-entropy and effective rank of a token/prompt matrix.

Conventions (SPEC "Information dynamics"): centre every feature over the ``n`` rows, L2-normalise
each row, take the Gram ``G = Z Z^T`` divided by its trace; its eigenvalues ``lambda_i`` (tiny
negatives clamped to 0) form a distribution whose Renyi entropy is the matrix entropy. The
``paper`` preset reproduces the paper code instead: rows normalised but not centred,
``G/d + 1e-6 I`` (for dataset entropy with more prompts than features, the squared singular
values of the normalised rows instead, see :func:`dataset_entropy`). Every reduction runs in
float64 whatever the input dtype.
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
    # a NaN/inf anywhere makes the sum non-finite; only a finite-but-overflowing sum (|z| ~ 1e300)
    # needs the elementwise check, which is several times slower on large token matrices
    if not bool(torch.isfinite(z.sum())) and not bool(torch.isfinite(z).all()):
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
    z = _matrix(z)  # (n, d)
    mask = torch.ones(1, z.shape[0], dtype=torch.bool)
    return masked_gram_eigenvalues(
        z[None], mask, center=center, ridge=ridge, scale_by_d=scale_by_d
    )[0]


def masked_gram_eigenvalues(
    z: Tensor, mask: Tensor, *, center: bool = True, ridge: float = 0.0, scale_by_d: bool = False
) -> Tensor:
    """:func:`gram_eigenvalues` for a padded batch: one spectrum per item, in one ``eigvalsh``.

    ``z`` is (B, T, d) and ``mask`` (B, T) marks real rows; padded rows are zeroed after centring
    (over real rows only), so they add exact zero eigenvalues, which change no entropy. Returns
    (B, m) float64 with ``m = min(T, d)`` (``T`` with a ridge, which goes on real rows only).
    :func:`masked_gram` then :func:`gram_spectrum`.

    Example:
        >>> z = torch.eye(3).expand(2, 3, 3).clone()
        >>> mask = torch.tensor([[True, True, True], [True, True, False]])
        >>> masked_gram_eigenvalues(z, mask, center=False)
        tensor([[0.3333, 0.3333, 0.3333],
                [0.5000, 0.5000, 0.0000]], dtype=torch.float64)
    """
    gram = masked_gram(z, mask, center=center, ridge=ridge, scale_by_d=scale_by_d)
    return gram_spectrum(gram.cpu() if gram.is_cuda else gram).to(gram.device)


def masked_gram(
    z: Tensor, mask: Tensor, *, center: bool = True, ridge: float = 0.0, scale_by_d: bool = False
) -> Tensor:
    """The (B, m, m) float64 Grams of :func:`masked_gram_eigenvalues`, before the eigensolve.

    Example:
        >>> z = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])  # (B=1, T=2, d=2); the 2nd row is padding
        >>> masked_gram(z, torch.tensor([[True, False]]), center=False)  # rows scaled to norm 1
        tensor([[[1., 0.],
                 [0., 0.]]], dtype=torch.float64)
    """
    if not ridge >= 0.0:
        raise SftlensError(
            f"ridge must be >= 0, got {ridge}; use 0 (default) or a small value like 1e-6"
        )
    keep = mask.to(device=z.device, dtype=torch.bool).unsqueeze(-1)  # (B, T, 1)
    real = keep.to(torch.float64)
    # padding rows -> exactly 0 (where, not *, so that junk like NaN in padding cannot leak)
    z = torch.where(keep, z.detach().to(torch.float64), 0.0)  # (B, T, d)
    if center:
        z = z - z.sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1.0)
        z = torch.where(keep, z, 0.0)
    norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)  # (B, T, 1)
    z = z / torch.where(norms > 0, norms, torch.ones_like(norms))
    t, d = z.shape[1], z.shape[2]
    # the smaller Gram has the same non-zero spectrum; a ridge needs the n x n side
    gram = z @ z.transpose(1, 2) if (t <= d or ridge > 0) else z.transpose(1, 2) @ z
    if scale_by_d:
        gram = gram / d
    if ridge > 0.0:
        gram = gram + ridge * torch.diag_embed(real.squeeze(-1))
    return gram


def gram_spectrum(gram: Tensor) -> Tensor:
    """Each (B, m, m) Gram's eigenvalues, descending and summing to 1 -> (B, m) float64.

    Rounding noise (below ``m * eps * largest``) becomes an exact 0; a Gram with no spread at
    all (every eigenvalue 0) gives ``[1, 0, ...]``. On a GPU pass a host copy: cuSOLVER solves a
    float64 batch of matrices larger than 32 x 32 one matrix at a time (``syevd`` in a loop):
    32 Grams of 70 x 70 took 15.9 ms on an H200 and 4.0 ms with LAPACK on its host.

    Example:
        >>> gram_spectrum(torch.tensor([[[2.0, 0.0], [0.0, 6.0]]], dtype=torch.float64))
        tensor([[0.7500, 0.2500]], dtype=torch.float64)
    """
    eig = torch.linalg.eigvalsh(gram).flip(-1)  # (B, m) descending
    tol = eig.shape[-1] * torch.finfo(torch.float64).eps * eig[:, :1].clamp_min(0.0)
    eig = torch.where(eig > tol, eig, torch.zeros_like(eig))  # rounding noise -> exact 0
    total = eig.sum(-1, keepdim=True)
    degenerate = (total <= 0).squeeze(-1)  # no spread at all: spectrum [1, 0, ...]
    eig = eig / torch.where(total > 0, total, torch.ones_like(total))
    eig[degenerate, 0] = 1.0
    return eig


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
    return alpha_entropy_rows(lam[None], alpha)[0]


def alpha_entropy_rows(lam: Tensor, alpha: float = 1.0) -> Tensor:
    """:func:`alpha_entropy_from_eigenvalues` of each row of a (B, m) spectrum -> (B,).

    Example:
        >>> alpha_entropy_rows(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    lam = lam.to(torch.float64)
    p = lam / lam.sum(-1, keepdim=True)  # (B, m)
    positive = p > 0  # zeros contribute nothing for any alpha > 0
    logp = torch.where(positive, p, torch.ones_like(p)).log()  # 0 where p == 0
    if alpha == 1.0:
        return -(p * logp).sum(-1) + 0.0  # + 0.0 turns -0.0 into 0.0
    if math.isinf(alpha):
        return -p.max(-1).values.log()
    s_minus_1 = (p * torch.expm1((alpha - 1.0) * logp)).sum(-1)  # sum p^alpha - 1
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


def paper_dataset_eigenvalues(z: Tensor) -> Tensor:
    """The ``paper`` preset's dataset-entropy spectrum of pooled rows ``z`` (n prompts, d).

    The paper code has two branches. With more prompts than features (``n > d``) the
    eigenvalues are the squared singular values of the row-normalised (not centred) matrix,
    with neither the ``/ d`` scaling nor the ridge; otherwise (``n <= d``) the eigenvalues of
    the ridged Gram ``G / d + 1e-6 I_n``. Returned trace-normalised (sum 1), float64.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # n = 3 > d = 2
        >>> paper_dataset_eigenvalues(z)
        tensor([0.6667, 0.3333], dtype=torch.float64)
    """
    z = _matrix(z)  # (n, d)
    n, d = z.shape
    if n <= d:
        return gram_eigenvalues(z, center=False, ridge=PAPER_RIDGE, scale_by_d=True)
    sigma_sq = torch.linalg.svdvals(normalize_rows(z, center=False)).square()  # (d,)
    total = sigma_sq.sum()
    if total <= 0:  # all rows zero: no spread, the degenerate spectrum [1, 0, ...]
        return torch.nn.functional.one_hot(torch.tensor(0, device=z.device), d).to(torch.float64)
    return sigma_sq / total


def dataset_entropy(
    z: Tensor, alpha: float = 1.0, *, preset: Preset = "default", normalized: bool = False
) -> Tensor:
    """Dataset entropy of one pooled vector per prompt, ``z`` (n prompts, d), 0-d float64.

    ``default``: :func:`matrix_entropy` of the rows (centred, row-normalised, ``G / tr G``).
    ``paper``: the paper code's two branches, see :func:`paper_dataset_eigenvalues`.
    ``normalized`` divides by ``log(min(n, d))``.

    Example:
        >>> z = torch.eye(3)
        >>> round(float(dataset_entropy(z, preset="paper", normalized=True)), 4)
        1.0
    """
    if preset == "default":
        return matrix_entropy(z, alpha, normalized=normalized)
    if preset != "paper":
        raise SftlensError(f"unknown entropy preset {preset!r}; use 'default' or 'paper'")
    value = alpha_entropy_from_eigenvalues(paper_dataset_eigenvalues(z), alpha)
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
    return erank_from_singular_values(torch.linalg.svdvals(x), variant=variant)


def erank_from_singular_values(sigma: Tensor, *, variant: ErankVariant = "roy_vetterli") -> Tensor:
    """:func:`effective_rank` from singular values already computed (one SVD, both variants).

    Example:
        >>> s = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
        >>> round(float(erank_from_singular_values(s)), 4), round(float(erank_from_singular_values(s, variant="sigma2")), 4)
        (2.8284, 2.3811)
    """
    if variant not in ("roy_vetterli", "sigma2"):
        raise SftlensError(
            f"unknown effective-rank variant {variant!r}; use 'roy_vetterli' or 'sigma2'"
        )
    sigma = sigma.to(torch.float64)
    weights = sigma if variant == "roy_vetterli" else sigma.square()
    if float(weights.sum()) <= 0.0:
        return sigma.new_zeros(())
    return alpha_entropy_from_eigenvalues(weights, 1.0).exp()
