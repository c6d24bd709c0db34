"""``sftlens sweep MODEL --masks 11111,01000,...``: Mid-Block LoRA on several masks, compared.

The flow, top to bottom:

1. Resolve the masks (``all`` = every non-empty K-bit mask; ``auto`` = the mask
   :func:`sftlens.tuning.suggest.suggest_mask` proposes from ``--from RUN``, so the suggestion
   is ranked among the swept masks). The all-layers baseline ``11111`` always runs first.
2. For each mask and seed: train it with :func:`sftlens.tuning.tune.run_tune` into
   ``OUT/tune/{mask}-seed{seed}`` under the same seed, data order, step count and (with budget
   matching) the same total LoRA rank; a finished tune with the same inputs is reused.
3. Score each adapter on held-out test problems: teacher-forced ``answer_nll`` and
   ``answer_token_acc`` on the first ``--heldout`` problems (the training prompt format, so it
   reads what the loss optimised) and, with ``--gsm8k N``, greedy k-shot GSM8K accuracy on the
   first N (strict and flexible, with 95% intervals; :mod:`sftlens.evaluation.evaluate`).
4. Each finished item is recorded at once (``.sweep_items.json``), so a partly done sweep
   resumes; ``sweep.csv`` (one row per mask and seed, baseline first), ``summary.json`` (the
   best mask against the baseline, the seed-to-seed spread, where the suggested mask ranks), a
   plot and the report section are written at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sftlens.config import SweepConfig, TuneConfig
from sftlens.errors import SftlensError
from sftlens.io import config_hash, read_json, write_rows_csv

log = logging.getLogger("sftlens.sweep")

Row = dict[str, Any]

#: The paper's masks and the issue's comparison set: baseline, each fifth alone, two middles.
DEFAULT_MASKS = "11111,10000,01000,00100,00010,00001,01100,01110"

#: sweep.csv columns, in order.
SWEEP_COLUMNS = (
    "mask",
    "seed",
    "layer_range",
    "layers",
    "rank_per_layer",
    "alpha",
    "trainable_params",
    "final_loss",
    "answer_nll",
    "answer_token_acc",
    "delta_nll",
    "heldout",
    "gsm8k_strict",
    "gsm8k_strict_low",
    "gsm8k_strict_high",
    "gsm8k_flexible",
    "gsm8k_flexible_low",
    "gsm8k_flexible_high",
    "gsm8k_problems",
    "steps",
    "train_tokens",
    "seconds",
    "step_seconds",
    "peak_memory_mb",
    "suggested",
)
TEXT_COLUMNS = frozenset({"mask", "layer_range"})
INT_COLUMNS = frozenset(
    {"seed", "layers", "rank_per_layer", "trainable_params", "heldout", "gsm8k_problems"}
    | {"steps", "train_tokens", "suggested"}
)


def parse_masks(text: str, num_blocks: int) -> list[str]:
    """The masks to sweep, each once, in the given order (``all``: every non-empty mask).

    ``auto`` is kept as it is (resolved from the analysis run later). Every mask must have
    ``num_blocks`` characters.

    >>> parse_masks("01000, 11111,01000", 5)
    ['01000', '11111']
    >>> len(parse_masks("all", 5))
    31
    >>> parse_masks("all", 2)
    ['10', '01', '11']
    """
    if not text.strip():
        raise SftlensError("--masks is empty; pass e.g. --masks 11111,01000,01100")
    if text.strip().lower() == "all":
        masks = ["".join(bits) for bits in itertools.product("01", repeat=num_blocks)]
        masks = [m for m in masks if "1" in m]
        return sorted(masks, key=lambda m: (m.count("1"), m[::-1]))
    out: list[str] = []
    for part in text.split(","):
        mask = part.strip()
        if mask.lower() == "auto":
            mask = "auto"
        elif not mask or set(mask) - {"0", "1"} or len(mask) != num_blocks or "1" not in mask:
            raise SftlensError(
                f"--masks: {part.strip()!r} is not a mask of K={num_blocks} blocks; write "
                f"{num_blocks} characters of 0/1 with at least one 1 (leftmost = bottom block), "
                "'auto' (with --from RUN) or 'all'"
            )
        if mask not in out:
            out.append(mask)
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (each once).

    >>> parse_seeds("0, 1,0")
    [0, 1]
    """
    out: list[int] = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise SftlensError(
                f"--seeds: {part.strip()!r} is not an integer; pass e.g. --seeds 0,1"
            ) from None
        if seed not in out:
            out.append(seed)
    return out


