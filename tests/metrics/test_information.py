"""Matrix entropy and effective rank against independent numpy/scipy computations."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import ortho_group

from sftlens.errors import SftlensError
from sftlens.metrics import information
from sftlens.metrics.information import (
    alpha_entropy_from_eigenvalues,
    dataset_entropy,
    effective_rank,
    gram_eigenvalues,
    gram_spectrum,
    masked_gram,
    matrix_entropy,
    normalize_rows,
    paper_dataset_eigenvalues,
)


def _rand(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)  # float32, anisotropic


def _np_prepare(z: np.ndarray, center: bool) -> np.ndarray:
    z = z.astype(np.float64)
    if center:
        z = z - z.mean(axis=0)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


def _np_spectrum(z: np.ndarray, center: bool, ridge: float = 0.0, scale_by_d: bool = False):
    zn = _np_prepare(z, center)
    g = zn @ zn.T  # always the n x n Gram here
    if scale_by_d:
        g = g / zn.shape[1]
    g = g + ridge * np.eye(zn.shape[0])
    lam = np.sort(np.linalg.eigvalsh(g))[::-1]
    if not scale_by_d:  # no ridge in these calls: zero out rounding noise (matrix_rank's tolerance)
        lam[lam <= min(zn.shape) * np.finfo(np.float64).eps * lam[0]] = 0.0
    return lam / lam.sum()


def _np_entropy(lam: np.ndarray, alpha: float) -> float:
    lam = lam[lam > 0] / lam.sum()
    if alpha == 1.0:
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam**alpha).sum()) / (1.0 - alpha))


def test_normalize_rows_matches_numpy_and_keeps_zero_rows() -> None:
    z = _rand(7, 5)
    z[3] = 0.0
    out = normalize_rows(z)
    assert out.dtype == torch.float64 and out.shape == (7, 5)
    np.testing.assert_allclose(out.numpy(), _np_prepare(z.numpy(), True), atol=1e-12)
    raw = normalize_rows(z, center=False)
    assert torch.all(raw[3] == 0)
    np.testing.assert_allclose(torch.linalg.norm(raw[[0, 1, 2, 4, 5, 6]], dim=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(("n", "d"), [(6, 9), (12, 4)])
def test_gram_eigenvalues_match_numpy(n: int, d: int) -> None:
    z = _rand(n, d, seed=n)
    lam = gram_eigenvalues(z)
    assert lam.dtype == torch.float64 and lam.numel() == min(n, d)
    assert torch.all(lam >= 0) and abs(float(lam.sum()) - 1.0) < 1e-12
    expected = _np_spectrum(z.numpy(), center=True)[: min(n, d)]
    np.testing.assert_allclose(lam.numpy(), expected, atol=1e-12)


def test_gram_ridge_and_scale_by_d_use_the_n_by_n_gram() -> None:
    z = _rand(8, 3, seed=1)  # n > d: the ridge lifts the n - d null directions
    lam = gram_eigenvalues(z, center=False, ridge=0.05, scale_by_d=True)
    expected = _np_spectrum(z.numpy(), center=False, ridge=0.05, scale_by_d=True)
    assert lam.numel() == 8
    np.testing.assert_allclose(lam.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize(("n", "d"), [(5, 9), (11, 4)])
def test_matrix_entropy_matches_numpy(alpha: float, n: int, d: int) -> None:
    z = _rand(n, d, seed=3)
    got = matrix_entropy(z, alpha)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_np_entropy(_np_spectrum(z.numpy(), True), alpha), abs=1e-10)
    paper = _np_entropy(_np_spectrum(z.numpy(), False, 1e-6, True), alpha)
    assert float(matrix_entropy(z, alpha, preset="paper")) == pytest.approx(paper, abs=1e-10)
    norm = matrix_entropy(z, alpha, normalized=True)
    assert float(norm) == pytest.approx(float(got) / math.log(min(n, d)), abs=1e-12)


def _np_paper_dataset_spectrum(z: np.ndarray) -> np.ndarray:
    """The paper code's dataset-entropy spectrum, written out in numpy float64."""
    zn = _np_prepare(z, center=False)  # rows L2-normalised, not centred
    n, d = zn.shape
    if n > d:  # squared singular values: no /d, no ridge
        lam = np.linalg.svd(zn, compute_uv=False) ** 2
    else:  # ridged Gram G/d + 1e-6 I (n x n)
        lam = np.linalg.eigvalsh(zn @ zn.T / d + 1e-6 * np.eye(n))
    return lam / lam.sum()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("n", "d"), [(11, 4), (40, 32), (4, 11), (32, 32)])  # n > d; n <= d
