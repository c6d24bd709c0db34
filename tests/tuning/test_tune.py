"""``sftlens tune``: LoRA on a mask's layers only, on tiny random models.

Only the chosen layers get LoRA and gradients; backward never runs below the lowest trained
layer; budget matching keeps the total rank; the saved adapter reloads through plain PEFT with
identical logits; ``lora_dw_*`` against float64 numpy; resume after a kill; the CLI end to end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.config import TuneConfig
from sftlens.errors import SftlensError
from sftlens.tuning import lora
from tiny_models import tiny_config, tiny_llama_config

SUMMARY_KEYS = {
    "mask",
    "layers",
    "layer_range",
    "rank_per_layer",
    "alpha",
    "trainable_params",
    "final_loss",
    "steps",
    "train_tokens",
    "seconds",
    "step_seconds",
    "peak_memory_mb",
}


def tune(model, out, **kw) -> Path:
    opts = dict(
        out=str(out),
        data="synthetic",
        max_examples=16,
        steps=3,
        batch_size=2,
        lr=1e-2,
        warmup_ratio=0.0,
        max_length=64,
        save_every=0,
        device="cpu",
        progress=False,
    )
    opts.update(kw)
    return api.tune(str(model), **opts)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["history"]


def _rows(out: Path) -> dict[tuple[int, str], float]:
    with open(out / "metrics.csv") as f:
        return {(int(r["layer"]), r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


def _tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides))


def _plan(model, layers, **cfg) -> lora.LoraPlan:
    return lora.plan_lora(model, layers, TuneConfig(model="m", **cfg))


# -- which parameters exist, train and receive gradients --------------------------------------


@pytest.mark.parametrize("targets", ["attn", "attn+mlp"])
def test_only_the_chosen_layers_have_lora_and_get_gradients(targets):
    model = _tiny_model()
    plan = _plan(model, [1, 3], targets=targets)
    peft_model = lora.apply_lora(model, plan)
    ids = torch.randint(3, 128, (2, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    n_proj = 4 if targets == "attn" else 7
    lora_params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora_params) == 2 * n_proj * 2  # A and B of each projection of layers 1 and 3
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert layer in (1, 3) and p.requires_grad, name
            # B starts at zero, so only B has a gradient on the first step
            if "lora_B" in name:
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:  # embeddings, norms, LM head, base projections: frozen, no gradient
            assert not p.requires_grad and p.grad is None, name


def _count_backward(model) -> list[int]:
    """Backward hooks on every block: how many times a gradient flowed through each."""
    from sftlens.models import surgery

    counts = [0] * len(surgery.get_blocks(model))
    for i, block in enumerate(surgery.get_blocks(model)):

        def hook(module, grad_in, grad_out, i=i):
            counts[i] += 1

        block.register_full_backward_hook(hook)
    return counts


@pytest.mark.parametrize(("mask", "lowest"), [("00011", 3), ("01000", 1), ("11111", 0)])
def test_backward_never_runs_below_the_lowest_trained_layer(
    tiny_pair, tmp_path, monkeypatch, mask, lowest
):
    """Through the real training path: hooks on the blocks of the model ``run_tune`` trains.

    The gradient flows from the loss down to the lowest LoRA layer (through the layers above
    it, which it must cross) and no further: the frozen layers below never run backward.
    """
    base, _ = tiny_pair
    real = lora.apply_lora
    seen: dict[str, list[int]] = {}

    def apply_and_count(model, plan):
        peft_model = real(model, plan)
        seen["counts"] = _count_backward(peft_model)
        return peft_model

    monkeypatch.setattr(lora, "apply_lora", apply_and_count)
    steps, accum = 2, 2
    tune(base, tmp_path / "out", mask=mask, steps=steps, grad_accum=accum)
    assert seen["counts"] == [steps * accum if layer >= lowest else 0 for layer in range(5)]


def test_all_layer_mask_runs_backward_everywhere_and_embedding_output_needs_no_grad():
    model = _tiny_model()
    peft_model = lora.apply_lora(model, _plan(model, [2, 3, 4]))
    counts = _count_backward(peft_model)
    grads_at_embedding = []
    peft_model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: grads_at_embedding.append(o.requires_grad)
    )
    ids = torch.randint(3, 128, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert counts == [0, 0, 1, 1, 1]
    assert grads_at_embedding == [False]


# -- budget matching and alpha ----------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [5, 7, 12, 30])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_budget_matching_gives_equal_total_rank(num_layers, rank):
    from sftlens.layers import mask_layers

    for bits in range(1, 32):
        mask = format(bits, "05b")
        active = len(mask_layers(mask, num_layers))
        r_mask = lora.budget_rank(rank, num_layers, active)
        # SPEC: r_mask = round(r * L / L_active), half up; the total is r * L up to rounding
        assert r_mask == int(np.floor(rank * num_layers / active + 0.5))
        assert abs(r_mask * active - rank * num_layers) <= active / 2
        if (rank * num_layers) % active == 0:
            assert r_mask * active == rank * num_layers


def _lora_ranks(peft_model) -> dict[int, int]:
    """Rank of the q-projection LoRA of every adapted layer, read from the PEFT modules."""
    out = {}
    for name, p in peft_model.named_parameters():
        if "q_proj.lora_A" in name:
            out[int(name.split(".layers.")[1].split(".")[0])] = p.shape[0]
    return out


@pytest.mark.parametrize(
    ("layers", "r_mask"), [([0, 1, 2, 3, 4], 8), ([3, 4], 20), ([1, 2, 3], 13)]
)
def test_peft_model_carries_the_budget_rank_and_the_alpha_policy(layers, r_mask):
    model = _tiny_model()
    plan = _plan(model, layers)
    peft_model = lora.apply_lora(model, plan)
    assert _lora_ranks(peft_model) == dict.fromkeys(layers, r_mask)
    assert sum(_lora_ranks(peft_model).values()) == pytest.approx(8 * 5, abs=len(layers) / 2)
    # alpha / r fixed (default ratio 2): the scaling does not depend on the mask
    module = peft_model.base_model.model.model.layers[layers[0]].self_attn.q_proj
    assert plan.alpha == 2 * r_mask and module.scaling["default"] == pytest.approx(2.0)
    # a fixed alpha (the paper's 128): the scaling falls as the rank grows
    fixed = _plan(_tiny_model(), layers, alpha=128.0)
    assert fixed.alpha == 128.0 and fixed.scaling == pytest.approx(128.0 / r_mask)
    # no budget matching: the baseline rank everywhere
    assert _plan(_tiny_model(), layers, budget_match=False).rank == 8


def test_targets_come_from_the_architecture_layer():
    llama = _tiny_model()
    assert _plan(llama, [0], targets="attn").target_modules == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    )
    assert _plan(llama, [0], targets="q,v").projs == ("q", "v")
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    plan = _plan(gpt2, [1], targets="attn+mlp")
    assert plan.target_modules == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert plan.layers_pattern == "h"
    peft_model = lora.apply_lora(gpt2, plan)  # checks that exactly these modules got LoRA
    assert {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if "lora_" in n} == {
        f"base_model.model.transformer.h.1.{m}" for m in plan.target_modules
    }
    with pytest.raises(
        SftlensError, match="gpt2 blocks have no projection q, gate; available: qkv, o"
    ):
        _plan(gpt2, [0], targets="q,gate")


# -- lora_dw against float64 numpy ------------------------------------------------------------


def _randomize_lora(peft_model, seed=3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def _numpy_dw(module, scaling: float) -> np.ndarray:
    a = module.lora_A["default"].weight.detach().double().numpy()
    b = module.lora_B["default"].weight.detach().double().numpy()
    return scaling * (b @ a)  # (out, in)


def _fro(x: np.ndarray) -> float:
    return float(np.sqrt((x.astype(np.float64) ** 2).sum()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_lora_dw_matches_an_independent_float64_computation(family):
    model = (
        _tiny_model()
        if family == "llama"
        else AutoModelForCausalLM.from_config(tiny_config(family))
    )
    cfg = model.config
    plan = _plan(model, [1], targets="attn+mlp", alpha=3.0)
    peft_model = lora.apply_lora(model, plan)
    _randomize_lora(peft_model)
    dw_rows = lora.lora_dw_rows(peft_model, plan)
    assert {r["model"] for r in dw_rows} == {"pair"}  # like dw_*: the report's tables read these
    got = {(r["layer"], r["metric"]): r["value"] for r in dw_rows}
    s = 3.0 / plan.rank
    want: dict[str, float] = {}
    if family == "llama":
        block = peft_model.base_model.model.model.layers[1]
        for p in "qkvo":
            want[p] = _fro(_numpy_dw(getattr(block.self_attn, f"{p}_proj"), s))
        for p in ("gate", "up", "down"):
            want[p] = _fro(_numpy_dw(getattr(block.mlp, f"{p}_proj"), s))
        mlp = ("gate", "up", "down")
    elif family == "gpt2":  # fused c_attn: output rows [q | k | v] of n_embd each
        block = peft_model.base_model.model.transformer.h[1]
        d = cfg.n_embd
        qkv = _numpy_dw(block.attn.c_attn, s)
        for i, p in enumerate("qkv"):
            want[p] = _fro(qkv[i * d : (i + 1) * d])
        want["o"] = _fro(_numpy_dw(block.attn.c_proj, s))
        want["fc_in"] = _fro(_numpy_dw(block.mlp.c_fc, s))
        want["fc_out"] = _fro(_numpy_dw(block.mlp.c_proj, s))
        mlp = ("fc_in", "fc_out")
    else:  # phi3: qkv rows [q: H*hd | k: KV*hd | v: KV*hd], gate_up rows [gate | up]
        block = peft_model.base_model.model.model.layers[1]
        hd = cfg.hidden_size // cfg.num_attention_heads
        q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        qkv = _numpy_dw(block.self_attn.qkv_proj, s)
        want["q"] = _fro(qkv[:q_rows])
        want["k"] = _fro(qkv[q_rows : q_rows + kv_rows])
        want["v"] = _fro(qkv[q_rows + kv_rows :])
        want["o"] = _fro(_numpy_dw(block.self_attn.o_proj, s))
        gu = _numpy_dw(block.mlp.gate_up_proj, s)
        want["gate"], want["up"] = _fro(gu[: gu.shape[0] // 2]), _fro(gu[gu.shape[0] // 2 :])
        want["down"] = _fro(_numpy_dw(block.mlp.down_proj, s))
        mlp = ("gate", "up", "down")
    want["attn"] = float(np.sqrt(sum(want[p] ** 2 for p in "qkvo")))
    want["mlp"] = float(np.sqrt(sum(want[p] ** 2 for p in mlp)))
    for key, value in want.items():
        assert got[(1, f"lora_dw_{key}")] == pytest.approx(value, rel=1e-9), key
        assert got[(0, f"lora_dw_{key}")] == 0.0  # no LoRA on layer 0: no change
    assert min(want.values()) > 0


# -- the adapter through plain PEFT -------------------------------------------------------------


def test_saved_adapter_reloads_through_plain_peft_with_identical_logits(
    tiny_pair, tmp_path, monkeypatch
):
    from peft import PeftModel

    base, _ = tiny_pair
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    trained: dict[str, torch.Tensor] = {}
    real = lora.lora_dw_rows

    def capture(model, plan):  # called on the trained model just before it is written
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(input_ids=ids).logits
        return real(model, plan)

    monkeypatch.setattr(lora, "lora_dw_rows", capture)
    out = tune(base, tmp_path / "out", mask="01100")
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(model, out / "adapter").eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert torch.equal(after, trained["logits"])
    assert not torch.allclose(after, before, atol=1e-4)  # the adapter does change the model
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in saved} == {1, 2}


# -- the output folder, the CLI, reuse ----------------------------------------------------------


def test_cli_end_to_end_writes_the_output_contract_and_reuses_a_finished_run(
    tiny_pair, tmp_path, monkeypatch, caplog
):
    from sftlens.models import loading

    base, _ = tiny_pair
    out = tmp_path / "run"
    args = ["tune", str(base), "--mask", "0.4-1", "--data", "synthetic", "--max-examples", "8"]
    args += ["--steps", "2", "--batch-size", "2", "--max-length", "48", "--device", "cpu"]
    args += ["--no-progress", "--out", str(out)]
    with caplog.at_level("INFO", logger="sftlens.tune"):
        assert main(args) == 0
    assert "mask 0.4-1 -> layers 2-4 of 5" in caplog.text
    s = _summary(out)
    assert s.keys() >= SUMMARY_KEYS
    assert s["layers"] == [2, 3, 4] and s["layer_range"] == "2-4"
    assert s["rank_per_layer"] == 13 and s["alpha"] == 26.0  # round(8 * 5 / 3), alpha/r = 2
    assert s["trainable_params"] == 3 * 13 * (
        2 * 32 + 2 * 32 + 2 * (32 + 16)
    )  # q,o 32x32; k,v 16x32
    assert s["steps"] == 2 and s["final_loss"] == _history(out)[-1]["loss"]
    history = _history(out)
    assert [set(h) for h in history] == [{"step", "loss", "tokens", "lr", "seconds"}] * 2
    assert s["train_tokens"] == sum(h["tokens"] for h in history)
    # the rest of the summary: the plan, the budget and the timing of the steps
    steps_s = [h["seconds"] for h in history]
    assert (s["selection"], s["num_layers"], s["mask"]) == ("0.4-1 -> layers 2-4 of 5", 5, "0.4-1")
    assert (s["budget_rank"], s["total_rank"], s["scaling"]) == (40, 39, 2.0)
    assert s["target_modules"] == [f"self_attn.{p}_proj" for p in "qkvo"]
    assert s["seconds"] == pytest.approx(sum(steps_s))
    assert s["step_seconds"] == pytest.approx(sum(steps_s) / 2)
    assert s["step_seconds_median"] == pytest.approx(sum(steps_s) / 2)
    assert s["seconds_this_run"] >= s["seconds"] > 0
    assert (s["world_size"], s["mixed_precision"]) == (1, "no")
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["step"], state["layers"], state["world_size"]) == (2, [2, 3, 4], 1)
    assert state["history"] == history and state["base_model"] == str(base)
    assert state["config"]["mask"] == "0.4-1" and isinstance(state["config_hash"], str)
    rows = _rows(out)
    assert rows[(0, "lora_dw_attn")] == 0.0 and rows[(3, "lora_dw_attn")] > 0
    html = (out / "report.html").read_text()
    # the heading names the layers once escaped (render escapes headings; "-&amp;gt;" is double)
    assert f"<h2>LoRA tuning ({s['mask']} -&gt; layers " in html and "&amp;gt;" not in html
    assert (out / "plots" / "tune_loss.png").is_file()
    assert "<th class=l>total rank (budget)</th><td>39 (40)</td>" in html
    assert not (out / "checkpoint-last").exists()

    def must_not_run(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(loading, "load_model", must_not_run)
    assert main(args) == 0  # same inputs: reused
    assert main([*args[:3], "00111", *args[4:]]) == 0  # the same layers written as a mask
    assert _summary(out)["mask"] == "00111"
    with pytest.raises(AssertionError, match="retrained"):
        main([*args[:3], "01111", *args[4:]])


def test_mask_auto_asks_suggest_and_logs_its_evidence(tiny_pair, tmp_path, monkeypatch, caplog):
    base, _ = tiny_pair
    calls = []

    def suggest_mask(run_dir, num_blocks):
        calls.append((Path(run_dir), num_blocks))
        return types.SimpleNamespace(mask="010", evidence=["block 1: smallest dW", "block 0: x"])

    monkeypatch.setattr("sftlens.tuning.suggest.suggest_mask", suggest_mask)
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    with caplog.at_level("INFO", logger="sftlens.tune"):
        out = tune(base, tmp_path / "out", mask="auto", from_run=str(analysis), blocks=3, steps=1)
    assert calls == [(analysis, 3)]
    assert _summary(out)["layers"] == [1, 2] and _summary(out)["mask"] == "010"
    assert "010 -> layers 1-2 of 5" in caplog.text and "block 1: smallest dW" in caplog.text
    with pytest.raises(SftlensError, match="is not a folder"):
        tune(base, tmp_path / "out2", mask="auto", from_run=str(tmp_path / "nope"))


def test_mask_auto_in_any_case_and_a_missing_from_folder_says_what_to_pass(tmp_path, monkeypatch):
    from sftlens.tuning.tune import select_layers

    evidence = ["block 1: smallest dW"]
    monkeypatch.setattr(
        "sftlens.tuning.suggest.suggest_mask",
        lambda run_dir, num_blocks: types.SimpleNamespace(mask="010", evidence=evidence),
    )
    cfg = TuneConfig(model="m", mask=" AUTO ", from_run=str(tmp_path), blocks=3)
    selection, got = select_layers(cfg, 5)
    assert (selection.layers, got) == ((1, 2), evidence)
    assert select_layers(TuneConfig(model="m", mask="10000"), 5)[1] == []
    with pytest.raises(SftlensError) as info:
        select_layers(TuneConfig(model="m", mask="auto", from_run=str(tmp_path / "no")), 5)
    assert str(info.value) == (
        f"--from {tmp_path / 'no'} is not a folder; pass the run folder of an analysis "
        "(sftlens weights / analyze / demo --out DIR)"
    )


def test_mask_auto_trains_what_the_real_suggest_proposes(tiny_pair, tmp_path):
    from sftlens.tuning.suggest import suggest_mask

    base, sft = tiny_pair
    analysis = api.weights(str(base), str(sft), out=str(tmp_path / "w"), progress=False)
    expected = suggest_mask(analysis, 5)
    out = tune(base, tmp_path / "out", mask="auto", from_run=str(analysis), steps=1)
    assert _summary(out)["mask"] == expected.mask
    assert _summary(out)["layers"] == list(expected.layers)


def test_bad_masks_are_one_line_errors_from_the_cli(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    common = ["tune", str(base), "--data", "synthetic", "--device", "cpu", "--out"]
    assert main([*common, str(tmp_path / "a"), "--mask", "0000"]) == 2
    assert "selects no block" in error_line(capsys.readouterr().err)
    assert main([*common, str(tmp_path / "b"), "--mask", "3,9"]) == 2  # 5 layers
    assert "names layer 9, but the model has layers 0..4" in error_line(capsys.readouterr().err)
    assert main([*common, str(tmp_path / "c"), "--mask", "1111111"]) == 2  # K=7 > L=5
    assert "do not fit" in error_line(capsys.readouterr().err)


# -- resume -------------------------------------------------------------------------------------


def test_resume_after_a_kill_equals_an_uninterrupted_run_and_redoes_no_step(
    tiny_pair, tmp_path, monkeypatch
):
    base, _ = tiny_pair
    kw = dict(mask="01010", steps=4, save_every=1, lora_dropout=0.1)
    fresh = tune(base, tmp_path / "fresh", **kw)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during step 3: steps 1-2 are checkpointed
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tune(base, out, **kw)
    assert json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 2
    calls["n"] = -100
    tune(base, out, **kw)
    assert calls["n"] == -100 + 2  # only steps 3 and 4 ran
    assert [h["step"] for h in _history(out)] == [1, 2, 3, 4]
    for a, b in zip(_history(out), _history(fresh)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]
    wa = load_file(out / "adapter" / "adapter_model.safetensors")
    wb = load_file(fresh / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_a_plan_that_peft_does_not_follow_is_refused(monkeypatch):
    """PEFT adapts whatever its patterns match; a plan it did not follow is a one-line error,
    not a silently different adapter."""
    import dataclasses

    model = _tiny_model()
    plan = _plan(model, [1, 2])
    with pytest.raises(SftlensError) as info:
        lora.apply_lora(model, dataclasses.replace(plan, layers_pattern="h"))
    # the whole message: the plan, then PEFT's own first line (cut at 120 characters)
    assert re.fullmatch(
        r"PEFT found none of self_attn\.q_proj, self_attn\.k_proj, self_attn\.v_proj, "
        r"self_attn\.o_proj in layers \[1, 2\] under 'h' \(Target modules [^\n]{1,105}\); "
        r"report this model type to sftlens",
        str(info.value),
    ), str(info.value)
    real = lora.LoraPlan.lora_config

    def one_layer_only(self):
        config = real(self)
        config.layers_to_transform = [1]
        return config

    monkeypatch.setattr(lora.LoraPlan, "lora_config", one_layer_only)
    with pytest.raises(SftlensError, match="PEFT adapted 4 modules, not the 8 planned"):
        lora.apply_lora(_tiny_model(), plan)


def test_lora_plan_options_and_errors_in_full():
    # --targets: names stripped and each once; --lora-dropout reaches PEFT's modules
    assert _plan(_tiny_model(), [0], targets=" q , v,q").projs == ("q", "v")
    assert _plan(_tiny_model(), [0], targets="mlp").projs == ("gate", "up", "down")
    model = lora.apply_lora(_tiny_model(), _plan(_tiny_model(), [2], lora_dropout=0.25))
    assert model.base_model.model.model.layers[2].self_attn.q_proj.lora_dropout["default"].p == 0.25
    # the budget: every layer active is the baseline rank; no layer or too many is an error
    assert lora.budget_rank(8, 5, 5) == 8 and lora.budget_rank(8, 5, 1) == 40
    for active in (0, 6):
        with pytest.raises(SftlensError) as info:
            lora.budget_rank(8, 5, active)
        assert str(info.value) == f"{active} active layers do not fit a model of 5 layers"
    # a PEFT model that trains more than LoRA
    plan = _plan(_tiny_model(), [1])
    peft_model = lora.apply_lora(_tiny_model(), plan)
    peft_model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(SftlensError) as info:
        lora.check_adapted(peft_model, plan)
    assert str(info.value) == (
        "after PEFT, 1 non-LoRA parameters are trainable (e.g. "
        "['base_model.model.model.norm.weight']); report this model type to sftlens"
    )
    # ... or adapts other modules than planned
    with pytest.raises(SftlensError) as info:
        lora.check_adapted(peft_model, dataclasses.replace(plan, layers=(2,)))
    assert str(info.value) == (
        "PEFT adapted 4 modules, not the 4 planned (missing e.g. [(2, 'self_attn.k_proj'), "
        "(2, 'self_attn.o_proj')], unexpected e.g. [(1, 'self_attn.k_proj'), "
        "(1, 'self_attn.o_proj')]); report this model type to sftlens"
    )


def test_lora_dw_plot_shows_the_full_sft_dw_when_the_folder_has_it(tmp_path, monkeypatch):
    from sftlens.reporting import plots

    seen = {}
    monkeypatch.setattr(plots, "plot_layers", lambda path, curves, **kw: seen.update(curves))
    lora_rows = [
        {"model": "pair", "layer": i, "metric": "lora_dw_attn", "value": v}
        for i, v in enumerate([0.0, 2.0, 4.0])
    ]
    dw_rows = [
        {"model": "pair", "layer": i, "metric": "dw_attn", "value": v}
        for i, v in enumerate([1.0, 5.0, 10.0])
    ]
    plots.plot_tune(lora_rows, [], tmp_path)
    assert seen == {"LoRA attn ||scaling B A|| / max": [0.0, 0.5, 1.0]}
    plots.plot_tune(lora_rows + dw_rows, [], tmp_path)
    assert seen["full SFT dW attn / max"] == [0.1, 0.5, 1.0]


def test_peak_memory_is_this_tunes_own_after_a_reset():
    """A sweep runs tunes one after another in one process: each reports its own peak RSS."""
    from sftlens.tuning.tune import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB touched
    big.add_(1)
    high = peak_memory_mb(cpu)
    del big
    reset_peak_memory()
    low = peak_memory_mb(cpu)
    if Path("/proc/self/clear_refs").exists():
        assert low < high - 200, (low, high)
    else:
        assert low == high


# -- the report section on a hand-made folder ---------------------------------------------------


def test_report_section_in_full_on_a_hand_made_summary(tmp_path):
    """Every row of the tune section names its summary value; the per-layer table reads the
    ``lora_dw_*`` rows of the pair, attention and MLP."""
    from sftlens.tuning import tune as tune_module

    summary = {
        "selection": "01100 -> layers 2-5 of 10",
        "rank_per_layer": 20,
        "total_rank": 80,
        "budget_rank": 80,
        "alpha": 40.0,
        "target_modules": ["self_attn.q_proj", "mlp.up_proj"],
        "trainable_params": 12345,
        "steps": 7,
        "train_tokens": 999,
        "final_loss": 1.25,
        "step_seconds": 0.5,
        "peak_memory_mb": 321.0,
    }
    assert tune_module.report_section(tmp_path, [], summary) is None  # no adapter folder
    (tmp_path / "adapter").mkdir()
    assert tune_module.report_section(tmp_path, [], {"selection": "x"}) is None  # not a tune
    rows = [
        {"model": "pair", "layer": i, "metric": f"lora_dw_{g}", "value": v}
        for i in range(2)
        for g, v in (("attn", 0.5 * i), ("mlp", 2.0 + i))
    ]
    title, body = tune_module.report_section(tmp_path, rows, summary)
    assert title == "LoRA tuning (01100 -> layers 2-5 of 10)"
    assert body == (
        "<p>LoRA (PEFT) on the layers of the mask only, everything else frozen; the loss is on "
        "answer tokens. <code>lora_dw_*</code> is <code>||scaling * B A||_F</code> per layer, "
        "summed over projections like <code>dw_*</code>.</p>"
        '<table class="kv">'
        "<tr><th class=l>mask</th><td>01100 -&gt; layers 2-5 of 10</td></tr>"
        "<tr><th class=l>rank per layer</th><td>20</td></tr>"
        "<tr><th class=l>total rank (budget)</th><td>80 (80)</td></tr>"
        "<tr><th class=l>alpha</th><td>40</td></tr>"
        "<tr><th class=l>target modules</th><td>self_attn.q_proj, mlp.up_proj</td></tr>"
        "<tr><th class=l>trainable parameters</th><td>12345</td></tr>"
        "<tr><th class=l>steps</th><td>7</td></tr>"
        "<tr><th class=l>train tokens</th><td>999</td></tr>"
        "<tr><th class=l>final loss</th><td>1.25</td></tr>"
        "<tr><th class=l>step seconds (mean)</th><td>0.5</td></tr>"
        "<tr><th class=l>peak memory MB</th><td>321</td></tr>"
        "</table>"
        "<table><tr><th>layer</th><th>depth</th><th>lora_dw_attn</th><th>lora_dw_mlp</th></tr>"
        "<tr><td>0</td><td>0.25</td><td>0</td><td>2</td></tr>"
        "<tr><td>1</td><td>0.75</td><td>0.5</td><td>3</td></tr></table>"
    )
    # the plots, when present, come between the table of values and the per-layer table
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "tune_loss.png").write_bytes(b"png")
    _, body = tune_module.report_section(tmp_path, rows, summary)
    assert '</table><img alt="tune_loss.png" src="data:image/png;base64,cG5n"><table>' in body


def test_apply_lora_silences_only_peft_s_future_warnings(monkeypatch):
    """PEFT's FutureWarning about transformers' deprecated attribute is hidden; any other
    warning PEFT gives while wrapping the model still reaches the user."""
    import peft

    real = peft.get_peft_model

    def chatty(*a, **k):
        warnings.warn("deprecated in transformers", FutureWarning, stacklevel=1)
        warnings.warn("PEFT has something to say", UserWarning, stacklevel=1)
        return real(*a, **k)

    monkeypatch.setattr(peft, "get_peft_model", chatty)
    model = _tiny_model()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora.apply_lora(model, _plan(model, [1]))
    said = [(w.category, str(w.message)) for w in seen]
    assert (UserWarning, "PEFT has something to say") in said
    assert not [w for w in said if w[0] is FutureWarning]


def test_run_tune_reads_the_split_limit_and_seed_it_is_given(tiny_pair, tmp_path, monkeypatch):
    """--split (e.g. a folder's dev.jsonl), --max-examples and --seed reach the data loader."""
    import sftlens.data
    from sftlens.tuning.tune import run_tune

    base, _ = tiny_pair
    seen = []

    class Stop(Exception):
        pass

    def resolve_dataset(spec, **kw):
        seen.append((spec, kw))
        raise Stop

    monkeypatch.setattr(sftlens.data, "resolve_dataset", resolve_dataset)
    cfg = TuneConfig(
        model=str(base),
        out=str(tmp_path / "out"),
        data=str(tmp_path),
        split="dev",
        max_examples=5,
        seed=3,
        device="cpu",
    )
    with pytest.raises(Stop):
        run_tune(cfg)
    assert seen == [(str(tmp_path), {"split": "dev", "limit": 5, "seed": 3})]


def test_a_rerun_with_other_options_replaces_the_adapter_despite_a_stale_checkpoint_tmp(
    tiny_pair, tmp_path
):
    """Rerunning tune into a folder that holds an earlier tune's adapter and the half-written
    ``checkpoint-last.tmp`` of a run killed while saving: the new run trains, checkpoints,
    replaces the adapter, and config.json records the new run's options."""
    base, _ = tiny_pair
    out = tune(base, tmp_path / "out", mask="01100", steps=1)
    stale = out / "checkpoint-last.tmp"
    (stale / "adapter").mkdir(parents=True)
    (stale / "adapter" / "adapter_model.safetensors").write_bytes(b"half written")
    tune(base, out, mask="00011", steps=2, save_every=1)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in saved} == {3, 4}
    assert not stale.exists() and not (out / "adapter.tmp").exists()
    assert not (out / "checkpoint-last").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["tune"]["mask"], config["tune"]["steps"], config["tune"]["save_every"]) == (
        "00011",
        2,
        1,
    )
    assert config["tune"]["model"] == str(base) and _history(out)[-1]["step"] == 2
