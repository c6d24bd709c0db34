"""``sftlens suggest``: the ``stable-middle/1`` rule on hand-made analysis folders whose answer
follows from the rule by hand, its errors, the CLI end to end, and one real tiny pipeline."""

from __future__ import annotations

import doctest
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, write_metrics_csv
from sftlens.tuning import suggest as suggest_module
from sftlens.tuning.suggest import rank_normalise, suggest_from_rows, suggest_mask

MAKERS = ("sftlens weights", "sftlens analyze", "sftlens demo")


def rows(metric: str, values, model: str = "pair") -> list[dict]:
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return [{"model": model, "layer": k, "metric": metric, "value": v} for k, v in items]


def gap_rows(metric: str, deltas) -> list[dict]:
    """base 0.5 everywhere, sft = 0.5 + delta (signs mixed on purpose: the rule takes |delta|)."""
    base = rows(metric, [0.5] * len(deltas), "base")
    sft = rows(metric, [0.5 + d * (-1) ** i for i, d in enumerate(deltas)], "sft")
    return base + sft


def run_folder(path: Path, metric_rows: list[dict], num_layers: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(path / "metrics.csv", metric_rows)
    if num_layers is not None:
        atomic_write_json(path / "summary.json", {"pair": {"num_layers": num_layers}})
    return path


# decoys every folder may carry: embeddings (layer -1), whole-model rows, other metrics
DECOYS = (
    rows("dw_embed_rel", {-1: 99.0})
    + rows("dw_total", {None: 7.0})
    + rows("answer_nll", {None: 1.5}, "base")
    + rows("cka", {-1: 0.0})
)


def test_doctests():
    assert doctest.testmod(suggest_module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# -- rank normalisation ---------------------------------------------------------------------------


def test_rank_normalise_ties_share_their_mean_rank():
    assert rank_normalise({0: 2.0, 1: 2.0, 2: 1.0, 3: 9.0}) == {0: 0.5, 1: 0.5, 2: 0.0, 3: 1.0}
    assert rank_normalise({7: 3.0, 8: 3.0}) == {7: 0.5, 8: 0.5}


@given(
    st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=12),
    st.floats(1e-3, 1e3),
)
def test_rank_normalise_is_scale_free_and_centred(values, scale):
    ranks = rank_normalise(dict(enumerate(values)))
    assert rank_normalise({k: scale * v**3 for k, v in enumerate(values)}) == ranks
    assert all(0.0 <= r <= 1.0 for r in ranks.values())
    assert sum(ranks.values()) / len(ranks) == pytest.approx(0.5)


def test_each_family_reads_its_metric_oriented_so_that_larger_is_more_change():
    """The extractors behind FAMILIES (built at import, so called here by hand): a ``pair`` metric
    as is (dW) or as ``1 - value`` (similarities), a base/sft metric as ``|sft - base|`` on the
    layers both models have; None when the metric is absent."""
    pair, gap = suggest_module._pair, suggest_module._gap
    table = {
        ("pair", "dw_block_rel"): {0: 0.25, 1: 2.0},
        ("pair", "cka_std"): {0: 0.25, 1: 1.0},
        ("pair", "cka"): {},
        ("base", "prompt_entropy_norm"): {0: 1.0, 1: 2.0, 2: 5.0},
        ("sft", "prompt_entropy_norm"): {0: 4.0, 1: 1.5, 3: 0.0},
        ("base", "probe_kl"): {0: 1.0},
        ("sft", "dataset_entropy_norm"): {0: 1.0},
    }
    assert pair("dw_block_rel")(table) == {0: 0.25, 1: 2.0}
    assert pair("cka_std", flip=True)(table) == {0: 0.75, 1: 0.0}
    assert pair("cka", flip=True)(table) is None  # present but empty
    assert pair("dw_attn_rel")(table) is None
    assert gap("prompt_entropy_norm")(table) == {0: 3.0, 1: 0.5}
    assert gap("probe_kl")(table) is None  # base only
    assert gap("dataset_entropy_norm")(table) is None  # sft only
    assert gap("prompt_entropy")(table) is None


# -- the rule on constructed cases ----------------------------------------------------------------

# L = 10, K = 5 (two layers a block). Rank-normalised block scores in the comments.
WIDEN = [9, 9, 1, 1, 2, 2, 3, 3, 8, 8]  # blocks .944 .056 .278 .500 .722
NARROW = [1, 1, 5, 5, 0.5, 0.5, 6, 6, 9, 9]  # blocks .278 .500 .056 .722 .944


def test_least_changed_middle_block_widened_by_neighbours_below_average():
    s = suggest_from_rows(rows("dw_block_rel", WIDEN) + DECOYS)
    assert [round(x, 3) for x in s.scores] == [0.944, 0.056, 0.278, 0.5, 0.722]
    # block 1 is least changed; block 2 (.278 < .5) joins; block 3 sits at exactly .5: not below
    assert (s.mask, s.layers) == ("01100", [2, 3, 4, 5])
    assert s.layer_range == "layers 2-5 (20-60% of depth)"
    assert s.candidates == [1, 2, 3]
    assert s.metrics == {"weights": "dw_block_rel"}
    assert s.num_layers == 10 and s.num_blocks == 5 and s.rule == "stable-middle/1"


def test_a_neighbour_at_exactly_the_average_is_not_added():
    s = suggest_from_rows(rows("dw_block_rel", NARROW))
    assert [round(x, 3) for x in s.scores] == [0.278, 0.5, 0.056, 0.722, 0.944]
    assert s.mask == "00100"


def test_the_lower_scoring_neighbour_joins_first():
    # blocks .833 .444 .056 .333 .833: both neighbours of block 2 changed less than average
    values = [9, 9, 1, 1.5, 0, 0, 1, 1, 9, 9]
    s = suggest_from_rows(rows("dw_block_rel", values), max_width=2)
    assert [round(x, 3) for x in s.scores] == [0.833, 0.444, 0.056, 0.333, 0.833]
    assert s.mask == "00110"
    assert suggest_from_rows(rows("dw_block_rel", values)).mask == "01110"


def test_width_and_max_width():
    r = rows("dw_block_rel", WIDEN)
    assert suggest_from_rows(r, max_width=1).mask == "01000"
    assert suggest_from_rows(r, width=1).mask == "01000"
    assert suggest_from_rows(r, width=2).mask == "01100"  # mean .167 beats 00110's .389
    assert suggest_from_rows(r, width=3).mask == "01110"
    with pytest.raises(
        SftlensError, match=r"--width 4 needs 4 adjacent blocks .* leaves 3"
    ) as info:
        suggest_from_rows(r, width=4)
    assert str(info.value).endswith(
        ": pass a smaller --width, more --blocks or a wider --min-depth/--max-depth"
    )


def test_change_concentrated_at_the_top_keeps_the_stable_middle():
    # representations drift more and more with depth, most in the top block (as CKA does)
    cka_std = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.6, 0.5]
    s = suggest_from_rows(rows("cka_std", cka_std))
    assert s.metrics == {"geometry": "1-cka_std"}
    assert s.mask == "01000"  # lowest block of the band; 00100 sits at .5
    assert s.scores[4] == max(s.scores)
    # without the band, the data alone: the bottom, widened by block 1 (.278)
    free = suggest_from_rows(rows("cka_std", cka_std), min_depth=0.0, max_depth=1.0)
    assert free.mask == "11000"
    assert free.candidates == [0, 1, 2, 3, 4]


