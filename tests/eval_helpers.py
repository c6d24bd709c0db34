"""Helpers for the evaluation and sampling tests: tiny generating models and hand-written GSM8K-style data.

The tiny models use a large init range so that greedy continuations depend on the prompt
(with the default 0.02 a random model repeats one or two tokens whatever it is given).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftlens.tuning.sft import encode_example
from tiny_models import tiny_llama_config

ARCHS = ("llama", "gpt2")


def tiny_lm(arch: str, seed: int = 0, **overrides: object):
    """A tiny random causal LM of the given family, in eval mode, on the tiny vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

    if arch == "llama":
        cfg = tiny_llama_config(initializer_range=0.3, bos_token_id=None, eos_token_id=1)
    elif arch == "gpt2":  # learned absolute positions
        cfg = GPT2Config(
            vocab_size=128,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=256,
            initializer_range=0.3,
            bos_token_id=1,
            eos_token_id=1,
        )
    elif arch == "mistral":  # every layer attends through a sliding window
        cfg = MistralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.3,
            sliding_window=8,
            bos_token_id=None,
            eos_token_id=1,
        )
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def record_generated_batches(monkeypatch) -> list[list]:
    """Wrap the batched engine (``sftlens.evaluation.generate.generate``, looked up at call
    time by its callers) so that every batch it yields is also appended to the returned list."""
    from sftlens.evaluation import generate as gen_mod

    real, seen = gen_mod.generate, []

    def keeping(*a, **k):
        for batch in real(*a, **k):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(gen_mod, "generate", keeping)
    return seen


def problem(a: int, b: int, note: str = "") -> dict[str, str]:
    """A hand-written GSM8K-style record on the tiny tokenizer's words (never GSM8K text)."""
    return {
        "question": f"how many is {a} + {b} ?{note}",
        "answer": f"{a} + {b} = {a + b} .\n#### {a + b}",
    }


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def loop_scores(model, tok, prompt: str, target: str) -> tuple[float, int, int]:
    """(summed NLL, top-1 hits, tokens) of ``target``'s tokens, one unpadded forward, float64."""
    ids, labels = encode_example(tok, prompt, target, 10_000)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll, hits, n = 0.0, 0, 0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            nll -= float(logp[t - 1, labels[t]])
            hits += int(int(logits[t - 1].argmax()) == labels[t])
            n += 1
    return nll, hits, n
