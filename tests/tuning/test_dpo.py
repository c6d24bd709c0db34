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
    assert set(pair) == {  # the rejected sample's verdicts, not its "wrong" (always true)
        *("id", "prompt", "chosen", "rejected", "gold", "sample", "wrong_samples", "samples"),
        *("rejected_strict", "rejected_flexible"),
        *("rejected_strict_correct", "rejected_flexible_correct"),
    }
    assert make_pair(0, GOLD, "p", RIGHT) is None

    examples = [GOLD, Example("2 + 2?", "#### 4"), GOLD, GOLD]
    records = [
        {"id": 2, "samples": [{"completion": c} for c in (" #### 1,234", " #### 9")]},
        {"id": 1, "samples": [{"completion": c} for c in (" 4", " it is 4.")]},  # all right
        {"id": 0, "samples": [{"completion": c} for c in WRONG]},
        {"id": 3, "samples": [{"completion": c} for c in RIGHT]},  # all right
    ]
    pairs, skipped = build_pairs(examples, ["p0", "p1", "p2", "p3"], records)
    assert skipped == 2
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
    import time

    from transformers import AutoModelForCausalLM

    base = tiny_pair[0]
    t0 = time.perf_counter()
    out = dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", save_every=1)
    elapsed = time.perf_counter() - t0

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
    assert state["base_model"] == str(base) and state["problems"] == 3
    assert set(state["lora"]) == {"rank", "alpha", "target_modules"}
    assert state["lora"]["rank"] >= 1 and state["lora"]["alpha"] > 0
    assert sorted(state["lora"]["target_modules"]) == [f"self_attn.{p}_proj" for p in "koqv"]
    assert json.loads((out / "sftlens_dpo.json").read_text())["mask"] == "01100"
    assert not (out / ".trl").exists()
    # timings: each within the run's own wall time; per sampled token = sampling / tokens
    assert 0 < state["step_seconds"] <= state["seconds_this_run"] <= elapsed
    assert 0 < state["sampling_seconds"] <= elapsed and "peak_memory_mb" in state
    assert state["seconds_per_sampled_token"] == pytest.approx(
        state["sampling_seconds"] / state["sampled_tokens"]
    )
    # a checkpoint's state: its step, the history logged so far, the run's hash
    ckpt = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert ckpt["step"] == 1 and ckpt["config_hash"] == state["config_hash"]
    assert ckpt["history"] == state["history"][: len(ckpt["history"])]
    assert [step for step, _ in list_checkpoints(out)] == [1]  # --save-every 1, not the last
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    # TRL turns the KV cache off to train; the saved models get MODEL's setting back
    use_cache = json.loads((base / "config.json").read_text())["use_cache"]
    for folder in (out, out / "checkpoint-1"):
        assert json.loads((folder / "config.json").read_text())["use_cache"] is use_cache is True

    # pairs: the prompt as sft trains it, the gold solution chosen, a wrong sample rejected
    train = _jsonl(gsm8k_dir / "train.jsonl")
    pairs = _jsonl(out / "pairs.jsonl")
    samples = _jsonl(out / "samples.jsonl")
    assert [r["id"] for r in samples] == [0, 1, 2] and all(len(r["samples"]) == 2 for r in samples)
    assert state["sampled_tokens"] == sum(s["new_tokens"] for r in samples for s in r["samples"])
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
    same = dict(mask="01100", save_every=1, sample_batch_size=3)  # batch size: not hashed
    assert dpo(base, tmp_path / "dpo", gsm8k_dir, **same) == out
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

    # what decides the weights trains again: other layers, other pairs
    class Trained(Exception):
        pass

    def trains(*a, **k):
        raise Trained

    monkeypatch.setattr("trl.DPOTrainer", trains)
    with pytest.raises(Trained):  # layers 2 and 3
        dpo(base, tmp_path / "dpo", gsm8k_dir, mask="00110", save_every=1)
    edited = [dict(r) for r in samples]
    edited[0]["samples"] = [{**s, "completion": " #### 999999"} for s in samples[0]["samples"]]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(Trained):  # the stored samples are reused: other rejected answers
        dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", save_every=1)
    monkeypatch.undo()

    # another option trains again, on the stored samples: nothing sampled this run
    dpo(base, tmp_path / "dpo", gsm8k_dir, mask="01100", lr=1e-2)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 1e-2 and state["step"] == 2
    assert state["sampled_tokens"] == 0 and state["sampling_seconds"] == 0.0
    assert state["seconds_per_sampled_token"] is None


