"""``summary.json`` and the report sentences built from it, on hand-made rows with known answers."""

from __future__ import annotations

import json
import math

import pytest

from sftlens.api import _analyze_summary, _weights_summary
from sftlens.io import write_metrics_csv
from sftlens.reporting.build import build_report

NAN = float("nan")


def rows(metric: str, values: dict[int | None, float], model: str = "pair") -> list[dict]:
    return [{"model": model, "layer": k, "metric": metric, "value": v} for k, v in values.items()]


# layer -1 (embeddings) and decoy metrics/models carry extreme values: they must not count
CKA = {-1: 0.10, 0: 0.999, 1: 0.98, 2: 0.95, 3: 0.85, 4: 0.97}
SHARE_BASE = {-1: 0.99, 0: 0.2, 1: 0.6, 2: 0.5, 3: 0.51, 4: NAN}
SHARE_SFT = {0: 0.99, 2: 0.99}
ANALYZE_ROWS = (
    rows("cka", CKA)
    + rows("cka_std", {0: 0.0, 1: 0.0})
    + rows("top_feature_share", SHARE_BASE, "base")
    + rows("top_feature_share", SHARE_SFT, "sft")
)
DW_ATTN = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.9, 4: 0.5}
WEIGHT_ROWS = (
    rows("dw_attn", DW_ATTN)
    + rows("dw_q", {0: 50.0})
    + rows("dw_embed", {-1: 99.0})
    + rows("dw_total", {None: 7.0})
)


def test_cka_thresholds_and_massive_feature_layers():
    s = _analyze_summary(ANALYZE_ROWS, n_prompts=12)
    assert s["prompts"] == 12
    assert s["cka_by_layer"] == [CKA[i] for i in range(5)]
    # "below" is strict: layer 1 sits exactly at 0.98
    assert s["cka_first_below_0.98"] == {"layer": 2, "relative_depth": 0.5}
    assert s["cka_first_below_0.9"] == {"layer": 3, "relative_depth": 0.7}
    # base shares above one half, the embeddings and the SFT model aside; 0.5 is not above
    assert s["massive_feature_layers"] == [1, 3]


def test_cka_never_below_a_threshold_is_none():
    s = _analyze_summary(rows("cka", {0: 0.99, 1: 0.95, 2: NAN}), n_prompts=3)
    assert s["cka_first_below_0.98"] == {"layer": 1, "relative_depth": pytest.approx(0.5)}
    assert s["cka_first_below_0.9"] is None
    assert s["massive_feature_layers"] == []


def test_layer_of_max_dw_attn():
    s = _weights_summary(WEIGHT_ROWS)
    assert s["dw_attn_by_layer"] == [DW_ATTN[i] for i in range(5)]
    assert s["layer_of_max_dw_attn"] == 3
    assert s["relative_depth_of_max_dw_attn"] == pytest.approx(0.7)
    assert s["dw_total"] == 7.0
    assert _weights_summary(rows("dw_q", {0: 1.0})) == {}


def test_report_sentences_state_the_summary_values(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics_csv(run / "metrics.csv", ANALYZE_ROWS + WEIGHT_ROWS)
    summary = {
        "analyze": _analyze_summary(ANALYZE_ROWS, n_prompts=12),
        "weights": _weights_summary(WEIGHT_ROWS),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    html = build_report(run).read_text()
    assert "Largest attention change at layer 3 (relative depth 0.70)" in html
    assert "12 prompts through both models" in html
    assert "CKA first falls below 0.98: at layer 2 (relative depth 0.50)." in html
    assert "CKA first falls below 0.9: at layer 3 (relative depth 0.70)." in html
    assert "In 2 layers (1, 3) a single feature" in html

    summary["analyze"]["cka_first_below_0.9"] = None
    summary["analyze"]["massive_feature_layers"] = []
    (run / "summary.json").write_text(json.dumps(summary))
    html = build_report(run).read_text()
    assert "CKA first falls below 0.9: never." in html
    assert "a single feature" not in html


def test_summary_depths_are_layer_centres():
    """(layer + 0.5) / L: the bottom layer of 4 sits at 1/8, the top one at 7/8."""
    four = rows("dw_attn", {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0})
    assert math.isclose(_weights_summary(four)["relative_depth_of_max_dw_attn"], 1 / 8)
    four = rows("cka", {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.1})
    assert _analyze_summary(four, 1)["cka_first_below_0.9"] == {
        "layer": 3,
        "relative_depth": 7 / 8,
    }