def test_paper_dataset_entropy_branches_match_numpy(alpha: float, n: int, d: int) -> None:
    z = _rand(n, d, seed=n * d) + 0.5  # not centred by the paper preset: an offset matters
    want = _np_entropy(_np_paper_dataset_spectrum(z.numpy()), alpha)
    got = dataset_entropy(z, alpha, preset="paper")
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)
    norm = dataset_entropy(z, alpha, preset="paper", normalized=True)
    assert float(norm) == pytest.approx(want / math.log(min(n, d)), rel=1e-10, abs=1e-12)
    # the branches really differ: with n > d the ridge would lift n - d null directions
    ridged = _np_entropy(_np_spectrum(z.numpy(), False, 1e-6, True), alpha)
    if n > d:
        assert abs(float(got) - ridged) > 1e-7
    else:
        assert float(got) == pytest.approx(ridged, rel=1e-10)
    assert float(dataset_entropy(z, alpha)) == pytest.approx(float(matrix_entropy(z, alpha)))


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0, math.inf])
def test_uniform_spectrum_has_entropy_log_n(alpha: float) -> None:
    assert float(alpha_entropy_from_eigenvalues(torch.ones(7), alpha)) == pytest.approx(math.log(7))
    m = 5
    q = torch.from_numpy(ortho_group.rvs(m, random_state=0))
    z = torch.cat([q, -q])  # centred already; 2m rows on m orthogonal directions: uniform spectrum
    assert float(matrix_entropy(z, alpha)) == pytest.approx(math.log(m), abs=1e-10)
    assert float(matrix_entropy(z, alpha, normalized=True)) == pytest.approx(1.0, abs=1e-10)


