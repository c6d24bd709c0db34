"""``sftlens trajectory``: checkpoints against BASE and against the previous one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.experiments import trajectory
from sftlens.io import read_metrics_csv
from tiny_models import perturb_all, save_model, tiny_config, tiny_llama_config

OPTS = dict(
    data="synthetic",
    max_prompts=6,
    batch_size=2,
    max_length=32,
    progress=False,
    device="cpu",
)
N_BATCHES = 3  # 6 prompts, 2 per batch


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, list[Path]]:
    """BASE and three checkpoints of a 3-layer Llama, each a further perturbation of the last."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3))
    base = save_model(model, root / "base")
    ckpts = []
    for i in range(3):
        perturb_all(model, scale=0.02 * (i + 1), seed=i + 1)
        ckpts.append(save_model(model, root / f"c{i + 1}"))
    return base, ckpts


@pytest.fixture
def no_plots(monkeypatch):
    from sftlens.reporting import plots

    for name in ("plot_trajectory", "plot_half_change", "plot_weights", "plot_representations"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    monkeypatch.setattr(api, "report", lambda run: run)


def rows_of(out: Path) -> list[dict]:
    return trajectory.read_trajectory_csv(out / "trajectory.csv")


def table(rows, checkpoint: str, against: str) -> dict:
    return {
        (r["model"], r["layer"], r["metric"]): r["value"]
        for r in rows
        if r["checkpoint"] == checkpoint and r["against"] == against
    }


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9, nan_ok=True), k


def test_identical_checkpoints_give_no_change_against_previous(chain, tmp_path, no_plots):
    base, ckpts = chain
    twin = shutil.copytree(ckpts[0], tmp_path / "twin")
    out = api.trajectory(str(base), [str(ckpts[0]), str(twin)], out=str(tmp_path / "t"), **OPTS)
    rows = table(rows_of(out), str(twin), "previous")
    dw = {k: v for k, v in rows.items() if k[2].startswith("dw_") and not k[2].endswith("_rel")}
    assert dw and all(v == 0.0 for v in dw.values())
    cka = {k: v for k, v in rows.items() if k[2] in ("cka", "cka_std")}
    assert len(cka) == 2 * 4  # layers -1..2
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in cka.values())
    assert all(v == 0.0 for k, v in rows.items() if k[2] == "attn_js")
    # ... and the first checkpoint's previous is BASE: its rows against both are equal
    first = rows_of(out)
    assert table(first, str(ckpts[0]), "previous") == table(first, str(ckpts[0]), "base")
    # steps: no trainer_state.json -> the position in the list
    assert sorted({(r["checkpoint"], r["step"]) for r in first}, key=lambda x: x[1]) == [
        (str(ckpts[0]), 1),
        (str(twin), 2),
    ]


def test_rows_equal_separate_weights_and_analyze_runs(chain, tmp_path, no_plots):
    base, ckpts = chain
    out = api.trajectory(str(base), [str(c) for c in ckpts], out=str(tmp_path / "t"), **OPTS)
    rows = rows_of(out)

    def separate(a: Path, b: Path, name: str) -> dict:
        w = api.weights(str(a), str(b), out=str(tmp_path / f"w{name}"), progress=False)
        r = api.analyze(str(a), str(b), out=str(tmp_path / f"a{name}"), **OPTS)
        both = read_metrics_csv(w / "metrics.csv") + read_metrics_csv(r / "metrics.csv")
        return {(x["model"], x["layer"], x["metric"]): x["value"] for x in both}

    for i, c in enumerate(ckpts):
        assert_same(table(rows, str(c), "base"), separate(base, c, f"b{i}"))
    # a stage: the last checkpoint against the one before it
    assert_same(table(rows, str(ckpts[2]), "previous"), separate(ckpts[1], ckpts[2], "p2"))
    summary = json.loads((out / "summary.json").read_text())["trajectory"]
    assert [p["step"] for p in summary["checkpoints"]] == [1, 2, 3]
    assert len(summary["half_change_step"]["dw_attn"]) == 3
    assert len(summary["most_moved_per_stage"]) == 3


def _checkpoint_folder(root: Path, ckpts: list[Path], steps: list[int]) -> Path:
    root.mkdir()
    for step, c in zip(steps, ckpts):
        dest = shutil.copytree(c, root / f"checkpoint-{step}")
        (dest / "trainer_state.json").write_text(json.dumps({"step": step}))
    return root


