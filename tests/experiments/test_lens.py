"""Lenses against the models' own forward pass, on GPT-2, Llama and Gemma 3 (soft-capped)."""

from __future__ import annotations

import pytest
import torch
from lens_models import ARCH_CONFIGS, VOCAB

from sftlens.capture import capture, make_batches
from sftlens.errors import SftlensError
from sftlens.experiments.lens import LogitLens, TunedLens, Unembed, fit_tuned_lens
from sftlens.models import surgery


def _batch(padding_side: str = "right"):
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 5, 7)]
    return next(make_batches(ids, batch_size=3, pad_id=0, padding_side=padding_side))


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_layer_readout_is_the_models_own_logits(arch, padding_side, arch_models):
    model = arch_models[arch]
    batch = _batch(padding_side)
    keep = batch.attention_mask.bool()
    states, _ = capture(model, batch)
    lens = LogitLens(Unembed(model))
    L = surgery.num_layers(model.config)
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        )
        own = out.logits[keep]
        mine = lens(states[-1][keep], L - 1)
        torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)
        # lower layers: the head on HF's (raw, pre-norm) hidden_states[l + 1], by hand
        head, norm = model.get_output_embeddings(), surgery.get_final_norm(model)
        cap = getattr(model.config, "final_logit_softcapping", None)
        for layer in range(-1, L - 1):
            ref = head(norm(out.hidden_states[layer + 1][keep]))
            if cap:
                ref = cap * torch.tanh(ref / cap)
            torch.testing.assert_close(lens(states[layer + 1][keep], layer), ref)
    if arch == "gemma3_text":  # the cap must matter here, or this test could not see it missing
        raw = head(norm(states[-1][keep]))
        assert (raw - own).abs().max() > 1e-2


def test_tuned_lens_starts_as_the_logit_lens_and_round_trips(arch_models, tmp_path):
    model = arch_models["llama"]
    batch = _batch()
    states, _ = capture(model, batch)
    unembed = Unembed(model)
    logit, tuned = LogitLens(unembed), TunedLens(unembed, 3, 32)
    for layer in range(-1, 3):
        torch.testing.assert_close(tuned(states[layer + 1], layer), logit(states[layer + 1], layer))
    with torch.no_grad():
        for t in tuned.translators:
            t.weight.add_(0.1 * torch.randn_like(t.weight))
            t.bias.add_(0.1)
    tuned.save(tmp_path / "lens", key="abc")
    assert TunedLens.saved_meta(tmp_path / "lens") == {"key": "abc"}
    again = TunedLens.load(tmp_path / "lens", unembed)
    assert again.to_dict() == tuned.to_dict()
    for layer in range(-1, 3):
        torch.testing.assert_close(again(states[layer + 1], layer), tuned(states[layer + 1], layer))
    # a translated layer differs from the logit lens; the last layer never has a translator
    assert not torch.allclose(tuned(states[1], 0), logit(states[1], 0))
    torch.testing.assert_close(tuned(states[-1], 2), logit(states[-1], 2))
    assert len(tuned.translators) == 3 and tuned.to_dict()["translator_layers"] == [-1, 0, 1]


def test_tuned_lens_load_errors_are_one_line(arch_models, tmp_path):
    unembed = Unembed(arch_models["llama"])
    with pytest.raises(SftlensError, match="holds no saved tuned lens") as e:
        TunedLens.load(tmp_path, unembed)
    assert "\n" not in str(e.value)
    with pytest.raises(SftlensError, match="hidden size 48"):
        TunedLens(unembed, 3, 48)
    with pytest.raises(SftlensError, match="format"):
        TunedLens.from_dict({"kind": "tuned_lens", "format_version": 99}, unembed)


def test_lens_gradients_reach_translators_but_never_the_model(arch_models):
    model = arch_models["gemma3_text"]
    batch = _batch()
    states, _ = capture(model, batch)
    tuned = TunedLens(Unembed(model), 3, 32)
    tuned(states[1], 0).logsumexp(-1).sum().backward()
    assert tuned.translators[1].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the lens did not edit the model


def test_fit_lowers_the_training_loss(arch_models):
    model = arch_models["gpt2"]
    batch = _batch()
    keep = batch.attention_mask.bool()
    tuned = TunedLens(Unembed(model), 3, 32)
    losses = fit_tuned_lens(tuned, model, lambda step: (batch, keep), steps=15, lr=1e-2, chunk=7)
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.parameters())