def test_full_dpo_changes_weights_outside_any_mask(tiny_pair, gsm8k_dir, tmp_path, monkeypatch):
    import transformers
    import trl

    from sftlens.models import loading
    from sftlens.tuning import sft as sft_module

    real_load, loads = loading.load_model, []

    def load(spec, **kw):
        loads.append(kw)
        return real_load(spec, **kw)

    seen: dict = {}
    bars = transformers.utils.logging.is_progress_bar_enabled

    class Recording(trl.DPOTrainer):
        def __init__(self, **kw):
            seen.update(kw)
            super().__init__(**kw)

        def train(self, *args, **kw):
            seen["bars while training"] = bars()
            return super().train(*args, **kw)

    def save(model, tok, folder, state, **kw):
        seen.setdefault("bars while saving", []).append(bars())
        return real_save(model, tok, folder, state, **kw)

    real_save = sft_module._save
    monkeypatch.setattr(loading, "load_model", load)
    monkeypatch.setattr(trl, "DPOTrainer", Recording)
    monkeypatch.setattr(sft_module, "_save", save)
    transformers.utils.logging.enable_progress_bar()
    base = tiny_pair[0]
    # with --progress, transformers' own bars (training, writing shards) stay on
    out = dpo(base, tmp_path / "full", gsm8k_dir, full=True, max_examples=2, steps=1, progress=True)
    assert seen["bars while training"] is True and seen["bars while saving"] == [True]
    before, after = _weights(base), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(k.startswith("model.layers.0.") for k in changed)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["method"] == "full" and state["layers"] is None and state["lora"] is None
    # the sampler, the policy and the frozen reference: each MODEL at --dtype on --device
    assert loads == [{"dtype": "float32", "device": "cpu"}] * 3
    ref = seen["ref_model"]
    assert ref is not None and ref is not seen["model"]
    assert not any(p.requires_grad for p in ref.parameters())
    assert seen["processing_class"] is not None and seen["args"].use_cpu


def test_the_problems_come_from_the_split_and_seed_asked_for(tiny_pair, tmp_path, monkeypatch):
    from sftlens.data import resolve_dataset

    def questions(split, seed):
        return [e.question for e in resolve_dataset("synthetic", split=split, limit=2, seed=seed)]

    monkeypatch.setattr("sftlens.tuning.preference.make_pair", lambda *a: None)  # no training
    with pytest.raises(SftlensError, match="^none of the 2 problems got a wrong answer"):
        dpo(tiny_pair[0], tmp_path / "dev", "synthetic", max_examples=2, split="dev", seed=5)
    sampled = [r["question"] for r in _jsonl(tmp_path / "dev" / "samples.jsonl")]
    assert sampled == questions("dev", 5)
    assert sampled != questions("train", 5) and sampled != questions("dev", 0)


def sample_only(model, out, gsm8k_dir, **kw) -> list[dict]:
    """A dpo run that stops after sampling (with make_pair patched to find no pair): the
    samples it left."""
    with pytest.raises(SftlensError, match="^none of the"):
        dpo(model, out, gsm8k_dir, **kw)
    return _jsonl(out / "samples.jsonl")


def test_samples_are_drawn_again_when_the_model_dtype_or_sampling_changes(
    tiny_pair, gsm8k_dir, tmp_path, monkeypatch
):
    import shutil

    from sftlens.evaluation import generate as gen_mod

    monkeypatch.setattr("sftlens.tuning.preference.make_pair", lambda *a: None)
    real, runs = gen_mod.generate, []

    def counting(*a, **k):
        runs.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gen_mod, "generate", counting)
    model = shutil.copytree(tiny_pair[0], tmp_path / "model")
    out, opts = tmp_path / "out", dict(max_examples=2, dtype="float32", seed=1)
    first = sample_only(model, out, gsm8k_dir, **opts)
    assert sample_only(model, out, gsm8k_dir, **opts) == first and len(runs) == 1  # reused
    assert sample_only(model, out, gsm8k_dir, **opts, sample_batch_size=1) == first
    assert len(runs) == 1
    other = sample_only(model, out, gsm8k_dir, **{**opts, "seed": 2})
    assert len(runs) == 2 and other != first  # the seed draws other samples
    for change in (dict(temperature=0.5), dict(dtype="bfloat16"), {}):
        sample_only(model, out, gsm8k_dir, **{**opts, **change})
    assert len(runs) == 5
    shutil.copy(tiny_pair[1] / "model.safetensors", model / "model.safetensors")
    sample_only(model, out, gsm8k_dir, **opts)  # other weights at the same path
    assert len(runs) == 6