def test_alpha_entropy_continuous_at_one_and_decreasing() -> None:
    lam = gram_eigenvalues(_rand(9, 6, seed=4))
    s1 = float(alpha_entropy_from_eigenvalues(lam, 1.0))
    for a in (1 - 1e-6, 1 + 1e-6):
        assert abs(float(alpha_entropy_from_eigenvalues(lam, a)) - s1) < 1e-5
    values = [float(alpha_entropy_from_eigenvalues(lam, a)) for a in (0.5, 1.0, 2.0, math.inf)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(-math.log(float(lam.max())))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_alpha_must_be_positive(alpha: float) -> None:
    with pytest.raises(SftlensError, match="alpha"):
        alpha_entropy_from_eigenvalues(torch.ones(3), alpha)
    with pytest.raises(SftlensError, match="alpha"):
        matrix_entropy(_rand(4, 3), alpha)


def test_bad_inputs_raise() -> None:
    with pytest.raises(SftlensError, match="matrix"):
        matrix_entropy(torch.ones(5))
    with pytest.raises(SftlensError, match="NaN"):
        matrix_entropy(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(SftlensError, match="preset"):
        matrix_entropy(_rand(4, 3), preset="other")  # type: ignore[arg-type]
    with pytest.raises(SftlensError, match=">= 0"):
        alpha_entropy_from_eigenvalues(torch.tensor([0.5, -0.1]))


def test_degenerate_sizes() -> None:
    assert float(matrix_entropy(_rand(6, 1), normalized=True)) == 0.0  # min(n, d) == 1
    assert float(matrix_entropy(_rand(1, 4))) == 0.0  # one row: no spread after centring
    assert float(effective_rank(torch.ones(4, 3))) == 0.0  # zero after centring


@pytest.mark.parametrize(("n", "d"), [(10, 4), (4, 10), (7, 7)])
def test_effective_rank_matches_scipy_and_is_bounded(n: int, d: int) -> None:
    z = _rand(n, d, seed=n + d) + 5.0
    x = z.numpy().astype(np.float64)
    sigma = scipy.linalg.svdvals(x - x.mean(axis=0))
    for variant, w in (("roy_vetterli", sigma), ("sigma2", sigma**2)):
        p = w / w.sum()
        expected = math.exp(-(p * np.log(p)).sum())
        got = effective_rank(z, variant=variant)  # type: ignore[arg-type]
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(expected, rel=1e-10)
        assert 1.0 <= float(got) <= min(n, d)


@pytest.mark.parametrize("variant", ["roy_vetterli", "sigma2"])
def test_effective_rank_of_orthonormal_rows_is_their_rank(variant: str) -> None:
    q = torch.from_numpy(ortho_group.rvs(8, random_state=1))[:3]  # 3 orthonormal rows in R^8
    assert float(effective_rank(q, variant=variant, center=False)) == pytest.approx(3.0)  # type: ignore[arg-type]
    assert float(effective_rank(torch.cat([q, -q]), variant=variant)) == pytest.approx(3.0)  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    assert doctest.testmod(information, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_paper_dataset_spectrum_of_zero_rows_is_degenerate() -> None:
    """n > d rows all zero: no spread, the spectrum [1, 0, ...] (entropy 0), not 0/0 = NaN."""
    got = paper_dataset_eigenvalues(torch.zeros(5, 3))
    assert got.dtype == torch.float64
    assert got.tolist() == [1.0, 0.0, 0.0]
    assert float(dataset_entropy(torch.zeros(5, 3), preset="paper")) == 0.0


def test_unknown_effective_rank_variant_message() -> None:
    with pytest.raises(
        SftlensError,
        match="^unknown effective-rank variant 'other'; use 'roy_vetterli' or 'sigma2'$",
    ):
        effective_rank(_rand(4, 3), variant="other")  # type: ignore[arg-type]


def test_paper_dataset_spectrum_of_zero_rows_stays_on_their_device() -> None:
    """The degenerate spectrum is built on the rows' device, not torch's default device."""
    with torch.device("meta"):  # any default but the rows' (CPU) device
        got = paper_dataset_eigenvalues(torch.zeros(5, 3, device="cpu"))
    assert got.device == torch.device("cpu")
    assert got.tolist() == [1.0, 0.0, 0.0]


def test_masked_gram_moves_the_mask_to_the_rows_device() -> None:
    """A mask kept on the host (as tokenizers return it) with rows on another device: the Grams
    are built on the rows' device. meta stands in for an accelerator (shapes only)."""
    z = torch.randn(2, 3, 4, device="meta")
    mask = torch.tensor([[True, True, False], [True, True, True]])
    gram = masked_gram(z, mask)
    assert gram.device == z.device and tuple(gram.shape) == (2, 3, 3)
    assert gram.dtype == torch.float64


def test_error_messages_whole() -> None:
    """Each input error of the information metrics, matched whole (anchored)."""
    cases = [
        (
            lambda: matrix_entropy([[1.0]]),  # type: ignore[arg-type]
            r"z must be a torch\.Tensor, got list; convert it with torch\.as_tensor",
        ),
        (
            lambda: matrix_entropy(torch.ones(5)),
            r"z must be a non-empty \(n, d\) matrix, got shape \(5,\); flatten tokens to rows first",
        ),
        (
            lambda: matrix_entropy(torch.tensor([[1.0, float("inf")], [0.0, 1.0]])),
            r"z contains NaN or inf; run the model in float32/bfloat16 instead of float16 or check "
            r"its inputs",
        ),
        (
            lambda: alpha_entropy_from_eigenvalues(torch.ones(2), 0.0),
            r"alpha must be > 0, got 0\.0; use alpha=1 \(Shannon/von Neumann\) or e\.g\. 2",
        ),
        (
            lambda: alpha_entropy_from_eigenvalues(torch.tensor([0.5, -0.1])),
            r"eigenvalues must be finite and >= 0; clamp tiny negatives to 0 first "
            r"\(gram_eigenvalues does\)",
        ),
        (
            lambda: alpha_entropy_from_eigenvalues(torch.zeros(3)),
            r"eigenvalues sum to 0, so there is no distribution; pass a non-zero spectrum",
        ),
        (
            lambda: matrix_entropy(_rand(4, 3), preset="other"),  # type: ignore[arg-type]
            r"unknown entropy preset 'other'; use 'default' or 'paper'",
        ),
        (
            lambda: dataset_entropy(_rand(4, 3), preset="other"),  # type: ignore[arg-type]
            r"unknown entropy preset 'other'; use 'default' or 'paper'",
        ),
        (
            lambda: masked_gram(torch.ones(1, 2, 2), torch.ones(1, 2), ridge=-1e-3),
            r"ridge must be >= 0, got -0\.001; use 0 \(default\) or a small value like 1e-6",
        ),
    ]
    for call, message in cases:
        with pytest.raises(SftlensError, match=f"^{message}$"):
            call()


def _np_masked_gram(z, mask, *, center=True, ridge=0.0, scale_by_d=False) -> np.ndarray:
    """masked_gram's definition, prompt by prompt in numpy float64: real rows (centred over the
    real rows), each scaled to norm 1, padding rows 0; the n x n Gram unless T > d without ridge."""
    out = []
    _, t, d = z.shape
    for zb, mb in zip(z.astype(np.float64), mask, strict=True):
        zb = np.where(mb[:, None], zb, 0.0)
        if center and mb.any():
            zb = np.where(mb[:, None], zb - zb[mb].mean(0), 0.0)
        norms = np.linalg.norm(zb, axis=1, keepdims=True)
        zb = zb / np.where(norms > 0, norms, 1.0)
        g = zb @ zb.T if (t <= d or ridge > 0) else zb.T @ zb
        g = g / d if scale_by_d else g
        out.append(g + ridge * np.diag(mb.astype(np.float64)) if ridge > 0 else g)
    return np.stack(out)


@pytest.mark.parametrize(("t", "d"), [(4, 6), (6, 3)])  # the n x n and the d x d side
def test_masked_gram_matches_numpy(t: int, d: int) -> None:
    g = torch.Generator().manual_seed(8)
    z = 0.1 * torch.randn(3, t, d, generator=g) + 0.05  # rows of norm < 1, an offset
    mask = torch.zeros(3, t, dtype=torch.bool)
    mask[0], mask[1, 2], mask[2, 1:3] = True, True, True  # all real; one token; two tokens
    z[~mask] = float("nan")  # junk in padding must not leak in
    zn, mn = z.numpy(), mask.numpy()
    cases = [
        ({}, {}),  # the defaults: centred, no ridge, no scaling
        ({"center": False}, {"center": False}),
        (
            {"center": False, "ridge": 1e-6, "scale_by_d": True},
            {"center": False, "ridge": 1e-6, "scale_by_d": True},
        ),
        ({"ridge": 1e-3}, {"ridge": 1e-3}),
    ]
    for kwargs, np_kwargs in cases:
        got = masked_gram(z, mask, **kwargs)
        want = _np_masked_gram(zn, mn, **np_kwargs)
        assert got.dtype == torch.float64
        assert tuple(got.shape) == want.shape, kwargs
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14, err_msg=str(kwargs))
    m = 3 if t > d else t
    assert tuple(masked_gram(z, mask).shape) == (3, m, m)  # (B, min(T, d), ...) without ridge


def test_masked_gram_ridge_is_exact_on_a_zero_real_row() -> None:
    z = torch.zeros(1, 2, 3)
    z[0, 0] = torch.tensor([1.0, 2.0, 2.0])  # row 1 is real but all zero: no direction
    mask = torch.ones(1, 2, dtype=torch.long)  # an HF attention_mask
    got = masked_gram(z, mask, center=False, ridge=1e-6)
    assert got[0, 1, 1].item() == 1e-6  # exactly the float64 ridge
    assert got[0, 0, 0].item() == pytest.approx(1.0 + 1e-6, abs=1e-15)


def test_gram_spectrum_is_descending_trace_normalised_with_noise_zeroed() -> None:
    eps = torch.finfo(torch.float64).eps
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5))
    psd = a @ a.T
    grams = torch.tensor(
        np.stack(
            [
                np.diag([1.0, 3 * eps, 0.0]),  # 3 eps = m eps * largest: noise, not kept
                np.diag([1e-3, 1e-17, 0.0]),  # above m eps * largest: kept
                np.diag([0.25, 0.0, 0.5]),  # trace below 1
                np.zeros((3, 3)),  # no spread: [1, 0, 0]
                psd,
                np.diag([1.0, 4 * eps, 0.0]),  # above m eps (m = 3, not the batch of 6): kept
            ]
        )
    )
    got = gram_spectrum(grams)
    assert got.dtype == torch.float64 and got.shape == (6, 3)
    assert got[5].tolist() == [1 / (1 + 4 * eps), 4 * eps / (1 + 4 * eps), 0.0]
    assert got[0].tolist() == [1.0, 0.0, 0.0]
    assert got[1].tolist() == [1e-3 / (1e-3 + 1e-17), 1e-17 / (1e-3 + 1e-17), 0.0]
    assert got[2].tolist() == [2 / 3, 1 / 3, 0.0]
    assert got[3].tolist() == [1.0, 0.0, 0.0]
    lam = np.sort(np.linalg.eigvalsh(psd))[::-1]
    np.testing.assert_allclose(got[4].numpy(), lam / lam.sum(), rtol=1e-12, atol=1e-15)
