"""Device and dtype choices that a CPU machine can check: ``--dtype auto`` / ``--device auto``
resolution (CUDA availability injected), per-rank GPUs under a launcher, accumulators following
the models' device, and the training path's FSDP branches (driven through a stub flag).

The runs on a real GPU are in ``test_gpu.py`` (marked ``gpu``)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from sftlens import config as C
from sftlens.errors import SftlensError
from sftlens.models import loading
from sftlens.models.loading import pick_dtype, resolve_device


@pytest.mark.parametrize(
    ("device", "cuda", "env", "want"),
    [
        ("auto", False, {}, "cpu"),
        ("auto", True, {}, "cuda"),
        ("auto", True, {"LOCAL_RANK": "1"}, "cuda:1"),  # torchrun rank 1: its own GPU
        ("cuda", True, {"LOCAL_RANK": "2"}, "cuda:2"),
        ("cuda:0", True, {"LOCAL_RANK": "2"}, "cuda:0"),  # an explicit index wins
        ("cpu", True, {"LOCAL_RANK": "2"}, "cpu"),
        ("auto", False, {"LOCAL_RANK": "1"}, "cpu"),  # gloo ranks on a CPU machine
    ],
)
def test_resolve_device(device, cuda, env, want):
    assert resolve_device(device, cuda_available=cuda, env=env) == want


def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(
        SftlensError, match="^--device cuda but torch sees no CUDA GPU.*--device cpu$"
    ):
        resolve_device("cuda", cuda_available=False)


@pytest.mark.parametrize(
    ("dtype", "device", "cuda", "on_cuda", "want"),
    [
        ("auto", "auto", True, "bfloat16", "bfloat16"),
        ("auto", "auto", False, "bfloat16", "float32"),  # bf16 on CPU is ~100x slower
        ("auto", "cpu", True, "bfloat16", "float32"),
        ("auto", "cuda:1", True, "bfloat16", "bfloat16"),
        ("auto", "cuda", True, "float32", "float32"),  # sft: float32 master weights
        ("float16", "cuda", True, "bfloat16", "float16"),  # explicit: kept
        ("bfloat16", "cpu", False, "bfloat16", "bfloat16"),
    ],
)
def test_pick_dtype(dtype, device, cuda, on_cuda, want):
    assert pick_dtype(dtype, device, cuda_available=cuda, on_cuda=on_cuda) == want


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend torch sees a CUDA GPU (config resolution only: nothing runs on it)."""
    monkeypatch.setattr(loading, "_cuda_available", lambda: True)


@pytest.fixture
def cpu_machine(monkeypatch):
    monkeypatch.setattr(loading, "_cuda_available", lambda: False)


INFERENCE = [C.AnalyzeConfig, C.ProbeConfig, C.SwapConfig, C.InterpolateConfig]


def _make(cls, **kw):
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    return cls(**{n: "m" for n in names}, **kw)


@pytest.mark.parametrize(
    "cls", [*INFERENCE, C.EvalConfig, C.SFTConfig, C.TuneConfig, C.SweepConfig]
)
def test_default_dtype_on_cpu_is_float32_as_before(cls, cpu_machine):
    """The default moved from 'float32' to 'auto'; on CPU it resolves to float32 in the config
    itself, so the options hashed into a run's key are those of earlier runs (they resume)."""
    cfg = _make(cls)
    assert cfg.dtype == "float32"
    assert dataclasses.asdict(cfg) == dataclasses.asdict(_make(cls, dtype="float32"))


@pytest.mark.parametrize("cls", [*INFERENCE, C.EvalConfig])
def test_default_dtype_on_a_gpu_is_bf16_unless_device_cpu(cls, gpu_machine):
    assert _make(cls).dtype == "bfloat16"
    assert _make(cls, device="cpu").dtype == "float32"
    assert _make(cls, dtype="float32").dtype == "float32"


def test_training_auto_dtype_on_a_gpu(gpu_machine):
    assert C.SFTConfig(model="m").dtype == "float32"  # master weights: bf16 loses small updates
    assert C.TuneConfig(model="m").dtype == "bfloat16"  # frozen base; PEFT keeps LoRA float32
    assert C.SweepConfig(model="m").dtype == "bfloat16"


def test_cuda_asked_on_a_cpu_machine_fails_at_the_config(cpu_machine):
    with pytest.raises(SftlensError, match="no CUDA GPU"):
        C.AnalyzeConfig(base="a", sft="b", device="cuda")