def test_checkpoint_folders_are_ordered_by_step_not_name(chain, tmp_path):
    _, ckpts = chain
    folder = _checkpoint_folder(tmp_path / "run", ckpts, [10, 9, 100])
    (folder / "checkpoint-11.tmp").mkdir()  # a killed save: left out
    got = trajectory.expand_checkpoints([str(folder)])
    assert [s for _, s in got] == [9, 10, 100]
    assert [Path(n).name for n, _ in got] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    # a finished sftlens sft folder: the model itself comes last (HF Trainer: global_step)
    for f in ckpts[2].iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 120}))
    got = trajectory.expand_checkpoints([str(folder)])
    assert [s for _, s in got] == [9, 10, 100, 120]
    assert got[-1][0] == str(folder)


def test_a_later_phase_counts_its_steps_on_from_the_phase_before(chain, tmp_path):
    """SFT checkpoints then a DPO model whose own trainer counts from 0 again."""
    _, ckpts = chain
    folder = _checkpoint_folder(tmp_path / "sft", ckpts[:2], [8, 16])
    dpo = tmp_path / "dpo"
    shutil.copytree(ckpts[2], dpo)
    (dpo / "trainer_state.json").write_text(json.dumps({"step": 10}))
    cfg = api.TrajectoryConfig(
        base=str(chain[0]),
        checkpoints=[str(folder / "checkpoint-8"), str(folder / "checkpoint-16"), str(dpo)],
        out=str(tmp_path / "out"),
        **OPTS,
    )
    points = trajectory.trajectory_points(cfg)
    assert [(p.step, p.phase) for p in points] == [(8, 0), (16, 0), (26, 1)]
    assert trajectory.phase_steps([5, 5, 0, None]) == [5, 10, 11, 14]
    assert trajectory.phase_steps([3, 7]) == [3, 7]


def test_base_runs_once_per_batch_and_groups_change_no_number(
    chain, tmp_path, monkeypatch, caplog, no_plots
):
    from sftlens import capture as capture_mod

    base, ckpts = chain
    calls: dict[str, int] = {}
    real = capture_mod.capture

    def counting(model, batch, **kw):
        name = Path(model.config._name_or_path).name
        calls[name] = calls.get(name, 0) + 1
        return real(model, batch, **kw)

    monkeypatch.setattr(capture_mod, "capture", counting)
    names = [str(c) for c in ckpts]
    together = rows_of(api.trajectory(str(base), names, out=str(tmp_path / "one"), **OPTS))
    assert calls == {"base": N_BATCHES, "c1": N_BATCHES, "c2": N_BATCHES, "c3": N_BATCHES}

    # a budget in which BASE and one checkpoint (with the one before it) fit, two do not
    groups = []
    real_plan = trajectory.plan_groups

    def tight(model_bytes, *, base, states, accumulators, available):
        room = base + 2 * max(model_bytes) + 3 * states + 2 * accumulators
        groups.append(
            real_plan(
                model_bytes, base=base, states=states, accumulators=accumulators, available=room
            )
        )
        return groups[-1]

    monkeypatch.setattr(trajectory, "plan_groups", tight)
    calls.clear()
    with caplog.at_level(logging.INFO, logger="sftlens.trajectory"):
        apart = rows_of(api.trajectory(str(base), names, out=str(tmp_path / "groups"), **OPTS))
    assert groups == [[[0], [1], [2]]]
    assert "do not fit in memory together" in caplog.text
    # BASE once per batch and group; c1 and c2 also as the previous checkpoint of the next group
    assert calls == {
        "base": 3 * N_BATCHES,
        "c1": 2 * N_BATCHES,
        "c2": 2 * N_BATCHES,
        "c3": N_BATCHES,
    }
    assert len(apart) == len(together)
    for a, b in zip(apart, together):
        assert {k: v for k, v in a.items() if k != "value"} == {
            k: v for k, v in b.items() if k != "value"
        }
        assert a["value"] == pytest.approx(b["value"], abs=1e-12, nan_ok=True)


def test_too_little_memory_for_one_checkpoint_is_one_line(chain, tmp_path, no_plots):
    base, ckpts = chain
    with pytest.raises(SftlensError, match=r"^trajectory needs .* larger --max-memory$"):
        api.trajectory(
            str(base), [str(ckpts[0])], out=str(tmp_path / "t"), max_memory="1KiB", **OPTS
        )


