"""``sftlens swap BASE SFT``: hybrids with layer spans exchanged between the two models.

For each span ``[i, j)`` (each of ``--blocks K`` depth blocks, and any ``--spans``) the blocks
are exchanged between the two loaded models (:func:`sftlens.experiments.edit.swap_blocks`, no
copy, no reload), which makes both hybrids at once: ``sft_into_base`` (the base with the SFT's
blocks ``i..j-1``) and ``base_into_sft`` (the SFT model with the base's). Each is scored by the
teacher-forced ``answer_nll`` / ``answer_token_acc`` on ``--limit`` problems and, with
``--gsm8k N``, by greedy GSM8K generation on the first N problems (strict and flexible accuracy,
the task of ``sftlens eval``: :func:`sftlens.evaluation.evaluate.gsm8k_scores`), next to the two
unmodified models (the ``reference`` rows).

Writes ``swap.csv`` (one row per hybrid and reference), ``summary.json["swap"]``,
``plots/swap_<direction>.png`` and a report section. Each score is recorded as soon as it is
known (``.swap_items.json``, rewritten atomically) under a hash of everything it depends on,
so an interrupted or extended run (more spans) recomputes only what is missing. Generation
scores live in their own log (``.swap_gsm8k_items.json``) under a hash of the models, the task
and the N problems, so changing ``--gsm8k`` (or the task) leaves the teacher-forced scores
alone, and the reverse.

The helpers below (:class:`ItemLog`, :class:`Scores`, :class:`LazyPair`, :func:`prepare`,
:func:`score`) are shared with :mod:`sftlens.experiments.interpolate`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sftlens.config import SwapConfig
from sftlens.errors import SftlensError
from sftlens.io import config_hash, write_rows_csv
from sftlens.layers import Span, depth_blocks, parse_spans
from sftlens.run import ItemLog, RunFolder, fingerprint

if TYPE_CHECKING:
    from sftlens.evaluation.evaluate import Problems

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
        # generation options: they enter the hash of the generation scores only
        "gsm8k",
        "shots",
        "chat",
        "max_new_tokens",
        "fewshot_data",
    }
)
GSM8K_METRICS = ("gsm8k_strict", "gsm8k_flexible")
#: generation columns (empty without --gsm8k): accuracy, count correct, 95% Wilson interval
GSM8K_COLUMNS = (
    *(f"{m}{part}" for m in GSM8K_METRICS for part in ("", "_correct", "_ci_low", "_ci_high")),
    "gsm8k_problems",
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
    *GSM8K_COLUMNS,
    "delta_gsm8k_strict",
    "delta_gsm8k_flexible",
)


# -- shared with interpolate ---------------------------------------------------------------------


class Results(Protocol):
    """Recorded scores by item name (:class:`ItemLog`, :class:`Scores`)."""

    def __getitem__(self, item: str) -> dict[str, Any]: ...


def gsm8k_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``GSM8K_COLUMNS`` of one model from :func:`~sftlens.evaluation.evaluate.summarize`'s
    summary.

    >>> s = {"problems": 4, "gsm8k_strict": {"correct": 1, "total": 4, "accuracy": 0.25,
    ...      "ci95": [0.05, 0.7]}, "gsm8k_flexible": {"correct": 2, "total": 4,
    ...      "accuracy": 0.5, "ci95": [0.15, 0.85]}}
    >>> c = gsm8k_columns(s)
    >>> c["gsm8k_strict"], c["gsm8k_flexible_correct"], c["gsm8k_flexible_ci_high"], c["gsm8k_problems"]
    (0.25, 2, 0.85, 4)
    """
    out: dict[str, Any] = {"gsm8k_problems": summary["problems"]}
    for m in GSM8K_METRICS:
        acc = summary[m]
        out[m] = acc["accuracy"]
        out[f"{m}_correct"] = acc["correct"]
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = acc["ci95"]
    return out


def accuracy_text(row: dict[str, Any], metric: str) -> str | None:
    """``12/50 = 24.0% [14.3%, 37.4%]`` from a row's generation columns; None without them."""
    from sftlens.evaluation.scoring import Accuracy

    if row.get(f"{metric}_correct") is None or row.get("gsm8k_problems") is None:
        return None
    return str(Accuracy(int(row[f"{metric}_correct"]), int(row["gsm8k_problems"])))


