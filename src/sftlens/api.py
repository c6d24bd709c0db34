"""The public Python API. The CLI only parses arguments into configs and calls these.

>>> import sftlens                                                     # doctest: +SKIP
>>> run = sftlens.weights("smollm2-135m-instruct", "runs/demo/sft_model", out="runs/w")
>>> run / "metrics.csv"                                               # tidy: model, layer, metric, value
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sftlens.config import DemoConfig, SFTConfig, WeightsConfig
from sftlens.models.loading import load_model, resolve_model
from sftlens.run import RunFolder, fingerprint

__all__ = ["demo", "load_model", "report", "resolve_model", "sft", "weights"]


def weights(base: str, sft: str, **options: Any) -> Path:
    """Per-layer weight distances between BASE and SFT; returns the run folder.

    Options are the fields of :class:`sftlens.config.WeightsConfig` (``out``, ``allow_pickle``, ...).
    """
    return run_weights(WeightsConfig(base=base, sft=sft, **options))


def run_weights(cfg: WeightsConfig, run: RunFolder | None = None) -> Path:
    from sftlens.report.plots import plot_weights
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
        result = weight_diff(base_dir, sft_dir, progress=cfg.progress)
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
    from sftlens.report.plots import series

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


def sft(model: str, **options: Any) -> Path:
    """Full-parameter SFT; options are the fields of :class:`sftlens.config.SFTConfig`."""
    from sftlens.tuning.sft import train_sft

    return train_sft(SFTConfig(model=model, **options))


def demo(**options: Any) -> Path:
    """The main job: resolve the base, a short SFT, weight analysis, report. Resumable."""
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
    return out


def report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` from what the run folder holds."""
    from sftlens.report.build import build_report

    return build_report(Path(run_dir))