def tune_config(cfg: SweepConfig, mask: str, seed: int, out: Path) -> TuneConfig:
    """The :class:`TuneConfig` of one item: every shared option from the sweep's config."""
    shared = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(TuneConfig)
        if f.init and hasattr(cfg, f.name)
    }
    shared.update(mask=mask, seed=seed, out=str(out), from_run=None)
    return TuneConfig(**shared)


def heldout_scores(cfg: SweepConfig, adapter: Path, prompts: list[str], targets: list[str]) -> Row:
    """Teacher-forced answer scores of MODEL + ``adapter`` on the held-out problems."""
    from sftlens.evaluation.evaluate import load_adapter
    from sftlens.evaluation.teacher_forced import answer_scores
    from sftlens.models.loading import load_model

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model = load_adapter(model, adapter)
    # whole answers, whatever --max-length cut in training: only the model's context bounds them
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    s = answer_scores(
        model, tok, prompts, targets, batch_size=cfg.batch_size, max_length=context or 4096
    )
    return {"answer_nll": s.answer_nll, "answer_token_acc": s.answer_token_acc}


def gsm8k_scores(cfg: SweepConfig, adapter: Path, out: Path) -> Row:
    """Greedy k-shot GSM8K accuracy of MODEL + ``adapter`` on the first ``cfg.gsm8k`` problems."""
    from sftlens.config import EvalConfig
    from sftlens.evaluation.evaluate import run_eval

    run = run_eval(
        EvalConfig(
            model=cfg.model,
            adapter=str(adapter),
            out=str(out),
            data=cfg.data,
            limit=cfg.gsm8k,
            shots=cfg.shots,
            chat=cfg.chat,
            fewshot_data=cfg.fewshot_data,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            teacher_forced=False,
            dtype=cfg.dtype,
            device=cfg.device,
            progress=cfg.progress,
        )
    )
    ev = read_json(run / "summary.json")["eval"]["base"]
    row: Row = {"gsm8k_problems": ev["problems"]}
    for name in ("gsm8k_strict", "gsm8k_flexible"):
        row[name] = ev[name]["accuracy"]
        row[f"{name}_low"], row[f"{name}_high"] = ev[name]["ci95"]
    return row


def run_sweep(cfg: SweepConfig) -> Path:
    """Train and score every mask (and seed); returns the sweep's run folder."""
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.models.loading import resolve_model
    from sftlens.run import ItemLog, RunFolder, fingerprint
    from sftlens.tuning import tune

    model_dir = resolve_model(cfg.model)
    n_layers = tune._num_layers(model_dir)
    masks = parse_masks(cfg.masks, cfg.blocks)
    seeds = parse_seeds(cfg.seeds)
    if n_layers < cfg.blocks:
        raise SftlensError(
            f"--blocks {cfg.blocks} does not fit a model of {n_layers} layers; pass --blocks "
            f"{n_layers} or fewer"
        )
    suggestion: Any = None
    if "auto" in masks:
        if not cfg.from_run:
            raise SftlensError("--masks auto needs --from RUN_DIR (an analysis run folder)")
        from sftlens.tuning.suggest import suggest_mask

        suggestion = suggest_mask(cfg.from_run, cfg.blocks)
        for line in suggestion.evidence:
            log.info("suggest: %s", line)
        masks = [suggestion.mask if m == "auto" else m for m in masks]
        masks = list(dict.fromkeys(masks))  # the suggestion may be a mask already listed
    baseline = "1" * cfg.blocks
    if baseline not in masks:
        log.info("adding the all-layers baseline %s (every mask is compared with it)", baseline)
    masks = [baseline] + [m for m in masks if m != baseline]

    heldout = resolve_dataset(cfg.data, split="test", limit=cfg.heldout)
    prompts = [format_question(e.question) for e in heldout]
    targets = [format_target(e.answer) for e in heldout]
    run = RunFolder(cfg.out)
    options = dataclasses.asdict(cfg)
    key = config_hash(
        {
            "model": fingerprint(model_dir)["files"],
            "config": {k: v for k, v in options.items() if k not in _NOT_HASHED},
            "heldout": config_hash([prompts, targets]),
        }
    )
    run.save_config(models={"base": cfg.model}, sweep={**options, "items_key": key})
    done = ItemLog(run.path / ".sweep_items.json", key)
    items = [(m, s) for m in masks for s in seeds]
    for i, (mask, seed) in enumerate(items):
        name = f"{mask}-seed{seed}"
        if name in done:
            continue
        log.info("sweep %d/%d: mask %s, seed %d", i + 1, len(items), mask, seed)
        folder = run.path / "tune" / name
        tuned = tune.run_tune(tune_config(cfg, mask, seed, folder))
        result: Row = dict(read_json(tuned / "summary.json"))
        result.update(heldout_scores(cfg, tuned / "adapter", prompts, targets))
        if cfg.gsm8k:
            result.update(gsm8k_scores(cfg, tuned / "adapter", folder / "eval"))
        done.put(name, result)

    if suggestion is not None:
        done.put(SUGGESTION, {"mask": suggestion.mask, "evidence": list(suggestion.evidence)})
    elif SUGGESTION in done:  # suggested by an earlier invocation of this sweep
        suggestion = SimpleNamespace(**done[SUGGESTION])
    rows = sweep_rows(all_items(items, done), done, len(heldout), suggestion)
    write_rows_csv(run.path / "sweep.csv", rows, SWEEP_COLUMNS)
    run.write_summary({"sweep": sweep_summary(rows, suggestion)})
    from sftlens.reporting.plots import plot_sweep

    plot_sweep(rows, run.path / "plots" / "sweep.png")
    from sftlens.api import report

    report(run.path)
    return run.path


