"""interpolate_blocks and ``sftlens interpolate``: endpoints are the two models, the middle is
the float64 average, restore is bit-exact, runs resume; tiny Llama, GPT-2 and Gemma 3."""

from __future__ import annotations

import copy
import csv
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.experiments.edit import interpolate_blocks
from tiny_models import save_model, tiny_llama_config

ARCHS = ("llama", "gpt2", "gemma3", "qwen2_moe")
LAYERS = 4
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def tiny_config(arch: str, **kw):
    if arch == "llama":
        return tiny_llama_config(num_hidden_layers=LAYERS, **kw)
    if arch == "gpt2":
        return tf.GPT2Config(
            **{
                "n_layer": LAYERS,
                "n_embd": 32,
                "n_head": 4,
                "vocab_size": 128,
                "n_positions": 64,
                **kw,
            }
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
            **kw,
        )
    if arch == "qwen2_moe":  # routed experts, a shared expert, a dense MLP in layer 1
        from tiny_models import tiny_config as family_config

        return family_config("qwen2_moe", num_hidden_layers=LAYERS, **kw)
    raise AssertionError(arch)


@functools.cache
def make_pair(arch: str, seed: int = 0):
    """(base, sft) differing in every parameter (embeddings, norms, head included).

    Cached: every test leaves the models as it found them (the restore tests check that).
    """
    torch.manual_seed(seed)
    base = tf.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    sft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, sft


@torch.no_grad()
def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return model(input_ids=ids, attention_mask=mask).logits


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def state_bits(model) -> dict[str, torch.Tensor]:
    return {k: bits(v).clone() for k, v in model.state_dict().items()}


def assert_bits_equal(model, saved) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(bits(now[k]), v), k


# -- interpolate_blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_all_layers_at_0_and_1_are_the_base_and_the_sft_model(arch):
    base, sft = make_pair(arch)
    want_base, want_sft = logits(base), logits(sft)
    assert not torch.allclose(want_base, want_sft)
    with interpolate_blocks(base, sft, None, 0.0) as model:
        assert model is base
        assert torch.equal(logits(base), want_base)
    with interpolate_blocks(base, sft, None, 1.0):
        assert torch.equal(logits(base), want_sft)


