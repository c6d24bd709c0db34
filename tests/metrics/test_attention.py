"""Attention entropy and Jensen-Shannon divergence, including padding invariance."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from sftlens.errors import SftlensError
from sftlens.metrics import attention
from sftlens.metrics.attention import (
    attention_entropy,
    attention_entropy_sums,
    attention_js,
    attention_js_sums,
)

H = 2
LENGTHS = (3, 5)


def _probs(shape: tuple[int, ...], rng: np.random.Generator, sharp: float = 2.0) -> np.ndarray:
    logits = sharp * rng.standard_normal(shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sequences(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_probs((H, n, n), rng) for n in LENGTHS]  # unpadded (H, L, L) per prompt


def _np_mean(fn, seqs_p, seqs_q=None) -> np.ndarray:
    """Mean over all queries of all prompts of fn(row) per head."""
    out = np.zeros(H)
    count = 0
    for i, p in enumerate(seqs_p):
        for h in range(H):
            for r in range(p.shape[1]):
                out[h] += fn(p[h, r]) if seqs_q is None else fn(p[h, r], seqs_q[i][h, r])
        count += p.shape[1]
    return out / count


def _pad(seqs: list[np.ndarray], side: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, H, T, T) float32 batch: real rows keep 70% of their mass on real keys (30% of
    garbage on padded keys, removed by renormalisation); padded query rows are NaN."""
    rng = np.random.default_rng(seed)
    t = max(LENGTHS) + 1
    attn = np.full((len(seqs), H, t, t), np.nan)
    mask = np.zeros((len(seqs), t), dtype=bool)
    for b, p in enumerate(seqs):
        n = p.shape[1]
        real = np.arange(t - n, t) if side == "left" else np.arange(n)
        pad = np.setdiff1d(np.arange(t), real)
        mask[b, real] = True
        garbage = _probs((H, n, pad.size), rng)
        attn[b][:, real[:, None], real[None, :]] = 0.7 * p
        attn[b][:, real[:, None], pad[None, :]] = 0.3 * garbage
    return torch.from_numpy(attn).float(), torch.from_numpy(mask)


@pytest.mark.parametrize("m", [1, 3, 6])
def test_uniform_attention_over_m_real_keys_is_log_m(m: int) -> None:
    attn = torch.full((2, 3, 8, 8), 1 / 8)  # uniform over all keys, renormalised over m real ones
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :m] = True
    got = attention_entropy(attn, mask)
    assert got.shape == (3,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), math.log(m), atol=1e-12)


