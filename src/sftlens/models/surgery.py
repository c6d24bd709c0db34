"""The one architecture layer: where each model family keeps its blocks, projections and norms.

Nothing else in sftlens knows attribute paths or checkpoint key names. Everything goes through:

- :func:`arch_spec` - the :class:`ArchSpec` of a config or model (keyed by ``model_type``);
- :func:`get_blocks`, :func:`get_final_norm`, :func:`get_embedding`, :func:`get_unembedding` -
  the live modules of a loaded model (PEFT / ``torch.compile`` wrappers are unwrapped);
- :func:`classify_param` - what a checkpoint (safetensors) key is: layer, group, projection;
- :func:`split_fused` / :func:`linear_weight` - fused qkv / gate_up tensors split by the
  architecture's own layout, every weight returned in ``nn.Linear`` ``(out, in)`` orientation.

Paths in an :class:`ArchSpec` are relative to the causal-LM model (``LlamaForCausalLM``). The
multimodal nesting of Gemma 3 (``model.language_model.layers`` in transformers 5,
``language_model.model.layers`` in older checkpoints) and bare base-model checkpoints
(``layers.0...``, old GPT-2 ``h.0...``) are found through :func:`path_variants`, so the table
below lists each family once.

Not our job: the q/k row permutation that llama.cpp applies to Llama q/k weights in GGUF files is
undone by transformers' GGUF loader; tensors reaching this module are in Hugging Face layout.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from sftlens.errors import SftlensError

__all__ = [
    "ATTN_PROJS",
    "GROUPS",
    "SUPPORTED_MODEL_TYPES",
    "ArchSpec",
    "ParamRole",
    "arch_spec",
    "arch_spec_of",
    "block_key",
    "classify_param",
    "final_logit_softcap",
    "get_blocks",
    "get_embedding",
    "get_final_norm",
    "get_unembedding",
    "head_dim",
    "hidden_size",
    "linear_weight",
    "load_block_tensor",
    "model_summary",
    "moe_layers",
    "num_experts",
    "num_heads",
    "num_kv_heads",
    "num_layers",
    "path_variants",
    "split_experts",
    "split_fused",
    "top_k_experts",
    "vocab_size",
]

QkvLayout = Literal["concat", "neox_interleaved", "concat_gqa"]
_M = TypeVar("_M", bound=nn.Module)

#: Parameter groups of :class:`ParamRole`.
GROUPS = ("attn", "mlp", "norm", "embed", "lm_head", "final_norm", "other")
#: The attention projections every block has (directly or inside a fused ``qkv``).
ATTN_PROJS = ("q", "k", "v", "o")
#: Projections that are linear maps inside a block (their weights obey ``ArchSpec.transposed``).
_LINEAR_PROJS = frozenset(
    {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "fc_in", "fc_out"}
)
#: Fused projection -> the parts it splits into, in order.
_FUSED_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
#: Dense MLP projections (what LoRA's ``mlp`` targets and ``ArchSpec.mlp_projs`` list).
_DENSE_MLP = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")
#: Parts of one routed expert (a gated MLP), in the order the fused tensors hold them.
EXPERT_PARTS = ("gate", "up", "down")
#: The fused 3-D expert parameters of transformers 5 (``experts.gate_up_proj`` [E, 2I, d],
#: ``experts.down_proj`` [E, d, I]) -> their role's ``proj``.
_FUSED_EXPERTS = {"gate_up_proj": "experts_gate_up", "down_proj": "experts_down"}
#: The shared expert's projections (a plain gated MLP, Qwen2-MoE) -> their role's ``proj``.
_SHARED_PARTS = {"gate_proj": "shared_gate", "up_proj": "shared_up", "down_proj": "shared_down"}


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps things.

    Model-level paths are dotted attribute paths relative to the causal-LM model. Block-level
    names are relative to one block (one element of the block list). A block has either
    ``q``/``k``/``v`` or a fused ``qkv`` (with ``qkv_layout``), and either ``gate``/``up``/``down``,
    a fused ``gate_up`` with ``down``, or ``fc_in``/``fc_out``.

    ``qkv_layout``:
      - ``"concat"``: GPT-2 ``c_attn`` (Conv1D, weight ``(D, 3D)``): output columns ``[q | k | v]``.
      - ``"neox_interleaved"``: GPT-NeoX ``query_key_value``: output rows ``[head, (q,k,v), hd]``.
      - ``"concat_gqa"``: Phi-3 ``qkv_proj``: rows ``[q: H*hd | k: KV*hd | v: KV*hd]``.

    ``transposed``: block linear weights are stored ``(in, out)`` (GPT-2 Conv1D), not ``(out, in)``.
    ``unembedding_aliases``: other checkpoint names of the LM head (Pythia's ``embed_out``).

    Mixture-of-experts blocks (Mixtral, Qwen2-MoE, OLMoE) also have:

    - ``router``: the router module (weight ``(E, d)``; its forward returns the router logits
      first), hooked for the routing metrics;
    - ``experts``: the experts module. In memory (transformers 5) it holds the fused 3-D
      parameters ``gate_up_proj`` ``[E, 2I, d]`` (gate rows first) and ``down_proj``
      ``[E, d, I]``; checkpoints on disk may hold them so, or one tensor per expert and part
      under ``experts.{e}.{name}.weight`` with the names of ``expert_names`` (checkpoint name,
      part): ``w1/w3/w2`` for Mixtral, ``gate_proj/up_proj/down_proj`` for the others;
    - ``shared_expert`` / ``shared_expert_gate`` (Qwen2-MoE): an always-on gated MLP
      (``gate_proj up_proj down_proj``) and its sigmoid gate ``(1, d)``;
    - ``checkpoint_renames``: (checkpoint prefix, module prefix) pairs inside a block, e.g.
      Mixtral's ``block_sparse_moe.`` on disk for ``mlp.`` in memory.
    """

    model_types: tuple[str, ...]
    blocks: str
    final_norm: str
    embedding: str
    o: str
    unembedding: str = "lm_head"
    position_embedding: str | None = None
    unembedding_aliases: tuple[str, ...] = ()
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: QkvLayout | None = None
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    gate_up: str | None = None
    fc_in: str | None = None
    fc_out: str | None = None
    norms: tuple[str, ...] = ()
    transposed: bool = False
    router: str | None = None
    experts: str | None = None
    expert_names: tuple[tuple[str, str], ...] = ()
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    @property
    def is_moe(self) -> bool:
        """Whether blocks route tokens to experts (a router and an experts module)."""
        return self.router is not None and self.experts is not None

    def block_modules(self) -> dict[str, tuple[str, str]]:
        """Relative module name inside a block -> ``(group, proj)``; norms use their own name."""
        out: dict[str, tuple[str, str]] = {}
        for proj in ("q", "k", "v", "qkv", "o"):
            name = getattr(self, proj)
            if name is not None:
                out[name] = ("attn", proj)
        for proj in ("gate", "up", "gate_up", "down", "fc_in", "fc_out"):
            name = getattr(self, proj)
            if name is not None:
                out[name] = ("mlp", proj)
        if self.router is not None:
            out[self.router] = ("mlp", "router")
        if self.shared_expert is not None:
            for leaf, proj in _SHARED_PARTS.items():
                out[f"{self.shared_expert}.{leaf}"] = ("mlp", proj)
        if self.shared_expert_gate is not None:
            out[self.shared_expert_gate] = ("mlp", "shared_expert_gate")
        for name in self.norms:
            out[name] = ("norm", name)
        return out

    def module_name(self, proj: str) -> str:
        """The block-relative module name of ``proj`` (``"q"``, ``"gate_up"``, a norm name...)."""
        for name, (_, p) in self.block_modules().items():
            if p == proj:
                return name
        raise SftlensError(
            f"{'/'.join(self.model_types)} blocks have no projection {proj!r}; "
            f"available: {', '.join(p for _, p in self.block_modules().values())}"
        )

    @property
    def attention(self) -> str:
        """The block-relative name of the attention module (the parent of ``o``); with eager
        attention its forward returns ``(output, weights)``."""
        return self.o.rpartition(".")[0]

    @property
    def attn_projs(self) -> tuple[str, ...]:
        """The attention projections as stored (``("q","k","v","o")`` or ``("qkv","o")``)."""
        return tuple(p for g, p in self.block_modules().values() if g == "attn")

    @property
    def mlp_projs(self) -> tuple[str, ...]:
        """The dense MLP projections as stored (e.g. ``("gate","up","down")`` or
        ``("fc_in","fc_out")``); routers and experts are not among them."""
        return tuple(p for g, p in self.block_modules().values() if g == "mlp" and p in _DENSE_MLP)


