"""``sftlens interpolate BASE SFT``: ``theta = a * theta_sft + (1 - a) * theta_base``.

For every weight ``a`` in ``--alphas``: every parameter at once (span ``all``: blocks,
embeddings, final norm, LM head; buffers are fixed by the config and never touched) and, with
``--blocks K`` / ``--spans``, the parameters of each span's blocks alone (everything else stays
the base's). The base model is edited in place and restored bit-exactly after each point
(:func:`sftlens.experiments.edit.interpolate_blocks`); each point is scored by the
teacher-forced ``answer_nll`` / ``answer_token_acc`` and, with ``--gsm8k N``, by greedy GSM8K
accuracy (strict and flexible) on the first N problems, as ``sftlens eval`` scores it.

``a = 0`` is the unmodified base for every span, so it is scored once and shared by all the
curves (the edit returns the base bit-exactly there).

Writes ``interpolate.csv`` (span, alpha, scores), ``summary.json["interpolate"]``,
``plots/interpolate.png`` and a report section. Resumable like swap (``.interpolate_items.json``,
``.interpolate_gsm8k_items.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftlens.config import InterpolateConfig
from sftlens.experiments.swap import (
    GSM8K_COLUMNS,
    GSM8K_METRICS,
    LazyPair,
    Scores,
    accuracy_text,
    cell,
    gsm8k_note,
    log,
    prepare,
    read_csv,
    selected_spans,
    span_columns,
)
from sftlens.io import write_rows_csv
from sftlens.layers import Span, parse_alphas

ALL = "all"
INTERPOLATE_COLUMNS = (
    "span",
    "mask",
    "layers",
    "first_layer",
    "last_layer",
    "depth_start",
    "depth_end",
    "alpha",
    "answer_nll",
    "answer_token_acc",
    "tokens",
    *GSM8K_COLUMNS,
)


def _item(span: str, alpha: float) -> str:
    return "base" if alpha == 0 else f"{span}@{alpha!r}"


def run_interpolate(cfg: InterpolateConfig) -> Path:
    """Score every (span, alpha) point; returns the run folder."""
    from tqdm.auto import tqdm

    from sftlens.experiments.edit import interpolate_blocks

    prep = prepare(cfg, "interpolate")
    alphas = parse_alphas(cfg.alphas)
    targets: list[tuple[str, Span | None]] = [(ALL, None)] if cfg.all_layers else []
    targets += [(s.name, s) for s in selected_spans(cfg.blocks, cfg.spans, prep.num_layers)]
    done = Scores(prep, "interpolate")
    pair = LazyPair(prep, cfg)
    wanted = list(dict.fromkeys(_item(name, a) for name, _ in targets for a in alphas))
    reused = sum(w in done for w in wanted)
    bar = tqdm(
        total=len(wanted),
        initial=reused,
        desc="interpolate",
        unit="model",
        disable=not cfg.progress,
    )
    for name, span in targets:
        for a in alphas:
            item = _item(name, a)
            if item in done:
                continue
            base, sft, tok = pair.get()
            bar.set_postfix_str(item)
            with interpolate_blocks(base, sft, None if span is None else span.layers, a):
                done.score(item, base, tok, cfg)
            bar.update()
    bar.close()
    log.info(
        "interpolate: %d models scored, %d reused from an earlier run",
        len(wanted) - reused,
        reused,
    )
    rows = []
    for name, span in targets:
        where = (
            span_columns(span, prep.num_layers)
            if span is not None
            else span_columns(Span(0, prep.num_layers), prep.num_layers) | {"span": ALL}
        )
        rows += [{**where, "alpha": a, **done[_item(name, a)]} for a in alphas]
    write_rows_csv(prep.run.path / "interpolate.csv", rows, INTERPOLATE_COLUMNS)
    prep.run.write_summary({"interpolate": interpolate_summary(rows, len(prep.prompts))})
    from sftlens.reporting.plots import plot_interpolate

    plot_interpolate(rows, prep.run.path / "plots" / "interpolate.png")
    from sftlens.api import report

    report(prep.run.path)
    return prep.run.path


def interpolate_summary(rows: list[dict[str, Any]], problems: int) -> dict[str, Any]:
    """Per span: the best alpha, and the barrier above the straight line between the ends.

    ``barrier_nll`` = max over interior alphas of ``nll(a) - ((1 - a) nll(0) + a nll(1))``:
    positive when the path between the two models climbs above the line joining them (as in
    linear mode connectivity), None without both ends and an interior point.
    """
    out: dict[str, Any] = {"problems": problems, "spans": {}}
    for span in dict.fromkeys(r["span"] for r in rows):
        curve = {r["alpha"]: r["answer_nll"] for r in rows if r["span"] == span}
        best = min(curve, key=lambda a: curve[a])
        inner = [a for a in curve if 0 < a < 1]
        barrier = (
            max(curve[a] - ((1 - a) * curve[0.0] + a * curve[1.0]) for a in inner)
            if inner and 0.0 in curve and 1.0 in curve
            else None
        )
        out["spans"][span] = {
            "best_alpha": best,
            "best_answer_nll": curve[best],
            "answer_nll_at_0": curve.get(0.0),
            "answer_nll_at_1": curve.get(1.0),
            "barrier_nll": barrier,
        }
        acc = {r["alpha"]: r.get("gsm8k_flexible") for r in rows if r["span"] == span}
        if all(v is not None for v in acc.values()):  # --gsm8k: the most accurate alpha
            top = max(acc, key=lambda a: float(acc[a] or 0))  # the first of equals, in order
            out["spans"][span] |= {"best_gsm8k_alpha": top, "best_gsm8k_flexible": acc[top]}
    gsm8k = [r.get("gsm8k_problems") for r in rows]
    if gsm8k and gsm8k[0] is not None:
        out["gsm8k_problems"] = gsm8k[0]
    return out


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of this experiment's report section, or None when the run has no such files."""
    from sftlens.reporting.html import esc, fmt, image

    path = run / "interpolate.csv"
    if not path.is_file():
        return None
    table = read_csv(path)
    s = summary.get("interpolate", {})
    body = (
        "<p>The base model with its parameters set to "
        "<code>a * theta_sft + (1 - a) * theta_base</code>: for <b>all</b> every parameter "
        "(blocks, embeddings, final norm, LM head), for a span <code>[i, j)</code> only the "
        "parameters of those blocks. Scored by teacher-forced answer NLL (nats per answer token) "
        f"on {esc(s.get('problems'))} problems. <code>barrier</code>: how far the curve rises "
        "above the straight line between its two ends.</p>"
    )
    generation = any(r.get("gsm8k_flexible") is not None for r in table)
    if generation:
        body += gsm8k_note(s.get("gsm8k_problems"))
    png = run / "plots" / "interpolate.png"
    if png.is_file():
        body += image(png, png.name)
    spans = s.get("spans", {})
    if spans:
        extra = "<th>most accurate alpha (flexible)</th>" if generation else ""
        body += (
            "<table><tr><th class=l>span</th><th>best alpha</th><th>best NLL</th>"
            f"<th>NLL at 0</th><th>NLL at 1</th><th>barrier</th>{extra}</tr>"
            + "".join(
                f"<tr><td class=l>{esc(name)}</td><td>{fmt(v['best_alpha'])}</td>"
                f"<td>{fmt(v['best_answer_nll'])}</td><td>{cell(v['answer_nll_at_0'])}</td>"
                f"<td>{cell(v['answer_nll_at_1'])}</td><td>{cell(v['barrier_nll'])}</td>"
                + (
                    f"<td>{cell(v.get('best_gsm8k_alpha'))} "
                    f"({cell(v.get('best_gsm8k_flexible'))})</td>"
                    if generation
                    else ""
                )
                + "</tr>"
                for name, v in spans.items()
            )
            + "</table>"
        )
    for r in table:
        r["layer range"] = (
            "every parameter" if r["span"] == ALL else f"{r['first_layer']}-{r['last_layer']}"
        )
        for m in GSM8K_METRICS:
            r[m + " (count, 95%)"] = accuracy_text(r, m)
    shown: tuple[str, ...] = (
        "span",
        "layer range",
        "mask",
        "alpha",
        "answer_nll",
        "answer_token_acc",
    )
    if generation:
        shown += ("gsm8k_strict (count, 95%)", "gsm8k_flexible (count, 95%)")
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)
    lines = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in shown) + "</tr>" for r in table
    )
    body += f"<table><tr>{head}</tr>{lines}</table>"
    return "Layer-wise interpolation (causal)", body