# L = 5, K = 5 (one layer a block): geometry favours block 1, entropy block 3, their mean ties
GEOMETRY = [1.0, 0.9, 0.8, 0.7, 0.6]  # cka_std -> change ranks 0 .25 .5 .75 1
ENTROPY = [0.0, 0.3, 0.2, 0.1, 0.4]  # |delta| -> ranks 0 .75 .5 .25 1
AGREEMENT = [1.0, 0.8, 0.9, 0.95, 0.7]  # 1 - agreement -> ranks 0 .75 .5 .25 1


def test_only_analyze_rows_average_the_families_and_break_ties_toward_mid_depth():
    analyze = rows("cka_std", GEOMETRY) + gap_rows("prompt_entropy_norm", ENTROPY)
    s = suggest_from_rows(analyze + DECOYS)
    assert s.metrics == {"geometry": "1-cka_std", "entropy": "|d prompt_entropy_norm|"}
    assert s.scores == pytest.approx([0.0, 0.5, 0.5, 0.5, 1.0])
    assert s.mask == "00100"  # three-way tie in the band: the block nearest mid-depth
    assert s.family_scores["geometry"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert s.family_scores["entropy"] == pytest.approx([0.0, 0.75, 0.5, 0.25, 1.0])
    assert [m.split()[0] for m in s.missing] == ["weights", "probing"]
    # each family alone decides differently, so both really count
    assert suggest_from_rows(rows("cka_std", GEOMETRY)).mask == "01000"
    assert suggest_from_rows(gap_rows("prompt_entropy_norm", ENTROPY)).mask == "00010"


def test_probing_when_present_counts_as_a_family():
    analyze = rows("cka_std", GEOMETRY) + gap_rows("prompt_entropy_norm", ENTROPY)
    probe = (
        rows("probe_agreement", {-1: 0.0, **dict(enumerate(AGREEMENT))})
        + rows("tuned_probe_agreement", [1.0, 0.0, 0.0, 0.0, 0.0])  # decoy
        + rows("probe_acc", [0.0, 0.1, 0.2, 0.3, 0.9], "base")
    )
    with_probe = suggest_from_rows(analyze + probe)
    assert with_probe.metrics["probing"] == "1-probe_agreement"
    assert with_probe.scores[1:4] == pytest.approx([7 / 12, 0.5, 5 / 12])
    assert with_probe.mask == "00010"
    assert not with_probe.missing[1:]  # only weights is missing
    # no agreement rows: the KL gap between the models' readouts stands in
    kl = gap_rows("probe_kl", [0.0, 3.0, 2.0, 1.0, 4.0])
    assert suggest_from_rows(analyze + kl).metrics["probing"] == "|d probe_kl|"
    assert suggest_from_rows(analyze + kl).mask == "00010"


def test_cka_std_is_preferred_to_cka():
    # plain CKA saturates under massive activations (docs/metrics.md); cka_std decides
    s = suggest_from_rows(rows("cka_std", GEOMETRY) + rows("cka", GEOMETRY[::-1]))
    assert (s.metrics["geometry"], s.mask) == ("1-cka_std", "01000")
    assert suggest_from_rows(rows("cka", GEOMETRY[::-1])).mask == "00010"


def test_weights_fall_back_to_other_dw_rows_in_order():
    for metric in ("dw_attn_rel", "dw_mlp_rel", "dw_block", "dw_attn", "dw_mlp"):
        s = suggest_from_rows(rows(metric, WIDEN) + rows("dw_q", NARROW))
        assert (s.metrics["weights"], s.mask) == (metric, "01100")
    both = rows("dw_block_rel", WIDEN) + rows("dw_attn_rel", NARROW)
    assert suggest_from_rows(both).mask == "01100"  # dw_block_rel first


@pytest.mark.parametrize(
    ("num_layers", "num_blocks", "values", "mask", "layers"),
    [
        # L=7, K=3: blocks 0-1, 2-3, 4-6 centred at .14 .43 .79: candidates 1 and 2
        (7, 3, [1, 2, 3, 4, 5, 6, 7], "010", [2, 3]),
        (7, 3, [7, 6, 5, 4, 3, 2, 1], "001", [4, 5, 6]),
        # L=10, K=4: blocks 0-1, 2-4, 5-6, 7-9 centred at .1 .35 .6 .85: candidates 1 and 2
        (10, 4, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "0100", [2, 3, 4]),
        (10, 4, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1], "0010", [5, 6]),
        # K = 1: the one block is every layer; K = 2: both halves are candidates
        (6, 1, [3, 1, 2, 5, 4, 6], "1", [0, 1, 2, 3, 4, 5]),
        (6, 2, [6, 5, 4, 3, 2, 1], "01", [3, 4, 5]),
        # L=7, K=7: one layer a block, centres (k + .5) / 7: candidates 1..5
        (7, 7, [9, 1, 2, 5, 6, 8, 0], "0110000", [1, 2]),
    ],
)
def test_other_block_counts_and_uneven_blocks(num_layers, num_blocks, values, mask, layers):
    s = suggest_from_rows(rows("dw_block_rel", values), num_blocks)
    assert (s.mask, s.layers) == (mask, layers)
    assert len(s.evidence) == num_blocks == len(s.scores)


