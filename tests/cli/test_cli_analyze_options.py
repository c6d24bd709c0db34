"""Each ``analyze`` option reaches the computation: it changes the numbers it should, leaves the
others alone, and padding side / batch size change nothing. Also the Python API faces."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import sftlens
from clitools import error_line
from sftlens import api
from sftlens.cli import main

EXAMPLES = [
    ("how many 3 + 4 ?", "3 + 4 = 7 .\n#### 7"),
    ("the 2 * 5 is ?", "2 * 5 = 10\n#### 10"),
    ("a 9 ?", "#### 9"),
    ("how many of the 1 + 2 + 3 + 4 ?", "1 + 2 = 3 , 3 + 3 = 6 , 6 + 4 = 10 .\n#### 10"),
    ("the 8 - 3 is how many ?", "8 - 3 = 5\n#### 5"),
    ("a 6 / 2 ?", "6 / 2 = 3 .\n#### 3"),
    ("how many 1 ?", "#### 1"),
]
COMMON = ["--max-prompts", "6", "--batch-size", "3", "--max-length", "48"]
COMMON += ["--no-attention", "--no-progress"]
LAYERS = range(-1, 5)


class Runner:
    """Runs ``sftlens analyze`` once per set of extra flags (the last of a repeated flag wins)
    and keeps what reached ``run_pass``: its texts and options, and the accumulator settings."""

    def __init__(self, base: Path, sft: Path, root: Path) -> None:
        self.base, self.sft, self.root = base, sft, root
        self.data = root / "d.jsonl"
        self.data.write_text(
            "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in EXAMPLES)
        )
        self.cache: dict[tuple[str, ...], dict] = {}
        self.calls: list[dict] = []

    def args(self, out: Path, flags: tuple[str, ...]) -> list[str]:
        models = [str(self.base), str(self.sft)]
        return ["analyze", *models, "--out", str(out), "--data", str(self.data), *COMMON, *flags]

    def __call__(self, *flags: str) -> dict:
        if flags not in self.cache:
            out = self.root / f"run{len(self.cache)}"
            self.calls.clear()
            assert main(self.args(out, flags)) == 0
            (call,) = self.calls
            self.cache[flags] = {**call, "table": table(out), "summary": summary(out)}
        return self.cache[flags]


def table(out: Path) -> dict[tuple[str, int, str], float]:
    with open(out / "metrics.csv") as f:
        return {
            (r["model"], int(r["layer"]), r["metric"]): float(r["value"] or "nan")
            for r in csv.DictReader(f)
        }


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["analyze"]


@pytest.fixture(scope="module")
def run(tiny_pair, tmp_path_factory):
    from sftlens import representations
    from sftlens.reporting import plots

    runner = Runner(*tiny_pair, tmp_path_factory.mktemp("analyze_options"))
    real = representations.run_pass

    def spy(base, sft, tok, texts, **kw):
        state = kw["state"]
        runner.calls.append(
            {
                "texts": list(texts),
                **{k: kw[k] for k in ("batch_size", "max_length", "truncate", "padding_side")},
                **{k: getattr(state, k) for k in ("alpha", "preset", "pooling", "attention")},
            }
        )
        return real(base, sft, tok, texts, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(representations, "run_pass", spy)
        for name in ("plot_representations", "plot_heads"):
            mp.setattr(plots, name, lambda *a, **k: None)  # plots are not checked here
        yield runner


def same(a: float, b: float, rel: float = 1e-9) -> bool:
    return a == pytest.approx(b, rel=rel, abs=rel * 1e-3, nan_ok=True)


def test_defaults_reach_the_pass(run):
    r = run()
    assert r["texts"] == [f"Question: {q}\nAnswer: {a}" for q, a in EXAMPLES[:6]]
    assert (r["batch_size"], r["max_length"], r["truncate"], r["padding_side"]) == (
        3,
        48,
        True,
        "right",
    )
    assert (r["alpha"], r["preset"], r["pooling"], r["attention"]) == (
        1.0,
        "default",
        "mean",
        False,
    )
    assert r["summary"]["prompts"] == 6
    # summary.json's curve is metrics.csv's token CKA of blocks 0..L-1
    assert r["summary"]["cka_by_layer"] == [r["table"][("pair", i, "cka")] for i in range(5)]


def test_alpha_changes_the_entropies_only(run):
    one, two = run()["table"], run("--alpha", "2")
    assert two["alpha"] == 2.0
    for model in ("base", "sft"):
        for layer in LAYERS:
            for metric in ("prompt_entropy", "dataset_entropy"):
                key = (model, layer, metric)
                assert not same(two["table"][key], one[key], 1e-6), key
            assert same(two["table"][(model, layer, "erank")], one[(model, layer, "erank")])
    for layer in LAYERS:
        assert same(two["table"][("pair", layer, "cka")], one[("pair", layer, "cka")])


def test_paper_preset_uses_the_paper_conventions(run):
    default, paper = run()["table"], run("--preset", "paper")
    assert paper["preset"] == "paper"
    for model in ("base", "sft"):
        for layer in LAYERS:
            erank = paper["table"][(model, layer, "erank")]
            assert same(erank, default[(model, layer, "erank_sigma2")], 1e-6)
            pe = (model, layer, "prompt_entropy")
            assert not same(paper["table"][pe], default[pe], 1e-6), pe


def test_last_token_pooling_changes_pooled_metrics_only(run):
    mean, last = run()["table"], run("--pooling", "last")
    assert last["pooling"] == "last"
    assert any(
        not same(last["table"][("pair", i, "cka_pooled")], mean[("pair", i, "cka_pooled")], 1e-6)
        for i in LAYERS
    )
    for i in LAYERS:
        assert same(last["table"][("pair", i, "cka")], mean[("pair", i, "cka")])
        assert same(
            last["table"][("base", i, "prompt_entropy")], mean[("base", i, "prompt_entropy")]
        )


def test_text_question_feeds_the_prompt_only(run):
    qa, question = run()["table"], run("--text", "question")
    assert question["texts"] == [f"Question: {q}\nAnswer:" for q, _ in EXAMPLES[:6]]
    assert not same(question["table"][("pair", 2, "cka")], qa[("pair", 2, "cka")], 1e-6)


def test_max_length_truncates_or_refuses(run, capsys):
    full, short = run()["table"], run("--max-length", "8")
    assert short["max_length"] == 8 and short["truncate"] is True
    assert not same(short["table"][("pair", 2, "cka")], full[("pair", 2, "cka")], 1e-6)
    out = run.root / "refused"
    assert main(run.args(out, ("--max-length", "8", "--no-truncate"))) == 2
    assert "more than --max-length 8" in error_line(capsys.readouterr().err)


def test_max_prompts_takes_the_first_n(run):
    four = run("--max-prompts", "4")
    assert four["texts"] == run()["texts"][:4] and four["summary"]["prompts"] == 4


def test_attention_adds_attention_rows_and_changes_no_other(run):
    off, on = run()["table"], run("--attention")
    assert on["attention"] is True
    assert {k[1] for k in on["table"] if k[2] == "attn_js"} == set(range(5))
    assert not any(k[2].startswith("attn_") for k in off)
    for k, v in off.items():  # eager vs sdpa attention: the same numbers up to rounding
        assert same(on["table"][k], v, 1e-4), k


@pytest.mark.parametrize(
    ("flags", "key", "value"),
    [
        (("--padding-side", "left"), "padding_side", "left"),
        (("--batch-size", "1"), "batch_size", 1),
    ],
)
def test_padding_side_and_batch_size_change_no_number(run, flags, key, value):
    ref, other = run()["table"], run(*flags)
    assert other[key] == value
    assert other["table"].keys() == ref.keys()
    for k, v in ref.items():
        assert same(other["table"][k], v, 1e-4), k


# -- the Python API -------------------------------------------------------------------------------


def test_package_names_are_the_api_functions():
    for name in ("weights", "analyze", "sft", "demo", "evaluate", "probe", "swap", "interpolate"):
        assert getattr(sftlens, name) is getattr(api, name), name


def test_sftlens_report_is_the_api_function():
    """The report code lives in sftlens.reporting, so no subpackage shadows the function."""
    import sftlens.reporting.build  # as any run does

    assert sftlens.report is api.report


def test_api_analyze_equals_the_cli(run):
    out = run.root / "api"
    got = sftlens.analyze(
        str(run.base),
        str(run.sft),
        out=str(out),
        data=str(run.data),
        max_prompts=6,
        batch_size=3,
        max_length=48,
        attention=False,
        progress=False,
        alpha=2.0,
    )
    assert got == out
    assert table(out) == run("--alpha", "2")["table"]
    assert json.loads((out / "config.json").read_text())["analyze"]["alpha"] == 2.0


def test_api_weights_and_report_equal_the_cli(tiny_pair, tmp_path):
    base, sft = tiny_pair
    cli, py = tmp_path / "cli", tmp_path / "py"
    assert main(["weights", str(base), str(sft), "--out", str(cli), "--no-progress"]) == 0
    assert sftlens.weights(str(base), str(sft), out=str(py), progress=False) == py
    assert (py / "metrics.csv").read_bytes() == (cli / "metrics.csv").read_bytes()
    html = (py / "report.html").read_text()
    (py / "report.html").unlink()
    assert api.report(py) == py / "report.html"
    assert (py / "report.html").read_text() == html
