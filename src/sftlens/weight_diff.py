"""Weight-space analysis: per-layer Frobenius distances between BASE and SFT checkpoints.

Streams one tensor pair at a time from the checkpoint files, so peak memory stays near the
largest tensor pair instead of two whole models. Rows use the metric names of SPEC.md:

- per layer (``model=pair``): ``dw_q dw_k dw_v dw_o dw_attn dw_mlp`` (weights only, fused
  projections split by the architecture's layout), each with a ``_rel`` variant
  (``||dW||_F / ||W_base||_F``), plus the MLP projections alone (``dw_gate dw_up dw_down`` or
  ``dw_fc_in dw_fc_out``), ``dw_norm`` (the block's norm weights) and ``dw_block`` /
  ``dw_block_rel`` (every parameter of the block, biases included);
- embeddings (layer ``-1``): ``dw_embed dw_embed_rel`` on the shared vocabulary rows, and
  ``embed_added_rows`` / ``embed_added_norm`` for rows the SFT vocabulary added;
- whole model (empty layer): ``dw_final_norm`` (the final norm's weight, like ``dw_norm``),
  ``dw_lm_head`` / ``dw_lm_head_rel`` (or ``lm_head_tied = 1``), ``dw_total`` / ``dw_total_rel``
  (every tensor, biases included), ``vocab_added``.

Mixture-of-experts layers (Mixtral, Qwen2-MoE, OLMoE) have no ``dw_gate dw_up dw_down``; their
``dw_mlp`` covers the router, every routed expert and the shared expert, with ``dw_router``
(the router weight), ``dw_experts`` (all routed experts) and, for Qwen2-MoE,
``dw_shared_expert`` (the shared expert's projections and its gate) beside it, each with
``_rel``. Per expert, :attr:`WeightDiff.experts` holds ``dw_gate dw_up dw_down dw_expert`` (and
``_rel``) by (layer, expert): ``experts.csv`` in the run folder. Experts stored fused
(``experts.gate_up_proj`` ``[E, 2I, d]``) are sliced by the architecture's layout
(:func:`sftlens.models.surgery.split_experts`); stored one tensor per expert, the expert index
comes from the key, the layer index from the block path.

Biases never enter a named projection or norm row; they count in ``dw_block`` and ``dw_total``.
``dw_embed`` covers every embedding table of the architecture: the token embeddings and, for
GPT-2, the learned position embeddings (``wpe``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from sftlens.errors import SftlensError
from sftlens.metrics.weights import frobenius_sq, frobenius_sq_diff, relative_change
from sftlens.models.checkpoint import CheckpointReader
from sftlens.models.pair import PairInfo, check_pair, text_config

ATTN_PROJS = ("q", "k", "v", "o")
Row = dict[str, Any]


@dataclass
class _Sums:
    """Squared Frobenius norms, keyed by (layer, name) (per expert: (layer, expert, name))."""

    diff: dict[Any, float] = field(default_factory=lambda: defaultdict(float))
    base: dict[Any, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, keys: Iterable[Hashable], a: torch.Tensor, b: torch.Tensor) -> None:
        """Compute both squared norms once and add them under every key."""
        self.add_sq(keys, frobenius_sq_diff(a, b), frobenius_sq(a))

    def add_sq(self, keys: Iterable[Hashable], diff: float, base: float) -> None:
        for key in keys:
            self.diff[key] += diff
            self.base[key] += base


_CHUNK_BYTES = 16 << 20  # rows read per step: ~16 MiB of each tensor


def _streamed_sq(
    ra: CheckpointReader, rb: CheckpointReader, name: str, rows: int, device: str = "cpu"
) -> tuple[float, float]:
    """(||a-b||^2, ||a||^2) over the first ``rows`` rows, read in ~16 MiB row blocks and reduced
    on ``device``."""
    shape = ra.shape(name)
    per_row = max(1, math.prod(shape[1:]) * 4)
    step = max(1, _CHUNK_BYTES // per_row)
    diff = base = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a, b = ra.get_rows(name, start, stop).to(device), rb.get_rows(name, start, stop).to(device)
        diff += frobenius_sq_diff(a, b)
        base += frobenius_sq(a)
    return diff, base


@dataclass
class WeightDiff:
    info: PairInfo
    rows: list[Row]
    #: per-expert rows of MoE layers (``model layer expert metric value``; empty when dense)
    experts: list[Row] = field(default_factory=list)

    def series(self, metric: str) -> list[float]:
        """Per-layer values of one metric, ordered by layer 0..L-1."""
        by_layer = {r["layer"]: r["value"] for r in self.rows if r["metric"] == metric}
        return [by_layer.get(i, float("nan")) for i in range(self.info.num_layers)]


def _check_vocab(name: str, sa: tuple[int, ...], sb: tuple[int, ...], what: str) -> int:
    """Rows shared by an embedding-like pair (the SFT vocabulary may only grow)."""
    if sa[1:] != sb[1:]:
        raise SftlensError(
            f"{what} '{name}' has shape base={sa}, sft={sb}; "
            "compare checkpoints of the same model size"
        )
    if sb[0] < sa[0]:
        raise SftlensError(
            f"{what} has fewer rows in sft ({sb[0]}) than in base ({sa[0]}); "
            "pass BASE first and SFT second"
        )
    return sa[0]


def weight_diff(
    base: str | Path, sft: str | Path, *, progress: bool = True, device: str = "cpu"
) -> WeightDiff:
    """Per-layer weight distances between two local checkpoint folders (see module doc).

    The files are read on the CPU; the float64 reductions run on ``device`` ('auto', 'cpu',
    'cuda', 'cuda:N'). Sums differ across devices by rounding only (same float32 differences,
    float64 sums in another order)."""
    from sftlens.models import surgery
    from sftlens.models.loading import resolve_device

    device = resolve_device(device)

    rb, rs = CheckpointReader(base), CheckpointReader(sft)
    info = check_pair(rb.config, rs.config)
    # attribute access on the plain config.json (no transformers import: streaming stays light)
    config = SimpleNamespace(**text_config(rb.config))
    spec = surgery.arch_spec(config)

    sums = _Sums()
    per_expert = _Sums()  # keyed (layer, expert, part)
    extra: dict[str, float] = {}
    missing = [k for k in rb.keys() if k not in rs]  # noqa: SIM118
    if missing:
        raise SftlensError(
            f"{len(missing)} tensor(s) of base are missing from sft, e.g. '{missing[0]}'; "
            "check that both folders hold complete checkpoints of the same architecture"
        )
    with rb, rs:
        for name in tqdm(rb.keys(), desc="weight diff", unit="tensor", disable=not progress):
            role = surgery.classify_param(spec, name)
            if role.group == "other":
                continue
            sa, sb = rb.shape(name), rs.shape(name)
            if role.group in ("embed", "lm_head"):
                shared = _check_vocab(name, sa, sb, role.group)
                if sb[0] > shared:  # rows the SFT vocabulary added: measured on their own
                    added = rs.get_rows(name, shared, sb[0])
                    extra[f"{role.group}_added_rows"] = float(added.shape[0])
                    extra[f"{role.group}_added_norm"] = math.sqrt(frobenius_sq(added))
                sums.add_sq(
                    [(None, role.group), (None, "total")],
                    *_streamed_sq(rb, rs, name, shared, device),
                )
                continue
            if sa != sb:
                raise SftlensError(
                    f"tensor '{name}' has shape base={sa}, sft={sb}; "
                    "compare checkpoints of the same architecture"
                )
            layer = role.layer
            keys: list[tuple[int | None, str]] = [(None, "total"), (layer, "block")]
            if role.group == "final_norm":  # its weight, like dw_norm; a bias counts in the total
                keys = (
                    [(None, "final_norm"), (None, "total")]
                    if role.kind == "weight"
                    else [(None, "total")]
                )
            elif role.kind != "weight":  # biases count in the block and the total only
                pass
            elif role.group == "norm":
                keys.append((layer, "norm"))
            elif role.proj.startswith("experts_"):  # every expert in one 3-D tensor
                pa = surgery.split_experts(role.proj, rb.get(name).to(device))
                pb = surgery.split_experts(role.proj, rs.get(name).to(device))
                group = [*keys, (layer, "experts"), (layer, "mlp")]
                for part in pa:
                    for e in range(pa[part].shape[0]):
                        d, n = (
                            frobenius_sq_diff(pa[part][e], pb[part][e]),
                            frobenius_sq(pa[part][e]),
                        )
                        sums.add_sq(group, d, n)
                        per_expert.add_sq([(layer, e, part), (layer, e, "expert")], d, n)
                continue
            elif role.expert is not None:  # one expert's gate, up or down
                part = role.proj.removeprefix("expert_")
                d, n = _streamed_sq(rb, rs, name, sa[0], device)
                sums.add_sq([*keys, (layer, "experts"), (layer, "mlp")], d, n)
                per_expert.add_sq(
                    [(layer, role.expert, part), (layer, role.expert, "expert")], d, n
                )
                continue
            elif role.proj == "router":
                keys += [(layer, "router"), (layer, "mlp")]
            elif role.proj.startswith("shared_"):
                keys += [(layer, "shared_expert"), (layer, "mlp")]
            elif role.proj in ("qkv", "gate_up"):  # fused: split by the architecture's layout
                pa = surgery.split_fused(
                    spec, config, role.proj, rb.get(name).to(device), role.kind
                )
                pb = surgery.split_fused(
                    spec, config, role.proj, rs.get(name).to(device), role.kind
                )
                for part in pa:  # the parts partition the tensor, so their sums are its sums
                    sums.add([*keys, (layer, part), (layer, role.group)], pa[part], pb[part])
                continue
            else:
                keys += [(layer, role.proj), (layer, role.group)]
            sums.add_sq(keys, *_streamed_sq(rb, rs, name, sa[0] if sa else 1, device))
    rows = _rows(sums, extra, info, tied="lm_head" not in {k for _, k in sums.diff})
    return WeightDiff(info=info, rows=rows, experts=_expert_rows(per_expert))


def _expert_rows(sums: _Sums) -> list[Row]:
    """``experts.csv`` rows: ``dw_gate dw_up dw_down dw_expert`` and ``_rel`` per (layer, expert)."""
    from sftlens.models import surgery

    rows: list[Row] = []
    order = (*surgery.EXPERT_PARTS, "expert")
    for layer, expert, part in sorted(sums.diff, key=lambda k: (k[0], k[1], order.index(k[2]))):
        d, n = sums.diff[(layer, expert, part)], sums.base[(layer, expert, part)]
        for metric, value in (
            (f"dw_{part}", math.sqrt(d)),
            (f"dw_{part}_rel", relative_change(d, n)),
        ):
            rows.append(
                {
                    "model": "pair",
                    "layer": layer,
                    "expert": expert,
                    "metric": metric,
                    "value": value,
                }
            )
    return rows


def _rows(sums: _Sums, extra: dict[str, float], info: PairInfo, tied: bool) -> list[Row]:
    rows: list[Row] = []

    def emit(layer: int | None, key: str, metric: str, rel: bool = True) -> None:
        d = sums.diff[(layer, key)]
        rows.append({"model": "pair", "layer": layer, "metric": metric, "value": math.sqrt(d)})
        if rel:
            value = relative_change(d, sums.base[(layer, key)])
            rows.append(
                {"model": "pair", "layer": layer, "metric": f"{metric}_rel", "value": value}
            )

    layers = sorted({layer for layer, _ in sums.diff if layer is not None})
    for layer in layers:
        names = {k for (lay, k) in sums.diff if lay == layer}
        for proj in ATTN_PROJS:
            emit(layer, proj, f"dw_{proj}")
        emit(layer, "attn", "dw_attn")
        if "mlp" in names:
            emit(layer, "mlp", "dw_mlp")
        for proj in sorted(names - set(ATTN_PROJS) - {"attn", "mlp", "block", "norm"}):
            emit(layer, proj, f"dw_{proj}")
        if "norm" in names:
            emit(layer, "norm", "dw_norm", rel=False)
        emit(layer, "block", "dw_block")
    if (None, "embed") in sums.diff:
        d = sums.diff[(None, "embed")]
        rows.append({"model": "pair", "layer": -1, "metric": "dw_embed", "value": math.sqrt(d)})
        rel = relative_change(d, sums.base[(None, "embed")])
        rows.append({"model": "pair", "layer": -1, "metric": "dw_embed_rel", "value": rel})
    for metric, value in sorted(extra.items()):
        where: int | None = -1 if metric.startswith("embed") else None
        rows.append({"model": "pair", "layer": where, "metric": metric, "value": value})
    if (None, "final_norm") in sums.diff:
        emit(None, "final_norm", "dw_final_norm", rel=False)
    if tied:
        rows.append({"model": "pair", "layer": None, "metric": "lm_head_tied", "value": 1.0})
    else:
        emit(None, "lm_head", "dw_lm_head")
    emit(None, "total", "dw_total")
    rows.append(
        {"model": "pair", "layer": None, "metric": "vocab_added", "value": float(info.vocab_added)}
    )
    return rows