def test_sample_batch_size_and_progress_reach_the_sampler(
    tiny_pair, gsm8k_dir, tmp_path, monkeypatch, capsys
):
    import re

    from eval_helpers import record_generated_batches

    monkeypatch.setattr("sftlens.tuning.preference.make_pair", lambda *a: None)
    batches = record_generated_batches(monkeypatch)
    opts = dict(max_examples=3, samples_per_problem=2, sample_batch_size=4)
    sample_only(tiny_pair[0], tmp_path / "a", gsm8k_dir, **opts, progress=True)
    assert [len(b) for b in batches] == [4, 2]
    assert re.search(r"dpo samples: .*\| ?3/3 ", capsys.readouterr().err)
    sample_only(tiny_pair[0], tmp_path / "b", gsm8k_dir, **opts, progress=False)
    assert "dpo samples" not in capsys.readouterr().err


def test_chat_format_prompts_and_stops_as_sft_trains_and_eval_answers(
    tiny_pair, gsm8k_dir, tmp_path, monkeypatch
):
    import shutil

    from transformers import AutoTokenizer

    from sftlens.evaluation.task import GSM8KTask
    from sftlens.tuning import dpo as dpo_mod

    chat = shutil.copytree(tiny_pair[0], tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <end>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tok.save_pretrained(chat)
    real, jobs, prompts = dpo_mod.collect_samples, [], []

    def keeping(out, job, *a, **k):
        jobs.append(job)
        return real(out, job, *a, **k)

    monkeypatch.setattr(dpo_mod, "collect_samples", keeping)
    monkeypatch.setattr("sftlens.tuning.preference.make_pair", lambda i, e, p, c: prompts.append(p))
    sample_only(chat, tmp_path / "out", gsm8k_dir, max_examples=1, prompt_format="chat")
    question = _jsonl(gsm8k_dir / "train.jsonl")[0]["question"]
    want = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert prompts == jobs[0].prompts == [want]
    stops = GSM8KTask(prompt_format="chat").resolved_stops(tok)
    assert "<end>" in stops[0] and (jobs[0].stop_strings, jobs[0].stop_ids) == stops


def test_a_prompt_too_long_for_the_model_is_a_one_line_error(tiny_pair, gsm8k_dir, tmp_path):
    with pytest.raises(
        SftlensError,
        match=r"^the longest prompt \(\d+ tokens\) plus --max-new-tokens 300 exceeds the model's "
        r"context of 256 tokens; lower --max-new-tokens$",
    ):
        dpo(tiny_pair[0], tmp_path / "long", gsm8k_dir, max_examples=1, max_new_tokens=300)


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


# -- the pieces of a run (no training) -----------------------------------------------------


def test_trl_gets_every_option_and_no_reports_hub_saves_or_mixed_precision(tmp_path):
    from dataclasses import replace

    from trl import DPOConfig as TrlDPOConfig

    from sftlens.config import DpoConfig
    from sftlens.tuning.dpo import _trl_args

    cfg = DpoConfig(
        model="m",
        batch_size=3,
        grad_accum=5,
        lr=1e-3,
        steps=7,
        warmup_ratio=0.25,
        weight_decay=0.03,
        max_grad_norm=0.7,
        beta=0.3,
        max_length=99,
        seed=11,
        progress=False,
    )
    # what sftlens hands TRL: every option, and explicit offs (TRL's and transformers' defaults
    # differ between versions: bf16 on, gradient checkpointing on, report_to "all" in 4.x)
    assert _trl_args(dict, cfg, tmp_path, "cpu") == dict(
        output_dir=str(tmp_path / ".trl"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=5,
        learning_rate=1e-3,
        max_steps=7,
        lr_scheduler_type="cosine",
        warmup_steps=0.25,
        weight_decay=0.03,
        max_grad_norm=0.7,
        beta=0.3,
        max_length=99,
        seed=11,
        data_seed=11,
        report_to=[],
        push_to_hub=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_level="warning",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    shown = _trl_args(dict, replace(cfg, progress=True, max_grad_norm=0.0), tmp_path, "cuda")
    assert shown["disable_tqdm"] is False and shown["use_cpu"] is False
    assert shown["max_grad_norm"] is None  # --max-grad-norm 0: no clipping
    # and TRL takes them as they are
    args = _trl_args(TrlDPOConfig, cfg, tmp_path, "cpu")
    assert (args.learning_rate, args.beta, args.max_length, args.max_grad_norm) == (
        1e-3,
        0.3,
        99,
        0.7,
    )
    assert args.lr_scheduler_type == "cosine" and args.save_strategy == "no"
    assert not (args.bf16 or args.fp16 or args.gradient_checkpointing or args.report_to)


def test_step_timer_times_each_step_and_snapshots_every_n_steps_before_the_last(monkeypatch):
    from types import SimpleNamespace

    from sftlens.tuning import dpo as dpo_mod

    clock = iter([10.0, 10.5, 20.0, 21.25, 30.0, 30.125, 40.0, 42.0, 50.0, 50.5])
    monkeypatch.setattr(dpo_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    timer, saved = dpo_mod._StepTimer(), []
    timer.every, timer.max_steps, timer.snapshot = 2, 4, saved.append
    for step in range(1, 6):
        timer.on_step_begin(None, SimpleNamespace(global_step=step - 1), None)
        timer.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert timer.seconds == [0.5, 1.25, 0.125, 2.0, 0.5]
    assert saved == [2]  # step 4 is the last: the final save covers it


def test_dpo_under_torchrun_is_a_one_line_error(monkeypatch, tmp_path):
    from sftlens.config import DpoConfig
    from sftlens.tuning.dpo import run_dpo

    monkeypatch.setattr("sftlens.tuning.dpo.world_size", lambda: 2)
    with pytest.raises(
        SftlensError,
        match=r"^dpo runs in one process \(TRL places it on one device\); "
        r"launch it without torchrun$",
    ):
        run_dpo(DpoConfig(model=str(tmp_path / "no-model"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_dpo_without_trl_is_a_one_line_error(monkeypatch, tmp_path):
    import sys

    from sftlens.config import DpoConfig
    from sftlens.tuning.dpo import _make_trainer, _StepTimer

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(
        SftlensError,
        match=r"^sftlens dpo needs TRL \(trl is missing\); pip install 'sftlens\[dpo\]'$",
    ):
        _make_trainer(
            DpoConfig(model="m"), tmp_path, None, None, None, [], None, "cpu", _StepTimer()
        )


@pytest.mark.parametrize("progress", [True, False])
def test_trl_gets_the_pairs_the_reference_and_the_tokenizer(monkeypatch, tmp_path, progress):
    """_make_trainer with TRL's classes recorded: what reaches DPOTrainer, which bars show
    while it tokenizes, and that only FutureWarnings (renamed options) are silenced."""
    import warnings

    import datasets
    from transformers import PrinterCallback

    from sftlens.config import DpoConfig
    from sftlens.tuning.dpo import _make_trainer, _StepTimer

    class Args:
        def __init__(self, **kw):
            self.kw = kw
            warnings.warn("an option was renamed", FutureWarning, stacklevel=2)
            warnings.warn("a note about the args", UserWarning, stacklevel=2)

    class Trainer:
        def __init__(self, **kw):
            self.kw, self.model, self.removed = kw, kw["model"], []
            self.bars = datasets.is_progress_bar_enabled()
            warnings.warn("is_gradient_checkpointing is deprecated", FutureWarning, stacklevel=2)
            warnings.warn("a note about the trainer", UserWarning, stacklevel=2)

        def remove_callback(self, cb):
            self.removed.append(cb)

    monkeypatch.setattr("trl.DPOConfig", Args)
    monkeypatch.setattr("trl.DPOTrainer", Trainer)
    datasets.enable_progress_bars()
    cfg = DpoConfig(model="m", full=True, steps=6, save_every=4, progress=progress)
    model, ref, tok = object(), object(), object()
    pairs = [
        {"id": 3, "prompt": "Q", "chosen": " right", "rejected": " wrong", "gold": "1", "sample": 0}
    ]
    timer = _StepTimer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = _make_trainer(cfg, tmp_path, model, ref, tok, pairs, None, "cpu", timer)
    assert sorted(str(w.message) for w in seen) == [
        "a note about the args",
        "a note about the trainer",
    ]
    kw = trainer.kw
    assert kw["model"] is model and kw["ref_model"] is ref and kw["processing_class"] is tok
    assert kw["peft_config"] is None
    assert kw["args"].kw["use_cpu"] is True and kw["args"].kw["max_steps"] == 6
    assert kw["train_dataset"].to_list() == [
        {"prompt": "Q", "chosen": " right", "rejected": " wrong"}
    ]
    assert trainer.bars is progress and datasets.is_progress_bar_enabled()
    assert trainer.removed == [PrinterCallback]
    assert (timer.every, timer.max_steps) == (4, 6)
