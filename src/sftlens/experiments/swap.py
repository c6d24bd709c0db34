"""``sftlens swap BASE SFT``: hybrids with layer spans exchanged between the two models.

For each span ``[i, j)`` (each of ``--blocks K`` depth blocks, and any ``--spans``) the blocks
are exchanged between the two loaded models (:func:`sftlens.experiments.edit.swap_blocks`, no
copy, no reload), which makes both hybrids at once: ``sft_into_base`` (the base with the SFT's
blocks ``i..j-1``) and ``base_into_sft`` (the SFT model with the base's). Each is scored by the
teacher-forced ``answer_nll`` / ``answer_token_acc`` on ``--limit`` problems, next to the two
unmodified models (the ``reference`` rows).

Writes ``swap.csv`` (one row per hybrid and reference), ``summary.json["swap"]``,
``plots/swap_<direction>.png`` and a report section. Each score is recorded as soon as it is
known (``.swap_items.json``, rewritten atomically) under a hash of everything it depends on,
so an interrupted or extended run (more spans) recomputes only what is missing.

The helpers below (:class:`ItemLog`, :class:`LazyPair`, :func:`prepare`, :func:`score`) are
shared with :mod:`sftlens.experiments.interpolate`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlens.config import SwapConfig
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, config_hash, read_json, write_rows_csv
from sftlens.layers import Span, depth_blocks, parse_spans
from sftlens.run import RunFolder, fingerprint

log = logging.getLogger("sftlens.experiments")

DIRECTIONS = ("sft_into_base", "base_into_sft")
#: the model whose other blocks a hybrid keeps (its embeddings, final norm and head too)
HOST = {"sft_into_base": "base", "base_into_sft": "sft"}
#: config fields that change no score: left out of the hash that resume compares
NOT_HASHED = frozenset(
    {
        "base",
        "sft",
        "out",
        "progress",
        "device",
        "allow_pickle",
        "blocks",
        "spans",
        "alphas",
        "all_layers",
    }
)

SWAP_COLUMNS = (
    "direction",
    "host",
    "span",
    "mask",
    "layers",
    "first_layer",
    "last_layer",
    "depth_start",
    "depth_end",
    "answer_nll",
    "answer_token_acc",
    "delta_nll",
    "delta_acc",
    "gain_recovered",
    "gain_lost",
    "tokens",
)


# -- shared with interpolate ---------------------------------------------------------------------


class ItemLog:
    """Finished items of one experiment, keyed by the hash of their inputs (an atomic JSON).

    Items recorded under another key (other data, models, dtype...) are discarded.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        data = read_json(path) if path.is_file() else {}
        self.items: dict[str, dict[str, Any]] = (
            dict(data.get("items", {})) if data.get("key") == key else {}
        )

    def __contains__(self, item: str) -> bool:
        return item in self.items

    def __getitem__(self, item: str) -> dict[str, Any]:
        return self.items[item]

    def put(self, item: str, result: dict[str, Any]) -> None:
        self.items[item] = result
        atomic_write_json(self.path, {"key": self.key, "items": self.items})


@dataclass
class Prepared:
    """Everything an experiment needs before any model is loaded."""

    run: RunFolder
    base_dir: Path
    sft_dir: Path
    num_layers: int
    prompts: list[str]
    targets: list[str]
    key: str


