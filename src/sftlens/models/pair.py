"""Checks that BASE and SFT are two checkpoints of the same architecture.

Works on plain ``config.json`` dicts so it runs before any weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftlens.errors import SftlensError

# (what we call it, the config keys that may hold it)
_SHAPE_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layer count", ("num_hidden_layers", "n_layer", "num_layers")),
    ("hidden size", ("hidden_size", "n_embd", "d_model")),
    ("attention heads", ("num_attention_heads", "n_head")),
    ("key/value heads", ("num_key_value_heads",)),
    ("MLP size", ("intermediate_size", "n_inner")),
)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a (possibly multimodal) config dict."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _get(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


@dataclass(frozen=True)
class PairInfo:
    model_type: str
    num_layers: int
    hidden_size: int
    base_vocab: int
    sft_vocab: int

    @property
    def vocab_added(self) -> int:
        return self.sft_vocab - self.base_vocab


def check_pair(base: dict[str, Any], sft: dict[str, Any]) -> PairInfo:
    """Raise a one-line :class:`SftlensError` if the two configs are not a comparable pair.

    A vocabulary that grew in the SFT model (added special tokens) is allowed and reported
    through :attr:`PairInfo.vocab_added`; one that shrank is an error.
    """
    b, s = text_config(base), text_config(sft)
    bt, st = b.get("model_type"), s.get("model_type")
    if bt != st:
        raise SftlensError(
            f"base and sft differ in architecture: base={bt}, sft={st}; "
            "compare two checkpoints of the same model family"
        )
    for what, keys in _SHAPE_KEYS:
        bv, sv = _get(b, keys), _get(s, keys)
        if bv != sv:
            raise SftlensError(
                f"base and sft differ in {what}: base={bv}, sft={sv}; "
                "compare two checkpoints of the same model size"
            )
    layers = _get(b, _SHAPE_KEYS[0][1])
    hidden = _get(b, _SHAPE_KEYS[1][1])
    if layers is None:
        raise SftlensError(
            f"config of model_type '{bt}' has no layer count (num_hidden_layers / n_layer); "
            "pass a decoder-only causal LM checkpoint"
        )
    bv, sv = int(b.get("vocab_size") or 0), int(s.get("vocab_size") or 0)
    if sv < bv:
        raise SftlensError(
            f"sft vocabulary is smaller than base: base={bv}, sft={sv}; "
            "check that the checkpoints are in the right order (BASE first, then SFT)"
        )
    return PairInfo(str(bt), int(layers), int(hidden or 0), bv, sv)
