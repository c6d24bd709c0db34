"""Layer selections (``--mask``): depth-block masks, layer lists, depth ranges; bad input is a
one-line error listing the allowed forms."""

from __future__ import annotations

from fractions import Fraction

import pytest

from sftlens.errors import SftlensError
from sftlens.layers import (
    SELECTION_FORMS,
    depth_blocks,
    layer_ranges,
    mask_layers,
    parse_layer_selection,
)


@pytest.mark.parametrize(
    ("text", "num_layers", "kind", "layers", "described"),
    [
        ("01100", 30, "mask", range(6, 18), "01100 -> layers 6-17 of 30"),
        ("10000", 30, "mask", range(6), "10000 -> layers 0-5 of 30"),  # leftmost = bottom
        ("00001", 30, "mask", range(24, 30), "00001 -> layers 24-29 of 30"),
        ("10001", 30, "mask", [*range(6), *range(24, 30)], "10001 -> layers 0-5, 24-29 of 30"),
        ("0110", 10, "mask", range(2, 7), "0110 -> layers 2-6 of 10"),  # any K
        ("1", 7, "mask", range(7), "1 -> layers 0-6 of 7"),  # K = 1: every layer
        ("3,4,5", 30, "layers", [3, 4, 5], "3,4,5 -> layers 3-5 of 30"),
        (" 9, 2 ", 30, "layers", [2, 9], "9,2 -> layers 2, 9 of 30"),  # sorted, spaces dropped
        ("6:18", 30, "layers", range(6, 18), "6:18 -> layers 6-17 of 30"),
        ("10:11", 30, "layers", [10], "10:11 -> layers 10 of 30"),  # one layer named 10
        ("0.2-0.8", 30, "depth", range(6, 24), "0.2-0.8 -> layers 6-23 of 30"),
        ("0.2-0.8", 10, "depth", range(2, 8), "0.2-0.8 -> layers 2-7 of 10"),
        (".5-1", 7, "depth", range(3, 7), ".5-1 -> layers 3-6 of 7"),  # floor(3.5) = 3
        ("0-1", 5, "depth", range(5), "0-1 -> layers 0-4 of 5"),
        ("0.29-0.3", 100, "depth", [29], "0.29-0.3 -> layers 29 of 100"),  # exact decimals
        ("1/3-2/3", 12, "depth", range(4, 8), "1/3-2/3 -> layers 4-7 of 12"),
    ],
)
def test_good_selections(text, num_layers, kind, layers, described):
    sel = parse_layer_selection(text, num_layers)
    assert sel.kind == kind and sel.layers == tuple(layers) and sel.describe() == described
    assert parse_layer_selection(text, None).kind == kind  # syntax alone, before L is known


@pytest.mark.parametrize("num_layers", [5, 7, 12, 26, 30, 31])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_a_depth_range_of_block_bounds_is_that_block(num_layers, k):
    """``k/K-(k+1)/K`` selects exactly depth block ``k``: one half-open convention for both."""
    for b, block in enumerate(depth_blocks(num_layers, k)):
        sel = parse_layer_selection(f"{Fraction(b, k)}-{Fraction(b + 1, k)}", num_layers)
        assert sel.layers == tuple(block.layers)
        if k in (2, 5):  # exact as decimals too
            assert parse_layer_selection(f"{b / k}-{(b + 1) / k}", num_layers).layers == sel.layers
        assert parse_layer_selection(block.mask, num_layers).layers == tuple(
            mask_layers(block.mask, num_layers)
        )


@pytest.mark.parametrize(
    ("text", "num_layers", "num_blocks", "why"),
    [
        ("", 30, None, "is empty"),
        ("   ", 30, None, "is empty"),
        ("00000", 30, None, "selects no block"),
        ("0110", 30, 5, "has 4 blocks, not the K=5 expected"),
        ("0120", 30, None, "is malformed: a mask holds only 0 and 1"),
        ("01a00", 30, None, "is malformed"),
        ("3,,4", 30, None, "is malformed at ''"),
        ("3;4", 30, None, "is malformed"),
        ("-1", 30, None, "is malformed"),
        ("3,30", 30, None, "names layer 30, but the model has layers 0..29"),
        ("25:31", 30, None, "names layer 30"),
        ("5:5", 30, None, "empty or reversed span '5:5'"),
        ("6:2", 30, None, "empty or reversed span"),
        ("3,3", 30, None, "lists a layer twice at '3'"),
        ("2:5,4", 30, None, "lists a layer twice"),
        ("0.8-0.2", 30, None, "is not a depth range 0 <= a < b <= 1"),
        ("3-5", 30, None, "for layers write 3,4,5 or 3:6"),
        ("0.5-1.5", 30, None, "is not a depth range"),
        ("0.0-0.01", 30, None, "holds no layer of a model of 30 layers"),
        ("auto", 30, None, "write --mask auto --from RUN_DIR"),
        ("1/0-1", 30, None, "divides by zero"),
    ],
)
def test_bad_selections_are_one_line_errors_with_the_allowed_forms(
    text, num_layers, num_blocks, why
):
    with pytest.raises(SftlensError) as info:
        parse_layer_selection(text, num_layers, num_blocks)
    message = str(info.value)
    assert why in message and SELECTION_FORMS in message and "\n" not in message


def test_masks_longer_than_the_model_is_deep_are_refused():
    with pytest.raises(SftlensError, match="do not fit a model of 5 layers"):
        parse_layer_selection("1010101", 5)


def test_layer_ranges():
    assert layer_ranges([]) == "" and layer_ranges([4]) == "4"
    assert layer_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
