"""swap_blocks and ``sftlens swap``: hybrids equal independently built models; restore is exact.

Hybrids are checked against a third model built the slow, obvious way (a copy of the host
with the donor's block tensors loaded through ``load_state_dict``), on tiny Llama (untied
head), GPT-2 (tied, Conv1D) and Gemma 3 (tied, sliding and full attention layers mixed).
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

from sftlens.cli import main
from sftlens.errors import SftlensError
from sftlens.experiments.edit import swap_blocks
from sftlens.models import surgery
from tiny_models import save_model, tiny_llama_config

ARCHS = ("llama", "gpt2", "gemma3", "qwen2_moe")
LAYERS = 4
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def tiny_config(arch: str, **kw):
    if arch == "llama":
        return tiny_llama_config(num_hidden_layers=LAYERS, **kw)
    if arch == "gpt2":
        return tf.GPT2Config(
            **{
                "n_layer": LAYERS,
                "n_embd": 32,
                "n_head": 4,
                "vocab_size": 128,
                "n_positions": 64,
                **kw,
            }
        )
    if arch == "gemma3":
        kw.setdefault("sliding_window", 4)  # shorter than the test inputs: the window matters
        return tf.Gemma3TextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
            **kw,
        )
    if arch == "qwen2_moe":  # routed experts, a shared expert, a dense MLP in layer 1
        from tiny_models import tiny_config as family_config

        return family_config("qwen2_moe", num_hidden_layers=LAYERS, **kw)
    raise AssertionError(arch)


@functools.cache
def make_pair(arch: str, shared_ends: bool, seed: int = 0, **kw):
    """(base, sft): the SFT model differs in EVERY block; also in the embeddings, final norm
    and head unless ``shared_ends``. Cached: every test leaves the models as it found them
    (which the restore tests check)."""
    torch.manual_seed(seed)
    base = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()
    sft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if shared_ends and not _BLOCK_KEY.search(name):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, sft


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row
    return ids, mask


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids, mask = inputs()
    return model(input_ids=ids, attention_mask=mask).logits


def built_hybrid(host, donor, layers):
    """The obvious baseline: a copy of the host with the donor's block tensors loaded."""
    hybrid = copy.deepcopy(host)
    state = host.state_dict()
    moved = 0
    for key, value in donor.state_dict().items():
        m = _BLOCK_KEY.search(key)
        if m and int(m.group(1)) in set(layers):
            state[key] = value
            moved += 1
    assert moved or not layers
    hybrid.load_state_dict(state)
    return hybrid.eval()


