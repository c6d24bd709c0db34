"""The layer-major pass (``analyze --stream-layers``) and the bounded analysis state.

The layer-major pass must give the in-memory pass's numbers on every supported family (Gemma 3
and OLMo 3 with sliding-window layers narrower than the prompts, GPT-2's learned positions),
with activations in memory or spilled to disk; a subset of layers must give the full run's rows
for those layers; the memory estimate must refuse a run that cannot fit and name the fix.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from sftlens import api
from sftlens.analysis import plan_memory, select_layers
from sftlens.config import AnalyzeConfig
from sftlens.errors import SftlensError
from sftlens.models.checkpoint import CheckpointReader
from sftlens.models.loading import load_model
from sftlens.representations import RepresentationPass, moe_settings, pass_batches, run_pass
from sftlens.streaming import stream_pass
from tiny_models import perturb_all, save_model, tiny_config

TEXTS = [
    "Question: how many 3 + 4 ? Answer: 7 #### 7",
    "Question: the 2 * 5 is ? Answer: 10",
    "how many of the 9",
    "Question: 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 Answer: 4 #### 4",
    "a 1",
    "Question: the 8 - 3 ? Answer: 5 #### 5",
]
FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "olmo3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "mixtral",
    "qwen2_moe",
    "olmoe",
]


def _pair(root: Path, model_type: str) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    base = save_model(model, root / "base")
    perturb_all(model, scale=0.05, seed=2)  # every tensor changes: a wrong one shows
    return base, save_model(model, root / "sft")


def _table(rows) -> dict:
    return {(r["model"], r["layer"], r["metric"]): r["value"] for r in rows}


def _heads(rows) -> dict:
    return {(r["model"], r["layer"], r["head"], r["metric"]): r["value"] for r in rows}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert all(math.isfinite(v) for k, v in want.items() if k[2] != "cka_unbiased"), "NaN rows"
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6, nan_ok=True), k


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_major_pass_equals_in_memory_pass(model_type, tmp_path):
    base_dir, sft_dir = _pair(tmp_path, model_type)
    base, tok = load_model(base_dir, attn_implementation="eager")
    sft, _ = load_model(sft_dir, attn_implementation="eager")
    # left padding: the positions of the real tokens come from the position ids alone
    opts = dict(batch_size=4, max_length=64, padding_side="left")
    ref = run_pass(base, sft, tok, TEXTS, progress=False, **opts)
    want_rows, want_heads = ref.rows()
    layers = ref.num_layers
    batches = pass_batches(tok, TEXTS, **opts)
    assert max(b.attention_mask.sum(-1).max() for b in batches) > 4  # longer than the windows

    def make_pass(keep):
        return RepresentationPass(
            num_layers=layers,
            hidden=ref.hidden,
            num_heads=ref.num_heads,
            keep=keep,
            **moe_settings(base.config),  # MoE families: routing rows too
        )

    rows, heads, experts = stream_pass(
        base_dir,
        sft_dir,
        batches,
        make_pass=make_pass,
        keep=list(range(-1, layers)),
        dtype=torch.float32,
        progress=False,
    )
    _assert_same(_table(rows), _table(want_rows))
    _assert_same(_heads(heads), _heads(want_heads))
    _assert_same(_experts(experts), _experts(ref.expert_rows()))


def _experts(rows) -> dict:
    return {(r["model"], r["layer"], r["expert"], r["metric"]): r["value"] for r in rows}


def test_weights_are_read_once_per_run_not_once_per_batch(tiny_pair, monkeypatch):
    base_dir, sft_dir = tiny_pair
    _, tok = load_model(base_dir)
    reads: list[tuple[str, str]] = []
    real = CheckpointReader.get

    def counting(self, name):
        reads.append((str(self.folder), name))
        return real(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting)
    batches = pass_batches(tok, TEXTS, batch_size=2, max_length=64)  # 3 batches
    stream_pass(
        base_dir,
        sft_dir,
        batches,
        make_pass=lambda keep: RepresentationPass(5, 32, 4, attention=False, keep=keep),
        keep=[-1, 0, 1, 2, 3, 4],
        dtype=torch.float32,
        attention=False,
        progress=False,
    )
    assert len(reads) == len(set(reads))  # no tensor twice
    for folder in (base_dir, sft_dir):
        names = {n for f, n in reads if f == str(folder)}
        assert {
            n for n in sorted(CheckpointReader(folder).keys()) if n != "lm_head.weight"
        } == names


def test_subset_of_layers_stops_before_the_blocks_it_does_not_need(tiny_pair, monkeypatch):
    from sftlens.streaming import Skeleton

    base_dir, sft_dir = tiny_pair
    _, tok = load_model(base_dir)
    loaded: list[int] = []
    real = Skeleton.load_block
    monkeypatch.setattr(Skeleton, "load_block", lambda s, i: (loaded.append(i), real(s, i)))
    rows, _, _ = stream_pass(
        base_dir,
        sft_dir,
        pass_batches(tok, TEXTS, batch_size=3, max_length=64),
        make_pass=lambda keep: RepresentationPass(5, 32, 4, attention=False, keep=keep),
        keep=[-1, 1],
        dtype=torch.float32,
        attention=False,
        progress=False,
    )
    assert sorted(set(loaded)) == [0, 1]  # blocks 2..4 are never read
    assert {r["layer"] for r in rows} == {-1, 1}


# -- through the API: run folders, spilling, subsets, resume ------------------------------------


def _analyze(base, sft, out, **kw) -> dict:
    opts = dict(
        out=str(out), data="synthetic", max_prompts=10, batch_size=3, max_length=96, progress=False
    )
    opts.update(kw)
    api.analyze(str(base), str(sft), **opts)
    with open(Path(out) / "metrics.csv") as f:
        return {
            (r["model"], int(r["layer"]), r["metric"]): float(r["value"] or "nan")
            for r in csv.DictReader(f)
        }


@pytest.fixture(scope="module")
def in_memory_run(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_memory")
    return _analyze(*tiny_pair, out, stream_layers=False), out


@pytest.mark.parametrize("activations", ["memory", "disk"])
def test_stream_layers_run_equals_in_memory_run(
    tiny_pair, tmp_path, in_memory_run, activations, caplog, monkeypatch
):
    from sftlens import streaming

    want, want_dir = in_memory_run
    spills: list[Path] = []
    real_init = streaming.ActivationStore.__init__

    def spy(self, shapes, dtype, path=None):
        real_init(self, shapes, dtype, path)
        if path is not None:
            spills.append(path)

    monkeypatch.setattr(streaming.ActivationStore, "__init__", spy)
    with caplog.at_level(logging.INFO, logger="sftlens"):
        got = _analyze(*tiny_pair, tmp_path / "run", stream_layers=True, activations=activations)
    _assert_same(got, want)
    with open(want_dir / "heads.csv") as f, open(tmp_path / "run" / "heads.csv") as g:
        _assert_same(
            {tuple(r.values())[:4]: float(r["value"]) for r in csv.DictReader(g)},
            {tuple(r.values())[:4]: float(r["value"]) for r in csv.DictReader(f)},
        )
    where = "spilled to" if activations == "disk" else "in memory ("
    assert f"activations of 4 batches {where}" in caplog.text
    assert len(spills) == (activations == "disk")
    assert all(p.parent == tmp_path / "run" and not p.exists() for p in spills)  # cleaned up
    assert not list((tmp_path / "run").glob(".analyze_*"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["analyze"]
    assert summary["cka_by_layer"] == [want[("pair", i, "cka")] for i in range(5)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("layers", "every", "kept"), [("1:3", 1, [1, 2]), ("", 2, [0, 2, 4])])
def test_subset_of_layers_gives_the_full_runs_rows(
    tiny_pair, tmp_path, in_memory_run, stream, layers, every, kept
):
    want, _ = in_memory_run
    got = _analyze(*tiny_pair, tmp_path, stream_layers=stream, layers=layers, every=every)
    assert {k[1] for k in got} == {-1, *kept}
    _assert_same(got, {k: v for k, v in want.items() if k[1] in {-1, *kept}})
    summary = json.loads((tmp_path / "summary.json").read_text())["analyze"]
    first = summary["cka_first_below_0.98"]  # relative depth against the model's 5 layers
    assert first is None or first["relative_depth"] == (first["layer"] + 0.5) / 5


def test_killed_stream_run_keeps_its_finished_layers(
    tiny_pair, tmp_path, in_memory_run, monkeypatch
):
    want, _ = in_memory_run
    real = RepresentationPass.update_layers
    fed: list[int] = []

    def crash_in_layer_3(self, batch, states, attn=None):
        fed.extend(states)
        if 3 in states:
            raise KeyboardInterrupt  # killed halfway down the model
        return real(self, batch, states, attn)

    monkeypatch.setattr(RepresentationPass, "update_layers", crash_in_layer_3)
    with pytest.raises(KeyboardInterrupt):
        _analyze(*tiny_pair, tmp_path, stream_layers=True, activations="disk")
    saved = json.loads((tmp_path / ".analyze_layers.json").read_text())
    assert sorted(saved["layers"], key=int) == ["-1", "0", "1", "2"]
    assert not list(tmp_path.glob(".analyze_activations*"))  # the scratch file went too

    fed.clear()
    monkeypatch.setattr(
        RepresentationPass,
        "update_layers",
        lambda s, b, st, a=None: (fed.extend(st), real(s, b, st, a)),
    )
    got = _analyze(*tiny_pair, tmp_path, stream_layers=True)
    assert set(fed) == {3, 4}  # layers -1..2 were not accumulated again
    _assert_same(got, want)
    assert not (tmp_path / ".analyze_layers.json").exists()


def test_layer_rows_of_other_inputs_are_not_reused(tiny_pair, tmp_path, monkeypatch):
    from sftlens import io

    _analyze(*tiny_pair, tmp_path / "fresh", stream_layers=True, alpha=2.0)
    fresh = _analyze(*tiny_pair, tmp_path / "fresh", stream_layers=True, alpha=2.0)
    out = tmp_path / "run"
    out.mkdir()
    # a finished-layer file left by a run with alpha=1: other inputs, other key
    io.atomic_write_json(
        out / ".analyze_layers.json",
        {"key": "another", "layers": {"0": {"rows": [], "heads": []}}},
    )
    _assert_same(_analyze(*tiny_pair, out, stream_layers=True, alpha=2.0), fresh)


# -- the memory estimate ----------------------------------------------------------------------


def _plan(tiny_pair, available: int, **kw):
    from transformers import AutoConfig

    base, sft = tiny_pair
    cfg = AnalyzeConfig(base=str(base), sft=str(sft), **kw)
    readers = [CheckpointReader(base), CheckpointReader(sft)]
    shapes = [(8, 100), (8, 90), (4, 80)]
    return plan_memory(
        cfg, readers, AutoConfig.from_pretrained(base), shapes, [-1, 0, 1, 2, 3, 4], available
    )


def test_memory_estimate_chooses_and_refuses(tiny_pair, caplog):
    roomy = _plan(tiny_pair, 2**40)
    assert not roomy.stream and roomy.budget.fits
    parts = roomy.budget.parts
    # both models' weights from the headers: 2 x (float32 parameters of the tiny Llama)
    assert parts["models"] == 2 * 4 * sum(
        math.prod(CheckpointReader(tiny_pair[0]).shape(k))
        for k in sorted(CheckpointReader(tiny_pair[0]).keys())
    )
    assert parts["accumulators of 6 layers"] > 6 * 8 * 3 * 32 * 32
    need = roomy.budget.total
    with caplog.at_level(logging.INFO, logger="sftlens"):
        auto = _plan(tiny_pair, need - 1)
    assert auto.stream and not auto.spill
    assert "--stream-layers chosen, the in-memory run would not fit" in caplog.text
    with pytest.raises(
        SftlensError,
        match=r"^analyze would hold in memory: .* available; pass --stream-layers .*--layers / --every.*--max-prompts",
    ):
        _plan(tiny_pair, need - 1, stream_layers=False)
    activations = auto.budget.parts["activations in memory"]
    spilled = _plan(tiny_pair, auto.budget.total - 1)
    assert spilled.stream and spilled.spill  # activations go to disk before the run is refused
    assert spilled.budget.total == auto.budget.total - activations
    with pytest.raises(SftlensError, match="pass --activations disk, a smaller --batch-size"):
        _plan(tiny_pair, auto.budget.total - 1, stream_layers=True, activations="memory")
    with pytest.raises(
        SftlensError, match="^analyze --stream-layers would hold .*; pass a smaller --batch-size"
    ):
        _plan(tiny_pair, spilled.budget.total - 1)
    assert _plan(tiny_pair, 2**40, stream_layers=True, activations="disk").spill


def test_max_memory_refuses_a_run_before_loading_anything(tiny_pair, tmp_path, monkeypatch):
    from sftlens.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SftlensError, match="pass --stream-layers"):
        _analyze(*tiny_pair, tmp_path, stream_layers=False, max_memory="1MiB")


def test_select_layers():
    assert select_layers("", 1, 3) == [-1, 0, 1, 2]
    assert select_layers("0110", 1, 8) == [-1, 2, 3, 4, 5]
    assert select_layers("0:8,24:32", 4, 32) == [-1, 0, 4, 24, 28]
    with pytest.raises(SftlensError, match="names layer 9, but the model has layers 0..7"):
        select_layers("9", 1, 8)
