"""The public Python API. The CLI only parses arguments into configs and calls these.

>>> import sftlens
>>> run = sftlens.weights("smollm2-135m-instruct", "runs/demo/sft_model", out="runs/w")  # doctest: +SKIP
>>> run / "metrics.csv"          # tidy: model, layer, metric, value              # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlens.config import (
    AnalyzeConfig,
    DemoConfig,
    EvalConfig,
    InterpolateConfig,
    ProbeConfig,
    SFTConfig,
    SuggestConfig,
    SwapConfig,
    SweepConfig,
    TuneConfig,
    WeightsConfig,
)
from sftlens.models.loading import load_model, resolve_model
from sftlens.run import RunFolder, fingerprint

if TYPE_CHECKING:
    from sftlens.tuning.suggest import Suggestion

log = logging.getLogger("sftlens")

__all__ = [
    "analyze",
    "demo",
    "evaluate",
    "interpolate",
    "load_model",
    "probe",
    "report",
    "resolve_model",
    "sft",
    "suggest",
    "swap",
    "sweep",
    "tune",
    "weights",
]


def weights(base: str, sft: str, **options: Any) -> Path:
    """Per-layer weight distances between BASE and SFT; returns the run folder.

    Options are the fields of :class:`sftlens.config.WeightsConfig` (``out``, ``allow_pickle``, ...).
    """
    return run_weights(WeightsConfig(base=base, sft=sft, **options))


def run_weights(cfg: WeightsConfig, run: RunFolder | None = None) -> Path:
    from sftlens.reporting.plots import plot_weights
    from sftlens.weight_diff import weight_diff

    run = run or RunFolder(cfg.out)
    base_dir = resolve_model(cfg.base, allow_pickle=cfg.allow_pickle)
    sft_dir = resolve_model(cfg.sft, allow_pickle=cfg.allow_pickle)
    prints = {"base": fingerprint(base_dir), "sft": fingerprint(sft_dir)}
    run.save_config(
        models={"base": cfg.base, "sft": cfg.sft},
        fingerprints=prints,
        weights=dataclasses.asdict(cfg),
    )

    def compute() -> list[dict[str, Any]]:
        result = weight_diff(base_dir, sft_dir, progress=cfg.progress, device=cfg.device)
        run.write_summary(
            {"pair": dataclasses.asdict(result.info), "weights": _weights_summary(result.rows)}
        )
        return result.rows

    inputs = {k: v["files"] for k, v in prints.items()}
    rows = run.step("weights", inputs, compute)
    plot_weights(rows, run.path / "plots")
    report(run.path)
    return run.path


def _weights_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from sftlens.reporting.plots import series

    attn = series(rows, "dw_attn")
    if not attn:
        return {}
    top = max(range(len(attn)), key=lambda i: attn[i])
    return {
        "dw_attn_by_layer": attn,
        "layer_of_max_dw_attn": top,
        "relative_depth_of_max_dw_attn": (top + 0.5) / len(attn),
        "dw_total": next((r["value"] for r in rows if r["metric"] == "dw_total"), None),
    }


def analyze(base: str, sft: str, **options: Any) -> Path:
    """Hidden-state and attention metrics of BASE vs SFT over a dataset; returns the run folder.

    Options are the fields of :class:`sftlens.config.AnalyzeConfig` (``data``, ``max_prompts``, ...).
    """
    return run_analyze(AnalyzeConfig(base=base, sft=sft, **options))


_ANALYZE_NOT_HASHED = {"base", "sft", "out", "progress", "device", "allow_pickle"}
_STATE = ".analyze_state"


def run_analyze(cfg: AnalyzeConfig, run: RunFolder | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.distributed import init_from_env, is_main
    from sftlens.io import config_hash, write_rows_csv
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.pair import check_pair
    from sftlens.reporting.plots import plot_heads, plot_representations
    from sftlens.representations import RepresentationPass, run_pass

    rank, world = init_from_env()
    run = run or RunFolder(cfg.out)
    base_dir = resolve_model(cfg.base, allow_pickle=cfg.allow_pickle)
    sft_dir = resolve_model(cfg.sft, allow_pickle=cfg.allow_pickle)
    info = check_pair(CheckpointReader(base_dir).config, CheckpointReader(sft_dir).config)
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_prompts)
    texts = [
        format_question(e.question) + (format_target(e.answer) if cfg.text == "qa" else "")
        for e in examples
    ]
    prints = {"base": fingerprint(base_dir), "sft": fingerprint(sft_dir)}
    if is_main():
        run.save_config(
            models={"base": cfg.base, "sft": cfg.sft},
            fingerprints=prints,
            analyze=dataclasses.asdict(cfg),
            world_size=world,
        )
    inputs = {
        "fingerprints": {k: v["files"] for k, v in prints.items()},
        "config": {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in _ANALYZE_NOT_HASHED
        },
        "texts": config_hash(texts),
    }
    key = config_hash(inputs)

    def compute() -> list[dict[str, Any]]:
        attn = "eager" if cfg.attention else None
        base, tok = load_model(
            base_dir, dtype=cfg.dtype, device=cfg.device, attn_implementation=attn
        )
        sft_model, _ = load_model(
            sft_dir, dtype=cfg.dtype, device=cfg.device, attn_implementation=attn
        )
        acc = RepresentationPass(
            num_layers=info.num_layers,
            hidden=info.hidden_size,
            num_heads=_heads(base.config),
            alpha=cfg.alpha,
            preset=cfg.preset,  # type: ignore[arg-type]  # validated by AnalyzeConfig
            pooling=cfg.pooling,
            attention=cfg.attention,
        )
        # one file holds the accumulators AND the inputs key and next batch (safetensors
        # metadata): one rename makes a checkpoint, so a crash can never pair a newer state
        # with an older batch index (which would count batches twice)
        state_file = run.path / f"{_STATE}.safetensors"
        start = 0
        saved = _read_state_meta(state_file) if world == 1 else None
        if saved is not None and saved.get("key") == key:
            acc.load_state_dict(load_file(str(state_file)))
            start = int(saved["next_batch"])

        def checkpoint(i: int, state: RepresentationPass) -> None:
            if world == 1 and (i + 1) % 8 == 0:  # every 8 batches: a crash loses little
                tmp = state_file.with_suffix(".tmp")
                save_file(
                    {k: v.contiguous() for k, v in state.state_dict().items()},
                    str(tmp),
                    metadata={"key": key, "next_batch": str(i + 1)},
                )
                tmp.replace(state_file)

        with torch.inference_mode():
            run_pass(
                base,
                sft_model,
                tok,
                texts,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                truncate=cfg.truncate,
                padding_side=cfg.padding_side,
                progress=cfg.progress and is_main(),
                rank=rank,
                world_size=world,
                state=acc,
                start_batch=start,
                on_batch=checkpoint,
            )
        acc.all_reduce_()
        rows, heads = acc.rows()
        if is_main():
            write_rows_csv(
                run.path / "heads.csv", heads, ("model", "layer", "head", "metric", "value")
            )
            run.write_summary(
                {"pair": dataclasses.asdict(info), "analyze": _analyze_summary(rows, len(texts))}
            )
        state_file.unlink(missing_ok=True)
        return rows

    rows = run.step("analyze", inputs, compute, write=is_main())
    if is_main():
        plot_representations(rows, run.path / "plots")
        if (run.path / "heads.csv").is_file():
            with open(run.path / "heads.csv", newline="") as f:
                plot_heads(list(csv.DictReader(f)), run.path / "plots" / "attention_heads_js.png")
        report(run.path)
    return run.path


def _read_state_meta(path: Path) -> dict[str, str] | None:
    """The ``key`` and ``next_batch`` stored with an analyze checkpoint, or None."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a torn or foreign file: start over rather than resume from it
        return None


