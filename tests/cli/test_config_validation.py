"""Every config check of config.py: one line naming the problem and the fix, from the Python API
(``SftlensError``) and from the CLI (``error: ...``, exit 2). A check without a case here fails
``test_every_check_in_config_py_has_a_case``."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys

import pytest

from clitools import error_line
from sftlens import config
from sftlens.cli import COMMANDS, main
from sftlens.config import (
    AnalyzeConfig,
    DemoConfig,
    DpoConfig,
    EvalConfig,
    InterpolateConfig,
    ProbeConfig,
    SFTConfig,
    SuggestConfig,
    SwapConfig,
    SweepConfig,
    TrajectoryConfig,
    TuneConfig,
    WeightsConfig,
)
from sftlens.errors import SftlensError

DT = "('auto', 'float32', 'bfloat16', 'float16')"
DEV = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
# (config class, invalid field values, the exact message)
CASES: list[tuple[type, dict, str]] = [
    (WeightsConfig, {"base": ""}, "weights needs two models: BASE and SFT"),
    (WeightsConfig, {"sft": ""}, "weights needs two models: BASE and SFT"),
    (WeightsConfig, {"device": "gpu"}, f"--device must be {DEV}, got 'gpu'"),
    (AnalyzeConfig, {"device": "cuda0"}, f"--device must be {DEV}, got 'cuda0'"),
    (SFTConfig, {"device": "tpu"}, f"--device must be {DEV}, got 'tpu'"),
    (SFTConfig, {"split": "test"}, "sft refuses to train on the test split; use --split train"),
    (SFTConfig, {"steps": 0}, "--steps must be >= 1, got 0"),
    (SFTConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (SFTConfig, {"grad_accum": 0}, "--grad-accum must be >= 1, got 0"),
    (SFTConfig, {"max_length": 0}, "--max-length must be >= 1, got 0"),
    (SFTConfig, {"lr": 0.0}, "--lr must be > 0, got 0.0"),
    (SFTConfig, {"lr": -1.0}, "--lr must be > 0, got -1.0"),
    (SFTConfig, {"warmup_ratio": 1.0}, "--warmup-ratio must be in [0, 1), got 1.0"),
    (SFTConfig, {"warmup_ratio": -0.1}, "--warmup-ratio must be in [0, 1), got -0.1"),
    (SFTConfig, {"save_every": -1}, "--save-every must be >= 0, got -1"),
    (SFTConfig, {"prompt_format": "xml"}, "--prompt-format must be 'qa' or 'chat', got 'xml'"),
    (SFTConfig, {"dtype": "float64"}, f"--dtype must be one of {DT}, got 'float64'"),
    (TuneConfig, {"split": "test"}, "tune refuses to train on the test split; use --split train"),
    (TuneConfig, {"steps": 0}, "--steps must be >= 1, got 0"),
    (TuneConfig, {"mask": "auto"}, "--mask auto needs --from RUN_DIR (an analysis run)"),
    (
        TuneConfig,
        {"from_run": "runs/a"},
        "--from is read only by --mask auto; drop it or pass --mask auto",
    ),
    (TuneConfig, {"blocks": 0}, "--blocks must be >= 1, got 0"),
    (TuneConfig, {"rank": 0}, "--rank must be >= 1, got 0"),
    (TuneConfig, {"alpha": 0.0}, "--alpha must be > 0, got 0.0"),
    (TuneConfig, {"alpha_ratio": -1.0}, "--alpha-ratio must be > 0, got -1.0"),
    (TuneConfig, {"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
    (
        TuneConfig,
        {"targets": "q,x"},
        "--targets must be one of attn, attn+mlp, mlp or a list of q, k, v, o, qkv, gate, up, "
        "down, gate_up, fc_in, fc_out, got 'q,x'",
    ),
    (DpoConfig, {"split": "test"}, "dpo refuses to train on the test split; use --split train"),
    (
        DpoConfig,
        {"full": True, "mask": "01100"},
        "--full trains every parameter, so --mask 01100 means nothing; drop one of them",
    ),
    (DpoConfig, {"beta": 0.0}, "--beta must be > 0, got 0.0"),
    (DpoConfig, {"samples_per_problem": 0}, "--samples-per-problem must be >= 1, got 0"),
    (DpoConfig, {"temperature": 0.0}, "--temperature must be > 0, got 0.0"),
    (DpoConfig, {"top_p": 0.0}, "--top-p must be in (0, 1], got 0.0"),
    (DpoConfig, {"top_p": 1.5}, "--top-p must be in (0, 1], got 1.5"),
    (DpoConfig, {"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
    (DpoConfig, {"sample_batch_size": 0}, "--sample-batch-size must be >= 1, got 0"),
    (DemoConfig, {"sft_steps": 0}, "--sft-steps must be >= 1, got 0"),
    (DemoConfig, {"analyze_prompts": -1}, "--analyze-prompts must be >= 0, got -1"),
    (DemoConfig, {"eval_problems": -1}, "--eval-problems must be >= 0, got -1"),
    (DemoConfig, {"eval_max_new_tokens": 0}, "--eval-max-new-tokens must be >= 1, got 0"),
    (DemoConfig, {"probe_prompts": -1}, "--probe-prompts must be >= 0, got -1"),
    (DemoConfig, {"trajectory_prompts": -1}, "--trajectory-prompts must be >= 0, got -1"),
    (AnalyzeConfig, {"max_prompts": 0}, "--max-prompts must be >= 1, got 0"),
    (AnalyzeConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (AnalyzeConfig, {"max_length": 1}, "--max-length must be >= 2, got 1"),
    (AnalyzeConfig, {"text": "answer"}, "--text must be 'qa' or 'question', got 'answer'"),
    (AnalyzeConfig, {"padding_side": "up"}, "--padding-side must be 'left' or 'right', got 'up'"),
    (AnalyzeConfig, {"alpha": 0.0}, "--alpha must be > 0, got 0.0"),
    (AnalyzeConfig, {"preset": "x"}, "--preset must be 'default' or 'paper', got 'x'"),
    (AnalyzeConfig, {"pooling": "max"}, "--pooling must be 'mean' or 'last', got 'max'"),
    (AnalyzeConfig, {"dtype": "int8"}, f"--dtype must be one of {DT}, got 'int8'"),
    (AnalyzeConfig, {"every": 0}, "--every must be >= 1, got 0"),
    (
        AnalyzeConfig,
        {"activations": "gpu"},
        "--activations must be 'auto', 'memory' or 'disk', got 'gpu'",
    ),
    (EvalConfig, {"limit": -1}, "--limit must be >= 0, got -1"),
    (EvalConfig, {"shots": -1}, "--shots must be >= 0, got -1"),
    (EvalConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (EvalConfig, {"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
    (EvalConfig, {"role": "pair"}, "--role must be 'base' or 'sft', got 'pair'"),
    (EvalConfig, {"dtype": "fp8"}, f"--dtype must be one of {DT}, got 'fp8'"),
    (ProbeConfig, {"max_prompts": 0}, "--max-prompts must be >= 1, got 0"),
    (ProbeConfig, {"lens": "x"}, "--lens must be one of logit, tuned, both, got 'x'"),
    (ProbeConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (ProbeConfig, {"max_length": 1}, "--max-length must be >= 2, got 1"),
    (ProbeConfig, {"padding_side": "up"}, "--padding-side must be 'left' or 'right', got 'up'"),
    (ProbeConfig, {"chunk_size": 0}, "--chunk-size must be >= 1, got 0"),
    (ProbeConfig, {"tuned_prompts": 0}, "--tuned-prompts must be >= 1, got 0"),
    (ProbeConfig, {"tuned_steps": 0}, "--tuned-steps must be >= 1, got 0"),
    (ProbeConfig, {"tuned_lr": 0.0}, "--tuned-lr must be > 0, got 0.0"),
    (ProbeConfig, {"dtype": "fp8"}, f"--dtype must be one of {DT}, got 'fp8'"),
    (SwapConfig, {"blocks": -1}, "--blocks must be >= 0, got -1"),
    (
        SwapConfig,
        {"blocks": 0, "spans": ""},
        "nothing to swap; pass --blocks K (K >= 1) or --spans i:j",
    ),
    (SwapConfig, {"limit": 0}, "--limit must be >= 1, got 0"),
    (SwapConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (SwapConfig, {"max_length": 1}, "--max-length must be >= 2, got 1"),
    (SwapConfig, {"dtype": "fp8"}, f"--dtype must be one of {DT}, got 'fp8'"),
    (SwapConfig, {"gsm8k": -1}, "--gsm8k must be >= 0, got -1"),
    (SwapConfig, {"shots": -2}, "--shots must be >= 0, got -2"),
    (SwapConfig, {"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
    (InterpolateConfig, {"blocks": -1}, "--blocks must be >= 0, got -1"),
    (
        InterpolateConfig,
        {"all_layers": False, "blocks": 0, "spans": ""},
        "nothing to interpolate; keep --all-layers or pass --blocks K or --spans i:j",
    ),
    (InterpolateConfig, {"limit": 0}, "--limit must be >= 1, got 0"),
    (InterpolateConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (InterpolateConfig, {"max_length": 1}, "--max-length must be >= 2, got 1"),
    (InterpolateConfig, {"dtype": "fp8"}, f"--dtype must be one of {DT}, got 'fp8'"),
    (InterpolateConfig, {"gsm8k": -1}, "--gsm8k must be >= 0, got -1"),
    (InterpolateConfig, {"shots": -2}, "--shots must be >= 0, got -2"),
    (InterpolateConfig, {"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
    (SuggestConfig, {"blocks": 0}, "--blocks must be >= 1, got 0"),
    (SuggestConfig, {"width": -1}, "--width must be >= 0, got -1"),
    (SuggestConfig, {"width": 6}, "--width must be <= --blocks, got 6 > 5"),
    (SuggestConfig, {"max_width": 0}, "--max-width must be >= 1, got 0"),
    (SuggestConfig, {"min_depth": 0.6}, "--min-depth must be in [0, 0.5], got 0.6"),
    (SuggestConfig, {"min_depth": -0.1}, "--min-depth must be in [0, 0.5], got -0.1"),
    (SuggestConfig, {"max_depth": 0.4}, "--max-depth must be in [0.5, 1], got 0.4"),
    (SuggestConfig, {"max_depth": 1.5}, "--max-depth must be in [0.5, 1], got 1.5"),
    (
        SweepConfig,
        {"masks": "11111,auto"},
        "--masks auto needs --from RUN_DIR (an analysis run folder)",
    ),
    (SweepConfig, {"masks": " "}, "--masks is empty; pass e.g. --masks 11111,01000,01100"),
    (SweepConfig, {"heldout": 0}, "--heldout must be >= 1, got 0"),
    (SweepConfig, {"gsm8k": -1}, "--gsm8k must be >= 0, got -1"),
    (SweepConfig, {"shots": -1}, "--shots must be >= 0, got -1"),
    (SweepConfig, {"eval_batch_size": 0}, "--eval-batch-size must be >= 1, got 0"),
    (SweepConfig, {"steps": 0}, "--steps must be >= 1, got 0"),
    (SweepConfig, {"split": "test"}, "tune refuses to train on the test split; use --split train"),
    (
        TrajectoryConfig,
        {"checkpoints": []},
        "trajectory needs BASE and at least one checkpoint: sftlens trajectory BASE CKPT1 "
        "[CKPT2 ...] (or BASE and a folder of checkpoint-STEP subfolders)",
    ),
    (TrajectoryConfig, {"max_prompts": 0}, "--max-prompts must be >= 1, got 0"),
]
# checks outside _check (parsers shared with the commands): the message ends with the forms
PARSED_CASES: list[tuple[type, dict, str]] = [
    (TuneConfig, {"mask": "0000"}, "layer selection '0000' selects no block (it has no 1); pass "),
    (TuneConfig, {"mask": "1-2-3"}, "layer selection '1-2-3' is malformed at '1-2-3'; pass "),
    (AnalyzeConfig, {"layers": "8:0"}, "layer selection '8:0' has an empty or reversed span"),
    (AnalyzeConfig, {"max_memory": "24 parsecs"}, "memory size '24 parsecs' is malformed; "),
]
COMMAND_OF = {cls: name for name, (cls, _, _) in COMMANDS.items() if cls is not None}


def positional(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]


def _listed(cls: type, name: str) -> bool:
    """A positional that takes one or more values (``trajectory``'s checkpoints)."""
    return "list" in str(next(f.type for f in dataclasses.fields(cls) if f.name == name))


def api_kwargs(cls: type, bad: dict) -> dict:
    return {**{name: ["m"] if _listed(cls, name) else "m" for name in positional(cls)}, **bad}


def cli_args(cls: type, bad: dict) -> list[str]:
    args = [COMMAND_OF[cls]]
    for name in positional(cls):
        value = bad.get(name, ["m"] if _listed(cls, name) else "m")
        args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    for name, value in bad.items():
        if name in positional(cls):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # BooleanOptionalAction: --x / --no-x
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def case_id(case: tuple[type, dict, str]) -> str:
    cls, bad, _ = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in bad.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_config_check_from_api_and_cli(case, tmp_path, monkeypatch, capsys):
    cls, bad, message = case
    monkeypatch.chdir(tmp_path)  # nothing may be created; if it were, it lands here
    with pytest.raises(SftlensError) as info:
        cls(**api_kwargs(cls, bad))
    assert str(info.value) == message
    assert main(cli_args(cls, bad)) == 2
    assert error_line(capsys.readouterr().err) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", PARSED_CASES, ids=case_id)
def test_parsed_option_errors_from_api_and_cli(case, tmp_path, monkeypatch, capsys):
    cls, bad, start = case
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftlensError, match="^" + re.escape(start)):
        cls(**api_kwargs(cls, bad))
    assert main(cli_args(cls, bad)) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {start}")
    assert list(tmp_path.iterdir()) == []


def test_from_is_an_alias_of_from_run():
    from sftlens.cli import build_parser

    ns = build_parser().parse_args(["tune", "m", "--mask", "auto", "--from", "runs/a"])
    assert ns.from_run == "runs/a"


@pytest.mark.parametrize("cls", sorted(COMMAND_OF, key=lambda c: c.__name__))
def test_defaults_pass_every_check(cls):
    cls(**api_kwargs(cls, {}))


def test_every_check_in_config_py_has_a_case(monkeypatch):
    """Each ``_check(`` call site in config.py fails for at least one case above."""
    tree = ast.parse(inspect.getsource(config))
    sites = {
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_check"
    }
    failed: set[int] = set()
    real = config._check

    def recording(ok: bool, message: str) -> None:
        if not ok:
            failed.add(sys._getframe(1).f_lineno)
        real(ok, message)

    monkeypatch.setattr(config, "_check", recording)
    for cls, bad, _ in CASES:
        with pytest.raises(SftlensError):
            cls(**api_kwargs(cls, bad))
    assert sites and failed == sites, f"checks without a case at config.py lines {sites - failed}"
