"""Weight-space analysis against an independent computation and its error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
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
    _assert_pair_rows(rows)
    new = _numpy_state(grown)
    assert _value(rows, "vocab_added", None) == 8
    for prefix, layer, key in (
        ("embed", -1, "model.embed_tokens.weight"),
        ("lm_head", None, "lm_head.weight"),
    ):
        assert new[key].shape[0] == 136
        assert _value(rows, f"{prefix}_added_rows", layer) == 8
        added = np.linalg.norm(new[key][128:])  # the 8 new rows alone
        assert added > 1e-3  # so that the comparison below is not 0 == 0
        assert _value(rows, f"{prefix}_added_norm", layer) == pytest.approx(added, rel=1e-6)
        # the shared rows did not change, and the new rows are not mixed into the distance
        assert _value(rows, f"dw_{prefix}", layer) == pytest.approx(0.0, abs=1e-12)


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


# --- every row, on architectures perturbed everywhere, against numpy -------------------------

#: Where each family keeps its tensors, read off the Hugging Face modeling code (not sftlens).
LAYOUTS: dict[str, dict] = {
    "qwen2": dict(
        block="model.layers.{}.",
        norms=("input_layernorm.weight", "post_attention_layernorm.weight"),
        embed=("model.embed_tokens.weight",),
        head="lm_head.weight",
        final_norm="model.norm.weight",
    ),
    "phi3": dict(
        block="model.layers.{}.",
        norms=("input_layernorm.weight", "post_attention_layernorm.weight"),
        embed=("model.embed_tokens.weight",),
        head="lm_head.weight",
        final_norm="model.norm.weight",
    ),
    "gpt2": dict(
        block="transformer.h.{}.",
        norms=("ln_1.weight", "ln_2.weight"),
        embed=("transformer.wte.weight", "transformer.wpe.weight"),  # tokens and positions
        head=None,  # tied to wte
        final_norm="transformer.ln_f.weight",
    ),
    "gpt_neox": dict(
        block="gpt_neox.layers.{}.",
        norms=("input_layernorm.weight", "post_attention_layernorm.weight"),
        embed=("gpt_neox.embed_in.weight",),
        head="embed_out.weight",
        final_norm="gpt_neox.final_layer_norm.weight",
    ),
}
_ATTN = ("q", "k", "v", "o")


def _numpy_state(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy().astype(np.float64) for k, v in _state(folder).items()}


def _projections(model_type: str, sd: dict[str, np.ndarray], prefix: str, cfg) -> dict:
    """Every projection weight of one block as (out, in), sliced from the family's own layout."""

    def w(name: str) -> np.ndarray:
        return sd[prefix + name]

    if model_type == "qwen2":
        out = {p: w(f"self_attn.{p}_proj.weight") for p in _ATTN}
        return out | {p: w(f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")}
    if model_type == "phi3":
        # Phi3Attention.forward: qkv[..., :H*hd], qkv[..., H*hd : H*hd + KV*hd], the rest
        qkv, hd = w("self_attn.qkv_proj.weight"), cfg.hidden_size // cfg.num_attention_heads
        q_end, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        # Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        gate_up, inter = w("mlp.gate_up_proj.weight"), cfg.intermediate_size
        return {
            "q": qkv[:q_end],
            "k": qkv[q_end : q_end + kv],
            "v": qkv[q_end + kv :],
            "o": w("self_attn.o_proj.weight"),
            "gate": gate_up[:inter],
            "up": gate_up[inter:],
            "down": w("mlp.down_proj.weight"),
        }
    if model_type == "gpt2":
        # Conv1D stores (in, out); GPT2Attention.forward: c_attn(x).split(n_embd, dim=2)
        c_attn, d = w("attn.c_attn.weight"), cfg.n_embd
        return {
            "q": c_attn[:, :d].T,
            "k": c_attn[:, d : 2 * d].T,
            "v": c_attn[:, 2 * d :].T,
            "o": w("attn.c_proj.weight").T,
            "fc_in": w("mlp.c_fc.weight").T,
            "fc_out": w("mlp.c_proj.weight").T,
        }
    # GPTNeoXAttention.forward: qkv(x).view(..., heads, 3 * head_size).chunk(3, dim=-1)
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    hd = d // heads
    per_head = w("attention.query_key_value.weight").reshape(heads, 3 * hd, d)
    return {
        "q": per_head[:, :hd].reshape(heads * hd, d),
        "k": per_head[:, hd : 2 * hd].reshape(heads * hd, d),
        "v": per_head[:, 2 * hd :].reshape(heads * hd, d),
        "o": w("attention.dense.weight"),
        "fc_in": w("mlp.dense_h_to_4h.weight"),
        "fc_out": w("mlp.dense_4h_to_h.weight"),
    }


def _expected_rows(model_type: str, base: Path, sft: Path, cfg) -> dict:
    """Every row of weight_diff, computed in numpy float64 from the two state dicts."""
    a, b = _numpy_state(base), _numpy_state(sft)
    layout = LAYOUTS[model_type]
    out: dict[tuple[str, int | None], float] = {}

    def put(metric: str, layer: int | None, names_or_arrays, rel: bool = True) -> None:
        xs, ys = names_or_arrays
        diff = math.sqrt(sum(float(((y - x) ** 2).sum()) for x, y in zip(xs, ys, strict=True)))
        out[(metric, layer)] = diff
        if rel:
            out[(f"{metric}_rel", layer)] = diff / math.sqrt(sum(float((x**2).sum()) for x in xs))

    def pick(names) -> tuple[list, list]:
        names = list(names)
        return [a[n] for n in names], [b[n] for n in names]

    for layer in range(cfg.num_hidden_layers):
        prefix = layout["block"].format(layer)
        pa, pb = _projections(model_type, a, prefix, cfg), _projections(model_type, b, prefix, cfg)
        mlp = [p for p in pa if p not in _ATTN]
        for proj in pa:
            put(f"dw_{proj}", layer, ([pa[proj]], [pb[proj]]))
        put("dw_attn", layer, ([pa[p] for p in _ATTN], [pb[p] for p in _ATTN]))
        put("dw_mlp", layer, ([pa[p] for p in mlp], [pb[p] for p in mlp]))
        put("dw_norm", layer, pick(prefix + n for n in layout["norms"]), rel=False)
        put("dw_block", layer, pick([k for k in a if k.startswith(prefix)]))  # biases too
    put("dw_embed", -1, pick(layout["embed"]))
    put("dw_final_norm", None, pick([layout["final_norm"]]), rel=False)
    if layout["head"] is None:
        out[("lm_head_tied", None)] = 1.0
    else:
        put("dw_lm_head", None, pick([layout["head"]]))
    put("dw_total", None, pick(list(a)))
    out[("vocab_added", None)] = 0.0
    return out


def _save_pair(root: Path, model_type: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from tiny_models import perturb_all, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(dtype)
    model.save_pretrained(root / "base")
    perturb_all(model, scale=0.02, seed=3)
    model.save_pretrained(root / "sft")
    return root / "base", root / "sft", model.config


@pytest.fixture(scope="module")
def arch_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    root = tmp_path_factory.mktemp("arch_pairs")
    pairs = {t: _save_pair(root / t, t) for t in LAYOUTS}
    pairs["qwen2-bf16"] = _save_pair(root / "bf16", "qwen2", torch.bfloat16)
    return pairs


def _assert_pair_rows(rows) -> None:
    """Every row is a (model, layer, metric, value) record of the pair."""
    for r in rows:
        assert set(r) == {"model", "layer", "metric", "value"} and r["model"] == "pair", r


def _check_rows(rows, want: dict) -> None:
    _assert_pair_rows(rows)
    got = {(r["metric"], r["layer"]): r["value"] for r in rows}
    assert len(got) == len(rows), "a (metric, layer) row is emitted twice"
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("model_type", list(LAYOUTS))
def test_every_row_matches_numpy_on_a_pair_perturbed_everywhere(
    arch_pairs, model_type, chunks, monkeypatch
):
    """All rows (projections split from fused tensors, MLP, norms, blocks with their biases,
    embeddings, head, total) against numpy; with small chunks the row-block and element-chunk
    loops run many times and end on a partial block (row counts 32, 64, 96, 128 vs 5 rows)."""
    from sftlens import weight_diff as wd_module
    from sftlens.metrics import weights as weights_module

    if chunks == "small":
        monkeypatch.setattr(wd_module, "_CHUNK_BYTES", 5 * 32 * 4)  # 5 rows of width 32
        monkeypatch.setattr(weights_module, "_CHUNK_ELEMENTS", 7)
    base, sft, cfg = arch_pairs[model_type]
    want = _expected_rows(model_type, base, sft, cfg)
    assert all(v > 0 for k, v in want.items() if k[0].startswith("dw_")), "perturb everything"
    _check_rows(weight_diff(base, sft, progress=False).rows, want)


def test_bfloat16_checkpoint_matches_numpy(arch_pairs):
    base, sft, cfg = arch_pairs["qwen2-bf16"]
    assert {t.dtype for t in _state(base).values()} == {torch.bfloat16}
    _check_rows(
        weight_diff(base, sft, progress=False).rows, _expected_rows("qwen2", base, sft, cfg)
    )


# --- series, progress, and the errors of malformed checkpoints ---------------------------------


def test_series_orders_one_metric_by_layer_with_nan_where_it_is_missing(tiny_pair):
    from sftlens.weight_diff import WeightDiff

    base, sft = tiny_pair
    result = weight_diff(base, sft, progress=False)
    assert result.series("dw_q") == [_value(result.rows, "dw_q", i) for i in range(5)]
    rows = [
        {"model": "pair", "layer": 3, "metric": "dw_q", "value": 2.0},
        {"model": "pair", "layer": 1, "metric": "dw_k", "value": 5.0},
        {"model": "pair", "layer": None, "metric": "dw_total", "value": 7.0},
    ]
    got = WeightDiff(info=result.info, rows=rows).series("dw_q")
    assert len(got) == 5 and got[3] == 2.0
    assert all(isinstance(got[i], float) and math.isnan(got[i]) for i in (0, 1, 2, 4))


def test_progress_bar_is_on_by_default_and_off_on_request(tiny_pair, capsys):
    base, sft = tiny_pair
    weight_diff(base, sft)
    assert "weight diff: 100%" in capsys.readouterr().err
    weight_diff(base, sft, progress=False)
    assert "weight diff" not in capsys.readouterr().err


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose tensors ``edit`` changes (config.json untouched)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_malformed_sft_checkpoints_are_one_line_errors(tiny_pair, tmp_path):
    base, _ = tiny_pair
    embed = "model.embed_tokens.weight"

    def wider(state):
        state[embed] = torch.zeros(128, 33)

    def fewer_rows(state):
        state[embed] = state[embed][:120].clone()

    def missing(state):
        del state["model.layers.2.mlp.up_proj.weight"]

    def reshaped(state):
        name = "model.layers.1.self_attn.o_proj.weight"
        state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1)

    cases = [
        (
            reshaped,
            "tensor 'model.layers.1.self_attn.o_proj.weight' has shape base=(32, 32), "
            "sft=(32, 33); compare checkpoints of the same architecture",
        ),
        (
            wider,
            f"embed '{embed}' has shape base=(128, 32), sft=(128, 33); "
            "compare checkpoints of the same model size",
        ),
        (
            fewer_rows,
            "embed has fewer rows in sft (120) than in base (128); pass BASE first and SFT second",
        ),
        (
            missing,
            "1 tensor(s) of base are missing from sft, e.g. 'model.layers.2.mlp.up_proj.weight'; "
            "check that both folders hold complete checkpoints of the same architecture",
        ),
    ]
    for edit, message in cases:
        broken = _edited_copy(base, tmp_path / edit.__name__, edit)
        with pytest.raises(SftlensError) as err:
            weight_diff(base, broken, progress=False)
        assert str(err.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_weights_on_cuda_without_a_gpu_fail_clearly(tiny_pair):
    """--device reaches the reductions: cuda on a CPU-only machine is refused, not ignored."""
    with pytest.raises(
        SftlensError,
        match=r"^--device cuda but torch sees no CUDA GPU; install a CUDA build of torch "
        r"\(or check CUDA_VISIBLE_DEVICES\), or pass --device cpu$",
    ):
        weight_diff(*tiny_pair, progress=False, device="cuda")
