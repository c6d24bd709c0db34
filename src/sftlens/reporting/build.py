"""Assemble ``report.html`` from a run folder's config.json, summary.json, metrics.csv, plots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sftlens.errors import SftlensError
from sftlens.io import read_json, read_metrics_csv
from sftlens.layers import layer_ranges
from sftlens.reporting.html import esc, image, kv_table, layer_table, render, whole_model_table

WEIGHT_COLUMNS = (
    "dw_q",
    "dw_k",
    "dw_v",
    "dw_o",
    "dw_attn",
    "dw_attn_rel",
    "dw_mlp",
    "dw_mlp_rel",
    "dw_router",  # mixture-of-experts layers only (a column is shown when present)
    "dw_router_rel",
    "dw_experts_rel",
    "dw_shared_expert_rel",
    "dw_norm",
    "dw_block_rel",
)


PAIR_COLUMNS = (
    "cka",
    "cka_std",
    "cka_pooled",
    "cka_unbiased",
    "cosine",
    "mean_shift",
    "mean_shift_rel",
    "attn_js",
    "route_js",  # mixture-of-experts layers only
    "route_load_tv",
)
MODEL_COLUMNS = (
    "prompt_entropy",
    "prompt_entropy_norm",
    "dataset_entropy",
    "dataset_entropy_norm",
    "erank",
    "erank_sigma2",
    "top_feature_share",
    "attn_entropy",
)


_EXPERIMENT_SECTIONS = (
    "sftlens.evaluation.evaluate",
    "sftlens.experiments.probe",
    "sftlens.experiments.swap",
    "sftlens.experiments.interpolate",
    "sftlens.tuning.tune",
    "sftlens.tuning.suggest",
    "sftlens.tuning.sweep",
    "sftlens.experiments.trajectory",
)


RUN_FILES = ("config.json", "metrics.csv", "summary.json")
_MAKERS = (
    "sftlens weights, analyze, eval, probe, swap, interpolate, tune, sweep, trajectory or demo"
)


def build_report(run: Path) -> Path:
    if not run.is_dir():
        what = "is not a folder" if run.exists() else "does not exist"
        raise SftlensError(f"run folder {run} {what}; make one with {_MAKERS} (--out FOLDER)")
    if not any((run / name).is_file() for name in RUN_FILES):
        raise SftlensError(
            f"{run} holds no run files ({', '.join(RUN_FILES)}); pass the --out folder of a run "
            f"made with {_MAKERS}"
        )
    config: dict[str, Any] = (
        read_json(run / "config.json") if (run / "config.json").is_file() else {}
    )
    summary: dict[str, Any] = (
        read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    )
    rows = read_metrics_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    sections: list[tuple[str, str]] = []

    models = config.get("models", {})
    pair = summary.get("pair", {})
    # a single-model run (one eval) names only the model it holds
    overview = [(role, models[role]) for role in ("base", "sft") if role in models] or [
        ("model", "?")
    ]
    overview += [(k, v) for k, v in pair.items()]
    overview += [(f"version {k}", v) for k, v in config.get("versions", {}).items()]
    sections.append(("Pair" if len(models) > 1 else "Model", kv_table(overview)))

    if any(r["metric"].startswith("dw_") for r in rows):
        w = summary.get("weights", {})
        body = ""
        if w:
            body += (
                f"<p>Largest attention change at layer {esc(w.get('layer_of_max_dw_attn'))} "
                f"(relative depth {w.get('relative_depth_of_max_dw_attn', 0):.2f}). "
                "The shaded band is the middle 20-80% of depth, which the paper finds most stable.</p>"
            )
        for name in ("weights_dw.png", "weights_dw_rel.png"):
            if (run / "plots" / name).is_file():
                body += image(run / "plots" / name, name)
        body += layer_table(rows, WEIGHT_COLUMNS)
        body += "<h3>Embeddings, final norm, LM head, totals</h3>" + whole_model_table(
            [r for r in rows if r["model"] == "pair" and (r["layer"] is None or r["layer"] < 0)]
        )
        sections.append(("Weight change (optimization dynamics)", body))

    if any(r["metric"] == "cka" for r in rows):
        a = summary.get("analyze", {})
        body = f"<p>{esc(a.get('prompts', '?'))} prompts through both models; padding excluded.</p>"
        for threshold in ("0.98", "0.9"):
            hit = a.get(f"cka_first_below_{threshold}")
            where = (
                "never"
                if not hit
                else f"at layer {hit['layer']} (relative depth {hit['relative_depth']:.2f})"
            )
            body += f"<p>Token-level CKA first falls below {threshold}: {esc(where)}.</p>"
        massive = a.get("massive_feature_layers") or []
        if massive:
            body += (
                f"<p>In {len(massive)} layers ({esc(layer_ranges(massive))}) a single feature carries "
                "more than half of the base model's token variance (a massive activation); plain "
                "CKA mostly compares that feature there. <code>cka_std</code> (CKA of z-scored "
                "features) weighs every feature alike.</p>"
            )
        for name in (
            "geometry_similarity.png",
            "geometry_mean_shift.png",
            "information_entropy.png",
            "information_erank.png",
            "attention.png",
            "attention_heads_js.png",
            "routing.png",
        ):
            if (run / "plots" / name).is_file():
                body += image(run / "plots" / name, name)
        body += "<h3>Base vs SFT (pair)</h3>" + layer_table(rows, PAIR_COLUMNS, "pair")
        for model in ("base", "sft"):
            body += f"<h3>{model}</h3>" + layer_table(rows, MODEL_COLUMNS, model)
        sections.append(("Representations (information, geometry, attention)", body))

    # each experiment renders its own section from the files it wrote (None: not in this run)
    for module in _EXPERIMENT_SECTIONS:
        section = importlib.import_module(module).report_section(run, rows, summary)
        if section is not None:
            sections.append(section)

    def entry(p: Path) -> str:  # a sub-run's own report is a link
        if (p / "report.html").is_file():
            return f'<li><a href="{esc(p.name)}/report.html"><code>{esc(p.name)}/</code></a></li>'
        return f"<li><code>{esc(p.name)}</code></li>"

    files = "".join(
        entry(p)
        for p in sorted(run.iterdir())
        if not p.name.startswith(".") and p.name != "report.html"
    )
    sections.append(("Files in this run", f"<ul>{files}</ul>"))
    return render("sftlens report", sections, run / "report.html")
