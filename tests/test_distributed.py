"""Data-parallel analysis: 2 CPU processes on gloo (torchrun) give the single-process numbers."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sftlens.cli import main


def _torchrun_two_ranks(args: list[str], port: int) -> None:
    """``torchrun --nproc-per-node 2 -m sftlens ARGS`` on gloo (CPU), asserting success."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(port), "-m", "sftlens", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _table(path):
    with open(path) as f:
        return {
            (r["model"], r["layer"], r["metric"]): float(r["value"] or "nan")
            for r in csv.DictReader(f)
        }


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
@pytest.mark.parametrize("stream", [False, True], ids=["in_memory", "stream_layers"])
def test_torchrun_two_gloo_ranks_match_single_process(tiny_pair, tmp_path, stream):
    base, sft = tiny_pair
    common = [
        "analyze",
        str(base),
        str(sft),
        "--data",
        "synthetic",
        "--max-prompts",
        "12",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--no-progress",
    ]
    # the single process runs in memory: a layer-major 2-rank run must give its numbers
    assert main([*common, "--no-stream-layers", "--out", str(tmp_path / "single")]) == 0
    flag = "--stream-layers" if stream else "--no-stream-layers"
    _torchrun_two_ranks([*common, flag, "--out", str(tmp_path / "ddp")], port=29533 + 10 * stream)
    import json

    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    single, ddp = (
        _table(tmp_path / "single" / "metrics.csv"),
        _table(tmp_path / "ddp" / "metrics.csv"),
    )
    assert single.keys() == ddp.keys()
    assert {k[2] for k in single} >= {"cka", "cka_pooled", "prompt_entropy", "erank", "attn_js"}
    # NaN == NaN passes below, so a table of NaNs would too: every value must be a number
    assert all(math.isfinite(v) for v in single.values()), "NaN/inf in the single-process run"
    for k in single:
        assert ddp[k] == pytest.approx(single[k], rel=1e-6, abs=1e-9, nan_ok=True), k


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
def test_torchrun_two_gloo_ranks_train_sft_with_ddp(tiny_pair, tmp_path):
    import json

    from safetensors.torch import load_file

    base, _ = tiny_pair
    args = [
        "sft",
        str(base),
        "--data",
        "synthetic",
        "--max-examples",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--max-length",
        "64",
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    _torchrun_two_ranks([*args, "--out", str(tmp_path / "ddp")], port=29534)
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    # one process with twice the micro-batch sees the same examples per step
    assert main([*args[:9], "4", *args[10:], "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "trainer_state.json").read_text())
    assert [h["tokens"] for h in state["history"]] == [h["tokens"] for h in single["history"]]
    for h_ddp, h_one in zip(state["history"], single["history"]):
        assert h_ddp["loss"] == pytest.approx(h_one["loss"], rel=1e-4)
    a, b = (
        load_file(tmp_path / "ddp" / "model.safetensors"),
        load_file(tmp_path / "single" / "model.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
def test_torchrun_two_gloo_ranks_train_the_same_lora_adapter_as_one_process(tiny_pair, tmp_path):
    import json

    from safetensors.torch import load_file

    base, _ = tiny_pair

    def args(batch: int, out: str) -> list[str]:
        return [
            "tune",
            str(base),
            "--mask",
            "01110",
            "--data",
            "synthetic",
            "--max-examples",
            "16",
            "--steps",
            "3",
            "--batch-size",
            str(batch),
            "--lr",
            "1e-2",
            "--max-length",
            "64",
            "--save-every",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / out),
        ]

    _torchrun_two_ranks(args(2, "ddp"), port=29535)
    assert main(args(4, "single")) == 0  # one process, twice the micro-batch: same global batch
    ddp, single = (
        json.loads((tmp_path / o / "summary.json").read_text()) for o in ("ddp", "single")
    )
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["layers"] == single["layers"] == [1, 2, 3]
    hd, hs = (
        json.loads((tmp_path / o / "trainer_state.json").read_text())["history"]
        for o in ("ddp", "single")
    )
    assert [h["tokens"] for h in hd] == [h["tokens"] for h in hs]
    for a, b in zip(hd, hs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = (
        load_file(tmp_path / o / "adapter" / "adapter_model.safetensors") for o in ("ddp", "single")
    )
    assert wa.keys() == wb.keys() and len(wa) == 3 * 4 * 2
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
def test_sft_sharded_by_fsdp2_on_two_cpu_ranks_equals_one_process(tiny_pair, tmp_path):
    """sft's FSDP path with real sharding: accelerate's FSDP2 forced onto 2 gloo ranks
    (``fsdp_cpu_launch.py``). Same losses and final weights as one process with the global
    batch, and no resumable checkpoint on the way."""
    from safetensors.torch import load_file

    base, _ = tiny_pair
    options = dict(
        model=str(base), data="synthetic", max_examples=16, steps=3, lr=1e-3, max_length=64,
        save_every=1, device="cpu", progress=False,
    )  # fmt: skip
    script = os.path.join(os.path.dirname(__file__), "fsdp_cpu_launch.py")
    config = json.dumps({**options, "batch_size": 2, "out": str(tmp_path / "fsdp")})
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", "29536", script, config],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP: no resumable checkpoint" in proc.stderr
    assert not list((tmp_path / "fsdp").glob("checkpoint-*"))
    assert main(
        ["sft", str(base), "--data", "synthetic", "--max-examples", "16", "--steps", "3",
         "--batch-size", "4", "--lr", "1e-3", "--max-length", "64", "--device", "cpu",
         "--no-progress", "--out", str(tmp_path / "single")]
    ) == 0  # fmt: skip
    fsdp, single = (
        json.loads((tmp_path / o / "trainer_state.json").read_text()) for o in ("fsdp", "single")
    )
    assert fsdp["world_size"] == 2
    assert [h["tokens"] for h in fsdp["history"]] == [h["tokens"] for h in single["history"]]
    for a, b in zip(fsdp["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = (load_file(tmp_path / o / "model.safetensors") for o in ("fsdp", "single"))
    assert wa.keys() == wb.keys()
    moved = max(float((wb[k] - load_file(base / "model.safetensors")[k]).abs().max()) for k in wb)
    assert moved > 1e-4  # training moved the weights: equal weights are not the start point
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
def test_torchrun_with_the_default_device_on_a_cpu_machine_trains_ddp(tiny_pair, tmp_path):
    """``--device auto`` without a GPU under torchrun: accelerate must be told cpu=True, or
    each rank trains alone (world_size 1) into the same folder."""
    base, _ = tiny_pair
    _torchrun_two_ranks(
        ["sft", str(base), "--data", "synthetic", "--max-examples", "8", "--steps", "1",
         "--batch-size", "2", "--max-length", "48", "--no-progress", "--out", str(tmp_path / "o")],
        port=29537,
    )  # fmt: skip
    state = json.loads((tmp_path / "o" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
