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

import functools
import re
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
    "model_summary",
    "num_heads",
    "num_kv_heads",
    "num_layers",
    "path_variants",
    "split_fused",
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
        """The MLP projections as stored (e.g. ``("gate","up","down")`` or ``("fc_in","fc_out")``)."""
        return tuple(p for g, p in self.block_modules().values() if g == "mlp")


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


# fmt: off
_SPECS: tuple[ArchSpec, ...] = (
    _llama_like(("llama", "mistral", "qwen2", "gemma"), _PRE_POST),
    _llama_like(("qwen3",), _PRE_POST + _QK_NORM),
    _llama_like(("gemma2",), _PRE_POST + _FF_SANDWICH),
    _llama_like(("gemma3_text",), _PRE_POST + _FF_SANDWICH + _QK_NORM),
    _llama_like(("olmo",), ()),  # OLMo-1 LayerNorms have no parameters
    _llama_like(("olmo2", "olmo3"), _OLMO2_NORMS),
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
    """

    layer: int | None
    group: str
    proj: str
    kind: str


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
        inner, _, leaf = match.group(2).rpartition(".")
        role = spec.block_modules().get(inner)
        if role is not None and leaf in ("weight", "bias"):
            return ParamRole(layer, role[0], role[1], leaf)
        return ParamRole(layer, "other", inner or leaf, leaf)
    role = _top_level_roles(spec).get(module)
    if role is not None and leaf in ("weight", "bias"):
        return ParamRole(None, role[0], role[1], leaf)
    return ParamRole(None, "other", module, leaf)


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
