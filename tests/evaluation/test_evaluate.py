"""``sftlens eval`` end to end on a tiny model folder and hand-written jsonl files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from eval_helpers import loop_scores, problem, write_jsonl
from sftlens.cli import main
from sftlens.data.gsm8k import load_jsonl
from sftlens.data.prompts import few_shot_prefix, format_question, format_target
from sftlens.evaluation import generate as gen_mod
from sftlens.evaluation.evaluate import score_completion, summarize
from sftlens.evaluation.scoring import (
    answers_match,
    extract_flexible,
    extract_strict,
    wilson_interval,
)
from sftlens.evaluation.task import GSM8KTask

METRICS = {"gsm8k_strict", "gsm8k_flexible", "answer_nll", "answer_token_acc"}


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        str(model),
        "--data",
        str(data),
        "--shots",
        "2",
        "--limit",
        "7",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def predictions(run: Path, role: str = "base") -> list[dict]:
    return [json.loads(x) for x in (run / f"predictions_{role}.jsonl").read_text().splitlines()]


def summary(run: Path, role: str = "base") -> dict:
    s = json.loads((run / "summary.json").read_text())["eval"][role]
    s.pop("seconds")
    return s


@pytest.fixture(scope="module")
def clean_run(eval_setup, tmp_path_factory) -> Path:
    model, data = eval_setup
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(args(model, data, out)) == 0
    return out


def test_cli_writes_both_scores_and_teacher_forced_rows(clean_run, eval_setup):
    model_dir, data = eval_setup
    rows = metrics(clean_run)
    assert {r["metric"] for r in rows} == METRICS
    assert all(r["model"] == "base" and r["layer"] == "" for r in rows)
    value = {r["metric"]: float(r["value"]) for r in rows}

    preds = predictions(clean_run)
    assert [p["id"] for p in preds] == list(range(7))  # problem order, whatever the batches were
    tests = load_jsonl(data / "test.jsonl")
    s = summary(clean_run)
    for p, ex in zip(preds, tests):
        assert p["question"] == ex.question and p["gold"] == ex.final_answer
        assert p["strict"] == extract_strict(p["completion"])
        assert p["flexible"] == extract_flexible(p["completion"])
        assert p["strict_correct"] == answers_match(p["strict"], p["gold"])
        assert p["flexible_correct"] == answers_match(p["flexible"], p["gold"])
        assert 1 <= p["new_tokens"] <= 8 and p["stop"] in ("eos", "stop_string", "length")
    for name in ("strict", "flexible"):
        k = sum(p[f"{name}_correct"] for p in preds)
        acc = s[f"gsm8k_{name}"]
        assert (acc["correct"], acc["total"]) == (k, 7)
        assert acc["ci95"] == pytest.approx(list(wilson_interval(k, 7)))
        assert value[f"gsm8k_{name}"] == pytest.approx(k / 7)

    # teacher-forced scores: the gold solution after the same 2-shot prompt, one example at a time
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    shots = few_shot_prefix(load_jsonl(data / "train.jsonl")[:2])
    loops = [
        loop_scores(model, tok, shots + format_question(e.question), format_target(e.answer))
        for e in tests
    ]
    for p, (nll, hits, n) in zip(preds, loops):
        assert p["answer_tokens"] == n and p["answer_correct_tokens"] == hits
        assert p["answer_nll"] == pytest.approx(nll / n, rel=1e-5)
    tokens = sum(n for _, _, n in loops)
    assert value["answer_nll"] == pytest.approx(sum(x[0] for x in loops) / tokens, rel=1e-5)
    assert value["answer_token_acc"] == pytest.approx(sum(x[1] for x in loops) / tokens)

    html = (clean_run / "report.html").read_text()
    assert "GSM8K evaluation" in html and s["gsm8k_strict"]["text"] in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in html and "<b>bold</b>" not in html


def test_summary_counts_strict_and_flexible_separately():
    task = GSM8KTask()
    completions = {
        "so 2 + 3 = 5\n#### 5": True,  # strict and flexible right
        "the answer is 5": False,  # flexible only
        "#### 5 and then 7 more": False,  # strict only
        "#### 4": False,  # both wrong
        "$5.00": False,  # flexible only (compared as numbers)
    }
    records = []
    for i, text in enumerate(completions):
        rec = {
            "id": i,
            "stop": "length",
            "new_tokens": 3,
            **score_completion(text, "5", task.filters),
        }
        records.append(rec)
    assert [r["strict_correct"] for r in records] == [True, False, True, False, False]
    assert [r["flexible_correct"] for r in records] == [True, True, False, False, True]
    s, rows = summarize(records[::-1], task)  # order does not matter
    assert (s["gsm8k_strict"]["correct"], s["gsm8k_flexible"]["correct"]) == (2, 3)
    assert s["gsm8k_strict"]["text"].startswith("2/5 = 40.0% [")
    assert {r["metric"]: r["value"] for r in rows} == {"gsm8k_strict": 0.4, "gsm8k_flexible": 0.6}
    assert s["stops"] == {"length": 5} and s["new_tokens"] == 15


def test_interrupted_eval_resumes_to_the_same_files(clean_run, eval_setup, tmp_path, monkeypatch):
    model, data = eval_setup
    run = tmp_path / "run"
    real, calls = gen_mod.generate_batch, []

    def crash_after_first(*a, **kw):
        if calls:
            raise RuntimeError("planted crash")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gen_mod, "generate_batch", crash_after_first)
    with pytest.raises(RuntimeError, match="planted"):
        main(args(model, data, run))
    assert len(predictions(run)) == 3  # the first batch was written durably
    with open(run / "predictions_base.jsonl", "a") as f:
        f.write('{"id": 6, "completion": "torn')  # a crash in the middle of a write

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    prefixes = []
    real_prefix = gen_mod.PrefixCache.__init__

    def counting_prefix(self, *a, **kw):
        prefixes.append(1)
        real_prefix(self, *a, **kw)

    calls.clear()
    monkeypatch.setattr(gen_mod, "generate_batch", counting)
    monkeypatch.setattr(gen_mod.PrefixCache, "__init__", counting_prefix)
    assert main(args(model, data, run)) == 0
    assert len(calls) == 2  # 7 problems in batches of 3: only the two missing batches ran
    assert len(prefixes) == 1  # one prefix forward, shared by generation and teacher forcing
    for name in ("predictions_base.jsonl", "metrics.csv"):
        assert (run / name).read_bytes() == (clean_run / name).read_bytes(), name
    assert summary(run) == summary(clean_run)

    # a finished run is not evaluated again; a changed task is
    calls.clear()
    assert main(args(model, data, run)) == 0
    assert calls == []
    assert main(args(model, data, run, "--max-new-tokens", "4")) == 0
    assert len(calls) == 3
    assert max(p["new_tokens"] for p in predictions(run)) <= 4


def test_changed_limit_generates_only_the_missing_problems(
    clean_run, eval_setup, tmp_path, monkeypatch
):
    """Records are reused per problem: a larger --limit generates only the new problems, a
    smaller one reuses its subset, a changed problem alone is generated again."""
    model, data = eval_setup
    run = tmp_path / "run"
    assert main(args(model, data, run, "--limit", "3")) == 0
    small = predictions(run)
    real, stored, seen = gen_mod.generate, set(), []

    def only_new(m, items, *a, **kw):
        asked = [i for i, _ in items]
        assert not stored & set(asked), f"stored problems {stored & set(asked)} generated again"
        seen.extend(asked)
        return real(m, items, *a, **kw)

    monkeypatch.setattr(gen_mod, "generate", only_new)
    stored = {0, 1, 2}
    assert main(args(model, data, run)) == 0  # --limit 7
    assert sorted(seen) == [3, 4, 5, 6]
    grown, clean = predictions(run), predictions(clean_run)
    assert grown[:3] == small
    assert [p["id"] for p in grown] == list(range(7))
    for a, b in zip(grown, clean):  # the same as an uninterrupted run of 7
        assert a["completion"] == b["completion"] and a["flexible"] == b["flexible"]
        assert a["answer_nll"] == pytest.approx(b["answer_nll"], rel=1e-5)
    assert summary(run)["gsm8k_flexible"] == summary(clean_run)["gsm8k_flexible"]

    stored, seen[:] = set(range(7)), []
    assert main(args(model, data, run, "--limit", "2")) == 0  # a subset: nothing to generate
    assert seen == [] and predictions(run) == grown[:2]
    assert summary(run)["problems"] == 2
    assert {r["metric"]: float(r["value"]) for r in metrics(run)}["gsm8k_flexible"] == (
        pytest.approx(sum(p["flexible_correct"] for p in grown[:2]) / 2)
    )

    # another problem at index 1 (same limit): only that one is generated again
    other = tmp_path / "data"
    shutil.copytree(data, other)
    tests = [json.loads(x) for x in (other / "test.jsonl").read_text().splitlines()]
    tests[1] = problem(9, 9)
    write_jsonl(other / "test.jsonl", tests)
    stored = {0}
    assert main(args(model, other, run, "--limit", "2")) == 0
    assert seen == [1]
    assert (
        predictions(run)[0] == grown[0] and predictions(run)[1]["question"] == tests[1]["question"]
    )


def save_adapter(model_dir: Path, out: Path, zero_b: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=zero_b
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


def test_adapter_with_zero_b_changes_nothing_and_a_trained_one_does(
    clean_run, eval_setup, tmp_path
):
    model, data = eval_setup
    run = tmp_path / "run"
    shutil.copytree(clean_run, run)  # base already evaluated: add the adapted model as 'sft'
    zero = save_adapter(model, tmp_path / "zero", zero_b=True)
    assert main(args(model, data, run, "--adapter", str(zero), "--role", "sft")) == 0
    base, sft = predictions(run, "base"), predictions(run, "sft")
    assert [p["completion"] for p in sft] == [p["completion"] for p in base]
    assert [p["answer_nll"] for p in sft] == pytest.approx([p["answer_nll"] for p in base])
    rows = metrics(run)
    assert {(r["model"], r["metric"]) for r in rows} == {
        (m, k) for m in ("base", "sft") for k in METRICS
    }
    html = (run / "report.html").read_text()
    assert "<h3>base</h3>" in html and "<h3>sft</h3>" in html

    nonzero = save_adapter(model, tmp_path / "nonzero", zero_b=False)
    other = tmp_path / "other"
    assert main(args(model, data, other, "--adapter", str(nonzero))) == 0
    changed = predictions(other)
    assert any(a["completion"] != b["completion"] for a, b in zip(changed, base))
    assert all(a["answer_nll"] != pytest.approx(b["answer_nll"]) for a, b in zip(changed, base))


def test_zero_shot_on_a_single_file_without_teacher_forcing_through_the_api(eval_setup, tmp_path):
    import sftlens

    model, data = eval_setup
    out = sftlens.evaluate(
        str(model),
        data=str(data / "test.jsonl"),
        shots=0,
        limit=2,
        max_new_tokens=3,
        teacher_forced=False,
        out=str(tmp_path / "run"),
        progress=False,
    )
    assert out == tmp_path / "run"
    assert {r["metric"] for r in metrics(out)} == {"gsm8k_strict", "gsm8k_flexible"}
    assert len(predictions(out)) == 2 and "answer_nll" not in predictions(out)[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "5"], "--shots 5 needs 5 exemplars but"),
        (["--adapter", "{tmp}/missing"], "adapter folder"),
        (["--adapter", "{tmp}"], "has no adapter_config.json"),
        (["--data", "{data}/test.jsonl"], "is a single file"),
        (["--max-new-tokens", "300"], "exceeds the model's context of 256 tokens"),
        (["--role", "pair"], "--role must be 'base' or 'sft'"),
        (["--chat"], "no chat template; drop --chat"),
        (["--split", "dev"], "has no dev.jsonl"),
    ],
)
def test_bad_input_is_one_line_error(eval_setup, tmp_path, capsys, extra, message):
    model, data = eval_setup
    extra = [x.format(tmp=tmp_path, data=data) for x in extra]
    assert main(args(model, data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1


def test_shots_are_the_first_problems_of_the_train_split(eval_setup, tmp_path):
    model, _ = eval_setup
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", [problem(9, 9), problem(8, 8), problem(7, 7)])
    write_jsonl(folder / "test.jsonl", [problem(1, 1)])
    out = tmp_path / "run"
    assert main(args(model, folder, out, "--limit", "1", "--max-new-tokens", "1")) == 0
    cfg = json.loads((out / "config.json").read_text())
    inputs = cfg["steps"]["eval_base"]["inputs"]
    assert inputs["task"]["shots"] == 2 and inputs["task"]["fewshot_order"] == "first"
    # swapping the first two exemplars changes the prompt, so the step recomputes
    write_jsonl(folder / "train.jsonl", [problem(8, 8), problem(9, 9), problem(7, 7)])
    assert main(args(model, folder, out, "--limit", "1", "--max-new-tokens", "1")) == 0
    again = json.loads((out / "config.json").read_text())["steps"]["eval_base"]["inputs"]
    assert again["exemplars"] != inputs["exemplars"] and again["prompt_ids"] != inputs["prompt_ids"]