@pytest.mark.parametrize("arch", ARCHS)
def test_midpoint_is_the_float64_average_of_touched_params_only(arch):
    base, sft = make_pair(arch)
    b64 = {k: v.double() for k, v in base.state_dict().items()}
    s64 = {k: v.double() for k, v in sft.state_dict().items()}
    before = state_bits(base)
    with interpolate_blocks(base, sft, None, 0.3):
        for k, v in base.named_parameters(remove_duplicate=False):  # tied head: once, not twice
            want = 0.3 * s64[k] + 0.7 * b64[k]
            assert torch.allclose(v.double(), want, rtol=0, atol=1e-6), k
    with interpolate_blocks(base, sft, [1, 2], 0.5):
        now = base.state_dict()
        for k, v in now.items():
            m = _BLOCK_KEY.search(k)
            if m and int(m.group(1)) in (1, 2) and k in dict(base.named_parameters()):
                assert torch.allclose(v.double(), (b64[k] + s64[k]) / 2, rtol=0, atol=1e-6), k
            else:  # other blocks, embeddings, norms, head, buffers: the base's own bits
                assert torch.equal(bits(v), before[k]), k
    assert_bits_equal(base, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_span_at_1_equals_the_base_with_those_sft_blocks_loaded(arch):
    base, sft = make_pair(arch)
    hybrid = copy.deepcopy(base)
    state = base.state_dict()
    for k, v in sft.state_dict().items():
        m = _BLOCK_KEY.search(k)
        if m and int(m.group(1)) in (0, 3):
            state[k] = v
    hybrid.load_state_dict(state)
    with interpolate_blocks(base, sft, [0, 3], 1.0):
        assert torch.equal(logits(base), logits(hybrid))


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_bit_exact_and_the_sft_model_is_never_written(arch):
    base, sft = make_pair(arch)
    b_before, s_before = state_bits(base), state_bits(sft)
    for layers in (None, [2]):
        for a in (0.1, 0.5, 1.0, 1.7):
            with interpolate_blocks(base, sft, layers, a):
                logits(base)
            assert_bits_equal(base, b_before)
            assert_bits_equal(sft, s_before)
    with (
        pytest.raises(RuntimeError, match="scoring failed"),
        interpolate_blocks(base, sft, None, 0.37),
    ):
        raise RuntimeError("scoring failed")
    assert_bits_equal(base, b_before)
    assert_bits_equal(sft, s_before)


def test_donor_in_another_dtype_is_converted_per_tensor():
    base, sft = make_pair("llama")
    sft64 = copy.deepcopy(sft).double()
    with interpolate_blocks(base, sft, None, 0.5):
        want = logits(base)
    with interpolate_blocks(base, sft64, None, 0.5):
        assert torch.equal(logits(base), want)
        assert next(base.parameters()).dtype == torch.float32


def test_grown_sft_vocabulary_interpolates_the_shared_rows():
    base, sft = make_pair("llama")
    grown = copy.deepcopy(sft)
    grown.resize_token_embeddings(132)
    with interpolate_blocks(base, grown, None, 1.0):
        emb = base.get_input_embeddings().weight
        assert emb.shape[0] == 128
        assert torch.equal(emb, sft.get_input_embeddings().weight)
        assert torch.equal(logits(base), logits(sft))


def test_tied_base_with_untied_sft_and_odd_pairs_are_refused():
    base, sft = make_pair("gpt2")  # tied
    untied = tf.AutoModelForCausalLM.from_config(tiny_config("gpt2", tie_word_embeddings=False))
    before = state_bits(base)
    with (
        pytest.raises(SftlensError, match="ties .* but the SFT model does not"),
        interpolate_blocks(base, untied, None, 0.5),
    ):
        pass
    with interpolate_blocks(base, untied, [0], 0.5):  # blocks alone are fine
        pass
    wider = tf.AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=48))
    with pytest.raises(SftlensError, match="has shape"), interpolate_blocks(base, wider, [0], 0.5):
        pass
    with (
        pytest.raises(SftlensError, match="layer 7 does not exist"),
        interpolate_blocks(base, sft, [7], 0.5),
    ):
        pass
    assert_bits_equal(base, before)


# -- sftlens interpolate ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_pairs")
    out = {}
    for arch in ARCHS:
        base, sft = make_pair(arch)
        out[arch] = (save_model(base, root / arch / "base"), save_model(sft, root / arch / "sft"))
    with open(root / "problems.jsonl", "w") as f:  # hand-written, never GSM8K text
        for i in range(5):
            q, a = f"how many is {i} * 2 ?", f"{i} * 2 = {2 * i} . #### {2 * i}"
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    out["data"] = root / "problems.jsonl"
    return out


