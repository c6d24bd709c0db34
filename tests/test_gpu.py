"""The GPU path: every command on CUDA gives the numbers of the CPU float32 run.

Marked ``gpu`` (deselected by default) and skipped without a CUDA device. On a GPU machine::

    pytest -m gpu tests/test_gpu.py

Two comparisons per command, on the tiny random pair of ``conftest.py``:

- ``--device cuda --dtype float32`` against the CPU: the same math with other kernels and
  another summation order, so :data:`FP32` is tight. A device bug (a tensor left on the CPU,
  an accumulator reset on a move, a rank's batches dropped) shows here.
- ``--device cuda --dtype bfloat16`` (what ``--dtype auto`` picks on a GPU) against the CPU
  float32 run: the weights themselves are rounded to 8 bits of mantissa, so hidden states move
  by ~1e-2 relative; :data:`BF16` is that error with a margin (measured on the CPU with
  ``--dtype bfloat16``, which runs the same rounded weights; docs/scale.md).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftlens.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: cuda float32 vs cpu float32
FP32 = {"rel": 1e-4, "abs": 1e-5}
#: cuda bfloat16 vs cpu float32 (bf16 weights; float64 reductions on both sides)
BF16 = {"rel": 5e-2, "abs": 2e-2}
TOL = {"float32": FP32, "bfloat16": BF16}
SMALL = ["--data", "synthetic", "--no-progress"]


def metrics(run: Path) -> dict[tuple[str, str, str], float]:
    """``metrics.csv`` as {(model, layer, metric): value}."""
    with open(run / "metrics.csv", newline="") as f:
        return {
            (r["model"], r["layer"], r["metric"]): float(r["value"] or "nan")
            for r in csv.DictReader(f)
        }


def assert_close_tables(
    got: dict[tuple[str, str, str], float],
    want: dict[tuple[str, str, str], float],
    tol: dict[str, float],
    skip: tuple[str, ...] = (),
) -> None:
    """Same rows, every value within ``tol`` (NaN only where the reference is NaN)."""
    assert got.keys() == want.keys()
    checked = 0
    for key, ref in want.items():
        if key[2] in skip:
            continue
        assert got[key] == pytest.approx(ref, nan_ok=True, **tol), key
        checked += not math.isnan(ref)
    assert checked > 0, "nothing numeric to compare"


def run(args: list[str]) -> None:
    assert main([*args, *SMALL]) == 0


def config_of(run_dir: Path, section: str) -> dict:
    return json.loads((run_dir / "config.json").read_text())[section]


def test_weights_on_cuda_equal_cpu(tiny_pair, tmp_path):
    base, sft = map(str, tiny_pair)
    assert main(["weights", base, sft, "--out", str(tmp_path / "cpu"), "--no-progress"]) == 0
    cmd = ["weights", base, sft, "--out", str(tmp_path / "gpu"), "--device", "cuda"]
    assert main([*cmd, "--no-progress"]) == 0
    # same float32 differences, float64 sums in another order
    assert_close_tables(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), {"rel": 1e-9})


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "phi3"])
def test_weights_of_fused_projections_on_cuda_equal_cpu(tmp_path, model_type):
    """Fused q/k/v (and gate/up) tensors are split on --device: both checkpoints' parts there
    (mutation/answers-core.md: weight_diff #248)."""
    from test_weight_diff import _save_pair

    base, sft = (str(p) for p in _save_pair(tmp_path, model_type)[:2])
    assert main(["weights", base, sft, "--out", str(tmp_path / "cpu"), "--no-progress"]) == 0
    cmd = ["weights", base, sft, "--out", str(tmp_path / "gpu"), "--device", "cuda"]
    assert main([*cmd, "--no-progress"]) == 0
    assert_close_tables(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), {"rel": 1e-9})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_analyze_on_cuda_matches_cpu_float32(tiny_pair, tmp_path, dtype):
    base, sft = map(str, tiny_pair)
    common = ["analyze", base, sft, "--max-prompts", "12", "--batch-size", "4"]
    common += ["--max-length", "96"]
    run([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    run([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--dtype", dtype])
    assert config_of(tmp_path / "gpu", "analyze")["dtype"] == dtype
    assert_close_tables(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), TOL[dtype])


@pytest.mark.parametrize("activations", ["memory", "disk"])
def test_analyze_stream_layers_on_cuda_matches_cpu(tiny_pair, tmp_path, activations):
    """Layer-major on the GPU: blocks, activations (or their spill file) and the per-layer
    accumulators follow --device; the rows equal the in-memory CPU run's."""
    base, sft = map(str, tiny_pair)
    common = ["analyze", base, sft, "--max-prompts", "12", "--batch-size", "4"]
    common += ["--max-length", "96"]
    run([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    gpu = ["--out", str(tmp_path / "gpu"), "--device", "cuda", "--dtype", "float32"]
    run([*common, *gpu, "--stream-layers", "--activations", activations])
    assert_close_tables(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), TOL["float32"])


def test_analyze_dtype_auto_is_bf16_on_cuda_and_accumulators_stay_float64_there(tiny_pair):
    from sftlens.config import AnalyzeConfig
    from sftlens.models.loading import load_model
    from sftlens.representations import run_pass

    cfg = AnalyzeConfig(base=str(tiny_pair[0]), sft=str(tiny_pair[1]))
    assert cfg.dtype == "bfloat16"  # --dtype auto, --device auto on a GPU machine
    base, tok = load_model(
        tiny_pair[0], dtype=cfg.dtype, device=cfg.device, attn_implementation="eager"
    )
    sft, _ = load_model(
        tiny_pair[1], dtype=cfg.dtype, device=cfg.device, attn_implementation="eager"
    )
    assert next(base.parameters()).dtype == torch.bfloat16
    acc = run_pass(
        base,
        sft,
        tok,
        ["1 + 1 = 2", "two plus three is five"],
        batch_size=2,
        max_length=32,
        progress=False,
    )
    cka = acc.layers[0].cka
    assert cka.sxx.device.type == "cuda" and cka.sxx.dtype == torch.float64
    assert acc.layers[0].pooled["base"].rows.device.type == "cpu"  # grows with the data: host


def test_host_accumulators_take_inputs_from_the_gpu():
    """Accumulators kept on the host, fed GPU tensors (and router masks on the other device),
    equal the all-CPU result: each update moves its sums to the accumulator's device. On one
    device these moves are no-ops, so only a second device checks them (mutation/answers-core.md:
    PromptEntropy.update #2, _add #3 #6, RoutingStats.update #17 #20 #23, routing._real #19,
    AttentionStats.update #29)."""
    from sftlens.metrics.accumulators import AttentionStats, PromptEntropy, RoutingStats

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    want = PromptEntropy(2.0, device="cpu")
    got = PromptEntropy(2.0, device="cpu", background=False)  # GPU Grams summed on the GPU
    want.update_batch(h, mask)
    got.update_batch(h.cuda(), mask.cuda())
    want.update(h[1])
    got.update(h[1].cuda())
    assert got.compute() == pytest.approx(want.compute(), rel=1e-9)
    assert got.raw_sum.device.type == "cpu"

    base, sft = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    want, got, other = RoutingStats(4, 2), RoutingStats(4, 2, device="cpu"), RoutingStats(4, 2)
    want.update(base, sft, mask[:2])
    got.update(base.cuda(), sft.cuda(), mask[:2])  # GPU logits, host accumulator and mask
    other.update(base, sft, mask[:2].cuda())  # host logits, a mask left on the GPU
    for acc in (got, other):
        for name in RoutingStats._state:
            assert getattr(acc, name).device.type == "cpu"
            torch.testing.assert_close(getattr(acc, name), getattr(want, name), rtol=1e-9, atol=0)

    attn = torch.softmax(torch.randn(2, 2, 3, 5, 5, generator=g), dim=-1)  # (base/sft, B, H, Q, K)
    want, got = AttentionStats(3), AttentionStats(3, device="cpu")
    want.update(attn[0], attn[1], mask[:2], mask[:2])
    got.update(attn[0].cuda(), attn[1].cuda(), mask[:2].cuda(), mask[:2].cuda())
    for name in AttentionStats._state:
        assert getattr(got, name).device.type == "cpu"
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=0)


def test_prompt_entropy_solved_on_host_threads_keeps_float64():
    """On a GPU the prompt Grams go to pinned host buffers and are solved on host threads
    (the default there): the same float64 numbers as the CPU, not float32-rounded Grams
    (mutation/answers-core.md: PromptEntropy.update_batch #50 #51 #55 #65)."""
    from sftlens.metrics.accumulators import PromptEntropy

    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    for preset in ("default", "paper"):
        want, got = PromptEntropy(2.0, preset), PromptEntropy(2.0, preset, device="cuda")
        want.update_batch(h, mask)
        got.update_batch(h.cuda(), mask.cuda())
        assert got._pending, "CUDA Grams are solved in the background by default"
        assert got.compute() == pytest.approx(want.compute(), rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_on_cuda_matches_cpu_float32(tiny_pair, tmp_path, dtype):
    base, sft = map(str, tiny_pair)
    common = ["probe", base, sft, "--max-prompts", "6", "--batch-size", "3", "--max-length", "96"]
    run([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    run([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--dtype", dtype])
    # argmax agreement and accuracy are counts: one flipped near-tie moves them by 1/tokens
    skip = () if dtype == "float32" else ("probe_acc", "probe_agreement")
    assert_close_tables(metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu"), TOL[dtype], skip)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_teacher_forced_on_cuda_matches_cpu_float32(tiny_pair, tmp_path, dtype):
    base = str(tiny_pair[0])
    common = ["eval", base, "--limit", "6", "--shots", "0", "--batch-size", "3"]
    common += ["--max-new-tokens", "6"]
    run([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    run([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--dtype", dtype])
    got, want = metrics(tmp_path / "gpu"), metrics(tmp_path / "cpu")
    # generation accuracy is greedy argmax on a random model: only float32 must agree exactly
    skip = () if dtype == "float32" else tuple(k[2] for k in want if "answer_" not in k[2])
    assert_close_tables(got, want, TOL[dtype], skip)


def scores(path: Path) -> list[tuple[float, float]]:
    """(answer_nll, answer_token_acc) of every row of a swap.csv / interpolate.csv."""
    with open(path, newline="") as f:
        return [(float(r["answer_nll"]), float(r["answer_token_acc"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("command", ["swap", "interpolate"])
def test_swap_and_interpolate_on_cuda_match_cpu(tiny_pair, tmp_path, command):
    base, sft = map(str, tiny_pair)
    extra = ["--blocks", "2"] if command == "swap" else ["--alphas", "0,0.5,1"]
    common = [command, base, sft, "--limit", "4", "--batch-size", "2", *extra]
    run([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    run([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--dtype", "float32"])
    got, want = (scores(tmp_path / o / f"{command}.csv") for o in ("gpu", "cpu"))
    assert len(got) == len(want) > 2
    for g, w in zip(got, want):
        assert g == pytest.approx(w, **FP32)


def _train(command: str, model: str, out: Path, *extra: str) -> dict:
    args = [command, model, "--max-examples", "8", "--steps", "3", "--batch-size", "2"]
    args += ["--lr", "1e-3", "--max-length", "64", "--save-every", "2", "--out", str(out)]
    run([*args, *extra])
    return json.loads((out / "trainer_state.json").read_text())


def test_sft_on_cuda_matches_cpu_and_auto_keeps_float32_master_weights(tiny_pair, tmp_path):
    from safetensors.torch import load_file

    base = str(tiny_pair[0])
    cpu = _train("sft", base, tmp_path / "cpu", "--device", "cpu")
    gpu = _train("sft", base, tmp_path / "gpu", "--device", "cuda")  # --dtype auto
    assert gpu["config"]["dtype"] == "float32"  # full SFT: float32 weights on a GPU too
    assert gpu["peak_memory_mb"] > 0 and gpu["mixed_precision"] == "no"
    for a, b in zip(gpu["history"], cpu["history"]):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], **FP32)
    wa, wb = (load_file(tmp_path / o / "model.safetensors") for o in ("gpu", "cpu"))
    for k in wb:
        # Adam divides by sqrt(v): rounding noise in a tiny gradient moves its step most
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_tune_on_cuda_matches_cpu(tiny_pair, tmp_path, dtype):
    base = str(tiny_pair[0])
    cpu = _train("tune", base, tmp_path / "cpu", "--mask", "01110", "--device", "cpu")
    gpu = _train(
        "tune", base, tmp_path / "gpu", "--mask", "01110", "--device", "cuda", "--dtype", dtype
    )
    want = "float32" if dtype == "float32" else "bfloat16"  # auto: a bf16 frozen base
    assert gpu["config"]["dtype"] == want
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["peak_memory_mb"] > 0
    tol = FP32 if dtype == "float32" else BF16
    for a, b in zip(gpu["history"], cpu["history"]):
        assert a["loss"] == pytest.approx(b["loss"], **tol)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_torchrun_two_gpus_analyze_equals_one_gpu(tiny_pair, tmp_path):
    """NCCL for the float64 sums (on each rank's own GPU), gloo for the pooled rows."""
    base, sft = map(str, tiny_pair)
    common = ["analyze", base, sft, "--max-prompts", "12", "--batch-size", "2"]
    common += ["--max-length", "96", "--dtype", "float32", *SMALL]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None
    launch = [torchrun, "--nproc-per-node", "2", "--master-port", "29544", "-m", "sftlens"]
    proc = subprocess.run(
        [*launch, *common, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert_close_tables(metrics(tmp_path / "two"), metrics(tmp_path / "one"), FP32)


def _launch(launcher: list[str], args: list[str]) -> None:
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _bin(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    assert path is not None, f"{name} is not installed next to {sys.executable}"
    return path


TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)


def _sft_args(out: Path, batch: int) -> list[str]:
    return ["-m", "sftlens", "sft", "--max-examples", "16", "--steps", "3", "--batch-size",
            str(batch), "--lr", "1e-3", "--max-length", "64", "--save-every", "2",
            "--data", "synthetic", "--no-progress", "--out", str(out)]  # fmt: skip


def _compare_sft(a: Path, b: Path, tol: dict[str, float]) -> None:
    from safetensors.torch import load_file

    sa, sb = (json.loads((x / "trainer_state.json").read_text()) for x in (a, b))
    assert sa["world_size"] == 2 and sb["world_size"] == 1
    assert [h["tokens"] for h in sa["history"]] == [h["tokens"] for h in sb["history"]]
    for x, y in zip(sa["history"], sb["history"]):
        assert x["loss"] == pytest.approx(y["loss"], **tol)
    wa, wb = (load_file(x / "model.safetensors") for x in (a, b))
    assert wa.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


@TWO_GPUS
def test_torchrun_two_gpus_sft_ddp_equals_one_gpu(tiny_pair, tmp_path):
    """DDP over NCCL: the same global batch as one GPU with twice the micro-batch."""
    base = str(tiny_pair[0])
    args = _sft_args(tmp_path / "ddp", 2)
    args.insert(3, base)
    _launch([_bin("torchrun"), "--nproc-per-node", "2", "--master-port", "29545"], args[:])
    single = _sft_args(tmp_path / "one", 4)
    single.insert(3, base)
    assert main(single[2:]) == 0
    _compare_sft(tmp_path / "ddp", tmp_path / "one", FP32)


@TWO_GPUS
def test_accelerate_fsdp_example_config_trains_sft_like_one_gpu(tiny_pair, tmp_path):
    """examples/accelerate/fsdp.yaml on 2 GPUs (mixed precision off, to compare in float32):
    sharded training gives one GPU's losses and weights, and a standard model folder."""
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"
    base = str(tiny_pair[0])
    args = _sft_args(tmp_path / "fsdp", 2)
    args.insert(3, base)
    launcher = [_bin("accelerate"), "launch", "--config_file", str(config)]
    launcher += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29546"]
    _launch(launcher, args)
    assert not list((tmp_path / "fsdp").glob("checkpoint-*"))
    single = _sft_args(tmp_path / "one", 4)
    single.insert(3, base)
    assert main(single[2:]) == 0
    _compare_sft(tmp_path / "fsdp", tmp_path / "one", FP32)
