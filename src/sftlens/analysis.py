"""``sftlens analyze``: the orchestration behind :func:`sftlens.api.run_analyze`.

Resolve both models and check that they are a pair, read the prompts, record the run's inputs
(a rerun with the same inputs is skipped: :class:`sftlens.run.RunFolder`), then choose how the
pass runs from a memory estimate made before any weight is read (:func:`plan_memory`):

- in memory (:func:`sftlens.representations.run_pass`): both models whole, batch after batch,
  checkpointing the accumulators every 8 batches so that a killed run resumes;
- layer-major (``--stream-layers``, :mod:`sftlens.streaming`): one block of each model at a
  time, activations between blocks in memory or spilled to a scratch file; each finished
  layer's rows are kept in the run folder, so a killed run does not recompute their metrics.

Either way ``--layers`` / ``--every`` keep the accumulators of a subset of layers only, and
under ``torchrun`` each rank takes its share of the batches (accumulators all-reduced).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlens.config import AnalyzeConfig
from sftlens.errors import SftlensError
from sftlens.memory import Budget, available_memory, parse_size
from sftlens.models.loading import resolve_model
from sftlens.run import RunFolder, fingerprint

log = logging.getLogger("sftlens")

# options that change no number (``layers`` and ``every`` do: they decide which rows exist)
ANALYZE_NOT_HASHED = {
    "base",
    "sft",
    "out",
    "progress",
    "device",
    "allow_pickle",
    "stream_layers",
    "activations",
    "max_memory",
}
STATE = ".analyze_state"  # the in-memory pass's accumulators (safetensors)
LAYER_ROWS = ".analyze_layers.json"  # the layer-major pass's finished layers
SPILL = ".analyze_activations"  # the layer-major pass's scratch file


def select_layers(text: str, every: int, num_layers: int) -> list[int]:
    """The layers an analysis keeps: ``-1`` (the embedding output) and the blocks that
    ``--layers`` selects (all by default), thinned to every ``every``-th.

    >>> select_layers("", 1, 4)
    [-1, 0, 1, 2, 3]
    >>> select_layers("0:8,24:32", 2, 32)
    [-1, 0, 2, 4, 6, 24, 26, 28, 30]
    >>> select_layers("1:9", 2, 12)
    [-1, 1, 3, 5, 7]
    """
    from sftlens.layers import parse_layer_selection

    chosen = (
        list(parse_layer_selection(text, num_layers).layers)
        if text.strip()
        else list(range(num_layers))
    )
    return [-1, *chosen[::every]]


@dataclass(frozen=True)
class Plan:
    """How the pass runs: ``stream`` (layer-major), ``spill`` (activations on disk), and the
    budget it was chosen by."""

    stream: bool
    spill: bool
    budget: Budget


def _element_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def plan_memory(
    cfg: AnalyzeConfig,
    readers: Sequence[Any],
    config: Any,
    batch_shapes: Sequence[tuple[int, int]],
    keep: Sequence[int],
    available: int,
) -> Plan:
    """Estimate what each way of running holds and choose one (see the module doc), or refuse
    with a one-line :class:`SftlensError` that names the fix.

    ``batch_shapes``: ``(prompts, tokens)`` of each batch this process runs, longest first.
    The estimate counts both models' weights (from the checkpoint headers), the float64
    accumulators of the layers kept (``3 d^2`` for token CKA plus one pooled row per prompt
    and model), and activations: for the in-memory pass every layer's states (and attention
    weights) of the largest batch, for the layer-major pass every batch's states of one layer.
    """
    from sftlens.models import surgery

    elt = _element_size(cfg.dtype)
    d = surgery.hidden_size(config)
    heads = surgery.num_heads(config)
    layers = surgery.num_layers(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inter = int(getattr(text, "intermediate_size", None) or 4 * d)
    spec = surgery.arch_spec(config)
    models = 0
    blocks: dict[int, int] = {}
    outside = 0
    for reader in readers:
        for key in reader.keys():  # noqa: SIM118  (a reader, not a dict)
            n = 1
            for s in reader.shape(key):
                n *= s
            models += n * elt
            found = surgery.block_key(spec, key)
            if found is not None:
                blocks[found[0]] = blocks.get(found[0], 0) + n * elt
            elif surgery.classify_param(spec, key).group != "lm_head":
                outside += n * elt
    biggest_block = max(blocks.values(), default=0)
    prompts = sum(b for b, _ in batch_shapes)
    per_layer = layer_accumulator_bytes(d, prompts)
    compute = 8 * 3 * d * d  # rows(): a layer's metrics from its moments
    b, t = batch_shapes[0] if batch_shapes else (0, 0)
    attn = 2 * b * heads * t * t * elt if cfg.attention else 0  # both models, one layer
    block_work = 2 * (b * t * (3 * d + 2 * inter) * elt + 2 * b * heads * t * t * elt)
    rows64 = 2 * b * t * d * 8
    in_memory = Budget(
        "in memory",
        {
            "models": models,
            f"accumulators of {len(keep)} layers": len(keep) * per_layer + compute,
            "activations of one batch": 2 * (layers + 1) * b * t * d * elt
            + layers * attn
            + rows64
            + block_work,
        },
        available,
    )
    tokens = sum(bb * tt for bb, tt in batch_shapes)
    masks = 2 * sum(bb * tt * tt for bb, tt in batch_shapes) * (elt if cfg.attention else 1)
    acts = 2 * tokens * d * elt
    fixed = {
        "embeddings and norms": outside,
        "one block of each model": 2 * biggest_block,
        "accumulators of one layer": per_layer + compute,
        "block arguments": masks,
        "one batch through a block": attn + rows64 + block_work + 2 * b * t * d * elt,
    }
    stream_mem = Budget("layer-major", {**fixed, "activations in memory": acts}, available)
    stream_disk = Budget("layer-major", {**fixed, "activations on disk": 0}, available)
    fixes = "--layers / --every (fewer layers), or fewer --max-prompts / a smaller --batch-size"
    if cfg.stream_layers is False or (cfg.stream_layers is None and in_memory.fits):
        if not in_memory.fits:
            raise SftlensError(
                f"analyze would hold {in_memory.describe()}; pass --stream-layers "
                f"(one block at a time), {fixes}"
            )
        log.info("analyze %s", in_memory.describe())
        return Plan(False, False, in_memory)
    if cfg.stream_layers is None:
        log.info(
            "analyze: --stream-layers chosen, the in-memory run would not fit (%s)",
            in_memory.describe(),
        )
    if cfg.activations == "memory" or (cfg.activations == "auto" and stream_mem.fits):
        plan = Plan(True, False, stream_mem)
    else:
        plan = Plan(True, True, stream_disk)
    if not plan.budget.fits:
        how = "" if plan.spill else "--activations disk, "
        raise SftlensError(
            f"analyze --stream-layers would hold {plan.budget.describe()}; pass {how}"
            "a smaller --batch-size or --max-length, or fewer --max-prompts"
        )
    log.info("analyze %s", plan.budget.describe())
    return plan


def layer_accumulator_bytes(hidden: int, prompts: int) -> int:
    """Bytes one layer's float64 accumulators of a pair hold: ``3 d^2`` for token CKA, one
    pooled row per prompt and model, and a few vectors.

    >>> layer_accumulator_bytes(4, 10)
    1280
    """
    d = hidden
    return 8 * (3 * d * d + 2 * prompts * d + 8 * d)


def analysis_texts(cfg: AnalyzeConfig) -> list[str]:
    """The texts an analysis feeds both models: ``--data``/``--split``/``--max-prompts``, each
    question alone (``--text question``) or with its worked answer (``qa``)."""
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target

    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_prompts)
    return [
        format_question(e.question) + (format_target(e.answer) if cfg.text == "qa" else "")
        for e in examples
    ]


def run_analyze(cfg: AnalyzeConfig, run: RunFolder | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from sftlens import representations, streaming
    from sftlens.distributed import init_from_env, is_main
    from sftlens.io import (
        EXPERTS_COLUMNS,
        atomic_write_json,
        config_hash,
        read_json,
        update_rows_csv,
        write_rows_csv,
    )
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
    from sftlens.models.pair import check_pair
    from sftlens.reporting.plots import plot_heads, plot_representations

    rank, world = init_from_env()
    run = run or RunFolder(cfg.out)
    base_dir = resolve_model(cfg.base, allow_pickle=cfg.allow_pickle)
    sft_dir = resolve_model(cfg.sft, allow_pickle=cfg.allow_pickle)
    readers = (CheckpointReader(base_dir), CheckpointReader(sft_dir))
    info = check_pair(readers[0].config, readers[1].config)
    keep = select_layers(cfg.layers, cfg.every, info.num_layers)
    texts = analysis_texts(cfg)
    prints = {"base": fingerprint(base_dir), "sft": fingerprint(sft_dir)}
    if is_main():
        run.save_config(
            models={"base": cfg.base, "sft": cfg.sft},
            fingerprints=prints,
            analyze=dataclasses.asdict(cfg),
            world_size=world,
        )
    inputs = {
        "fingerprints": {k: v["files"] for k, v in prints.items()},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ANALYZE_NOT_HASHED},
        "texts": config_hash(texts),
    }
    key = config_hash(inputs)

    def compute() -> list[dict[str, Any]]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_dir)
        tok = load_tokenizer(base_dir)
        batches = config_batches(cfg, tok, texts)
        mine = [tuple(b.input_ids.shape) for i, b in enumerate(batches) if i % world == rank]
        plan = plan_memory(
            cfg,
            readers,
            config,
            mine,
            keep,
            memory_budget(cfg),
        )

        def make_pass(layers: list[int]) -> representations.RepresentationPass:
            return config_pass(cfg, info.num_layers, info.hidden_size, config, layers)

        if plan.stream:
            rows, heads, experts = _stream(plan, batches, make_pass)
        else:
            rows, heads, experts = _in_memory(make_pass)
        if is_main():
            write_rows_csv(
                run.path / "heads.csv", heads, ("model", "layer", "head", "metric", "value")
            )
            if experts or (run.path / "experts.csv").is_file():  # weights' rows are kept
                update_rows_csv(
                    run.path / "experts.csv", experts, EXPERTS_COLUMNS, replace={"route_load"}
                )
            run.write_summary(
                {
                    "pair": dataclasses.asdict(info),
                    "analyze": _analyze_summary(rows, len(texts), info.num_layers),
                }
            )
        return rows

    def _stream(
        plan: Plan, batches: list[Any], make_pass: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        saved_file = run.path / LAYER_ROWS
        saved: dict[str, Any] = {}
        if world == 1 and saved_file.is_file():
            try:
                data = read_json(saved_file)
            except ValueError:  # a torn file: recompute rather than trust it
                data = {}
            if data.get("key") == key:
                saved = data.get("layers", {})
        done = frozenset(int(layer) for layer in saved) & frozenset(keep)
        if done:
            log.info("analyze: %d finished layers kept from the interrupted run", len(done))

        def on_layer(
            layer: int,
            rows: list[dict[str, Any]],
            heads: list[dict[str, Any]],
            experts: list[dict[str, Any]],
        ) -> None:
            if world == 1:
                saved[str(layer)] = {"rows": rows, "heads": heads, "experts": experts}
                atomic_write_json(saved_file, {"key": key, "layers": saved})

        rows: list[dict[str, Any]] = []
        heads: list[dict[str, Any]] = []
        experts: list[dict[str, Any]] = []
        for layer in sorted(done):
            rows += saved[str(layer)]["rows"]
            heads += saved[str(layer)]["heads"]
            experts += saved[str(layer)].get("experts", [])
        if set(keep) - done:
            new_rows, new_heads, new_experts = streaming.stream_pass(
                base_dir,
                sft_dir,
                batches,
                make_pass=make_pass,
                keep=keep,
                dtype=resolve_dtype(cfg.dtype),
                device=resolve_device(cfg.device),
                attention=cfg.attention,
                spill=run.path / f"{SPILL}.{rank}.bin" if plan.spill else None,
                rank=rank,
                world_size=world,
                done=done,
                on_layer=on_layer,
                progress=cfg.progress and is_main(),
            )
            rows += new_rows
            heads += new_heads
            experts += new_experts
        saved_file.unlink(missing_ok=True)
        return rows, heads, experts

    def _in_memory(
        make_pass: Any,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        attn = "eager" if cfg.attention else None
        base, tok = load_model(
            base_dir, dtype=cfg.dtype, device=cfg.device, attn_implementation=attn
        )
        sft_model, _ = load_model(
            sft_dir, dtype=cfg.dtype, device=cfg.device, attn_implementation=attn
        )
        acc = make_pass(keep)
        # one file holds the accumulators AND the inputs key and next batch (safetensors
        # metadata): one rename makes a checkpoint, so a crash can never pair a newer state
        # with an older batch index (which would count batches twice)
        state_file = run.path / f"{STATE}.safetensors"
        start = 0
        saved = _read_state_meta(state_file) if world == 1 else None
        if saved is not None and saved.get("key") == key:
            acc.load_state_dict(load_file(str(state_file)))
            start = int(saved["next_batch"])

        def checkpoint(i: int, state: representations.RepresentationPass) -> None:
            if world == 1 and (i + 1) % 8 == 0:  # every 8 batches: a crash loses little
                tmp = state_file.with_suffix(".tmp")
                save_file(
                    {k: v.contiguous() for k, v in state.state_dict().items()},
                    str(tmp),
                    metadata={"key": key, "next_batch": str(i + 1)},
                )
                tmp.replace(state_file)

        with torch.inference_mode():
            representations.run_pass(
                base,
                sft_model,
                tok,
                texts,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                truncate=cfg.truncate,
                padding_side=cfg.padding_side,
                progress=cfg.progress and is_main(),
                rank=rank,
                world_size=world,
                state=acc,
                start_batch=start,
                on_batch=checkpoint,
            )
        acc.all_reduce_()
        rows, heads = acc.rows()
        state_file.unlink(missing_ok=True)
        return rows, heads, acc.expert_rows()

    rows = run.step("analyze", inputs, compute, write=is_main())
    if is_main():
        plot_representations(rows, run.path / "plots")
        if (run.path / "heads.csv").is_file():
            with open(run.path / "heads.csv", newline="") as f:
                plot_heads(list(csv.DictReader(f)), run.path / "plots" / "attention_heads_js.png")
        from sftlens.api import report

        report(run.path)
    return run.path


def _read_state_meta(path: Path) -> dict[str, str] | None:
    """The ``key`` and ``next_batch`` stored with an analyze checkpoint, or None."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a torn or foreign file: start over rather than resume from it
        return None