#: options that do not change any item's result: a sweep is extended by rerunning it with other
#: masks or seeds (finished items are kept and shown); the tune's own resume covers the rest
_NOT_HASHED = {"out", "progress", "save_every", "device", "masks", "seeds", "from_run"}
SUGGESTION = "suggestion"


def all_items(items: Sequence[tuple[str, int]], done: Any) -> list[tuple[str, str, int]]:
    """``(name, mask, seed)`` of this invocation's items, then the other finished items of the
    same sweep (earlier invocations with other masks or seeds), baseline first, then by the
    order masks first appear, seeds ascending.

    >>> log = {"11-seed0": {}, "01-seed0": {}, "01-seed1": {}, "10-seed0": {}}
    >>> [n for n, _, _ in all_items([("11", 0), ("10", 0)], log)]
    ['11-seed0', '10-seed0', '01-seed0', '01-seed1']
    """
    pairs = list(items)
    for name in done:
        if name == SUGGESTION:
            continue
        mask, seed = name.rsplit("-seed", 1)
        if (mask, int(seed)) not in pairs:
            pairs.append((mask, int(seed)))
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in pairs))}
    pairs.sort(key=lambda p: (set(p[0]) != {"1"}, order[p[0]], p[1]))
    return [(f"{m}-seed{s}", m, s) for m, s in pairs]


def sweep_rows(
    items: Sequence[tuple[str, str, int]],
    done: Any,
    heldout: int,
    suggestion: Any = None,
) -> list[Row]:
    """``sweep.csv`` rows in sweep order, ``delta_nll`` against the baseline of the same seed."""
    rows: list[Row] = []
    for name, mask, seed in items:
        r = done[name]
        row: Row = {c: r.get(c) for c in SWEEP_COLUMNS}
        row.update(mask=mask, seed=seed, heldout=heldout, layers=len(r.get("layers") or []))
        row["suggested"] = int(suggestion is not None and mask == suggestion.mask)
        rows.append(row)
    base = {r["seed"]: r["answer_nll"] for r in rows if set(r["mask"]) == {"1"}}
    for r in rows:
        ref = base.get(r["seed"])
        r["delta_nll"] = None if ref is None else r["answer_nll"] - ref
    return rows


