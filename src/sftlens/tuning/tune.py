"""``sftlens tune MODEL --mask 01100``: Mid-Block efficient tuning (LoRA on chosen layers only).

1. Resolve the layers: a mask, layer list or depth range (:func:`sftlens.layers.
   parse_layer_selection`), or ``--mask auto --from RUN`` (:func:`sftlens.tuning.suggest.
   suggest_mask`); the layer range is logged every time.
2. Plan the LoRA (:mod:`sftlens.tuning.lora`): target modules from the architecture layer,
   rank budget-matched to the all-layers baseline, alpha by policy; PEFT wraps the model and
   everything but LoRA is frozen. Autograd stops at the lowest trained layer.
3. Train with the loop ``sft`` uses (:func:`sftlens.tuning.loop.train_loop`): same data
   encoding, order and answer-only loss; checkpoints (adapter + optimizer, safetensors) every
   ``--save-every`` steps; a rerun resumes, a finished run with the same inputs is reused.
4. Write the output folder (its layout is an interface; ``sweep`` reads it):

   - ``adapter/``: a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) that
     ``PeftModel.from_pretrained(base_model, DIR / "adapter")`` loads as it is;
   - ``trainer_state.json``: ``history`` = ``[{"step", "loss", "tokens", "lr", "seconds"}]``;
   - ``summary.json``: ``mask, selection, layers, layer_range, num_layers, rank_per_layer,
     alpha, scaling, target_modules, trainable_params, final_loss, steps, train_tokens,
     seconds, step_seconds (mean), step_seconds_median, peak_memory_mb, world_size``;
   - ``metrics.csv``: ``lora_dw_*`` rows per layer (:func:`sftlens.tuning.lora.lora_dw_rows`);
   - ``plots/``, ``report.html``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sftlens.config import TuneConfig
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, read_json
from sftlens.layers import Selection, layer_ranges, parse_layer_selection
from sftlens.tuning import lora
from sftlens.tuning.loop import (  # peak_memory_mb / reset_peak_memory: importable from here
    config_key,
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

log = logging.getLogger("sftlens.tune")

CHECKPOINT = "checkpoint-last"
ADAPTER_DIR = "adapter"
# options that only say which layers: the resolved layers are hashed instead
_SELECTION_FIELDS = frozenset({"mask", "from_run", "blocks"})


def select_layers(cfg: TuneConfig, num_layers: int) -> tuple[Selection, list[str]]:
    """The layers ``cfg.mask`` selects and, for ``--mask auto``, the evidence for them."""
    if cfg.mask.strip().lower() != "auto":
        return parse_layer_selection(cfg.mask, num_layers), []
    from sftlens.tuning.suggest import suggest_mask  # written by the suggest command

    run_dir = Path(cfg.from_run or "")
    if not run_dir.is_dir():
        raise SftlensError(
            f"--from {run_dir} is not a folder; pass the run folder of an analysis "
            "(sftlens weights / analyze / demo --out DIR)"
        )
    suggestion = suggest_mask(run_dir, cfg.blocks)
    return parse_layer_selection(suggestion.mask, num_layers, cfg.blocks), list(suggestion.evidence)


def _num_layers(model_dir: Path) -> int:
    from transformers import AutoConfig

    from sftlens.models import surgery

    return surgery.num_layers(AutoConfig.from_pretrained(model_dir))


def run_tune(cfg: TuneConfig) -> Path:
    """Train the LoRA of ``cfg`` and return the output folder (see module doc)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sftlens.data import resolve_dataset
    from sftlens.models.loading import load_model, resolve_model
    from sftlens.run import make_out_folder

    out = make_out_folder(cfg.out)  # a bad --out fails now, not after the training
    reset_peak_memory()  # this tune's own peak, model load included
    model_dir = resolve_model(cfg.model)
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_examples, seed=cfg.seed)
    selection, evidence = select_layers(cfg, _num_layers(model_dir))
    log.info("mask %s", selection.describe())
    for line in evidence:
        log.info("  %s", line)
    # one process: a no-op wrapper; under torchrun / accelerate launch: DDP over the ranks
    accel = make_accelerator(cfg)
    if uses_fsdp(accel):
        raise SftlensError(
            "tune does not run under FSDP (LoRA trains a few MB: every GPU holds the frozen "
            "bf16 base, 2 bytes per parameter); launch it with DDP, without the FSDP config"
        )
    # the layers decide, not how they were written (01100, 6:18, 0.2-0.6 or auto)
    key = config_key(
        cfg,
        model_dir,
        examples,
        _SELECTION_FIELDS,
        layers=list(selection.layers),
        **precision_key(accel),
    )
    state_path = out / "trainer_state.json"
    if (
        state_path.is_file()
        and read_json(state_path).get("config_hash") == key
        and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    ):
        log.info("tune already finished in %s (same config, model and data): reusing it", out)
        from sftlens.run import RunFolder

        RunFolder(out).write_summary({"mask": selection.text, "selection": selection.describe()})
        return out

    ckpt = out / CHECKPOINT
    resume = (ckpt / "trainer_state.json").is_file() and read_json(ckpt / "trainer_state.json").get(
        "config_hash"
    ) == key
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    model, tok = load_model(model_dir, dtype=cfg.dtype, device=str(accel.device))
    plan = lora.plan_lora(model, selection.layers, cfg)
    model = lora.apply_lora(model, plan)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(cfg, params)
    start, history = 0, []
    if resume:
        state = load_file(str(ckpt / ADAPTER_DIR / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise SftlensError(f"{ckpt} holds another adapter; delete it to start over")
        load_optimizer(opt, sched, ckpt)
        st = read_json(ckpt / "trainer_state.json")
        start, history = int(st["step"]), list(st["history"])
        log.info("resuming tune from step %d in %s", start, ckpt)
    model, opt = accel.prepare(model, opt)
    if accel.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accel.device)

    def checkpoint(history: list[dict[str, Any]]) -> None:
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accel.unwrap_model(model).save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        save_optimizer(unwrap_optimizer(opt), sched, tmp)
        state = {"step": history[-1]["step"], "history": history, "config_hash": key}
        atomic_write_json(tmp / "trainer_state.json", state)  # last: marks a complete save
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)

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
        desc="LoRA " + selection.text,
        checkpoint=checkpoint,
    )
    wall = time.perf_counter() - t0
    accel.wait_for_everyone()
    if accel.is_main_process:
        peft_model = accel.unwrap_model(model)
        _finish(cfg, out, peft_model, plan, selection, history, key, model_dir, wall, accel)
        shutil.rmtree(ckpt, ignore_errors=True)
    accel.wait_for_everyone()
    return out