def test_entropy_matches_scipy_without_padding() -> None:
    (p,) = _sequences(0)[1:]
    got = attention_entropy(torch.from_numpy(p).float()[None])
    expected = _np_mean(entropy, [p.astype(np.float32).astype(np.float64)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert not np.allclose(expected[0], expected[1])  # the heads differ: per-head, not pooled


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_entropy_or_js(side: str) -> None:
    seqs_p, seqs_q = _sequences(1), _sequences(2)
    attn_p, mask = _pad(seqs_p, side, seed=3)
    attn_q, _ = _pad(seqs_q, side, seed=4)
    np.testing.assert_allclose(
        attention_entropy(attn_p, mask).numpy(), _np_mean(entropy, seqs_p), atol=1e-5
    )
    expected_js = _np_mean(lambda a, b: jensenshannon(a, b) ** 2, seqs_p, seqs_q)
    np.testing.assert_allclose(attention_js(attn_p, attn_q, mask).numpy(), expected_js, atol=1e-5)
    _, count = attention_entropy_sums(attn_p, mask)
    assert count == sum(LENGTHS)


def test_js_properties() -> None:
    rng = np.random.default_rng(5)
    p = torch.from_numpy(_probs((2, H, 4, 6), rng))
    q = torch.from_numpy(_probs((2, H, 4, 6), rng, sharp=4.0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    qmask = torch.ones(2, 4, dtype=torch.bool)
    js = attention_js(p, q, mask, qmask)
    assert js.dtype == torch.float64
    assert torch.all(js > 0) and torch.all(js <= math.log(2))
    torch.testing.assert_close(js, attention_js(q, p, mask, qmask), rtol=0, atol=1e-15)
    torch.testing.assert_close(attention_js(p, p, mask, qmask), torch.zeros(H, dtype=torch.float64))
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(1, 1, 2, 2)
    assert float(attention_js(disjoint, disjoint.flip(-1))[0]) == pytest.approx(math.log(2))
    s, c = attention_js_sums(p, q, mask, qmask)
    torch.testing.assert_close(s / c, js)


def test_low_precision_input_gives_float64() -> None:
    attn = torch.full((1, 2, 4, 4), 0.25, dtype=torch.bfloat16)
    assert attention_entropy(attn).dtype == torch.float64
    assert attention_js(attn, attn).dtype == torch.float64


def test_bad_inputs_raise() -> None:
    attn = torch.full((1, 2, 3, 4), 0.25)
    with pytest.raises(SftlensError, match="query_mask"):
        attention_entropy(attn)
    with pytest.raises(SftlensError, match="key_mask"):
        attention_entropy(
            attn, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
        )
    with pytest.raises(SftlensError, match="batch, heads"):
        attention_entropy(torch.ones(3, 3))
    with pytest.raises(SftlensError, match="negative"):
        attention_entropy(-torch.ones(1, 1, 2, 2))
    with pytest.raises(SftlensError, match="no real queries"):
        attention_entropy(torch.ones(1, 1, 2, 2), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(SftlensError, match="same batch"):
        attention_js(torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2, 2))


def test_docstring_examples() -> None:
    assert doctest.testmod(attention, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_error_messages_whole() -> None:
    attn = torch.full((1, 2, 3, 3), 1 / 3)
    with pytest.raises(
        SftlensError,
        match=r"^query_mask has shape \(1, 2\) but attention needs \(1, 3\); pass a \(batch, queries\) mask$",
    ):
        attention_entropy(attn, None, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(
        SftlensError,
        match="^attention has negative entries; pass softmax probabilities, not scores$",
    ):
        attention_entropy(-torch.ones(1, 1, 2, 2))
    none = torch.zeros(1, 3, dtype=torch.bool)
    msg = r"^no real queries in this batch; check the attention mask \(1 = real token\)$"
    with pytest.raises(SftlensError, match=msg):
        attention_entropy(attn, none)
    with pytest.raises(SftlensError, match=msg):
        attention_js(attn, attn, none)


def test_query_mask_apart_from_key_mask_against_scipy() -> None:
    """Real queries a strict subset of real keys (fewer queries than keys): each real query's
    row over the real keys, renormalised, averaged over the real queries only."""
    rng = np.random.default_rng(6)
    p, q = _probs((2, H, 5, 5), rng), _probs((2, H, 5, 5), rng, sharp=3.0)
    kmask = np.array([[True, True, True, True, False], [True, True, True, True, True]])
    qmask = np.array([[False, True, False, True, False], [True, False, False, False, True]])

    def rows(a: np.ndarray) -> list[np.ndarray]:  # (H, q_real, k_real) renormalised, per item
        out = []
        for b in range(2):
            r = a[b][:, qmask[b]][:, :, kmask[b]]
            out.append(r / r.sum(-1, keepdims=True))
        return out

    args = (torch.from_numpy(kmask), torch.from_numpy(qmask))
    tp, tq = torch.from_numpy(p), torch.from_numpy(q)
    np.testing.assert_allclose(
        attention_entropy(tp, *args).numpy(), _np_mean(entropy, rows(p)), atol=1e-12
    )
    expected_js = _np_mean(lambda a, b: jensenshannon(a, b) ** 2, rows(p), rows(q))
    np.testing.assert_allclose(attention_js(tp, tq, *args).numpy(), expected_js, atol=1e-12)
    assert attention_entropy_sums(tp, *args)[1] == attention_js_sums(tp, tq, *args)[1] == 4
    # more keys than queries: the count is of queries
    assert attention_entropy_sums(tp[:, :, :2], args[0], args[1][:, :2])[1] == 2
    assert attention_js_sums(tp[:, :, :2], tq[:, :, :2], args[0], args[1][:, :2])[1] == 2


def test_a_query_with_no_mass_on_real_keys_counts_as_zero_entropy() -> None:
    """All of a real query's attention on padded keys: nothing to renormalise, the row stays
    zero (entropy 0) instead of 0/0 = NaN."""
    attn = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]]]])
    kmask = torch.tensor([[True, True, False]])
    qmask = torch.tensor([[True, True, False]])
    got = attention_entropy(attn, kmask, qmask)
    assert float(got[0]) == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert float(attention_js(attn, attn, kmask, qmask)[0]) == 0.0


def test_js_of_a_single_real_query() -> None:
    p = torch.tensor([1.0, 0.0]).expand(1, 1, 1, 2)
    one = torch.ones(1, 1, dtype=torch.bool)
    js = attention_js(p, p.flip(-1), torch.ones(1, 2, dtype=torch.bool), one)
    assert float(js[0]) == pytest.approx(math.log(2), abs=1e-12)