def test_summary_layer_count_wins_and_uncovered_blocks_are_no_candidates(tmp_path):
    # metrics for layers 0..7 only, of a 10-layer model: block 4 (8-9) has no score
    values = [5, 5, 1, 1, 2, 2, 3, 3]
    run = run_folder(tmp_path / "r", rows("dw_block_rel", [*values, 0.0, 0.0])[:8], 10)
    s = suggest_mask(run)
    assert s.num_layers == 10
    assert s.scores[4] is None
    assert "n/a" in s.evidence[4]
    # a layer beyond the model (a foreign row) is ignored
    run_folder(tmp_path / "r", rows("dw_block_rel", [*values, 0.0, 0.0, 0.0, 0.0]), 10)
    assert suggest_mask(run).scores[4] is not None
    assert suggest_mask(run).num_layers == 10


def test_evidence_one_line_per_block_with_mask_range_and_verdict():
    s = suggest_from_rows(rows("dw_block_rel", WIDEN) + rows("cka", [1.0] * 10))
    assert len(s.evidence) == 5
    assert s.evidence[1].startswith("block 1 01000 layers 2-3 (20-40% of depth): change ")
    assert [line.rsplit("-> ", 1)[1] for line in s.evidence] == [
        "outside the candidate band",
        "CHOSEN",
        "CHOSEN",
        "skipped",
        "outside the candidate band",
    ]
    assert "dw_block_rel 1 (rank 0.06)" in s.evidence[1]
    assert "1-cka 0 (rank 0.50)" in s.evidence[1]  # ties everywhere: every layer ranks .5
    lines = s.lines()
    assert lines[0] == "suggested mask 01100: layers 2-5 (20-60% of depth)"
    assert any(line.startswith("missing: entropy (run sftlens analyze") for line in lines)


