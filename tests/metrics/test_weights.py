"""The weight-space distances of ``sftlens.metrics.weights`` on hand-made tensors.

``tests/test_weight_diff.py`` checks every ``dw_*`` row of real checkpoints; these are the edges
of the pure functions: float64 sums, the shape error, a zero base, and the LoRA delta norm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sftlens.metrics.weights import (
    frobenius_sq,
    frobenius_sq_diff,
    lora_delta_norm,
    relative_change,
)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"^shape mismatch: \(2, 3\) vs \(3, 2\)$"):
        frobenius_sq_diff(torch.zeros(2, 3), torch.zeros(3, 2))


def test_squares_are_summed_in_float64():
    # 1e4^2 + 1 = 100000001 needs 27 bits: a float32 sum gives 1e8
    a = torch.tensor([1e4, 1.0])
    assert frobenius_sq(a) == 100000001.0
    assert frobenius_sq_diff(a, torch.zeros(2)) == 100000001.0
    # a float64 tensor is not rounded to float32 on the way (1 + 2^-30 is 1.0 in float32)
    x = 1 + 2**-30
    b = torch.tensor([x], dtype=torch.float64)
    assert frobenius_sq(b) == x * x
    assert frobenius_sq_diff(b, torch.zeros(1, dtype=torch.float64)) == x * x


def test_relative_change_of_a_zero_base_is_nan():
    assert relative_change(9.0, 4.0) == 1.5
    assert math.isnan(relative_change(4.0, 0.0))
    assert math.isnan(relative_change(0.0, 0.0))


def test_lora_delta_norm_is_the_norm_of_the_scaled_product():
    gen = torch.Generator().manual_seed(0)
    a = 0.3 * torch.randn(3, 7, generator=gen)  # (r, in)
    b = 0.3 * torch.randn(5, 3, generator=gen)  # (out, r)
    want = np.linalg.norm(-0.5 * (b.double().numpy() @ a.double().numpy()))
    assert want < 1  # small enough that a floor of 1 under the square root would show
    assert lora_delta_norm(a, b, -0.5) == pytest.approx(want, rel=1e-12)
    assert lora_delta_norm(a, b, 2.0) == pytest.approx(4 * want, rel=1e-12)
    assert lora_delta_norm(torch.zeros(3, 7), b, 2.0) == 0.0  # B A = 0 (a fresh LoRA)


def test_sums_over_several_chunks_count_every_element_once():
    """More elements than one chunk (2^20), with a partial last chunk: each counted once."""
    n = (1 << 20) * 2 + 12348  # a multiple of 5, not of 2^20
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    a64, b64 = a.double().numpy(), b.double().numpy()
    assert frobenius_sq(a.reshape(-1, 5)) == pytest.approx(float(a64 @ a64), rel=1e-12)
    d = (a - b).double().numpy()  # the difference is taken in float32, as documented
    assert np.abs(d - (a64 - b64)).max() > 0  # (not exact here: a and b differ by more than 2x)
    want = float(d @ d)
    assert frobenius_sq_diff(a.reshape(-1, 5), b.reshape(-1, 5)) == pytest.approx(want, rel=1e-12)


def test_half_precision_weights_are_subtracted_in_float32():
    """256 - (1 + 2^-7) = 254.9921875 needs 15 bits: exact in float32, rounded in bfloat16."""
    a, b = (
        torch.tensor([256.0], dtype=torch.bfloat16),
        torch.tensor([1 + 2**-7], dtype=torch.bfloat16),
    )
    assert float(b) == 1 + 2**-7
    assert frobenius_sq_diff(a, b) == 254.9921875**2
    assert frobenius_sq_diff(a.half(), b.half()) == 254.9921875**2