def _analyze_summary(
    rows: list[dict[str, Any]], n_prompts: int, num_layers: int | None = None
) -> dict[str, Any]:
    """summary.json's ``analyze`` part; ``num_layers`` (default: the deepest layer with a
    row, plus one) scales the relative depths, so a subset of layers keeps the model's depths."""
    from sftlens.reporting.plots import series

    cka = series(rows, "cka")
    depth = num_layers or len(cka)
    out: dict[str, Any] = {"prompts": n_prompts, "cka_by_layer": cka}
    for threshold in (0.98, 0.9):
        first = next((i for i, v in enumerate(cka) if v < threshold), None)
        out[f"cka_first_below_{threshold}"] = (
            None if first is None else {"layer": first, "relative_depth": (first + 0.5) / depth}
        )
    # layers where one feature carries most of the base token variance: plain CKA saturates there
    share = series(rows, "top_feature_share", model="base")
    out["massive_feature_layers"] = [i for i, v in enumerate(share) if v > 0.5]
    return out


def config_batches(cfg: AnalyzeConfig, tok: Any, texts: Sequence[str]) -> list[Any]:
    """The padded batches of ``texts`` as the analyze options ask (shared with trajectory)."""
    from sftlens import representations

    return representations.pass_batches(
        tok,
        texts,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        truncate=cfg.truncate,
        padding_side=cfg.padding_side,
    )