def _finish(
    cfg: TuneConfig,
    out: Path,
    model: Any,
    plan: lora.LoraPlan,
    selection: Selection,
    history: list[dict[str, Any]],
    key: str,
    model_dir: Path,
    wall: float,
    accel: Any,
) -> None:
    """Write adapter, summary, metrics, plots and report; ``trainer_state.json`` last."""
    from sftlens.api import report
    from sftlens.reporting.plots import plot_tune
    from sftlens.run import RunFolder, fingerprint

    state_path = out / "trainer_state.json"
    state_path.unlink(missing_ok=True)  # absent until everything below is written
    tmp = out / (ADAPTER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
    tmp.rename(out / ADAPTER_DIR)

    run = RunFolder(out)
    run.save_config(
        models={"base": cfg.model},
        fingerprints={"base": fingerprint(model_dir)},
        tune=dataclasses.asdict(cfg),
    )
    rows = run.step("lora_dw", {"trained": key}, lambda: lora.lora_dw_rows(model, plan))
    steps_s = [h["seconds"] for h in history if "seconds" in h]
    summary = {
        "mask": selection.text,
        "selection": selection.describe(),
        "layers": list(selection.layers),
        "layer_range": layer_ranges(selection.layers),
        "num_layers": plan.num_layers,
        "rank_per_layer": plan.rank,
        "budget_rank": cfg.rank * plan.num_layers,
        "total_rank": plan.rank * len(plan.layers),
        "alpha": plan.alpha,
        "scaling": plan.scaling,
        "target_modules": list(plan.target_modules),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": history[-1]["loss"],
        "steps": cfg.steps,
        "train_tokens": sum(h["tokens"] for h in history),
        "seconds": sum(steps_s),
        "seconds_this_run": wall,
        "step_seconds": statistics.fmean(steps_s) if steps_s else float("nan"),
        "step_seconds_median": statistics.median(steps_s) if steps_s else float("nan"),
        "peak_memory_mb": peak_memory_mb(accel.device),
        "world_size": accel.num_processes,
        "mixed_precision": str(accel.mixed_precision),
    }
    run.write_summary(summary)
    plot_tune(rows + run.metrics(), history, out / "plots")
    report(out)
    state = {
        "step": cfg.steps,
        "history": history,
        "config_hash": key,
        "config": dataclasses.asdict(cfg),
        "base_model": str(model_dir),
        "layers": list(selection.layers),
        "world_size": accel.num_processes,
    }
    atomic_write_json(state_path, state)


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of the tune section, or None when the run folder holds no tune results."""
    from sftlens.reporting.html import fmt, image, kv_table, layer_table

    if not (run / ADAPTER_DIR).is_dir() or "rank_per_layer" not in summary:
        return None
    s = summary
    body = (
        "<p>LoRA (PEFT) on the layers of the mask only, everything else frozen; the loss is on "
        "answer tokens. <code>lora_dw_*</code> is <code>||scaling * B A||_F</code> per layer, "
        "summed over projections like <code>dw_*</code>.</p>"
    )
    body += kv_table(
        [
            ("mask", s.get("selection")),
            ("rank per layer", s.get("rank_per_layer")),
            ("total rank (budget)", f"{s.get('total_rank')} ({s.get('budget_rank')})"),
            ("alpha", fmt(s.get("alpha"))),
            ("target modules", ", ".join(s.get("target_modules", []))),
            ("trainable parameters", s.get("trainable_params")),
            ("steps", s.get("steps")),
            ("train tokens", s.get("train_tokens")),
            ("final loss", fmt(s.get("final_loss"))),
            ("step seconds (mean)", fmt(s.get("step_seconds"))),
            ("peak memory MB", fmt(s.get("peak_memory_mb"))),
        ]
    )
    for name in ("tune_loss.png", "tune_lora_dw.png"):
        if (run / "plots" / name).is_file():
            body += image(run / "plots" / name, name)
    columns = tuple(f"lora_dw_{m}" for m in ("q", "k", "v", "o", "attn", "mlp"))
    body += layer_table(rows, columns)
    return (f"LoRA tuning ({s.get('selection')})", body)
