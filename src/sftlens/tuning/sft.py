"""Full-parameter supervised fine-tuning on GSM8K-format data, resumable.

The loop (answer-only loss, AdamW with warmup then cosine decay, gradient accumulation, seeded
data order, data parallelism) is :func:`sftlens.tuning.loop.train_loop`, shared with ``tune``.
Every ``save_every`` steps the model is saved to ``OUT/checkpoint-STEP`` (a model folder:
safetensors + JSON, no pickle, as transformers' Trainer names them) with the optimizer and
scheduler beside it in the newest one only; a rerun with the same config resumes from the newest,
and a finished run is not trained again. The snapshots stay (``keep_checkpoints``, the default:
a training trajectory to analyse) or only the newest is kept and removed at the end.

The output folder is a standard Hugging Face model folder (``config.json``,
``model.safetensors``, tokenizer files) plus ``trainer_state.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sftlens.config import SFTConfig
from sftlens.io import atomic_write_json, read_json
from sftlens.models.checkpoint import (  # list_checkpoints moved there; importable from here
    list_checkpoints,
    remove_stale_checkpoints,
)

# the shared pieces, importable from here as before
from sftlens.tuning.loop import (
    answer_loss_sum,
    collate,
    config_key,
    encode_example,
    example_order,
    load_device,
    load_optimizer,
    make_accelerator,
    make_optimizer,
    peak_memory_mb,
    precision_key,
    reset_peak_memory,
    save_optimizer,
    train_loop,
    unwrap_optimizer,
    uses_fsdp,
)

__all__ = [
    "answer_loss_sum",
    "collate",
    "encode_example",
    "example_order",
    "list_checkpoints",
    "load_optimizer",
    "save_optimizer",
    "train_sft",
]

log = logging.getLogger("sftlens.sft")

#: where sftlens before 0.2 kept its one resumable checkpoint (removed when found)
LEGACY_CHECKPOINT = "checkpoint-last"
_OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")


def _resumable(out: Path, key: str) -> Path | None:
    """The newest checkpoint of this config that still holds its optimizer state."""
    for _, path in reversed(list_checkpoints(out)):
        if read_json(path / "trainer_state.json").get("config_hash") == key and all(
            (path / f).is_file() for f in _OPTIMIZER_FILES
        ):
            return path
    return None


def _prune(out: Path, keep: Path | None, keep_snapshots: bool) -> None:
    """After a save: older checkpoints lose their optimizer state (snapshots) or go entirely."""
    for _, path in list_checkpoints(out):
        if path == keep:
            continue
        if keep_snapshots:
            for f in _OPTIMIZER_FILES:
                (path / f).unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(out / LEGACY_CHECKPOINT, ignore_errors=True)


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune ``cfg.model`` and return the output folder (see module doc)."""
    from sftlens.data import resolve_dataset
    from sftlens.models.loading import load_model, resolve_model
    from sftlens.run import make_out_folder

    out = make_out_folder(cfg.out)  # a bad --out fails now, not after the training
    model_dir = resolve_model(cfg.model)
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_examples, seed=cfg.seed)
    # one process: a no-op wrapper; under torchrun / accelerate launch: DDP (or FSDP) over ranks
    accel = make_accelerator(cfg)
    reset_peak_memory(accel.device)  # this run's own peak (peak_memory_mb in trainer_state.json)
    key = config_key(cfg, model_dir, examples, frozenset(), **precision_key(accel))
    state_path = out / "trainer_state.json"
    if state_path.is_file() and read_json(state_path).get("config_hash") == key:
        log.info("SFT already finished in %s (same config, model and data): reusing it", out)
        return out

    ckpt = _resumable(out, key)
    if ckpt is not None and uses_fsdp(accel):  # its optimizer state is a whole model's
        log.warning("FSDP: not resuming from %s (saved without FSDP); starting over", ckpt)
        ckpt = None
    if ckpt is None and accel.is_main_process:  # snapshots of another config, killed saves
        remove_stale_checkpoints(out)
    accel.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    model, tok = load_model(ckpt or model_dir, dtype=cfg.dtype, device=load_device(accel))
    model.train()
    opt, sched = make_optimizer(cfg, list(model.parameters()))
    start, history = 0, []
    if ckpt is not None:
        load_optimizer(opt, sched, ckpt)
        st = read_json(ckpt / "trainer_state.json")
        start, history = int(st["step"]), list(st["history"])
        log.info("resuming SFT from step %d in %s", start, ckpt)
    model, opt = accel.prepare(model, opt)

    def checkpoint(history: list[dict[str, Any]]) -> None:
        step = history[-1]["step"]
        state = {"step": step, "history": history, "config_hash": key}
        folder = out / f"checkpoint-{step}"
        _save(accel.unwrap_model(model), tok, folder, state, unwrap_optimizer(opt), sched)
        _prune(out, keep=folder, keep_snapshots=cfg.keep_checkpoints)

    t0 = time.perf_counter()
    history = train_loop(
        cfg,
        accel=accel,
        model=model,
        opt=opt,
        sched=sched,
        tok=tok,
        examples=examples,
        start=start,
        history=history,
        desc="SFT",
        checkpoint=checkpoint,
    )
    state = {
        "step": cfg.steps,
        "history": history,
        "config_hash": key,
        "config": dataclasses.asdict(cfg),
        "base_model": str(model_dir),
        "train_examples": len(examples),
        "train_tokens": sum(h["tokens"] for h in history),
        "seconds_this_run": time.perf_counter() - t0,
        "world_size": accel.num_processes,
        "mixed_precision": str(accel.mixed_precision),
        "peak_memory_mb": peak_memory_mb(accel.device),
    }
    accel.wait_for_everyone()
    # FSDP: every rank takes part in gathering the full weights (rank 0 receives them)
    full = accel.get_state_dict(model) if uses_fsdp(accel) else None
    if accel.is_main_process:
        _save(accel.unwrap_model(model), tok, out, state, state_dict=full)
        _prune(out, keep=None, keep_snapshots=cfg.keep_checkpoints)
    accel.wait_for_everyone()
    return out


def _save(
    model: Any,
    tok: Any,
    folder: Path,
    state: dict[str, Any],
    opt: Any = None,
    sched: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    record: str = "sftlens_sft.json",
) -> None:
    """Save model + tokenizer (+ optimizer) into ``folder`` through a temp folder and rename.

    ``state_dict``: the gathered full weights of an FSDP run (else the model's own).
    ``record``: the file of the final folder that holds ``state["config"]``.
    ``trainer_state.json`` is written last: its presence marks a complete save.
    """
    if folder.name.startswith("checkpoint-"):
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if opt is not None:
            save_optimizer(opt, sched, tmp)
        atomic_write_json(tmp / "trainer_state.json", state)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return
    # final output: the folder may hold checkpoints; write files, state last
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").unlink(missing_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(folder)
    atomic_write_json(folder / "trainer_state.json", state)
    atomic_write_json(folder / record, state["config"])