def snapshot(model):
    """Block module objects and every parameter and buffer, as raw bytes."""
    return (
        [id(b) for b in surgery.get_blocks(model)],
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_unchanged(model, snap) -> None:
    blocks, tensors, ids = snap
    assert [id(b) for b in surgery.get_blocks(model)] == blocks
    now = model.state_dict(keep_vars=True)
    assert {k: id(v) for k, v in now.items()} == ids
    for k, v in tensors.items():
        assert torch.equal(bits(now[k]), bits(v)), k


# -- swap_blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [[1, 2], [0, 3]])
def test_swap_equals_a_model_built_by_load_state_dict_in_both_directions(arch, layers):
    base, sft = make_pair(arch, shared_ends=False)
    want_into_base = logits(built_hybrid(base, sft, layers))
    want_into_sft = logits(built_hybrid(sft, base, layers))
    before = logits(base)
    with swap_blocks(base, sft, layers) as host:
        assert host is base
        got_into_base, got_into_sft = logits(base), logits(sft)
    assert not torch.equal(got_into_base, before)  # the swap did something
    assert torch.equal(got_into_base, want_into_base)
    assert torch.equal(got_into_sft, want_into_sft)


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_of_every_layer_equals_the_other_model_when_the_ends_are_shared(arch):
    base, sft = make_pair(arch, shared_ends=True)
    want_base, want_sft = logits(base), logits(sft)
    assert not torch.allclose(want_base, want_sft)
    with swap_blocks(base, sft, range(LAYERS)):
        assert torch.equal(logits(base), want_sft)
        assert torch.equal(logits(sft), want_base)


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_of_every_layer_keeps_the_hosts_embeddings_and_head(arch):
    base, sft = make_pair(arch, shared_ends=False)
    want = logits(built_hybrid(base, sft, range(LAYERS)))
    with swap_blocks(base, sft, range(LAYERS)):
        got = logits(base)
        assert not torch.allclose(got, logits(sft))  # embeddings / head differ: not the SFT model
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_of_nothing_is_the_host(arch):
    base, sft = make_pair(arch, shared_ends=False)
    want = logits(base)
    with swap_blocks(base, sft, []):
        assert torch.equal(logits(base), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_exact_with_the_same_module_objects_also_after_an_exception(arch):
    base, sft = make_pair(arch, shared_ends=False)
    snaps = snapshot(base), snapshot(sft)
    base_blocks = list(surgery.get_blocks(base))
    sft_blocks = list(surgery.get_blocks(sft))
    with swap_blocks(base, sft, [1, 3]):
        # exchanged, not copied: each list holds the other model's module objects
        assert surgery.get_blocks(base)[1] is sft_blocks[1]
        assert surgery.get_blocks(sft)[3] is base_blocks[3]
        assert surgery.get_blocks(base)[0] is base_blocks[0]
    assert_unchanged(base, snaps[0])
    assert_unchanged(sft, snaps[1])
    with pytest.raises(RuntimeError, match="scoring failed"), swap_blocks(base, sft, [0, 1, 2]):
        logits(base)
        raise RuntimeError("scoring failed")
    assert_unchanged(base, snaps[0])
    assert_unchanged(sft, snaps[1])
    assert all(a is b for a, b in zip(surgery.get_blocks(base), base_blocks))


def test_swap_refuses_bad_layers_and_mismatched_models():
    base, sft = make_pair("llama", shared_ends=False)
    snap = snapshot(base)
    with pytest.raises(SftlensError, match="layer 4 does not exist"), swap_blocks(base, sft, [4]):
        pass
    with pytest.raises(SftlensError, match="same model"), swap_blocks(base, base, [0]):
        pass
    deeper = tf.AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=5))
    with (
        pytest.raises(SftlensError, match="4 blocks and the donor 5"),
        swap_blocks(base, deeper, [0]),
    ):
        pass
    wide = copy.deepcopy(sft).to(torch.float64)  # a donor in another dtype
    with (
        pytest.raises(SftlensError, match="same --dtype and --device"),
        swap_blocks(base, wide, [2]),
    ):
        pass
    assert_unchanged(base, snap)


def test_gemma3_refuses_blocks_whose_attention_settings_differ():
    """Per-layer attributes (sliding window) must agree at an index; the error names them."""
    base, _ = make_pair("gemma3", shared_ends=False)
    _, other = make_pair("gemma3", shared_ends=False, sliding_window=6)
    with (
        pytest.raises(SftlensError, match=r"self_attn\.sliding_window \(4 vs 6\)"),
        swap_blocks(base, other, [0]),
    ):
        pass
    with swap_blocks(base, other, [1]):  # a full-attention layer: no window to disagree on
        pass


# -- sftlens swap ----------------------------------------------------------------------------


def write_problems(path, n: int = 6):
    """Hand-written problems in the tiny tokenizer's vocabulary (never GSM8K text)."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i, i + 2
            f.write(
                json.dumps(
                    {
                        "question": f"how many is {a} + {b} ?",
                        "answer": f"{a} + {b} = {a + b} . #### {a + b}",
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved (base, sft) folders per architecture, plus a problems file."""
    root = tmp_path_factory.mktemp("swap_pairs")
    out = {}
    for arch in ARCHS:
        base, sft = make_pair(arch, shared_ends=False)
        out[arch] = (save_model(base, root / arch / "base"), save_model(sft, root / arch / "sft"))
    out["data"] = write_problems(root / "problems.jsonl")
    return out


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score_directly(model, folder, data, limit=4):
    """answer_nll of a model, computed without sftlens' run machinery."""
    from transformers import AutoTokenizer

    from sftlens.evaluation.teacher_forced import answer_scores

    tok = AutoTokenizer.from_pretrained(folder)
    problems = [json.loads(line) for line in Path(data).read_text().splitlines()][:limit]
    return answer_scores(
        model,
        tok,
        [f"Question: {p['question']}\nAnswer:" for p in problems],
        [" " + p["answer"] for p in problems],
        batch_size=3,
    )


