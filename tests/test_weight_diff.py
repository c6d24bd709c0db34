"""Weight-space analysis against an independent computation and its error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftlens.errors import SftlensError
from sftlens.weight_diff import weight_diff


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _value(rows, metric, layer):
    return next(r["value"] for r in rows if r["metric"] == metric and r["layer"] == layer)


def test_dw_matches_independent_torch_computation(tiny_pair):
    base, sft = tiny_pair
    result = weight_diff(base, sft, progress=False)
    a, b = _state(base), _state(sft)
    for layer in range(5):
        p = f"model.layers.{layer}."
        sq = {
            proj: float(
                (
                    (
                        b[p + f"self_attn.{proj}_proj.weight"].double()
                        - a[p + f"self_attn.{proj}_proj.weight"].double()
                    )
                    ** 2
                ).sum()
            )
            for proj in "qkvo"
        }
        for proj in "qkvo":
            assert _value(result.rows, f"dw_{proj}", layer) == pytest.approx(
                math.sqrt(sq[proj]), rel=1e-6, abs=1e-9
            )
        assert _value(result.rows, "dw_attn", layer) == pytest.approx(
            math.sqrt(sum(sq.values())), rel=1e-6
        )
        base_sq = sum(
            float((a[p + f"self_attn.{x}_proj.weight"].double() ** 2).sum()) for x in "qkvo"
        )
        assert _value(result.rows, "dw_attn_rel", layer) == pytest.approx(
            math.sqrt(sum(sq.values()) / base_sq), rel=1e-6
        )
        assert _value(result.rows, "dw_mlp", layer) == 0.0  # fixture perturbs attention only
    # the fixture's perturbation scales make the top layer change most
    attn = result.series("dw_attn")
    assert max(range(5), key=lambda i: attn[i]) == 4
    assert _value(result.rows, "dw_embed", -1) == 0.0
    assert _value(result.rows, "dw_lm_head", None) == 0.0


def test_sharded_and_single_file_give_same_table(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, sft = tiny_pair
    sharded = tmp_path / "sft_sharded"
    AutoModelForCausalLM.from_pretrained(sft).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    single = weight_diff(base, sft, progress=False).rows
    split = weight_diff(base, sharded, progress=False).rows
    s1 = {(r["metric"], r["layer"]): r["value"] for r in single}
    s2 = {(r["metric"], r["layer"]): r["value"] for r in split}
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k] == pytest.approx(s2[k], rel=1e-12, abs=1e-15), k


def _variant(tmp_path: Path, name: str, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    from tiny_models import save_model, tiny_llama_config

    torch.manual_seed(0)
    return save_model(
        AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)), tmp_path / name
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_hidden_layers": 4}, "base and sft differ in layer count: base=5, sft=4"),
        ({"hidden_size": 48}, "base and sft differ in hidden size: base=32, sft=48"),
        ({"intermediate_size": 96}, "base and sft differ in MLP size: base=64, sft=96"),
        ({"vocab_size": 100}, "sft vocabulary is smaller than base: base=128, sft=100"),
    ],
)
def test_pair_mismatch_is_one_line_error(tiny_pair, tmp_path, overrides, message):
    base, _ = tiny_pair
    other = _variant(tmp_path, "other", **overrides)
    with pytest.raises(SftlensError) as err:
        weight_diff(base, other, progress=False)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_architecture_mismatch(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    base, _ = tiny_pair
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=5, n_embd=32, n_head=4, vocab_size=128)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SftlensError, match="differ in architecture: base=llama, sft=gpt2"):
        weight_diff(base, tmp_path / "gpt2", progress=False)


def test_grown_vocabulary_is_compared_on_shared_rows_and_reported(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(136)
    grown = tmp_path / "grown"
    model.save_pretrained(grown)
    rows = weight_diff(base, grown, progress=False).rows
    assert _value(rows, "vocab_added", None) == 8
    assert _value(rows, "embed_added_rows", -1) == 8
    assert _value(rows, "embed_added_norm", -1) > 0
    assert _value(rows, "dw_embed", -1) == pytest.approx(0.0, abs=1e-12)  # shared rows unchanged
    assert _value(rows, "lm_head_added_rows", None) == 8


def test_truncated_and_missing_shards_are_clear_errors(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, sft = tiny_pair
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(sft).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SftlensError, match=rf"{shard.name} is truncated .* re-copy or re-download"):
        weight_diff(base, sharded, progress=False)
    shard.unlink()
    with pytest.raises(SftlensError, match=rf"missing shard\(s\) {shard.name}"):
        weight_diff(base, sharded, progress=False)


def test_single_file_truncated(tiny_pair, tmp_path):
    base, sft = tiny_pair
    broken = tmp_path / "broken"
    shutil.copytree(sft, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SftlensError, match=r"model\.safetensors is truncated"):
        weight_diff(base, broken, progress=False)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    from sftlens.models.loading import resolve_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SftlensError, match=r"pickle weights .* --allow-pickle"):
        resolve_model(tmp_path)
