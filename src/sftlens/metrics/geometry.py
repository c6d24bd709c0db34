"""Geometric reconstruction: CKA, cosine similarity and mean shift between base and SFT rows.

``x`` holds the base model's representations and ``y`` the SFT model's, row ``i`` of both being
the same token (or prompt). Every reduction runs in float64 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sftlens.errors import SftlensError
from sftlens.metrics.information import _matrix


def _pair(x: Tensor, y: Tensor, *, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """Validate two float64 matrices with the same rows (the same tokens through both models)."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise SftlensError(
            f"x has {x.shape[0]} rows but y has {y.shape[0]}; pass the same tokens through both models"
        )
    if x.shape[0] < min_rows:
        raise SftlensError(
            f"need at least {min_rows} rows (tokens or prompts), got {x.shape[0]}; use more inputs"
        )
    return x, y


def _center(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _feature_scales(var: Tensor, raw_second_moment: Tensor, n: float) -> Tensor:
    """``1 / std`` per feature, 0 for a feature whose variance is within rounding of zero.

    ``var`` and ``raw_second_moment`` are the centred and uncentred second moments over ``n``
    rows, both as means or both as sums (only their ratio matters). The streamed variance
    ``sum x^2 - (sum x)^2 / n`` cancels catastrophically for a (near-)constant feature: float64
    sums of ``n`` terms carry a relative error up to ``~n * eps``, so the residual can reach a
    few ``n * eps * sum x^2`` (a constant 0.7 over 3000 rows leaves ~1e-13 of it). A feature
    counts as having variance only above ``64 * n * eps`` times its raw second moment (for
    ``n = 1e5`` rows: a spread below ~5e-5 of its mean); :func:`linear_cka` and
    :func:`cka_from_moments` apply this same test, so they drop the same features.
    """
    eps = torch.finfo(torch.float64).eps
    alive = var > 64.0 * eps * max(float(n), 1.0) * raw_second_moment
    return torch.where(alive, var.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)


def linear_cka(x: Tensor, y: Tensor, *, standardize: bool = False) -> Tensor:
    """Linear CKA (Kornblith et al. 2019) of x (n, d1) and y (n, d2), columns centred.

    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)``, evaluated through the ``n x n`` Grams
    ``tr(K_x K_y) / (||K_x||_F ||K_y||_F)`` when ``n`` is smaller than both widths. NaN when
    either side has no variance. Needs ``n >= 2``.

    ``standardize=True`` also divides each column by its standard deviation (features without
    variance beyond rounding are dropped, by the same test as :func:`cka_from_moments`): CKA of
    the z-scored features, i.e. of the correlation structure.
    Plain linear CKA weighs features by their variance, so a few "massive activation" dimensions
    that carry almost all of it make it read ~1 whatever the other dimensions do.

    Example:
        >>> x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        >>> round(float(linear_cka(x, 3.0 * x + 1.0)), 6)
        1.0
        >>> scale = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1])  # one loud feature
        >>> round(float(linear_cka(x * scale, x * scale, standardize=True)), 6)
        1.0
    """
    x, y = _pair(x, y, min_rows=2)
    if standardize:
        raw_x, raw_y = x.square().mean(0), y.square().mean(0)  # (d1,), (d2,)
        x, y = _center(x), _center(y)  # (n, d1), (n, d2)
        n = x.shape[0]
        x = x * _feature_scales(x.square().mean(0), raw_x, n)
        y = y * _feature_scales(y.square().mean(0), raw_y, n)
    else:
        x, y = _center(x), _center(y)
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T  # (n, n)
        return (kx * ky).sum() / (torch.linalg.norm(kx) * torch.linalg.norm(ky))
    cross = torch.linalg.norm(y.T @ x) ** 2  # ||Y^T X||_F^2
    return cross / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y))


def cka_from_moments(
    sxx: Tensor,
    syy: Tensor,
    sxy: Tensor,
    sx: Tensor,
    sy: Tensor,
    n: int | float | Tensor,
    *,
    standardize: bool = False,
) -> Tensor:
    """Linear CKA from uncentred sums, exactly the value of :func:`linear_cka` on the rows.

    With ``sxx = X^T X`` (d1, d1), ``syy = Y^T Y`` (d2, d2), ``sxy = Y^T X`` (d2, d1), column sums
    ``sx`` (d1,), ``sy`` (d2,) over ``n`` rows, centre algebraically
    (``X^T X - sx sx^T / n`` etc.) and return ``||C_yx||_F^2 / (||C_xx||_F ||C_yy||_F)``.
    ``standardize=True`` turns the covariances into correlations first (``D^-1/2 C D^-1/2``
    with ``D`` the variances), the value of ``linear_cka(x, y, standardize=True)``.

    Example:
        >>> x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)).double()
        >>> y = x @ torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).double()
        >>> m = cka_from_moments(x.T @ x, y.T @ y, y.T @ x, x.sum(0), y.sum(0), 40)
        >>> bool(torch.isclose(m, linear_cka(x, y)))
        True
    """
    n = float(n)
    if n < 2:
        raise SftlensError(
            f"CKA needs at least 2 rows, got {n:g}; feed more tokens before compute()"
        )
    sxx, syy, sxy, sx, sy = (torch.as_tensor(t).to(torch.float64) for t in (sxx, syy, sxy, sx, sy))
    d1, d2 = sx.numel(), sy.numel()
    if sxx.shape != (d1, d1) or syy.shape != (d2, d2) or sxy.shape != (d2, d1):
        raise SftlensError(
            f"moment shapes disagree: sxx {tuple(sxx.shape)}, syy {tuple(syy.shape)}, sxy {tuple(sxy.shape)} "
            f"for d1={d1}, d2={d2}; pass X^T X, Y^T Y and Y^T X (d2, d1)"
        )
    cxx = sxx - torch.outer(sx, sx) / n  # (d1, d1)
    cyy = syy - torch.outer(sy, sy) / n  # (d2, d2)
    cyx = sxy - torch.outer(sy, sx) / n  # (d2, d1)
    if standardize:
        # sums, not means: the same ratio, so the same features as linear_cka are dropped
        ax = _feature_scales(cxx.diagonal(), sxx.diagonal(), n)  # (d1,) 1 / sqrt(n var)
        ay = _feature_scales(cyy.diagonal(), syy.diagonal(), n)  # (d2,)
        cxx, cyy, cyx = (
            cxx * torch.outer(ax, ax),
            cyy * torch.outer(ay, ay),
            cyx * torch.outer(ay, ax),
        )
    return torch.linalg.norm(cyx) ** 2 / (torch.linalg.norm(cxx) * torch.linalg.norm(cyy))


