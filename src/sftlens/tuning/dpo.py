"""``sftlens dpo MODEL``: preference tuning after SFT (DPO, through TRL's ``DPOTrainer``).

1. Pairs (:mod:`sftlens.tuning.preference`): the first ``--pairs`` train problems, prompted as
   ``sftlens sft`` trains them, sampled ``--samples-per-problem`` times; chosen = the gold worked
   answer, rejected = the first sample wrong under both strict and flexible scoring. Resumable:
   ``samples.jsonl`` per problem, ``pairs.jsonl`` rebuilt from it.
2. DPO with TRL (``report_to=[]``, nothing pushed, nothing pickled: TRL's own checkpoints are
   off). LoRA: the ``LoraConfig`` comes from the architecture layer (:func:`sftlens.tuning.lora.
   plan_lora`: the layers of ``--mask``, budget-matched rank, alpha as ``tune``), TRL wraps the
   model and the reference is the same model with the adapter disabled (no copy); checked to
   adapt exactly the planned modules. ``--full``: every parameter, the reference a frozen copy
   of MODEL loaded from its folder.
3. Output: ``OUT`` is a standard Hugging Face model folder (LoRA merged into the weights), so
   ``sftlens weights / analyze / eval / trajectory`` read it as any checkpoint; with
   ``--save-every N`` also ``OUT/checkpoint-STEP`` (merged model folders). Beside the model:
   ``pairs.jsonl``, ``samples.jsonl``, ``trainer_state.json`` (TRL's log per step: loss,
   rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, ...; timings; counts)
   and ``sftlens_dpo.json`` (the config).

A rerun with the same inputs (model files, problems, options, pairs) reuses the finished model.
Training itself does not resume mid-way: resuming TRL's checkpoints means pickled optimizer
and RNG state, which sftlens does not write; an interrupted run keeps its samples and trains
again from the start.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from sftlens.config import DpoConfig
from sftlens.errors import SftlensError
from sftlens.io import config_hash, read_json
from sftlens.models.checkpoint import remove_stale_checkpoints
from sftlens.tuning import lora
from sftlens.tuning.loop import config_key, peak_memory_mb, reset_peak_memory, world_size
from sftlens.tuning.preference import SampleJob, build_pairs, collect_samples, write_pairs

log = logging.getLogger("sftlens.dpo")

STATE = "trainer_state.json"
RECORD = "sftlens_dpo.json"
_TRL_DIR = ".trl"  # TRL's output_dir (it saves nothing there; removed at the end)
# options that only say which layers (the layers are hashed) or how fast samples are made
_NOT_HASHED = frozenset({"mask", "from_run", "blocks", "sample_batch_size"})


def run_dpo(cfg: DpoConfig) -> Path:
    """Make the pairs, run DPO and return the output folder (see module doc)."""
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_prompt
    from sftlens.evaluation.evaluate import check_generation_fits, encode_prompt, load_tokenizer
    from sftlens.evaluation.task import GSM8KTask
    from sftlens.models.loading import load_model, resolve_device, resolve_model
    from sftlens.run import fingerprint, make_out_folder
    from sftlens.tuning.tune import _num_layers, select_layers

    if world_size() > 1:
        raise SftlensError(
            "dpo runs in one process (TRL places it on one device); launch it without torchrun"
        )
    out = make_out_folder(cfg.out)  # a bad --out fails now, not after the sampling
    reset_peak_memory()
    model_dir = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_examples, seed=cfg.seed)
    layers: list[int] | None = None
    if not cfg.full:
        selection, evidence = select_layers(cfg, _num_layers(model_dir))
        layers = list(selection.layers)
        log.info("LoRA mask %s", selection.describe())
        for line in evidence:
            log.info("  %s", line)

    # 1. pairs
    tok = load_tokenizer(model_dir)
    prompts = [format_prompt(tok, e.question, cfg.prompt_format) for e in examples]
    task = GSM8KTask(shots=0, prompt_format=cfg.prompt_format, max_new_tokens=cfg.max_new_tokens)
    stop_strings, stop_ids = task.resolved_stops(tok)
    job = SampleJob(
        examples=list(examples),
        prompts=prompts,
        ids=[encode_prompt(tok, p) for p in prompts],
        k=cfg.samples_per_problem,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=stop_strings,
        stop_ids=stop_ids,
    )
    check_generation_fits(model_dir, job.ids, job.max_new_tokens, fix="lower --max-new-tokens")
    model_files = fingerprint(model_dir)["files"]

    def sampler() -> Any:
        model, _ = load_model(model_dir, dtype=cfg.dtype, device=device)
        return model.eval()

    records, sample_stats = collect_samples(
        out,
        job,
        job.key(model_files, cfg.dtype),
        sampler,
        tok,
        batch_size=cfg.sample_batch_size,
        progress=cfg.progress,
    )
    pairs, skipped = build_pairs(job.examples, prompts, records)
    write_pairs(out, pairs)
    log.info(
        "%d pairs from %d problems (%d skipped: no wrong answer among %d samples)",
        len(pairs),
        len(examples),
        skipped,
        cfg.samples_per_problem,
    )
    if not pairs:
        raise SftlensError(
            f"none of the {len(examples)} problems got a wrong answer among "
            f"{cfg.samples_per_problem} samples, so there is no rejected answer to train on; raise "
            "--samples-per-problem or --temperature, or use more problems (--pairs)"
        )

    # 2. DPO
    key = config_key(
        cfg,
        model_dir,
        examples,
        _NOT_HASHED,
        layers=layers,
        pairs=config_hash([[p["prompt"], p["chosen"], p["rejected"]] for p in pairs]),
    )
    state_path = out / STATE
    if (
        state_path.is_file()
        and read_json(state_path).get("config_hash") == key
        and (out / "config.json").is_file()
    ):
        log.info("DPO already finished in %s (same model, pairs and options): reusing it", out)
        return out
    remove_stale_checkpoints(out)

    from sftlens.tuning.sft import _save

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tok = load_model(model_dir, dtype=cfg.dtype, device=device)
    ref, plan = None, None
    if cfg.full:
        ref, _ = load_model(model_dir, dtype=cfg.dtype, device=device)
        ref.eval().requires_grad_(False)
    else:
        assert layers is not None
        plan = lora.plan_lora(model, layers, cfg)
    use_cache = getattr(model.config, "use_cache", None)  # TRL turns it off for training
    timer = _StepTimer()
    trainer = _make_trainer(cfg, out, model, ref, tok, pairs, plan, device, timer)

    def snapshot(step: int) -> None:
        state = {"step": step, "history": list(trainer.state.log_history), "config_hash": key}
        merged = _merged(trainer.model, copy_first=True, use_cache=use_cache)
        _save(merged, tok, out / f"checkpoint-{step}", state)

    timer.snapshot = snapshot
    with _quiet(cfg.progress):
        trainer.train()
    history = list(trainer.state.log_history)
    final = _merged(trainer.model, copy_first=False, use_cache=use_cache)
    steps_s = timer.seconds
    state = {
        "step": int(trainer.state.global_step),
        "history": history,
        "config_hash": key,
        "config": dataclasses.asdict(cfg),
        "base_model": str(model_dir),
        "method": "full" if cfg.full else "lora",
        "layers": layers,
        "lora": None
        if plan is None
        else {"rank": plan.rank, "alpha": plan.alpha, "target_modules": list(plan.target_modules)},
        "problems": len(examples),
        "pairs": len(pairs),
        "skipped_problems": skipped,
        "sampling_seconds": sample_stats["seconds"],
        "sampled_tokens": int(sample_stats["new_tokens"]),
        "seconds_per_sampled_token": sample_stats["seconds"] / sample_stats["new_tokens"]
        if sample_stats["new_tokens"]
        else None,
        "step_seconds": statistics.fmean(steps_s) if steps_s else None,
        "seconds_this_run": time.perf_counter() - t0,
        "peak_memory_mb": peak_memory_mb(torch.device(device)),
    }
    with _quiet(cfg.progress):
        _save(final, tok, out, state, record=RECORD)
    shutil.rmtree(out / _TRL_DIR, ignore_errors=True)
    return out


def _merged(model: Any, copy_first: bool, use_cache: bool | None) -> Any:
    """A plain transformers model: the LoRA merged into the weights (of a copy when asked),
    with the ``use_cache`` MODEL had."""
    if hasattr(model, "merge_and_unload"):
        model = (copy.deepcopy(model) if copy_first else model).merge_and_unload()
    if use_cache is not None:
        model.config.use_cache = use_cache
    return model


class _StepTimer:
    """What the trainer's step callback does (:func:`_make_trainer`): time each optimizer
    step and calls ``snapshot(step)`` every ``every`` steps before the last."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.every = 0
        self.max_steps = 0
        self.snapshot: Any = None
        self._t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seconds.append(time.perf_counter() - self._t0)
        step = int(state.global_step)
        if self.every and step % self.every == 0 and step < self.max_steps and self.snapshot:
            self.snapshot(step)


