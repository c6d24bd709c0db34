"""The CLI end to end on a tiny pair: weights, sft (with resume), report; errors are one line."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clitools import error_line
from sftlens.cli import main
from sftlens.experiments import trajectory


def test_weights_cli_writes_run_folder_and_resumes(tiny_pair, tmp_path, monkeypatch):
    base, sft = tiny_pair
    out = tmp_path / "run"
    assert main(["weights", str(base), str(sft), "--out", str(out), "--no-progress"]) == 0
    for name in (
        "config.json",
        "metrics.csv",
        "summary.json",
        "report.html",
        "plots/weights_dw.png",
    ):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "layer", "metric", "value"]
    metrics = {r["metric"] for r in rows}
    assert {
        "dw_q",
        "dw_k",
        "dw_v",
        "dw_o",
        "dw_attn",
        "dw_mlp",
        "dw_attn_rel",
        "dw_mlp_rel",
    } <= metrics
    assert {r["layer"] for r in rows if r["metric"] == "dw_attn"} == {str(i) for i in range(5)}
    assert any(r["metric"] == "dw_embed" and r["layer"] == "-1" for r in rows)
    assert any(r["metric"] == "dw_total" and r["layer"] == "" for r in rows)
    # the report states the layer that metrics.csv says changed most (the fixture's layer 4)
    dw_attn = {int(r["layer"]): float(r["value"]) for r in rows if r["metric"] == "dw_attn"}
    top = max(dw_attn, key=dw_attn.__getitem__)
    assert top == 4
    html = (out / "report.html").read_text()
    assert f"Largest attention change at layer {top} (relative depth {(top + 0.5) / 5:.2f})" in html
    assert html.count("data:image/png;base64,") == 2  # weights_dw.png and weights_dw_rel.png
    # config.json records the exact bytes compared: sha256 of each checkpoint file
    step = json.loads((out / "config.json").read_text())["steps"]["weights"]
    for name, folder in (("base", base), ("sft", sft)):
        want = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert step["inputs"][name]["model.safetensors"]["sha256"] == want
    # rerun: the step is skipped (same fingerprints): computing again would fail here
    from sftlens import weight_diff

    def fail(*args, **kwargs):
        raise AssertionError("weights recomputed on an unchanged pair")

    monkeypatch.setattr(weight_diff, "weight_diff", fail)
    before = (out / "metrics.csv").read_bytes()
    assert main(["weights", str(base), str(sft), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.csv").read_bytes() == before


def test_cli_error_is_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "weights",
                str(tmp_path / "nope"),
                str(tmp_path / "nope2"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: model '{tmp_path / 'nope'}' is not a folder") and "aliases:" in err
    )
    assert len(err.splitlines()) == 1


def test_help_runs_without_heavy_imports():
    code = "import sys; from sftlens.cli import build_parser; build_parser(); print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False False"


def _sft_args(model, out, steps=4):
    return [
        "sft",
        str(model),
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--max-examples",
        "16",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--max-length",
        "64",
        "--no-progress",
    ]


def test_sft_trains_saves_and_resumes_bit_exactly(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    full = tmp_path / "full"
    assert main(_sft_args(base, full)) == 0
    state = json.loads((full / "trainer_state.json").read_text())
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    # the step-2 snapshot stays as a model folder, without the optimizer state
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (full / "checkpoint-2" / "optimizer.safetensors").exists()
    trained = load_file(full / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert any(not torch.equal(trained[k], original[k]) for k in original)

    # crash after step 3 of 4; the checkpoint from step 2 remains; a rerun resumes from it
    crashed = tmp_path / "crashed"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    assert main(_sft_args(base, crashed)) == 130
    assert (crashed / "checkpoint-2" / "optimizer.safetensors").is_file()
    assert not (crashed / "trainer_state.json").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert main(_sft_args(base, crashed)) == 0
    resumed = load_file(crashed / "model.safetensors")
    for k in trained:
        torch.testing.assert_close(resumed[k], trained[k], rtol=1e-5, atol=1e-6)

    # a finished run with the same config is reused, not retrained
    mtime = (full / "model.safetensors").stat().st_mtime_ns
    assert main(_sft_args(base, full)) == 0
    assert (full / "model.safetensors").stat().st_mtime_ns == mtime


def test_sft_refuses_test_split(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    assert main(["sft", str(base), "--split", "test", "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys.readouterr().err)
    assert line == "error: sft refuses to train on the test split; use --split train"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--prompt-format", "xml"], "--prompt-format must be 'qa' or 'chat', got 'xml'"),
    ],
)
def test_sft_config_validation(tiny_pair, tmp_path, capsys, bad, message):
    base, _ = tiny_pair
    assert main(["sft", str(base), "--out", str(tmp_path), *bad]) == 2
    assert error_line(capsys.readouterr().err) == f"error: {message}"


def test_demo_end_to_end_on_tiny_model_then_report(tiny_pair, tmp_path):
    base, _ = tiny_pair
    out = tmp_path / "demo"
    args = [
        "demo",
        "--model",
        str(base),
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--sft-steps",
        "2",
        "--sft-batch-size",
        "2",
        "--sft-max-length",
        "64",
        "--analyze-prompts",
        "6",
        "--analyze-data",
        "synthetic",
        "--eval-problems",
        "3",
        "--eval-max-new-tokens",
        "4",
        "--probe-prompts",
        "2",
        "--trajectory-prompts",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    assert (out / "sft_model" / "model.safetensors").is_file()
    # the trajectory over the SFT's checkpoints (steps 1 and 2), in its own run folder
    steps = {r["step"] for r in trajectory.read_trajectory_csv(out / "trajectory/trajectory.csv")}
    assert steps == {1, 2}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"dw_attn", "cka", "prompt_entropy", "attn_js"} <= {r["metric"] for r in rows}
    # the short eval scored both models, and the probe read every layer of both
    evaluated = {(r["model"], r["metric"]) for r in rows if r["layer"] == ""}
    assert {(m, "gsm8k_strict") for m in ("base", "sft")} <= evaluated
    assert {(m, "answer_nll") for m in ("base", "sft")} <= evaluated
    probed = {(r["model"], int(r["layer"])) for r in rows if r["metric"] == "probe_acc"}
    assert probed == {(m, layer) for m in ("base", "sft") for layer in range(-1, 5)}
    # the demo compares the base with ITS short SFT: the fingerprints name both folders
    config = json.loads((out / "config.json").read_text())
    assert config["fingerprints"]["sft"]["path"] == str((out / "sft_model").resolve())
    assert config["fingerprints"]["base"]["path"] == str(base.resolve())
    # the report's sentences carry this run's numbers
    dw = {int(r["layer"]): float(r["value"]) for r in rows if r["metric"] == "dw_attn"}
    top = max(dw, key=dw.__getitem__)
    cka = [float(r["value"]) for r in rows if r["metric"] == "cka" and int(r["layer"]) >= 0]
    first = next((i for i, v in enumerate(cka) if v < 0.98), None)
    where = (
        "never" if first is None else f"at layer {first} (relative depth {(first + 0.5) / 5:.2f})"
    )
    html = (out / "report.html").read_text()
    assert f"Largest attention change at layer {top} (relative depth {(top + 0.5) / 5:.2f})" in html
    assert "6 prompts through both models" in html
    assert f"Token-level CKA first falls below 0.98: {where}." in html
    # and the second question: which layers to train, from this run's evidence alone
    from sftlens.tuning.suggest import suggest_mask

    saved = json.loads((out / "suggestion.json").read_text())
    assert saved["mask"] == suggest_mask(out, 5).mask
    assert saved["mask"] in html
    assert '<a href="trajectory/report.html">' in html
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == html
