"""Per-layer curves against relative depth, with the stable middle band (20%-80%) marked.

Relative depth of block ``l`` of ``L`` is ``(l + 0.5) / L``: the centre of the slice of depth it
occupies, so it falls inside the same fifth that the mask convention assigns it to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def relative_depth(num_layers: int) -> list[float]:
    return [(i + 0.5) / num_layers for i in range(num_layers)]


def series(rows: Sequence[Row], metric: str, model: str = "pair") -> list[float]:
    """Per-layer values (layers 0..L-1) of one metric for one model; missing layers are nan."""
    by_layer = {
        r["layer"]: r["value"]
        for r in rows
        if r["metric"] == metric
        and r["model"] == model
        and r["layer"] is not None
        and r["layer"] >= 0
    }
    if not by_layer:
        return []
    return [by_layer.get(i, float("nan")) for i in range(max(by_layer) + 1)]


def plot_layers(
    path: str | Path,
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
    band: tuple[float, float] = (0.2, 0.8),
) -> Path:
    """Write one PNG with a line per curve against relative depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.axvspan(
        *band, color="0.92", zorder=0, label=f"middle {int(band[0] * 100)}-{int(band[1] * 100)}%"
    )
    for label, ys in curves.items():
        if len(ys) == 0:
            continue
        ax.plot(
            relative_depth(len(ys)), list(ys), marker="o", markersize=3, linewidth=1.5, label=label
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (layer + 0.5) / L")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure to ``path`` atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_weights(rows: Sequence[Row], plots_dir: str | Path) -> list[Path]:
    """dW per projection against depth (absolute and relative)."""
    plots_dir = Path(plots_dir)
    out = []
    projs = ("q", "k", "v", "o", "attn", "mlp", "router", "experts")  # MoE: router, experts
    absolute = {m: series(rows, f"dw_{m}") for m in projs}
    if any(absolute.values()):
        out.append(
            plot_layers(
                plots_dir / "weights_dw.png",
                absolute,
                title="Weight change per layer",
                ylabel="||W_sft - W_base||_F",
            )
        )
        relative = {
            m: series(rows, f"dw_{m}_rel") for m in ("attn", "mlp", "q", "k", "v", "o", "router")
        }
        out.append(
            plot_layers(
                plots_dir / "weights_dw_rel.png",
                relative,
                title="Relative weight change per layer",
                ylabel="||dW||_F / ||W_base||_F",
            )
        )
    return out


def plot_tune(
    rows: Sequence[Row], history: Sequence[Mapping[str, Any]], plots_dir: str | Path
) -> list[Path]:
    """The LoRA run's loss curve, and its weight change per layer next to the SFT's dW.

    ``tune_lora_dw.png`` shows ``lora_dw_attn`` (and ``lora_dw_mlp``) against depth; when the
    folder also holds the weights analysis of a full SFT (``dw_attn``), that curve is drawn too.
    Each curve is divided by its largest value, so the shapes compare across the very different
    scales of a rank-r adapter and a full fine-tune.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    out = []
    if history:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("answer-token loss (nats)")
        ax.set_title("LoRA training loss")
        ax.grid(alpha=0.3)
        out.append(_save(fig, plots_dir / "tune_loss.png"))
    curves = {
        label: series(rows, metric)
        for label, metric in (
            ("LoRA attn ||scaling B A||", "lora_dw_attn"),
            ("LoRA mlp ||scaling B A||", "lora_dw_mlp"),
            ("full SFT dW attn", "dw_attn"),
            ("full SFT dW mlp", "dw_mlp"),
        )
    }
    scaled = {
        f"{label} / max": [v / top for v in ys]
        for label, ys in curves.items()
        if ys and (top := max((v for v in ys if v == v), default=0.0)) > 0
    }
    if any(k.startswith("LoRA") for k in scaled):
        out.append(
            plot_layers(
                plots_dir / "tune_lora_dw.png",
                scaled,
                title="Weight change per layer (each curve / its max)",
                ylabel="relative to the largest layer",
            )
        )
    return out


def plot_representations(rows: Sequence[Row], plots_dir: str | Path) -> list[Path]:
    """One plot per metric family: information, geometry, attention."""
    plots_dir = Path(plots_dir)
    out: list[Path] = []

    def both(metric: str) -> dict[str, list[float]]:
        return {f"{metric} ({m})": series(rows, metric, m) for m in ("base", "sft")}

    info = {**both("prompt_entropy_norm"), **both("dataset_entropy_norm")}
    if any(info.values()):
        out.append(
            plot_layers(
                plots_dir / "information_entropy.png",
                info,
                title="Normalised matrix entropy",
                ylabel="entropy / log min(n, d)",
            )
        )
        out.append(
            plot_layers(
                plots_dir / "information_erank.png",
                both("erank"),
                title="Effective rank of pooled prompts",
                ylabel="erank",
            )
        )
    geometry = {
        m: series(rows, m) for m in ("cka", "cka_std", "cka_pooled", "cka_unbiased", "cosine")
    }
    if any(geometry.values()):
        out.append(
            plot_layers(
                plots_dir / "geometry_similarity.png",
                geometry,
                title="Base vs SFT similarity",
                ylabel="similarity",
            )
        )
        shift = {"mean_shift_rel": series(rows, "mean_shift_rel")}
        out.append(
            plot_layers(
                plots_dir / "geometry_mean_shift.png",
                shift,
                title="Mean shift, relative to the base mean",
                ylabel="||mu_sft - mu_base|| / ||mu_base||",
            )
        )
    attn = {**both("attn_entropy"), "attn_js (pair)": series(rows, "attn_js")}
    if any(attn.values()):
        out.append(
            plot_layers(
                plots_dir / "attention.png",
                attn,
                title="Attention entropy and base-vs-SFT JS divergence",
                ylabel="nats",
            )
        )
    routing = {m: series(rows, m) for m in ("route_js", "route_load_tv")}
    if any(routing.values()):  # mixture-of-experts layers
        out.append(
            plot_layers(
                plots_dir / "routing.png",
                routing,
                title="Routing shift: router JS (nats) and expert-load total variation",
                ylabel="route_js / route_load_tv",
            )
        )
    return out


def plot_heads(
    heads: Sequence[Row], path: str | Path, metric: str = "attn_js", model: str = "pair"
) -> Path | None:
    """Layer x head heatmap of one per-head metric (from ``heads.csv``)."""
    cells = {
        (int(r["layer"]), int(r["head"])): float(r["value"])
        for r in heads
        if r["metric"] == metric and r["model"] == model
    }
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers, n_heads = max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1
    grid = np.full((n_heads, n_layers), np.nan)
    for (layer, head), v in cells.items():
        grid[head, layer] = v
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * n_heads + 1.6), dpi=110)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(f"{metric} per layer and head ({model})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


# -- causal experiments: swap and interpolate -----------------------------------------------------


def plot_swap(
    rows: Sequence[Row],
    path: str | Path,
    *,
    title: str,
    references: Mapping[str, float],
    metric: str = "answer_nll",
    intervals: Sequence[tuple[float, float]] | None = None,
) -> Path | None:
    """Bars of one swap direction's hybrids (one per span, bottom first), reference lines.

    ``rows`` are ``swap.csv`` rows of one direction; ``references`` maps ``base`` / ``sft`` to
    the unmodified models' value of ``metric``, drawn as horizontal lines; ``intervals``
    (one ``(low, high)`` per row) are drawn as error bars.
    """
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["span"] + (f"\n{r['mask']}" if r.get("mask") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 2.5), 3.8), dpi=110)
    heights = [r[metric] for r in rows]
    yerr = None
    if intervals is not None:
        yerr = [
            [max(0.0, h - lo) for h, (lo, _) in zip(heights, intervals)],
            [max(0.0, hi - h) for h, (_, hi) in zip(heights, intervals)],
        ]
    ax.bar(range(len(rows)), heights, yerr=yerr, capsize=3, color="#4c72b0", zorder=2)
    for (name, value), style in zip(sorted(references.items()), ("--", ":")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1.2, label=f"{name} (unmodified)")
    values = heights + list(references.values())
    if intervals is not None:
        values += [v for pair in intervals for v in pair]
    low, high = min(values), max(values)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
    ax.set_ylim(low - pad, high + pad)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("swapped layers [i:j) (and depth mask)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_interpolate(rows: Sequence[Row], path: str | Path) -> Path | None:
    """``answer_nll`` and ``answer_token_acc`` against alpha, one curve per span; with
    ``--gsm8k`` also ``gsm8k_strict`` and ``gsm8k_flexible`` (one panel each)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = list(dict.fromkeys(r["span"] for r in rows))
    metrics = ["answer_nll", "answer_token_acc"]
    metrics += [m for m in ("gsm8k_strict", "gsm8k_flexible") if rows[0].get(m) is not None]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), dpi=110)
    for ax, metric in zip(axes, metrics):
        for span in spans:
            mine = sorted((r for r in rows if r["span"] == span), key=lambda r: r["alpha"])
            mask = next((r["mask"] for r in mine if r.get("mask")), "")
            ax.plot(
                [r["alpha"] for r in mine],
                [r[metric] for r in mine],
                marker="o",
                markersize=3,
                linewidth=1.5,
                label=span + (f" ({mask})" if mask else ""),
            )
        ax.set_xlabel("alpha (0 = base, 1 = SFT)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="layers", title_fontsize=7)
    fig.suptitle("theta = alpha * theta_sft + (1 - alpha) * theta_base", fontsize=10)
    return _save(fig, path)


def plot_probe(rows: Sequence[Row], plots_dir: str | Path) -> list[Path]:
    """Probe curves (blocks 0..L-1): one plot per metric, both models and every lens present.

    Logit-lens metrics are ``probe_*``, tuned-lens ones ``tuned_probe_*`` (see docs/metrics.md).
    """
    plots_dir = Path(plots_dir)
    out: list[Path] = []
    for metric, title, ylabel in (
        ("probe_acc", "Top-1 accuracy on the gold answer token", "accuracy"),
        ("probe_logprob", "Mean log-prob of the gold answer token", "nats"),
        ("probe_kl", "KL(final || layer) from the model's own output", "nats"),
        ("probe_agreement", "Top-1 agreement of BASE and SFT at the same layer", "fraction"),
    ):
        models = ("pair",) if metric == "probe_agreement" else ("base", "sft")
        curves = {
            (lens if model == "pair" else f"{lens} lens, {model}"): ys
            for lens, prefix in (("logit", ""), ("tuned", "tuned_"))
            for model in models
            if (ys := series(rows, prefix + metric, model))
        }
        if curves:
            out.append(plot_layers(plots_dir / f"{metric}.png", curves, title=title, ylabel=ylabel))
    return out


def plot_sweep(rows: Sequence[Row], path: str | Path, metric: str = "answer_nll") -> Path | None:
    """Held-out ``metric`` per swept mask (bars: mean over seeds, dots: each seed).

    The baseline (all ones) is drawn as a dashed line, so a mask below it (for NLL) beat it;
    the dots show the seed-to-seed noise next to every difference.
    """
    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(r["mask"] for r in rows))
    by_mask = {m: [r[metric] for r in rows if r["mask"] == m] for m in masks}
    means = [sum(v) / len(v) for v in by_mask.values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * len(masks) + 2.5), 3.8), dpi=110)
    colors = [
        "#dd8452" if any(r.get("suggested") for r in rows if r["mask"] == m) else "#4c72b0"
        for m in masks
    ]
    ax.bar(range(len(masks)), means, color=colors, zorder=2)
    for i, m in enumerate(masks):
        ax.scatter([i] * len(by_mask[m]), by_mask[m], color="k", s=10, zorder=3)
    base = next((i for i, m in enumerate(masks) if set(m) == {"1"}), None)
    if base is not None:
        ax.axhline(means[base], color="k", linestyle="--", linewidth=1.2, label="all layers")
        ax.legend(fontsize=7)
    values = [v for vs in by_mask.values() for v in vs]
    low, high = min(values), max(values)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
    ax.set_ylim(low - pad, high + pad)
    labels = [
        m + ("\n" + str(next(r["layer_range"] for r in rows if r["mask"] == m) or ""))
        for m in masks
    ]
    ax.set_xticks(range(len(masks)), labels, fontsize=7)
    ax.set_xlabel("mask (leftmost = bottom block) and its layers; orange = suggested")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("Mid-Block LoRA: held-out score per mask")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    return _save(fig, path)


