"""``sftlens probe``: the streamed pass against a naive per-problem computation, padding
invariance, the tuned lens on held-out problems, and the command end to end with resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

import sftlens
from sftlens.cli import main
from sftlens.experiments import probe as P
from sftlens.experiments.lens import LogitLens, TunedLens, Unembed, fit_tuned_lens
from sftlens.models.loading import load_model
from sftlens.tuning.sft import encode_example
from tiny_models import perturb, save_model, tiny_llama_config

# hand-written problems in the tiny tokenizer's words (never GSM8K text)
PROBLEMS = [
    ("how many is 2 + 3 ?", "2 + 3 = 5 . #### 5"),
    ("a is 4 and the 6 . how many ?", "4 * 6 = 24 . 24 - 1 = 23 . #### 23"),
    ("7 of 8 ?", "#### 56"),
    ("how many is 9 - 2 and 3 ?", "9 - 2 = 7 , 7 + 3 = 10 . the is 10 . #### 10"),
    ("the 1 , 2 , 3 ?", "1 + 2 + 3 = 6 #### 6"),
    ("how many of the 5 ?", "5 * 5 = 25 . 25 / 5 = 5 . #### 5"),
    ("a 8 is 2 ?", "8 / 2 = 4 #### 4"),
]
TRAIN = [
    ("how many is 1 + 1 ?", "1 + 1 = 2 #### 2"),
    ("the 3 and 4 ?", "3 + 4 = 7 . #### 7"),
    ("a is 6 of 2 ?", "6 * 2 = 12 . 12 - 2 = 10 #### 10"),
    ("how many 9 ?", "9 / 3 = 3 #### 3"),
    ("the 8 - 5 ?", "8 - 5 = 3 . the is 3 . #### 3"),
    ("how many is 7 + 2 and 1 ?", "7 + 2 = 9 , 9 + 1 = 10 #### 10"),
]


def _qa(pairs):
    return [(f"Question: {q}\nAnswer:", " " + a) for q, a in pairs]


def _jsonl(path: Path, pairs) -> None:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))


@pytest.fixture(scope="module")
def peaked_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 5-layer Llama with large weights (peaked, far-from-uniform distributions, so top-1
    ties cannot occur) and its SFT twin with layers 3 and 4 perturbed."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peaked")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(initializer_range=0.2))
    base = save_model(model, root / "base")
    perturb(model, {3: 0.2, 4: 0.3})
    return base, save_model(model, root / "sft")


@pytest.fixture(scope="module")
def loaded(peaked_pair):
    (base, tok), (sft, _) = (load_model(p, device="cpu") for p in peaked_pair)
    return base, sft, tok


def _rows(sums: dict[str, P.ProbeSums]) -> dict[tuple[str, int, str], float]:
    return {
        (r["model"], r["layer"], r["metric"]): r["value"]
        for name, s in sums.items()
        for r in s.rows(P.PREFIX[name])
    }


def _pass(loaded, enc, *, padding_side="right", batch_size=3, chunk=5, lenses=None):
    base, sft, tok = loaded
    lenses = lenses or {"logit": (LogitLens(Unembed(base)), LogitLens(Unembed(sft)))}
    return P.probe_pass(
        base,
        sft,
        lenses,
        P.batches(enc, batch_size=batch_size, pad_id=tok.pad_token_id, padding_side=padding_side),
        num_layers=5,
        chunk=chunk,
    )


def _naive(loaded, pairs, max_length=64) -> dict[tuple[str, int, str], float]:
    """One problem at a time, no padding, HF's own hidden_states and logits, then every
    metric at once in float64 numpy over all answer positions."""
    base, sft, tok = loaded
    logps: dict[str, list[list[np.ndarray]]] = {
        "base": [[] for _ in range(6)],
        "sft": [[] for _ in range(6)],
    }
    golds = []
    with torch.no_grad():
        for prompt, target in pairs:
            ids, labels = encode_example(tok, prompt, target, max_length)
            pos = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
            golds += [ids[t + 1] for t in pos]
            for name, model in (("base", base), ("sft", sft)):
                out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                head, norm = model.lm_head, model.model.norm
                for layer in range(-1, 5):  # hidden_states[l + 1] is raw except the last
                    logits = (
                        out.logits[0, pos]
                        if layer == 4
                        else head(norm(out.hidden_states[layer + 1][0, pos]))
                    )
                    logps[name][layer + 1].append(log_softmax(logits.double().numpy(), -1))
    gold = np.array(golds)
    ref: dict[tuple[str, int, str], float] = {}
    for layer in range(-1, 5):
        tops = {}
        for name in ("base", "sft"):
            lp = np.concatenate(logps[name][layer + 1])
            final = np.concatenate(logps[name][5])
            tops[name] = lp.argmax(-1)
            ref[(name, layer, "probe_acc")] = float((tops[name] == gold).mean())
            ref[(name, layer, "probe_logprob")] = float(lp[np.arange(len(gold)), gold].mean())
            ref[(name, layer, "probe_kl")] = float((np.exp(final) * (final - lp)).sum(-1).mean())
        ref[("pair", layer, "probe_agreement")] = float((tops["base"] == tops["sft"]).mean())
    return ref


def test_streamed_pass_equals_naive_computation(loaded):
    pairs = _qa(PROBLEMS)
    enc = P.encode(loaded[2], pairs, 64)
    # batches of 3 with chunks of 5 positions: many chunks per batch, batches of mixed lengths
    got, ref = _rows(_pass(loaded, enc)), _naive(loaded, pairs)
    assert set(got) == set(ref) and len(ref) == 6 * 7
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for model in ("base", "sft"):
        assert got[(model, 4, "probe_kl")] == 0.0  # the last layer IS the model's own output
        assert got[(model, -1, "probe_kl")] > 0.1
    # the SFT twin differs only from layer 3 up: same readouts below, different above
    assert got[("pair", 2, "probe_agreement")] == 1.0
    assert got[("pair", 4, "probe_agreement")] < 0.9


def test_left_and_right_padding_and_batching_agree(loaded):
    enc = P.encode(loaded[2], _qa(PROBLEMS), 64)
    right = _rows(_pass(loaded, enc, padding_side="right", batch_size=4, chunk=1000))
    left = _rows(_pass(loaded, enc, padding_side="left", batch_size=3, chunk=7))
    assert right.keys() == left.keys()
    for key in right:
        assert left[key] == pytest.approx(right[key], rel=1e-5, abs=1e-6), key


def test_encode_marks_only_answer_tokens_and_counts_truncation(loaded):
    tok = loaded[2]
    enc = P.encode(tok, _qa(PROBLEMS[:2]), 64)
    for (prompt, target), ids, gold in zip(_qa(PROBLEMS[:2]), enc.ids, enc.gold):
        n_prompt = len(tok(prompt)["input_ids"])
        answer = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert gold == [-100] * (n_prompt - 1) + answer + [-100]
        assert ids[n_prompt:] == answer
    short = P.encode(tok, _qa(PROBLEMS[:2]), 12)
    assert short.truncated == 2 and all(len(x) == 12 for x in short.ids)


def test_tuned_lens_lowers_held_out_kl(loaded):
    base, _, tok = loaded
    train, test = P.encode(tok, _qa(TRAIN), 64), P.encode(tok, _qa(PROBLEMS), 64)
    fit_on = list(P.batches(train, batch_size=3, pad_id=tok.pad_token_id))
    tuned = TunedLens(Unembed(base), 5, 32)
    fit_tuned_lens(
        tuned,
        base,
        lambda s: (fit_on[s % 2][0], fit_on[s % 2][1] != P.IGNORE),
        steps=20,
        lr=1e-2,
    )
    logit = LogitLens(Unembed(base))
    sums = _pass((base, base, tok), test, lenses={"logit": (logit, logit), "tuned": (tuned, tuned)})
    got = _rows(sums)
    for layer in range(-1, 4):  # held-out problems: the tuned lens reads every layer better
        assert got[("base", layer, "tuned_probe_kl")] < 0.85 * got[("base", layer, "probe_kl")]
    assert got[("base", 4, "tuned_probe_kl")] == got[("base", 4, "probe_kl")] == 0.0
    assert got[("base", 4, "tuned_probe_acc")] == got[("base", 4, "probe_acc")]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end_both_lenses_resume_and_reuse(peaked_pair, tmp_path, monkeypatch):
    base, sft = peaked_pair
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "test.jsonl", PROBLEMS)
    _jsonl(data / "train.jsonl", TRAIN)
    out = tmp_path / "run"
    args = ["probe", str(base), str(sft), "--out", str(out), "--data", str(data)]
    args += ["--lens", "both", "--tuned-steps", "3", "--batch-size", "4", "--max-length", "64"]
    args += ["--no-progress"]
    assert main(args) == 0
    rows = _read(out / "metrics.csv")
    metrics = {r["metric"] for r in rows}
    names = {"probe_acc", "probe_logprob", "probe_kl", "probe_agreement"}
    assert metrics == names | {"tuned_" + m for m in names}
    assert {r["layer"] for r in rows} == {str(i) for i in range(-1, 5)}
    assert {r["model"] for r in rows if r["metric"] == "probe_agreement"} == {"pair"}
    assert {r["model"] for r in rows if r["metric"] == "tuned_probe_kl"} == {"base", "sft"}
    for r in rows:
        if r["metric"].endswith("probe_kl") and r["layer"] == "4":
            assert float(r["value"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())["probe"]
    assert summary["prompts"] == len(PROBLEMS) and summary["answer_tokens"] > 0
    assert set(summary["logit"]) == set(summary["tuned"]) == {"base", "sft"}
    for name in ("probe_acc", "probe_logprob", "probe_kl", "probe_agreement"):
        assert (out / "plots" / f"{name}.png").is_file()
    for model in ("base", "sft"):
        assert (out / f"tuned_lens_{model}" / "translators.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert "Layer-wise probing" in html and "tuned_probe_acc" in html

    # rerun with the same inputs: nothing is computed again, the table is unchanged
    def boom(*a, **k):
        raise AssertionError("recomputed a finished step")

    before = (out / "metrics.csv").read_bytes()
    monkeypatch.setattr(P, "probe_pass", boom)
    monkeypatch.setattr(P, "fit_tuned_lens", boom)
    assert main(args) == 0
    assert (out / "metrics.csv").read_bytes() == before

    # fewer probed problems: the pass runs again, the tuned lenses (same training) are reused
    monkeypatch.undo()
    monkeypatch.setattr(P, "fit_tuned_lens", boom)
    assert main([*args, "--max-prompts", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["probe"]["prompts"] == 3
    assert (out / "metrics.csv").read_bytes() != before


def test_api_logit_lens_then_tuned_lens_only(peaked_pair, tmp_path, monkeypatch):
    data, train = tmp_path / "problems.jsonl", tmp_path / "train.jsonl"
    _jsonl(data, PROBLEMS)
    _jsonl(train, TRAIN)
    options = dict(out=str(tmp_path / "r"), data=str(data), max_prompts=2, progress=False)
    run = sftlens.probe(*map(str, peaked_pair), **options)
    metrics = {r["metric"] for r in _read(run / "metrics.csv")}
    assert metrics == {"probe_acc", "probe_logprob", "probe_kl", "probe_agreement"}
    assert not (run / "tuned_lens_base").exists()
    # --lens both on the finished logit-lens run: one pass, for the tuned lens alone
    real, seen = P.probe_pass, []
    monkeypatch.setattr(
        P,
        "probe_pass",
        lambda b, s, lenses, *a, **k: seen.append(list(lenses)) or real(b, s, lenses, *a, **k),
    )
    sftlens.probe(
        *map(str, peaked_pair), **options, lens="both", tuned_data=str(train), tuned_steps=2
    )
    assert seen == [["tuned"]]
    assert len({r["metric"] for r in _read(run / "metrics.csv")}) == 8
    assert set(json.loads((run / "summary.json").read_text())["probe"]) >= {"logit", "tuned"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lens", "foo"], "error: --lens must be one of logit, tuned, both, got 'foo'"),
        (["--chunk-size", "0"], "error: --chunk-size must be >= 1"),
        (["--tuned-lr", "0"], "error: --tuned-lr must be > 0"),
        (["--lens", "tuned"], "tuned-lens training problems are also probed"),
    ],
)
def test_bad_input_is_one_line(peaked_pair, tmp_path, capsys, extra, message):
    data = tmp_path / "problems.jsonl"  # one file: train and test would be the same problems
    _jsonl(data, PROBLEMS)
    args = ["probe", *map(str, peaked_pair), "--out", str(tmp_path / "o"), "--data", str(data)]
    assert main([*args, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_summary_half_accuracy_depth():
    rows = [
        {"model": "base", "layer": layer, "metric": "probe_acc", "value": v}
        for layer, v in zip(range(-1, 4), (0.0, 0.25, 0.3, 0.2, 0.5))
    ]
    s = P.summarize(rows, num_layers=4, prompts=2, tokens=10)
    assert s["logit"]["base"]["final_acc"] == 0.5
    assert s["logit"]["base"]["half_final_acc_at"] == {"layer": 0, "relative_depth": 0.5 / 4}
    assert "tuned" not in s and "sft" not in s["logit"]
    zero = [dict(r, value=0.0) for r in rows]
    assert P.summarize(zero, 4, 2, 10)["logit"]["base"]["half_final_acc_at"] is None
