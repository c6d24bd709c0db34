"""Tiny random models of the three readout styles a lens must get right.

GPT-2: LayerNorm ``ln_f`` with bias, tied head. Llama: RMSNorm, untied head. Gemma 3: RMSNorm
stored as an offset (``1 + w``), embeddings scaled by ``sqrt(d)``, tied head, and final logit
soft-capping (off by default in Gemma 3; switched on here, with a cap small enough to bite).
Mixtral: a mixture-of-experts block (routed MLP) under a Llama-style readout.
"""

from __future__ import annotations

from collections.abc import Callable

import transformers as tf

from tiny_models import tiny_config, tiny_llama_config

VOCAB = 128

ARCH_CONFIGS: dict[str, Callable[[], object]] = {
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64),
    "llama": lambda: tiny_llama_config(num_hidden_layers=3),
    "gemma3_text": lambda: tf.Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        final_logit_softcapping=0.1,
    ),
    "mixtral": lambda: tiny_config("mixtral", vocab_size=VOCAB),
}
