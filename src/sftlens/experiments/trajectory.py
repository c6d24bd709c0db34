"""``sftlens trajectory BASE CKPT1 CKPT2 ...``: when, during training, did each layer move?

For every checkpoint, the weight metrics (:func:`sftlens.weight_diff.weight_diff`, streamed
from the files) and the representation metrics (:class:`sftlens.representations.RepresentationPass`,
as ``analyze`` computes them) against BASE (``against=base``: cumulative) and against the
previous checkpoint (``against=previous``: one stage; the first checkpoint's previous is BASE,
so its two sets of rows are equal). In ``previous`` rows the ``base`` model is the previous
checkpoint.

One folder of ``checkpoint-STEP`` subfolders (``sftlens sft --save-every N``, transformers'
Trainer) stands for them, ordered by step (:func:`expand_checkpoints`).

The representation pass runs BASE once per batch for all checkpoints that fit in memory
together: per batch BASE's states are captured once, then each checkpoint's in training order,
each checkpoint's states feeding its ``base`` pair and, with the states of the checkpoint
before it (kept for that batch only), its ``previous`` pair. When the checkpoints do not fit
together (:func:`plan_groups`, from the weights' sizes in the checkpoint headers and the
activations of the largest batch, against ``--max-memory`` or what the machine has), they run
in groups that do: BASE runs again for each group, and the checkpoint before a group runs with
it so that its first ``previous`` pair has its states. What it does is logged.

Output: ``trajectory.csv`` (``checkpoint, step, against, model, layer, metric, value``), plots,
``summary.json``'s ``trajectory`` part and a report section. A rerun with the same inputs
(checkpoints, their files, prompts and options) does nothing; any change, adding a checkpoint
included, recomputes the whole trajectory.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlens.config import TrajectoryConfig
from sftlens.errors import SftlensError
from sftlens.io import read_json

log = logging.getLogger("sftlens.trajectory")

Row = dict[str, Any]
COLUMNS = ("checkpoint", "step", "against", "model", "layer", "metric", "value")
AGAINST = ("base", "previous")
CSV_NAME = "trajectory.csv"
# the heatmaps: (metric, model) per panel
HEATMAPS = (
    ("dw_attn", "pair"),
    ("dw_mlp", "pair"),
    ("cka_std", "pair"),
    ("prompt_entropy_norm", "sft"),
)
# per layer "when did it move": the change of these metrics against BASE
HALF_CHANGE = ("dw_block", "dw_attn", "dw_mlp", "cka_std")


@dataclass(frozen=True)
class Point:
    """One checkpoint of the trajectory: its name as given, its model folder, its step, and its
    training phase (0, then 1 after the first checkpoint whose own step restarts: DPO after
    SFT; see :func:`phase_steps`)."""

    name: str
    path: Path
    step: int
    phase: int = 0


def read_step(folder: Path) -> int | None:
    """The training step recorded in ``folder/trainer_state.json`` (``step``: sftlens,
    ``global_step``: transformers' Trainer), else the ``N`` of a folder named
    ``checkpoint-N``, else None.

    >>> read_step(Path("/nowhere/checkpoint-120")), read_step(Path("/nowhere/final"))
    (120, None)
    """
    state = folder / "trainer_state.json"
    data = None
    if state.is_file():
        try:
            data = read_json(state)
        except ValueError:
            data = None
    for key in ("step", "global_step"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    named = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(named.group(1)) if named else None


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def expand_checkpoints(given: Sequence[str]) -> list[tuple[str, int | None]]:
    """``(name, step or None)`` of each checkpoint, in training order.

    Checkpoints given one by one keep their order. A single folder holding ``checkpoint-STEP``
    subfolders stands for them, ordered by step (not by name), followed by the folder itself
    when it is a finished model folder with its own ``trainer_state.json`` (an ``sftlens sft``
    output) whose step is not one of its checkpoints'.

    >>> expand_checkpoints(["a", "b"])
    [('a', None), ('b', None)]
    """
    from sftlens.models.checkpoint import list_checkpoints

    if len(given) == 1:
        folder = Path(given[0]).expanduser()
        if folder.is_dir():
            found = list_checkpoints(folder)
            if found:
                out: list[tuple[str, int | None]] = [(str(p), step) for step, p in found]
                own = read_step(folder)
                if (
                    _is_model_folder(folder)
                    and (folder / "trainer_state.json").is_file()
                    and own not in {step for step, _ in found}
                ):
                    out.append((given[0], own))
                return out
            if not _is_model_folder(folder):
                raise SftlensError(
                    f"{folder} holds no checkpoint-STEP subfolders (with trainer_state.json) and "
                    "no model (config.json + safetensors); pass checkpoint folders, or the --out "
                    "folder of sftlens sft --save-every N or of a transformers Trainer run"
                )
    out = []
    for name in given:
        path = Path(name).expanduser()
        out.append((name, read_step(path)))
    return out


def plan_groups(
    model_bytes: Sequence[int],
    *,
    base: int,
    states: int,
    accumulators: int,
    available: int,
) -> list[list[int]]:
    """Consecutive groups of checkpoint indices that fit in ``available`` bytes together.

    A group holds BASE (``base`` bytes), its checkpoints and the one before it (their
    ``model_bytes``), three models' activations of a batch (``states``: BASE's, the previous
    checkpoint's, the current one's) and two passes of accumulators per checkpoint.

    >>> plan_groups([4, 4, 4], base=4, states=1, accumulators=0, available=100)
    [[0, 1, 2]]
    >>> plan_groups([4, 4, 4], base=4, states=1, accumulators=0, available=15)
    [[0, 1], [2]]
    """

    def need(group: list[int]) -> int:
        carry = model_bytes[group[0] - 1] if group[0] > 0 else 0
        own = sum(model_bytes[i] for i in group)
        return base + carry + own + 3 * states + 2 * len(group) * accumulators

    groups: list[list[int]] = []
    for i in range(len(model_bytes)):
        if groups and need([*groups[-1], i]) <= available:
            groups[-1].append(i)
            continue
        if need([i]) > available:
            from sftlens.memory import format_bytes

            raise SftlensError(
                f"trajectory needs {format_bytes(need([i]))} for BASE and one checkpoint, "
                f"{format_bytes(available)} available; pass a smaller --batch-size or "
                "--max-length, fewer --max-prompts or --layers, or a larger --max-memory"
            )
        groups.append([i])
    return groups


def half_change_step(values: Sequence[float], steps: Sequence[int]) -> int | None:
    """The first step at which a change reaches half of its value at the last checkpoint
    ("when did this layer move"); None when the last change is zero or not a number.

    >>> half_change_step([0.1, 0.3, 0.5, 1.0], [10, 20, 30, 40])
    30
    >>> half_change_step([0.0, 0.0], [1, 2]) is None
    True
    """
    if not values:
        return None
    final = values[-1]
    if not math.isfinite(final) or final <= 0:
        return None
    return next(s for v, s in zip(values, steps) if math.isfinite(v) and v >= 0.5 * final)


def change_values(
    rows: Sequence[Row], metric: str, against: str = "base"
) -> dict[int, list[float]]:
    """Per layer (>= 0), the change of ``metric`` at each checkpoint in order: the value for
    dW, ``1 - value`` for CKA; nan where a checkpoint has no row."""
    points: list[tuple[str, int]] = []
    for r in rows:
        key = (r["checkpoint"], r["step"])
        if key not in points:
            points.append(key)
    table: dict[int, dict[tuple[str, int], float]] = {}
    for r in rows:
        if r["metric"] == metric and r["against"] == against and r["model"] == "pair":
            layer = r["layer"]
            if layer is not None and layer >= 0:
                v = float(r["value"])
                table.setdefault(layer, {})[(r["checkpoint"], r["step"])] = (
                    1 - v if metric.startswith("cka") else v
                )
    return {layer: [table[layer].get(p, float("nan")) for p in points] for layer in sorted(table)}


def summarize(rows: Sequence[Row], points: Sequence[Point], num_layers: int) -> dict[str, Any]:
    """summary.json's ``trajectory`` part: per layer the half-change step of each metric of
    :data:`HALF_CHANGE` (against BASE), and per stage the layer that moved most."""
    steps = [p.step for p in points]
    half = {}
    for metric in HALF_CHANGE:
        values = change_values(rows, metric)
        if values:
            half[metric] = [half_change_step(values[layer], steps) for layer in sorted(values)]
    stages = []
    for p in points:
        stage: dict[str, Any] = {"checkpoint": p.name, "step": p.step}
        for metric in ("dw_block", "cka_std"):
            by_layer = {
                r["layer"]: (1 - r["value"] if metric == "cka_std" else r["value"])
                for r in rows
                if r["checkpoint"] == p.name
                and r["step"] == p.step
                and r["against"] == "previous"
                and r["metric"] == metric
                and r["model"] == "pair"
                and r["layer"] is not None
                and r["layer"] >= 0
                and math.isfinite(r["value"])
            }
            if by_layer:
                top = max(by_layer, key=lambda layer: by_layer[layer])
                stage[metric] = {
                    "layer": top,
                    "relative_depth": (top + 0.5) / num_layers,
                    "change": by_layer[top],
                }
        stages.append(stage)
    return {
        "checkpoints": [{"checkpoint": p.name, "step": p.step, "phase": p.phase} for p in points],
        "half_change_step": half,
        "most_moved_per_stage": stages,
    }


def read_trajectory_csv(path: Path) -> list[Row]:
    out: list[Row] = []
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            out.append(
                {
                    "checkpoint": r["checkpoint"],
                    "step": int(r["step"]),
                    "against": r["against"],
                    "model": r["model"],
                    "layer": int(r["layer"]) if r["layer"] != "" else None,
                    "metric": r["metric"],
                    "value": float(r["value"]) if r["value"] != "" else float("nan"),
                }
            )
    return out


def run_trajectory(cfg: TrajectoryConfig, run: Any = None) -> Path:
    from sftlens.analysis import ANALYZE_NOT_HASHED, analysis_texts, select_layers
    from sftlens.io import config_hash, write_rows_csv
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.loading import resolve_model
    from sftlens.models.pair import check_pair
    from sftlens.run import RunFolder, fingerprint

    run = run or RunFolder(cfg.out)
    base_dir = resolve_model(cfg.base, allow_pickle=cfg.allow_pickle)
    points = trajectory_points(cfg)
    base_reader = CheckpointReader(base_dir)
    info = None
    for p in points:
        with CheckpointReader(p.path) as reader:
            try:
                info = check_pair(base_reader.config, reader.config)
            except SftlensError as exc:
                raise SftlensError(f"checkpoint {p.name} does not match BASE: {exc}") from None
    assert info is not None
    keep = select_layers(cfg.layers, cfg.every, info.num_layers)
    texts = analysis_texts(cfg)
    base_print = fingerprint(base_dir)
    point_prints = [fingerprint(p.path) for p in points]
    prints: dict[str, Any] = {"base": base_print, "checkpoints": point_prints}
    run.save_config(
        models={"base": cfg.base, "checkpoints": [p.name for p in points]},
        fingerprints=prints,
        trajectory=dataclasses.asdict(cfg),
    )
    not_hashed = ANALYZE_NOT_HASHED | {"checkpoints"}
    inputs = {
        "base": base_print["files"],
        "checkpoints": [[p.name, p.step, f["files"]] for p, f in zip(points, point_prints)],
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in not_hashed},
        "texts": config_hash(texts),
    }
    key = config_hash(inputs)
    done = run.state["steps"].get("trajectory")
    csv_path = run.path / CSV_NAME
    if done and done.get("hash") == key and csv_path.is_file():
        log.info("trajectory: inputs unchanged, %s kept", csv_path)
        rows = read_trajectory_csv(csv_path)
    else:
        t0 = time.perf_counter()
        rows = _weight_rows(cfg, base_dir, points)
        rows += _representation_rows(cfg, base_dir, base_reader, points, info, keep, texts)
        write_rows_csv(csv_path, rows, COLUMNS)
        run.state["steps"]["trajectory"] = {
            "hash": key,
            "inputs": inputs,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        run.save_config()
        run.write_summary(
            {
                "pair": dataclasses.asdict(info),
                "trajectory": {
                    "prompts": len(texts),
                    **summarize(rows, points, info.num_layers),
                },
            }
        )
    base_reader.close()
    from sftlens.reporting.plots import plot_half_change, plot_trajectory

    starts = [p.step for i, p in enumerate(points) if i and p.phase != points[i - 1].phase]
    plot_trajectory(rows, run.path / "plots", phase_starts=starts)
    plot_half_change(
        run.summary().get("trajectory", {}), run.path / "plots" / "trajectory_half_change.png"
    )
    from sftlens.api import report

    report(run.path)
    return Path(run.path)


def _tag(rows: Sequence[Row], p: Point, against: str) -> list[Row]:
    return [{"checkpoint": p.name, "step": p.step, "against": against, **r} for r in rows]


def _weight_rows(cfg: TrajectoryConfig, base_dir: Path, points: Sequence[Point]) -> list[Row]:
    """Weight metrics of every checkpoint against BASE and against the one before it."""
    from sftlens.weight_diff import weight_diff

    out: list[Row] = []
    for i, p in enumerate(points):
        cumulative = weight_diff(base_dir, p.path, progress=cfg.progress).rows
        out += _tag(cumulative, p, "base")
        stage = (
            cumulative
            if i == 0
            else weight_diff(points[i - 1].path, p.path, progress=cfg.progress).rows
        )
        out += _tag(stage, p, "previous")
    return out


def _representation_rows(
    cfg: TrajectoryConfig,
    base_dir: Path,
    base_reader: Any,
    points: Sequence[Point],
    info: Any,
    keep: Sequence[int],
    texts: Sequence[str],
) -> list[Row]:
    import gc

    import torch
    from tqdm.auto import tqdm

    from sftlens import capture as capture_mod
    from sftlens import representations
    from sftlens.analysis import config_batches, config_pass, layer_accumulator_bytes, memory_budget
    from sftlens.memory import Budget, nbytes
    from sftlens.models import surgery
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.loading import load_model, load_tokenizer, resolve_device

    tok = load_tokenizer(base_dir)
    batches = config_batches(cfg, tok, texts)
    device = resolve_device(cfg.device)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    d, heads, layers = info.hidden_size, surgery.num_heads(config), info.num_layers
    elt = 4 if cfg.dtype == "float32" else 2

    def weights_bytes(reader: Any) -> int:
        return nbytes((reader.shape(k) for k in reader.keys()), elt)  # noqa: SIM118

    model_bytes = []
    for p in points:
        with CheckpointReader(p.path) as reader:
            model_bytes.append(weights_bytes(reader))
    b, t = batches[0].input_ids.shape  # longest first: the largest batch
    states = (layers + 1) * b * t * d * elt + 2 * b * t * d * 8
    if cfg.attention:
        states += layers * b * heads * t * t * elt
    acc_bytes = len(keep) * layer_accumulator_bytes(d, len(texts))
    available = memory_budget(cfg)
    groups = plan_groups(
        model_bytes,
        base=weights_bytes(base_reader),
        states=states,
        accumulators=acc_bytes,
        available=available,
    )
    first = groups[0]
    log.info(
        "trajectory %s",
        Budget(
            f"{len(points)} checkpoints in {len(groups)} group(s) of up to "
            f"{max(len(g) for g in groups)}",
            {
                "models": weights_bytes(base_reader) + sum(model_bytes[i] for i in first),
                "activations of one batch (3 models)": 3 * states,
                f"accumulators of {2 * len(first)} pairs": 2 * len(first) * acc_bytes,
            },
            available,
        ).describe(),
    )
    if len(groups) > 1:
        log.info(
            "trajectory: the checkpoints do not fit in memory together: BASE runs once per "
            "batch for each of %d groups (%s), each group's previous checkpoint with it",
            len(groups),
            ", ".join(f"{g[0] + 1}-{g[-1] + 1}" for g in groups),
        )

    def make_pass() -> representations.RepresentationPass:
        return config_pass(cfg, layers, d, config, keep)

    def load(path: Path) -> Any:
        model, _ = load_model(
            path,
            dtype=cfg.dtype,
            device=cfg.device,
            attn_implementation="eager" if cfg.attention else None,
            allow_pickle=cfg.allow_pickle,
        )
        return model

    base = load(base_dir)
    out: list[Row] = []
    for g, group in enumerate(groups):
        carry = group[0] - 1
        models = {i: load(points[i].path) for i in ([carry] if carry >= 0 else []) + group}
        passes = {
            (i, against): make_pass()
            for i in group
            for against in AGAINST
            if not (i == 0 and against == "previous")  # the first's previous is BASE
        }
        # each model's own statistics (prompt entropy, pooled rows) are fed once: BASE's by
        # the group's first pair, a checkpoint's by its pair against BASE; the other pairs
        # share them (a carried checkpoint's are fed by its pair against the one in the group)
        owner = passes[(group[0], "base")]
        for i in group:
            if i != group[0]:
                passes[(i, "base")].share("base", owner, "base")
            if (i, "previous") in passes:
                passes[(i, "previous")].share("sft", passes[(i, "base")], "sft")
                if i != group[0]:
                    passes[(i, "previous")].share("base", passes[(i - 1, "base")], "sft")
        desc = "trajectory" if len(groups) == 1 else f"trajectory {g + 1}/{len(groups)}"
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not cfg.progress):
                batch = batch.to(device)
                base_out = capture_mod.capture(base, batch, attentions=cfg.attention)
                prev = (
                    capture_mod.capture(models[carry], batch, attentions=cfg.attention)
                    if carry >= 0
                    else base_out
                )
                for i in group:
                    cur = capture_mod.capture(models[i], batch, attentions=cfg.attention)
                    passes[(i, "base")].update(batch, base_out[0], cur[0], base_out[1], cur[1])
                    if (i, "previous") in passes:
                        passes[(i, "previous")].update(batch, prev[0], cur[0], prev[1], cur[1])
                    prev = cur  # the next checkpoint's previous, this batch only
        for i in group:
            rows_base = passes[(i, "base")].rows()[0]
            out += _tag(rows_base, points[i], "base")
            stage = rows_base if i == 0 else passes[(i, "previous")].rows()[0]
            out += _tag(stage, points[i], "previous")
        del models, passes
        gc.collect()
    return out


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of the trajectory section, or None when the run has no trajectory.csv."""
    from sftlens.reporting.html import esc, image

    if not (run / CSV_NAME).is_file():
        return None
    s = summary.get("trajectory", {})
    points = s.get("checkpoints", [])
    body = (
        f"<p>{len(points)} checkpoints (steps "
        f"{esc(', '.join(str(p['step']) for p in points))}) against BASE (cumulative) and "
        f"against the checkpoint before each (one stage), over {esc(s.get('prompts', '?'))} "
        "prompts. Heatmaps: layer (rows) by checkpoint (columns). "
        "<code>trajectory.csv</code> holds every number.</p>"
    )
    for name in ("trajectory_base.png", "trajectory_previous.png", "trajectory_half_change.png"):
        png = run / "plots" / name
        if png.is_file():
            body += image(png, name)
    stages = s.get("most_moved_per_stage", [])
    if stages:
        body += (
            "<h3>Where each stage moved the model most</h3><table><tr><th class=l>checkpoint"
            "</th><th>step</th><th>largest dW (layer, relative depth)</th>"
            "<th>largest 1 - cka_std (layer, relative depth)</th></tr>"
        )
        for st in stages:
            cells = []
            for metric in ("dw_block", "cka_std"):
                hit = st.get(metric)
                cells.append("-" if not hit else f"{hit['layer']} ({hit['relative_depth']:.2f})")
            body += (
                f"<tr><td class=l>{esc(st['checkpoint'])}</td><td>{esc(st['step'])}</td>"
                f"<td>{esc(cells[0])}</td><td>{esc(cells[1])}</td></tr>"
            )
        body += "</table>"
    return ("Training trajectory (when did each layer move)", body)