def _args(base, sft, out, data, *extra):
    return [
        "interpolate", str(base), str(sft), "--out", str(out), "--data", str(data),
        "--limit", "3", "--batch-size", "3", "--no-progress", *extra,
    ]  # fmt: skip


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _score(model, folder, data):
    from transformers import AutoTokenizer

    from sftlens.evaluation.teacher_forced import answer_scores

    tok = AutoTokenizer.from_pretrained(folder)
    problems = [json.loads(line) for line in Path(data).read_text().splitlines()][:3]
    return answer_scores(
        model,
        tok,
        [f"Question: {p['question']}\nAnswer:" for p in problems],
        [" " + p["answer"] for p in problems],
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_interpolate_curves_end_at_the_two_models(arch, folders, tmp_path):
    base_dir, sft_dir = folders[arch]
    out = tmp_path / "run"
    assert (
        main(_args(base_dir, sft_dir, out, folders["data"], "--alphas", "0,0.5,1", "--blocks", "2"))
        == 0
    )
    rows = read_rows(out / "interpolate.csv")
    assert [(r["span"], r["mask"], float(r["alpha"])) for r in rows] == [
        (span, mask, a)
        for span, mask in (("all", ""), ("0:2", "10"), ("2:4", "01"))
        for a in (0.0, 0.5, 1.0)
    ]
    nll = {(r["span"], float(r["alpha"])): float(r["answer_nll"]) for r in rows}
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    sft = tf.AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    want_base = _score(base, base_dir, folders["data"]).answer_nll
    assert nll[("all", 0.0)] == nll[("0:2", 0.0)] == pytest.approx(want_base)
    assert nll[("all", 1.0)] == pytest.approx(_score(sft, base_dir, folders["data"]).answer_nll)
    # the midpoint model, built by hand from the two state dicts
    mid = copy.deepcopy(base)
    sd_b, sd_s = base.state_dict(), sft.state_dict()
    mid.load_state_dict(
        {k: (v + sd_s[k]) / 2 if v.is_floating_point() else v for k, v in sd_b.items()}
    )
    assert nll[("all", 0.5)] == pytest.approx(_score(mid, base_dir, folders["data"]).answer_nll)
    summary = json.loads((out / "summary.json").read_text())["interpolate"]
    s = summary["spans"]["all"]
    assert s["barrier_nll"] == pytest.approx(
        nll[("all", 0.5)] - (nll[("all", 0.0)] + nll[("all", 1.0)]) / 2
    )
    assert s["best_alpha"] == min((0.0, 0.5, 1.0), key=lambda a: nll[("all", a)])
    assert (out / "plots" / "interpolate.png").is_file()
    assert "Layer-wise interpolation (causal)" in (out / "report.html").read_text()


def test_cli_interpolate_resumes(folders, tmp_path, monkeypatch):
    from sftlens.evaluation import teacher_forced
    from sftlens.models import loading

    base_dir, sft_dir = folders["llama"]
    out, data = tmp_path / "run", folders["data"]
    args = _args(base_dir, sft_dir, out, data, "--alphas", "0,0.5,1", "--spans", "1:3")
    assert main(args) == 0
    first = (out / "interpolate.csv").read_bytes()
    items = json.loads((out / ".interpolate_items.json").read_text())["items"]
    assert sorted(items) == ["1:3@0.5", "1:3@1.0", "all@0.5", "all@1.0", "base"]

    def fail(*a, **k):
        raise AssertionError("a finished item was recomputed")

    monkeypatch.setattr(teacher_forced, "answer_scores", fail)
    monkeypatch.setattr(loading, "load_model", fail)
    assert main(args) == 0
    assert (out / "interpolate.csv").read_bytes() == first
    monkeypatch.undo()

    calls = []
    real = teacher_forced.answer_scores
    monkeypatch.setattr(
        teacher_forced, "answer_scores", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main([*args[:-2], "--alphas", "0,0.25,0.5,1", "--no-all-layers", "--spans", "1:3"]) == 0
    assert len(calls) == 1  # only 1:3 at 0.25 is new
    assert {r["span"] for r in read_rows(out / "interpolate.csv")} == {"1:3"}


def test_cli_interpolate_one_line_errors(folders, tmp_path, capsys):
    base_dir, sft_dir = folders["llama"]
    assert main(_args(base_dir, sft_dir, tmp_path / "o", folders["data"], "--alphas", "0,a")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: alpha 'a' is not a number") and len(err.splitlines()) == 1
    assert main(_args(base_dir, sft_dir, tmp_path / "o", folders["data"], "--spans", "3:1")) == 2
    assert "span 3:1 is reversed" in capsys.readouterr().err


def test_summary_barrier_is_the_rise_above_the_chord_between_the_ends():
    from sftlens.experiments.interpolate import interpolate_summary

    nll = {0.0: 2.0, 0.25: 2.5, 0.5: 2.2, 1.0: 1.0, 1.5: 9.0}  # 1.5 is outside: no barrier
    rows = [{"span": "all", "alpha": a, "answer_nll": v} for a, v in nll.items()]
    rows += [{"span": "0:2", "alpha": a, "answer_nll": 3.0 - a} for a in (0.0, 0.5)]
    s = interpolate_summary(rows, problems=7)
    chord = {a: (1 - a) * 2.0 + a * 1.0 for a in (0.25, 0.5)}  # 1.75 and 1.5
    assert s["spans"]["all"]["barrier_nll"] == pytest.approx(
        max(nll[a] - chord[a] for a in chord)
    )  # 0.75 at a = 0.25
    assert s["spans"]["all"]["best_alpha"] == 1.0
    assert s["spans"]["0:2"]["barrier_nll"] is None  # no alpha = 1 on this curve
    assert s["spans"]["0:2"]["answer_nll_at_1"] is None and s["problems"] == 7
