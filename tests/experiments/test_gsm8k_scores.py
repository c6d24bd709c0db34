"""``--gsm8k N`` of ``sftlens swap`` / ``sftlens interpolate``: generation accuracy per model.

The scores must be those of ``sftlens eval`` on the same model (the trivial variants: the two
references, a swap of every block between models that share their ends, interpolation at 0
and 1), resume under their own hash, and a failure in generation must leave both models as
they were.
"""

from __future__ import annotations

import copy
import csv
import json
import re

import pytest
import torch
import transformers as tf

from sftlens.cli import main
from sftlens.config import EvalConfig
from sftlens.evaluation import generate as gen_mod
from sftlens.evaluation import teacher_forced
from sftlens.evaluation.evaluate import run_eval
from sftlens.experiments.swap import GSM8K_COLUMNS
from sftlens.models import loading, surgery
from tiny_models import save_model, tiny_llama_config, tiny_tokenizer

_BLOCK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
GEN = ["--gsm8k", "2", "--shots", "1", "--max-new-tokens", "8"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pair():
    """(base, sft) of 4 layers; the SFT model differs in every block, the ends are shared (so a
    swap of every block IS the other model). A large init: greedy text depends on the prompt."""
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        num_hidden_layers=4, initializer_range=0.3, bos_token_id=None, eos_token_id=1
    )
    base = tf.AutoModelForCausalLM.from_config(cfg).eval()
    sft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if _BLOCK_KEY.search(name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, sft


def problem(a: int, b: int, gold: str | None = None) -> dict[str, str]:
    return {"question": f"how many is {a} + {b} ?", "answer": f"{a} + {b} . #### {gold or a + b}"}


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluate(model_dir, data, out, role):
    """``sftlens eval`` with the generation options of GEN (no teacher forcing)."""
    cfg = EvalConfig(
        model=str(model_dir),
        data=str(data),
        limit=2,
        shots=1,
        max_new_tokens=8,
        batch_size=2,
        teacher_forced=False,
        role=role,
        out=str(out),
        progress=False,
    )
    return json.loads((run_eval(cfg) / "summary.json").read_text())["eval"][role]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model folders, a data folder whose golds make the accuracies non-trivial, and the
    ``sftlens eval`` summaries of both models on it."""
    root = tmp_path_factory.mktemp("gsm8k_scores")
    base, sft = make_pair()
    dirs = save_model(base, root / "base"), save_model(sft, root / "sft")
    data = root / "data"
    write(data / "train.jsonl", [problem(a, 2) for a in range(3)])
    write(data / "test.jsonl", [problem(a, 3) for a in range(4)])
    # the golds of the test problems are not in the prompts: set them to the SFT model's
    # flexible answers, so that it gets 2/2 (and the base model, answering otherwise, less)
    evaluate(dirs[1], data, root / "probe", "sft")
    golds = [p["flexible"] for p in read_preds(root / "probe", "sft")[:2]]
    assert all(g is not None for g in golds), golds  # the setup needs numbers in the texts
    write(data / "test.jsonl", [problem(0, 3, golds[0]), problem(1, 3, golds[1])])
    evals = {role: evaluate(d, data, root / "eval", role) for role, d in zip(("base", "sft"), dirs)}
    assert evals["sft"]["gsm8k_flexible"]["correct"] == 2
    assert evals["base"]["gsm8k_flexible"]["correct"] < 2
    return {"dirs": dirs, "data": data, "eval": evals, "models": (base, sft)}


def read_preds(run, role):
    return [json.loads(x) for x in (run / f"predictions_{role}.jsonl").read_text().splitlines()]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def swap_args(setup, out, *extra):
    base, sft = setup["dirs"]
    return [
        "swap", str(base), str(sft), "--out", str(out), "--data", str(setup["data"]),
        "--limit", "2", "--batch-size", "2", "--blocks", "2", "--no-progress", *extra,
    ]  # fmt: skip


def interp_args(setup, out, *extra):
    base, sft = setup["dirs"]
    return [
        "interpolate", str(base), str(sft), "--out", str(out), "--data", str(setup["data"]),
        "--limit", "2", "--batch-size", "2", "--alphas", "0,0.5,1", "--no-progress", *extra,
    ]  # fmt: skip


def assert_is_eval(row, summary):
    """A CSV row's generation columns are the ``sftlens eval`` summary's numbers."""
    assert int(row["gsm8k_problems"]) == summary["problems"] == 2
    for m in ("gsm8k_strict", "gsm8k_flexible"):
        acc = summary[m]
        assert float(row[m]) == acc["accuracy"], m
        assert int(row[f"{m}_correct"]) == acc["correct"], m
        assert [float(row[f"{m}_ci_low"]), float(row[f"{m}_ci_high"])] == pytest.approx(acc["ci95"])


def check_ranges(rows):
    for r in rows:
        for m in ("gsm8k_strict", "gsm8k_flexible"):
            v, lo, hi = (float(r[k]) for k in (m, f"{m}_ci_low", f"{m}_ci_high"))
            assert 0 <= lo <= v <= hi <= 1, r
            assert float(r[m]) == int(r[f"{m}_correct"]) / int(r["gsm8k_problems"])


# -- swap ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swap_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("swap") / "run"
    assert main(swap_args(setup, out, "--spans", "0:4", *GEN)) == 0
    return out


def test_swap_gsm8k_columns_equal_eval_on_the_trivial_hybrids(setup, swap_run):
    rows = read_rows(swap_run / "swap.csv")
    header = list(rows[0])
    assert set(GSM8K_COLUMNS) | {"delta_gsm8k_strict", "delta_gsm8k_flexible"} <= set(header)
    check_ranges(rows)
    by = {(r["direction"], r["span"] or r["host"]): r for r in rows}
    ev = setup["eval"]
    assert_is_eval(by[("reference", "base")], ev["base"])
    assert_is_eval(by[("reference", "sft")], ev["sft"])
    # the ends are shared: the base with every SFT block is the SFT model, and the reverse
    assert_is_eval(by[("sft_into_base", "0:4")], ev["sft"])
    assert_is_eval(by[("base_into_sft", "0:4")], ev["base"])
    assert ev["base"]["gsm8k_flexible"] != ev["sft"]["gsm8k_flexible"]  # the check has teeth
    for r in rows:
        if r["direction"] == "reference":
            assert r["delta_gsm8k_flexible"] == ""
            continue
        host = by[("reference", r["host"])]
        for m in ("gsm8k_strict", "gsm8k_flexible"):
            assert float(r[f"delta_{m}"]) == pytest.approx(float(r[m]) - float(host[m]))
    summary = json.loads((swap_run / "summary.json").read_text())["swap"]
    assert summary["gsm8k_problems"] == 2
    for model in ("base", "sft"):
        assert summary[f"{model}_gsm8k_flexible"]["text"] == ev[model]["gsm8k_flexible"]["text"]
    html = (swap_run / "report.html").read_text()
    assert "gsm8k_flexible (count, 95%)" in html and ev["sft"]["gsm8k_flexible"]["text"] in html
    for d in ("sft_into_base", "base_into_sft"):
        assert (swap_run / "plots" / f"swap_{d}_gsm8k.png").is_file()


def test_swap_without_gsm8k_leaves_the_columns_empty(setup, tmp_path):
    out = tmp_path / "run"
    assert main(swap_args(setup, out, "--limit", "1", "--blocks", "1")) == 0
    rows = read_rows(out / "swap.csv")
    assert set(GSM8K_COLUMNS) <= set(rows[0])
    assert all(r[c] == "" for r in rows for c in GSM8K_COLUMNS)
    assert "gsm8k_flexible (count, 95%)" not in (out / "report.html").read_text()
    assert not (out / "plots" / "swap_sft_into_base_gsm8k.png").exists()


class Counter:
    """Wraps a function, counts its calls; ``fail`` makes every call an error."""

    def __init__(self, real, fail: bool = False):
        self.real, self.fail, self.calls = real, fail, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.fail:
            raise AssertionError("a recorded score was computed again")
        return self.real(*a, **kw)


def test_swap_gsm8k_resumes_under_its_own_hash(setup, swap_run, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(swap_run, out)
    first = (out / "swap.csv").read_bytes()
    # unchanged: nothing is generated or scored, no model is loaded
    for mod, name in ((gen_mod, "generate"), (teacher_forced, "answer_scores")):
        monkeypatch.setattr(mod, name, Counter(getattr(mod, name), fail=True))
    monkeypatch.setattr(loading, "load_model", Counter(loading.load_model, fail=True))
    assert main(swap_args(setup, out, "--spans", "0:4", *GEN)) == 0
    assert (out / "swap.csv").read_bytes() == first
    monkeypatch.undo()

    # another N: every model is generated again, the teacher-forced scores stay
    gen = Counter(gen_mod.generate)
    monkeypatch.setattr(gen_mod, "generate", gen)
    monkeypatch.setattr(teacher_forced, "answer_scores", Counter(None, fail=True))
    one = [*GEN[:1], "1", *GEN[2:]]
    assert main(swap_args(setup, out, "--spans", "0:4", *one)) == 0
    assert gen.calls == 2 + 2 * 3  # two references, three spans in two directions
    rows = read_rows(out / "swap.csv")
    assert {r["gsm8k_problems"] for r in rows} == {"1"}
    # back to N = 5: generated again; 5 is beyond the data (it holds 2), so N = 2 is the same
    # problem set: nothing is generated and the table is the first run's
    gen.calls = 0
    assert main(swap_args(setup, out, "--spans", "0:4", "--gsm8k", "5", *GEN[2:])) == 0
    assert gen.calls == 8
    assert main(swap_args(setup, out, "--spans", "0:4", *GEN)) == 0
    assert gen.calls == 8 and (out / "swap.csv").read_bytes() == first
    # another task (max new tokens): generated again; the same once more: nothing
    gen.calls = 0
    assert main(swap_args(setup, out, "--spans", "0:4", *one[:-1], "4")) == 0
    assert gen.calls == 8
    gen.calls = 0
    assert main(swap_args(setup, out, "--spans", "0:4", *one[:-1], "4")) == 0
    assert gen.calls == 0
    cfg = json.loads((out / "config.json").read_text())["swap"]
    assert cfg["gsm8k"] == 1 and cfg["max_new_tokens"] == 4 and cfg["gsm8k_key"]


def snapshot(model):
    return (
        [id(b) for b in surgery.get_blocks(model)],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(model, snap):
    blocks, tensors = snap
    assert [id(b) for b in surgery.get_blocks(model)] == blocks
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(now[k], v), k


def fail_on_call(n: int):
    """A ``generate`` that fails on its n-th call (1-based), i.e. in the n-th model scored."""
    real, calls = gen_mod.generate, []

    def planted(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("planted generation failure")
        return real(*a, **kw)

    return planted


@pytest.mark.parametrize("command", ["swap", "interpolate"])
def test_a_failure_in_generation_restores_the_models(setup, tmp_path, monkeypatch, command):
    """The models in memory (load_model returns them) are bit-identical after the failure, the
    teacher-forced score recorded before it is kept, and a rerun finishes the job."""
    base, sft = make_pair()
    snaps = snapshot(base), snapshot(sft)
    models = iter([base, sft])
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (next(models), tiny_tokenizer()))
    # swap: 2 references, then the first hybrid; interpolate: alpha 0, then alpha 0.5
    monkeypatch.setattr(gen_mod, "generate", fail_on_call(3 if command == "swap" else 2))
    out = tmp_path / "run"
    argv = swap_args(setup, out, *GEN) if command == "swap" else interp_args(setup, out, *GEN)
    with pytest.raises(RuntimeError, match="planted generation failure"):
        main(argv)
    assert_unchanged(base, snaps[0])
    assert_unchanged(sft, snaps[1])
    item = "sft_into_base/0:2" if command == "swap" else "all@0.5"
    tf_items = json.loads((out / f".{command}_items.json").read_text())["items"]
    gen_items = json.loads((out / f".{command}_gsm8k_items.json").read_text())["items"]
    assert item in tf_items and item not in gen_items
    monkeypatch.undo()
    tf_calls = Counter(teacher_forced.answer_scores)
    monkeypatch.setattr(teacher_forced, "answer_scores", tf_calls)
    assert main(argv) == 0
    assert tf_calls.calls == (3 if command == "swap" else 1)  # the failed one's was kept
    check_ranges(read_rows(out / f"{command}.csv"))


# -- interpolate -----------------------------------------------------------------------------


def test_interpolate_gsm8k_ends_equal_eval_of_the_two_models(setup, tmp_path):
    out = tmp_path / "run"
    assert main(interp_args(setup, out, "--spans", "1:3", *GEN)) == 0
    rows = read_rows(out / "interpolate.csv")
    assert set(GSM8K_COLUMNS) <= set(rows[0])
    check_ranges(rows)
    by = {(r["span"], float(r["alpha"])): r for r in rows}
    for span in ("all", "1:3"):
        assert_is_eval(by[(span, 0.0)], setup["eval"]["base"])
    assert_is_eval(by[("all", 1.0)], setup["eval"]["sft"])  # every parameter at 1: the SFT model
    s = json.loads((out / "summary.json").read_text())["interpolate"]
    assert s["gsm8k_problems"] == 2
    curve = {a: float(by[("all", a)]["gsm8k_flexible"]) for a in (0.0, 0.5, 1.0)}
    assert s["spans"]["all"]["best_gsm8k_flexible"] == max(curve.values())
    assert curve[s["spans"]["all"]["best_gsm8k_alpha"]] == max(curve.values())
    html = (out / "report.html").read_text()
    assert "gsm8k_flexible (count, 95%)" in html and "most accurate alpha" in html

    # resume: the same run generates nothing; another N regenerates the 1 + 2 * 2 points only
    gen = Counter(gen_mod.generate)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen_mod, "generate", gen)
        mp.setattr(teacher_forced, "answer_scores", Counter(None, fail=True))
        assert main(interp_args(setup, out, "--spans", "1:3", *GEN)) == 0
        assert gen.calls == 0
        assert main(interp_args(setup, out, "--spans", "1:3", "--gsm8k", "1", *GEN[2:])) == 0
        assert gen.calls == 5
    assert {r["gsm8k_problems"] for r in read_rows(out / "interpolate.csv")} == {"1"}


def test_the_docstring_examples_of_swap_run():
    import doctest

    from sftlens.experiments import swap

    assert doctest.testmod(swap).failed == 0
