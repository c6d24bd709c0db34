"""The batched engine gives exactly what ``model.generate`` gives one prompt at a time."""

from __future__ import annotations

import random

import pytest
import torch

from eval_helpers import ARCHS, tiny_lm
from sftlens.evaluation import generate as gen_mod
from sftlens.evaluation.generate import (
    PrefixCache,
    StopRule,
    generate,
    generate_batch,
    shared_prefix,
    shared_prefix_length,
    sliding_window,
)

PREFIX = (
    "Question : how many is 1 + 2 ? Answer : 1 + 2 = 3 . #### 3 "
    "Question : how many the a ? Answer : 5 #### 5 Question :"
)


def prompts(tok, n: int = 11, seed: int = 0) -> list[list[int]]:
    """``n`` prompts sharing PREFIX, with suffixes of 1-9 words (so batches need padding)."""
    rng = random.Random(seed)
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    texts = [
        PREFIX + " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) + " Answer :"
        for _ in range(n)
    ]
    return [tok(t)["input_ids"] for t in texts]


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def reference(model, ids: list[int], rule: StopRule) -> list[int]:
    """One prompt alone through ``model.generate``, then the stop rule applied token by token."""
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=rule.max_new_tokens,
        eos_token_id=sorted(rule.eos_ids),
        pad_token_id=0,
    )
    return truncate(out[0, len(ids) :].tolist(), rule)


def truncate(new: list[int], rule: StopRule) -> list[int]:
    """``new`` up to the first token after which the rule says stop (a plain loop)."""
    for k in range(1, len(new) + 1):
        text = rule.decode(new[:k])
        if new[k - 1] in rule.eos_ids or any(s in text for s in rule.stop_strings):
            return new[:k]
    return new


def run_engine(model, items, rule, prefix_len: int = 0, **kw) -> dict[int, list[int]]:
    prefix = PrefixCache(model, items[0][:prefix_len]) if prefix_len else None
    out: dict[int, list[int]] = {}
    for batch in generate(model, list(enumerate(items)), rule, pad_id=0, prefix=prefix, **kw):
        for key, g in batch:
            out[key] = g.tokens
    return out


def rule_that_bites(refs: list[list[int]], decode, max_new: int) -> StopRule:
    """A stop string and an extra EOS id that end rows at different steps, some not at all.

    ``refs`` are continuations without those stops; cutting them by a rule gives what
    generating with that rule gives (greedy decoding does not look ahead).
    """
    seen = sorted({t for r in refs for t in r if t != 1})
    for s_tok in seen:
        for e_tok in seen:
            if e_tok == s_tok:
                continue
            rule = StopRule(
                decode=decode,
                stop_strings=(decode([s_tok]),),
                eos_ids=frozenset({1, e_tok}),
                max_new_tokens=max_new,
            )
            cut = [truncate(r, rule) for r in refs]
            lengths = {len(c) for c in cut}
            if (
                len(lengths) >= 3
                and max_new in lengths
                and any(c[-1] == e_tok for c in cut)
                and any(c[-1] != e_tok and len(c) < max_new for c in cut)
            ):
                return rule
    raise AssertionError("the tiny model's continuations are too uniform for this test")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "no-prefix"])
def test_batched_equals_one_at_a_time(arch, prefix, tok):
    model = tiny_lm(arch)
    items = prompts(tok)
    plain = StopRule(decode=decoder(tok), eos_ids=frozenset({1}), max_new_tokens=14)
    rule = rule_that_bites([reference(model, x, plain) for x in items], decoder(tok), 14)
    # rows end at different steps, by a stop string, an EOS id or the bound: mid-batch stops
    expected = [reference(model, x, rule) for x in items]

    p = shared_prefix_length(items) if prefix else 0
    assert (p > 20) == prefix
    got = run_engine(model, items, rule, batch_size=4, prefix_len=p)
    assert [got[i] for i in range(len(items))] == expected


