"""Builders for tiny random models and tokenizers (importable from any test)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**overrides: object):
    from transformers import LlamaConfig

    kw: dict = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer over a fixed small vocabulary (no files needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)]
    words += [
        "Question",
        "Answer",
        ":",
        "?",
        ".",
        ",",
        "####",
        "+",
        "-",
        "*",
        "/",
        "=",
        "$",
        "the",
        "a",
        "is",
        "of",
        "and",
        "to",
        "how",
        "many",
    ]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def save_model(model, folder: Path, tokenizer=None, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(folder)
    return folder


def perturb(model, layers: dict[int, float], seed: int = 1) -> None:
    """Add noise of the given scale to the attention projections of the given layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, scale in layers.items():
            attn = model.model.layers[layer].self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.add_(scale * torch.randn(proj.weight.shape, generator=g))


def tiny_config(model_type: str, **overrides: object):
    """A tiny config (3 layers, hidden 32, vocabulary 128) of another family than Llama.

    ``gpt2`` (Conv1D, fused ``c_attn``, biases everywhere, tied head, learned positions),
    ``gpt_neox`` (per-head interleaved ``query_key_value``, biases, untied ``embed_out``),
    ``phi3`` (fused ``qkv_proj`` with grouped-query sizes and fused ``gate_up_proj``),
    ``qwen2`` (q/k/v biases, grouped-query attention), and the Llama-shaped families
    ``llama mistral gemma qwen3 gemma2 gemma3_text olmo olmo2 olmo3`` (Gemma 2/3 and OLMo 3
    with a sliding window of 4 tokens, shorter than the test prompts), and the
    mixture-of-experts families ``mixtral olmoe qwen2_moe`` (4 experts, top-2; Qwen2-MoE with
    a shared expert and a dense MLP in layer 1).
    """
    import transformers as tf

    ids = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    defaults: dict[str, tuple[type, dict]] = {
        "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
        "gpt_neox": (
            tf.GPTNeoXConfig,
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=64,
                attention_bias=True,
            ),
        ),
        "phi3": (
            tf.Phi3Config,
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            ),
        ),
        "qwen2": (
            tf.Qwen2Config,
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
        ),
    }
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    defaults.update(
        {
            "llama": (tf.LlamaConfig, llama_like),
            "mistral": (tf.MistralConfig, dict(llama_like, sliding_window=None)),
            "gemma": (tf.GemmaConfig, dict(llama_like, head_dim=8)),
            "qwen3": (tf.Qwen3Config, dict(llama_like, head_dim=8)),
            "gemma2": (
                tf.Gemma2Config,
                dict(llama_like, head_dim=8, sliding_window=4, final_logit_softcapping=30.0),
            ),
            # sliding layers with a window shorter than the prompts, and a global layer between
            "gemma3_text": (
                tf.Gemma3TextConfig,
                dict(
                    llama_like,
                    head_dim=8,
                    sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                ),
            ),
            "olmo": (tf.OlmoConfig, llama_like),
            "olmo2": (tf.Olmo2Config, llama_like),
            "olmo3": (
                tf.Olmo3Config,
                dict(
                    llama_like,
                    sliding_window=4,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                ),
            ),
        }
    )
    moe = dict(llama_like, intermediate_size=24, num_experts_per_tok=2)
    defaults.update(
        {
            "mixtral": (tf.MixtralConfig, dict(moe, num_local_experts=4, sliding_window=None)),
            "olmoe": (tf.OlmoeConfig, dict(moe, num_experts=4)),
            "qwen2_moe": (
                tf.Qwen2MoeConfig,
                dict(
                    moe,
                    intermediate_size=40,  # the dense MLP of layer 1
                    moe_intermediate_size=24,
                    shared_expert_intermediate_size=48,
                    num_experts=4,
                    mlp_only_layers=[1],
                ),
            ),
        }
    )
    cls, kw = defaults[model_type]
    return cls(**{"vocab_size": 128, **ids, **kw, **overrides})


def perturb_all(model, scale: float = 0.02, seed: int = 1) -> None:
    """Add noise to EVERY parameter (projections, biases, norms, embeddings, head), each
    element with its own scale in ``[scale, 2 * scale)``, so no two tensors change alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied head is one parameter: perturbed once
            noise = torch.randn(p.shape, generator=g) * (1.0 + torch.rand(p.shape, generator=g))
            p.add_(scale * noise.to(p.dtype))
