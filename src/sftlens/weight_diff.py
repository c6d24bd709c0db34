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
- whole model (empty layer): ``dw_final_norm``, ``dw_lm_head`` / ``dw_lm_head_rel`` (or
  ``lm_head_tied = 1``), ``dw_total`` / ``dw_total_rel``, ``vocab_added``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sftlens.errors import SftlensError
from sftlens.metrics.weights import frobenius_sq, frobenius_sq_diff, relative_change
from sftlens.models.checkpoint import CheckpointReader
from sftlens.models.pair import PairInfo, check_pair

ATTN_PROJS = ("q", "k", "v", "o")
Row = dict[str, Any]


@dataclass
class _Sums:
    """Squared Frobenius norms, keyed by (layer, name)."""

    diff: dict[tuple[int | None, str], float] = field(default_factory=lambda: defaultdict(float))
    base: dict[tuple[int | None, str], float] = field(default_factory=lambda: defaultdict(float))

    def add(self, keys: Iterable[tuple[int | None, str]], a: torch.Tensor, b: torch.Tensor) -> None:
        """Compute both squared norms once and add them under every key."""
        d, n = frobenius_sq_diff(a, b), frobenius_sq(a)
        for key in keys:
            self.diff[key] += d
            self.base[key] += n


@dataclass
class WeightDiff:
    info: PairInfo
    rows: list[Row]

    def series(self, metric: str) -> list[float]:
        """Per-layer values of one metric, ordered by layer 0..L-1."""
        by_layer = {r["layer"]: r["value"] for r in self.rows if r["metric"] == metric}
        return [by_layer.get(i, float("nan")) for i in range(self.info.num_layers)]


def _split_vocab(
    a: torch.Tensor, b: torch.Tensor, what: str, extra: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare embedding-like matrices on shared rows; report rows the SFT model added."""
    if a.shape[1:] != b.shape[1:]:
        raise SftlensError(
            f"{what} has shape base={tuple(a.shape)}, sft={tuple(b.shape)}; "
            "compare checkpoints of the same model size"
        )
    if b.shape[0] > a.shape[0]:
        added = b[a.shape[0] :]
        extra[f"{what}_added_rows"] = float(added.shape[0])
        extra[f"{what}_added_norm"] = math.sqrt(frobenius_sq(added))
    elif b.shape[0] < a.shape[0]:
        raise SftlensError(
            f"{what} has fewer rows in sft ({b.shape[0]}) than in base ({a.shape[0]}); "
            "pass BASE first and SFT second"
        )
    n = a.shape[0]
    return a, b[:n]


def weight_diff(base: str | Path, sft: str | Path, *, progress: bool = True) -> WeightDiff:
    """Per-layer weight distances between two local checkpoint folders (see module doc)."""
    from transformers import AutoConfig

    from sftlens.models import surgery

    rb, rs = CheckpointReader(base), CheckpointReader(sft)
    info = check_pair(rb.config, rs.config)
    config = AutoConfig.from_pretrained(str(base), trust_remote_code=False)
    spec = surgery.arch_spec(config)

    sums = _Sums()
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
            a, b = rb.get(name), rs.get(name)
            if role.group in ("embed", "lm_head"):
                a, b = _split_vocab(a, b, role.group, extra)
                sums.add([(None, role.group), (None, "total")], a, b)
                continue
            if role.group == "final_norm":
                sums.add([(None, "final_norm"), (None, "total")], a, b)
                continue
            if a.shape != b.shape:
                raise SftlensError(
                    f"tensor '{name}' has shape base={tuple(a.shape)}, sft={tuple(b.shape)}; "
                    "compare checkpoints of the same architecture"
                )
            layer = role.layer
            keys: list[tuple[int | None, str]] = [(None, "total"), (layer, "block")]
            if role.kind != "weight":  # biases count in the block and the total only
                sums.add(keys, a, b)
            elif role.group == "norm":
                sums.add([*keys, (layer, "norm")], a, b)
            elif role.proj in ("qkv", "gate_up"):
                pa = surgery.split_fused(spec, config, role.proj, a, role.kind)
                pb = surgery.split_fused(spec, config, role.proj, b, role.kind)
                for part in pa:  # the parts partition the tensor, so their sums are its sums
                    sums.add([*keys, (layer, part), (layer, role.group)], pa[part], pb[part])
            else:
                sums.add([*keys, (layer, role.proj), (layer, role.group)], a, b)
    rows = _rows(sums, extra, info, tied="lm_head" not in {k for _, k in sums.diff})
    return WeightDiff(info=info, rows=rows)


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
