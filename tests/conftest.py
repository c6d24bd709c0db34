"""Shared fixtures: tiny random models built from configs, saved as real checkpoint folders.

Nothing here downloads anything. The tiny "SFT" model is the base with known perturbations,
so tests can predict what the analysis must find.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
# threads make them ~10x slower (one tiny SFT run: 36 s with 2 threads, 3.4 s with 1, under
# load). Set OMP_NUM_THREADS to override; subprocesses (torchrun) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# mutmut forks one process per mutant from this one. tqdm's default write lock includes a
# multiprocessing semaphore shared with every fork: a child killed (timeout) inside a bar leaves
# it taken and every later child waits forever. A thread lock is per process; and no monitor
# thread, which takes the lock now and then (a fork at that moment inherits it taken).
tqdm.set_lock(threading.RLock())
tqdm.monitor_interval = 0


from tiny_models import perturb, save_model, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base, sft) folders of a 5-layer Llama; SFT changes layers 3 and 4 most (J-shape)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny_pair")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    base = save_model(model, root / "base")
    perturb(model, {0: 0.01, 1: 0.001, 2: 0.001, 3: 0.02, 4: 0.05})
    sft = save_model(model, root / "sft")
    return base, sft


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The real GSM8K folder (train.jsonl, test.jsonl). Every test that needs it asks for this
    fixture: it skips with where the data goes, and under CI (``CI=true``), which has the data,
    a missing copy FAILS instead of silently skipping."""
    env = os.environ.get("SFTLENS_GSM8K_DIR")
    folder = Path(env).expanduser() if env else GSM8K_DIR
    missing = [n for n in ("train.jsonl", "test.jsonl") if not (folder / n).is_file()]
    if missing:
        where = f"$SFTLENS_GSM8K_DIR={env}" if env else str(GSM8K_DIR)
        message = (
            f"GSM8K {' and '.join(missing)} not found in {where}: put the GSM8K jsonl files at "
            "../shared/data/gsm8k/{train,test}.jsonl (next to the repository) or set "
            "$SFTLENS_GSM8K_DIR to their folder"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI has the data, so this test must not skip)")
        pytest.skip(message)
    return folder