def sweep_summary(rows: Sequence[Row], suggestion: Any = None) -> Row:
    """Per mask the mean over seeds; the best mask; the seed-to-seed spread; the suggestion's rank."""
    by_mask: dict[str, list[Row]] = {}
    for r in rows:
        by_mask.setdefault(r["mask"], []).append(r)
    masks: dict[str, Row] = {}
    for mask, rs in by_mask.items():
        nll = [r["answer_nll"] for r in rs]
        entry: Row = {
            "layer_range": rs[0]["layer_range"],
            "seeds": len(rs),
            "answer_nll": statistics.fmean(nll),
            "answer_nll_spread": (max(nll) - min(nll)) if len(nll) > 1 else None,
        }
        for metric in ("answer_token_acc", "gsm8k_strict", "gsm8k_flexible"):
            values = [r[metric] for r in rs if r.get(metric) is not None]
            if values:
                entry[metric] = statistics.fmean(values)
        masks[mask] = entry
    ranking = sorted(masks, key=lambda m: masks[m]["answer_nll"])
    for i, mask in enumerate(ranking):
        masks[mask]["rank"] = i + 1
    baseline = next((m for m in masks if set(m) == {"1"}), None)
    out: Row = {"masks": masks, "ranking": ranking, "baseline": baseline, "best": ranking[0]}
    spreads = [e["answer_nll_spread"] for e in masks.values() if e["answer_nll_spread"] is not None]
    out["seed_spread_max"] = max(spreads) if spreads else None
    if baseline is not None:
        others = [m for m in ranking if m != baseline]
        if others:
            best = others[0]
            out["best_other"] = best
            out["best_other_delta_nll"] = masks[best]["answer_nll"] - masks[baseline]["answer_nll"]
            out["beats_baseline"] = masks[best]["answer_nll"] < masks[baseline]["answer_nll"]
    if suggestion is not None:
        out["suggested"] = {
            "mask": suggestion.mask,
            "rank": masks[suggestion.mask]["rank"],
            "of": len(masks),
            "evidence": list(suggestion.evidence),
        }
    return out


def read_sweep_csv(path: Path) -> list[Row]:
    """``sweep.csv`` back as dicts: text, int or float cells; empty cells as None."""
    import csv

    out: list[Row] = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: Row = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in TEXT_COLUMNS:
                    row[k] = v
                elif k in INT_COLUMNS:
                    row[k] = int(float(v))
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def report_section(run: Path, rows: list[Row], summary: Row) -> tuple[str, str] | None:
    """(title, html) of the sweep's report section, or None when the run has no sweep.csv."""
    from sftlens.reporting.html import esc, fmt, image

    path = run / "sweep.csv"
    if not path.is_file():
        return None
    table = read_sweep_csv(path)
    s = summary.get("sweep", {})
    body = (
        "<p>LoRA on the layers of each depth-block mask (leftmost character = bottom block), "
        "budget-matched to the all-layers baseline, under the same seed, data order and steps. "
        "Held-out scores on test problems the tuning never saw: teacher-forced answer NLL "
        "(lower is better; <code>delta_nll</code> against the baseline of the same seed) and, "
        "when asked, greedy GSM8K accuracy with 95% intervals.</p>"
    )
    best, base = s.get("best_other"), s.get("baseline")
    if best and base:
        delta = s.get("best_other_delta_nll")
        spread = s.get("seed_spread_max")
        verdict = "beats" if s.get("beats_baseline") else "does not beat"
        body += (
            f"<p>Best mask other than the baseline: <b>{esc(best)}</b> (layers "
            f"{esc(s['masks'][best]['layer_range'])}), which {verdict} {esc(base)} on held-out "
            f"answer NLL by {fmt(abs(delta)) if delta is not None else '?'} nats"
            + (
                f"; the largest seed-to-seed spread of a mask is {fmt(spread)} nats"
                if spread is not None
                else "; run --seeds 0,1 to see the seed-to-seed noise"
            )
            + ".</p>"
        )
    sug = s.get("suggested")
    if sug:
        body += (
            f"<p><code>sftlens suggest</code> proposed <b>{esc(sug['mask'])}</b>; it ranks "
            f"{esc(sug['rank'])} of {esc(sug['of'])} on held-out answer NLL.</p>"
        )
    png = run / "plots" / "sweep.png"
    if png.is_file():
        body += image(png, png.name)
    shown = [c for c in SWEEP_COLUMNS if any(r.get(c) is not None for r in table)]
    shown = [c for c in shown if not c.endswith(("_low", "_high")) and c != "suggested"]
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)

    def cell(r: Row, c: str) -> str:
        v = r.get(c)
        if v is None:
            return ""
        if c in ("gsm8k_strict", "gsm8k_flexible") and r.get(f"{c}_low") is not None:
            return f"{fmt(v)} [{fmt(r[f'{c}_low'])}, {fmt(r[f'{c}_high'])}]"
        return fmt(v) if isinstance(v, float) else esc(v)

    lines = "".join(
        "<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in shown) + "</tr>" for r in table
    )
    body += f"<table><tr>{head}</tr>{lines}</table>"
    return "Mid-Block tuning sweep", body


__all__ = [
    "DEFAULT_MASKS",
    "SWEEP_COLUMNS",
    "parse_masks",
    "parse_seeds",
    "read_sweep_csv",
    "run_sweep",
    "sweep_rows",
    "sweep_summary",
]