_PRE_POST = ("input_layernorm", "post_attention_layernorm")
_FF_SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
_OLMO2_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", *_QK_NORM)


def _llama_like(model_types: tuple[str, ...], norms: tuple[str, ...]) -> ArchSpec:
    return ArchSpec(
        model_types=model_types,
        blocks="model.layers",
        final_norm="model.norm",
        embedding="model.embed_tokens",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
        norms=norms,
    )


def _moe(
    model_types: tuple[str, ...],
    norms: tuple[str, ...],
    expert_names: tuple[str, str, str],
    **kw: Any,
) -> ArchSpec:
    """A Llama-shaped block whose MLP is a sparse mixture of experts (``mlp.gate`` routes)."""
    return dataclasses.replace(
        _llama_like(model_types, norms),
        gate=None,
        up=None,
        down=None,
        router="mlp.gate",
        experts="mlp.experts",
        expert_names=tuple(zip(expert_names, EXPERT_PARTS)),
        **kw,
    )


_HF_EXPERTS = ("gate_proj", "up_proj", "down_proj")

# fmt: off
_SPECS: tuple[ArchSpec, ...] = (
    _llama_like(("llama", "mistral", "qwen2", "gemma"), _PRE_POST),
    _llama_like(("qwen3",), _PRE_POST + _QK_NORM),
    _llama_like(("gemma2",), _PRE_POST + _FF_SANDWICH),
    _llama_like(("gemma3_text",), _PRE_POST + _FF_SANDWICH + _QK_NORM),
    _llama_like(("olmo",), ()),  # OLMo-1 LayerNorms have no parameters
    _llama_like(("olmo2", "olmo3"), _OLMO2_NORMS),
    # Mixtral checkpoints: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down)
    _moe(("mixtral",), _PRE_POST, ("w1", "w3", "w2"),
         checkpoint_renames=(("block_sparse_moe.", "mlp."),)),
    # Qwen2-MoE: dense MLP layers (mlp_only_layers, decoder_sparse_step) keep mlp.gate_proj...
    dataclasses.replace(
        _moe(("qwen2_moe",), _PRE_POST, _HF_EXPERTS,
             shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate"),
        gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
    ),
    _moe(("olmoe",), _PRE_POST + _QK_NORM, _HF_EXPERTS),
    ArchSpec(
        model_types=("phi3",), blocks="model.layers", final_norm="model.norm",
        embedding="model.embed_tokens",
        qkv="self_attn.qkv_proj", qkv_layout="concat_gqa", o="self_attn.o_proj",
        gate_up="mlp.gate_up_proj", down="mlp.down_proj", norms=_PRE_POST,
    ),
    ArchSpec(
        model_types=("gpt2",), blocks="transformer.h", final_norm="transformer.ln_f",
        embedding="transformer.wte", position_embedding="transformer.wpe",
        qkv="attn.c_attn", qkv_layout="concat", o="attn.c_proj",
        fc_in="mlp.c_fc", fc_out="mlp.c_proj", norms=("ln_1", "ln_2"), transposed=True,
    ),
    ArchSpec(
        model_types=("gpt_neox",), blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm", embedding="gpt_neox.embed_in",
        unembedding_aliases=("embed_out",),
        qkv="attention.query_key_value", qkv_layout="neox_interleaved", o="attention.dense",
        fc_in="mlp.dense_h_to_4h", fc_out="mlp.dense_4h_to_h", norms=_PRE_POST,
    ),
)
# fmt: on

_BY_TYPE: dict[str, ArchSpec] = {t: s for s in _SPECS for t in s.model_types}
#: Every ``model_type`` the table knows (after taking a multimodal config's text config).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_TYPE))


# ---------------------------------------------------------------- configs


def _text_config(config_or_model: Any) -> Any:
    """The text (decoder) config of a config or a model; multimodal configs nest it."""
    config = getattr(config_or_model, "config", config_or_model)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _config_int(config_or_model: Any, names: tuple[str, ...], what: str) -> int:
    config = _text_config(config_or_model)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise SftlensError(
        f"config of model_type {getattr(config, 'model_type', None)!r} has no {what} "
        f"(looked for {', '.join(names)}); pass a transformers config of a causal LM"
    )


def num_layers(config: Any) -> int:
    """Number of transformer blocks ``L`` (``num_hidden_layers`` / ``n_layer`` / ``num_layers``)."""
    return _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def hidden_size(config: Any) -> int:
    """Width of the residual stream (``hidden_size`` / ``n_embd`` / ``d_model``)."""
    return _config_int(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def vocab_size(config: Any) -> int:
    """Vocabulary size of the config (the embedding may be padded larger)."""
    return _config_int(config, ("vocab_size",), "vocabulary size")


def num_heads(config: Any) -> int:
    """Number of attention (query) heads."""
    return _config_int(config, ("num_attention_heads", "n_head"), "number of attention heads")


def num_kv_heads(config: Any) -> int:
    """Number of key/value heads (equal to :func:`num_heads` without GQA)."""
    try:
        return _config_int(config, ("num_key_value_heads",), "number of key/value heads")
    except SftlensError:
        return num_heads(config)


def head_dim(config: Any) -> int:
    """Per-head width: ``config.head_dim`` when set (Gemma, Qwen3), else hidden / heads."""
    try:
        return _config_int(config, ("head_dim",), "head_dim")
    except SftlensError:
        return hidden_size(config) // num_heads(config)


def num_experts(config: Any) -> int:
    """Routed experts per MoE layer (``num_local_experts`` / ``num_experts``)."""
    return _config_int(config, ("num_local_experts", "num_experts"), "number of experts")


def top_k_experts(config: Any) -> int:
    """Experts each token is routed to (``num_experts_per_tok``)."""
    return _config_int(config, ("num_experts_per_tok",), "experts per token")


def moe_layers(config: Any) -> list[int]:
    """The blocks whose MLP is a mixture of experts (none for a dense family).

    Qwen2-MoE keeps a dense MLP in ``mlp_only_layers`` and in the layers that
    ``decoder_sparse_step`` skips (its decoder layer's own rule); Mixtral and OLMoE route in
    every block.
    """
    spec = _spec_or_none(config)
    if spec is None or not spec.is_moe:
        return []
    text = _text_config(config)
    layers = range(num_layers(config))
    if "qwen2_moe" not in spec.model_types:
        return list(layers)
    dense = set(getattr(text, "mlp_only_layers", None) or ())
    step = int(getattr(text, "decoder_sparse_step", 1) or 1)
    experts = num_experts(config)
    return [i for i in layers if i not in dense and experts > 0 and (i + 1) % step == 0]


def final_logit_softcap(config: Any) -> float | None:
    """``final_logit_softcapping`` (Gemma 2/3): logits = cap * tanh(logits / cap), or None."""
    value = getattr(_text_config(config), "final_logit_softcapping", None)
    return float(value) if value else None


# ---------------------------------------------------------------- specs


def _spec_or_none(config_or_model: Any) -> ArchSpec | None:
    return _BY_TYPE.get(getattr(_text_config(config_or_model), "model_type", None) or "")


def arch_spec(config_or_model: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a config or model, keyed by its (text) ``model_type``."""
    spec = _spec_or_none(config_or_model)
    if spec is None:
        model_type = getattr(_text_config(config_or_model), "model_type", None)
        raise SftlensError(
            f"model_type {model_type!r} is not supported by sftlens; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (add an ArchSpec in sftlens/models/surgery.py)"
        )
    return spec


@functools.cache
def path_variants(path: str) -> tuple[str, ...]:
    """Where ``path`` (relative to the causal LM) may sit: itself, multimodal nestings, bare.

    ``model.layers`` -> ``model.layers``, ``model.language_model.layers`` (transformers 5
    multimodal), ``language_model.model.layers`` (older multimodal checkpoints), ... and
    ``layers`` (a bare base model or an old GPT-2 checkpoint without ``transformer.``).
    """
    root, _, rest = path.partition(".")
    if not rest:  # a top-level module such as lm_head
        return (path, f"language_model.{path}")
    out = [path]
    if root == "model":
        out += [f"model.language_model.{rest}", f"language_model.model.{rest}"]
        out += [f"model.language_model.model.{rest}", f"language_model.{rest}"]
    out.append(rest)
    return tuple(out)


def _all_variants(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for p in paths for v in path_variants(p)))


# ---------------------------------------------------------------- checkpoint keys


@dataclass(frozen=True)
class ParamRole:
    """What one parameter is.

    ``layer``: block index, or None outside the blocks. ``group``: one of :data:`GROUPS`.
    ``proj``: ``q k v o qkv gate up down gate_up fc_in fc_out`` in blocks; a norm's block-relative
    name (``input_layernorm``, ``self_attn.q_norm``); ``tokens``/``positions`` for embeddings;
    ``lm_head``; the final norm's attribute name; for ``other`` the module path.
    ``kind``: ``weight`` or ``bias`` (for ``other``, the key's last component).

    Mixture-of-experts blocks (group ``mlp``): ``proj`` is ``router``; ``expert_gate``,
    ``expert_up``, ``expert_down`` for one expert's tensor (``expert`` = its index); the fused
    3-D ``experts_gate_up`` / ``experts_down`` holding every expert (``expert`` None); the
    shared expert's ``shared_gate shared_up shared_down`` and its ``shared_expert_gate``.
    The layer index is always the number after the block list's path, never an expert index.
    """

    layer: int | None
    group: str
    proj: str
    kind: str
    expert: int | None = None


_PEFT_PREFIX = "base_model.model."


@functools.cache
def _top_level_roles(spec: ArchSpec) -> dict[str, tuple[str, str]]:
    roles: dict[str, tuple[str, str]] = {}
    for variant in path_variants(spec.final_norm):
        roles[variant] = ("final_norm", spec.final_norm.rsplit(".", 1)[-1])
    if spec.position_embedding is not None:
        for variant in path_variants(spec.position_embedding):
            roles[variant] = ("embed", "positions")
    for variant in path_variants(spec.embedding):
        roles[variant] = ("embed", "tokens")
    for variant in _all_variants((spec.unembedding, *spec.unembedding_aliases)):
        roles[variant] = ("lm_head", "lm_head")
    return roles


@functools.cache
def _block_key_re(spec: ArchSpec) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(v) for v in path_variants(spec.blocks))
    return re.compile(rf"^(?:{alternatives})\.(\d+)\.(.+)$")


def block_key(spec: ArchSpec, name: str) -> tuple[int, str] | None:
    """``(layer, name inside the block)`` of a checkpoint key inside a block, else None.

    >>> block_key(arch_spec_of("llama"), "model.layers.3.self_attn.q_proj.weight")
    (3, 'self_attn.q_proj.weight')
    >>> block_key(arch_spec_of("gpt2"), "h.0.attn.c_attn.bias")  # old GPT-2 checkpoints
    (0, 'attn.c_attn.bias')
    >>> block_key(arch_spec_of("llama"), "model.norm.weight") is None
    True
    """
    match = _block_key_re(spec).match(name.removeprefix(_PEFT_PREFIX))
    return None if match is None else (int(match.group(1)), match.group(2))


def arch_spec_of(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` of a ``model_type`` name (``"llama"``, ``"gpt2"``, ...)."""
    spec = _BY_TYPE.get(model_type)
    if spec is None:
        raise SftlensError(
            f"model_type {model_type!r} is not supported by sftlens; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return spec


def classify_param(spec: ArchSpec, name: str) -> ParamRole:
    """The role of a checkpoint key, e.g. ``model.layers.3.self_attn.q_proj.weight``.

    Accepts the keys of safetensors files and ``state_dict()`` alike, with multimodal
    (``model.language_model.``, ``language_model.model.``), bare (``layers.``, old GPT-2 ``h.``)
    and PEFT (``base_model.model.``) prefixes. Buffers (rotary ``inv_freq``, GPT-2/NeoX causal
    masks ``attn.bias``), vision towers and anything unknown get group ``other``.
    """
    key = name.removeprefix(_PEFT_PREFIX)
    module, _, leaf = key.rpartition(".")
    match = _block_key_re(spec).match(key)
    if match is not None:
        layer = int(match.group(1))
        inner, _, leaf = _rename_in_block(spec, match.group(2)).rpartition(".")
        role = spec.block_modules().get(inner)
        if role is not None and leaf in ("weight", "bias"):
            return ParamRole(layer, role[0], role[1], leaf)
        expert = _expert_role(spec, layer, inner, leaf)
        if expert is not None:
            return expert
        return ParamRole(layer, "other", inner or leaf, leaf)
    role = _top_level_roles(spec).get(module)
    if role is not None and leaf in ("weight", "bias"):
        return ParamRole(None, role[0], role[1], leaf)
    return ParamRole(None, "other", module, leaf)


def _rename_in_block(spec: ArchSpec, inner: str) -> str:
    """A block-relative checkpoint name as the module names it (Mixtral's
    ``block_sparse_moe.`` -> ``mlp.``)."""
    for on_disk, in_memory in spec.checkpoint_renames:
        if inner.startswith(on_disk):
            return in_memory + inner[len(on_disk) :]
    return inner


@functools.cache
def _expert_key_re(spec: ArchSpec) -> re.Pattern[str]:
    names = "|".join(re.escape(n) for n, _ in spec.expert_names)
    return re.compile(rf"^{re.escape(spec.experts or '')}\.(\d+)\.({names})$")


def _expert_role(spec: ArchSpec, layer: int, inner: str, leaf: str) -> ParamRole | None:
    """The role of an expert tensor: fused 3-D (``mlp.experts.gate_up_proj``) or one
    expert's part (``mlp.experts.3.w1.weight``, expert 3), else None."""
    if spec.experts is None:
        return None
    if inner == spec.experts and leaf in _FUSED_EXPERTS:
        return ParamRole(layer, "mlp", _FUSED_EXPERTS[leaf], "weight")
    match = _expert_key_re(spec).match(inner)
    if match is None or leaf not in ("weight", "bias"):
        return None
    part = dict(spec.expert_names)[match.group(2)]
    return ParamRole(layer, "mlp", f"expert_{part}", leaf, expert=int(match.group(1)))


# ---------------------------------------------------------------- fused tensors


def linear_weight(spec: ArchSpec, proj: str, tensor: torch.Tensor) -> torch.Tensor:
    """A block projection's weight in ``nn.Linear`` ``(out, in)`` orientation (a view)."""
    if spec.transposed and proj in _LINEAR_PROJS and tensor.ndim == 2:
        return tensor.t()
    return tensor


def _split_qkv(spec: ArchSpec, config: Any, t: torch.Tensor) -> list[torch.Tensor]:
    heads, kv_heads, hd = num_heads(config), num_kv_heads(config), head_dim(config)
    q_rows, kv_rows = heads * hd, kv_heads * hd
    if t.shape[0] != q_rows + 2 * kv_rows:
        raise SftlensError(
            f"fused qkv tensor of shape {tuple(t.shape)} does not fit the config "
            f"({heads} heads, {kv_heads} kv heads, head_dim {hd}: {q_rows + 2 * kv_rows} rows); "
            "pass the config of the checkpoint the tensor came from"
        )
    if spec.qkv_layout == "neox_interleaved":  # rows: [head, (q, k, v), head_dim]
        per_head = t.reshape(heads, 3, hd, *t.shape[1:])
        return [per_head[:, i].reshape(q_rows, *t.shape[1:]) for i in range(3)]
    if spec.qkv_layout in ("concat", "concat_gqa"):  # rows: [q | k | v]
        return list(t.split([q_rows, kv_rows, kv_rows], dim=0))
    raise SftlensError(f"{'/'.join(spec.model_types)} has no fused qkv projection to split")


def split_fused(
    spec: ArchSpec, config: Any, proj: str, tensor: torch.Tensor, kind: str
) -> dict[str, torch.Tensor]:
    """Split a fused ``qkv`` into ``{"q","k","v"}`` or ``gate_up`` into ``{"gate","up"}``.

    Works on weights (returned ``(out, in)``, GPT-2 Conv1D transposed first) and on biases,
    following the architecture's own layout (see :class:`ArchSpec`). Any other projection is
    returned as ``{proj: tensor}`` (weights in ``(out, in)`` orientation), so callers can pass
    every block tensor through this one function.
    """
    if kind not in ("weight", "bias"):
        raise SftlensError(f"kind must be 'weight' or 'bias', not {kind!r}")
    expected_ndim = 2 if kind == "weight" else 1
    if tensor.ndim != expected_ndim:
        raise SftlensError(
            f"{proj} {kind} has shape {tuple(tensor.shape)}; a {kind} must be {expected_ndim}-D"
        )
    t = linear_weight(spec, proj, tensor) if kind == "weight" else tensor
    if proj == "qkv":
        return dict(zip(_FUSED_PARTS["qkv"], _split_qkv(spec, config, t)))
    if proj == "gate_up":
        if t.shape[0] % 2:
            raise SftlensError(
                f"fused gate_up {kind} has an odd number of rows ({t.shape[0]}); "
                "expected [gate; up] of equal size"
            )
        return dict(zip(_FUSED_PARTS["gate_up"], t.chunk(2, dim=0)))
    return {proj: t}


def split_experts(proj: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a fused 3-D expert tensor into its parts, each ``[E, out, in]`` (``nn.Linear``
    orientation per expert, views).

    ``experts_gate_up`` ``[E, 2I, d]`` -> ``gate`` (rows ``:I``) and ``up`` (rows ``I:``),
    as the experts' forward takes them (``linear(x, gate_up_proj[e]).chunk(2, dim=-1)``);
    ``experts_down`` ``[E, d, I]`` -> ``down``.

    >>> t = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)  # 2 experts, I = 2, d = 3
    >>> parts = split_experts("experts_gate_up", t)
    >>> parts["gate"][1].tolist(), parts["up"][1].tolist()
    ([[12.0, 13.0, 14.0], [15.0, 16.0, 17.0]], [[18.0, 19.0, 20.0], [21.0, 22.0, 23.0]])
    """
    if tensor.ndim != 3:
        raise SftlensError(
            f"fused expert tensor {proj} has shape {tuple(tensor.shape)}; expected 3-D "
            "[experts, out, in]"
        )
    if proj == "experts_down":
        return {"down": tensor}
    if proj != "experts_gate_up":
        raise SftlensError(f"{proj} is not a fused expert tensor (experts_gate_up, experts_down)")
    if tensor.shape[1] % 2:
        raise SftlensError(
            f"fused experts gate_up tensor has an odd number of rows ({tensor.shape[1]}); "
            "expected [gate; up] of equal size"
        )
    gate, up = tensor.chunk(2, dim=1)
    return {"gate": gate, "up": up}


def load_block_tensor(
    spec: ArchSpec, name: str, find: Callable[[str], torch.Tensor | None], experts: int = 0
) -> torch.Tensor | None:
    """Block parameter ``name`` (as the live module names it) from checkpoint tensors.

    ``find(inner)`` returns the checkpoint tensor stored under the block-relative name
    ``inner`` for this block, or None. The parameter is found under its own name, under the
    family's checkpoint name (Mixtral's ``block_sparse_moe.``), or, for the fused 3-D experts
    of transformers 5 (``experts.gate_up_proj`` / ``experts.down_proj``), assembled from the
    ``experts`` per-expert tensors of a checkpoint that stores one per expert (what
    ``save_pretrained`` writes): ``gate_up_proj[e] = cat(gate_e, up_e)``,
    ``down_proj[e] = down_e``. Returns None when nothing fits.
    """
    found = find(name)
    if found is not None:
        return found
    for on_disk, in_memory in spec.checkpoint_renames:
        if name.startswith(in_memory):
            found = find(on_disk + name[len(in_memory) :])
            if found is not None:
                return found
    module, _, leaf = name.rpartition(".")
    if spec.experts is None or module != spec.experts or leaf not in _FUSED_EXPERTS:
        return None
    disk = {part: n for n, part in spec.expert_names}
    parts = ("gate", "up") if leaf == "gate_up_proj" else ("down",)
    per_expert: list[torch.Tensor] = []
    for e in range(experts):
        tensors = []
        for part in parts:
            inner = f"{spec.experts}.{e}.{disk[part]}.weight"
            t = find(inner)
            for on_disk, in_memory in spec.checkpoint_renames:
                if t is None and inner.startswith(in_memory):
                    t = find(on_disk + inner[len(in_memory) :])
            if t is None:
                return None
            tensors.append(t)
        per_expert.append(torch.cat(tensors, dim=0))
    return torch.stack(per_expert) if per_expert else None


# ---------------------------------------------------------------- live modules


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip PEFT (``get_base_model()``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    for _ in range(8):
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _lookup(model: nn.Module, paths: tuple[str, ...], kind: type[_M]) -> _M | None:
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, kind):
            return module
    return None


def _describe(model: nn.Module) -> str:
    model_type = getattr(_text_config(model), "model_type", None)
    return f"model_type {model_type!r} ({type(model).__name__})"


def _not_found(model: nn.Module, what: str, paths: tuple[str, ...], known: bool) -> SftlensError:
    where = " / ".join(paths)
    if known:
        return SftlensError(
            f"{_describe(model)}: no {what} found at {where}; pass the causal-LM model itself "
            "(AutoModelForCausalLM) or a PEFT model wrapping it"
        )
    return SftlensError(
        f"{_describe(model)} is not supported: no {what} found at {where}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _find(model: nn.Module, attr: str, what: str, kind: type[_M]) -> _M:
    root = _unwrap(model)
    spec = _spec_or_none(root)
    specs = (spec,) if spec is not None else _SPECS
    paths = _all_variants(tuple(getattr(s, attr) for s in specs))
    found = _lookup(root, paths, kind)
    if found is None:
        raise _not_found(root, what, paths, known=spec is not None)
    return found


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, bottom (next to the embeddings) first."""
    return _find(model, "blocks", "list of transformer blocks", nn.ModuleList)


def get_body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (a HF causal LM's ``base_model``).

    Running it gives the same hidden states and attentions as the whole model but skips the
    logits, which cost ``2 * hidden * vocab`` FLOPs per token (about a fifth of SmolLM2-135M's
    forward). Falls back to the whole model when its blocks are not inside ``base_model``.
    """
    root = _unwrap(model)
    body = getattr(root, "base_model", None)
    if isinstance(body, nn.Module) and body is not root:
        blocks = get_blocks(root)
        if any(m is blocks for m in body.modules()):
            return body
    return root


def get_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block, before the LM head."""
    return _find(model, "final_norm", "final norm", nn.Module)


def get_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding (``(vocab, hidden)``)."""
    root = _unwrap(model)
    if _spec_or_none(root) is None:
        found = getattr(root, "get_input_embeddings", lambda: None)()
        if isinstance(found, nn.Embedding):
            return found
    return _find(root, "embedding", "token embedding", nn.Embedding)


def get_unembedding(model: nn.Module) -> nn.Module:
    """The LM head (an ``nn.Linear`` with weight ``(vocab, hidden)``; may be tied)."""
    root = _unwrap(model)
    if _spec_or_none(root) is None:
        found = getattr(root, "get_output_embeddings", lambda: None)()
        if isinstance(found, nn.Module):
            return found
    return _find(root, "unembedding", "LM head", nn.Module)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Facts for reports: type, depth, widths, vocabulary, tied embeddings, parameter count."""
    root = _unwrap(model)
    config = _text_config(root)
    embedding, head = get_embedding(root), get_unembedding(root)
    head_weight = getattr(head, "weight", None)
    tied = head_weight is embedding.weight or (
        isinstance(head_weight, torch.Tensor)
        and head_weight.device.type != "meta"
        and head_weight.shape == embedding.weight.shape
        and head_weight.data_ptr() == embedding.weight.data_ptr()
    )
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(root).__name__,
        "num_layers": num_layers(config),
        "hidden_size": hidden_size(config),
        "vocab_size": vocab_size(config),
        "embedding_rows": int(embedding.weight.shape[0]),
        "num_heads": num_heads(config),
        "num_kv_heads": num_kv_heads(config),
        "head_dim": head_dim(config),
        "tied_embeddings": bool(tied),
        "final_logit_softcapping": final_logit_softcap(config),
        "num_parameters": sum(p.numel() for p in root.parameters()),
    }