def prepare(cfg: Any, section: str) -> Prepared:
    """Resolve the pair and the data, refuse a mismatched pair, write ``config.json``."""
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.loading import resolve_model
    from sftlens.models.pair import check_pair

    base_dir = resolve_model(cfg.base, allow_pickle=cfg.allow_pickle)
    sft_dir = resolve_model(cfg.sft, allow_pickle=cfg.allow_pickle)
    info = check_pair(CheckpointReader(base_dir).config, CheckpointReader(sft_dir).config)
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.limit)
    prompts = [format_question(e.question) for e in examples]
    targets = [format_target(e.answer) for e in examples]
    run = RunFolder(cfg.out)
    prints = {"base": fingerprint(base_dir), "sft": fingerprint(sft_dir)}
    options = dataclasses.asdict(cfg)
    key = config_hash(
        {
            "fingerprints": {k: v["files"] for k, v in prints.items()},
            "config": {k: v for k, v in options.items() if k not in NOT_HASHED},
            "texts": config_hash([prompts, targets]),
        }
    )
    run.save_config(
        models={"base": cfg.base, "sft": cfg.sft},
        fingerprints=prints,
        **{section: {**options, "items_key": key}},
    )
    run.write_summary({"pair": dataclasses.asdict(info)})
    return Prepared(run, base_dir, sft_dir, info.num_layers, prompts, targets, key)


class LazyPair:
    """Loads both models (and the base tokenizer, used for both) on first use only.

    A rerun whose items are all finished never loads a model.
    """

    def __init__(self, prep: Prepared, cfg: Any) -> None:
        self.prep, self.cfg = prep, cfg
        self._loaded: tuple[Any, Any, Any] | None = None

    def get(self) -> tuple[Any, Any, Any]:
        """``(base, sft, tokenizer)``."""
        if self._loaded is None:
            from sftlens.models.loading import load_model

            base, tok = load_model(
                self.prep.base_dir,
                dtype=self.cfg.dtype,
                device=self.cfg.device,
                allow_pickle=self.cfg.allow_pickle,
            )
            sft, _ = load_model(
                self.prep.sft_dir,
                dtype=self.cfg.dtype,
                device=self.cfg.device,
                allow_pickle=self.cfg.allow_pickle,
            )
            self._loaded = (base, sft, tok)
        return self._loaded


def score(model: Any, tok: Any, prep: Prepared, cfg: Any) -> dict[str, Any]:
    """Teacher-forced answer scores of one (possibly edited) model on the prepared problems."""
    from sftlens.evaluation import teacher_forced

    s = teacher_forced.answer_scores(
        model,
        tok,
        prep.prompts,
        prep.targets,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        progress=False,
    )
    return {"answer_nll": s.answer_nll, "answer_token_acc": s.answer_token_acc, "tokens": s.tokens}


def selected_spans(blocks: int, spans: str, num_layers: int) -> list[Span]:
    """The ``K`` depth blocks (none for ``K = 0``) followed by the extra spans, each once."""
    out = depth_blocks(num_layers, blocks) if blocks else []
    for span in parse_spans(spans, num_layers):
        if not any((s.start, s.stop) == (span.start, span.stop) for s in out):
            out.append(span)
    return out


def span_columns(span: Span, num_layers: int) -> dict[str, Any]:
    start, stop = span.depth(num_layers)
    return {
        "span": span.name,
        "mask": span.mask,
        "layers": len(span.layers),
        "first_layer": span.first,
        "last_layer": span.last,
        "depth_start": start,
        "depth_end": stop,
    }


#: columns of swap.csv / interpolate.csv that hold text (mask: a string of 0/1, not a number)
TEXT_COLUMNS = frozenset({"direction", "host", "span", "mask"})
INT_COLUMNS = frozenset({"layers", "first_layer", "last_layer", "tokens"})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A results CSV back as dicts: text, int or float cells; empty cells as None."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.append(
                {
                    k: None
                    if v == ""
                    else v
                    if k in TEXT_COLUMNS
                    else int(v)
                    if k in INT_COLUMNS
                    else float(v)
                    for k, v in r.items()
                }
            )
    return out


