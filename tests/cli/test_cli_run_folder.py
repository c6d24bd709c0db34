"""Run folders from a new user's side: a bad ``--out`` and ``sftlens report`` on a folder that is
not a run are one-line errors (exit 2) that say what to do, never a traceback or an empty report."""

from __future__ import annotations

import pytest

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.errors import SftlensError

MAKERS = "sftlens weights, analyze, eval, probe, swap, interpolate, tune, sweep, trajectory or demo"


def test_report_on_a_missing_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    line = error_line(capsys.readouterr().err)
    assert (
        line
        == f"error: run folder {tmp_path / 'nope'} does not exist; make one with {MAKERS} (--out FOLDER)"
    )
    assert not (tmp_path / "nope").exists()


def test_report_on_a_folder_without_run_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["report", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds no run files (config.json, metrics.csv, summary.json)" in line
    assert MAKERS in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no empty report.html


def test_report_on_a_file(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("model,layer,metric,value\n")
    assert main(["report", str(tmp_path / "metrics.csv")]) == 2
    assert "is not a folder" in error_line(capsys.readouterr().err)
    with pytest.raises(SftlensError, match="does not exist"):
        api.report(tmp_path / "missing")


def test_report_needs_only_one_run_file(tmp_path):
    (tmp_path / "metrics.csv").write_text("model,layer,metric,value\npair,0,dw_attn,0.5\n")
    assert main(["report", str(tmp_path)]) == 0
    assert "dw_attn" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("command", ["weights", "analyze", "sft", "dpo", "demo"])
def test_out_naming_an_existing_file(tiny_pair, tmp_path, capsys, command):
    base, sft = tiny_pair
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    models = {"sft": [str(base)], "dpo": [str(base)], "demo": ["--model", str(base)]}.get(
        command, [str(base), str(sft)]
    )
    args = [command, *models, "--out", str(target), "--data", "synthetic", "--no-progress"]
    if command == "weights":
        args.remove("--data"), args.remove("synthetic")
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    if command == "demo":  # the short SFT writes under OUT/sft_model first
        assert line.startswith(f"error: cannot create the --out folder {target / 'sft_model'}")
        assert "part of its path is a file" in line
    else:
        assert line.startswith(f"error: --out {target} is a file, not a folder")
    assert target.read_text() == "keep me"