def plot_trajectory(
    rows: Sequence[Row], plots_dir: str | Path, phase_starts: Sequence[int] = ()
) -> list[Path]:
    """Layer x checkpoint heatmaps (one PNG per ``against``: ``trajectory_base.png``,
    ``trajectory_previous.png``) of ``dw_attn``, ``dw_mlp``, ``cka_std`` and the SFT side's
    ``prompt_entropy_norm``, from ``trajectory.csv`` rows; a white line before each step in
    ``phase_starts`` (where a later training phase, e.g. DPO after SFT, begins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sftlens.experiments.trajectory import HEATMAPS

    points: list[tuple[str, int]] = []
    for r in rows:
        if (r["checkpoint"], r["step"]) not in points:
            points.append((r["checkpoint"], r["step"]))
    out = []
    for against, title in (("base", "against BASE (cumulative)"), ("previous", "per stage")):
        panels = []
        for metric, model in HEATMAPS:
            cells = {
                (r["layer"], (r["checkpoint"], r["step"])): r["value"]
                for r in rows
                if r["against"] == against
                and r["metric"] == metric
                and r["model"] == model
                and r["layer"] is not None
                and r["layer"] >= 0
            }
            if cells:
                layers = sorted({layer for layer, _ in cells})
                grid = [[cells.get((layer, p), float("nan")) for p in points] for layer in layers]
                panels.append((metric if model == "pair" else f"{metric} ({model})", layers, grid))
        if not panels:
            continue
        fig, axes = plt.subplots(
            1, len(panels), figsize=(3.2 * len(panels), 3.6), dpi=110, squeeze=False
        )
        for ax, (name, layers, grid) in zip(axes[0], panels):
            im = ax.imshow(
                grid,
                aspect="auto",
                origin="lower",
                cmap="viridis_r" if name.startswith("cka") else "viridis",
                interpolation="nearest",
            )
            ax.set_title(name, fontsize=9)
            for i, (_, step) in enumerate(points):
                if i and step in phase_starts:
                    ax.axvline(i - 0.5, color="white", linewidth=2)
            ax.set_xticks(range(len(points)))
            ax.set_xticklabels([str(s) for _, s in points], fontsize=7, rotation=45)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([str(layer) for layer in layers], fontsize=7)
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(f"Trajectory {title}", fontsize=10)
        out.append(_save(fig, Path(plots_dir) / f"trajectory_{against}.png"))
    return out


def plot_half_change(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """Per layer, the step at which half of its final change (against BASE) was reached:
    "when did this layer move" (``summary.json``'s ``trajectory.half_change_step``)."""
    half = summary.get("half_change_step", {})
    curves = {
        ("1 - cka_std" if m == "cka_std" else m): [
            float("nan") if v is None else float(v) for v in values
        ]
        for m, values in half.items()
    }
    if not any(curves.values()):
        return None
    return plot_layers(
        path,
        curves,
        title="When did each layer move (half of its final change)",
        ylabel="step",
    )
