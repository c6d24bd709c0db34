"""Representation analysis: one streaming pass of both models over the same prompts.

For each batch the BASE model runs first and its block outputs are kept for that batch only;
then the SFT model runs and, block by block, both models' states for the same real tokens
meet in per-layer accumulators (:mod:`sftlens.metrics.accumulators`). Nothing grows with the
dataset except one pooled vector per prompt and layer. Layer ``-1`` is the embedding output
(the input of block 0).

Rows written (SPEC names): ``prompt_entropy dataset_entropy erank`` (+ ``_norm``,
``erank_sigma2``) and ``attn_entropy`` for ``base``/``sft``; ``cka cka_unbiased cka_pooled
cosine mean_shift mean_shift_rel attn_js`` for ``pair``. Beyond SPEC: ``cka_std`` (token CKA of
z-scored features) for ``pair`` and ``top_feature_share`` for ``base``/``sft``, which show when
a massive-activation dimension saturates ``cka``. Per-head attention values go to
``heads.csv``. Mixture-of-experts layers (a pass built with ``experts``) add ``route_js`` and
``route_load_tv`` for ``pair`` and each model's expert loads (``route_load`` per expert, for
``experts.csv``), from the router logits both models give the same real tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sftlens.capture import Batch, capture, make_batches, record_routers, router_logits, tokenize
from sftlens.errors import SftlensError
from sftlens.metrics.accumulators import (
    AttentionStats,
    PairMoments,
    PooledRows,
    PromptEntropy,
    RoutingStats,
    StreamingCKA,
)
from sftlens.models import surgery

Preset = Literal["default", "paper"]

log = logging.getLogger("sftlens.analyze")
Row = dict[str, Any]


@dataclass
class LayerAccumulators:
    cka: StreamingCKA
    moments: PairMoments
    entropy: dict[str, PromptEntropy]
    pooled: dict[str, PooledRows]


@dataclass
class RepresentationPass:
    """Per-layer accumulators for one BASE/SFT pair; feed batches, then :meth:`rows`.

    ``layers`` (default: all, ``-1..L-1``) holds only the accumulators of those layers: the
    state grows with the layers kept, and each layer's rows equal a full pass's rows for it
    (``analyze --layers`` / ``--every``, and the layer-major streaming pass, which keeps one
    layer at a time). Layer ``-1`` is the embedding output; it has no attention metrics.
    ``experts`` / ``top_k`` / ``moe_layers`` (a mixture-of-experts model) add the routing
    accumulators of the kept layers among ``moe_layers``; :meth:`update` then needs both
    models' router logits.
    """

    num_layers: int
    hidden: int
    num_heads: int
    alpha: float = 1.0
    preset: Preset = "default"
    pooling: str = "mean"
    attention: bool = True
    keep: Sequence[int] | None = None
    experts: int = 0
    top_k: int = 0
    moe_layers: Sequence[int] = ()
    layers: dict[int, LayerAccumulators] = field(init=False)
    attn: dict[int, AttentionStats] = field(init=False)
    routing: dict[int, RoutingStats] = field(init=False)
    #: the sides whose per-model accumulators (prompt entropy, pooled rows) this pass feeds;
    #: a side it does not own shares another pass's accumulators (:meth:`share`)
    own: tuple[str, ...] = field(init=False, default=("base", "sft"))

    def __post_init__(self) -> None:
        kept = range(-1, self.num_layers) if self.keep is None else sorted(set(self.keep))
        outside = [layer for layer in kept if not -1 <= layer < self.num_layers]
        if outside:
            raise SftlensError(
                f"layers {outside} are not in a model of {self.num_layers} layers; "
                f"keep layers -1..{self.num_layers - 1}"
            )
        self.layers = {
            layer: LayerAccumulators(
                StreamingCKA(self.hidden, self.hidden),
                PairMoments(self.hidden),
                {m: PromptEntropy(self.alpha, self.preset) for m in ("base", "sft")},
                {m: PooledRows(self.hidden) for m in ("base", "sft")},
            )
            for layer in kept
        }
        self.attn = (
            {layer: AttentionStats(self.num_heads) for layer in kept if layer >= 0}
            if self.attention
            else {}
        )
        self.routing = (
            {
                layer: RoutingStats(self.experts, self.top_k)
                for layer in kept
                if layer in set(self.moe_layers)
            }
            if self.experts
            else {}
        )

    def share(self, side: str, other: RepresentationPass, other_side: str) -> None:
        """Read ``side``'s per-model accumulators from ``other``'s ``other_side`` (the same
        model over the same batches, fed there) instead of feeding a copy: ``trajectory``
        computes each model's prompt entropy, pooled rows and CKA self-moments once, however
        many pairs it is in. Cross terms (CKA's, moments, attention) stay this pass's own.
        Call after :meth:`to_`."""
        sides = ("base", "sft")
        for layer, acc in self.layers.items():
            acc.entropy[side] = other.layers[layer].entropy[other_side]
            acc.pooled[side] = other.layers[layer].pooled[other_side]
            acc.cka.share(sides.index(side), other.layers[layer].cka, sides.index(other_side))
        self.own = tuple(m for m in self.own if m != side)

    def update(
        self,
        batch: Batch,
        base_states: Sequence[torch.Tensor],
        sft_states: Sequence[torch.Tensor],
        base_attn: Sequence[torch.Tensor] | None = None,
        sft_attn: Sequence[torch.Tensor] | None = None,
        base_routes: Mapping[int, torch.Tensor] | None = None,
        sft_routes: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Feed one batch given every layer's states ``[h_emb, h_0, ..., h_{L-1}]`` (and every
        block's attentions) of both models, as :func:`sftlens.capture.capture` returns them,
        and ``{layer: router logits (B, T, E)}`` of both models for the MoE layers kept;
        only the layers kept are used."""
        if self.attention and (base_attn is None or sft_attn is None):
            raise SftlensError(
                "attention metrics need both models' attentions; pass --no-attention"
            )
        self.update_layers(
            batch,
            {layer: (base_states[layer + 1], sft_states[layer + 1]) for layer in self.layers},
            {layer: (base_attn[layer], sft_attn[layer]) for layer in self.attn}  # type: ignore[index]
            if self.attention
            else None,
            {layer: (base_routes[layer], sft_routes[layer]) for layer in self.routing}
            if self.routing and base_routes is not None and sft_routes is not None
            else None,
        )

    def update_layers(
        self,
        batch: Batch,
        states: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
        attn: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        routes: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Feed one batch given ``{layer: (h_base, h_sft)}`` (each (B, T, D)) for the layers
        kept, ``{layer: (a_base, a_sft)}`` (each (B, H, T, T)) when attention is on, and
        ``{layer: (logits_base, logits_sft)}`` (each (B, T, E)) for the routing layers kept."""
        first = next(iter(states.values()))[0]
        mask = batch.attention_mask.bool().to(first.device)  # (B, T)
        lengths = mask.sum(-1)  # (B,)
        if int(lengths.min()) == 0:
            raise SftlensError("a prompt in the batch is all padding; remove empty prompts")
        for layer, acc in self.layers.items():
            real_rows = {}
            for model, h in zip(("base", "sft"), states[layer]):  # (B, T, D)
                # real tokens only, prompt after prompt, converted once for every accumulator
                rows = real_rows[model] = h[mask].double()  # (N, D)
                if not bool(torch.isfinite(rows.sum())):  # any NaN/inf makes the sum non-finite
                    where = "embeddings" if layer < 0 else f"layer {layer}"
                    raise SftlensError(
                        f"{model} model produced NaN/inf hidden states at {where}; "
                        "check the checkpoint, or run in float32 (--dtype float32)"
                    )
                if model in self.own:  # a shared side is fed by the pass that owns it
                    acc.entropy[model].update_batch(h, mask)  # one prompt = one row of h
                    acc.pooled[model].update(_pool(rows, lengths, self.pooling))
            acc.cka.update(real_rows["base"], real_rows["sft"])  # same tokens, both models
            acc.moments.update(real_rows["base"], real_rows["sft"])
        if self.attn:  # blocks kept, attention on (the embedding output has none)
            if attn is None:
                raise SftlensError(
                    "attention metrics need both models' attentions; pass --no-attention"
                )
            for layer, stats in self.attn.items():
                stats.update(*attn[layer], key_mask=mask)
        routed = [layer for layer in self.routing if layer in states]
        if routed:
            if routes is None or any(layer not in routes for layer in routed):
                raise SftlensError(
                    "routing metrics need both models' router logits; pass --no-routing"
                )
            for layer in routed:  # padding masked out: real tokens only
                self.routing[layer].update(*routes[layer], mask=mask)

    def accumulators(self) -> dict[str, Any]:
        """Every accumulator by a stable name (for checkpointing and all-reduce)."""
        out: dict[str, Any] = {}
        for layer, acc in self.layers.items():
            out[f"{layer}.cka"] = acc.cka
            out[f"{layer}.moments"] = acc.moments
            for m in ("base", "sft"):
                out[f"{layer}.entropy.{m}"] = acc.entropy[m]
                out[f"{layer}.pooled.{m}"] = acc.pooled[m]
        for layer, a in self.attn.items():
            out[f"{layer}.attn"] = a
        for layer, r in self.routing.items():
            out[f"{layer}.routing"] = r
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every accumulator's float64 state under ``"<accumulator>.<field>"`` (safetensors-ready)."""
        return {
            f"{name}.{k}": v
            for name, acc in self.accumulators().items()
            for k, v in acc.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, acc in self.accumulators().items():
            acc.load_state_dict({k: state[f"{name}.{k}"] for k in acc.state_dict()})

    def all_reduce_(self) -> None:
        shared = {f".{kind}.{m}" for kind in ("entropy", "pooled") for m in ("base", "sft")}
        shared -= {f".{kind}.{m}" for kind in ("entropy", "pooled") for m in self.own}
        for name, acc in self.accumulators().items():
            if not any(name.endswith(suffix) for suffix in shared):  # reduced by their owner
                acc.all_reduce_()

    def to_(self, device: torch.device | str) -> None:
        """Keep the float64 sums on ``device`` (the models'): no host copy of every batch's
        states, and NCCL can all-reduce them. Pooled rows stay in host memory."""
        for acc in self.accumulators().values():
            acc.to_(device)

    def rows(self) -> tuple[list[Row], list[Row]]:
        """(metrics.csv rows, heads.csv rows)."""
        rows: list[Row] = []
        for layer, acc in self.layers.items():
            for model in ("base", "sft"):
                stats = {
                    **acc.entropy[model].compute(),
                    **acc.pooled[model].compute(self.alpha, self.preset),
                }
                stats["top_feature_share"] = acc.cka.top_feature_shares()[model == "sft"]
                if self.preset == "paper":  # the paper code's effective rank uses sigma^2
                    stats["erank"], stats["erank_roy_vetterli"] = (
                        stats["erank_sigma2"],
                        stats["erank"],
                    )
                rows += [
                    {"model": model, "layer": layer, "metric": k, "value": v}
                    for k, v in stats.items()
                ]
            pair = {
                "cka": acc.cka.compute(),
                "cka_std": acc.cka.compute(standardize=True),
                **acc.moments.compute(),
            }
            pair["cka_pooled"] = acc.pooled["base"].cka(acc.pooled["sft"])
            n = acc.pooled["base"].rows.shape[0]
            pair["cka_unbiased"] = (
                acc.pooled["base"].cka(acc.pooled["sft"], unbiased=True) if n > 3 else float("nan")
            )
            rows += [
                {"model": "pair", "layer": layer, "metric": k, "value": v} for k, v in pair.items()
            ]
        heads: list[Row] = []
        for layer, a in self.attn.items():
            head_stats = a.compute()
            for metric, model, key in (
                ("attn_entropy", "base", "attn_entropy_base"),
                ("attn_entropy", "sft", "attn_entropy_sft"),
                ("attn_js", "pair", "attn_js"),
            ):
                values = head_stats[key]  # (H,)
                rows.append(
                    {
                        "model": model,
                        "layer": layer,
                        "metric": metric,
                        "value": float(values.mean()),
                    }
                )
                heads += [
                    {"model": model, "layer": layer, "head": h, "metric": metric, "value": float(v)}
                    for h, v in enumerate(values)
                ]
        for layer, r in self.routing.items():
            route = r.compute()
            rows += [
                {"model": "pair", "layer": layer, "metric": m, "value": float(route[m])}
                for m in ("route_js", "route_load_tv")
            ]
        return rows, heads

    def expert_rows(self) -> list[Row]:
        """``experts.csv`` rows: each model's load of each expert (``route_load``: the fraction
        of the layer's top-k assignments it received) for the routing layers kept."""
        out: list[Row] = []
        for layer, r in self.routing.items():
            route = r.compute()
            for model in ("base", "sft"):
                loads = route[f"load_{model}"]
                out += [
                    {
                        "model": model,
                        "layer": layer,
                        "expert": e,
                        "metric": "route_load",
                        "value": float(v),
                    }
                    for e, v in enumerate(loads)  # type: ignore[arg-type]
                ]
        return out


def _pool(rows: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """One vector per prompt from its real rows, stored prompt after prompt: the mean of each
    prompt's rows, or its last row (the last real token). (N, D), (B,) -> (B, D) float64."""
    if pooling == "mean":
        prompt = torch.repeat_interleave(torch.arange(len(lengths), device=rows.device), lengths)
        sums = rows.new_zeros(len(lengths), rows.shape[1]).index_add_(0, prompt, rows)
        return sums / lengths.unsqueeze(-1).to(rows.dtype)
    return rows[lengths.cumsum(0) - 1]  # each prompt's last row


def pass_batches(
    tok: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    truncate: bool = True,
    padding_side: str = "right",
) -> list[Batch]:
    """The padded batches of a pass, in the order every path takes them (both analysis paths
    and every rank agree on it: rank ``r`` of ``W`` takes batches ``r, r + W, ...``)."""
    if not texts:
        raise SftlensError("no prompts to analyse; check --data and --split")
    ids = tokenize(tok, texts, max_length=max_length, truncate=truncate)
    # longest first: batches waste little padding, the peak-memory batch comes first (an
    # out-of-memory fails at once, and later, smaller batches reuse its freed buffers instead
    # of fragmenting the heap); the order changes no metric
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return list(
        make_batches(
            ids,
            batch_size=batch_size,
            pad_id=tok.pad_token_id,
            padding_side=padding_side,
            indices=order,
        )
    )


def run_pass(
    base: Any,
    sft: Any,
    tok: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    truncate: bool = True,
    padding_side: str = "right",
    alpha: float = 1.0,
    preset: str = "default",
    pooling: str = "mean",
    attention: bool = True,
    routing: bool = True,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    state: RepresentationPass | None = None,
    start_batch: int = 0,
    on_batch: Any = None,
) -> RepresentationPass:
    """Feed ``texts`` through both models and return the filled accumulators.

    With ``world_size > 1`` each rank takes every ``world_size``-th batch; call
    :meth:`RepresentationPass.all_reduce_` afterwards. ``on_batch(i, state)`` is called after
    each batch (used to checkpoint), ``start_batch`` skips batches already accumulated. With a
    ``state``, its settings (attention, routing, alpha, preset, pooling) apply and the keywords
    are ignored. ``routing`` (a mixture-of-experts model) records both models' router logits.
    """
    if not texts:
        raise SftlensError("no prompts to analyse; check --data and --split")
    config = base.config
    acc = state or RepresentationPass(
        num_layers=surgery.num_layers(config),
        hidden=surgery.hidden_size(config),
        num_heads=surgery.num_heads(config),
        alpha=alpha,
        preset=cast(Preset, preset),
        pooling=pooling,
        attention=attention,
        **(moe_settings(config) if routing else {}),
    )
    attention = acc.attention  # a given state decides: its accumulators expect attentions or not
    routed = sorted(acc.routing)
    spec = surgery.arch_spec(config) if routed else None
    batches = pass_batches(
        tok,
        texts,
        batch_size=batch_size,
        max_length=max_length,
        truncate=truncate,
        padding_side=padding_side,
    )
    device = next(base.parameters()).device
    acc.to_(device)
    mine = [i for i in range(len(batches)) if i % world_size == rank and i >= start_batch]
    for i in tqdm(mine, desc="analyze", unit="batch", disable=not progress):
        batch = batches[i].to(device)
        with record_routers_of(spec, base, routed) as base_logits:
            base_states, base_attn = capture(base, batch, attentions=attention)
        with record_routers_of(spec, sft, routed) as sft_logits:
            sft_states, sft_attn = capture(sft, batch, attentions=attention)
        routes = (
            (router_logits(base_logits, routed, batch), router_logits(sft_logits, routed, batch))
            if routed
            else (None, None)
        )
        acc.update(batch, base_states, sft_states, base_attn, sft_attn, *routes)
        if on_batch is not None:
            on_batch(i, acc)
    return acc


def moe_settings(config: Any) -> dict[str, Any]:
    """``RepresentationPass`` keywords for the routing metrics of a mixture-of-experts config
    (``experts``, ``top_k``, ``moe_layers``); empty for a dense model."""
    layers = surgery.moe_layers(config)
    if not layers:
        return {}
    return {
        "experts": surgery.num_experts(config),
        "top_k": surgery.top_k_experts(config),
        "moe_layers": layers,
    }


def record_routers_of(spec: surgery.ArchSpec | None, model: Any, layers: Sequence[int]) -> Any:
    """:func:`sftlens.capture.record_routers` on ``layers`` of ``model`` (a no-op context
    yielding ``{}`` when no layer routes)."""
    if not layers or spec is None:
        return contextlib.nullcontext({})
    blocks = surgery.get_blocks(model)
    return record_routers(spec, {layer: blocks[layer] for layer in layers})