def _make_trainer(
    cfg: DpoConfig,
    out: Path,
    model: Any,
    ref: Any,
    tok: Any,
    pairs: list[dict[str, Any]],
    plan: lora.LoraPlan | None,
    device: str,
    timer: _StepTimer,
) -> Any:
    try:
        from datasets import Dataset
        from transformers import PrinterCallback, TrainerCallback
        from trl import DPOConfig as TrlDPOConfig
        from trl import DPOTrainer
    except ImportError as exc:
        raise SftlensError(
            f"sftlens dpo needs TRL ({exc.name} is missing); pip install 'sftlens[dpo]'"
        ) from None

    class Steps(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            timer.on_step_begin(*a, **kw)

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            timer.on_step_end(*a, **kw)

    timer.every, timer.max_steps = cfg.save_every, cfg.steps
    with warnings.catch_warnings():  # TRL's gradient_checkpointing, renamed by transformers 5
        warnings.simplefilter("ignore", FutureWarning)
        args = _trl_args(TrlDPOConfig, cfg, out, device)
    dataset = Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    with _quiet(cfg.progress), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT reads is_gradient_checkpointing
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=plan.lora_config() if plan is not None else None,
            callbacks=[Steps()],
        )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    if plan is not None:
        lora.check_adapted(cast(Any, trainer.model), plan)
    return trainer


def _trl_args(cls: Any, cfg: DpoConfig, out: Path, device: str) -> Any:
    """TRL's ``DPOConfig`` for ``cfg``: no reports, no hub, no saves, float32 compute on CPU."""
    return cls(
        output_dir=str(out / _TRL_DIR),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        max_steps=cfg.steps,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1): a ratio of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else None,
        beta=cfg.beta,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        push_to_hub=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=not cfg.progress,
        log_level="warning",
        use_cpu=device == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Transformers' and TRL's info logs off and, without progress, no ``datasets`` bars (TRL's
    tokenizing maps) nor transformers' own; restored afterwards."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    level = transformers.logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated attribute
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()
