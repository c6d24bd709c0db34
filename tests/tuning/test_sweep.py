"""``sftlens sweep``: several masks tuned and scored alike, resumable, on a tiny model.

The sweep's numbers are those of the pieces it calls (``tune`` for training, the teacher-forced
scorer for held-out NLL), checked here against calling them directly; the rest is bookkeeping:
baseline first, one row per mask and seed, resume without retraining, the summary's verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.config import SweepConfig
from sftlens.errors import SftlensError
from sftlens.tuning import sweep

OPTS = dict(
    data="synthetic",
    max_examples=16,
    steps=2,
    batch_size=2,
    lr=1e-2,
    warmup_ratio=0.0,
    max_length=64,
    save_every=0,
    heldout=4,
    blocks=2,
    device="cpu",
    progress=False,
)


def _csv(out: Path) -> list[dict]:
    return sweep.read_sweep_csv(out / "sweep.csv")


def test_two_mask_sweep_end_to_end_then_resumes_without_training(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    out = api.sweep(str(base), out=str(tmp_path / "sw"), masks="01", seeds="0,1", **OPTS)
    rows = _csv(out)
    # the baseline 11 is added and comes first; one row per mask and seed
    assert [(r["mask"], r["seed"]) for r in rows] == [("11", 0), ("11", 1), ("01", 0), ("01", 1)]
    for r in rows:
        folder = out / "tune" / f"{r['mask']}-seed{r['seed']}"
        summary = json.loads((folder / "summary.json").read_text())
        assert r["rank_per_layer"] == summary["rank_per_layer"]
        assert r["final_loss"] == pytest.approx(summary["final_loss"])
        assert r["layers"] == len(summary["layers"])
        assert r["heldout"] == 4 and r["answer_nll"] > 0 and 0 <= r["answer_token_acc"] <= 1
    by = {(r["mask"], r["seed"]): r for r in rows}
    # budget matching: the top block alone gets round(r * L / L_active), the baseline r
    n_layers = by[("11", 0)]["layers"]
    assert by[("11", 0)]["rank_per_layer"] == 8
    assert by[("01", 0)]["rank_per_layer"] == round(8 * n_layers / by[("01", 0)]["layers"])
    assert by[("01", 0)]["layers"] < n_layers
    # delta against the baseline of the same seed
    for seed in (0, 1):
        assert by[("01", seed)]["delta_nll"] == pytest.approx(
            by[("01", seed)]["answer_nll"] - by[("11", seed)]["answer_nll"]
        )
        assert by[("11", seed)]["delta_nll"] == 0
    # different seeds train different adapters
    assert by[("11", 0)]["final_loss"] != by[("11", 1)]["final_loss"]
    summary = json.loads((out / "summary.json").read_text())["sweep"]
    assert summary["baseline"] == "11" and set(summary["ranking"]) == {"11", "01"}
    assert summary["masks"]["11"]["seeds"] == 2
    assert (out / "plots" / "sweep.png").is_file()
    assert "Mid-Block tuning sweep" in (out / "report.html").read_text()

    # a rerun trains and scores nothing: every item is read back
    def boom(*a, **k):
        raise AssertionError("a finished item was recomputed")

    monkeypatch.setattr("sftlens.tuning.tune.run_tune", boom)
    monkeypatch.setattr(sweep, "heldout_scores", boom)
    again = api.sweep(str(base), out=str(tmp_path / "sw"), masks="01", seeds="0,1", **OPTS)
    assert _csv(again) == rows


def test_heldout_scores_equal_the_scorer_on_the_trained_adapter(tiny_pair, tmp_path):
    """The sweep's held-out NLL is the teacher-forced scorer's on MODEL + the saved adapter."""
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.evaluation.evaluate import load_adapter
    from sftlens.evaluation.teacher_forced import answer_scores
    from sftlens.models.loading import load_model

    base, _ = tiny_pair
    out = api.sweep(str(base), out=str(tmp_path / "sw"), masks="10", **OPTS)
    row = next(r for r in _csv(out) if r["mask"] == "10")
    model, tok = load_model(base, device="cpu")
    model = load_adapter(model, out / "tune" / "10-seed0" / "adapter")
    problems = resolve_dataset("synthetic", split="test", limit=4)
    s = answer_scores(
        model,
        tok,
        [format_question(e.question) for e in problems],
        [format_target(e.answer) for e in problems],
    )
    assert row["answer_nll"] == pytest.approx(s.answer_nll, rel=1e-6)
    assert row["answer_token_acc"] == pytest.approx(s.answer_token_acc)


def test_a_killed_sweep_resumes_from_the_finished_masks(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    from sftlens.tuning import tune

    real = tune.run_tune
    calls: list[str] = []

    def dies_on_second(cfg):
        calls.append(cfg.mask)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(tune, "run_tune", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        api.sweep(str(base), out=str(tmp_path / "sw"), masks="11,01", **OPTS)
    calls.clear()
    out = api.sweep(str(base), out=str(tmp_path / "sw"), masks="11,01", **OPTS)
    assert calls == ["01"]  # the baseline was finished: not trained again
    assert [r["mask"] for r in _csv(out)] == ["11", "01"]


def test_summary_says_which_mask_wins_and_where_the_suggestion_ranks():
    def row(mask, seed, nll):
        return {"mask": mask, "seed": seed, "layer_range": "x", "answer_nll": nll}

    rows = [row("11", 0, 1.0), row("11", 1, 1.1), row("01", 0, 0.8), row("10", 0, 1.3)]
    s = sweep.sweep_summary(rows, SimpleNamespace(mask="10", evidence=["because"]))
    assert s["ranking"] == ["01", "11", "10"]
    assert s["masks"]["11"]["answer_nll"] == pytest.approx(1.05)
    assert s["masks"]["11"]["answer_nll_spread"] == pytest.approx(0.1)
    assert s["seed_spread_max"] == pytest.approx(0.1)
    assert s["best_other"] == "01" and s["beats_baseline"] is True
    assert s["best_other_delta_nll"] == pytest.approx(0.8 - 1.05)
    assert s["suggested"] == {"mask": "10", "rank": 3, "of": 3, "evidence": ["because"]}
    # the baseline best: the runner-up is reported, and it does not beat it
    s = sweep.sweep_summary([row("11", 0, 0.5), row("01", 0, 0.6)])
    assert s["best"] == "11" and s["best_other"] == "01" and s["beats_baseline"] is False


def test_auto_mask_comes_from_suggest_and_is_marked(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    from sftlens.tuning import suggest

    monkeypatch.setattr(
        suggest,
        "suggest_mask",
        lambda run_dir, num_blocks: SimpleNamespace(mask="01", evidence=["top block stable"]),
        raising=False,
    )
    run = tmp_path / "analysis"
    run.mkdir()
    out = api.sweep(str(base), out=str(tmp_path / "sw"), masks="auto", from_run=str(run), **OPTS)
    rows = _csv(out)
    assert [(r["mask"], r["suggested"]) for r in rows] == [("11", 0), ("01", 1)]
    s = json.loads((out / "summary.json").read_text())["sweep"]
    assert s["suggested"]["mask"] == "01" and s["suggested"]["of"] == 2


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ("0110", "is not a mask of K=5 blocks"),
        ("00000", "is not a mask of K=5 blocks"),
        ("01x00", "is not a mask of K=5 blocks"),
        (" , ", "is not a mask of K=5 blocks"),
        ("auto", "--masks auto needs --from RUN_DIR"),
    ],
)
def test_bad_masks_get_one_line_errors(masks, message):
    with pytest.raises(SftlensError, match=message):
        SweepConfig(model="m", masks=masks)


def test_parse_masks_all_and_order():
    assert sweep.parse_masks("all", 3) == ["100", "010", "001", "110", "101", "011", "111"]
    assert sweep.parse_masks("01100,01100, 11111", 5) == ["01100", "11111"]
    with pytest.raises(SftlensError, match="not an integer"):
        sweep.parse_seeds("0,x")


def test_cli_sweep_end_to_end_and_bad_input(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    args = ["sweep", str(base), "--out", str(tmp_path / "cli"), "--masks", "10", "--blocks", "2"]
    args += ["--data", "synthetic", "--max-examples", "8", "--steps", "1", "--batch-size", "2"]
    args += ["--max-length", "48", "--heldout", "2", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert [r["mask"] for r in _csv(tmp_path / "cli")] == ["11", "10"]
    assert main(["sweep", str(base), "--masks", "1x"]) != 0
    assert "is not a mask of K=5 blocks" in error_line(capsys.readouterr().err)


def test_a_sweep_is_extended_by_rerunning_it_with_other_masks_or_seeds(
    tiny_pair, tmp_path, monkeypatch
):
    """Repeating only the baseline and the best mask with a second seed keeps every earlier row
    (and the earlier suggestion) in sweep.csv, training only what is new."""
    base, _ = tiny_pair
    from sftlens.tuning import suggest, tune

    monkeypatch.setattr(
        suggest, "suggest_mask", lambda run_dir, num_blocks: SimpleNamespace(mask="10", evidence=[])
    )
    (tmp_path / "analysis").mkdir()
    out = tmp_path / "sw"
    api.sweep(str(base), out=str(out), masks="01,auto", from_run=str(tmp_path / "analysis"), **OPTS)
    real, calls = tune.run_tune, []
    monkeypatch.setattr(
        tune, "run_tune", lambda cfg: calls.append((cfg.mask, cfg.seed)) or real(cfg)
    )
    api.sweep(str(base), out=str(out), masks="10", seeds="1", **OPTS)
    assert calls == [("11", 1), ("10", 1)]
    rows = _csv(out)
    assert [(r["mask"], r["seed"]) for r in rows] == [
        ("11", 0),
        ("11", 1),
        ("10", 0),
        ("10", 1),
        ("01", 0),
    ]
    assert [r["mask"] for r in rows if r["suggested"]] == ["10", "10"]
    summary = json.loads((out / "summary.json").read_text())["sweep"]
    assert summary["masks"]["10"]["seeds"] == 2 and summary["suggested"]["mask"] == "10"


def test_gsm8k_scores_evaluate_model_plus_adapter_with_the_sweep_options(tiny_pair, tmp_path):
    """``--gsm8k N``: the eval the sweep runs is MODEL + the mask's adapter on N problems, with
    the sweep's generation options (as that eval's run folder records them), and the row holds
    that eval's accuracies and 95% intervals."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = shutil.copytree(tiny_pair[0], tmp_path / "chat_model")  # --chat needs a template
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}user : {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(base)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    shots = tmp_path / "shots"  # the exemplars come from their own folder's train split
    shots.mkdir()
    line = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    (shots / "train.jsonl").write_text(json.dumps(line) + "\n")
    cfg = SweepConfig(
        model=str(base),
        out=str(tmp_path / "sw"),
        data="synthetic",
        gsm8k=3,
        shots=1,
        chat=True,
        fewshot_data=str(shots),
        max_new_tokens=5,
        eval_batch_size=2,
        dtype="bfloat16",  # not the default, so that it must be passed on
        device="cpu",
        progress=False,
    )
    row = sweep.gsm8k_scores(cfg, adapter, tmp_path / "eval")
    recorded = json.loads((tmp_path / "eval" / "config.json").read_text())["eval_base"]
    expected = {
        "model": str(base),
        "adapter": str(adapter),
        "data": "synthetic",
        "limit": 3,
        "shots": 1,
        "chat": True,
        "fewshot_data": str(shots),
        "max_new_tokens": 5,
        "batch_size": 2,
        "teacher_forced": False,
        "dtype": "bfloat16",
        "device": "cpu",
        "progress": False,
    }
    assert {k: recorded[k] for k in expected} == expected
    assert "adapter" in recorded["fingerprints"]
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())["eval"]["base"]
    assert ev["problems"] == 3
    assert row == {
        "gsm8k_problems": 3,
        **{
            f"{name}{suffix}": value
            for name in ("gsm8k_strict", "gsm8k_flexible")
            for suffix, value in zip(
                ("", "_low", "_high"), (ev[name]["accuracy"], *ev[name]["ci95"])
            )
        },
    }
    assert row["gsm8k_strict_low"] <= row["gsm8k_strict"] <= row["gsm8k_strict_high"]


