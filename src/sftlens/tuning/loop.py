"""The training loop that ``sft`` and ``tune`` share: data encoding and order, answer-only loss,
gradient accumulation, data parallelism through accelerate, resumable optimizer state.

Loss is on answer tokens only (prompt and padding are masked with -100), averaged over the
answer tokens of each optimizer step. AdamW with linear warmup then cosine decay, gradient
accumulation, a fixed seed for data order. Optimizer and scheduler state are saved as
safetensors + JSON (no pickle). Under ``torchrun`` / ``accelerate launch`` every rank takes its
own slice of each micro-batch's positions, so the global batch is the same examples in the same
order as one process with ``world`` times the micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sftlens.config import TrainConfig
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, config_hash, read_json

log = logging.getLogger("sftlens.train")

# Config fields that do not change the trained weights: ignore them when deciding to resume.
NOT_HASHED = {"out", "progress", "save_every", "keep_checkpoints", "device"}


def make_accelerator(cfg: TrainConfig) -> Any:
    """accelerate's ``Accelerator`` for a training command.

    One process: a thin wrapper on ``--device``. Under ``torchrun`` / ``accelerate launch``: DDP
    over the ranks, each on its own GPU, or FSDP when the launch's accelerate config asks for
    it (``sft`` only; see docs/scale.md). Mixed precision comes from the launch
    (``accelerate launch --mixed_precision bf16``, ``ACCELERATE_MIXED_PRECISION=bf16`` or the
    accelerate config), never implicitly: it is recorded and part of the resume key.
    """
    from accelerate import Accelerator

    from sftlens.models.loading import resolve_device

    device = resolve_device(cfg.device, env={})  # --device cuda without a GPU: an error
    accel = Accelerator(cpu=accelerate_cpu(cfg.device, device, world_size()))
    check_fsdp(accel)
    return accel


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerate_cpu(option: str, device: str, world: int) -> bool:
    """accelerate's ``cpu=`` for ``--device option`` (resolved: ``device``) in ``world`` ranks.

    ``--device cpu``; and ``auto`` without a GPU under a launcher, where accelerate sets up
    gloo DDP only when told ``cpu=True`` (else every rank would train alone). One process
    with ``auto`` leaves the choice to accelerate (Apple's MPS, for one).

    >>> accelerate_cpu("cpu", "cpu", 1), accelerate_cpu("auto", "cpu", 2)
    (True, True)
    >>> accelerate_cpu("auto", "cpu", 1), accelerate_cpu("auto", "cuda:1", 2)
    (False, False)
    """
    return option == "cpu" or (world > 1 and device == "cpu")


def check_fsdp(accel: Any) -> None:
    """Refuse an FSDP1 config whose sharding would leave the optimizer behind: the optimizer is
    built before ``accel.prepare`` shards the model, which FSDP2 (``fsdp_version: 2``) remaps
    and FSDP1 follows only with ``fsdp_use_orig_params: true``."""
    if not uses_fsdp(accel) or accel.is_fsdp2:
        return
    plugin = getattr(accel.state, "fsdp_plugin", None)
    if not getattr(plugin, "use_orig_params", True):
        raise SftlensError(
            "FSDP1 without fsdp_use_orig_params would train nothing here; set "
            "fsdp_version: 2 (or fsdp_use_orig_params: true) in the accelerate config"
        )


def uses_fsdp(accel: Any) -> bool:
    """True when the launch asked accelerate for FSDP (an accelerate config with ``fsdp_config``)."""
    from accelerate.utils import DistributedType

    return bool(accel.distributed_type == DistributedType.FSDP)


def load_device(accel: Any) -> str | None:
    """Where ``load_model`` puts the weights: the rank's device, or None under FSDP (they stay
    on the CPU, or on meta with ``fsdp_cpu_ram_efficient_loading``, and FSDP moves each rank's
    shard to its GPU in ``accel.prepare``)."""
    return None if uses_fsdp(accel) else str(accel.device)


def precision_key(accel: Any) -> dict[str, str]:
    """``{"mixed_precision": "bf16"}`` for :func:`config_key` when the launch turned mixed
    precision on (a bf16-autocast run never resumes an fp32 one); empty when off, so that the
    keys of earlier runs still match."""
    mp = str(accel.mixed_precision)
    return {} if mp == "no" else {"mixed_precision": mp}


def config_key(
    cfg: TrainConfig,
    model_dir: Path,
    examples: list[Any],
    ignore: frozenset[str] = frozenset(),
    **extra: Any,
) -> str:
    """What decides the trained weights: the options (less :data:`NOT_HASHED` and ``ignore``),
    the starting checkpoint's bytes, the training examples themselves (an edited data file or
    checkpoint at the same path retrains) and ``extra`` (what a command resolves from its
    options, e.g. the layers a mask selects)."""
    from sftlens.run import fingerprint

    skip = NOT_HASHED | ignore
    d: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    d["model"] = str(model_dir)
    d["model_files"] = fingerprint(model_dir)["files"]
    d["examples"] = config_hash([[e.question, e.answer] for e in examples])
    d.update(extra)
    return config_hash(d)


def encode_example(
    tok: Any, prompt: str, target: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) for one example, EOS appended to the answer."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        t = [*t, tok.eos_token_id]
    ids = (p + t)[:max_length]
    labels = ([-100] * len(p) + t)[:max_length]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ``input_ids``/``attention_mask``/``labels`` all (B, T)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100."""
    # logits (B, T, V) predict labels shifted by one
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )


