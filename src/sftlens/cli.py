"""``sftlens`` command line. Thin: parses arguments into dataclass configs, calls :mod:`sftlens.api`.

Heavy imports (torch, transformers) happen only inside the chosen subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
    add_arguments,
    from_namespace,
)
from sftlens.errors import SftlensError


def _weights(ns: argparse.Namespace) -> Any:
    from sftlens import api

    return api.run_weights(from_namespace(WeightsConfig, ns))


def _analyze(ns: argparse.Namespace) -> Any:
    from sftlens import api

    return api.run_analyze(from_namespace(AnalyzeConfig, ns))


def _sft(ns: argparse.Namespace) -> Any:
    from sftlens.tuning.sft import train_sft

    return train_sft(from_namespace(SFTConfig, ns))


def _dpo(ns: argparse.Namespace) -> Any:
    from sftlens.tuning.dpo import run_dpo

    return run_dpo(from_namespace(DpoConfig, ns))


def _sweep(ns: argparse.Namespace) -> Any:
    from sftlens.tuning.sweep import run_sweep

    return run_sweep(from_namespace(SweepConfig, ns))


def _tune(ns: argparse.Namespace) -> Any:
    from sftlens.tuning.tune import run_tune

    return run_tune(from_namespace(TuneConfig, ns))


def _demo(ns: argparse.Namespace) -> Any:
    import dataclasses

    from sftlens import api

    return api.demo(**dataclasses.asdict(from_namespace(DemoConfig, ns)))


def _eval(ns: argparse.Namespace) -> Any:
    from sftlens.evaluation.evaluate import run_eval

    return run_eval(from_namespace(EvalConfig, ns))


def _probe(ns: argparse.Namespace) -> Any:
    from sftlens.experiments.probe import run_probe

    return run_probe(from_namespace(ProbeConfig, ns))


def _swap(ns: argparse.Namespace) -> Any:
    from sftlens.experiments.swap import run_swap

    return run_swap(from_namespace(SwapConfig, ns))


def _interpolate(ns: argparse.Namespace) -> Any:
    from sftlens.experiments.interpolate import run_interpolate

    return run_interpolate(from_namespace(InterpolateConfig, ns))


def _trajectory(ns: argparse.Namespace) -> Any:
    from sftlens.experiments.trajectory import run_trajectory

    return run_trajectory(from_namespace(TrajectoryConfig, ns))


def _suggest(ns: argparse.Namespace) -> Any:
    from sftlens.tuning.suggest import run_suggest

    return "\n".join(run_suggest(from_namespace(SuggestConfig, ns)).lines())


def _report(ns: argparse.Namespace) -> Any:
    from sftlens import api

    return api.report(ns.run)


COMMANDS: dict[str, tuple[type | None, Callable[[argparse.Namespace], Any], str]] = {
    "demo": (
        DemoConfig,
        _demo,
        "main job: short SFT of SmolLM2-135M-Instruct, weight analysis, report",
    ),
    "weights": (
        WeightsConfig,
        _weights,
        "per-layer weight distances between BASE and SFT (streamed)",
    ),
    "analyze": (
        AnalyzeConfig,
        _analyze,
        "hidden-state and attention metrics of BASE vs SFT (one streaming pass)",
    ),
    "sft": (SFTConfig, _sft, "full-parameter SFT on GSM8K-format data (resumable)"),
    "tune": (
        TuneConfig,
        _tune,
        "LoRA on the layers of a mask only (01100: the middle blocks), budget-matched",
    ),
    "dpo": (
        DpoConfig,
        _dpo,
        "preference tuning (DPO via TRL) on GSM8K pairs: gold answer vs the model's own wrong one",
    ),
    "sweep": (
        SweepConfig,
        _sweep,
        "tune and score several masks (baseline 11111 first) under one budget; sweep.csv",
    ),
    "eval": (
        EvalConfig,
        _eval,
        "GSM8K accuracy (strict, flexible) and teacher-forced answer scores",
    ),
    "probe": (ProbeConfig, _probe, "logit-lens readout of every layer of BASE and SFT"),
    "swap": (SwapConfig, _swap, "hybrids with depth blocks exchanged between BASE and SFT"),
    "interpolate": (
        InterpolateConfig,
        _interpolate,
        "a * SFT + (1 - a) * BASE, for all layers or per depth block",
    ),
    "suggest": (
        SuggestConfig,
        _suggest,
        "propose a Mid-Block LoRA mask from an analysis run, with the evidence per block",
    ),
    "trajectory": (
        TrajectoryConfig,
        _trajectory,
        "weight and representation metrics of every checkpoint vs BASE and vs the previous one",
    ),
    "report": (None, _report, "rebuild report.html of a run folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftlens",
        description="Where, layer by layer, did supervised fine-tuning change this model?",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=(cls.__doc__ or help_text).strip() if cls else help_text,
        )
        if cls is not None:
            add_arguments(p, cls)
        else:
            p.add_argument("run", help="run folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with _library_bars(getattr(ns, "progress", True)):
            result = COMMANDS[ns.command][1](ns)
        if result is not None:
            print(result, flush=True)
    except SftlensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sftlens ... | head` closed stdout: not an error of ours
        # stdout's buffer cannot be flushed any more; point it at devnull so the interpreter's
        # final flush does not print a second traceback (the recipe in Python's signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


@contextlib.contextmanager
def _library_bars(enabled: bool) -> Iterator[None]:
    """``--no-progress`` also silences transformers' and huggingface_hub's own bars.

    ("Loading weights" of every ``from_pretrained``.) Set through the environment before
    transformers is imported (the CLI imports it lazily) and through its switch when it already
    is; restored afterwards, so an in-process caller's bars come back.
    """
    if enabled:
        yield
        return
    old = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf = sys.modules.get("transformers.utils.logging")
    was_on = hf is not None and hf.is_progress_bar_enabled()
    if hf is not None:
        hf.disable_progress_bar()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old
        # imported inside, huggingface_hub read the variable once and keeps its bars off (it
        # warns when asked to switch them on): only an earlier import gets its bars back
        if was_on and hf is not None:
            hf.enable_progress_bar()