def test_mask_and_seed_parsing_reads_any_case_and_errors_say_what_to_write():
    assert sweep.parse_masks(" ALL ", 2) == ["10", "01", "11"]
    assert sweep.parse_masks(" Auto ,01, AUTO", 2) == ["auto", "01"]
    with pytest.raises(SftlensError) as info:
        sweep.parse_masks("11, 1x1", 3)
    assert str(info.value) == (
        "--masks: '11' is not a mask of K=3 blocks; write 3 characters of 0/1 with at least "
        "one 1 (leftmost = bottom block), 'auto' (with --from RUN) or 'all'"
    )
    for empty in ("", "  "):
        with pytest.raises(SftlensError) as info:
            sweep.parse_masks(empty, 5)
        assert str(info.value) == "--masks is empty; pass e.g. --masks 11111,01000,01100"
    with pytest.raises(SftlensError) as info:
        sweep.parse_seeds("0, x ")
    assert str(info.value) == "--seeds: 'x' is not an integer; pass e.g. --seeds 0,1"


def test_report_section_states_the_verdict_the_suggestion_and_the_intervals(tmp_path):
    from sftlens.io import write_rows_csv

    def row(mask, seed, nll, strict=None):
        ci = {} if strict is None else {"gsm8k_strict_low": 0.25, "gsm8k_strict_high": 0.75}
        return {"mask": mask, "seed": seed, "layer_range": "2-4" if mask == "01" else "0-4"} | {
            "answer_nll": nll,
            "gsm8k_strict": strict,
            **ci,
        }

    assert sweep.report_section(tmp_path, [], {}) is None  # no sweep.csv
    rows = [row("11", 0, 1.0, 0.5), row("01", 0, 0.75)]
    write_rows_csv(tmp_path / "sweep.csv", rows, sweep.SWEEP_COLUMNS)
    suggestion = SimpleNamespace(mask="01", evidence=[])
    title, body = sweep.report_section(
        tmp_path, [], {"sweep": sweep.sweep_summary(rows, suggestion)}
    )
    assert title == "Mid-Block tuning sweep"
    assert (
        "<p>Best mask other than the baseline: <b>01</b> (layers 2-4), which beats 11 on "
        "held-out answer NLL by 0.25 nats; run --seeds 0,1 to see the seed-to-seed noise.</p>"
    ) in body
    assert (
        "<p><code>sftlens suggest</code> proposed <b>01</b>; it ranks 1 of 2 on held-out "
        "answer NLL.</p><table>"  # no plot here: the table follows
    ) in body
    head = body.split("<table><tr>", 1)[1].split("</tr>", 1)[0]
    assert head == (
        "<th>mask</th><th>seed</th><th>layer_range</th><th>answer_nll</th><th>gsm8k_strict</th>"
    )
    assert "<td>11</td><td>0</td><td>0-4</td><td>1</td><td>0.5 [0.25, 0.75]</td>" in body
    assert "<td>01</td><td>0</td><td>2-4</td><td>0.75</td><td></td>" in body
    # two seeds and a baseline that stays best: the spread, and "does not beat"
    rows = [row("11", 0, 0.5), row("11", 1, 0.625), row("01", 0, 0.75), row("01", 1, 0.75)]
    write_rows_csv(tmp_path / "sweep.csv", rows, sweep.SWEEP_COLUMNS)
    _, body = sweep.report_section(tmp_path, [], {"sweep": sweep.sweep_summary(rows)})
    assert (
        "which does not beat 11 on held-out answer NLL by 0.1875 nats; the largest "
        "seed-to-seed spread of a mask is 0.125 nats.</p>"
    ) in body
    assert "sftlens suggest" not in body


