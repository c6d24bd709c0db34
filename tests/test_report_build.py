"""The report names what the run folder holds: a pair, or the one model an eval scored."""

from __future__ import annotations

import json

from sftlens.reporting.build import build_report


def overview(run) -> str:
    html = (run / "report.html").read_text()
    return html[html.index("<h2>") : html.index("</table>")]


def test_single_model_run_names_only_that_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"models": {"sft": "runs/sft-x"}}))
    build_report(tmp_path)
    head = overview(tmp_path)
    assert "<h2>Model</h2>" in head and "runs/sft-x" in head
    assert ">base<" not in head and "?" not in head


def test_pair_run_names_both_models(tmp_path):
    models = {"base": "m-base", "sft": "m-sft"}
    (tmp_path / "config.json").write_text(json.dumps({"models": models}))
    build_report(tmp_path)
    head = overview(tmp_path)
    assert "<h2>Pair</h2>" in head and "m-base" in head and "m-sft" in head