@dataclass
class Prepared:
    """Everything an experiment needs before any model is loaded.

    ``problems`` / ``gen_key``: the ``--gsm8k`` problems and the hash their scores are recorded
    under (None without ``--gsm8k``).
    """

    run: RunFolder
    base_dir: Path
    sft_dir: Path
    num_layers: int
    prompts: list[str]
    targets: list[str]
    key: str
    problems: Problems | None = None
    gen_key: str | None = None


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
    problems, gen_key = None, None
    if cfg.gsm8k:
        from sftlens.evaluation import evaluate

        tok = evaluate.load_tokenizer(base_dir)  # both models read the base tokenizer's ids
        problems = evaluate.load_problems(
            tok,
            evaluate.task_from_config(cfg),
            data=cfg.data,
            split=cfg.split,
            limit=cfg.gsm8k,
            fewshot_data=cfg.fewshot_data,
        )
        evaluate.check_context(base_dir, tok, problems, teacher_forced=False)
        gen_key = config_hash(
            {
                "fingerprints": {k: v["files"] for k, v in prints.items()},
                "dtype": cfg.dtype,
                **problems.inputs(),
            }
        )
    run.save_config(
        models={"base": cfg.base, "sft": cfg.sft},
        fingerprints=prints,
        **{section: {**options, "items_key": key, "gsm8k_key": gen_key}},
    )
    run.write_summary({"pair": dataclasses.asdict(info)})
    return Prepared(
        run, base_dir, sft_dir, info.num_layers, prompts, targets, key, problems, gen_key
    )


class Scores:
    """The recorded scores of an experiment's models, each kind in its own :class:`ItemLog`:
    teacher-forced (always, ``.{name}_items.json``) and generation (with ``--gsm8k``,
    ``.{name}_gsm8k_items.json``); an item is done when every kind has it."""

    def __init__(self, prep: Prepared, name: str) -> None:
        self.prep = prep
        self.tf = ItemLog(prep.run.path / f".{name}_items.json", prep.key)
        self.gen = (
            None
            if prep.gen_key is None
            else ItemLog(prep.run.path / f".{name}_gsm8k_items.json", prep.gen_key)
        )

    def __contains__(self, item: str) -> bool:
        return item in self.tf and (self.gen is None or item in self.gen)

    def __getitem__(self, item: str) -> dict[str, Any]:
        return {**self.tf[item], **(self.gen[item] if self.gen is not None else {})}

    def score(self, item: str, model: Any, tok: Any, cfg: Any) -> None:
        """Score ``model`` (as it is now: a hybrid inside its edit) by every missing kind."""
        if item not in self.tf:
            self.tf.put(item, score(model, tok, self.prep, cfg))
        if self.gen is not None and item not in self.gen:
            from sftlens.evaluation.evaluate import gsm8k_scores

            assert self.prep.problems is not None
            summary = gsm8k_scores(model, tok, self.prep.problems, batch_size=cfg.batch_size)
            self.gen.put(item, gsm8k_columns(summary))


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
INT_COLUMNS = frozenset(
    {"layers", "first_layer", "last_layer", "tokens", "gsm8k_problems"}
    | {f"{m}_correct" for m in GSM8K_METRICS}
)


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


