"""Depth blocks, masks, spans and alphas (sftlens.layers) against the SPEC formulas."""

from __future__ import annotations

import math

import pytest

from sftlens.config import InterpolateConfig, SwapConfig
from sftlens.errors import SftlensError
from sftlens.layers import (
    Span,
    block_bounds,
    depth_blocks,
    mask_layers,
    parse_alphas,
    parse_spans,
)


@pytest.mark.parametrize("num_layers", [1, 2, 5, 7, 12, 26, 30, 31])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_depth_blocks_follow_spec_floor_formula_and_partition_the_layers(num_layers, k):
    if k > num_layers:
        with pytest.raises(SftlensError, match="do not fit"):
            depth_blocks(num_layers, k)
        return
    blocks = depth_blocks(num_layers, k)
    assert len(blocks) == k
    for i, b in enumerate(blocks):
        # SPEC: block k holds layers floor(k*L/K) .. floor((k+1)*L/K) - 1
        assert b.layers == list(
            range(math.floor(i * num_layers / k), math.floor((i + 1) * num_layers / k))
        )
        assert b.mask == "".join("1" if j == i else "0" for j in range(k))
        assert (b.first, b.last) == (b.layers[0], b.layers[-1])
        assert b.name == f"{b.start}:{b.stop}" and b.layers
    assert [layer for b in blocks for layer in b.layers] == list(range(num_layers))


def test_fifths_of_30_layers_and_relative_depth():
    blocks = depth_blocks(30, 5)
    assert [b.name for b in blocks] == ["0:6", "6:12", "12:18", "18:24", "24:30"]
    assert [b.mask for b in blocks] == ["10000", "01000", "00100", "00010", "00001"]
    assert blocks[1].depth(30) == pytest.approx((0.2, 0.4))
    assert block_bounds(4, 30, 5) == (24, 30)


@pytest.mark.parametrize("num_layers", [5, 10, 30, 31])
def test_mask_layers_is_the_union_of_the_blocks_it_selects(num_layers):
    blocks = depth_blocks(num_layers, 5)
    for bits in range(1, 32):
        mask = format(bits, "05b")
        expected = [layer for b, c in zip(blocks, mask) if c == "1" for layer in b.layers]
        assert mask_layers(mask, num_layers) == expected
    assert mask_layers("10000", 30) == list(range(6))  # leftmost = bottom
    assert mask_layers("01110", 30) == list(range(6, 24))
    assert mask_layers("11111", 30) == list(range(30))


@pytest.mark.parametrize(
    ("mask", "match"), [("", "0/1"), ("01a10", "0/1"), ("0 110", "0/1"), ("1" * 31, "do not fit")]
)
def test_bad_masks_are_one_line_errors(mask, match):
    with pytest.raises(SftlensError, match=match) as e:
        mask_layers(mask, 30)
    assert "\n" not in str(e.value)


def test_parse_spans_good():
    assert parse_spans("0:6,24:30", 30) == [Span(0, 6), Span(24, 30)]
    assert parse_spans(" 0 : 6 , 29:30 ", 30) == [Span(0, 6), Span(29, 30)]
    assert parse_spans("", 30) == [] and parse_spans("  ", 30) == []
    assert parse_spans("5:40", None) == [Span(5, 40)]  # range unchecked without L
    assert parse_spans("3:5", 5)[0].layers == [3, 4]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("3:3", "is empty"),
        ("6:0", "is reversed; write it as 0:6"),
        ("0:31", "out of range for a model of 30 layers"),
        ("30:31", "out of range"),
        ("a:b", "malformed"),
        ("3", "malformed"),
        ("1:2:3", "malformed"),
        ("-1:2", "malformed"),
        ("0:6,,7:8", "malformed"),
        ("0:6,", "malformed"),
        ("0.5:2", "malformed"),
        ("0:6,0:6", "listed twice"),
    ],
)
def test_parse_spans_bad_is_one_line_naming_the_problem(text, match):
    with pytest.raises(SftlensError, match=match) as e:
        parse_spans(text, 30)
    assert "\n" not in str(e.value)


def test_parse_alphas():
    assert parse_alphas("0,0.25,0.5,0.75,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas(" 1 , -0.5,1.5") == [1.0, -0.5, 1.5]  # extrapolation allowed
    for bad, match in [("", "not a number"), ("0,x", "not a number"), ("nan", "not finite")]:
        with pytest.raises(SftlensError, match=match):
            parse_alphas(bad)
    with pytest.raises(SftlensError, match="listed twice"):
        parse_alphas("0,0.0")


def test_configs_check_spans_alphas_and_that_something_is_selected():
    SwapConfig(base="b", sft="s", spans="0:2")
    with pytest.raises(SftlensError, match="nothing to swap"):
        SwapConfig(base="b", sft="s", blocks=0)
    with pytest.raises(SftlensError, match="reversed"):
        SwapConfig(base="b", sft="s", spans="4:2")
    with pytest.raises(SftlensError, match="not a number"):
        InterpolateConfig(base="b", sft="s", alphas="0,half")
    with pytest.raises(SftlensError, match="nothing to interpolate"):
        InterpolateConfig(base="b", sft="s", all_layers=False)
    InterpolateConfig(base="b", sft="s", all_layers=False, blocks=5)
