"""route_js against scipy on padded batches, and its errors (issue #7 survivors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

from sftlens.errors import SftlensError
from sftlens.metrics.routing import route_js


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