# -- accumulators follow the models ------------------------------------------------------------


def _states(acc):
    for name, a in acc.accumulators().items():
        for k, v in a.state_dict().items():
            yield f"{name}.{k}", v


def test_representation_state_moves_to_a_device_except_the_pooled_rows():
    from sftlens.representations import RepresentationPass

    acc = RepresentationPass(num_layers=2, hidden=4, num_heads=2)
    acc.to_("meta")  # a device other than the CPU, without a GPU
    placed = {name: v.device.type for name, v in _states(acc)}
    pooled = {n for n in placed if ".pooled." in n}
    assert pooled and all(placed[n] == "cpu" for n in pooled)  # grows with the data: host
    assert all(d == "meta" for n, d in placed.items() if n not in pooled), placed
    assert all(v.dtype == torch.float64 for _, v in _states(acc))


def test_a_state_moved_inside_inference_mode_stays_updatable_after_it():
    """analyze runs its pass under torch.inference_mode: a state moved there must not become
    inference tensors, which no in-place update (load_state_dict, another pass) may touch
    outside the block."""
    from sftlens.representations import RepresentationPass

    acc = RepresentationPass(num_layers=1, hidden=3, num_heads=1)
    with torch.inference_mode():
        acc.to_("meta")  # a real move (to CUDA on a GPU): a new tensor is made in the block
    assert not any(v.is_inference() for _, v in _states(acc))
    acc.layers[0].cka.sxx.add_(1.0)  # allowed outside the block


def test_run_pass_moves_the_state_to_the_models_device_before_feeding_it(tiny_pair, monkeypatch):
    """A state restored from a checkpoint lives on the CPU; run_pass moves it to the models'
    device (a GPU: no host copy per batch, NCCL can reduce it) before the first update."""
    from sftlens.models.loading import load_model
    from sftlens.representations import RepresentationPass, run_pass

    events: list[str] = []
    real_to, real_update = RepresentationPass.to_, RepresentationPass.update

    def to_(self, device):
        events.append(f"to {torch.device(device)}")
        real_to(self, device)

    def update(self, *a, **k):
        events.append("update")
        real_update(self, *a, **k)

    monkeypatch.setattr(RepresentationPass, "to_", to_)
    monkeypatch.setattr(RepresentationPass, "update", update)
    base, tok = load_model(tiny_pair[0], device="cpu", attn_implementation="eager")
    sft, _ = load_model(tiny_pair[1], device="cpu", attn_implementation="eager")
    run_pass(base, sft, tok, ["1 + 1 = 2", "2 + 3 = 5", "7 * 6 = 42"], batch_size=2,
             max_length=32, progress=False)  # fmt: skip
    assert events == ["to cpu", "update", "update"]


# -- training: the accelerate / FSDP branches ----------------------------------------------------


def test_precision_key_is_empty_without_mixed_precision():
    from sftlens.tuning.loop import precision_key

    assert precision_key(SimpleNamespace(mixed_precision="no")) == {}
    assert precision_key(SimpleNamespace(mixed_precision="bf16")) == {"mixed_precision": "bf16"}


def test_fsdp_leaves_the_weights_for_accelerate_to_place():
    from accelerate.utils import DistributedType

    from sftlens.tuning.loop import load_device, uses_fsdp

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device("cuda", 1))
    ddp = SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU, device=torch.device("cuda", 1)
    )
    assert uses_fsdp(fsdp) and not uses_fsdp(ddp)
    assert load_device(fsdp) is None and load_device(ddp) == "cuda:1"


def test_fsdp1_without_orig_params_is_refused_with_the_fix():
    from accelerate.utils import DistributedType

    from sftlens.tuning.loop import check_fsdp

    def accel(version: int, orig: bool) -> SimpleNamespace:
        plugin = SimpleNamespace(use_orig_params=orig)
        return SimpleNamespace(
            distributed_type=DistributedType.FSDP,
            is_fsdp2=version == 2,
            state=SimpleNamespace(fsdp_plugin=plugin),
        )

    with pytest.raises(SftlensError, match="^FSDP1 without fsdp_use_orig_params.*fsdp_version: 2"):
        check_fsdp(accel(1, orig=False))
    check_fsdp(accel(1, orig=True))
    check_fsdp(accel(2, orig=False))
    check_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_training_on_cuda_without_a_gpu_fails_clearly():
    from sftlens.tuning.loop import make_accelerator

    cfg = C.SFTConfig(model="m", device="cuda", dtype="float32")
    with pytest.raises(SftlensError, match="no CUDA GPU"):
        make_accelerator(cfg)