def test_prefix_runs_once_and_rows_leave_the_batch(tok, monkeypatch):
    model = tiny_lm("llama")
    items = prompts(tok, n=9)
    p = shared_prefix_length(items)
    rule = StopRule(decode=decoder(tok), eos_ids=frozenset({1}), max_new_tokens=6)
    shapes = []
    real_step = gen_mod._step

    def recording_step(m, cache=None, **inputs):
        shapes.append(tuple(inputs["input_ids"].shape))
        return real_step(m, cache, **inputs)

    monkeypatch.setattr(gen_mod, "_step", recording_step)
    prefix = shared_prefix(model, items, longest=max(map(len, items)) + 6)
    assert prefix is not None and prefix.ids == items[0][:p]
    for _ in generate(model, list(enumerate(items)), rule, pad_id=0, batch_size=4, prefix=prefix):
        pass
    # one forward over the prefix, then three batches that only ever see the suffixes
    longest_suffix = max(len(x) for x in items) - p
    assert shapes[0] == (1, p)
    assert all(w <= longest_suffix for _, w in shapes[1:])
    assert [b for b, w in shapes[1:] if w > 1] == [4, 4, 1]

    # a row that has finished leaves the batch: later steps carry fewer rows
    first_token = run_engine(model, [items[0]], rule)[0][0]
    shapes.clear()
    eos_rule = StopRule(decode=decoder(tok), eos_ids=frozenset({first_token}), max_new_tokens=6)
    results = generate_batch(model, items[:3], eos_rule, pad_id=0, prefix=None)
    assert results[0].tokens == [first_token] and results[0].reason == "eos"
    assert shapes[0][0] == 3 and all(b <= 2 for b, _ in shapes[1:])


def test_sliding_window_model_falls_back_to_plain_left_padding(tok):
    model = tiny_lm("mistral")
    assert sliding_window(model) == 8 and sliding_window(tiny_lm("llama")) is None
    items = prompts(tok, n=5)
    rule = StopRule(decode=decoder(tok), eos_ids=frozenset({1}), max_new_tokens=10)
    expected = [reference(model, x, rule) for x in items]
    longest = max(map(len, items)) + 10
    assert shared_prefix(model, items, longest=longest) is None  # window 8 < 40-token prompts
    assert shared_prefix(model, [x[:6] for x in items], longest=7) is not None  # fits the window
    # from the window's length on, no cache (a margin: eager/sdpa would stay exact 2 tokens longer)
    assert shared_prefix(model, [x[:6] for x in items], longest=8) is None
    got = run_engine(model, items, rule, batch_size=3)
    assert [got[i] for i in range(len(items))] == expected


def test_sliding_window_of_each_config_shape():
    from types import SimpleNamespace as Model

    from transformers import Gemma2Config, LlavaConfig, MistralConfig, Qwen2Config

    def window(config) -> int | None:
        return sliding_window(Model(config=config))

    assert window(MistralConfig(sliding_window=8)) == 8  # no layer_types: every layer slides
    assert window(Gemma2Config(num_hidden_layers=2, sliding_window=4)) == 4  # mixed layer types
    qwen2 = dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=8)
    assert window(Qwen2Config(**qwen2, max_window_layers=0)) == 8  # every layer slides
    assert window(Qwen2Config(**qwen2, max_window_layers=2)) is None  # a window no layer uses
    # a multimodal config: the text model's window
    assert window(LlavaConfig(text_config=MistralConfig(sliding_window=8).to_dict())) == 8
    # plain attribute configs (no get_text_config, no layer_types)
    assert window(Model(sliding_window=8)) == 8
    assert window(Model(sliding_window=8, use_sliding_window=False)) is None
    assert window(Model(sliding_window=None)) is None
    # sliding layers with no usable window: assume the smallest, so no prefix cache is used
    assert window(Model(layer_types=["sliding_attention"], sliding_window=None)) == 1
    assert window(Model(layer_types=["sliding_attention"], sliding_window=0)) == 1


