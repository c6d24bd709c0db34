"""Fast unit tests of the training loop's pieces (sftlens.tuning.loop), called directly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sftlens.config import SFTConfig
from sftlens.tuning import loop


def test_world_size_is_the_launchers_world_size_env_var(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert loop.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert loop.world_size() == 3


def test_make_accelerator_passes_the_device_option_to_accelerate(monkeypatch):
    """``--device cpu`` tells accelerate ``cpu=True`` (else it would take a visible GPU)."""
    import accelerate

    seen = []

    def spy(**kw):
        seen.append(kw)
        return SimpleNamespace(distributed_type=None)

    monkeypatch.setattr(accelerate, "Accelerator", spy)
    monkeypatch.setattr(loop, "check_fsdp", lambda accel: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    loop.make_accelerator(SFTConfig(model="m", device="cpu"))
    assert seen == [{"cpu": True}]


def _model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_config_key_is_the_same_for_one_model_spelled_two_ways(tmp_path, monkeypatch):
    """``--model`` as an alias, a relative path or the resolved folder: the same checkpoint, so the
    same key (a run resumes); the folder's bytes and the examples still decide it."""
    folder = _model_folder(tmp_path / "m")
    examples = [SimpleNamespace(question="1+1?", answer="2")]
    monkeypatch.chdir(tmp_path)
    keys = {
        loop.config_key(SFTConfig(model=spelled), folder, examples)
        for spelled in ("m", "./m", str(folder), "my-alias")
    }
    assert len(keys) == 1
    edited = [SimpleNamespace(question="1+1?", answer="3")]
    assert loop.config_key(SFTConfig(model="m"), folder, edited) not in keys
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert loop.config_key(SFTConfig(model="m"), folder, examples) not in keys


_AFTER_EXEC = """
from pathlib import Path
import torch
from sftlens.tuning import loop
loop.reset_peak_memory()
got = loop.peak_memory_mb(torch.device("cpu"))
hwm = [int(x.split()[1]) / 2**10 for x in Path("/proc/self/status").read_text().splitlines()
       if x.startswith("VmHWM:")][0]
print(got, hwm)
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc peak-RSS reset"
)
def test_peak_memory_on_cpu_is_the_peak_rss_since_the_reset():
    """On Linux: VmHWM of /proc/self/status (reset by reset_peak_memory), not getrusage's
    ru_maxrss, which also keeps the peak of what the process ran before an exec (a launcher).
    Called here too, so that mutmut (which maps tests to the functions they call in-process)
    runs this test for peak_memory_mb's mutants; the child inherits the mutant under test."""
    loop.reset_peak_memory()
    assert loop.peak_memory_mb(torch.device("cpu")) > 0
    before_exec = (
        "import os, sys; held = b'x' * (768 * 2**20); "  # 768 MiB touched, then exec
        f"os.execv(sys.executable, [sys.executable, '-c', {_AFTER_EXEC!r}])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", before_exec], env=env, capture_output=True, text=True, check=True
    )
    got, hwm = map(float, out.stdout.split())
    assert hwm < 700 and hwm - 1 <= got <= hwm, out.stdout


def test_reset_peak_memory_resets_the_cuda_count_of_the_given_device(monkeypatch):
    """On a CUDA device, that device's peak-allocated count is reset (not the current device's:
    ``--device cuda:1``); on the CPU, none."""
    seen = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", seen.append)
    loop.reset_peak_memory(torch.device("cpu"))
    loop.reset_peak_memory()
    assert seen == []
    loop.reset_peak_memory(torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)]