def test_a_flat_family_is_flagged_as_weak_evidence():
    flat = [1.0, 1.01, 0.99, 1.02, 1.0, 0.98, 1.01, 1.0, 0.99, 1.0]
    s = suggest_from_rows(rows("dw_block_rel", flat) + rows("cka_std", WIDEN))
    assert len(s.notes) == 1 and s.notes[0].startswith("weights: dw_block_rel varies by 1%")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_blocks": 0}, "--blocks must be >= 1, got 0"),
        ({"width": -1}, "--width must be >= 0"),
        ({"max_width": 0}, "--max-width >= 1"),
        ({"min_depth": 0.6}, "--min-depth and --max-depth must satisfy"),
        ({"max_depth": 0.4}, "--min-depth and --max-depth must satisfy"),
        ({"max_depth": 1.5}, "--min-depth and --max-depth must satisfy"),
        ({"num_blocks": 11}, "K=11 depth blocks do not fit a model of 10 layers"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(SftlensError, match=message.replace("[", r"\[")):
        suggest_from_rows(rows("dw_block_rel", WIDEN), **kwargs)


def test_a_band_without_any_block_centre_is_an_error():
    with pytest.raises(SftlensError, match=r"no depth block centred in 50-50% of depth"):
        suggest_from_rows(rows("dw_block_rel", WIDEN), 2, min_depth=0.5, max_depth=0.5)


def test_the_automatic_width_stops_at_three_blocks_by_default():
    # L = K = 8, the data alone: blocks 0-3 all changed less than the average layer (ranks i/7)
    r = rows("dw_block_rel", range(8))
    s = suggest_from_rows(r, 8, min_depth=0.0, max_depth=1.0)
    assert s.mask == "11100000"
    assert suggest_from_rows(r, 8, min_depth=0.0, max_depth=1.0, max_width=4).mask == "11110000"


def test_the_band_includes_blocks_centred_on_its_edges():
    # L = 10, K = 5: centres .1 .3 .5 .7 .9 (exact in floating point)
    r = rows("dw_block_rel", WIDEN)
    assert suggest_from_rows(r, min_depth=0.3, max_depth=0.7).candidates == [1, 2, 3]
    assert suggest_from_rows(r, min_depth=0.31, max_depth=0.69).candidates == [2]


def test_a_block_with_change_zero_is_the_least_changed():
    # L = K = 5: block 1 holds the one least-changed layer, so its change is exactly 0
    s = suggest_from_rows(rows("dw_block_rel", [5, 0, 1, 2, 3]), max_width=1)
    assert s.scores == [1.0, 0.0, 0.25, 0.5, 0.75]
    assert s.mask == "01000"


def test_a_neighbour_with_change_zero_joins():
    # L = K = 5, two families on different layers: weights ranks layers 1 (0) and 3 (1),
    # geometry layers 0 (.5), 2 (0) and 4 (1); blocks 1 and 2 both change 0, block 2 is nearer
    # mid-depth and chosen first, block 1 then joins it (0 < 0.5)
    r = rows("dw_block_rel", {1: 0.1, 3: 0.9}) + rows("cka_std", {0: 0.5, 2: 0.99, 4: 0.1})
    s = suggest_from_rows(r)
    assert s.scores == [0.5, 0.0, 0.0, 1.0, 1.0]
    assert s.mask == "01100"


def test_rows_outside_the_model_or_without_a_finite_value_are_ignored():
    # a foreign row first (layer 10 of a 10-layer model), non-finite and empty values
    foreign = rows("dw_block_rel", {10: -1.0})
    broken = (
        rows("dw_block_rel", {3: math.nan, 4: math.inf})
        + rows("cka_std", dict.fromkeys(range(10), math.nan))
        + [{"model": "pair", "layer": 5, "metric": "dw_block_rel", "value": None}]
    )
    clean = suggest_from_rows(rows("dw_block_rel", WIDEN), num_layers=10)
    s = suggest_from_rows(foreign + rows("dw_block_rel", WIDEN) + broken, num_layers=10)
    assert s.scores == clean.scores
    assert s.metrics == {"weights": "dw_block_rel"}
    assert [m.split()[0] for m in s.missing] == ["geometry", "entropy", "probing"]
    # without a layer count the rows set it: every layer counts, the foreign one too
    assert suggest_from_rows(foreign + rows("dw_block_rel", WIDEN)).num_layers == 11


def test_weak_evidence_is_the_spread_relative_to_the_mean_of_at_least_two_layers():
    weights = [100.0, 101.0, 99.0, 102.0, 100.0, 98.0, 101.0, 100.0, 99.0, 100.0]  # 1.1%
    two = rows("cka_std", {0: 0.5, 1: 0.51})  # 1 - cka_std: 0.5, 0.49: 1.0%
    one = rows("probe_agreement", {3: 0.2})  # a single layer has no spread to judge
    s = suggest_from_rows(rows("dw_block_rel", weights) + two + one)
    assert s.notes == [
        "weights: dw_block_rel varies by 1% across layers (coefficient of variation): weak "
        "evidence",
        "geometry: 1-cka_std varies by 1% across layers (coefficient of variation): weak evidence",
    ]
    # 10% exactly is not below 10%: values 9 and 11 around their mean 10
    assert not suggest_from_rows(rows("dw_block_rel", [9.0, 11.0] * 5)).notes


def test_the_reason_names_the_rule_the_band_and_the_families():
    r = rows("dw_block_rel", WIDEN) + rows("cka_std", WIDEN[::-1])
    tail = (
        ", among blocks centred in 20-80% of depth; change = mean over weights, geometry of "
        "per-layer ranks scaled to [0, 1] (0 = least changed)"
    )
    auto = suggest_from_rows(r)
    assert auto.reason == (
        "the least-changed block, widened by neighbours that changed less than the average "
        "layer (change < 0.5, at most 3 blocks)" + tail
    )
    assert suggest_from_rows(r, width=2).reason == (
        "the 2 adjacent candidate blocks with the lowest mean change" + tail
    )
    assert auto.lines()[1] == f"rule stable-middle/1: {auto.reason}"
    assert suggest_from_rows(r, width=2, max_width=2, min_depth=0.1).options == {
        "width": 2,
        "max_width": 2,
        "min_depth": 0.1,
        "max_depth": 0.8,
    }
    assert auto.options == {"width": 0, "max_width": 3, "min_depth": 0.2, "max_depth": 0.8}


def test_evidence_lines_in_full_with_uncovered_blocks():
    # a 10-layer model; weights cover layers 0-7, geometry layers 0-5: block 4 has no metric
    r = rows("dw_block_rel", WIDEN[:8]) + rows(
        "cka_std", {0: 0.9, 1: 0.8, 2: 0.99, 3: 0.97, 4: 0.95, 5: 0.96}
    )
    s = suggest_from_rows(r, num_layers=10)
    assert s.scores[4] is None
    assert s.evidence == [
        "block 0 10000 layers 0-1 (0-20% of depth): change 0.91 "
        "[dw_block_rel 9 (rank 0.93); 1-cka_std 0.15 (rank 0.90)] -> outside the candidate band",
        "block 1 01000 layers 2-3 (20-40% of depth): change 0.09 "
        "[dw_block_rel 1 (rank 0.07); 1-cka_std 0.02 (rank 0.10)] -> CHOSEN",
        "block 2 00100 layers 4-5 (40-60% of depth): change 0.43 "
        "[dw_block_rel 2 (rank 0.36); 1-cka_std 0.045 (rank 0.50)] -> CHOSEN",
        "block 3 00010 layers 6-7 (60-80% of depth): change 0.64 "
        "[dw_block_rel 3 (rank 0.64); 1-cka_std n/a] -> skipped",
        "block 4 00001 layers 8-9 (80-100% of depth): change n/a "
        "[dw_block_rel n/a; 1-cka_std n/a] -> outside the candidate band",
    ]


def test_rows_without_any_family_name_the_rows():
    with pytest.raises(SftlensError, match=r"^the rows holds none of the per-layer metrics"):
        suggest_from_rows(rows("answer_nll", {None: 1.2}, "base"))


# -- run folders and errors -----------------------------------------------------------------------


def test_folders_that_are_not_runs_or_lack_the_metrics(tmp_path):
    (tmp_path / "a_file").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    only_eval = run_folder(tmp_path / "eval", rows("answer_nll", {None: 1.2}, "base"))
    for path, what in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "a_file", "is not a folder"),
        (empty, "holds no metrics.csv"),
        (only_eval, "holds none of the per-layer metrics suggest reads"),
    ]:
        with pytest.raises(SftlensError) as info:
            suggest_mask(path)
        message = str(info.value)
        assert what in message and "\n" not in message
        assert all(m in message for m in MAKERS), message
    assert list(empty.iterdir()) == []  # reading never creates files


