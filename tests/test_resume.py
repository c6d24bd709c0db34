"""Resume: unchanged inputs skip a step, any changed input (data, a result-changing option, a
checkpoint's bytes) recomputes it; options that change no result (progress, out, device) do not.

A skip is proven with a computation that fails if it is called.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftlens import api
from sftlens.errors import SftlensError
from sftlens.run import RunFolder, fingerprint

Q = [
    "how many 3 + 4 ?",
    "the 2 * 5 is ?",
    "how many of the 9 and 1 ?",
    "a 6 - 2 is ?",
    "the 8 / 4 ?",
    "how many 7 + 7 + 1 ?",
    "the 1 + 1 ?",
    "a 9 * 9 ?",
    "how many 5 - 3 ?",
    "the 4 + 4 + 4 ?",
]


def write_data(path: Path, n: int = len(Q), edit: int | None = None) -> Path:
    """A hand-written GSM8K-style jsonl; ``edit`` changes one question's text."""
    lines = []
    for i, q in enumerate(Q[:n]):
        q = q.replace("?", "+ 1 ?") if i == edit else q
        lines.append(json.dumps({"question": q, "answer": f"it is {i} .\n#### {i}"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(metric: str, value: float, layer: int | None = 0, model: str = "pair") -> dict:
    return {"model": model, "layer": layer, "metric": metric, "value": value}


def must_not_run() -> list[dict]:
    raise AssertionError("the step was recomputed although its inputs did not change")


@pytest.fixture
def no_plots(monkeypatch):
    """Plots are not what these tests check; skipping them keeps the tests fast."""
    from sftlens.reporting import plots

    for name in ("plot_weights", "plot_representations", "plot_heads"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)


# -- RunFolder.step -------------------------------------------------------------------------------


def test_step_skips_same_inputs_and_recomputes_changed_ones(tmp_path):
    run = RunFolder(tmp_path)
    first = run.step("s", {"a": 1, "b": [1, 2]}, lambda: [row("m", 1.0), row("m", 2.0, layer=1)])
    # same inputs (key order does not matter), even from a new RunFolder of the same path
    again = RunFolder(tmp_path).step("s", {"b": [1, 2], "a": 1}, must_not_run)
    assert again == first
    changed = RunFolder(tmp_path).step("s", {"a": 2, "b": [1, 2]}, lambda: [row("m", 5.0)])
    assert changed == [row("m", 5.0)]
    assert RunFolder(tmp_path).metrics() == [row("m", 5.0)]  # layer 1's old row is gone too
    assert json.loads((tmp_path / "config.json").read_text())["steps"]["s"]["inputs"]["a"] == 2


def test_recomputed_step_drops_its_stale_metrics_and_keeps_other_steps(tmp_path):
    run = RunFolder(tmp_path)
    run.step("other", {}, lambda: [row("x", 7.0, layer=None)])
    run.step("s", {"attention": True}, lambda: [row("cka", 0.9), row("attn_js", 0.1)])
    run.step("s", {"attention": False}, lambda: [row("cka", 0.8)])
    assert sorted((r["metric"], r["value"]) for r in run.metrics()) == [("cka", 0.8), ("x", 7.0)]
    # and the other step still resumes
    assert run.step("other", {}, must_not_run) == [row("x", 7.0, layer=None)]


def test_step_recomputes_when_its_rows_are_gone(tmp_path):
    run = RunFolder(tmp_path)
    run.step("s", {}, lambda: [row("m", 1.0)])
    (tmp_path / "metrics.csv").unlink()
    assert run.step("s", {}, lambda: [row("m", 3.0)]) == [row("m", 3.0)]


def test_step_recomputes_over_a_record_without_its_metrics_list(tmp_path):
    """A step record without "metrics" (config.json edited by hand, or written by another
    writer, like trajectory's): the step recomputes over it; the other steps' rows stay."""
    run = RunFolder(tmp_path)
    run.step("other", {}, lambda: [row("x", 7.0, layer=None)])
    config = json.loads((tmp_path / "config.json").read_text())
    config["steps"]["s"] = {"hash": "from another version", "inputs": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = RunFolder(tmp_path)
    assert run.step("s", {}, lambda: [row("m", 3.0)]) == [row("m", 3.0)]
    assert sorted(r["metric"] for r in RunFolder(tmp_path).metrics()) == ["m", "x"]
    assert RunFolder(tmp_path).step("s", {}, must_not_run) == [row("m", 3.0)]


def test_step_without_write_leaves_the_folder_alone(tmp_path):
    run = RunFolder(tmp_path)
    assert run.step("s", {}, lambda: [row("m", 1.0)], write=False) == [row("m", 1.0)]
    assert not (tmp_path / "metrics.csv").exists() and "s" not in run.state["steps"]


def test_run_folder_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SftlensError, match=r"is a file, not a folder"):
        RunFolder(tmp_path / "file")
    with pytest.raises(SftlensError, match=r"part of its path is a file"):
        RunFolder(tmp_path / "file" / "run")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(SftlensError, match=r"not valid JSON.*delete it") as info:
        RunFolder(tmp_path / "bad")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("model.safetensors", True),
        ("config.json", True),
        ("tokenizer.json", True),  # tokens fed to the models in analyze
        ("README.md", False),
    ],
)
def test_fingerprint_follows_the_files_that_decide_results(tiny_pair, tmp_path, name, changes):
    folder = shutil.copytree(tiny_pair[1], tmp_path / "m")
    (folder / "README.md").write_text("notes")
    before = fingerprint(folder)["files"]
    with open(folder / name, "ab") as f:
        f.write(b" ")
    assert (fingerprint(folder)["files"] != before) is changes


# -- weights --------------------------------------------------------------------------------------


def _perturb_layer(folder: Path, layer: int) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] += 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def _weights_table(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "metrics.csv") as f:
        return {(r["layer"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


def test_weights_resume_and_recompute_on_changed_checkpoint_bytes(
    tiny_pair, tmp_path, monkeypatch, no_plots
):
    from sftlens import weight_diff

    base, sft_src = tiny_pair
    sft = shutil.copytree(sft_src, tmp_path / "sft")
    out = tmp_path / "run"
    api.weights(str(base), str(sft), out=str(out), progress=False)
    first = _weights_table(out)

    real = weight_diff.weight_diff
    monkeypatch.setattr(weight_diff, "weight_diff", lambda *a, **k: must_not_run())
    # progress changes no number: no rerun; nor does moving the run folder (out)
    api.weights(str(base), str(sft), out=str(out), progress=True)
    moved = shutil.copytree(out, tmp_path / "moved")
    api.weights(str(base), str(sft), out=str(moved), progress=False)
    assert _weights_table(moved) == first

    _perturb_layer(sft, 1)  # same path, new bytes
    with pytest.raises(AssertionError, match="recomputed"):
        api.weights(str(base), str(sft), out=str(out), progress=False)
    monkeypatch.setattr(weight_diff, "weight_diff", real)
    api.weights(str(base), str(sft), out=str(out), progress=False)
    second = _weights_table(out)
    assert second[("1", "dw_q")] > first[("1", "dw_q")] + 1.0
    assert second[("3", "dw_q")] == first[("3", "dw_q")]


# -- analyze --------------------------------------------------------------------------------------


def state_meta(out: Path) -> dict[str, str]:
    """The inputs key and next batch stored inside the analyze checkpoint file."""
    meta = api._read_state_meta(out / ".analyze_state.safetensors")
    assert meta is not None
    assert not (out / ".analyze_state.json").exists()  # one file: one rename per checkpoint
    return meta


def _analyze(base, sft, out, data, **kw):
    opts = dict(
        out=str(out),
        data=str(data),
        max_prompts=6,
        batch_size=3,
        max_length=32,
        attention=False,
        progress=False,
    )
    opts.update(kw)
    return api.analyze(str(base), str(sft), **opts)


def _table(out: Path) -> dict[tuple[str, str, str], float]:
    with open(out / "metrics.csv") as f:
        return {
            (r["model"], r["layer"], r["metric"]): float(r["value"] or "nan")
            for r in csv.DictReader(f)
        }


def test_analyze_skips_unchanged_inputs_and_recomputes_changed_ones(
    tiny_pair, tmp_path, monkeypatch, no_plots
):
    from sftlens import representations

    base, sft = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    _analyze(base, sft, out, data)
    first = _table(out)

    real = representations.run_pass
    monkeypatch.setattr(representations, "run_pass", lambda *a, **k: must_not_run())
    # options that change no number: progress, device, out (a moved folder), allow_pickle
    _analyze(base, sft, out, data, progress=True, device="cpu", allow_pickle=True)
    moved = shutil.copytree(out, tmp_path / "moved")
    _analyze(base, sft, moved, data)
    assert _table(moved) == first

    # each of these changes a result, so each must reach the computation again
    for change in ({"alpha": 2.0}, {"max_prompts": 5}, {"text": "question"}, {"pooling": "last"}):
        with pytest.raises(AssertionError, match="recomputed"):
            _analyze(base, sft, out, data, **change)
    write_data(data, edit=2)  # same path, one question edited
    with pytest.raises(AssertionError, match="recomputed"):
        _analyze(base, sft, out, data)

    monkeypatch.setattr(representations, "run_pass", real)
    _analyze(base, sft, out, data)
    edited = _table(out)
    assert edited[("pair", "2", "cka")] != first[("pair", "2", "cka")]


def test_rerun_without_attention_drops_the_old_attention_rows(tiny_pair, tmp_path, no_plots):
    base, sft = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    _analyze(base, sft, out, data, attention=True, max_prompts=3)
    assert "attn_js" in {k[2] for k in _table(out)}
    _analyze(base, sft, out, data, attention=False, max_prompts=3)
    names = {k[2] for k in _table(out)}
    assert "cka" in names and not names & {"attn_js", "attn_entropy"}


def test_stale_analysis_state_from_other_inputs_is_discarded(
    tiny_pair, tmp_path, monkeypatch, no_plots
):
    """A state checkpoint written with alpha=1 must not seed a run with alpha=2."""
    from sftlens import representations

    base, sft = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(max_prompts=10, batch_size=1)  # 10 batches: a state is saved after batch 8
    fresh = tmp_path / "fresh"
    _analyze(base, sft, fresh, data, alpha=2.0, **kw)

    real = representations.RepresentationPass.update
    calls = {"n": 0}

    def counting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # the crash
        return real(self, *a, **k)

    monkeypatch.setattr(representations.RepresentationPass, "update", counting)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _analyze(base, sft, out, data, alpha=1.0, **kw)
    assert state_meta(out)["next_batch"] == "8"

    calls["n"] = -100
    _analyze(base, sft, out, data, alpha=2.0, **kw)
    assert calls["n"] == -100 + 10  # every batch ran again: nothing was resumed
    assert not (out / ".analyze_state.safetensors").exists()
    got, want = _table(out), _table(fresh)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12, nan_ok=True), k


# -- sft ------------------------------------------------------------------------------------------


def _sft(model, out, data, **kw):
    opts = dict(
        out=str(out),
        data=str(data),
        steps=3,
        batch_size=2,
        lr=1e-3,
        warmup_ratio=0.0,
        max_length=48,
        save_every=1,
        device="cpu",
        progress=False,
    )
    opts.update(kw)
    return api.sft(str(model), **opts)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_sft_stale_checkpoint_from_another_config_is_not_resumed(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    fresh = _sft(base, tmp_path / "fresh", data, lr=2e-3)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _sft(base, out, data, lr=1e-3)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    _sft(base, out, data, lr=2e-3)  # another lr: start over from the base model
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]
    _assert_same_weights(out, fresh)
    # the other config's step-2 snapshot is gone; this run's own (save_every 2) replaced it
    snapshot = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert snapshot["config_hash"] == state["config_hash"]


def test_sft_reuses_a_finished_run_unless_model_or_data_bytes_change(
    tiny_pair, tmp_path, monkeypatch
):
    from sftlens.models import loading

    base_src, _ = tiny_pair
    base = shutil.copytree(base_src, tmp_path / "base")
    data = write_data(tmp_path / "d.jsonl")
    out = _sft(base, tmp_path / "run", data)
    trained = _weights(out)

    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: must_not_run())
    # options that change no weight: progress, save_every, device; and a moved output folder
    _sft(base, out, data, progress=True, save_every=0, device="auto")
    moved = shutil.copytree(out, tmp_path / "moved")
    _sft(base, moved, data)

    write_data(data, edit=0)  # same path, other data
    with pytest.raises(AssertionError, match="recomputed"):
        _sft(base, out, data)
    write_data(data)
    _perturb_layer(base, 0)  # same path, other starting weights
    with pytest.raises(AssertionError, match="recomputed"):
        _sft(base, out, data)
    monkeypatch.setattr(loading, "load_model", real)
    _sft(base, out, data)
    retrained = _weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(retrained[key], trained[key], atol=0.1)


# -- RunFolder's files, whole ------------------------------------------------------------------


def test_run_folder_error_messages_whole(tmp_path, monkeypatch):
    """Each --out problem is its own one-line message, matched whole."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        SftlensError,
        match=rf"^--out {tmp_path / 'file'} is a file, not a folder; pass a folder for the "
        r"results \(a new one is created\)$",
    ):
        RunFolder(tmp_path / "file")
    with pytest.raises(
        SftlensError,
        match=rf"^cannot create the --out folder {tmp_path / 'file' / 'run'}: part of its path "
        r"is a file; pass a path under a folder$",
    ):
        RunFolder(tmp_path / "file" / "run")
    for bad in (b"{not json", b"\xff\xfe{}"):  # not JSON; not even UTF-8
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "config.json").write_bytes(bad)
        with pytest.raises(
            SftlensError,
            match=rf"^{tmp_path / 'bad' / 'config.json'} is not valid JSON \(edited by hand\?\); "
            r"fix it, or delete it to recompute every step of this run$",
        ):
            RunFolder(tmp_path / "bad")

    def denied(self, *args, **kwargs):  # root may write anywhere: deny by hand
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(
        SftlensError,
        match=rf"^cannot create the --out folder {tmp_path / 'new'}: permission denied; "
        r"pass a folder you can write to$",
    ):
        RunFolder(tmp_path / "new")


def test_config_json_records_each_step_and_the_versions(tmp_path):
    from importlib import metadata
    from platform import python_version

    from sftlens.io import config_hash

    run = RunFolder(tmp_path / "run" / "nested")  # parents are created
    assert (tmp_path / "run" / "nested" / "plots").is_dir()
    run.step("s", {"b": [1, 2], "a": 1}, lambda: [row("z", 1.0), row("m", 2.0), row("m", 3.0, 1)])
    saved = json.loads((tmp_path / "run" / "nested" / "config.json").read_text())
    step = saved["steps"]["s"]
    assert step["hash"] == config_hash({"a": 1, "b": [1, 2]})
    assert step["inputs"] == {"a": 1, "b": [1, 2]}
    assert step["metrics"] == ["m", "z"]
    assert isinstance(step["seconds"], float) and step["seconds"] >= 0.0
    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    packages = ("sftlens", "torch", "transformers", "peft", "safetensors", "accelerate", "gguf")
    assert saved["versions"] == {
        "python": python_version(),
        **{p: metadata.version(p) for p in packages if p in installed},  # an optional one may lack
    }
    # a reopened folder keeps the steps and records this process's versions again
    again = RunFolder(tmp_path / "run" / "nested")
    assert again.state["steps"] == saved["steps"] and again.state["versions"] == saved["versions"]


def test_metrics_csv_is_sorted_by_metric_model_then_layer_with_no_layer_last(tmp_path):
    run = RunFolder(tmp_path)
    rows = [
        row("b", 1.0, None, "sft"),
        row("b", 2.0, 10, "pair"),
        row("b", 3.0, 2, "pair"),
        row("b", 4.0, None, "pair"),
        row("b", 5.0, 1, "other"),
        row("b", 6.0, 3, "base"),
        row("a", 7.0, 5, "base"),
    ]
    run.add_metrics(rows)
    got = [(r["metric"], r["model"], r["layer"]) for r in RunFolder(tmp_path).metrics()]
    assert got == [
        ("a", "base", 5),
        ("b", "base", 3),
        ("b", "sft", None),
        ("b", "pair", 2),
        ("b", "pair", 10),  # numeric order, not "10" < "2"
        ("b", "pair", None),
        ("b", "other", 1),
    ]


def test_summary_json_merges_and_is_empty_before_any_write(tmp_path):
    run = RunFolder(tmp_path)
    assert run.summary() == {}
    run.write_summary({"a": 1, "b": 2})
    run.write_summary({"b": 3, "c": 4})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1, "b": 3, "c": 4}
    assert RunFolder(tmp_path).summary() == {"a": 1, "b": 3, "c": 4}


def test_fingerprint_lists_each_deciding_file_with_its_size_and_sha256(tmp_path):
    import hashlib

    folder = tmp_path / "ckpt"
    folder.mkdir()
    files = {"model.safetensors": b"w" * 7, "config.json": b"{}", "notes.md": b"no"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    got = fingerprint(tmp_path / "ckpt" / ".." / "ckpt")
    assert got == {
        "path": str(folder.resolve()),
        "files": {
            n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()
            if n != "notes.md"
        },
    }
    (folder / "config.json").write_bytes(b'{"a": 1}')  # rewritten: not the remembered hash
    assert fingerprint(folder)["files"]["config.json"]["sha256"] == (
        hashlib.sha256(b'{"a": 1}').hexdigest()
    )


def test_item_log_keeps_items_of_its_key_only(tmp_path):
    from sftlens.run import ItemLog

    path = tmp_path / "items.json"
    log = ItemLog(path, "k1")
    assert "a" not in log and list(log) == []
    log.put("a", {"v": 1})
    log.put("b", {"v": 2})
    assert json.loads(path.read_text()) == {"key": "k1", "items": {"a": {"v": 1}, "b": {"v": 2}}}
    again = ItemLog(path, "k1")
    assert "a" in again and list(again) == ["a", "b"] and again["b"] == {"v": 2}
    assert ItemLog(path, "k2").items == {}
