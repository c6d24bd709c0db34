"""The streaming representation pass on tiny models: correctness, padding, errors, resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sftlens.capture import capture, make_batches, tokenize
from sftlens.errors import SftlensError
from sftlens.metrics.geometry import linear_cka
from sftlens.metrics.information import effective_rank
from sftlens.models.loading import load_model
from sftlens.representations import run_pass

TEXTS = [
    "Question: how many 3 + 4 ? Answer: 7 #### 7",
    "Question: the 2 * 5 is ? Answer: 10",
    "how many of the 9",
    "Question: 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 Answer: 4 #### 4",
    "a 1",
    "Question: the 8 - 3 ? Answer: 5 #### 5",
]


@pytest.fixture(scope="module")
def models(tiny_pair):
    base_dir, sft_dir = tiny_pair
    base, tok = load_model(base_dir, attn_implementation="eager")
    sft, _ = load_model(sft_dir, attn_implementation="eager")
    return base, sft, tok


def _metrics(acc):
    rows, heads = acc.rows()
    return {(r["model"], r["layer"], r["metric"]): r["value"] for r in rows}, heads


def _run(models, **kw):
    base, sft, tok = models
    opts = dict(batch_size=4, max_length=64, progress=False)
    opts.update(kw)
    return run_pass(base, sft, tok, TEXTS, **opts)


def test_capture_keeps_last_block_and_never_applies_final_norm(models):
    base, _, tok = models
    ids = tokenize(tok, TEXTS[:2], max_length=64)
    batch = next(make_batches(ids, batch_size=2, pad_id=tok.pad_token_id))
    head_calls = []
    hook = base.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        states, _ = capture(base, batch)
    finally:
        hook.remove()
    assert head_calls == []  # the LM head (a fifth of a small model's FLOPs) is never run
    assert len(states) == base.config.num_hidden_layers + 1
    with torch.no_grad():
        ref = base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        ).hidden_states
    for i in range(len(states) - 1):  # embeddings and all blocks but the last: identical
        torch.testing.assert_close(states[i], ref[i])
    # HF's last entry is post-norm; ours is the raw block output, and norm(ours) == HF's
    assert not torch.allclose(states[-1], ref[-1])
    torch.testing.assert_close(base.model.norm(states[-1]), ref[-1])


def test_identical_models_give_identity_values(models):
    base, _, tok = models
    m, heads = _metrics(
        run_pass(base, base, tok, TEXTS, batch_size=3, max_length=64, progress=False)
    )
    for layer in range(-1, 5):
        for name in ("cka", "cka_std", "cka_pooled", "cka_unbiased", "cosine"):
            assert m[("pair", layer, name)] == pytest.approx(1.0, abs=1e-9), name
        for name in ("mean_shift", "mean_shift_rel"):
            assert m[("pair", layer, name)] == pytest.approx(0.0, abs=1e-9), name
    for layer in range(5):
        assert m[("pair", layer, "attn_js")] == pytest.approx(0.0, abs=1e-9)
    assert {h["head"] for h in heads} == {0, 1, 2, 3}


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_side_and_batch_size_do_not_change_any_metric(models, pooling):
    right, _ = _metrics(_run(models, padding_side="right", batch_size=4, pooling=pooling))
    left, _ = _metrics(_run(models, padding_side="left", batch_size=4, pooling=pooling))
    single, _ = _metrics(_run(models, padding_side="right", batch_size=1, pooling=pooling))
    assert right.keys() == left.keys() == single.keys()
    for k in right:
        assert left[k] == pytest.approx(right[k], rel=1e-4, abs=1e-5), k
        assert single[k] == pytest.approx(right[k], rel=1e-4, abs=1e-5), k


@pytest.fixture(scope="module")
def gpt2_models(tmp_path_factory):
    """A tiny GPT-2 pair: learned absolute positions, so a wrong position shifts the states."""
    from transformers import AutoModelForCausalLM

    from tiny_models import perturb_all, save_model, tiny_config

    root = tmp_path_factory.mktemp("gpt2_pair")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    save_model(model, root / "base")
    perturb_all(model, scale=0.05, seed=2)
    save_model(model, root / "sft")
    base, tok = load_model(root / "base", attn_implementation="eager")
    sft, _ = load_model(root / "sft", attn_implementation="eager")
    return base, sft, tok


def test_gpt2_learned_positions_padding_side_and_batch_size_do_not_change_any_metric(
    gpt2_models,
):
    right, _ = _metrics(_run(gpt2_models, padding_side="right", batch_size=4))
    left, _ = _metrics(_run(gpt2_models, padding_side="left", batch_size=4))
    single, _ = _metrics(_run(gpt2_models, padding_side="right", batch_size=1))
    assert right.keys() == left.keys() == single.keys()
    assert {k[1] for k in right if k[2] == "attn_js"} == {0, 1, 2}
    for k in right:
        assert left[k] == pytest.approx(right[k], rel=1e-4, abs=1e-5), k
        assert single[k] == pytest.approx(right[k], rel=1e-4, abs=1e-5), k
    # and the positions are HF's own: each prompt alone through the model, no position_ids
    base, sft, tok = gpt2_models
    ids = tokenize(tok, TEXTS, max_length=64)
    with torch.no_grad():
        hs = {
            name: [
                m(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states for t in ids
            ]
            for name, m in (("base", base), ("sft", sft))
        }
    for layer in range(-1, 2):  # HF's last entry is post-norm; blocks 0, 1 and the embeddings
        x = torch.cat([h[layer + 1][0] for h in hs["base"]])  # (N, D) every real token
        y = torch.cat([h[layer + 1][0] for h in hs["sft"]])
        assert left[("pair", layer, "cka")] == pytest.approx(float(linear_cka(x, y)), abs=1e-6)
        assert left[("pair", layer, "cosine")] == pytest.approx(
            float(torch.nn.functional.cosine_similarity(x, y).double().mean()), abs=1e-6
        )


def test_streamed_cka_equals_materialised_gram_form(models):
    base, sft, tok = models
    m, _ = _metrics(_run(models, attention=False))
    ids = tokenize(tok, TEXTS, max_length=64)
    xs, ys = [], []
    for seq in ids:  # each prompt alone, no padding at all
        batch = next(make_batches([seq], batch_size=1, pad_id=tok.pad_token_id))
        xs.append(capture(base, batch)[0])
        ys.append(capture(sft, batch)[0])
    for i, layer in enumerate(range(-1, 5)):
        x = torch.cat([s[i][0] for s in xs])  # (N, D) all real tokens
        y = torch.cat([s[i][0] for s in ys])
        assert m[("pair", layer, "cka")] == pytest.approx(float(linear_cka(x, y)), abs=1e-6)
        want_std = float(linear_cka(x, y, standardize=True))
        assert m[("pair", layer, "cka_std")] == pytest.approx(want_std, abs=1e-6)
        for model, h in (("base", x), ("sft", y)):  # largest feature's share of token variance
            var = h.double().numpy().var(axis=0)
            share = m[(model, layer, "top_feature_share")]
            assert share == pytest.approx(var.max() / var.sum(), rel=1e-6), (model, layer)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_metrics_equal_per_prompt_vectors(models, pooling):
    """cka_pooled and erank from padded batches == the same from each prompt run alone."""
    base, sft, tok = models
    m, _ = _metrics(_run(models, attention=False, padding_side="left", pooling=pooling))
    ids = tokenize(tok, TEXTS, max_length=64)
    xs, ys = [], []
    for seq in ids:
        batch = next(make_batches([seq], batch_size=1, pad_id=tok.pad_token_id))
        xs.append(capture(base, batch)[0])
        ys.append(capture(sft, batch)[0])
    pick = (lambda h: h.double().mean(0)) if pooling == "mean" else (lambda h: h[-1].double())
    for i, layer in enumerate(range(-1, 5)):
        x = torch.stack([pick(s[i][0]) for s in xs])  # (P, D) one vector per prompt
        y = torch.stack([pick(s[i][0]) for s in ys])
        assert m[("pair", layer, "cka_pooled")] == pytest.approx(float(linear_cka(x, y)), abs=1e-6)
        assert m[("base", layer, "erank")] == pytest.approx(float(effective_rank(x)), rel=1e-5)
        assert m[("sft", layer, "erank")] == pytest.approx(float(effective_rank(y)), rel=1e-5)


def test_cka_is_lowest_where_the_fixture_changed_weights_most(models):
    m, _ = _metrics(_run(models, attention=False))
    cka = [m[("pair", layer, "cka")] for layer in range(5)]
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in cka)
    assert cka[4] < cka[1]


def test_nan_hidden_states_name_the_layer(tiny_pair):
    base_dir, sft_dir = tiny_pair
    base, tok = load_model(base_dir)
    sft, _ = load_model(sft_dir)
    with torch.no_grad():
        sft.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(SftlensError, match="sft model produced NaN/inf hidden states at layer 2"):
        run_pass(
            base, sft, tok, TEXTS, batch_size=4, max_length=64, attention=False, progress=False
        )


def test_attention_from_sdpa_model_is_a_clear_error(tiny_pair):
    base_dir, _ = tiny_pair
    base, tok = load_model(base_dir, attn_implementation="sdpa")
    with pytest.raises(
        SftlensError,
        match=r"^the model did not return attention weights; load it with "
        r"attn_implementation='eager' \(sftlens does this when attention metrics are on\) "
        r"or pass --no-attention$",
    ):
        run_pass(base, base, tok, TEXTS, batch_size=4, max_length=64, progress=False)


def test_too_long_prompts_truncate_with_warning_or_refuse(models, caplog):
    _, _, tok = models
    ids = tokenize(tok, TEXTS, max_length=5)
    assert max(len(t) for t in ids) == 5
    assert "truncated to 5 tokens" in caplog.text
    with pytest.raises(SftlensError, match="prompt 0 has .* tokens, more than --max-length 5"):
        tokenize(tok, TEXTS, max_length=5, truncate=False)
    with pytest.raises(SftlensError, match="prompt 0 has no tokens"):
        tokenize(tok, [""], max_length=5)


def test_analyze_cli_end_to_end_and_resume(tiny_pair, tmp_path, monkeypatch):
    from sftlens import representations
    from sftlens.cli import main

    base, sft = tiny_pair
    out = tmp_path / "run"
    args = [
        "analyze",
        str(base),
        str(sft),
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--max-prompts",
        "20",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--no-progress",
    ]
    # crash in the 10th batch: the checkpoint after batch 8 survives, a rerun resumes from it
    real = representations.RepresentationPass.update
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(representations.RepresentationPass, "update", flaky)
    assert main(args) == 130
    assert (out / ".analyze_state.safetensors").is_file()
    calls["n"] = -1000
    assert main(args) == 0
    assert calls["n"] == -1000 + 2  # only batches 9 and 10 ran again
    assert not (out / ".analyze_state.safetensors").exists()
    resumed = (out / "metrics.csv").read_text()

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(representations.RepresentationPass, "update", real)
    assert main([*args[:4], str(fresh), *args[5:]]) == 0
    a = {tuple(r[:3]): float(r[3]) for r in csv.reader(resumed.splitlines()[1:])}
    b = {
        tuple(r[:3]): float(r[3])
        for r in csv.reader((fresh / "metrics.csv").read_text().splitlines()[1:])
    }
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k

    names = {k[2] for k in a}
    assert {
        "prompt_entropy",
        "prompt_entropy_norm",
        "dataset_entropy",
        "dataset_entropy_norm",
        "erank",
        "erank_sigma2",
        "cka",
        "cka_std",
        "cka_unbiased",
        "cka_pooled",
        "top_feature_share",
        "cosine",
        "mean_shift",
        "mean_shift_rel",
        "attn_entropy",
        "attn_js",
    } <= names
    assert {k[1] for k in a if k[2] == "cka"} == {"-1", "0", "1", "2", "3", "4"}
    for f in (
        "heads.csv",
        "report.html",
        "summary.json",
        "plots/geometry_similarity.png",
        "plots/information_entropy.png",
        "plots/attention.png",
        "plots/attention_heads_js.png",
    ):
        assert (fresh / f).is_file(), f
    html = (fresh / "report.html").read_text()
    assert "Token-level CKA first falls below 0.98" in html
    summary = json.loads((fresh / "summary.json").read_text())["analyze"]
    share = [b[("base", str(i), "top_feature_share")] for i in range(5)]
    assert summary["massive_feature_layers"] == [i for i, v in enumerate(share) if v > 0.5]


def test_report_names_layer_ranges():
    from sftlens.layers import layer_ranges as _ranges

    assert _ranges([9, 2, 3, 4, 7, 10]) == "2-4, 7, 9-10"
    assert _ranges([5]) == "5" and _ranges([]) == ""


def _np_entropy(lam: np.ndarray) -> float:
    p = lam[lam > 0] / lam.sum()
    return float(-(p * np.log(p)).sum())


def _np_unit_rows(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)  # no centring: the paper code's way


# 36 prompts > 32 features: the paper code's other dataset-entropy branch
MANY = [f"Question: {i // 10} {i % 10} + {(3 * i) % 10} ? Answer: {i % 7}" for i in range(36)]


@pytest.mark.parametrize("texts", [TEXTS, MANY], ids=["n<=d", "n>d"])
def test_paper_preset_matches_the_paper_code_in_numpy(models, texts):
    """--preset paper: prompt entropy on G/d + 1e-6 I, dataset entropy on the same for n <= d
    but on the squared singular values (no /d, no ridge) for n > d, erank from sigma^2."""
    base, sft, tok = models
    p, _ = _metrics(
        run_pass(
            base,
            sft,
            tok,
            texts,
            batch_size=12,
            max_length=64,
            attention=False,
            progress=False,
            preset="paper",
        )
    )
    ids = tokenize(tok, texts, max_length=64)
    states = [  # each prompt alone, no padding; float64 numpy, one array per layer
        [
            h[0].double().numpy()
            for h in capture(base, next(make_batches([t], batch_size=1, pad_id=0)))[0]
        ]
        for t in ids
    ]
    width = base.config.hidden_size
    for i, layer in enumerate(range(-1, 5)):
        prompt = []
        for per_layer in states:
            z = _np_unit_rows(per_layer[i])
            prompt.append(_np_entropy(np.linalg.eigvalsh(z @ z.T / width + 1e-6 * np.eye(len(z)))))
        assert p[("base", layer, "prompt_entropy")] == pytest.approx(np.mean(prompt), rel=1e-6)
        pooled = np.stack([s[i].mean(0) for s in states])  # (P, D) mean pooling
        z = _np_unit_rows(pooled)
        if len(texts) > width:
            lam = np.linalg.svd(z, compute_uv=False) ** 2
        else:
            lam = np.linalg.eigvalsh(z @ z.T / width + 1e-6 * np.eye(len(z)))
        assert p[("base", layer, "dataset_entropy")] == pytest.approx(_np_entropy(lam), rel=1e-6)
        assert p[("base", layer, "dataset_entropy_norm")] == pytest.approx(
            _np_entropy(lam) / np.log(min(len(texts), width)), rel=1e-6
        )
        sigma = np.linalg.svd(pooled - pooled.mean(0), compute_uv=False)
        erank = {  # paper: sigma^2 (Roy & Vetterli's sigma kept under its own name)
            "erank": np.exp(_np_entropy(sigma**2)),
            "erank_roy_vetterli": np.exp(_np_entropy(sigma)),
        }
        for name, want in erank.items():
            assert p[("base", layer, name)] == pytest.approx(want, rel=1e-6), name


def test_analyze_cli_without_attention(tiny_pair, tmp_path):
    """--no-attention loads the default (sdpa) attention and never asks for attention weights."""
    from sftlens.cli import main

    base, sft = tiny_pair
    out = tmp_path / "run"
    args = ["analyze", str(base), str(sft), "--out", str(out), "--data", "synthetic"]
    assert main([*args, "--max-prompts", "6", "--no-attention", "--no-progress"]) == 0
    metrics = {r["metric"] for r in csv.DictReader((out / "metrics.csv").open())}
    assert "cka" in metrics and "attn_js" not in metrics and "attn_entropy" not in metrics