def top_feature_share_from_moments(sxx: Tensor, sx: Tensor, n: int | float | Tensor) -> Tensor:
    """The largest single feature's share of the total variance, ``max_i C_ii / tr(C)``.

    From the same sums as :func:`cka_from_moments`. Near 1, one "massive activation" dimension
    carries the variance and plain linear CKA mostly compares that one dimension.

    Example:
        >>> x = torch.tensor([[10.0, 0.0], [-10.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
        >>> round(float(top_feature_share_from_moments(x.T @ x, x.sum(0), 3)), 4)
        0.9901
    """
    sxx, sx = torch.as_tensor(sxx).to(torch.float64), torch.as_tensor(sx).to(torch.float64)
    var = (sxx.diagonal() - sx.square() / float(n)).clamp_min(0.0)  # (d,) n * variance
    total = var.sum()
    return var.max() / total if total > 0 else total


def _unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Unbiased HSIC (Song et al. 2012) of two (n, n) kernels; diagonals must already be 0."""
    n = k.shape[0]
    ones_k, ones_l = k.sum(dim=1), l.sum(dim=1)  # K 1, L 1: (n,)
    term = (k * l).sum() + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
    term = term - 2.0 / (n - 2) * (ones_k @ ones_l)
    return term / (n * (n - 3))


def unbiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021), linear kernels.

    With ``K = X X^T``, ``L = Y Y^T`` and their diagonals set to 0,
    ``HSIC_1(K, L) = [tr(K L) + 1^T K 1 1^T L 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))``
    and ``CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))``. Less biased than
    :func:`linear_cka` for few rows; uses ``n x n`` memory. Needs ``n > 3``.

    Example:
        >>> x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
        >>> round(float(unbiased_cka(x, -2.0 * x)), 6)
        1.0
    """
    x, y = _pair(x, y)
    n = x.shape[0]
    if n <= 3:
        raise SftlensError(
            f"unbiased CKA needs more than 3 rows, got {n}; use more prompts or linear_cka"
        )
    x, y = _center(x), _center(y)  # translation-invariant estimator; centring only helps rounding
    k, l = x @ x.T, y @ y.T  # noqa: E741  (n, n)
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    return _unbiased_hsic(k, l) / torch.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))


def row_cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity of each row pair, (n, d) x (n, d) -> (n,) float64; 0 for a zero row.

    Example:
        >>> row_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]]))
        tensor([0.0000, 1.0000], dtype=torch.float64)
    """
    x, y = _pair(x, y)
    if x.shape[1] != y.shape[1]:
        raise SftlensError(
            f"x has width {x.shape[1]} but y has {y.shape[1]}; cosine needs the same hidden size"
        )
    norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)  # (n,)
    return (x * y).sum(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))


def mean_cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """Mean over rows of ``cos(x_i, y_i)``, a 0-d float64 tensor.

    Example:
        >>> round(float(mean_cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]]))), 6)
        0.5
    """
    return row_cosine(x, y).mean()


def mean_shift_from_means(mean_x: Tensor, mean_y: Tensor) -> tuple[Tensor, Tensor]:
    """``(||mean_y - mean_x||_2, ||mean_y - mean_x||_2 / ||mean_x||_2)`` as float64 0-d tensors.

    The relative shift is inf when ``mean_x`` is 0 (and 0 when both means are 0).

    Example:
        >>> a, r = mean_shift_from_means(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0]))
        >>> float(a), float(r)
        (1.0, 0.2)
    """
    mean_x, mean_y = (torch.as_tensor(t).to(torch.float64).reshape(-1) for t in (mean_x, mean_y))
    if mean_x.shape != mean_y.shape:
        raise SftlensError(
            f"mean vectors differ in size ({mean_x.numel()} vs {mean_y.numel()}); compare the same hidden size"
        )
    shift = torch.linalg.vector_norm(mean_y - mean_x)
    base = torch.linalg.vector_norm(mean_x)
    if base > 0:
        return shift, shift / base
    return shift, torch.where(
        shift > 0, torch.full_like(shift, float("inf")), torch.zeros_like(shift)
    )


def mean_shift(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean shift ``||mean(y) - mean(x)||_2`` and the same divided by ``||mean(x)||_2``.

    Example:
        >>> a, r = mean_shift(torch.tensor([[2.0, 4.0], [4.0, 4.0]]), torch.tensor([[3.0, 5.0], [3.0, 5.0]]))
        >>> float(a), float(r)
        (1.0, 0.2)
    """
    x, y = _pair(x, y)
    return mean_shift_from_means(x.mean(dim=0), y.mean(dim=0))
