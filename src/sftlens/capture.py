"""Run a model over a batch and hand back every block's output (and attention, if asked).

Block outputs are taken with hooks on the blocks found by :mod:`sftlens.models.surgery` (a
pre-hook on block 0 for the embeddings, a forward hook on every block), so the last block is
never dropped and the final norm is never applied (unlike ``output_hidden_states``, whose last
entry is usually post-norm). The model runs without its LM head (``surgery.get_body``).
Padding is handled here once: explicit ``position_ids`` from the attention mask make left and
right padding give the same states for the real tokens. :func:`record_routers` adds the router
logits of mixture-of-experts blocks (a hook on each block's router) to any forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sftlens.errors import SftlensError
from sftlens.models import surgery

log = logging.getLogger("sftlens.capture")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    position_ids: torch.Tensor  # (B, T)
    index: list[int]  # dataset index of each row

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.index,
        )


def tokenize(
    tok: Any, texts: Sequence[str], *, max_length: int, truncate: bool = True
) -> list[list[int]]:
    """Token ids per text; longer texts are truncated with a warning, or refused."""
    ids: list[list[int]] = []
    too_long = 0
    for i, text in enumerate(texts):
        t = tok(text, add_special_tokens=True)["input_ids"]
        if len(t) == 0:
            raise SftlensError(f"prompt {i} has no tokens; remove empty prompts from the data")
        if len(t) > max_length:
            if not truncate:
                raise SftlensError(
                    f"prompt {i} has {len(t)} tokens, more than --max-length {max_length}; "
                    "raise --max-length (up to the model's context) or pass --truncate"
                )
            too_long += 1
            t = t[:max_length]
        ids.append(t)
    if too_long:
        log.warning(
            "%d of %d prompts were truncated to %d tokens", too_long, len(texts), max_length
        )
    return ids


def make_batches(
    ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    padding_side: str = "right",
    indices: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Pad consecutive groups of ``batch_size`` sequences on ``padding_side``."""
    if padding_side not in ("left", "right"):
        raise SftlensError(f"padding side must be 'left' or 'right', got '{padding_side}'")
    order = list(indices) if indices is not None else list(range(len(ids)))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.tensor(ids[i], dtype=torch.long)
            sl = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            input_ids[row, sl] = seq
            mask[row, sl] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) 0.. over real tokens
        yield Batch(input_ids, mask, positions, chunk)


def output_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture(
    model: nn.Module, batch: Batch, *, attentions: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """States ``[h_emb, h_0, ..., h_{L-1}]`` each (B, T, D), and attentions (B, H, T, T) per block.

    ``h_emb`` is the input of block 0 (HF's ``hidden_states[0]``), ``h_l`` the raw output of
    block ``l`` (the last one before the final norm).
    """
    blocks = surgery.get_blocks(model)
    states: dict[int, torch.Tensor] = {}

    def block_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # the residual stream entering block 0: token embeddings plus whatever the architecture
        # adds before the first block (GPT-2's position embeddings, Gemma's sqrt(d) scaling)
        states[-1] = args[0] if args else kwargs["hidden_states"]

    handles = [blocks[0].register_forward_pre_hook(block_input, with_kwargs=True)]
    for idx, block in enumerate(blocks):
        handles.append(
            block.register_forward_hook(
                lambda m, i, o, idx=idx: states.__setitem__(idx, output_tensor(o))
            )
        )
    try:
        out = surgery.get_body(model)(  # no LM head: analysis needs no logits
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_attentions=attentions,
            use_cache=False,
        )
    finally:
        for h in handles:
            h.remove()
    if len(states) != len(blocks) + 1:
        missing = sorted(set(range(-1, len(blocks))) - set(states))
        raise SftlensError(
            f"captured {len(states) - 1} of {len(blocks)} block outputs (missing {missing}); "
            "the architecture may route around its blocks: report this model type"
        )
    attn = None
    if attentions:
        attn = list(out.attentions) if getattr(out, "attentions", None) is not None else []
        if len(attn) != len(blocks) or any(a is None for a in attn):
            raise SftlensError(
                "the model did not return attention weights; load it with "
                "attn_implementation='eager' (sftlens does this when attention metrics are on) "
                "or pass --no-attention"
            )
    return [states[i] for i in range(-1, len(blocks))], attn


@contextmanager
def record_routers(
    spec: surgery.ArchSpec, blocks: Mapping[int, nn.Module]
) -> Iterator[dict[int, torch.Tensor]]:
    """Hook the router of each block ``{layer: block}`` while the block runs; yields a dict
    that the forward fills with ``{layer: router logits (tokens, experts)}`` (the first output
    of the router module: Mixtral / Qwen2-MoE / OLMoE routers return ``(logits, scores,
    indices)``). Hooks are removed on exit. Check with :func:`router_logits`.
    """
    if spec.router is None and blocks:
        raise SftlensError(
            f"{'/'.join(spec.model_types)} has no router: routing metrics need a "
            "mixture-of-experts model"
        )
    logits: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer, block in blocks.items():
            try:
                router = block.get_submodule(spec.router or "")
            except AttributeError:
                raise SftlensError(
                    f"block {layer} has no router at '{spec.router}', so its routing cannot be "
                    "recorded; pass --no-routing or report this model type"
                ) from None
            handles.append(
                router.register_forward_hook(
                    lambda m, i, o, layer=layer: logits.__setitem__(layer, output_tensor(o))
                )
            )
        yield logits
    finally:
        for h in handles:
            h.remove()


def router_logits(
    logits: Mapping[int, torch.Tensor], layers: Sequence[int], batch: Batch
) -> dict[int, torch.Tensor]:
    """The recorded router logits of ``layers`` as (B, T, E), one row per token of ``batch``;
    a router that did not run, or saw other tokens, is a one-line error."""
    shape = tuple(batch.attention_mask.shape)
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        got = logits.get(layer)
        if got is None or got.dim() < 2 or got.numel() // got.shape[-1] != shape[0] * shape[1]:
            what = "did not run" if got is None else f"gave logits of shape {tuple(got.shape)}"
            raise SftlensError(
                f"the router of layer {layer} {what} for a batch of {shape[0]}x{shape[1]} "
                "tokens; pass --no-routing or report this model type"
            )
        out[layer] = got.reshape(*shape, got.shape[-1])
    return out
