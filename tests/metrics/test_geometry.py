"""CKA, cosine similarity and mean shift against independent numpy computations."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group, zscore

from sftlens.errors import SftlensError
from sftlens.metrics import geometry
from sftlens.metrics.geometry import (
    cka_from_moments,
    linear_cka,
    mean_cosine_similarity,
    mean_shift,
    top_feature_share_from_moments,
    unbiased_cka,
)


def _pair(n: int, d1: int, d2: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g) + 2.0
    y = x @ torch.randn(d1, d2, generator=g) + 0.5 * torch.randn(n, d2, generator=g)
    return x, y  # float32, related but not identical


def _np_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64) - x.mean(axis=0)
    y = y.astype(np.float64) - y.mean(axis=0)
    num = np.linalg.norm(y.T @ x, "fro") ** 2
    return float(num / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")))


def _np_hsic1(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), eq. (5), written out with explicit ones vectors."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    value = np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    value -= 2.0 / (n - 2) * (one @ k @ l @ one)
    return float(value / (n * (n - 3)))


@pytest.mark.parametrize(("n", "d1", "d2"), [(40, 5, 7), (6, 10, 12)])  # feature and Gram branch
def test_linear_cka_matches_numpy(n: int, d1: int, d2: int) -> None:
    x, y = _pair(n, d1, d2)
    got = linear_cka(x, y)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_np_cka(x.numpy(), y.numpy()), abs=1e-12)
    assert 0.0 < float(got) < 0.999


def test_cka_identity_rotation_and_scaling() -> None:
    x, _ = _pair(30, 6, 6, seed=1)
    rot = torch.from_numpy(ortho_group.rvs(6, random_state=2)).float()
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(x, x @ rot)) == pytest.approx(1.0, abs=1e-6)
    assert float(linear_cka(x, 7.5 * x - 3.0)) == pytest.approx(1.0, abs=1e-6)
    y = _pair(30, 6, 4, seed=3)[1]
    assert float(linear_cka(x @ rot, 0.1 * y)) == pytest.approx(float(linear_cka(x, y)), abs=1e-6)
    # not invariant to anisotropic scaling
    assert float(linear_cka(x, x * torch.tensor([10.0, 1, 1, 1, 1, 0.1]))) < 0.9


def test_cka_from_moments_equals_gram_form() -> None:
    x, y = _pair(25, 4, 9, seed=4)
    xd, yd = x.double(), y.double()
    got = cka_from_moments(xd.T @ xd, yd.T @ yd, yd.T @ xd, xd.sum(0), yd.sum(0), 25)
    assert float(got) == pytest.approx(float(linear_cka(x, y)), abs=1e-10)
    with pytest.raises(SftlensError, match="shapes"):
        cka_from_moments(xd.T @ xd, yd.T @ yd, xd.T @ yd, xd.sum(0), yd.sum(0), 25)
    with pytest.raises(SftlensError, match="at least 2"):
        cka_from_moments(xd.T @ xd, yd.T @ yd, yd.T @ xd, xd.sum(0), yd.sum(0), 1)


@pytest.mark.parametrize(("n", "d1", "d2"), [(200, 6, 5), (7, 12, 9)])  # feature / Gram branch
def test_standardized_cka_matches_numpy_zscore(n: int, d1: int, d2: int) -> None:
    x, y = _pair(n, d1, d2)
    want = _np_cka(zscore(x.double().numpy(), axis=0), zscore(y.double().numpy(), axis=0))
    assert float(linear_cka(x, y, standardize=True)) == pytest.approx(want, rel=1e-10)


def test_standardized_cka_streams_and_sees_past_a_massive_feature() -> None:
    g = torch.Generator().manual_seed(5)
    n = 3000  # enough rows that a constant 0.7 leaves a rounding residual in streamed moments
    shared = 100.0 * torch.randn(n, 1, generator=g)  # one loud dimension in both models
    x = torch.cat([shared, torch.randn(n, 7, generator=g)], dim=1).double()
    y = torch.cat([shared, torch.randn(n, 7, generator=g)], dim=1).double()  # rest unrelated
    plain, std = float(linear_cka(x, y)), float(linear_cka(x, y, standardize=True))
    assert plain > 0.99 and std < 0.3  # plain CKA only sees the loud dimension
    moments = dict(sxx=x.T @ x, syy=y.T @ y, sxy=y.T @ x, sx=x.sum(0), sy=y.sum(0), n=n)
    assert float(cka_from_moments(**moments, standardize=True)) == pytest.approx(std, rel=1e-10)
    share = float(top_feature_share_from_moments(x.T @ x, x.sum(0), n))
    var = x.numpy().var(axis=0)
    assert share == pytest.approx(var.max() / var.sum(), rel=1e-10) and share > 0.99
    # per-feature scaling changes plain CKA but not the standardized one
    d = torch.tensor([1e-2, 1.0, 3.0, 0.1, 1.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    assert float(linear_cka(x * d, y)) != pytest.approx(plain, rel=1e-3)
    assert float(linear_cka(x * d, y, standardize=True)) == pytest.approx(std, rel=1e-10)
    # a constant feature (no variance) is dropped, not divided by zero, by both forms
    xc = torch.cat([x, torch.full((n, 1), 0.7, dtype=torch.float64)], 1)
    assert float(linear_cka(xc, y, standardize=True)) == pytest.approx(std, rel=1e-10)
    streamed = cka_from_moments(
        xc.T @ xc, y.T @ y, y.T @ xc, xc.sum(0), y.sum(0), n, standardize=True
    )
    assert float(streamed) == pytest.approx(std, rel=1e-10)


@pytest.mark.parametrize(("n", "d1", "d2"), [(12, 5, 3), (5, 8, 8), (4, 3, 3)])
def test_unbiased_cka_matches_song_formula(n: int, d1: int, d2: int) -> None:
    x, y = _pair(n, d1, d2, seed=5)
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)  # NOT centred
    k, l = xn @ xn.T, yn @ yn.T  # noqa: E741
    expected = _np_hsic1(k, l) / np.sqrt(_np_hsic1(k, k) * _np_hsic1(l, l))
    got = unbiased_cka(x, y)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, abs=1e-10)
    assert float(got) != pytest.approx(float(linear_cka(x, y)), abs=1e-3)  # a different estimator
    assert float(unbiased_cka(x, x)) == pytest.approx(1.0, abs=1e-12)


def test_unbiased_cka_needs_more_than_three_rows() -> None:
    x, y = _pair(3, 4, 4)
    with pytest.raises(
        SftlensError,
        match=r"^unbiased CKA needs more than 3 rows, got 3; use more prompts or linear_cka$",
    ):
        unbiased_cka(x, y)


def test_cosine_and_mean_shift_match_numpy() -> None:
    x, y = _pair(20, 6, 6, seed=6)
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    cos = (xn * yn).sum(1) / (np.linalg.norm(xn, axis=1) * np.linalg.norm(yn, axis=1))
    got = mean_cosine_similarity(x, y)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(cos.mean(), abs=1e-12)
    shift, rel = mean_shift(x, y)
    diff = np.linalg.norm(yn.mean(0) - xn.mean(0))
    assert shift.dtype == torch.float64
    assert float(shift) == pytest.approx(diff, abs=1e-12)
    assert float(rel) == pytest.approx(diff / np.linalg.norm(xn.mean(0)), abs=1e-12)


def test_cosine_of_zero_row_is_zero_and_zero_base_mean_gives_inf() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert float(mean_cosine_similarity(x, torch.tensor([[1.0, 1.0], [2.0, 0.0]]))) == 0.5
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # mean 0
    assert float(mean_shift(x, x + 1.0)[1]) == float("inf")
    assert float(mean_shift(x, x)[1]) == 0.0


def test_standardized_cka_is_free_of_each_features_scale() -> None:
    """z-scoring makes a feature's scale irrelevant, also for a quiet feature next to a loud
    one: the rounding guard compares each feature with its own second moment, not the matrix's."""
    x, y = _pair(50, 4, 3, seed=8)
    x = x.double()
    scaled = x * torch.tensor([1e4, 1e-6, 1.0, 3.0], dtype=torch.float64)
    want = float(linear_cka(x, y, standardize=True))
    assert float(linear_cka(scaled, y, standardize=True)) == pytest.approx(want, rel=1e-9)
    yd = y.double()
    moments = dict(sxx=scaled.T @ scaled, syy=yd.T @ yd, sxy=yd.T @ scaled)
    got = cka_from_moments(**moments, sx=scaled.sum(0), sy=yd.sum(0), n=50, standardize=True)
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_too_few_rows_message_is_whole() -> None:
    with pytest.raises(
        SftlensError,
        match=r"^need at least 2 rows \(tokens or prompts\), got 1; use more inputs$",
    ):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))


def test_mismatched_rows_raise() -> None:
    with pytest.raises(SftlensError, match="same tokens"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(SftlensError, match="width"):
        mean_cosine_similarity(torch.randn(5, 3), torch.randn(5, 4))


def test_docstring_examples() -> None:
    assert doctest.testmod(geometry, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