def _args(base, sft, out, data, *extra):
    return [
        "swap", str(base), str(sft), "--out", str(out), "--data", str(data),
        "--limit", "4", "--batch-size", "2", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_swap_scores_match_independent_hybrids(arch, folders, tmp_path):
    base_dir, sft_dir = folders[arch]
    out = tmp_path / "run"
    assert (
        main(_args(base_dir, sft_dir, out, folders["data"], "--blocks", "2", "--spans", "1:2")) == 0
    )
    rows = read_rows(out / "swap.csv")
    assert [(r["direction"], r["span"], r["mask"]) for r in rows] == [
        ("reference", "", ""),
        ("reference", "", ""),
        ("sft_into_base", "0:2", "10"),
        ("sft_into_base", "2:4", "01"),
        ("sft_into_base", "1:2", ""),
        ("base_into_sft", "0:2", "10"),
        ("base_into_sft", "2:4", "01"),
        ("base_into_sft", "1:2", ""),
    ]
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    sft = tf.AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    ref = {r["host"]: float(r["answer_nll"]) for r in rows if r["direction"] == "reference"}
    assert ref["base"] == pytest.approx(score_directly(base, base_dir, folders["data"]).answer_nll)
    assert ref["sft"] == pytest.approx(score_directly(sft, base_dir, folders["data"]).answer_nll)
    for r in rows[2:]:
        host, donor = (base, sft) if r["direction"] == "sft_into_base" else (sft, base)
        layers = range(int(r["first_layer"]), int(r["last_layer"]) + 1)
        want = score_directly(built_hybrid(host, donor, layers), base_dir, folders["data"])
        assert float(r["answer_nll"]) == pytest.approx(want.answer_nll, rel=1e-6), r
        assert float(r["answer_token_acc"]) == pytest.approx(want.answer_token_acc)
        assert float(r["delta_nll"]) == pytest.approx(float(r["answer_nll"]) - ref[r["host"]])
    summary = json.loads((out / "summary.json").read_text())["swap"]
    gain = ref["base"] - ref["sft"]
    assert summary["sft_gain_nll"] == pytest.approx(gain)
    for r in rows[2:5]:
        assert summary["gain_recovered"][r["span"]] == pytest.approx(
            (ref["base"] - float(r["answer_nll"])) / gain
        )
    biggest = max(rows[2:], key=lambda r: abs(float(r["delta_nll"])))
    assert (summary["largest_change"]["direction"], summary["largest_change"]["span"]) == (
        biggest["direction"],
        biggest["span"],
    )
    for d in ("sft_into_base", "base_into_sft"):
        assert (out / "plots" / f"swap_{d}.png").is_file()
    html = (out / "report.html").read_text()
    assert "Layer swapping (causal)" in html and "gain_recovered" in html
    assert "swap" in json.loads((out / "config.json").read_text())


def test_cli_swap_resumes_without_rescoring_finished_items(folders, tmp_path, monkeypatch):
    from sftlens.evaluation import teacher_forced
    from sftlens.models import loading

    base_dir, sft_dir = folders["llama"]
    out, data = tmp_path / "run", folders["data"]
    assert main(_args(base_dir, sft_dir, out, data, "--blocks", "2")) == 0
    first = (out / "swap.csv").read_bytes()

    # everything finished: a rerun neither loads a model nor scores anything
    def fail(*a, **k):
        raise AssertionError("a finished item was recomputed")

    monkeypatch.setattr(teacher_forced, "answer_scores", fail)
    monkeypatch.setattr(loading, "load_model", fail)
    assert main(_args(base_dir, sft_dir, out, data, "--blocks", "2")) == 0
    assert (out / "swap.csv").read_bytes() == first
    monkeypatch.undo()

    # an interrupted run (two items lost) and one new span: exactly 2 + 2 scores
    state = json.loads((out / ".swap_items.json").read_text())
    del state["items"]["sft_into_base/2:4"], state["items"]["reference/sft"]
    (out / ".swap_items.json").write_text(json.dumps(state))
    calls = []
    real = teacher_forced.answer_scores
    monkeypatch.setattr(
        teacher_forced, "answer_scores", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main(_args(base_dir, sft_dir, out, data, "--blocks", "2", "--spans", "3:4")) == 0
    assert len(calls) == 4
    again = read_rows(out / "swap.csv")
    old = read_rows_bytes(first)
    assert again[: len(old) - 2] == old[: len(old) - 2]  # the block rows, recomputed or not
    assert {r["span"] for r in again} == {"", "0:2", "2:4", "3:4"}

    # other inputs (fewer problems): everything is scored again
    calls.clear()
    assert main([*_args(base_dir, sft_dir, out, data, "--blocks", "2"), "--limit", "3"]) == 0
    assert len(calls) == 6


def read_rows_bytes(blob: bytes):
    return list(csv.DictReader(blob.decode().splitlines()))


def test_cli_swap_one_line_errors(folders, tmp_path, capsys):
    base_dir, sft_dir = folders["llama"]
    assert (
        main(
            _args(
                base_dir,
                sft_dir,
                tmp_path / "o",
                folders["data"],
                "--blocks",
                "0",
                "--spans",
                "2:9",
            )
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: span 2:9 is out of range for a model of 4 layers")
    assert len(err.splitlines()) == 1
    gpt2_base, _ = folders["gpt2"]
    assert main(_args(base_dir, gpt2_base, tmp_path / "o2", folders["data"])) == 2
    err = capsys.readouterr().err.strip()
    assert "differ in architecture" in err and len(err.splitlines()) == 1
    assert main(_args(base_dir, sft_dir, tmp_path / "o3", folders["data"], "--blocks", "5")) == 2
    assert "K=5 depth blocks do not fit a model of 4 layers" in capsys.readouterr().err


def test_rows_and_summary_from_hand_made_scores(tmp_path):
    from sftlens.experiments.swap import ItemLog, swap_rows, swap_summary
    from sftlens.layers import Span, depth_blocks

    log = ItemLog(tmp_path / "items.json", key="k")
    nll = {
        "reference/base": 3.0,
        "reference/sft": 2.0,  # SFT gain: 1.0 nats
        "sft_into_base/0:2": 2.9,
        "sft_into_base/2:4": 2.5,
        "sft_into_base/1:3": 3.4,
        "base_into_sft/0:2": 2.2,
        "base_into_sft/2:4": 2.1,
        "base_into_sft/1:3": 2.05,
    }
    for item, v in nll.items():
        log.put(item, {"answer_nll": v, "answer_token_acc": 0.5, "tokens": 10})
    assert ItemLog(tmp_path / "items.json", key="k").items == log.items  # persisted
    assert ItemLog(tmp_path / "items.json", key="other").items == {}  # other inputs: nothing
    spans = [*depth_blocks(4, 2), Span(1, 3)]
    rows = swap_rows(log, spans, 4)
    by = {(r["direction"], r.get("span") or r["host"]): r for r in rows}
    assert by[("sft_into_base", "2:4")]["gain_recovered"] == pytest.approx(0.5)
    assert by[("sft_into_base", "1:3")]["delta_nll"] == pytest.approx(0.4)
    assert by[("base_into_sft", "0:2")]["gain_lost"] == pytest.approx(0.2)
    assert by[("base_into_sft", "0:2")].get("gain_recovered") is None
    assert by[("sft_into_base", "2:4")]["depth_start"] == 0.5
    s = swap_summary(rows, problems=3)
    assert s["largest_change"]["span"] == "2:4"  # |-0.5| beats +0.4 and the base_into_sft rows
    assert s["largest_change_base_into_sft"]["span"] == "0:2"
    assert s["gain_recovered"] == pytest.approx({"0:2": 0.1, "2:4": 0.5, "1:3": -0.4})
    assert s["gain_recovered_sum_of_blocks"] == pytest.approx(0.6)  # depth blocks only
    # no SFT gain: no fraction to report
    log.put("reference/sft", {"answer_nll": 3.0, "answer_token_acc": 0.5, "tokens": 10})
    assert swap_summary(swap_rows(log, spans, 4), 3)["gain_recovered"]["0:2"] is None