def _sft(base, out, data, **kw):
    from sftlens.config import SFTConfig
    from sftlens.tuning.sft import train_sft

    options = dict(steps=3, batch_size=2, lr=1e-3, max_length=64, save_every=1)
    cfg = SFTConfig(model=str(base), out=str(out), data=data, max_examples=8, device="cpu",
                    progress=False, **{**options, **kw})  # fmt: skip
    return train_sft(cfg)


def test_sft_under_fsdp_saves_the_gathered_weights_and_skips_sharded_checkpoints(
    tiny_pair, tmp_path, monkeypatch
):
    """The FSDP branch of ``sft`` on one CPU process (accelerate enables FSDP on GPUs only):
    the weights are left for accelerate to place, no resumable checkpoint is written, and the
    final model is what ``accel.get_state_dict`` gathers. Same model as the plain run."""
    from safetensors.torch import load_file

    from sftlens.tuning import loop, sft

    plain = _sft(tiny_pair[0], tmp_path / "plain", "synthetic")
    saved, gathered = [], []
    real_save, real_get = sft._save, None

    def spy_save(model, tok, folder, state, *a, **k):
        saved.append((folder.name, k.get("state_dict") is not None))
        return real_save(model, tok, folder, state, *a, **k)

    from accelerate import Accelerator

    real_get = Accelerator.get_state_dict

    def spy_get(self, model, *a, **k):
        gathered.append(True)
        return real_get(self, model, *a, **k)

    monkeypatch.setattr(loop, "uses_fsdp", lambda accel: True)
    monkeypatch.setattr(sft, "uses_fsdp", lambda accel: True)
    monkeypatch.setattr(sft, "_save", spy_save)
    monkeypatch.setattr(Accelerator, "get_state_dict", spy_get)
    out = _sft(tiny_pair[0], tmp_path / "fsdp", "synthetic")
    assert saved == [("fsdp", True)] and gathered == [True]  # no checkpoint on the way
    a, b = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["mixed_precision"] == "no" and state["peak_memory_mb"] > 0


def test_sft_under_fsdp_does_not_resume_a_checkpoint_saved_without_it(
    tiny_pair, tmp_path, monkeypatch
):
    """A DDP run's checkpoint holds whole-model optimizer state: FSDP starts over."""
    from sftlens.tuning import loop, sft

    def crash(history):
        raise KeyboardInterrupt

    real_loop = loop.train_loop

    def loop_then_crash(cfg, **kw):  # checkpoint at step 1, then stop as if killed
        kw["checkpoint"] = lambda h, save=kw["checkpoint"]: (save(h), crash(h))
        return real_loop(cfg, **kw)

    monkeypatch.setattr(sft, "train_loop", loop_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _sft(tiny_pair[0], tmp_path / "run", "synthetic")
    assert (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").is_file()
    monkeypatch.setattr(sft, "train_loop", real_loop)
    monkeypatch.setattr(loop, "uses_fsdp", lambda accel: True)
    monkeypatch.setattr(sft, "uses_fsdp", lambda accel: True)
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1],
    )
    out = _sft(tiny_pair[0], tmp_path / "run", "synthetic")
    assert len(steps) == 3  # all three steps again (a resume would run 2)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]


def test_tune_refuses_fsdp_with_the_fix(tiny_pair, tmp_path, monkeypatch):
    from sftlens.config import TuneConfig
    from sftlens.tuning import tune

    monkeypatch.setattr(tune, "uses_fsdp", lambda accel: True)
    cfg = TuneConfig(model=str(tiny_pair[0]), out=str(tmp_path / "t"), data="synthetic",
                     max_examples=4, steps=1, device="cpu", progress=False)  # fmt: skip
    with pytest.raises(SftlensError, match="^tune does not run under FSDP.*launch it with DDP"):
        tune.run_tune(cfg)


def test_example_fsdp_config_is_what_accelerate_reads(monkeypatch):
    """examples/accelerate/fsdp.yaml, parsed by accelerate's own launcher, asks for what
    docs/scale.md says (FSDP2, per-layer units, activation checkpointing, bf16, full state dict)."""
    from pathlib import Path

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "sftlens", "sft", "MODEL"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading
    assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