def cell(value: Any) -> str:
    """One HTML table cell's text: empty for None, 4 significant digits for floats."""
    from sftlens.reporting.html import esc, fmt

    return "" if value is None else fmt(value) if isinstance(value, float) else esc(value)


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when the denominator is 0 (no SFT gain to compare against)."""
    return num / den if den != 0 and math.isfinite(num / den) else None


# -- swap ----------------------------------------------------------------------------------------


def run_swap(cfg: SwapConfig) -> Path:
    """Score both hybrids of every selected span, plus the two models; returns the run folder."""
    from tqdm.auto import tqdm

    from sftlens.experiments.edit import swap_blocks

    prep = prepare(cfg, "swap")
    spans = selected_spans(cfg.blocks, cfg.spans, prep.num_layers)
    if not spans:
        raise SftlensError("nothing to swap; pass --blocks K (K >= 1) or --spans i:j")
    done = ItemLog(prep.run.path / ".swap_items.json", prep.key)
    pair = LazyPair(prep, cfg)
    wanted = [f"reference/{m}" for m in ("base", "sft")]
    wanted += [f"{d}/{s.name}" for s in spans for d in DIRECTIONS]
    reused = sum(w in done for w in wanted)
    bar = tqdm(
        total=len(wanted),
        initial=reused,
        desc="swap",
        unit="model",
        disable=not cfg.progress,
    )
    for i, name in enumerate(("base", "sft")):
        item = f"reference/{name}"
        if item not in done:
            models = pair.get()
            bar.set_postfix_str(item)
            done.put(item, score(models[i], models[2], prep, cfg))
            bar.update()
    for span in spans:
        todo = [d for d in DIRECTIONS if f"{d}/{span.name}" not in done]
        if not todo:
            continue
        base, sft, tok = pair.get()
        with swap_blocks(base, sft, span.layers):
            hybrids = {"sft_into_base": base, "base_into_sft": sft}
            for d in todo:
                bar.set_postfix_str(f"{d}/{span.name}")
                done.put(f"{d}/{span.name}", score(hybrids[d], tok, prep, cfg))
                bar.update()
    bar.close()
    log.info("swap: %d models scored, %d reused from an earlier run", len(wanted) - reused, reused)
    rows = swap_rows(done, spans, prep.num_layers)
    write_rows_csv(prep.run.path / "swap.csv", rows, SWAP_COLUMNS)
    summary = swap_summary(rows, len(prep.prompts))
    prep.run.write_summary({"swap": summary})
    from sftlens.reporting.plots import plot_swap

    ref = {r["host"]: r["answer_nll"] for r in rows if r["direction"] == "reference"}
    for d in DIRECTIONS:
        plot_swap(
            [r for r in rows if r["direction"] == d],
            prep.run.path / "plots" / f"swap_{d}.png",
            title=f"{d.replace('_', ' ')}: answer NLL of each hybrid",
            references=ref,
        )
    from sftlens.api import report

    report(prep.run.path)
    return prep.run.path


def swap_rows(done: ItemLog, spans: Sequence[Span], num_layers: int) -> list[dict[str, Any]]:
    """``swap.csv`` rows: the two references, then both directions of every span."""
    ref = {m: done[f"reference/{m}"] for m in ("base", "sft")}
    gain = ref["base"]["answer_nll"] - ref["sft"]["answer_nll"]
    rows: list[dict[str, Any]] = [
        {"direction": "reference", "host": m, "span": "", "layers": 0, **ref[m]}
        for m in ("base", "sft")
    ]
    for d in DIRECTIONS:
        host = ref[HOST[d]]
        for span in spans:
            r = done[f"{d}/{span.name}"]
            row = {"direction": d, "host": HOST[d], **span_columns(span, num_layers), **r}
            row["delta_nll"] = r["answer_nll"] - host["answer_nll"]
            row["delta_acc"] = r["answer_token_acc"] - host["answer_token_acc"]
            if d == "sft_into_base":  # how much of the SFT gain these SFT blocks bring along
                row["gain_recovered"] = ratio(ref["base"]["answer_nll"] - r["answer_nll"], gain)
            else:  # how much of the SFT gain is lost without these SFT blocks
                row["gain_lost"] = ratio(r["answer_nll"] - ref["sft"]["answer_nll"], gain)
            rows.append(row)
    return rows


def swap_summary(rows: Sequence[dict[str, Any]], problems: int) -> dict[str, Any]:
    ref = {r["host"]: r for r in rows if r["direction"] == "reference"}
    hybrids = [r for r in rows if r["direction"] != "reference"]

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        keys = ("direction", "span", "mask", "first_layer", "last_layer", "answer_nll")
        return {k: r.get(k) for k in (*keys, "delta_nll", "gain_recovered", "gain_lost")}

    out: dict[str, Any] = {
        "problems": problems,
        "answer_tokens": ref["base"]["tokens"],
        "base_answer_nll": ref["base"]["answer_nll"],
        "sft_answer_nll": ref["sft"]["answer_nll"],
        "sft_gain_nll": ref["base"]["answer_nll"] - ref["sft"]["answer_nll"],
        "base_answer_token_acc": ref["base"]["answer_token_acc"],
        "sft_answer_token_acc": ref["sft"]["answer_token_acc"],
        "largest_change": brief(max(hybrids, key=lambda r: abs(r["delta_nll"]))),
    }
    for d in DIRECTIONS:
        mine = [r for r in hybrids if r["direction"] == d]
        out[f"largest_change_{d}"] = brief(max(mine, key=lambda r: abs(r["delta_nll"])))
    into_base = [r for r in hybrids if r["direction"] == "sft_into_base"]
    out["gain_recovered"] = {r["span"]: r["gain_recovered"] for r in into_base}
    blocks = [r["gain_recovered"] for r in into_base if r.get("mask")]
    if blocks and all(v is not None for v in blocks):
        # 1.0 if the blocks' effects added up; the rest is interaction between blocks
        out["gain_recovered_sum_of_blocks"] = sum(blocks)
    return out


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of this experiment's report section, or None when the run has no such files."""
    from sftlens.reporting.html import esc, fmt, image

    path = run / "swap.csv"
    if not path.is_file():
        return None
    table = read_csv(path)
    s = summary.get("swap", {})
    body = (
        "<p>Each hybrid is one model with the blocks of a span <code>[i, j)</code> taken from "
        "the other: <b>sft_into_base</b> = the base with SFT blocks, <b>base_into_sft</b> = the "
        "SFT model with base blocks (embeddings, final norm and LM head stay the host's). "
        f"Scored by teacher-forced answer NLL (nats per answer token) on {esc(s.get('problems'))} "
        "problems; <code>delta</code> is against the unmodified host; <code>gain_recovered</code> "
        "is the fraction of the SFT gain (base NLL - SFT NLL) that the SFT blocks bring into the "
        "base, <code>gain_lost</code> the fraction the SFT model loses without them.</p>"
    )
    big = s.get("largest_change")
    if big:
        body += (
            f"<p>Base NLL {fmt(s.get('base_answer_nll'))}, SFT NLL "
            f"{fmt(s.get('sft_answer_nll'))}. The largest change: {esc(big['direction'])} of "
            f"layers {esc(big['first_layer'])}-{esc(big['last_layer'])} "
            f"(span {esc(big['span'])}{' = mask ' + esc(big['mask']) if big.get('mask') else ''}"
            f"), delta NLL {fmt(big['delta_nll'])}.</p>"
        )
    for d in DIRECTIONS:
        png = run / "plots" / f"swap_{d}.png"
        if png.is_file():
            body += image(png, png.name)
    for r in table:  # the layer range next to every span and mask, so nobody has to decode them
        r["layer range"] = (
            "none" if r["direction"] == "reference" else f"{r['first_layer']}-{r['last_layer']}"
        )
    shown = (
        "direction",
        "host",
        "layer range",
        "span",
        "mask",
        "depth_start",
        "depth_end",
        "answer_nll",
        "answer_token_acc",
        "delta_nll",
        "delta_acc",
        "gain_recovered",
        "gain_lost",
    )
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)
    lines = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in shown) + "</tr>" for r in table
    )
    body += f"<table><tr>{head}</tr>{lines}</table>"
    return "Layer swapping (causal)", body