def test_folder_errors_say_what_the_path_is(tmp_path):
    (tmp_path / "a_file").write_text("x")
    only_eval = run_folder(tmp_path / "eval", rows("answer_nll", {None: 1.2}, "base"))
    for path, start in [
        (tmp_path / "missing", f"run folder {tmp_path / 'missing'} does not exist; make one"),
        (tmp_path / "a_file", f"run folder {tmp_path / 'a_file'} is not a folder; make one"),
        (only_eval, f"{only_eval} holds none of the per-layer metrics suggest reads"),
    ]:
        with pytest.raises(SftlensError, match="^" + re.escape(start)):
            suggest_mask(path)


def test_the_layer_count_comes_from_the_pair_in_summary_json_when_it_is_one(tmp_path):
    r = rows("dw_block_rel", WIDEN)
    run = run_folder(tmp_path / "r", r)
    for summary, num_layers in [
        ({"base": {"num_layers": 3}}, 10),  # an eval run's summary: no pair
        ({"pair": {}}, 10),
        ({"pair": {"num_layers": 0}}, 10),
        ({"pair": {"num_layers": "4"}}, 10),
        ({"pair": {"num_layers": 2}}, 2),
        ({"pair": {"num_layers": 1}}, 1),
    ]:
        atomic_write_json(run / "summary.json", summary)
        s = suggest_mask(run, 1)
        assert (s.num_layers, s.mask, s.layers) == (num_layers, "1", list(range(num_layers)))