def memory_budget(cfg: AnalyzeConfig) -> int:
    """Bytes the run may use: ``--max-memory``, else free GPU memory on a GPU (weights and
    activations live there), else the memory available to this process."""
    import torch

    from sftlens.models.loading import resolve_device

    budget = parse_size(cfg.max_memory)
    if budget is None and resolve_device(cfg.device).startswith("cuda"):
        budget = torch.cuda.mem_get_info()[0]
    return budget if budget is not None else available_memory()


def config_pass(
    cfg: AnalyzeConfig, num_layers: int, hidden: int, config: Any, keep: Sequence[int]
) -> Any:
    """Empty accumulators for the layers ``keep`` with the analyze options, on the models'
    device (the float64 sums live beside them: a GPU's)."""
    from sftlens import representations
    from sftlens.models import surgery
    from sftlens.models.loading import resolve_device

    acc = representations.RepresentationPass(
        num_layers=num_layers,
        hidden=hidden,
        num_heads=surgery.num_heads(config),
        alpha=cfg.alpha,
        preset=cfg.preset,  # type: ignore[arg-type]  # validated by AnalyzeConfig
        pooling=cfg.pooling,
        attention=cfg.attention,
        keep=keep,
        **(representations.moe_settings(config) if cfg.routing else {}),
    )
    acc.to_(resolve_device(cfg.device))
    return acc
