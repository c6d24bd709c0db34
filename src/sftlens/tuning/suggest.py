"""Propose a Mid-Block LoRA mask from an analysis run alone, before any training.

The rule (``stable-middle/1``), in one sentence: **among the depth blocks in the middle 20-80%
of depth, train the contiguous ones that SFT changed least, where "change" is each available
metric family's per-layer value ranked across layers and averaged.**

It follows the paper's finding that the middle of depth stays stable under SFT while the top
is rewritten, and that LoRA on middle blocks beats LoRA on every layer (OLMo2-7B, GSM8K:
``01000`` 0.375 vs ``11111`` 0.28; ``10000`` ~0.22, ``00001`` ~0.135). Step by step:

1. **Change per layer, per family** (layers ``0..L-1``; embeddings and whole-model rows are
   ignored). Each family contributes ONE metric, the first of its list found in
   ``metrics.csv``, oriented so that larger = SFT changed the layer more:

   - ``weights`` (``sftlens weights``): ``dw_block_rel``, else ``dw_attn_rel``, ``dw_mlp_rel``,
     ``dw_block``, ``dw_attn``, ``dw_mlp``;
   - ``geometry`` (``sftlens analyze``): ``1 - cka_std``, else ``1 - cka``;
   - ``entropy`` (``sftlens analyze``): ``|sft - base|`` of ``prompt_entropy_norm``, else
     ``prompt_entropy``, ``dataset_entropy_norm``;
   - ``probing`` (``sftlens probe``): ``1 - probe_agreement``, else ``|sft - base|`` of
     ``probe_kl``.

2. **Scale-free**: each family's values are replaced by their rank across layers, scaled to
   ``[0, 1]`` (0 = least changed layer, ties share their mean rank), so dW of different
   models, CKA and entropy all count alike and one outlier layer cannot dominate.
3. **Per block** (SPEC depth blocks, :func:`sftlens.layers.depth_blocks`): a family's block
   score is the mean of its layers' normalised ranks; the block's ``change`` is the mean over
   the families present. The mean over all layers of a family is exactly 0.5, so a block
   below 0.5 changed less than the average layer.
4. **Candidates**: blocks whose centre lies in ``[min_depth, max_depth]`` (default 0.2-0.8,
   the paper's middle band; with K=5 the blocks ``01110``). This is the rule's prior, stated
   plainly: the data chooses among the middle blocks and how many to take, not whether to
   train the middle. Reasons: the representation metrics are cumulative (CKA, cosine and
   entropy change compare the states AFTER a layer, which carry every change below it), so
   the bottom always looks stable and the top changed, whatever those layers do; the paper
   found both ends the worst places to train (``10000`` ~0.22, ``00001`` ~0.135); and a short
   SFT can leave dW nearly flat across depth (SmolLM2-135M after 20 steps: ``dw_block_rel``
   varies by 3%), where ranks alone would follow noise to either end. Pass
   ``min_depth=0, max_depth=1`` for a purely data-driven choice. Probing accuracy "still at
   chance" was not used to exclude blocks: on SmolLM2-135M the logit-lens accuracy stays at
   its embedding level up to ~60% of depth, which would exclude the middle itself.
5. **Mask**: the candidate block with the lowest change (ties: the one nearer mid-depth, then
   the lower one), widened one block at a time by its lower-scoring candidate neighbour while
   that neighbour's change is below 0.5 (less than the average layer), up to ``max_width``
   blocks (default 3). ``width=W`` instead takes the contiguous run of ``W`` candidate blocks
   with the lowest mean change (same tie-breaks).

Missing families are skipped and named in :attr:`Suggestion.missing`; with none present the
run folder is refused with the commands that make them. A family whose raw values vary by less
than 10% across layers (coefficient of variation) is flagged in :attr:`Suggestion.notes` as
weak evidence; it still counts (the rule does not depend on any scale).

>>> rows = [{"model": "pair", "layer": l, "metric": "dw_block_rel", "value": v}
...         for l, v in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])]
>>> s = suggest_from_rows(rows, num_blocks=5)
>>> s.mask, s.layers, s.layer_range
('01000', [2, 3], 'layers 2-3 (20-40% of depth)')
>>> [round(x, 3) for x in s.scores]
[0.056, 0.278, 0.5, 0.722, 0.944]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, read_json, read_metrics_csv, sha256_file
from sftlens.layers import Span, depth_blocks

__all__ = [
    "RULE",
    "Suggestion",
    "rank_normalise",
    "run_suggest",
    "suggest_from_rows",
    "suggest_mask",
]

RULE = "stable-middle/1"
SUGGESTION_FILE = "suggestion.json"
_MAKERS = (
    "sftlens weights BASE SFT --out RUN (dW), sftlens analyze BASE SFT --out RUN (CKA, entropy) "
    "or sftlens demo"
)

Row = Mapping[str, Any]
Table = dict[tuple[str, str], dict[int, float]]  # (model, metric) -> {layer: value}


@dataclass(frozen=True)
class Suggestion:
    """A proposed mask and why. ``scores[k]`` is block ``k``'s change (bottom first, None when
    no family covers it); ``family_scores[f][k]`` the same per family; ``metrics[f]`` names the
    metric each family used; ``missing`` the families absent, each with the command that makes
    it; ``evidence`` one line per block."""

    mask: str
    layers: list[int]
    layer_range: str
    evidence: list[str]
    scores: list[float | None]
    rule: str = RULE
    reason: str = ""
    num_layers: int = 0
    num_blocks: int = 0
    candidates: list[int] = field(default_factory=list)
    family_scores: dict[str, list[float | None]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """What ``sftlens suggest`` prints: the mask with its layer range, then the evidence."""
        out = [
            f"suggested mask {self.mask}: {self.layer_range}",
            f"rule {self.rule}: {self.reason}",
        ]
        out += [f"  {line}" for line in self.evidence]
        out += [f"note: {n}" for n in self.notes]
        out += [f"missing: {m}" for m in self.missing]
        return out


# -- change per layer, per family -----------------------------------------------------------------


def _pair(metric: str, flip: bool = False) -> Callable[[Table], dict[int, float] | None]:
    def get(t: Table) -> dict[int, float] | None:
        values = t.get(("pair", metric))
        if not values:
            return None
        return {k: (1.0 - v if flip else v) for k, v in values.items()}

    return get


def _gap(metric: str) -> Callable[[Table], dict[int, float] | None]:
    def get(t: Table) -> dict[int, float] | None:
        base, sft = t.get(("base", metric), {}), t.get(("sft", metric), {})
        shared = sorted(set(base) & set(sft))
        return {k: abs(sft[k] - base[k]) for k in shared} or None

    return get


# family -> (command that makes it, [(label, extractor)] in order of preference)
FAMILIES: dict[str, tuple[str, list[tuple[str, Callable[[Table], dict[int, float] | None]]]]] = {
    "weights": (
        "sftlens weights",
        [(m, _pair(m)) for m in ("dw_block_rel", "dw_attn_rel", "dw_mlp_rel")]
        + [(m, _pair(m)) for m in ("dw_block", "dw_attn", "dw_mlp")],
    ),
    "geometry": (
        "sftlens analyze",
        [("1-cka_std", _pair("cka_std", flip=True)), ("1-cka", _pair("cka", flip=True))],
    ),
    "entropy": (
        "sftlens analyze",
        [
            (f"|d {m}|", _gap(m))
            for m in ("prompt_entropy_norm", "prompt_entropy", "dataset_entropy_norm")
        ],
    ),
    "probing": (
        "sftlens probe",
        [
            ("1-probe_agreement", _pair("probe_agreement", flip=True)),
            ("|d probe_kl|", _gap("probe_kl")),
        ],
    ),
}


def rank_normalise(values: Mapping[int, float]) -> dict[int, float]:
    """Each value's rank among ``values`` scaled to ``[0, 1]`` (ties share their mean rank; one
    value gives 0.5). Scale-free: any increasing transform of the values gives the same result.

    >>> rank_normalise({0: 5.0, 1: 1.0, 2: 3.0, 3: 3.0})
    {0: 1.0, 1: 0.0, 2: 0.5, 3: 0.5}
    >>> rank_normalise({4: 1e-9})
    {4: 0.5}
    """
    items = sorted(values.items(), key=lambda kv: kv[1])
    n = len(items)
    if n == 1:
        return {items[0][0]: 0.5}
    out: dict[int, float] = {}
    i = 0
    while i < n:
        j = i
        while j + 1 < n and items[j + 1][1] == items[i][1]:
            j += 1
        rank = (i + j) / 2 / (n - 1)
        for k in range(i, j + 1):
            out[items[k][0]] = rank
        i = j + 1
    return dict(sorted(out.items()))


def _table(rows: Sequence[Row], num_layers: int | None) -> Table:
    t: Table = {}
    for r in rows:
        layer, value = r.get("layer"), r.get("value")
        if layer is None or layer < 0 or value is None or not math.isfinite(float(value)):
            continue
        if num_layers is not None and layer >= num_layers:
            continue
        t.setdefault((str(r["model"]), str(r["metric"])), {})[int(layer)] = float(value)
    return t


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _cv(xs: Sequence[float]) -> float | None:
    """Standard deviation over |mean| (None for fewer than 2 values or a zero mean)."""
    mean = _mean(xs)
    if mean is None or len(xs) < 2 or mean == 0:
        return None
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) / abs(mean)


# -- the rule -------------------------------------------------------------------------------------


def suggest_from_rows(
    rows: Sequence[Row],
    num_blocks: int = 5,
    *,
    num_layers: int | None = None,
    width: int = 0,
    max_width: int = 3,
    min_depth: float = 0.2,
    max_depth: float = 0.8,
    where: str = "the rows",
) -> Suggestion:
    """The ``stable-middle/1`` mask for the per-layer rows of ``metrics.csv`` (see the module).

    ``num_layers`` defaults to the highest layer index in the rows plus one; ``width=0`` widens
    automatically up to ``max_width`` blocks, ``width=W`` takes exactly ``W`` blocks.
    """
    if num_blocks < 1:
        raise SftlensError(f"--blocks must be >= 1, got {num_blocks}")
    if width < 0 or max_width < 1:
        raise SftlensError(f"--width must be >= 0 and --max-width >= 1, got {width}, {max_width}")
    if not 0.0 <= min_depth <= 0.5 <= max_depth <= 1.0:
        raise SftlensError(
            f"--min-depth and --max-depth must satisfy 0 <= min <= 0.5 <= max <= 1, "
            f"got {min_depth}, {max_depth}"
        )
    table = _table(rows, num_layers)
    used: dict[str, str] = {}
    raw: dict[str, dict[int, float]] = {}
    missing: list[str] = []
    for family, (command, options) in FAMILIES.items():
        for label, get in options:
            values = get(table)
            if values:
                used[family], raw[family] = label, values
                break
        else:
            missing.append(f"{family} (run {command} into this folder)")
    if not used:
        raise SftlensError(
            f"{where} holds none of the per-layer metrics suggest reads (dw_*, cka/cka_std, "
            f"prompt_entropy, probe_agreement); make them with {_MAKERS}"
        )
    if num_layers is None:
        num_layers = 1 + max(layer for values in raw.values() for layer in values)
    blocks = depth_blocks(num_layers, num_blocks)

    norm = {f: rank_normalise(v) for f, v in raw.items()}
    family_scores: dict[str, list[float | None]] = {
        f: [_mean([n[layer] for layer in b.layers if layer in n]) for b in blocks]
        for f, n in norm.items()
    }
    scores: list[float | None] = [
        _mean([x for s in family_scores.values() if (x := s[k]) is not None])
        for k in range(num_blocks)
    ]

    def centre(k: int) -> float:
        return (blocks[k].start + blocks[k].stop) / 2 / num_layers

    band = f"{min_depth:.0%}-{max_depth:.0%}".replace("%-", "-", 1)
    candidates = [
        k
        for k in range(num_blocks)
        if min_depth <= centre(k) <= max_depth and scores[k] is not None
    ]
    if not candidates:
        raise SftlensError(
            f"no depth block centred in {band} of depth has metrics in {where} (K={num_blocks}, "
            f"L={num_layers}); widen --min-depth/--max-depth or pass another --blocks"
        )

    def key(run: range) -> tuple[float, float, int]:
        mean = sum(scores[k] or 0.0 for k in run) / len(run)
        mid = (blocks[run[0]].start + blocks[run[-1]].stop) / 2 / num_layers
        return (round(mean, 12), abs(mid - 0.5), run[0])

    if width:
        runs = [
            range(s, s + width)
            for s in range(num_blocks - width + 1)
            if all(k in candidates for k in range(s, s + width))
        ]
        if not runs:
            raise SftlensError(
                f"--width {width} needs {width} adjacent blocks centred in {band} of depth; "
                f"K={num_blocks} leaves {len(candidates)}: pass a smaller --width, more --blocks "
                "or a wider --min-depth/--max-depth"
            )
        chosen = min(runs, key=key)
        how = f"the {width} adjacent candidate blocks with the lowest mean change"
    else:
        chosen = min((range(k, k + 1) for k in candidates), key=key)
        while len(chosen) < max_width:
            sides = [
                range(chosen[0] - 1, chosen[-1] + 1) if chosen[0] - 1 in candidates else None,
                range(chosen[0], chosen[-1] + 2) if chosen[-1] + 1 in candidates else None,
            ]
            grown = [
                r
                for r in sides
                if r is not None and (scores[r[0] if r[0] < chosen[0] else r[-1]] or 0.0) < 0.5
            ]
            if not grown:
                break
            chosen = min(grown, key=key)
        how = (
            "the least-changed block, widened by neighbours that changed less than the average "
            f"layer (change < 0.5, at most {max_width} blocks)"
        )

    mask = "".join("1" if k in chosen else "0" for k in range(num_blocks))
    span = Span(blocks[chosen[0]].start, blocks[chosen[-1]].stop)
    reason = (
        f"{how}, among blocks centred in {band} of depth; change = mean over "
        f"{', '.join(used)} of per-layer ranks scaled to [0, 1] (0 = least changed)"
    )
    notes = [
        f"{f}: {used[f]} varies by {cv:.0%} across layers (coefficient of variation): weak evidence"
        for f, values in raw.items()
        if (cv := _cv(list(values.values()))) is not None and cv < 0.1
    ]
    evidence = [
        _evidence_line(
            k, blocks[k], num_layers, scores[k], family_scores, raw, used, chosen, candidates
        )
        for k in range(num_blocks)
    ]
    return Suggestion(
        mask=mask,
        layers=span.layers,
        layer_range=layer_range(span, num_layers),
        evidence=evidence,
        scores=scores,
        reason=reason,
        num_layers=num_layers,
        num_blocks=num_blocks,
        candidates=candidates,
        family_scores=family_scores,
        metrics=used,
        missing=missing,
        notes=notes,
        options={
            "width": width,
            "max_width": max_width,
            "min_depth": min_depth,
            "max_depth": max_depth,
        },
    )


def layer_range(span: Span, num_layers: int) -> str:
    """``layers 6-11 (20-40% of depth)``: what a mask selects, so nobody decodes it by hand.

    >>> layer_range(Span(6, 12), 30)
    'layers 6-11 (20-40% of depth)'
    >>> layer_range(Span(4, 5), 5)
    'layer 4 (80-100% of depth)'
    """
    lo, hi = span.depth(num_layers)
    which = f"layer {span.first}" if span.first == span.last else f"layers {span.first}-{span.last}"
    return f"{which} ({lo:.0%}-{hi:.0%} of depth)".replace("%-", "-", 1)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _evidence_line(
    k: int,
    block: Span,
    num_layers: int,
    score: float | None,
    family_scores: Mapping[str, list[float | None]],
    raw: Mapping[str, Mapping[int, float]],
    used: Mapping[str, str],
    chosen: range,
    candidates: list[int],
) -> str:
    parts = []
    for f, label in used.items():
        vals = [raw[f][layer] for layer in block.layers if layer in raw[f]]
        rank = family_scores[f][k]
        parts.append(
            f"{label} {_fmt(sum(vals) / len(vals))} (rank {rank:.2f})"
            if vals and rank is not None
            else f"{label} n/a"
        )
    verdict = (
        "CHOSEN"
        if k in chosen
        else "outside the candidate band"
        if k not in candidates
        else "skipped"
    )
    change = "n/a" if score is None else f"{score:.2f}"
    return (
        f"block {k} {block.mask} {layer_range(block, num_layers)}: change {change} "
        f"[{'; '.join(parts)}] -> {verdict}"
    )


# -- run folders ----------------------------------------------------------------------------------


def _metrics_file(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise SftlensError(f"run folder {run_dir} {what}; make one with {_MAKERS}")
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise SftlensError(
            f"{run_dir} holds no metrics.csv, so it is not a run; make one with {_MAKERS}"
        )
    return path


def suggest_mask(
    run_dir: str | Path,
    num_blocks: int = 5,
    *,
    width: int = 0,
    max_width: int = 3,
    min_depth: float = 0.2,
    max_depth: float = 0.8,
) -> Suggestion:
    """Read an analysis run folder (``metrics.csv``; ``summary.json`` for the layer count) and
    return the ``stable-middle/1`` suggestion; writes nothing."""
    run_dir = Path(run_dir)
    path = _metrics_file(run_dir)
    try:
        rows = read_metrics_csv(path)
    except (KeyError, ValueError):
        raise SftlensError(
            f"{path} is not a sftlens metrics.csv (columns model, layer, metric, value); "
            f"remake it with {_MAKERS}"
        ) from None
    num_layers = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        n = read_json(summary).get("pair", {}).get("num_layers")
        num_layers = int(n) if isinstance(n, int) and n >= 1 else None
    return suggest_from_rows(
        rows,
        num_blocks,
        num_layers=num_layers,
        width=width,
        max_width=max_width,
        min_depth=min_depth,
        max_depth=max_depth,
        where=str(run_dir),
    )


def run_suggest(cfg: Any) -> Suggestion:
    """``sftlens suggest``: the suggestion for ``cfg.run``; with ``cfg.save`` also
    ``suggestion.json`` (atomically, with the sha256 of the metrics.csv it came from) and the
    report section."""
    s = suggest_mask(
        cfg.run,
        cfg.blocks,
        width=cfg.width,
        max_width=cfg.max_width,
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
    )
    if cfg.save:
        run = Path(cfg.run)
        record = {**s.to_json(), "metrics_sha256": sha256_file(run / "metrics.csv")}
        atomic_write_json(run / SUGGESTION_FILE, record)
        from sftlens.reporting.build import build_report

        build_report(run)
    return s


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of the suggestion written by ``sftlens suggest``, or None without one."""
    from sftlens.reporting.html import esc, fmt

    path = run / SUGGESTION_FILE
    if not path.is_file():
        return None
    s = read_json(path)
    body = (
        f"<p>Suggested mask <b><code>{esc(s['mask'])}</code></b>: {esc(s['layer_range'])}. "
        f"Rule <code>{esc(s['rule'])}</code>: {esc(s['reason'])}.</p>"
    )
    metrics = run / "metrics.csv"
    if metrics.is_file() and sha256_file(metrics) != s.get("metrics_sha256"):
        body += (
            "<p><b>Stale</b>: metrics.csv changed since; rerun <code>sftlens suggest</code>.</p>"
        )
    families = list(s.get("family_scores", {}))
    head = "".join(f"<th>{esc(c)}</th>" for c in ["block", "mask", "change", *families])
    body_rows = ""
    for k, score in enumerate(s["scores"]):
        mask = "".join("1" if i == k else "0" for i in range(len(s["scores"])))
        values = [score] + [s["family_scores"][f][k] for f in families]
        cells = [str(k), mask] + ["—" if v is None else fmt(float(v)) for v in values]
        style = ' style="font-weight:bold"' if s["mask"][k] == "1" else ""
        body_rows += f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    body += f"<table><tr>{head}</tr>{body_rows}</table>"
    body += "<p>Per-family scores are per-layer ranks scaled to [0, 1], 0 = least changed.</p>"
    if s.get("missing"):
        body += f"<p>Missing: {esc('; '.join(s['missing']))}.</p>"
    return ("Suggested Mid-Block mask (before training)", body)
