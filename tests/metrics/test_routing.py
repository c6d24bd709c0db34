"""Routing metrics against scipy / exact counts, and their errors matched whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

from sftlens.errors import SftlensError
from sftlens.metrics.accumulators import RoutingStats
from sftlens.metrics.routing import expert_counts, route_js, routing_sums, token_js


def _scipy_js(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of JS (natural log) between softmax(a) and softmax(b), float64."""
    return float(
        np.mean([jensenshannon(p, q) ** 2 for p, q in zip(softmax(a, -1), softmax(b, -1))])
    )


def test_route_js_of_a_padded_batch_uses_only_the_real_tokens_of_both_models() -> None:
    g = torch.Generator().manual_seed(3)
    base, sft = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    # padding rows made extreme, so counting them would move the mean a lot
    base[mask == 0], sft[mask == 0] = 40.0 * torch.eye(5)[0], 40.0 * torch.eye(5)[4]
    real = mask.bool().numpy()
    want = _scipy_js(base.double().numpy()[real], sft.double().numpy()[real])
    assert route_js(base, sft, mask) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_route_js_of_one_real_token() -> None:
    g = torch.Generator().manual_seed(4)
    base, sft = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    mask = torch.tensor([[0, 0, 1]])
    want = _scipy_js(base[0, 2:].double().numpy(), sft[0, 2:].double().numpy())
    assert want > 1e-3
    assert route_js(base, sft, mask) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_route_js_without_real_tokens_says_to_check_the_mask() -> None:
    z = torch.randn(2, 3, 4)
    with pytest.raises(
        SftlensError, match=r"^no real tokens; check the attention mask \(1 = real token\)$"
    ):
        route_js(z, z, torch.zeros(2, 3, dtype=torch.long))


def test_token_js_of_float32_logits_is_computed_in_float64() -> None:
    """Nearly equal routers: the JS (~1e-8) is below float32's resolution of log-probabilities."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, generator=g)
    sft = base + 1e-3 * torch.randn(6, 8, generator=g)
    assert base.dtype == sft.dtype == torch.float32
    got = token_js(base, sft)
    assert got.dtype == torch.float64
    want = [
        jensenshannon(p, q) ** 2
        for p, q in zip(softmax(base.double().numpy(), -1), softmax(sft.double().numpy(), -1))
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)


def test_a_batch_without_mask_counts_every_token() -> None:
    g = torch.Generator().manual_seed(6)
    base, sft = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    flat_b, flat_s = base.reshape(6, 4), sft.reshape(6, 4)
    assert route_js(base, sft) == pytest.approx(route_js(flat_b, flat_s), rel=1e-12)
    js, cb, cs, n = routing_sums(base, sft, 2)
    assert n == 6 and float(cb.sum()) == float(cs.sum()) == 12.0
    assert torch.equal(cb, expert_counts(flat_b.double(), 2))
    assert float(js) == pytest.approx(
        _scipy_js(flat_b.double().numpy(), flat_s.double().numpy()) * 6
    )


def test_a_batch_without_mask_builds_its_mask_on_the_logits_device() -> None:
    """The all-real mask is made where the logits are, not on torch's default device."""
    g = torch.Generator().manual_seed(6)
    base, sft = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    want = routing_sums(base, sft, 2)
    with torch.device("meta"):  # any default but the logits' (CPU) device
        got = routing_sums(base, sft, 2)
    assert got[3] == want[3] == 6 and all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


def test_router_logit_shape_errors_are_whole_messages() -> None:
    z3, z2 = torch.randn(2, 3, 4), torch.randn(6, 4)
    with pytest.raises(
        SftlensError,
        match=r"^mask has shape \(2, 2\) but router logits need \(2, 3\); pass the batch's "
        r"attention_mask$",
    ):
        route_js(z3, z3, torch.ones(2, 2))
    shape_msg = (
        r"^router logits must be \(batch, tokens, experts\) with a mask or \(tokens, experts\) "
        r"without, got shape {}$"
    )
    with pytest.raises(SftlensError, match=shape_msg.format(r"\(6, 4\)")):
        route_js(z2, z2, torch.ones(6))  # (N, E) holds real tokens only: a mask is a mistake
    with pytest.raises(SftlensError, match=shape_msg.format(r"\(1, 2, 3, 4\)")):
        route_js(z3[None], z3[None])
    with pytest.raises(
        SftlensError,
        match=r"^base router logits \(2, 3, 4\) and sft \(6, 4\) differ; run both models on "
        r"the same batch$",
    ):
        routing_sums(z3, z2, 1)


def test_expert_counts_take_any_k_from_1_to_all_experts() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]], dtype=torch.float64)
    assert expert_counts(logits, 1).tolist() == [1.0, 1.0, 0.0]
    assert expert_counts(logits, 3).tolist() == [2.0, 2.0, 2.0]
    for k in (0, 4):
        with pytest.raises(
            SftlensError, match=rf"^top_k={k} does not fit 3 experts; pass 1 <= k <= 3$"
        ):
            expert_counts(logits, k)


def test_routing_stats_state_lives_on_its_device_and_checks_the_expert_count() -> None:
    acc = RoutingStats(4, 2, device="meta")  # any device but the CPU default
    assert all(getattr(acc, n).device == torch.device("meta") for n in RoutingStats._state)
    with pytest.raises(
        SftlensError,
        match=r"^expected router logits over 4 experts, got \(2, 3, 5\); build RoutingStats "
        r"with the model's expert count$",
    ):
        RoutingStats(4, 2).update(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