def test_a_one_token_shared_prefix_is_cached(tok):
    model = tiny_lm("llama")
    prefix = shared_prefix(model, [[5, 6, 7], [5, 8]], longest=10)
    assert prefix is not None and prefix.ids == [5]
    assert shared_prefix(model, [[5, 6, 7], [6, 8]], longest=10) is None  # nothing shared


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # each keeps one token to generate from
    assert shared_prefix_length([[5, 6, 7]]) == 2
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([]) == 0
    rng = random.Random(1)
    for _ in range(50):
        seqs = [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(4)]
        p = shared_prefix_length(seqs)
        assert all(s[:p] == seqs[0][:p] and len(s) > p for s in seqs)
        assert p == min(len(s) for s in seqs) - 1 or len({tuple(s[: p + 1]) for s in seqs}) > 1


def test_generate_batch_checks_its_prefix(tok):
    model = tiny_lm("llama")
    items = prompts(tok, n=2)
    rule = StopRule(decode=decoder(tok), max_new_tokens=2)
    prefix = gen_mod.PrefixCache(model, items[0][:5])
    with pytest.raises(ValueError, match="prefix"):
        generate_batch(model, [items[0], [9, *items[1][1:]]], rule, pad_id=0, prefix=prefix)
    with pytest.raises(ValueError, match="after the prefix"):
        generate_batch(model, [items[0][:5]], rule, pad_id=0, prefix=prefix)


def test_stop_rule():
    decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    rule = StopRule(
        decode=decode, stop_strings=("t3", "t2 t5"), eos_ids=frozenset({9}), max_new_tokens=4
    )
    assert rule.check([1]) is None
    assert rule.check([1, 9]) == "eos"
    assert rule.check([1, 3]) == "stop_string"
    assert rule.check([2, 5]) == "stop_string"  # a stop string spanning two tokens
    assert rule.check([1, 1, 1, 1]) == "length"
    assert rule.text([1, 9]) == "t1"  # EOS is not text
    assert rule.text([1, 2, 5, 3]) == "t1 "  # cut at the earliest stop string
    assert rule.text([1, 1]) == "t1 t1"
    assert rule.text([9]) == ""  # EOS at once: an empty completion
    assert rule.text([1, 2, 9]) == "t1 t2"  # only the EOS is dropped
    assert rule.text([3, 1, 3]) == ""  # a stop string's first occurrence, even at the start


def test_forward_params_and_cache_kwarg_see_through_a_peft_wrapper():
    class Transformers5Model:  # the forward of a transformers 5 causal LM, as far as it matters
        def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0, **kw): ...

    class PeftLike:  # like peft.PeftModel: a generic forward, the real one behind get_base_model
        def forward(self, input_ids=None, attention_mask=None, **kwargs): ...

        def get_base_model(self):
            return Transformers5Model()

    assert {"cache", "logits_to_keep"} <= set(gen_mod.forward_params(PeftLike()))
    assert gen_mod.cache_kwarg(PeftLike()) == "cache"
    assert gen_mod.cache_kwarg(Transformers5Model()) == "cache"

    class Transformers4Model:  # the 4.x name of the cache argument
        def forward(self, input_ids, past_key_values=None, use_cache=False): ...

    assert gen_mod.cache_kwarg(Transformers4Model()) == "past_key_values"


def test_a_step_computes_the_last_positions_logits_only_and_takes_the_cache_by_its_name(
    monkeypatch,
):
    """``_step``: the model is asked for the last position's logits only (``logits_to_keep=1``:
    no (B, T, V) tensor for a long prompt), which equal the full forward's last row; the KV
    cache comes from the output's ``cache`` (transformers 5), not through the deprecated
    ``past_key_values`` alias, which would log a deprecation warning to the user."""
    from transformers.utils import generic

    model = tiny_lm("llama")
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(kwargs=kwargs, logits=tuple(out.logits.shape))

    model.register_forward_hook(hook, with_kwargs=True)
    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda *a, **k: warned.append(a))
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    logits, cache = gen_mod._step(model, input_ids=ids)
    assert seen["kwargs"]["logits_to_keep"] == 1
    assert seen["logits"] == (1, 1, model.config.vocab_size)
    assert cache.get_seq_length() == 6 and warned == []
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, full)


# -- seeded sampling (sftlens dpo) -------------------------------------------------------------


