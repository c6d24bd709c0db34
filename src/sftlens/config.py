"""Dataclass configs, validated on construction, that double as the CLI.

Each field's ``metadata["help"]`` becomes its ``--flag`` help; fields marked
``positional=True`` become positional arguments. ``cli.py`` builds its parsers from these
classes with :func:`add_arguments` and turns the namespace back into a config with
:func:`from_namespace`, so the CLI and the Python API can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from sftlens.errors import SftlensError

T = TypeVar("T")


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",
    positional: bool = False,
    aliases: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    """A dataclass field with CLI metadata (``aliases``: extra flags, e.g. ``("--from",)``)."""
    meta = {"help": help, "positional": positional, "aliases": aliases}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if f.metadata.get("positional") and typing.get_origin(tp) is list:
            # '*', not '+': an empty list reaches the config's own one-line check
            inner = typing.get_args(tp)[0]
            parser.add_argument(
                f.name, nargs="*", type=inner, help=help_text, metavar=f.name.upper()
            )
        elif f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, help=help_text, metavar=f.name.upper())
        elif tp is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0]
            parser.add_argument(*flags, nargs="+", type=inner, default=default, help=help_text)
        else:
            suffix = "" if not has_default or default is None else f" (default: {default})"
            parser.add_argument(
                *flags,
                type=tp,
                default=default,
                required=not has_default and not optional,
                help=help_text + suffix,
            )


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SftlensError(message)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(device: str) -> None:
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device) is not None,
        f"--device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got '{device}'",
    )


def _dtype(dtype: str, device: str, on_cuda: str = "bfloat16") -> str:
    """Check ``--device`` and ``--dtype``, and resolve ``auto`` for the device: ``on_cuda`` on a
    GPU, float32 on CPU (bf16 matmuls are ~100x slower there). The config then records the
    dtype that runs."""
    _device(device)
    _check(dtype in DTYPES, f"--dtype must be one of {DTYPES}, got '{dtype}'")
    from sftlens.models.loading import pick_dtype

    return pick_dtype(dtype, device, on_cuda=on_cuda)


@dataclass
class WeightsConfig:
    """``sftlens weights BASE SFT``: per-layer weight distances, streamed from the files."""

    base: str = arg(help="BASE model: folder, .gguf file, hub id or alias", positional=True)
    sft: str = arg(help="SFT model: folder, .gguf file, hub id or alias", positional=True)
    out: str = arg("runs/weights", help="run folder for metrics.csv, plots and report.html")
    device: str = arg(
        "cpu",
        help="where the differences are reduced (float64): 'cpu', 'cuda', 'cuda:N' or 'auto' "
        "(the run is bound by reading the files; a GPU saves little)",
    )
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        _check(bool(self.base) and bool(self.sft), "weights needs two models: BASE and SFT")
        _device(self.device)


@dataclass
class TrainConfig:
    """What every training command shares: data, steps, optimizer, precision (not a command).

    :class:`SFTConfig` and :class:`TuneConfig` add their own fields; both train through
    :func:`sftlens.tuning.loop.train_loop`, so the data encoding and order are the same.
    """

    _command: ClassVar[str] = "train"
    #: ``--dtype auto`` on a GPU: full SFT keeps float32 master weights (bf16 weights would
    #: round away small updates; bf16 compute comes from accelerate's mixed precision)
    _auto_cuda_dtype: ClassVar[str] = "float32"

    model: str = arg(
        help="model to fine-tune: folder, .gguf file, hub id or alias", positional=True
    )
    out: str = arg("runs/train", help="output folder")
    data: str = arg(
        "auto", help="jsonl file, folder with train.jsonl, 'gsm8k', 'synthetic' or 'auto'"
    )
    split: str = arg("train", help="split to train on (never 'test')")
    max_examples: int | None = arg(None, help="use only the first N examples")
    steps: int = arg(100, help="optimizer steps")
    batch_size: int = arg(4, help="examples per micro-batch")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    lr: float = arg(2e-5, help="peak learning rate (AdamW)")
    warmup_ratio: float = arg(0.1, help="fraction of steps of linear warmup before cosine decay")
    weight_decay: float = arg(0.0, help="AdamW weight decay")
    max_grad_norm: float = arg(1.0, help="gradient clipping norm (0 disables)")
    max_length: int = arg(384, help="truncate prompt+answer to this many tokens")
    prompt_format: str = arg(
        "qa", help="'qa' (Question:/Answer:) or 'chat' (the tokenizer's template)"
    )
    seed: int = arg(0, help="seed for data order and initialisation")
    save_every: int = arg(50, help="save a resumable checkpoint every N steps (0: only at the end)")
    dtype: str = arg(
        "auto",
        help="weights dtype: 'auto' (float32 on CPU, where bf16 matmuls are ~100x slower; on a "
        "GPU float32 for sft, bfloat16 for the frozen base of tune), float32, bfloat16, float16",
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        _check(
            self.split != "test",
            f"{self._command} refuses to train on the test split; use --split train",
        )
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            _check(
                getattr(self, name) >= 1,
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}",
            )
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(
            0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"
        )
        _check(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        _check(
            self.prompt_format in ("qa", "chat"),
            f"--prompt-format must be 'qa' or 'chat', got '{self.prompt_format}'",
        )
        self.dtype = _dtype(self.dtype, self.device, self.auto_cuda_dtype())

    def auto_cuda_dtype(self) -> str:
        """What ``--dtype auto`` means on a GPU for this command."""
        return self._auto_cuda_dtype


@dataclass
class SFTConfig(TrainConfig):
    """``sftlens sft MODEL``: full-parameter supervised fine-tuning on GSM8K-format data."""

    _command: ClassVar[str] = "sft"

    out: str = arg("runs/sft", help="output folder (a standard Hugging Face model folder)")
    keep_checkpoints: bool = arg(
        True,
        help="keep every --save-every snapshot as OUT/checkpoint-STEP (a model folder, e.g. "
        "for `sftlens trajectory`); else only the newest, removed at the end",
    )


#: ``--targets`` shorthands: the attention projections, or attention and MLP.
TARGET_GROUPS = ("attn", "attn+mlp", "mlp")
#: Projection names ``--targets`` may list (those of :class:`sftlens.models.surgery.ArchSpec`).
TARGET_PROJS = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "fc_in", "fc_out")


@dataclass
class TuneConfig(TrainConfig):
    """``sftlens tune MODEL --mask 01100``: LoRA on the layers of a mask only, budget-matched.

    Everything but the LoRA weights is frozen; the loss, data encoding and order are those of
    ``sftlens sft``. Work: :mod:`sftlens.tuning.tune` (LoRA config: :mod:`sftlens.tuning.lora`).
    """

    _command: ClassVar[str] = "tune"
    #: the base is frozen: bf16 on a GPU (PEFT keeps the LoRA weights in float32)
    _auto_cuda_dtype: ClassVar[str] = "bfloat16"

    out: str = arg("runs/tune", help="output folder (adapter/, summary.json, metrics.csv, report)")
    lr: float = arg(2e-4, help="peak learning rate (AdamW)")
    mask: str = arg(
        "11111",
        help="layers that get LoRA: a depth-block mask (01100; leftmost = bottom block), "
        "layers (3,4,5 or 6:18), a relative-depth range (0.2-0.8), or 'auto' (with --from)",
    )
    from_run: str | None = arg(
        None, aliases=("--from",), help="analysis run folder whose evidence --mask auto reads"
    )
    blocks: int = arg(5, help="depth blocks K of the mask --mask auto proposes")
    rank: int = arg(
        8,
        help="LoRA rank of the all-layers baseline; with budget matching each trained layer "
        "gets round(rank * L / L_active) so that the total rank stays rank * L",
    )
    budget_match: bool = arg(True, help="scale the rank to the all-layers budget (SPEC)")
    alpha: float | None = arg(
        None,
        help="fixed lora_alpha for every mask (the paper used 128); "
        "default: alpha = --alpha-ratio x the rank per layer",
    )
    alpha_ratio: float = arg(2.0, help="alpha / rank when --alpha is not given")
    targets: str = arg(
        "attn",
        help="modules that get LoRA: 'attn' (q,k,v,o), 'attn+mlp', 'mlp', or projections "
        "such as 'q,v' or 'q,k,v,o,gate,up,down'",
    )
    lora_dropout: float = arg(0.0, help="LoRA dropout")

    def __post_init__(self) -> None:
        from sftlens.layers import parse_layer_selection

        super().__post_init__()
        auto = self.mask.strip().lower() == "auto"
        _check(
            not auto or bool(self.from_run), "--mask auto needs --from RUN_DIR (an analysis run)"
        )
        _check(
            auto or self.from_run is None,
            "--from is read only by --mask auto; drop it or pass --mask auto",
        )
        if not auto:
            parse_layer_selection(self.mask, None)  # syntax now; the range once L is known
        _check(self.blocks >= 1, f"--blocks must be >= 1, got {self.blocks}")
        _check(self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _check(self.alpha_ratio > 0, f"--alpha-ratio must be > 0, got {self.alpha_ratio}")
        _check(
            0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"
        )
        names = [t.strip() for t in self.targets.split(",")]
        _check(
            self.targets in TARGET_GROUPS or all(n in TARGET_PROJS for n in names),
            f"--targets must be one of {', '.join(TARGET_GROUPS)} or a list of "
            f"{', '.join(TARGET_PROJS)}, got '{self.targets}'",
        )


@dataclass
class DemoConfig:
    """``sftlens demo``: the main job on the embedded default, end to end."""

    model: str = arg("smollm2-135m-instruct", help="BASE model to fine-tune and analyse")
    out: str = arg("runs/demo", help="run folder")
    data: str = arg(
        "auto",
        help="SFT data: 'auto' (GSM8K if found, else the built-in generator), a path, 'synthetic'",
    )
    sft_steps: int = arg(30, help="optimizer steps of the short SFT")
    sft_batch_size: int = arg(4, help="examples per step of the short SFT")
    sft_lr: float = arg(5e-5, help="peak learning rate of the short SFT")
    sft_max_length: int = arg(256, help="max tokens per SFT example")
    analyze_prompts: int = arg(64, help="prompts for the representation analysis (0 skips it)")
    analyze_data: str = arg(
        "auto",
        help="analysis prompts: 'auto' (GSM8K test if found, else generated), a path, 'synthetic'",
    )
    eval_problems: int = arg(
        16, help="GSM8K test problems for a short zero-shot eval of both models (0 skips it)"
    )
    eval_max_new_tokens: int = arg(128, help="generation bound of the short eval")
    probe_prompts: int = arg(8, help="problems for the logit-lens probe (0 skips it)")
    trajectory_prompts: int = arg(
        16,
        help="prompts for the trajectory over the short SFT's checkpoints, in OUT/trajectory "
        "(0 skips it)",
    )
    seed: int = arg(0, help="seed")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        _check(self.sft_steps >= 1, f"--sft-steps must be >= 1, got {self.sft_steps}")
        _check(
            self.analyze_prompts >= 0, f"--analyze-prompts must be >= 0, got {self.analyze_prompts}"
        )
        _check(self.eval_problems >= 0, f"--eval-problems must be >= 0, got {self.eval_problems}")
        _check(
            self.eval_max_new_tokens >= 1,
            f"--eval-max-new-tokens must be >= 1, got {self.eval_max_new_tokens}",
        )
        _check(self.probe_prompts >= 0, f"--probe-prompts must be >= 0, got {self.probe_prompts}")
        _check(
            self.trajectory_prompts >= 0,
            f"--trajectory-prompts must be >= 0, got {self.trajectory_prompts}",
        )


@dataclass
class AnalyzeConfig:
    """``sftlens analyze BASE SFT``: hidden-state and attention metrics in one streaming pass."""

    base: str = arg(help="BASE model: folder, .gguf file, hub id or alias", positional=True)
    sft: str = arg(help="SFT model: folder, .gguf file, hub id or alias", positional=True)
    out: str = arg("runs/analyze", help="run folder")
    data: str = arg("auto", help="jsonl file, folder, 'gsm8k', 'synthetic' or 'auto'")
    split: str = arg("test", help="split whose prompts are analysed")
    max_prompts: int = arg(256, help="number of prompts (first N of the split)")
    text: str = arg("qa", help="'qa' (question and worked answer) or 'question' (prompt only)")
    batch_size: int = arg(8, help="prompts per forward pass")
    max_length: int = arg(512, help="tokens per prompt; longer ones are truncated (or refused)")
    truncate: bool = arg(True, help="truncate prompts longer than --max-length (else refuse)")
    padding_side: str = arg("right", help="'right' or 'left' (the numbers do not depend on it)")
    alpha: float = arg(1.0, help="order of the matrix alpha-entropy (> 0)")
    preset: str = arg("default", help="'default' (SPEC) or 'paper' (the paper code's conventions)")
    pooling: str = arg("mean", help="one vector per prompt for dataset metrics: 'mean' or 'last'")
    attention: bool = arg(
        True, help="attention entropy and base-vs-SFT JS divergence (eager attention)"
    )
    routing: bool = arg(
        True,
        help="mixture-of-experts models: routing shift (route_js) and expert loads per layer "
        "(experts.csv); no effect on dense models",
    )
    dtype: str = arg(
        "auto",
        help="model dtype: 'auto' (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, "
        "float16 (reductions are float64 regardless)",
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    layers: str = arg(
        "",
        help="analyse only these layers (default: all), e.g. 0:8,24:32 (half-open spans), "
        "3,5,7, a depth-block mask 0110 or a depth range 0.2-0.8; the embedding output "
        "(layer -1) is always analysed",
    )
    every: int = arg(1, help="analyse every k-th of the selected layers (the first, then k on)")
    stream_layers: bool | None = arg(
        None,
        help="layer-major pass: one block of each model in memory at a time, read from the "
        "checkpoint once (default: chosen when the in-memory run would not fit; "
        "--no-stream-layers: never)",
    )
    activations: str = arg(
        "auto",
        help="with --stream-layers, where the activations wait between blocks: 'memory', "
        "'disk' (a scratch file in --out, removed at the end) or 'auto' (disk if they do not fit)",
    )
    max_memory: str = arg(
        "",
        help="memory the run may use, e.g. 24GiB (default: what the machine has available, "
        "within a cgroup limit)",
    )
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        from sftlens.layers import parse_layer_selection
        from sftlens.memory import parse_size

        _check(self.max_prompts >= 1, f"--max-prompts must be >= 1, got {self.max_prompts}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _check(
            self.text in ("qa", "question"), f"--text must be 'qa' or 'question', got '{self.text}'"
        )
        _check(
            self.padding_side in ("left", "right"),
            f"--padding-side must be 'left' or 'right', got '{self.padding_side}'",
        )
        _check(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _check(
            self.preset in ("default", "paper"),
            f"--preset must be 'default' or 'paper', got '{self.preset}'",
        )
        _check(
            self.pooling in ("mean", "last"),
            f"--pooling must be 'mean' or 'last', got '{self.pooling}'",
        )
        self.dtype = _dtype(self.dtype, self.device)
        _check(self.every >= 1, f"--every must be >= 1, got {self.every}")
        _check(
            self.activations in ("auto", "memory", "disk"),
            f"--activations must be 'auto', 'memory' or 'disk', got '{self.activations}'",
        )
        if self.layers.strip():
            parse_layer_selection(self.layers, None)  # syntax now; the range once L is known
        parse_size(self.max_memory)


@dataclass
class TrajectoryConfig(AnalyzeConfig):
    """``sftlens trajectory BASE CKPT1 CKPT2 ...``: weight and representation metrics of every
    checkpoint against BASE (cumulative) and against the previous checkpoint (per stage).

    One folder of ``checkpoint-STEP`` subfolders (``sftlens sft --save-every N``, transformers'
    Trainer) stands for its checkpoints by step. The prompt options are those of ``analyze``;
    BASE runs once per batch for all checkpoints that fit in memory together.
    Work: :mod:`sftlens.experiments.trajectory`.
    """

    sft: str = field(default="", init=False, repr=False)  # each checkpoint in turn
    stream_layers: bool | None = field(default=False, init=False, repr=False)  # in memory only
    activations: str = field(default="auto", init=False, repr=False)
    routing: bool = field(default=False, init=False, repr=False)  # analyze only
    out: str = arg("runs/trajectory", help="run folder (trajectory.csv, plots, report.html)")
    max_memory: str = arg(
        "",
        help="memory the run may use, e.g. 24GiB (default: what the machine has available); "
        "checkpoints that do not fit together are run in groups, BASE again for each group",
    )
    checkpoints: list[str] = arg(  # noqa: RUF009  (a default_factory: arg copies the list)
        [],
        help="checkpoints in training order (folders, .gguf files, hub ids or aliases), or one "
        "folder of checkpoint-STEP subfolders",
        positional=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.checkpoints, (str, Path)):  # the API's one folder of checkpoints
            self.checkpoints = [self.checkpoints]
        self.checkpoints = [str(c) for c in self.checkpoints]
        _check(
            len(self.checkpoints) >= 1,
            "trajectory needs BASE and at least one checkpoint: sftlens trajectory BASE CKPT1 "
            "[CKPT2 ...] (or BASE and a folder of checkpoint-STEP subfolders)",
        )


# -- experiments and evaluation -----------------------------------------------------------------
# Each class below belongs to one command; its module (named in the docstring) does the work.

# The GSM8K generation task's options, one definition (flag, default, help, check) shared by
# ``eval`` and the ``--gsm8k`` scores of ``swap`` / ``interpolate``.


def shots_arg() -> Any:
    return arg(5, help="solved exemplars before each question (0: zero-shot)")


def chat_arg() -> Any:
    return arg(False, help="wrap the prompt in the tokenizer's chat template")


def max_new_tokens_arg() -> Any:
    return arg(256, help="generation stops after this many new tokens")


def fewshot_data_arg() -> Any:
    return arg(
        None,
        help="where the exemplars come from (the first --shots problems of its train split; "
        "default: --data, which must then not be a single file)",
    )


def check_generation(cfg: Any) -> None:
    """The checks of the shared generation options (``shots``, ``max_new_tokens``)."""
    _check(cfg.shots >= 0, f"--shots must be >= 0, got {cfg.shots}")
    _check(cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")


@dataclass
class EvalConfig:
    """``sftlens eval MODEL``: GSM8K accuracy (strict and flexible) and teacher-forced scores.

    Greedy generation in batches with a shared-prefix KV cache; an interrupted run resumes
    from the problems already written to ``predictions_{role}.jsonl``.
    Work: :mod:`sftlens.evaluation.evaluate`.
    """

    model: str = arg(help="model: folder, .gguf file, hub id or alias", positional=True)
    adapter: str | None = arg(None, help="PEFT adapter folder to load on top of MODEL")
    role: str = arg(
        "base",
        help="model column of metrics.csv: 'base' or 'sft' (evaluate both into one --out "
        "to compare them in one report)",
    )
    out: str = arg("runs/eval", help="run folder")
    data: str = arg("auto", help="jsonl file, folder, 'gsm8k', 'synthetic' or 'auto'")
    split: str = arg("test", help="split to score")
    fewshot_data: str | None = fewshot_data_arg()
    limit: int | None = arg(200, help="score the first N problems of the split (0: all)")
    shots: int = shots_arg()
    chat: bool = chat_arg()
    batch_size: int = arg(16, help="sequences generated together")
    max_new_tokens: int = max_new_tokens_arg()
    prefix_cache: bool = arg(
        True, help="run the shared k-shot prefix once and reuse its KV cache (same results)"
    )
    teacher_forced: bool = arg(
        True, help="also score answer_nll / answer_token_acc on gold answers"
    )
    dtype: str = arg(
        "auto", help="model dtype: 'auto' (bfloat16 on a GPU, float32 on CPU) or a dtype name"
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        check_generation(self)
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.role in ("base", "sft"), f"--role must be 'base' or 'sft', got '{self.role}'")
        self.dtype = _dtype(self.dtype, self.device)


LENSES = ("logit", "tuned", "both")


@dataclass
class ProbeConfig:
    """``sftlens probe BASE SFT``: logit-lens (and tuned-lens) readouts of every layer.

    Work: :mod:`sftlens.experiments.probe`.
    """

    base: str = arg(help="BASE model: folder, .gguf file, hub id or alias", positional=True)
    sft: str = arg(help="SFT model: folder, .gguf file, hub id or alias", positional=True)
    out: str = arg("runs/probe", help="run folder")
    data: str = arg("auto", help="jsonl file, folder, 'gsm8k', 'synthetic' or 'auto'")
    split: str = arg("test", help="split whose problems are probed")
    max_prompts: int = arg(64, help="number of problems (first N of the split)")
    lens: str = arg(
        "logit",
        help="'logit' (final norm + LM head on every layer), 'tuned' (per-layer affine "
        "translators fitted on the train split first) or 'both'",
    )
    batch_size: int = arg(8, help="sequences per forward pass")
    max_length: int = arg(512, help="tokens per question + answer (longer ones are truncated)")
    padding_side: str = arg("right", help="'right' or 'left' (the numbers do not depend on it)")
    chunk_size: int = arg(
        256,
        help="answer positions per logits chunk (memory: about 10 x chunk x vocab float32, "
        "0.5 GB for a 49k vocabulary)",
    )
    tuned_data: str | None = arg(
        None, help="data whose 'train' split fits the tuned lens (default: --data)"
    )
    tuned_prompts: int = arg(256, help="train-split problems the tuned lens is fitted on")
    tuned_steps: int = arg(250, help="Adam steps of the tuned-lens fit (one batch each)")
    tuned_lr: float = arg(1e-3, help="Adam learning rate of the tuned-lens fit")
    seed: int = arg(0, help="seed of the tuned-lens training order")
    dtype: str = arg(
        "auto",
        help="model dtype: 'auto' (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, "
        "float16 (reductions are float64 regardless)",
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        _check(self.max_prompts >= 1, f"--max-prompts must be >= 1, got {self.max_prompts}")
        _check(
            self.lens in LENSES,
            f"--lens must be one of {', '.join(LENSES)}, got '{self.lens}'",
        )
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _check(
            self.padding_side in ("left", "right"),
            f"--padding-side must be 'left' or 'right', got '{self.padding_side}'",
        )
        _check(self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}")
        _check(self.tuned_prompts >= 1, f"--tuned-prompts must be >= 1, got {self.tuned_prompts}")
        _check(self.tuned_steps >= 1, f"--tuned-steps must be >= 1, got {self.tuned_steps}")
        _check(self.tuned_lr > 0, f"--tuned-lr must be > 0, got {self.tuned_lr}")
        self.dtype = _dtype(self.dtype, self.device)


@dataclass
class SwapConfig:
    """``sftlens swap BASE SFT``: hybrids with blocks exchanged between the two models.

    Every span is swapped in both directions at once (SFT blocks into the base, base blocks into
    the SFT model); the two unmodified models are scored too. Work: :mod:`sftlens.experiments.swap`.
    """

    base: str = arg(help="BASE model: folder, .gguf file, hub id or alias", positional=True)
    sft: str = arg(help="SFT model: folder, .gguf file, hub id or alias", positional=True)
    out: str = arg("runs/swap", help="run folder")
    blocks: int = arg(5, help="swap each of K depth blocks (0: only --spans)")
    spans: str = arg("", help="extra half-open layer spans i:j, e.g. '0:6,24:30'")
    data: str = arg("auto", help="jsonl file, folder, 'gsm8k', 'synthetic' or 'auto'")
    split: str = arg("test", help="split whose problems score each hybrid")
    limit: int = arg(64, help="problems for the teacher-forced scores (first N of the split)")
    batch_size: int = arg(8, help="sequences per forward pass")
    max_length: int = arg(512, help="tokens per question + answer (longer ones are truncated)")
    gsm8k: int = arg(
        0,
        help="also score every model by greedy GSM8K generation (strict and flexible accuracy, "
        "as 'sftlens eval') on the first N problems of --split (0: off; one generation pass "
        "per model, batched by --batch-size)",
    )
    shots: int = shots_arg()
    chat: bool = chat_arg()
    max_new_tokens: int = max_new_tokens_arg()
    fewshot_data: str | None = fewshot_data_arg()
    dtype: str = arg(
        "auto", help="model dtype: 'auto' (bfloat16 on a GPU, float32 on CPU) or a dtype name"
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        from sftlens.layers import parse_spans

        _check(self.blocks >= 0, f"--blocks must be >= 0, got {self.blocks}")
        parse_spans(self.spans, None)  # syntax now; the range once the model is known
        _check(
            self.blocks > 0 or bool(self.spans.strip()),
            "nothing to swap; pass --blocks K (K >= 1) or --spans i:j",
        )
        _check(self.limit >= 1, f"--limit must be >= 1, got {self.limit}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _check(self.gsm8k >= 0, f"--gsm8k must be >= 0, got {self.gsm8k}")
        check_generation(self)
        self.dtype = _dtype(self.dtype, self.device)


@dataclass
class InterpolateConfig:
    """``sftlens interpolate BASE SFT``: ``a * sft + (1 - a) * base``, all layers or per span.

    Work: :mod:`sftlens.experiments.interpolate`.
    """

    base: str = arg(help="BASE model: folder, .gguf file, hub id or alias", positional=True)
    sft: str = arg(help="SFT model: folder, .gguf file, hub id or alias", positional=True)
    out: str = arg("runs/interpolate", help="run folder")
    alphas: str = arg(
        "0,0.25,0.5,0.75,1", help="interpolation weights of the SFT model (0 = base, 1 = SFT)"
    )
    all_layers: bool = arg(
        True, help="interpolate every parameter at once (embeddings, final norm, LM head too)"
    )
    blocks: int = arg(0, help="also interpolate each of K depth blocks alone (0: none)")
    spans: str = arg("", help="also interpolate these half-open layer spans i:j, e.g. '0:6,24:30'")
    data: str = arg("auto", help="jsonl file, folder, 'gsm8k', 'synthetic' or 'auto'")
    split: str = arg("test", help="split whose problems score each model")
    limit: int = arg(64, help="problems for the teacher-forced scores (first N of the split)")
    batch_size: int = arg(8, help="sequences per forward pass")
    max_length: int = arg(512, help="tokens per question + answer (longer ones are truncated)")
    gsm8k: int = arg(
        0,
        help="also score every model by greedy GSM8K generation (strict and flexible accuracy, "
        "as 'sftlens eval') on the first N problems of --split (0: off; one generation pass "
        "per model, batched by --batch-size)",
    )
    shots: int = shots_arg()
    chat: bool = chat_arg()
    max_new_tokens: int = max_new_tokens_arg()
    fewshot_data: str | None = fewshot_data_arg()
    dtype: str = arg(
        "auto", help="model dtype: 'auto' (bfloat16 on a GPU, float32 on CPU) or a dtype name"
    )
    device: str = arg("auto", help="'auto' (cuda when a GPU is visible), 'cpu', 'cuda' or 'cuda:N'")
    allow_pickle: bool = arg(False, help="allow reading pickle (*.bin) checkpoints you trust")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        from sftlens.layers import parse_alphas, parse_spans

        parse_alphas(self.alphas)
        _check(self.blocks >= 0, f"--blocks must be >= 0, got {self.blocks}")
        parse_spans(self.spans, None)  # syntax now; the range once the model is known
        _check(
            self.all_layers or self.blocks > 0 or bool(self.spans.strip()),
            "nothing to interpolate; keep --all-layers or pass --blocks K or --spans i:j",
        )
        _check(self.limit >= 1, f"--limit must be >= 1, got {self.limit}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        _check(self.gsm8k >= 0, f"--gsm8k must be >= 0, got {self.gsm8k}")
        check_generation(self)
        self.dtype = _dtype(self.dtype, self.device)


# -- tuning ---------------------------------------------------------------------------------------


@dataclass
class SuggestConfig:
    """``sftlens suggest RUN``: a Mid-Block LoRA mask proposed from an analysis run alone.

    Rule ``stable-middle/1``: among the blocks in the middle 20-80% of depth, the contiguous ones
    that SFT changed least (dW, CKA, entropy change, probe agreement: each ranked across layers,
    averaged).
    Work: :mod:`sftlens.tuning.suggest`.
    """

    run: str = arg(
        help="run folder of sftlens weights / analyze / probe / demo (reads metrics.csv)",
        positional=True,
    )
    blocks: int = arg(5, help="K depth blocks; the mask has K characters, leftmost = bottom")
    width: int = arg(
        0,
        help="blocks in the mask (0: automatic, the least-changed block widened by neighbours "
        "that changed less than the average layer, up to --max-width)",
    )
    max_width: int = arg(3, help="most blocks the automatic width may take")
    min_depth: float = arg(
        0.2, help="candidates are the blocks centred at or above this relative depth (0-0.5)"
    )
    max_depth: float = arg(
        0.8, help="... and at or below this relative depth (0.5-1; 0 and 1: the data alone)"
    )
    save: bool = arg(True, help="write suggestion.json and its report section into RUN")

    def __post_init__(self) -> None:
        _check(self.blocks >= 1, f"--blocks must be >= 1, got {self.blocks}")
        _check(self.width >= 0, f"--width must be >= 0, got {self.width}")
        _check(
            self.width <= self.blocks,
            f"--width must be <= --blocks, got {self.width} > {self.blocks}",
        )
        _check(self.max_width >= 1, f"--max-width must be >= 1, got {self.max_width}")
        _check(0 <= self.min_depth <= 0.5, f"--min-depth must be in [0, 0.5], got {self.min_depth}")
        _check(0.5 <= self.max_depth <= 1, f"--max-depth must be in [0.5, 1], got {self.max_depth}")


@dataclass
class SweepConfig(TuneConfig):
    """``sftlens sweep MODEL --masks 11111,01000,...``: tune and score each mask, compared.

    Every training option of :class:`TuneConfig` applies to each mask alike (same seed, data
    order, steps and, with budget matching, total rank). Work: :mod:`sftlens.tuning.sweep`.
    """

    _command: ClassVar[str] = "sweep"

    out: str = arg("runs/sweep", help="run folder (sweep.csv, report; one tune/ folder per mask)")
    mask: str = field(default="11111", init=False, repr=False)  # each item sets its own
    masks: str = arg(
        "11111,10000,01000,00100,00010,00001,01100,01110",
        help="comma-separated masks of --blocks characters (leftmost = bottom block), 'all' "
        "(every non-empty mask), and 'auto' (what sftlens suggest proposes from --from RUN); "
        "the all-layers baseline always runs first",
    )
    from_run: str | None = arg(
        None, aliases=("--from",), help="analysis run folder whose evidence 'auto' reads"
    )
    seeds: str = arg("0", help="seeds to repeat every mask with (e.g. 0,1: see run-to-run noise)")
    heldout: int = arg(64, help="test problems for the held-out answer_nll / answer_token_acc")
    gsm8k: int = arg(0, help="also score greedy GSM8K accuracy on the first N test problems")
    shots: int = shots_arg()
    chat: bool = chat_arg()
    max_new_tokens: int = max_new_tokens_arg()
    fewshot_data: str | None = fewshot_data_arg()
    eval_batch_size: int = arg(16, help="sequences generated together for --gsm8k")

    def __post_init__(self) -> None:
        from sftlens.tuning.sweep import parse_masks, parse_seeds

        shared = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(TuneConfig)
            if f.init and f.name != "from_run"
        }
        TuneConfig(**shared)  # the training options, checked as tune checks them
        self.dtype = _dtype(self.dtype, self.device, self.auto_cuda_dtype())
        masks = parse_masks(self.masks, self.blocks)
        _check(
            "auto" not in masks or bool(self.from_run),
            "--masks auto needs --from RUN_DIR (an analysis run folder)",
        )
        parse_seeds(self.seeds)
        _check(self.heldout >= 1, f"--heldout must be >= 1, got {self.heldout}")
        _check(self.gsm8k >= 0, f"--gsm8k must be >= 0, got {self.gsm8k}")
        check_generation(self)
        _check(
            self.eval_batch_size >= 1,
            f"--eval-batch-size must be >= 1, got {self.eval_batch_size}",
        )


@dataclass
class DpoConfig(TuneConfig):
    """``sftlens dpo MODEL``: preference tuning (DPO, through TRL) after SFT, on GSM8K pairs.

    Each train problem is sampled ``--samples-per-problem`` times from MODEL; the gold worked
    answer is *chosen*, the first sample that is wrong under both strict and flexible scoring is
    *rejected* (problems without a wrong sample are skipped). Then DPO with LoRA on the layers of
    ``--mask`` (rank and alpha as ``tune``; the reference is the model with the adapter off), or
    ``--full``. Work: :mod:`sftlens.tuning.dpo` (pairs: :mod:`sftlens.tuning.preference`).
    """

    _command: ClassVar[str] = "dpo"

    out: str = arg(
        "runs/dpo",
        help="output folder: a Hugging Face model folder (LoRA merged into the weights), "
        "pairs.jsonl, samples.jsonl, trainer_state.json",
    )
    max_examples: int | None = arg(
        256,
        aliases=("--pairs",),
        help="train problems to sample (the first N of the split); those with a wrong sample "
        "become pairs",
    )
    lr: float = arg(5e-6, help="peak learning rate (AdamW)")
    save_every: int = arg(
        0,
        help="also save the model (merged) as OUT/checkpoint-STEP every N steps (0: only at the end)",
    )
    full: bool = arg(
        False,
        help="train every parameter (the reference is a frozen copy of MODEL) instead of LoRA "
        "on the layers of --mask",
    )
    beta: float = arg(0.1, help="DPO beta: how far the policy may move from the reference")
    samples_per_problem: int = arg(
        4, help="answers sampled per problem; the first wrong one is the rejected answer"
    )
    temperature: float = arg(1.0, help="sampling temperature of the answers")
    top_p: float = arg(1.0, help="nucleus sampling: keep the most likely tokens up to this mass")
    max_new_tokens: int = arg(256, help="a sampled answer stops after this many new tokens")
    sample_batch_size: int = arg(16, help="answers generated together")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            not self.full or self.mask.strip() == "11111",
            f"--full trains every parameter, so --mask {self.mask} means nothing; drop one of them",
        )
        _check(self.beta > 0, f"--beta must be > 0, got {self.beta}")
        _check(
            self.samples_per_problem >= 1,
            f"--samples-per-problem must be >= 1, got {self.samples_per_problem}",
        )
        _check(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _check(
            self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"
        )
        _check(
            self.sample_batch_size >= 1,
            f"--sample-batch-size must be >= 1, got {self.sample_batch_size}",
        )

    def auto_cuda_dtype(self) -> str:
        """Full DPO keeps float32 master weights, as ``sft``; LoRA a bf16 frozen base."""
        return "float32" if self.full else "bfloat16"