def phase_steps(steps: Sequence[int | None]) -> list[int]:
    """Steps along a chain of training phases: a checkpoint whose own step does not exceed the
    one before it starts a new phase (e.g. DPO after SFT, whose trainer counts from 0 again),
    and its step is counted on from the previous phase's last step. A missing step is the
    checkpoint's position in the list.

    >>> phase_steps([8, 16, 24, 10, 20])  # SFT to step 24, then DPO steps 10, 20
    [8, 16, 24, 34, 44]
    >>> phase_steps([None, None, 5])
    [1, 2, 5]
    """
    out: list[int] = []
    offset = 0
    for i, raw in enumerate(steps):
        step = (i + 1 if raw is None else raw) + offset
        if out and step <= out[-1]:
            offset = out[-1]
            step = (i + 1 if raw is None else raw) + offset
            if step <= out[-1]:  # a position-numbered checkpoint after a numbered one
                step = out[-1] + 1
        out.append(step)
    return out


def trajectory_points(cfg: TrajectoryConfig) -> list[Point]:
    """The checkpoints a config names, resolved (for callers that want them without a run)."""
    from sftlens.models.loading import resolve_model

    named = expand_checkpoints(cfg.checkpoints)
    steps = phase_steps([s for _, s in named])
    offset, phase, phases = 0, 0, []
    for i, ((name, raw), step) in enumerate(zip(named, steps)):
        if raw is not None and step - raw != offset:
            offset, phase = step - raw, phase + 1
            log.info(
                "%s starts a new training phase (its step %d after step %d): its steps count on from %d",
                name,
                raw,
                steps[i - 1],
                offset,
            )
        phases.append(phase)
    return [
        Point(name, resolve_model(name, allow_pickle=cfg.allow_pickle), step, phase)
        for (name, _), step, phase in zip(named, steps, phases)
    ]


__all__ = [
    "COLUMNS",
    "Point",
    "change_values",
    "expand_checkpoints",
    "half_change_step",
    "phase_steps",
    "plan_groups",
    "read_trajectory_csv",
    "run_trajectory",
    "summarize",
    "trajectory_points",
]