def example_order(n: int, seed: int, position: int) -> int:
    """Index of the example at global ``position``: a fresh seeded permutation per epoch."""
    epoch, offset = divmod(position, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[offset])


# -- optimizer state as safetensors + JSON (no pickle) ----------------------------------------


def save_optimizer(opt: torch.optim.Optimizer, sched: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, s in state["state"].items():
        for key, value in s.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous().reshape(-1).clone()
                scalars.setdefault(str(idx), {})[key] = list(value.shape)
            else:
                scalars.setdefault(str(idx), {})[key] = {"value": value}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {
        "param_groups": state["param_groups"],
        "state": scalars,
        "scheduler": sched.state_dict(),
    }
    atomic_write_json(folder / "optimizer.json", meta)


def load_optimizer(opt: torch.optim.Optimizer, sched: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = read_json(folder / "optimizer.json")
    state: dict[int, dict[str, Any]] = {}
    for idx, entries in meta["state"].items():
        s: dict[str, Any] = {}
        for key, shape in entries.items():
            s[key] = (
                shape["value"]
                if isinstance(shape, dict)
                else tensors[f"{idx}.{key}"].reshape(shape)
            )
        state[int(idx)] = s
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])


def train_loop(
    cfg: TrainConfig,
    *,
    accel: Any,
    model: Any,
    opt: Any,
    sched: Any,
    tok: Any,
    examples: Sequence[Any],
    start: int,
    history: list[dict[str, Any]],
    desc: str,
    checkpoint: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Run steps ``start .. cfg.steps - 1`` and return the history (one dict per step).

    ``model`` and ``opt`` come from ``accel.prepare``. Each step appends ``{"step", "loss",
    "tokens", "lr", "seconds"}`` (``seconds``: wall time of the step, data encoding included).
    Every ``cfg.save_every`` steps (not after the last) the main process calls
    ``checkpoint(history)`` between two barriers. Before each step the torch RNG is seeded from
    ``(seed, step, rank)``, so random layers (dropout) draw the same after a resume.
    """
    from sftlens.data.prompts import format_prompt, format_target

    def prompt_of(q: str) -> str:
        return format_prompt(tok, q, cfg.prompt_format)

    rank, world, device = accel.process_index, accel.num_processes, accel.device
    # all of them (frozen ones have no gradient and are skipped): accelerate clips an FSDP model
    # with its own clip_grad_norm_ (global norm over shards) only when given all its parameters
    params = list(model.parameters())
    save_every = cfg.save_every
    if save_every and uses_fsdp(accel):
        save_every = 0
        if accel.is_main_process:
            log.warning(
                "FSDP: no resumable checkpoint is written every --save-every steps (the sharded "
                "optimizer state is not saved yet); the final model is"
            )
    # global batch = batch_size x grad_accum x world; rank r takes its own slice of each
    # micro-batch's positions, so every rank sees different examples in the same seeded order
    per_step = cfg.batch_size * cfg.grad_accum * world
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=desc,
        unit="step",
        disable=not (cfg.progress and accel.is_main_process),
    )
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + rank)
        micro = []
        for m in range(cfg.grad_accum):
            batch = []
            for j in range(cfg.batch_size):
                position = step * per_step + (m * world + rank) * cfg.batch_size + j
                ex = examples[example_order(len(examples), cfg.seed, position)]
                batch.append(
                    encode_example(
                        tok, prompt_of(ex.question), format_target(ex.answer), cfg.max_length
                    )
                )
            micro.append(collate(batch, tok.pad_token_id))
        n_tokens = accel.reduce(  # answer tokens of the whole global batch
            torch.tensor(
                sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), device=device
            ),
            reduction="sum",
        ).item()
        if n_tokens == 0:
            raise SftlensError(
                f"step {step}: no answer tokens survive --max-length {cfg.max_length}; raise it"
            )
        # the step's loss stays on the device until the one read per step (no sync per micro-batch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            # DDP averages gradients over ranks: scale by world so the step's gradient is the
            # mean over every answer token of the global batch
            loss = answer_loss_sum(logits, b["labels"]) * world / n_tokens
            accel.backward(loss)
            loss_sum += loss.detach().double() / world
        total = float(accel.reduce(loss_sum, reduction="sum"))
        if not math.isfinite(total):
            raise SftlensError(f"{desc} loss became {total} at step {step}; lower --lr")
        if cfg.max_grad_norm > 0:
            accel.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves on after)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        history.append(
            {"step": step + 1, "loss": total, "tokens": n_tokens, "lr": lr, "seconds": seconds}
        )
        bar.set_postfix(loss=f"{total:.3f}")
        bar.update(1)
        if save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            accel.wait_for_everyone()
            if accel.is_main_process:
                checkpoint(history)
            accel.wait_for_everyone()
    bar.close()
    return history


_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Restart the peak-RSS count (Linux ``clear_refs`` 5), so that one process running several
    tunes (a sweep) reports each one's own peak rather than the largest so far; on a CUDA
    ``device``, its peak-allocated count too."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # not Linux, or not allowed: the lifetime peak is reported instead
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, else the peak RSS since the last
    :func:`reset_peak_memory` (Linux ``VmHWM``; elsewhere the process's lifetime peak), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 2**10
    )


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
    """AdamW over ``params`` and its linear-warmup + cosine schedule over ``cfg.steps``."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    return opt, sched


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (what :func:`save_optimizer` takes)."""
    return opt.optimizer if hasattr(opt, "optimizer") else opt