def test_report_section_intro_plot_and_a_summary_without_its_sweep_key(tmp_path):
    """The intro paragraph in full, the plot of plots/sweep.png, and a sweep.csv whose
    summary.json lacks the "sweep" key (e.g. a killed sweep) still gets its table."""
    from sftlens.io import write_rows_csv

    rows = [
        {"mask": "11", "seed": 0, "answer_nll": 1.5},
        {"mask": "01", "seed": 0, "answer_nll": 2.0},
    ]
    write_rows_csv(tmp_path / "sweep.csv", rows, sweep.SWEEP_COLUMNS)
    title, body = sweep.report_section(tmp_path, [], {})
    assert title == "Mid-Block tuning sweep"
    assert body == (
        "<p>LoRA on the layers of each depth-block mask (leftmost character = bottom block), "
        "budget-matched to the all-layers baseline, under the same seed, data order and steps. "
        "Held-out scores on test problems the tuning never saw: teacher-forced answer NLL "
        "(lower is better; <code>delta_nll</code> against the baseline of the same seed) and, "
        "when asked, greedy GSM8K accuracy with 95% intervals.</p>"
        "<table><tr><th>mask</th><th>seed</th><th>answer_nll</th></tr>"
        "<tr><td>11</td><td>0</td><td>1.5</td></tr><tr><td>01</td><td>0</td><td>2</td></tr></table>"
    )
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "sweep.png").write_bytes(b"png")
    _, with_plot = sweep.report_section(tmp_path, [], {})
    assert with_plot == body.replace(
        "</p><table>", '</p><img alt="sweep.png" src="data:image/png;base64,cG5n"><table>'
    )