# (options, mask) on a run whose change grows with depth (default: 01000) and on its mirror
# image (default: 00010): each option changes the mask, so each must reach the rule
RISING = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.6, 0.5]
OPTIONS = [
    (RISING, {}, "01000"),
    (RISING, {"width": 3}, "01110"),
    (RISING, {"min_depth": 0.0}, "11000"),
    (RISING, {"min_depth": 0.0, "max_width": 1}, "10000"),
    (RISING[::-1], {}, "00010"),
    (RISING[::-1], {"max_depth": 1.0}, "00011"),
]


@pytest.mark.parametrize(("values", "options", "mask"), OPTIONS)
def test_options_reach_the_rule_through_the_folder_and_the_api(tmp_path, values, options, mask):
    run = run_folder(tmp_path / "run", rows("cka_std", values))
    assert suggest_from_rows(rows("cka_std", values), **options).mask == mask
    assert suggest_mask(run, **options).mask == mask
    s = api.suggest(run, save=False, **options)
    assert s.mask == mask
    assert s.options == {"width": 0, "max_width": 3, "min_depth": 0.2, "max_depth": 0.8, **options}


def test_the_default_automatic_width_through_the_folder(tmp_path):
    run = run_folder(tmp_path / "run", rows("dw_block_rel", range(8)))
    assert suggest_mask(run, 8, min_depth=0.0, max_depth=1.0).mask == "11100000"
    assert api.suggest(run, save=False, blocks=8, min_depth=0.0, max_depth=1.0).mask == "11100000"