def _heads(config: Any) -> int:
    from sftlens.models import surgery

    return surgery.num_heads(config)


def _analyze_summary(rows: list[dict[str, Any]], n_prompts: int) -> dict[str, Any]:
    from sftlens.reporting.plots import series

    cka = series(rows, "cka")
    out: dict[str, Any] = {"prompts": n_prompts, "cka_by_layer": cka}
    for threshold in (0.98, 0.9):
        first = next((i for i, v in enumerate(cka) if v < threshold), None)
        out[f"cka_first_below_{threshold}"] = (
            None if first is None else {"layer": first, "relative_depth": (first + 0.5) / len(cka)}
        )
    # layers where one feature carries most of the base token variance: plain CKA saturates there
    share = series(rows, "top_feature_share", model="base")
    out["massive_feature_layers"] = [i for i, v in enumerate(share) if v > 0.5]
    return out


def sft(model: str, **options: Any) -> Path:
    """Full-parameter SFT; options are the fields of :class:`sftlens.config.SFTConfig`."""
    from sftlens.tuning.sft import train_sft

    return train_sft(SFTConfig(model=model, **options))


def tune(model: str, **options: Any) -> Path:
    """LoRA on the layers of ``mask`` only (budget-matched, everything else frozen); returns the
    output folder (``adapter/``, ``summary.json``, ``metrics.csv``, ``trainer_state.json``).

    Options are the fields of :class:`sftlens.config.TuneConfig` (``mask``, ``out``, ``steps``,
    ``rank``, ``budget_match``, ``alpha``, ``targets``, ...).
    """
    from sftlens.tuning.tune import run_tune

    return run_tune(TuneConfig(model=model, **options))