def test_run_sweep_hands_blocks_to_suggest_and_the_adapter_to_the_gsm8k_eval(
    tiny_pair, tmp_path, monkeypatch
):
    """The wiring of run_sweep with its pieces replaced: 'auto' asks suggest for a mask of
    --blocks blocks from --from, each trained adapter is scored on the held-out problems and,
    with --gsm8k, evaluated with the sweep's options into the item's eval folder."""
    from sftlens.tuning import tune

    base, _ = tiny_pair
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    calls: list[tuple] = []

    def suggest_mask(run_dir, num_blocks):
        calls.append(("suggest", Path(run_dir), num_blocks))
        return SimpleNamespace(mask="01", evidence=["block 0: x"])

    def run_tune(cfg):
        calls.append(("tune", cfg.mask, cfg.seed))
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "summary.json").write_text("{}")
        return Path(cfg.out)

    class Stop(Exception):
        pass

    def gsm8k_scores(cfg, adapter, out):
        calls.append(("gsm8k", cfg.gsm8k, adapter, out))
        raise Stop

    monkeypatch.setattr("sftlens.tuning.suggest.suggest_mask", suggest_mask)
    monkeypatch.setattr(tune, "run_tune", run_tune)
    monkeypatch.setattr(sweep, "heldout_scores", lambda cfg, adapter, p, t: {"answer_nll": 1.0})
    monkeypatch.setattr(sweep, "gsm8k_scores", gsm8k_scores)
    opts = {**OPTS, "heldout": 2}
    cfg = SweepConfig(
        model=str(base),
        out=str(tmp_path / "sw"),
        masks="auto",
        from_run=str(analysis),
        gsm8k=3,
        **opts,
    )
    with pytest.raises(Stop):
        sweep.run_sweep(cfg)
    item = tmp_path / "sw" / "tune" / "11-seed0"
    assert calls == [
        ("suggest", analysis, 2),
        ("tune", "11", 0),
        ("gsm8k", 3, item / "adapter", item / "eval"),
    ]
    # a config changed after its checks: run_sweep itself refuses 'auto' without --from
    cfg = SweepConfig(model=str(base), out=str(tmp_path / "sw2"), masks="01", **opts)
    cfg.masks = "auto"
    with pytest.raises(SftlensError) as info:
        sweep.run_sweep(cfg)
    assert str(info.value) == "--masks auto needs --from RUN_DIR (an analysis run folder)"


def test_heldout_answers_are_bounded_by_the_models_context_or_4096_without_one(monkeypatch):
    """Whole held-out answers, whatever --max-length cut in training: max_length is the text
    config's max_position_embeddings, and 4096 for a config that does not say."""
    from sftlens.evaluation import evaluate, teacher_forced
    from sftlens.models import loading

    seen = []
    configs = iter([SimpleNamespace(max_position_embeddings=77), SimpleNamespace()])
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: next(configs)))

    def answer_scores(m, tok, prompts, targets, *, batch_size, max_length):
        seen.append((m, prompts, targets, batch_size, max_length))
        return SimpleNamespace(answer_nll=1.5, answer_token_acc=0.25)

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, "tok"))
    monkeypatch.setattr(evaluate, "load_adapter", lambda m, adapter: m)
    monkeypatch.setattr(teacher_forced, "answer_scores", answer_scores)
    cfg = SweepConfig(model="m", batch_size=3, max_length=32)
    for context in (77, 4096):
        row = sweep.heldout_scores(cfg, Path("adapter"), ["q"], ["a"])
        assert row == {"answer_nll": 1.5, "answer_token_acc": 0.25}
        assert seen.pop() == (model, ["q"], ["a"], 3, context)
