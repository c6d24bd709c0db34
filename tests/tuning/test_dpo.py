"""``sftlens dpo``: the pair builder never rejects a right answer; DPO end to end on a tiny model
with the GSM8K fixture (LoRA on a mask changes only those layers, ``--full`` changes weights, a
rerun reuses everything, interrupted sampling resumes); the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.data.gsm8k import Example
from sftlens.errors import SftlensError
from sftlens.models.checkpoint import list_checkpoints
from sftlens.tuning.preference import build_pairs, make_pair, score_sample

GOLD = Example("How much?", "It costs 1,000 + 234 = <<1000+234=1234>>1234 dollars.\n#### 1,234")
RIGHT = [  # right under strict or flexible scoring: never a rejected answer
    " #### 1,234",
    " #### 1234",
    " #### 1234.",
    " #### 17\nso it is $1,234.00",  # strict wrong, flexible right
    " the answer is 1234",  # no ####: flexible right
    " #### 1,234\nQuestion 5",  # strict right, flexible wrong
    " $1234.0 \n\n",
]
WRONG = [" #### 1,243", " I do not know", " #### 12 34", " 1234 - 1 = 1233"]


def test_score_sample_verdicts():
    for text in RIGHT:
        assert not score_sample(text.rstrip(), GOLD.final_answer)["wrong"], text
    for text in WRONG:
        v = score_sample(text, GOLD.final_answer)
        assert v["wrong"] and not v["strict_correct"] and not v["flexible_correct"], text
    assert score_sample("#### 18", "$18.00")["strict_correct"]


def test_pairs_reject_only_wrong_answers_and_choose_the_gold_solution():
    pair = make_pair(7, GOLD, "Question: How much?\nAnswer:", [*RIGHT, WRONG[0] + " \n", *WRONG])
    assert pair is not None
    assert pair["id"] == 7 and pair["prompt"] == "Question: How much?\nAnswer:"
    assert pair["chosen"] == " " + GOLD.answer  # the gold worked answer, as sft's target
    assert pair["rejected"] == " #### 1,243" and pair["sample"] == len(RIGHT)
    assert pair["rejected_strict"] == "1,243" and pair["rejected_flexible"] == "1,243"
    assert pair["rejected_strict_correct"] is False and pair["rejected_flexible_correct"] is False
    assert pair["wrong_samples"] == 1 + len(WRONG) and pair["samples"] == len(RIGHT) + 5
    assert make_pair(0, GOLD, "p", RIGHT) is None

    examples = [GOLD, Example("2 + 2?", "#### 4"), GOLD]
    records = [
        {"id": 2, "samples": [{"completion": c} for c in (" #### 1,234", " #### 9")]},
        {"id": 1, "samples": [{"completion": c} for c in (" 4", " it is 4.")]},  # all right
        {"id": 0, "samples": [{"completion": c} for c in WRONG]},
    ]
    pairs, skipped = build_pairs(examples, ["p0", "p1", "p2"], records)
    assert skipped == 1
    assert [(p["id"], p["prompt"], p["rejected"]) for p in pairs] == [
        (0, "p0", WRONG[0]),
        (2, "p2", " #### 9"),
    ]
    for p in pairs:
        assert score_sample(p["rejected"], p["gold"])["wrong"]


# -- end to end ----------------------------------------------------------------------------


def dpo(model, out, gsm8k_dir, **kw) -> Path:
    opts = dict(
        out=str(out),
        data=str(gsm8k_dir),
        max_examples=3,
        samples_per_problem=2,
        max_new_tokens=6,
        sample_batch_size=4,
        steps=2,
        batch_size=2,
        lr=5e-2,
        warmup_ratio=0.0,
        max_length=160,
        device="cpu",
        progress=False,
    )
    opts.update(kw)
    return api.dpo(str(model), **opts)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_dpo_changes_only_the_masked_layers_and_a_rerun_reuses_it(
    tiny_pair, gsm8k_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    base = tiny_pair[0]
    out = dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", save_every=1)

    # a loadable model folder; only q/k/v/o of layers 1 and 2 (blocks 2 and 3 of 5) moved
    AutoModelForCausalLM.from_pretrained(out)
    before, after = _weights(base), _weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    want = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 2) for p in "qkvo"}
    assert changed == want
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["method"] == "lora" and state["layers"] == [1, 2]
    assert [h["step"] for h in state["history"] if "loss" in h] == [1, 2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(state["history"][0])
    assert [step for step, _ in list_checkpoints(out)] == [1]  # --save-every 1, not the last
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")

    # pairs: the prompt as sft trains it, the gold solution chosen, a wrong sample rejected
    train = _jsonl(gsm8k_dir / "train.jsonl")
    pairs = _jsonl(out / "pairs.jsonl")
    samples = _jsonl(out / "samples.jsonl")
    assert [r["id"] for r in samples] == [0, 1, 2] and all(len(r["samples"]) == 2 for r in samples)
    assert pairs and state["pairs"] == len(pairs) == 3 - state["skipped_problems"]
    for p in pairs:
        q = train[p["id"]]
        assert p["prompt"] == f"Question: {q['question']}\nAnswer:"
        assert p["chosen"] == " " + q["answer"]
        assert not p["rejected_strict_correct"] and not p["rejected_flexible_correct"]

    # same inputs: neither sampling nor training runs again
    def boom(*a, **k):
        raise AssertionError("called on a rerun with the same inputs")

    monkeypatch.setattr("sftlens.evaluation.generate.generate", boom)
    monkeypatch.setattr("trl.DPOTrainer", boom)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", save_every=1) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # interrupted sampling resumes: only the lost problem is sampled again, to the same answers
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:2]))
    from sftlens.evaluation import generate as gen_mod

    real, seen = gen_mod.generate, []

    def counting(model, items, *a, **k):
        seen.extend(key for key, _ in items)
        return real(model, items, *a, **k)

    monkeypatch.setattr(gen_mod, "generate", counting)
    monkeypatch.setattr("trl.DPOTrainer", boom)  # same samples, so the same pairs: no training
    dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", save_every=1)
    assert seen == [(2, 0), (2, 1)]
    assert _jsonl(out / "samples.jsonl") == samples


def test_full_dpo_changes_weights_outside_any_mask(tiny_pair, gsm8k_dir, tmp_path):
    base = tiny_pair[0]
    out = dpo(base, tmp_path / "full", gsm8k_dir, full=True, max_examples=2, steps=1)
    before, after = _weights(base), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(k.startswith("model.layers.0.") for k in changed)
    assert json.loads((out / "trainer_state.json").read_text())["method"] == "full"


def test_no_wrong_sample_is_a_one_line_error(tiny_pair, gsm8k_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sftlens.tuning.preference.make_pair", lambda *a: None)
    with pytest.raises(SftlensError, match="raise --samples-per-problem or --temperature"):
        dpo(tiny_pair[0], tmp_path / "none", gsm8k_dir, max_examples=1)
    args = ["dpo", str(tiny_pair[0]), "--data", str(gsm8k_dir), "--pairs", "1"]
    args += ["--samples-per-problem", "1", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "none"), "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: none of the 1 problems got a wrong answer among 1 samples")
    assert main([*args, "--mask", "00000011", "--out", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "K=8 depth blocks do not fit a model of 5 layers" in error_line(capsys.readouterr().err)