def _sample_all(model, items, rule, tok, sampling, batch_size, prefix=None):
    keyed = [((i, j), ids) for i, ids in enumerate(items) for j in range(2)]
    out = {}
    for batch in generate(
        model, keyed, rule, pad_id=0, batch_size=batch_size, prefix=prefix, sampling=sampling
    ):
        out.update({key: g.tokens for key, g in batch})
    return out


def test_sampling_is_seeded_per_item_whatever_the_batch(tok):
    from sftlens.evaluation.generate import Sampling

    model = tiny_lm("llama")
    items = prompts(tok, n=5)
    rule = StopRule(decode=decoder(tok), eos_ids=frozenset({1}), max_new_tokens=10)
    s = Sampling(temperature=1.0, top_p=0.95, seed=3)
    first = _sample_all(model, items, rule, tok, s, batch_size=3)
    assert first == _sample_all(model, items, rule, tok, s, batch_size=3)  # reproducible
    # the same draws in other batches, with the shared-prefix cache, after a "resume"
    prefix = shared_prefix(model, items, longest=200)
    assert first == _sample_all(model, items, rule, tok, s, batch_size=10, prefix=prefix)
    assert first == {
        k: v for k, v in _sample_all(model, items[:2], rule, tok, s, batch_size=1).items()
    } | {k: v for k, v in first.items() if k[0] >= 2}
    # a sample is not greedy, two samples of one prompt differ, another seed draws otherwise
    greedy = {
        i: g.tokens
        for batch in generate(model, list(enumerate(items)), rule, pad_id=0)
        for i, g in batch
    }
    assert any(first[(i, 0)] != greedy[i] for i in range(5))
    assert any(first[(i, 0)] != first[(i, 1)] for i in range(5))
    assert first != _sample_all(model, items, rule, tok, Sampling(top_p=0.95, seed=4), 3)


def test_sampling_with_a_tiny_nucleus_is_greedy(tok):
    """top-p so small that only the most likely token stays: the samples are the greedy run."""
    from sftlens.evaluation.generate import Sampling

    model = tiny_lm("gpt2")
    items = prompts(tok, n=4)
    rule = StopRule(decode=decoder(tok), eos_ids=frozenset({1}), max_new_tokens=12)
    greedy = {
        i: g.tokens
        for batch in generate(model, list(enumerate(items)), rule, pad_id=0)
        for i, g in batch
    }
    sampled = _sample_all(model, items, rule, tok, Sampling(top_p=1e-6, seed=0), 3)
    assert all(sampled[(i, j)] == greedy[i] for i in range(4) for j in range(2))


def test_nucleus_probs_against_a_hand_count():
    from sftlens.evaluation.generate import Sampling, nucleus_probs

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.8), torch.tensor([[0.625, 0.375, 0, 0]]))
    # the token that crosses top_p stays: 0.5 + 0.3 < 0.81
    assert torch.allclose(
        nucleus_probs(logits, 1.0, 0.81), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95
    )
    # exactly at the boundary (0.25 each, exact in binary): mass before token 3 is 0.5 = top_p
    flat = nucleus_probs(torch.zeros(1, 4), 1.0, 0.5)
    assert flat.tolist() == [[0.5, 0.5, 0.0, 0.0]]
    hot = nucleus_probs(logits, 2.0, 1.0)  # p ** (1 / T), renormalised
    want = torch.tensor([[0.5, 0.3, 0.15, 0.05]]) ** 0.5
    assert torch.allclose(hot, want / want.sum())
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_nucleus_probs_normalises_each_row_and_top_p_one_keeps_every_token():
    from sftlens.evaluation.generate import Sampling, nucleus_probs

    # two rows of different mass: each row is its own distribution
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    probs = nucleus_probs(logits, 1.0, 0.8)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0, 0], [0, 2 / 9, 3 / 9, 4 / 9]]))
    # top_p = 1 is plain temperature sampling: a token of tiny mass (1.0 - 2e-13 rounds to 1.0
    # in float32, so the mass before it reaches 1) is still possible
    tiny = nucleus_probs(torch.tensor([[0.0, -30.0, -30.0]]), 1.0, 1.0)
    assert tiny[0, 1] > 0 and tiny[0, 2] > 0
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        Sampling(top_p=1.5)