def test_a_metrics_csv_of_another_tool_is_refused(tmp_path):
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SftlensError, match="is not a sftlens metrics.csv"):
        suggest_mask(tmp_path)


# -- API, CLI and report --------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    run = run_folder(tmp_path / "run", rows("dw_block_rel", WIDEN) + DECOYS)
    assert main(["suggest", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "suggested mask 01100: layers 2-5 (20-60% of depth)"
    assert out[1].startswith("rule stable-middle/1: ")
    assert sum(line.startswith("  block ") for line in out) == 5
    saved = json.loads((run / "suggestion.json").read_text())
    assert saved["mask"] == "01100" and saved["layers"] == [2, 3, 4, 5]
    assert saved["options"] == {"width": 0, "max_width": 3, "min_depth": 0.2, "max_depth": 0.8}
    assert saved["reason"] == suggest_mask(run).reason and saved["reason"].startswith("the least")
    html = (run / "report.html").read_text()
    assert "Suggested Mid-Block mask" in html and "01100" in html and "Stale" not in html
    # more metrics arrive: the saved suggestion is flagged stale in the report
    write_metrics_csv(run / "metrics.csv", rows("dw_block_rel", NARROW))
    assert main(["report", str(run)]) == 0
    assert "Stale" in (run / "report.html").read_text()
    capsys.readouterr()
    # options through the CLI, and --no-save leaves the folder alone
    before = sorted(p.name for p in run.iterdir())
    stamp = (run / "suggestion.json").stat().st_mtime_ns
    assert main(["suggest", str(run), "--blocks", "2", "--width", "1", "--no-save"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0] == "suggested mask 10: layers 0-4 (0-50% of depth)"
    )
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "suggestion.json").stat().st_mtime_ns == stamp


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["suggest", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds no metrics.csv" in line and "sftlens weights" in line
    assert list(tmp_path.iterdir()) == []


def test_api_matches_the_module(tmp_path):
    import sftlens

    run = run_folder(tmp_path / "run", rows("dw_block_rel", NARROW))
    s = sftlens.suggest(run, save=False, max_width=2)
    assert s == suggest_mask(run, 5, max_width=2)
    assert s.mask == "00100" and not (run / "suggestion.json").exists()
    assert api.suggest(str(run)).mask == "00100"
    assert (run / "suggestion.json").is_file()


# -- a real tiny pipeline -------------------------------------------------------------------------


def test_on_a_tiny_weights_and_analyze_run(tiny_pair, tmp_path, monkeypatch):
    """The tiny SFT changes layers 1 and 2 least and 3 and 4 most (conftest): the suggestion
    keeps to the band, leaves out block 3, and reads all the families the pipeline made."""
    from sftlens.reporting import plots

    for name in ("plot_weights", "plot_representations", "plot_heads"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    base, sft = tiny_pair
    out = tmp_path / "run"
    api.weights(str(base), str(sft), out=str(out), progress=False)
    opts = dict(max_prompts=6, batch_size=3, max_length=32, attention=False, progress=False)
    api.analyze(str(base), str(sft), out=str(out), data="synthetic", **opts)
    s = api.suggest(out)
    assert set(s.metrics) == {"weights", "geometry", "entropy"}
    assert [m.split()[0] for m in s.missing] == ["probing"]
    assert s.num_layers == 5
    assert s.family_scores["weights"][3] > max(s.family_scores["weights"][1:3])
    assert s.mask in ("01000", "00100", "01100")
    assert all(math.isfinite(x) for x in s.scores if x is not None)
    assert "Suggested Mid-Block mask" in (out / "report.html").read_text()


def test_report_section_in_full_with_the_masks_blocks_in_bold(tmp_path):
    """A hand-made suggestion.json: the blocks of the mask are the bold rows, the others plain;
    a family without a value for a block shows a dash."""
    assert suggest_module.report_section(tmp_path, [], {}) is None  # no suggestion.json
    atomic_write_json(
        tmp_path / suggest_module.SUGGESTION_FILE,
        {
            "mask": "011",
            "layer_range": "layers 2-5",
            "rule": "stable-middle/1",
            "reason": "why",
            "scores": [1.0, 0.25, 0.5],
            "family_scores": {"dw": [1.0, None, 0.5]},
        },
    )
    title, body = suggest_module.report_section(tmp_path, [], {})
    assert title == "Suggested Mid-Block mask (before training)"
    assert body == (
        "<p>Suggested mask <b><code>011</code></b>: layers 2-5. "
        "Rule <code>stable-middle/1</code>: why.</p>"
        "<table><tr><th>block</th><th>mask</th><th>change</th><th>dw</th></tr>"
        "<tr><td>0</td><td>100</td><td>1</td><td>1</td></tr>"
        '<tr style="font-weight:bold"><td>1</td><td>010</td><td>0.25</td><td>—</td></tr>'
        '<tr style="font-weight:bold"><td>2</td><td>001</td><td>0.5</td><td>0.5</td></tr>'
        "</table>"
        "<p>Per-family scores are per-layer ranks scaled to [0, 1], 0 = least changed.</p>"
    )