def gsm8k_note(problems: Any) -> str:
    """The report's sentence on the ``--gsm8k`` scores (task as in ``config.json``)."""
    from sftlens.reporting.html import esc

    return (
        "<p>GSM8K accuracy: greedy generation on the first "
        f"{esc(problems)} problems, scored as <code>sftlens eval</code> does (<b>strict</b> "
        "reads the first <code>#### N</code>, <b>flexible</b> the last number; 95% Wilson "
        "intervals; small N is noisy).</p>"
    )


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
    done = Scores(prep, "swap")
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
            done.score(item, models[i], models[2], cfg)
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
                done.score(f"{d}/{span.name}", hybrids[d], tok, cfg)
                bar.update()
    bar.close()
    log.info("swap: %d models scored, %d reused from an earlier run", len(wanted) - reused, reused)
    rows = swap_rows(done, spans, prep.num_layers)
    write_rows_csv(prep.run.path / "swap.csv", rows, SWAP_COLUMNS)
    summary = swap_summary(rows, len(prep.prompts))
    prep.run.write_summary({"swap": summary})
    from sftlens.reporting.plots import plot_swap

    refs = {r["host"]: r for r in rows if r["direction"] == "reference"}
    for d in DIRECTIONS:
        mine = [r for r in rows if r["direction"] == d]
        plot_swap(
            mine,
            prep.run.path / "plots" / f"swap_{d}.png",
            title=f"{d.replace('_', ' ')}: answer NLL of each hybrid",
            references={m: r["answer_nll"] for m, r in refs.items()},
        )
        if prep.problems is not None:
            plot_swap(
                mine,
                prep.run.path / "plots" / f"swap_{d}_gsm8k.png",
                title=f"{d.replace('_', ' ')}: GSM8K flexible (95% CI)",
                references={m: r["gsm8k_flexible"] for m, r in refs.items()},
                metric="gsm8k_flexible",
                intervals=[(r["gsm8k_flexible_ci_low"], r["gsm8k_flexible_ci_high"]) for r in mine],
            )
    from sftlens.api import report

    report(prep.run.path)
    return prep.run.path


def swap_rows(done: Results, spans: Sequence[Span], num_layers: int) -> list[dict[str, Any]]:
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
            for m in GSM8K_METRICS:
                if r.get(m) is not None and host.get(m) is not None:
                    row[f"delta_{m}"] = r[m] - host[m]
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
    if ref["base"].get("gsm8k_problems") is not None:  # --gsm8k: the references as eval has them
        out["gsm8k_problems"] = ref["base"]["gsm8k_problems"]
        for model in ("base", "sft"):
            for m in GSM8K_METRICS:
                out[f"{model}_{m}"] = {
                    "correct": ref[model][f"{m}_correct"],
                    "total": ref[model]["gsm8k_problems"],
                    "accuracy": ref[model][m],
                    "ci95": [ref[model][f"{m}_ci_low"], ref[model][f"{m}_ci_high"]],
                    "text": accuracy_text(ref[model], m),
                }
        top = max(hybrids, key=lambda r: abs(r["delta_gsm8k_flexible"]))
        out["largest_change_gsm8k_flexible"] = {
            k: top.get(k) for k in ("direction", "span", "mask", "gsm8k_flexible")
        } | {"delta_gsm8k_flexible": top["delta_gsm8k_flexible"]}
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
    generation = any(r.get("gsm8k_flexible") is not None for r in table)
    if generation:
        body += gsm8k_note(s.get("gsm8k_problems"))
        big = s.get("largest_change_gsm8k_flexible")
        if big:
            body += (
                f"<p>Base flexible accuracy {esc(s['base_gsm8k_flexible']['text'])}, SFT "
                f"{esc(s['sft_gsm8k_flexible']['text'])}. The largest change of flexible "
                f"accuracy: {esc(big['direction'])} of span {esc(big['span'])}, "
                f"{fmt(big['delta_gsm8k_flexible'])}.</p>"
            )
    for d in DIRECTIONS:
        for png in (run / "plots" / f"swap_{d}.png", run / "plots" / f"swap_{d}_gsm8k.png"):
            if png.is_file():
                body += image(png, png.name)
    for r in table:  # the layer range next to every span and mask, so nobody has to decode them
        r["layer range"] = (
            "none" if r["direction"] == "reference" else f"{r['first_layer']}-{r['last_layer']}"
        )
        for m in GSM8K_METRICS:
            r[m + " (count, 95%)"] = accuracy_text(r, m)
    shown: tuple[str, ...] = (
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
    if generation:
        shown += (
            "gsm8k_strict (count, 95%)",
            "gsm8k_flexible (count, 95%)",
            "delta_gsm8k_strict",
            "delta_gsm8k_flexible",
        )
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)
    lines = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in shown) + "</tr>" for r in table
    )
    body += f"<table><tr>{head}</tr>{lines}</table>"
    return "Layer swapping (causal)", body