def test_cli_end_to_end_and_rerun_does_nothing(chain, tmp_path, monkeypatch):
    base, ckpts = chain
    folder = _checkpoint_folder(tmp_path / "run", ckpts, [20, 5])
    out = tmp_path / "t"
    args = ["trajectory", str(base), str(folder), "--out", str(out), "--data", "synthetic"]
    args += ["--max-prompts", "4", "--batch-size", "2", "--max-length", "32", "--no-progress"]
    args += ["--device", "cpu"]
    assert main(args) == 0
    header = (out / "trajectory.csv").read_text().splitlines()[0]
    assert header == "checkpoint,step,against,model,layer,metric,value"
    rows = rows_of(out)
    assert [s for s in dict.fromkeys(r["step"] for r in rows)] == [5, 20]
    assert {r["against"] for r in rows} == {"base", "previous"}
    for name in ("trajectory_base.png", "trajectory_previous.png", "trajectory_half_change.png"):
        assert (out / "plots" / name).is_file(), name
    assert "Training trajectory" in (out / "report.html").read_text()
    before = (out / "trajectory.csv").stat().st_mtime_ns

    from sftlens import weight_diff

    def must_not_run(*a, **k):
        raise AssertionError("recomputed unchanged inputs")

    monkeypatch.setattr(weight_diff, "weight_diff", must_not_run)
    assert main(args) == 0
    assert (out / "trajectory.csv").stat().st_mtime_ns == before


def test_bad_inputs_are_one_line_errors(chain, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, ckpts = chain
    other = save_model(AutoModelForCausalLM.from_config(tiny_config("gpt2")), tmp_path / "gpt2")
    out = str(tmp_path / "t")
    assert main(["trajectory", str(base), str(ckpts[0]), str(other), "--out", out]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {other} does not match BASE: ")
    assert "compare two checkpoints of the same model family" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["trajectory", str(base), str(empty), "--out", out]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {empty} holds no checkpoint-STEP subfolders")
    assert "sftlens sft --save-every N" in line

    assert main(["trajectory", str(base), "--out", out]) == 2
    assert "at least one checkpoint" in error_line(capsys.readouterr().err)


def test_half_change_and_summary_rules():
    assert trajectory.half_change_step([0.2, 0.4, 0.45, 0.8], [1, 2, 3, 4]) == 2
    assert trajectory.half_change_step([float("nan"), 1.0], [1, 2]) == 2
    # cka_std: the change is 1 - cka_std
    rows = [
        {"checkpoint": c, "step": s, "against": "base", "model": "pair", "layer": 0}
        | {"metric": "cka_std", "value": v}
        for c, s, v in (("a", 10, 0.9), ("b", 20, 0.5), ("c", 30, 0.6))
    ]
    assert trajectory.change_values(rows, "cka_std") == {0: [pytest.approx(0.1), 0.5, 0.4]}
    points = [trajectory.Point(c, Path(c), s) for c, s in (("a", 10), ("b", 20), ("c", 30))]
    assert trajectory.summarize(rows, points, 1)["half_change_step"]["cka_std"] == [20]


def test_an_sftlens_sft_run_folder_is_a_trajectory(chain, tmp_path, no_plots):
    """``sft --save-every 2`` of 5 steps: checkpoint-2, checkpoint-4, then the final model
    (step 5) itself; the last point's rows against BASE equal those of the final model."""
    base, _ = chain
    run = api.sft(
        str(base),
        out=str(tmp_path / "sft"),
        data="synthetic",
        max_examples=8,
        steps=5,
        batch_size=2,
        lr=5e-3,
        warmup_ratio=0.0,
        max_length=256,
        save_every=2,
        device="cpu",
        progress=False,
    )
    out = api.trajectory(str(base), str(run), out=str(tmp_path / "t"), **OPTS)
    rows = rows_of(out)
    assert list(dict.fromkeys((Path(r["checkpoint"]).name, r["step"]) for r in rows)) == [
        ("checkpoint-2", 2),
        ("checkpoint-4", 4),
        ("sft", 5),
    ]
    stage = table(rows, str(run), "previous")
    assert stage[("pair", None, "dw_total")] > 0  # training went on after checkpoint-4
