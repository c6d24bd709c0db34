"""Temporary model edits: context managers that restore the models in ``finally``.

- :func:`swap_blocks` exchanges block MODULES between two loaded models (no copy, no reload):
  inside the context the host runs the donor's blocks at the given indices and the donor runs
  the host's, so ONE exchange yields both hybrids of a span (SFT-into-base and base-into-SFT).
- :func:`interpolate_blocks` sets ``theta = a * theta_sft + (1 - a) * theta_base`` in place on
  the base model, keeping a copy of only the tensors it touches, and puts them back bit-exactly.

Both restore on exit, also when the body raises (a failed scoring never leaves a hybrid
behind).

Why a swapped block keeps its index: transformers' blocks carry per-layer state fixed at
construction, e.g. ``self_attn.layer_idx`` (which slot of the KV cache the block writes) and
Gemma 2/3's ``layer_type`` / ``is_sliding`` / ``sliding_window`` (the host model picks the
attention mask for index ``i`` from its config's ``layer_types[i]``, while the block applies its
own window). Block ``i`` of the donor goes to index ``i`` of the host, and both models share one
config (:func:`sftlens.models.pair.check_pair`), so every such attribute agrees;
:func:`swap_blocks` checks that it does and refuses otherwise. Moving a block to a different
index would silently mix the caches or apply a sliding window where the host expects global
attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sftlens.errors import SftlensError
from sftlens.models import surgery

__all__ = ["interpolate_blocks", "swap_blocks"]

_SCALARS = (bool, int, float, str, type(None))


def _layer_list(layers: Iterable[int], num_layers: int) -> list[int]:
    out = sorted(set(int(i) for i in layers))
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise SftlensError(
            f"layer {bad[0]} does not exist in a model of {num_layers} layers; "
            f"pass layers in 0..{num_layers - 1}"
        )
    return out


def _placement(module: nn.Module) -> set[tuple[str, torch.dtype]]:
    return {(str(t.device), t.dtype) for t in (*module.parameters(), *module.buffers())}


def _settings(block: nn.Module) -> dict[tuple[str, str], Any]:
    """The plain per-module attributes of a block (``layer_idx``, ``sliding_window``...)."""
    return {
        (name, key): value
        for name, module in block.named_modules()
        for key, value in vars(module).items()
        if not key.startswith("_") and key != "training" and isinstance(value, _SCALARS)
    }


def _check_swappable(host: nn.Module, donor: nn.Module, i: int) -> None:
    h, d = surgery.get_blocks(host)[i], surgery.get_blocks(donor)[i]
    if type(h) is not type(d):
        raise SftlensError(
            f"block {i} is a {type(h).__name__} in one model and a {type(d).__name__} in the "
            "other; swap blocks between two checkpoints of the same architecture"
        )
    if _placement(h) != _placement(d):
        raise SftlensError(
            f"block {i} lives on {sorted(_placement(h))} in the host but on "
            f"{sorted(_placement(d))} in the donor; load both models with the same --dtype "
            "and --device"
        )
    hs, ds = _settings(h), _settings(d)
    for key in sorted(set(hs) | set(ds)):
        if hs.get(key) != ds.get(key):
            where = ".".join(k for k in key if k)
            raise SftlensError(
                f"block {i} differs between the two models in {where} "
                f"({hs.get(key)!r} vs {ds.get(key)!r}); swap blocks only between checkpoints "
                "with the same config"
            )


@contextmanager
def swap_blocks(host: nn.Module, donor: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Exchange the blocks at ``layers`` between ``host`` and ``donor``; restore on exit.

    Inside the context ``host`` runs the donor's blocks at those indices (and ``donor`` the
    host's: the complementary hybrid). Only references in the two ``nn.ModuleList``s change:
    no tensor is copied, and on exit every list slot holds its original module object again,
    also when the body raises. Yields ``host``.

    >>> with swap_blocks(base, sft, range(6, 12)):      # doctest: +SKIP
    ...     score(base)  # SFT blocks 6..11 inside the base
    ...     score(sft)   # base blocks 6..11 inside the SFT model
    """
    host_blocks, donor_blocks = surgery.get_blocks(host), surgery.get_blocks(donor)
    if len(host_blocks) != len(donor_blocks):
        raise SftlensError(
            f"the host has {len(host_blocks)} blocks and the donor {len(donor_blocks)}; "
            "swap blocks between two checkpoints of the same model size"
        )
    chosen = _layer_list(layers, len(host_blocks))
    if host_blocks is donor_blocks:
        raise SftlensError("host and donor are the same model; pass two loaded models")
    for i in chosen:
        _check_swappable(host, donor, i)
    originals = {i: (host_blocks[i], donor_blocks[i]) for i in chosen}
    try:
        for i, (h, d) in originals.items():
            host_blocks[i], donor_blocks[i] = d, h
        yield host
    finally:
        for i, (h, d) in originals.items():
            host_blocks[i], donor_blocks[i] = h, d


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter tensor (tied embeddings), one list per tensor."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _pairs(
    base: nn.Module, sft: nn.Module, layers: Iterable[int] | None
) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, base parameter, SFT tensor) for every parameter that the edit touches."""
    if layers is None:
        base_params = dict(base.named_parameters())  # one name per tensor: ties counted once
        sft_params = dict(sft.named_parameters(remove_duplicate=False))
        sft_ids = {n: id(p) for n, p in sft_params.items()}
        for group in _tied_groups(base):
            if len({sft_ids.get(n) for n in group}) != 1:
                raise SftlensError(
                    f"the base ties {' and '.join(group)} but the SFT model does not; "
                    "interpolate blocks only (--blocks/--spans with --no-all-layers)"
                )
    else:
        base_blocks, sft_blocks = surgery.get_blocks(base), surgery.get_blocks(sft)
        if len(base_blocks) != len(sft_blocks):
            raise SftlensError(
                f"base has {len(base_blocks)} blocks and sft {len(sft_blocks)}; "
                "interpolate two checkpoints of the same model size"
            )
        base_params, sft_params = {}, {}
        for i in _layer_list(layers, len(base_blocks)):
            base_params.update({f"{i}.{n}": p for n, p in base_blocks[i].named_parameters()})
            sft_params.update({f"{i}.{n}": p for n, p in sft_blocks[i].named_parameters()})
    out: list[tuple[str, nn.Parameter, torch.Tensor]] = []
    for name, p in base_params.items():
        found = sft_params.get(name)
        if found is None:
            raise SftlensError(
                f"parameter {name} of the base has no counterpart in the SFT model; "
                "interpolate two checkpoints of the same architecture"
            )
        s: torch.Tensor = found
        if s.shape != p.shape:
            # an SFT vocabulary that grew: the base keeps its own rows, interpolated with the
            # SFT's rows for the same token ids (the added rows have no base counterpart)
            grown = p.ndim >= 1 and s.shape[1:] == p.shape[1:] and s.shape[0] > p.shape[0]
            if not grown:
                raise SftlensError(
                    f"parameter {name} has shape {tuple(p.shape)} in the base but "
                    f"{tuple(s.shape)} in the SFT model; interpolate two checkpoints of the "
                    "same model size"
                )
            s = s[: p.shape[0]]
        out.append((name, p, s))
    return out


@contextmanager
def interpolate_blocks(
    base: nn.Module, sft: nn.Module, layers: Iterable[int] | None, a: float
) -> Iterator[nn.Module]:
    """Set the base's parameters to ``a * sft + (1 - a) * base`` in place; restore on exit.

    ``layers``: the blocks whose parameters move, or None for EVERY parameter of the model:
    the blocks, the token (and position) embeddings, the final norm and the LM head (a tied
    head moves with its embedding, once). Buffers (rotary frequencies, causal masks) are
    never touched: they are fixed by the shared config, not trained. When the SFT vocabulary
    grew, the base keeps its own vocabulary and interpolates the rows of the tokens both share.

    The SFT tensors are read, never written, and may live on another device or dtype (each is
    converted one tensor at a time). Computed as ``torch.lerp(base, sft, a)``, which returns
    the base exactly at ``a = 0`` and the SFT tensor exactly at ``a = 1``. A copy of only the
    touched base tensors is kept and copied back on exit, so restoring is bit-exact, also
    when the body raises. Yields ``base``.
    """
    a = float(a)
    pairs = _pairs(base, sft, layers)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for _, p, s in pairs:
                saved.append((p, p.detach().clone()))
                p.lerp_(s.detach().to(device=p.device, dtype=p.dtype), a)
        yield base
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
