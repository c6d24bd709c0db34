"""The architecture layer against tiny random models of every supported family."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from torch import nn

from sftlens.errors import SftlensError
from sftlens.models import surgery as S

_LLAMA_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Arch:
    """How to build a tiny model, and where that family really keeps things."""

    config: Callable[[], object]
    blocks: Callable[[nn.Module], nn.Module]
    final_norm: Callable[[nn.Module], nn.Module]
    embedding: Callable[[nn.Module], nn.Module]


def _llama_like(config_cls: Callable[..., object], **extra: object) -> Arch:
    return Arch(
        config=lambda: config_cls(**_LLAMA_KW, **extra),
        blocks=lambda m: m.model.layers,
        final_norm=lambda m: m.model.norm,
        embedding=lambda m: m.model.embed_tokens,
    )


ARCHS: dict[str, Arch] = {
    "llama": _llama_like(tf.LlamaConfig),
    "mistral": _llama_like(tf.MistralConfig),
    "qwen2": _llama_like(tf.Qwen2Config),
    "qwen3": _llama_like(tf.Qwen3Config, head_dim=8),
    "gemma": _llama_like(tf.GemmaConfig, head_dim=8),
    "gemma2": _llama_like(tf.Gemma2Config, head_dim=8),
    "gemma3_text": _llama_like(tf.Gemma3TextConfig, head_dim=8),
    "olmo": _llama_like(tf.OlmoConfig),
    "olmo2": _llama_like(tf.Olmo2Config),
    "phi3": _llama_like(tf.Phi3Config, pad_token_id=0),
    "gpt2": Arch(
        config=lambda: tf.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64
        ),
        blocks=lambda m: m.transformer.h,
        final_norm=lambda m: m.transformer.ln_f,
        embedding=lambda m: m.transformer.wte,
    ),
    "gpt_neox": Arch(
        config=lambda: tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=100,
            max_position_embeddings=64,
            attention_bias=True,
        ),
        blocks=lambda m: m.gpt_neox.layers,
        final_norm=lambda m: m.gpt_neox.final_layer_norm,
        embedding=lambda m: m.gpt_neox.embed_in,
    ),
}

_LAYER_IN_KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_MLP_SETS = ({"gate", "up", "down"}, {"fc_in", "fc_out"})


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        name: tf.AutoModelForCausalLM.from_config(a.config()).eval() for name, a in ARCHS.items()
    }


def _expanded(projs: set[str]) -> set[str]:
    out = set(projs)
    if "qkv" in out:
        out |= {"q", "k", "v"}
    if "gate_up" in out:
        out |= {"gate", "up"}
    return out


def _check_roles(model: nn.Module, names: list[str]) -> dict[int, set[str]]:
    """Classify `names` (keys of `model`) and check every role against the live module."""
    spec = S.arch_spec(model)
    blocks = S.get_blocks(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    per_layer: dict[int, set[str]] = {}
    for name in names:
        role = S.classify_param(spec, name)
        assert role.group != "other", name
        assert role.kind == name.rsplit(".", 1)[-1]
        layer_match = _LAYER_IN_KEY.search(name)
        assert role.layer == (int(layer_match.group(1)) if layer_match else None), name
        if role.layer is not None:
            assert role.group in ("attn", "mlp", "norm"), name
            module = blocks[role.layer].get_submodule(spec.module_name(role.proj))
            per_layer.setdefault(role.layer, set()).add(role.proj)
        elif role.group == "embed" and role.proj == "tokens":
            module = S.get_embedding(model)
        elif role.group == "lm_head":
            module = S.get_unembedding(model)
        elif role.group == "final_norm":
            module = S.get_final_norm(model)
        else:
            assert (role.group, role.proj) == ("embed", "positions"), name
            module = model.get_submodule(spec.position_embedding or "")
        assert getattr(module, role.kind) is params[name], name
    return per_layer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_spec_and_live_modules_are_the_models_own(arch: str, models: dict[str, nn.Module]) -> None:
    model, where = models[arch], ARCHS[arch]
    spec = S.arch_spec(model.config)
    assert model.config.model_type in spec.model_types
    assert S.arch_spec(model) is spec
    assert S.num_layers(model.config) == 3 == len(S.get_blocks(model))
    assert S.hidden_size(model.config) == 32
    assert S.get_blocks(model) is where.blocks(model)
    assert S.get_final_norm(model) is where.final_norm(model)
    assert S.get_embedding(model) is where.embedding(model)
    assert S.get_unembedding(model) is model.lm_head
    assert isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_body_gives_the_models_hidden_states_without_the_lm_head(
    arch: str, models: dict[str, nn.Module]
) -> None:
    model = models[arch]
    body = S.get_body(model)
    assert body is not model and all(m is not model.lm_head for m in body.modules())
    ids = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
        got = body(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_capture_through_the_body_on_every_architecture(
    arch: str, models: dict[str, nn.Module]
) -> None:
    """capture (body forward, padding, explicit positions, eager attention) on each family."""
    from sftlens.capture import capture, make_batches

    model = models[arch]
    model.set_attn_implementation("eager")
    prompts = [[1, 5, 7, 2, 9], [4, 3]]
    batch = next(make_batches(prompts, batch_size=2, pad_id=0, padding_side="left"))
    states, attn = capture(model, batch, attentions=True)
    assert len(states) == 4 and attn is not None and len(attn) == 3
    for row, ids in enumerate(prompts):  # each prompt alone, HF's own positions, no padding
        real = slice(5 - len(ids), 5)  # left padding: the real tokens are the last ones
        with torch.no_grad():
            want = model(
                input_ids=torch.tensor([ids]), output_hidden_states=True, output_attentions=True
            )
        ref = want.hidden_states
        for got, expected in zip(states[:-1], ref[:-1], strict=True):  # HF's last is post-norm
            torch.testing.assert_close(got[row, real], expected[0], rtol=1e-4, atol=1e-5)
        last = S.get_final_norm(model)(states[-1][row : row + 1, real])
        torch.testing.assert_close(last, ref[-1], rtol=1e-4, atol=1e-5)
        for got, expected in zip(attn, want.attentions, strict=True):  # (B, H, T, T) per block
            torch.testing.assert_close(got[row, :, real, real], expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_classify_covers_every_state_dict_key(arch: str, models: dict[str, nn.Module]) -> None:
    model = models[arch]
    spec = S.arch_spec(model)
    per_layer = _check_roles(model, list(model.state_dict()))
    assert sorted(per_layer) == [0, 1, 2]
    for projs in per_layer.values():
        assert set(S.ATTN_PROJS) <= _expanded(projs)
        assert any(mlp <= _expanded(projs) for mlp in _MLP_SETS)
        # the table lists exactly the norms the blocks have
        assert {p for p in projs if p in spec.norms} == set(spec.norms)
    for name in spec.block_modules():
        for block in S.get_blocks(model):
            block.get_submodule(name)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3", "gpt2", "gpt_neox"])
def test_classify_covers_saved_safetensors_keys(
    arch: str, models: dict[str, nn.Module], tmp_path: Path
) -> None:
    model = models[arch]
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys
    spec = S.arch_spec(model)
    roles = [S.classify_param(spec, k) for k in keys]
    assert [k for k, r in zip(keys, roles) if r.group == "other"] == []
    assert {r.layer for r in roles} == {None, 0, 1, 2}


@pytest.mark.parametrize(
    ("model_type", "key", "expected"),
    [
        ("gpt2", "h.0.attn.c_attn.weight", S.ParamRole(0, "attn", "qkv", "weight")),
        ("gpt2", "transformer.h.2.mlp.c_proj.bias", S.ParamRole(2, "mlp", "fc_out", "bias")),
        ("gpt2", "h.1.attn.c_proj.weight", S.ParamRole(1, "attn", "o", "weight")),
        ("gpt2", "h.1.attn.bias", S.ParamRole(1, "other", "attn", "bias")),
        ("gpt2", "h.1.attn.masked_bias", S.ParamRole(1, "other", "attn", "masked_bias")),
        ("gpt2", "wte.weight", S.ParamRole(None, "embed", "tokens", "weight")),
        ("gpt2", "transformer.wpe.weight", S.ParamRole(None, "embed", "positions", "weight")),
        ("gpt2", "ln_f.bias", S.ParamRole(None, "final_norm", "ln_f", "bias")),
        ("gpt2", "h.0.ln_2.weight", S.ParamRole(0, "norm", "ln_2", "weight")),
        (
            "gpt_neox",
            "gpt_neox.layers.1.attention.query_key_value.bias",
            S.ParamRole(1, "attn", "qkv", "bias"),
        ),
        ("gpt_neox", "embed_out.weight", S.ParamRole(None, "lm_head", "lm_head", "weight")),
        (
            "gpt_neox",
            "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
            S.ParamRole(0, "other", "attention.rotary_emb", "inv_freq"),
        ),
        (
            "llama",
            "model.layers.3.self_attn.q_proj.weight",
            S.ParamRole(3, "attn", "q", "weight"),
        ),
        (
            "llama",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            S.ParamRole(0, "other", "self_attn.rotary_emb", "inv_freq"),
        ),
        ("llama", "layers.12.mlp.down_proj.weight", S.ParamRole(12, "mlp", "down", "weight")),
        (
            "llama",
            "base_model.model.model.layers.2.mlp.gate_proj.weight",
            S.ParamRole(2, "mlp", "gate", "weight"),
        ),
        ("llama", "model.norm.weight", S.ParamRole(None, "final_norm", "norm", "weight")),
        ("llama", "lm_head.weight", S.ParamRole(None, "lm_head", "lm_head", "weight")),
        (
            "phi3",
            "model.layers.0.mlp.gate_up_proj.weight",
            S.ParamRole(0, "mlp", "gate_up", "weight"),
        ),
        (
            "gemma3_text",
            "model.language_model.layers.0.self_attn.q_norm.weight",
            S.ParamRole(0, "norm", "self_attn.q_norm", "weight"),
        ),
        (
            "gemma3_text",
            "language_model.model.layers.1.mlp.up_proj.weight",
            S.ParamRole(1, "mlp", "up", "weight"),
        ),
        (
            "gemma3_text",
            "language_model.lm_head.weight",
            S.ParamRole(None, "lm_head", "lm_head", "weight"),
        ),
        (
            "gemma3_text",
            "model.language_model.embed_tokens.weight",
            S.ParamRole(None, "embed", "tokens", "weight"),
        ),
        (
            "gemma3_text",
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
            S.ParamRole(
                None, "other", "model.vision_tower.encoder.layers.0.self_attn.q_proj", "weight"
            ),
        ),
    ],
)
def test_classify_checkpoint_keys(model_type: str, key: str, expected: S.ParamRole) -> None:
    config = tf.AutoConfig.for_model(model_type)
    assert S.classify_param(S.arch_spec(config), key) == expected


def _x(width: int) -> torch.Tensor:
    return torch.randn(2, 5, width, generator=torch.Generator().manual_seed(1))


def test_split_gpt2_conv1d_matches_the_models_own_split(models: dict[str, nn.Module]) -> None:
    model = models["gpt2"]
    spec, attn, mlp = S.arch_spec(model), model.transformer.h[1].attn, model.transformer.h[1].mlp
    x = _x(32)
    with torch.no_grad():
        refs = attn.c_attn(x).split(attn.split_size, dim=2)  # what GPT2Attention.forward does
        w = S.split_fused(spec, model.config, "qkv", attn.c_attn.weight, "weight")
        b = S.split_fused(spec, model.config, "qkv", attn.c_attn.bias, "bias")
        for part, ref in zip("qkv", refs):
            assert w[part].shape == (32, 32)
            torch.testing.assert_close(x @ w[part].T + b[part], ref)
        for proj, module in (("o", attn.c_proj), ("fc_in", mlp.c_fc), ("fc_out", mlp.c_proj)):
            weight = S.linear_weight(spec, proj, module.weight)
            assert weight.shape == (module.nf, module.weight.shape[0])
            inp = _x(weight.shape[1])
            torch.testing.assert_close(inp @ weight.T + module.bias, module(inp))


def test_split_neox_interleaved_matches_the_models_own_reshape(
    models: dict[str, nn.Module],
) -> None:
    model = models["gpt_neox"]
    spec, attn = S.arch_spec(model), model.gpt_neox.layers[2].attention
    heads, hd = 4, 8
    x = _x(32)
    with torch.no_grad():
        # GPTNeoXAttention.forward: view(B, T, heads, 3*hd).transpose(1, 2).chunk(3, dim=-1)
        qkv = attn.query_key_value(x).view(2, 5, -1, 3 * attn.head_size).transpose(1, 2)
        refs = qkv.chunk(3, dim=-1)
        w = S.split_fused(spec, model.config, "qkv", attn.query_key_value.weight, "weight")
        b = S.split_fused(spec, model.config, "qkv", attn.query_key_value.bias, "bias")
        for part, ref in zip("qkv", refs):
            ours = (x @ w[part].T + b[part]).view(2, 5, heads, hd).transpose(1, 2)
            torch.testing.assert_close(ours, ref)
    # a plain [q | k | v] split would be wrong for this layout
    naive = attn.query_key_value.weight[:32]
    assert not torch.allclose(naive, w["q"])


def test_split_phi3_gqa_qkv_and_gate_up_match_the_models_slices(
    models: dict[str, nn.Module],
) -> None:
    model = models["phi3"]
    spec, layer = S.arch_spec(model), model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = _x(32)
    with torch.no_grad():
        qkv = attn.qkv_proj(x)  # Phi3Attention.forward slices:
        query_pos = model.config.num_attention_heads * attn.head_dim
        kv = attn.num_key_value_heads * attn.head_dim
        refs = (
            qkv[..., :query_pos],
            qkv[..., query_pos : query_pos + kv],
            qkv[..., query_pos + kv :],
        )
        parts = S.split_fused(spec, model.config, "qkv", attn.qkv_proj.weight, "weight")
        assert [parts[p].shape[0] for p in "qkv"] == [32, 16, 16]  # GQA: 4 heads, 2 kv heads
        for part, ref in zip("qkv", refs):
            torch.testing.assert_close(x @ parts[part].T, ref)
        gate_ref, up_ref = mlp.gate_up_proj(x).chunk(2, dim=-1)  # Phi3MLP.forward
        gu = S.split_fused(spec, model.config, "gate_up", mlp.gate_up_proj.weight, "weight")
        torch.testing.assert_close(x @ gu["gate"].T, gate_ref)
        torch.testing.assert_close(x @ gu["up"].T, up_ref)


def test_split_unfused_passes_through_and_bad_shapes_fail(models: dict[str, nn.Module]) -> None:
    model = models["llama"]
    spec = S.arch_spec(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert S.split_fused(spec, model.config, "q", weight, "weight")["q"] is weight
    neox = models["gpt_neox"]
    fused = neox.gpt_neox.layers[0].attention.query_key_value.weight
    with pytest.raises(SftlensError, match=r"does not fit the config \(4 heads"):
        S.split_fused(S.arch_spec(neox), neox.config, "qkv", fused[:-8], "weight")
    with pytest.raises(SftlensError, match="must be 1-D"):
        S.split_fused(S.arch_spec(neox), neox.config, "qkv", fused, "bias")


def test_gemma3_multimodal_nesting(tmp_path: Path) -> None:
    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(**{**_LLAMA_KW, "vocab_size": 300}, head_dim=8)
    vision = tf.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = tf.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    assert config.model_type == "gemma3"
    assert "gemma3_text" in S.arch_spec(config).model_types
    lm = model.model.language_model
    assert S.num_layers(config) == 3 == len(S.get_blocks(model))
    assert S.get_blocks(model) is lm.layers
    assert S.get_final_norm(model) is lm.norm
    assert S.get_embedding(model) is lm.embed_tokens
    assert S.get_unembedding(model) is model.lm_head
    keys = list(model.state_dict())
    text_keys = [k for k in keys if k.startswith(("model.language_model.", "lm_head."))]
    assert len(text_keys) < len(keys)
    per_layer = _check_roles(model, text_keys)
    assert sorted(per_layer) == [0, 1, 2]
    spec = S.arch_spec(model)
    for key in set(keys) - set(text_keys):  # vision tower, projector
        assert S.classify_param(spec, key).group == "other", key
    # transformers 5 saves the older layout: language_model.model.layers..., vision_tower...
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = list(f.keys())
    saved_text = [k for k in saved if k.startswith(("language_model.", "model.language_model."))]
    assert len(saved_text) == len([k for k in text_keys if k != "lm_head.weight"])  # tied
    for key in saved:
        role = S.classify_param(spec, key)
        assert (role.group != "other") == (key in saved_text), key
    summary = S.model_summary(model)
    assert summary["model_type"] == "gemma3_text"
    assert summary["tied_embeddings"] is True
    assert summary["vocab_size"] == 300


def test_config_helpers_and_summary(models: dict[str, nn.Module]) -> None:
    gpt2 = tf.GPT2Config(n_embd=48, n_layer=5, n_head=6)
    assert (S.num_layers(gpt2), S.hidden_size(gpt2), S.num_heads(gpt2)) == (5, 48, 6)
    assert (S.num_kv_heads(gpt2), S.head_dim(gpt2)) == (6, 8)
    assert S.head_dim(tf.Gemma3TextConfig(hidden_size=32, num_attention_heads=4, head_dim=16)) == 16
    assert S.final_logit_softcap(tf.Gemma2Config()) == 30.0
    assert S.final_logit_softcap(tf.LlamaConfig()) is None
    summary = S.model_summary(models["gpt2"])
    assert summary["tied_embeddings"] is True
    assert (summary["num_layers"], summary["hidden_size"], summary["vocab_size"]) == (3, 32, 100)
    summary = S.model_summary(models["llama"])
    assert summary["tied_embeddings"] is False
    assert (summary["model_type"], summary["num_kv_heads"], summary["head_dim"]) == ("llama", 2, 8)


class _FooConfig(tf.PretrainedConfig):
    model_type = "foo"


class _Foo(nn.Module):
    def __init__(self, with_layers: bool) -> None:
        super().__init__()
        self.config = _FooConfig(num_hidden_layers=2)
        self.model = nn.Module()
        if with_layers:
            self.model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unknown_model_type_is_a_one_line_error() -> None:
    with pytest.raises(SftlensError) as info:
        S.arch_spec(_FooConfig())
    message = str(info.value)
    assert "\n" not in message
    assert "model_type 'foo' is not supported" in message
    assert "supported: " in message and "llama" in message and "gpt_neox" in message


def test_missing_block_list_is_a_one_line_error(models: dict[str, nn.Module]) -> None:
    with pytest.raises(SftlensError) as info:
        S.get_blocks(_Foo(with_layers=False))
    message = str(info.value)
    assert "\n" not in message
    assert "model_type 'foo' (_Foo) is not supported" in message
    tried = re.search(r"found at (.*?); ", message)
    assert tried is not None
    paths = tried.group(1).split(" / ")
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers"):
        assert path in paths
    assert "supported: " in message and "phi3" in message
    # an unknown type with a standard layout still works
    foo = _Foo(with_layers=True)
    assert S.get_blocks(foo) is foo.model.layers
    # a known type whose block list is gone names where it looked and what to pass
    headless = tf.AutoModelForCausalLM.from_config(ARCHS["llama"].config())
    del headless.model.layers
    with pytest.raises(
        SftlensError, match=r"^model_type 'llama' \(LlamaForCausalLM\): no list of "
    ):
        S.get_blocks(headless)
    with pytest.raises(
        SftlensError, match="blocks have no projection 'qkv'; available: q, k, v, o"
    ):
        S.arch_spec(headless).module_name("qkv")


def test_wrappers_are_unwrapped(models: dict[str, nn.Module]) -> None:
    peft = pytest.importorskip("peft")
    base = tf.AutoModelForCausalLM.from_config(ARCHS["llama"].config())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert S.get_blocks(lora) is base.model.layers
    assert S.get_unembedding(lora) is base.lm_head
    assert S.model_summary(lora)["architecture"] == "LlamaForCausalLM"

    class Compiled(nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    gpt2 = models["gpt2"]
    assert S.get_final_norm(Compiled(gpt2)) is gpt2.transformer.ln_f
