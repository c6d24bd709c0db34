"""The public Python API. The CLI only parses arguments into configs and calls these.

>>> import sftlens
>>> run = sftlens.weights("smollm2-135m-instruct", "runs/demo/sft_model", out="runs/w")  # doctest: +SKIP
>>> run / "metrics.csv"          # tidy: model, layer, metric, value              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlens.config import (
    AnalyzeConfig,
    DemoConfig,
    DpoConfig,
    EvalConfig,
    InterpolateConfig,
    ProbeConfig,
    SFTConfig,
    SuggestConfig,
    SwapConfig,
    SweepConfig,
    TrajectoryConfig,
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
    "dpo",
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
    "trajectory",
    "tune",
    "weights",
]


def weights(base: str, sft: str, **options: Any) -> Path:
    """Per-layer weight distances between BASE and SFT; returns the run folder.

    Options are the fields of :class:`sftlens.config.WeightsConfig` (``out``, ``allow_pickle``, ...).
    """
    return run_weights(WeightsConfig(base=base, sft=sft, **options))


def run_weights(cfg: WeightsConfig, run: RunFolder | None = None) -> Path:
    from sftlens.io import EXPERTS_COLUMNS, update_rows_csv
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
        if result.experts:  # per-expert distances of a mixture-of-experts pair
            update_rows_csv(
                run.path / "experts.csv",
                result.experts,
                EXPERTS_COLUMNS,
                replace={r["metric"] for r in result.experts},
            )
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

    Options are the fields of :class:`sftlens.config.AnalyzeConfig` (``data``, ``max_prompts``,
    ``layers``, ``every``, ``stream_layers``, ...).
    """
    return run_analyze(AnalyzeConfig(base=base, sft=sft, **options))


def run_analyze(cfg: AnalyzeConfig, run: RunFolder | None = None) -> Path:
    """Run ``analyze`` from a config (into ``run`` when given); see :mod:`sftlens.analysis`."""
    from sftlens.analysis import run_analyze as _run

    return _run(cfg, run)


def _read_state_meta(path: Path) -> dict[str, str] | None:
    from sftlens.analysis import _read_state_meta as _read

    return _read(path)


def _analyze_summary(
    rows: list[dict[str, Any]], n_prompts: int, num_layers: int | None = None
) -> dict[str, Any]:
    from sftlens.analysis import _analyze_summary as _summary

    return _summary(rows, n_prompts, num_layers)


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


def dpo(model: str, **options: Any) -> Path:
    """Preference tuning after SFT: GSM8K pairs (the gold worked answer against the model's own
    sampled wrong answer), then DPO through TRL, LoRA on ``mask``'s layers merged into the
    weights (or ``full=True``); returns the output folder, a Hugging Face model folder with
    ``pairs.jsonl`` and ``trainer_state.json``.

    Options are the fields of :class:`sftlens.config.DpoConfig` (``data``, ``max_examples``,
    ``samples_per_problem``, ``temperature``, ``beta``, ``steps``, ``mask``, ``full``, ...).

    >>> sftlens.dpo("runs/sft", data="gsm8k", max_examples=64, out="runs/dpo")  # doctest: +SKIP
    """
    from sftlens.tuning.dpo import run_dpo

    return run_dpo(DpoConfig(model=model, **options))


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


def trajectory(base: str, checkpoints: str | list[str], **options: Any) -> Path:
    """Weight and representation metrics of every checkpoint against BASE and against the one
    before it (``trajectory.csv``); ``checkpoints``: folders in training order, or one folder
    of ``checkpoint-STEP`` subfolders. Options: :class:`sftlens.config.TrajectoryConfig`.

    >>> run = sftlens.trajectory("smollm2-135m-instruct", "runs/sft", out="runs/t")  # doctest: +SKIP
    """
    from sftlens.experiments.trajectory import run_trajectory

    given = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    return run_trajectory(TrajectoryConfig(base=base, checkpoints=given, **options))


def suggest(run_dir: str | Path, **options: Any) -> Suggestion:
    """A Mid-Block LoRA mask proposed from an analysis run alone, with its evidence per block.

    Options are the fields of :class:`sftlens.config.SuggestConfig` (``blocks``, ``width``,
    ``save``, ...); the rule is documented in :mod:`sftlens.tuning.suggest`.
    """
    from sftlens.tuning.suggest import run_suggest

    return run_suggest(SuggestConfig(run=str(run_dir), **options))


def demo(**options: Any) -> Path:
    """The main job: a short SFT of the base, then where it changed (weights, representations,
    a short eval, the logit-lens probe), when during the SFT each layer moved (a trajectory over
    its checkpoints, in ``OUT/trajectory``) and which layers to train (``suggest``), in one
    report. Resumable."""
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
            # three checkpoints along the way, for the trajectory
            save_every=max(1, cfg.sft_steps // 3) if cfg.trajectory_prompts else cfg.sft_steps,
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
    if cfg.trajectory_prompts:  # when, during the short SFT, did each layer move?
        from sftlens.experiments.trajectory import run_trajectory

        traj = run_trajectory(
            TrajectoryConfig(
                base=cfg.model,
                checkpoints=[str(sft_dir)],
                out=str(out / "trajectory"),
                data=cfg.analyze_data,
                split="test",
                max_prompts=cfg.trajectory_prompts,
                progress=cfg.progress,
            )
        )
        log.info("trajectory over the SFT's checkpoints: %s", traj / "report.html")
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