def sweep(model: str, **options: Any) -> Path:
    """Tune every mask of ``masks`` (baseline ``11111`` first) and score each on held-out
    problems; returns the run folder (``sweep.csv``, ``summary.json``, report).

    Options are the fields of :class:`sftlens.config.SweepConfig`: ``masks``, ``seeds``,
    ``heldout``, ``gsm8k`` and every training option of ``tune``.
    """
    from sftlens.tuning.sweep import run_sweep

    return run_sweep(SweepConfig(model=model, **options))


def evaluate(model: str, **options: Any) -> Path:
    """GSM8K accuracy and teacher-forced scores of MODEL; options: :class:`sftlens.config.EvalConfig`."""
    from sftlens.evaluation.evaluate import run_eval

    return run_eval(EvalConfig(model=model, **options))


def probe(base: str, sft: str, **options: Any) -> Path:
    """Logit-lens readouts of every layer; options: :class:`sftlens.config.ProbeConfig`."""
    from sftlens.experiments.probe import run_probe

    return run_probe(ProbeConfig(base=base, sft=sft, **options))


def swap(base: str, sft: str, **options: Any) -> Path:
    """Block-swap hybrids of BASE and SFT; options: :class:`sftlens.config.SwapConfig`."""
    from sftlens.experiments.swap import run_swap

    return run_swap(SwapConfig(base=base, sft=sft, **options))


def interpolate(base: str, sft: str, **options: Any) -> Path:
    """Weight interpolation between BASE and SFT; options: :class:`sftlens.config.InterpolateConfig`."""
    from sftlens.experiments.interpolate import run_interpolate

    return run_interpolate(InterpolateConfig(base=base, sft=sft, **options))


def suggest(run_dir: str | Path, **options: Any) -> Suggestion:
    """A Mid-Block LoRA mask proposed from an analysis run alone, with its evidence per block.

    Options are the fields of :class:`sftlens.config.SuggestConfig` (``blocks``, ``width``,
    ``save``, ...); the rule is documented in :mod:`sftlens.tuning.suggest`.
    """
    from sftlens.tuning.suggest import run_suggest

    return run_suggest(SuggestConfig(run=str(run_dir), **options))


def demo(**options: Any) -> Path:
    """The main job: a short SFT of the base, then where it changed (weights, representations,
    a short eval, the logit-lens probe) and which layers to train (``suggest``), in one report.
    Resumable."""
    from sftlens.tuning.sft import train_sft

    cfg = DemoConfig(**options)
    out = Path(cfg.out)
    sft_dir = train_sft(
        SFTConfig(
            model=cfg.model,
            out=str(out / "sft_model"),
            data=cfg.data,
            steps=cfg.sft_steps,
            batch_size=cfg.sft_batch_size,
            lr=cfg.sft_lr,
            max_length=cfg.sft_max_length,
            seed=cfg.seed,
            save_every=10,
            progress=cfg.progress,
        )
    )
    run = RunFolder(out)
    run.save_config(demo=dataclasses.asdict(cfg))
    run_weights(
        WeightsConfig(base=cfg.model, sft=str(sft_dir), out=str(out), progress=cfg.progress), run
    )
    if cfg.analyze_prompts:
        run_analyze(
            AnalyzeConfig(
                base=cfg.model,
                sft=str(sft_dir),
                out=str(out),
                data=cfg.analyze_data,
                split="test",
                max_prompts=cfg.analyze_prompts,
                progress=cfg.progress,
            ),
            run,
        )
    if cfg.eval_problems:  # zero-shot keeps it short; `sftlens eval` defaults to 5-shot
        from sftlens.evaluation.evaluate import run_eval

        for role, model in (("base", cfg.model), ("sft", str(sft_dir))):
            run_eval(
                EvalConfig(
                    model=model,
                    role=role,
                    out=str(out),
                    data=cfg.analyze_data,
                    limit=cfg.eval_problems,
                    shots=0,
                    max_new_tokens=cfg.eval_max_new_tokens,
                    progress=cfg.progress,
                )
            )
    if cfg.probe_prompts:
        from sftlens.experiments.probe import run_probe

        run_probe(
            ProbeConfig(
                base=cfg.model,
                sft=str(sft_dir),
                out=str(out),
                data=cfg.analyze_data,
                max_prompts=cfg.probe_prompts,
                progress=cfg.progress,
            )
        )
    # the second question: so which layers should I train? (from this run's evidence alone)
    from sftlens.tuning.suggest import run_suggest

    suggestion = run_suggest(SuggestConfig(run=str(out)))
    log.info("which layers should I train? (sftlens suggest %s)", out)
    for line in suggestion.lines():
        log.info("  %s", line)
    log.info(
        "  try it: sftlens tune %s --mask %s --data gsm8k  (or --mask auto --from %s)",
        cfg.model,
        suggestion.mask,
        out,
    )
    report(out)
    log.info("report: %s", out / "report.html")
    return out


def report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` from what the run folder holds."""
    from sftlens.reporting.build import build_report

    return build_report(Path(run_dir))
