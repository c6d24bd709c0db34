"""Mixture-of-experts families (Mixtral, Qwen2-MoE, OLMoE): weights per expert and router,
routing shift, against independent float64 computations on tiny random pairs.

``save_pretrained`` (transformers 5) writes one tensor per expert and part
(``block_sparse_moe.experts.{e}.w1`` for Mixtral, ``mlp.experts.{e}.gate_proj`` for the others)
while the live modules hold fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj``; both
layouts on disk must give the same numbers. The tiny models have 3 layers and 4 experts, so an
expert index read as a layer index (or the reverse) lands on a row that does not exist.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftlens.errors import SftlensError
from sftlens.models import surgery
from sftlens.weight_diff import weight_diff
from tiny_models import perturb_all, save_model, tiny_config

MOE = ("mixtral", "qwen2_moe", "olmoe")
# checkpoint names of one expert's parts and of the MoE module, as save_pretrained writes them
DISK = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen2_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "olmoe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}


def _model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


@pytest.fixture(scope="module")
def moe_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(base, sft) folders per family; the SFT model is the base perturbed everywhere."""
    root = tmp_path_factory.mktemp("moe_pairs")
    out = {}
    for model_type in MOE:
        model = _model(model_type)
        base = save_model(model, root / model_type / "base")
        perturb_all(model, scale=0.05, seed=2)
        out[model_type] = (base, save_model(model, root / model_type / "sft"))
    return out


def _state(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(f).items()})
    return out


def _fro_sq(xs, ys) -> tuple[float, float]:
    """(sum ||y - x||^2, sum ||x||^2) in float64."""
    d = sum(float(((y - x) ** 2).sum()) for x, y in zip(xs, ys, strict=True))
    return d, sum(float((x**2).sum()) for x in xs)


def _expected(model_type: str, base: Path, sft: Path, cfg) -> tuple[dict, dict]:
    """(per-layer rows {(metric, layer): value}, per-expert rows {(layer, expert, metric): value})
    from the two state dicts, one tensor per expert as save_pretrained wrote them."""
    a, b = _state(base), _state(sft)
    moe, names = DISK[model_type]
    layers, experts = {}, {}

    def put(table, key, metric, pair):
        d, n = pair
        table[(*key[:-1], metric) if len(key) > 1 else (metric, key[0])] = math.sqrt(d)
        table[(*key[:-1], f"{metric}_rel") if len(key) > 1 else (f"{metric}_rel", key[0])] = (
            math.sqrt(d / n)
        )

    for layer in surgery.moe_layers(cfg):
        p = f"model.layers.{layer}.{moe}."
        router = [p + "gate.weight"]
        expert_keys = []
        for e in range(cfg.num_experts if model_type != "mixtral" else cfg.num_local_experts):
            keys = {part: f"{p}experts.{e}.{n}.weight" for part, n in names.items()}
            for part, key in keys.items():
                put(experts, (layer, e, None), f"dw_{part}", _fro_sq([a[key]], [b[key]]))
            put(
                experts,
                (layer, e, None),
                "dw_expert",
                _fro_sq([a[k] for k in keys.values()], [b[k] for k in keys.values()]),
            )
            expert_keys += keys.values()
        shared = [k for k in a if k.startswith(p + "shared_expert")]  # shared expert and gate
        put(layers, (layer,), "dw_router", _fro_sq([a[k] for k in router], [b[k] for k in router]))
        put(
            layers,
            (layer,),
            "dw_experts",
            _fro_sq([a[k] for k in expert_keys], [b[k] for k in expert_keys]),
        )
        if model_type == "qwen2_moe":
            assert len(shared) == 4
            put(
                layers,
                (layer,),
                "dw_shared_expert",
                _fro_sq([a[k] for k in shared], [b[k] for k in shared]),
            )
        mlp = router + expert_keys + shared
        put(layers, (layer,), "dw_mlp", _fro_sq([a[k] for k in mlp], [b[k] for k in mlp]))
    return layers, experts


def _fused_copy(folder: Path, out: Path) -> Path:
    """The same checkpoint with the experts stored as transformers 5 holds them in memory
    (fused 3-D ``mlp.experts.gate_up_proj`` / ``down_proj``; Mixtral's ``mlp.gate``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", MOE)
def test_router_and_expert_dw_match_numpy_in_both_layouts(moe_pairs, model_type, tmp_path):
    base, sft = moe_pairs[model_type]
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    want_layers, want_experts = _expected(model_type, base, sft, cfg)
    fused = (_fused_copy(base, tmp_path / "b"), _fused_copy(sft, tmp_path / "s"))
    for pair in ((base, sft), fused):
        result = weight_diff(*pair, progress=False)
        got = {(r["metric"], r["layer"]): r["value"] for r in result.rows}
        for key, value in want_layers.items():
            assert got[key] == pytest.approx(value, rel=1e-6), key
        got_experts = {(r["layer"], r["expert"], r["metric"]): r["value"] for r in result.experts}
        assert got_experts.keys() == want_experts.keys()
        for key, value in want_experts.items():
            assert got_experts[key] == pytest.approx(value, rel=1e-6), key
        assert {r["model"] for r in result.experts} == {"pair"}
        # rows by layer, then expert (numerically), then part as the docstring lists them
        parts = ("gate", "up", "down", "expert")
        keys = [(r["layer"], r["expert"], r["metric"]) for r in result.experts]
        assert keys == [
            (layer, e, f"dw_{part}{rel}")
            for layer, e in sorted({k[:2] for k in keys})
            for part in parts
            for rel in ("", "_rel")
        ]
        # MoE layers have no dense gate/up/down rows (those are per expert); every row finite
        moe = set(surgery.moe_layers(cfg))
        assert not [k for k in got if k[0] in ("dw_gate", "dw_up", "dw_down") and k[1] in moe]
        assert all(math.isfinite(v) for v in got.values() if not isinstance(v, str))
    if model_type == "qwen2_moe":  # layer 1 keeps a dense MLP: rows as for Qwen2
        assert 1 not in surgery.moe_layers(cfg)
        a, b = _state(base), _state(sft)
        keys = [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        d, _ = _fro_sq([a[k] for k in keys], [b[k] for k in keys])
        assert got[("dw_mlp", 1)] == pytest.approx(math.sqrt(d), rel=1e-6)
        assert ("dw_router", 1) not in got and ("dw_gate", 1) in got


def test_expert_index_is_never_read_as_a_layer_index():
    spec = surgery.arch_spec_of("mixtral")
    role = surgery.classify_param(spec, "model.layers.2.block_sparse_moe.experts.3.w3.weight")
    assert (role.layer, role.expert, role.proj, role.group) == (2, 3, "expert_up", "mlp")
    role = surgery.classify_param(
        surgery.arch_spec_of("qwen2_moe"),
        "base_model.model.model.layers.0.mlp.experts.7.down_proj.weight",
    )
    assert (role.layer, role.expert, role.proj) == (0, 7, "expert_down")
    fused = surgery.classify_param(spec, "model.layers.1.mlp.experts.gate_up_proj")
    assert (fused.layer, fused.expert, fused.proj) == (1, None, "experts_gate_up")


def test_split_experts_follows_the_experts_forward():
    """gate/up rows of experts.gate_up_proj[e] are what MixtralExperts.forward multiplies."""
    model = _model("mixtral")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 32)
    parts = surgery.split_experts("experts_gate_up", experts.gate_up_proj.detach())
    down = surgery.split_experts("experts_down", experts.down_proj.detach())["down"]
    e = 2
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    want = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
    got = (experts.act_fn(x @ parts["gate"][e].T) * (x @ parts["up"][e].T)) @ down[e].T
    torch.testing.assert_close(got, want.detach())


def test_weights_command_writes_experts_csv(moe_pairs, tmp_path):
    from sftlens import api

    base, sft = moe_pairs["qwen2_moe"]
    run = api.weights(str(base), str(sft), out=str(tmp_path / "run"), progress=False)
    with open(run / "experts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "layer", "expert", "metric", "value"]
    # layers 0 and 2 route (layer 1 is dense), 4 experts, 4 metrics with _rel
    assert len(rows) == 2 * 4 * 8
    assert {r["layer"] for r in rows} == {"0", "2"}
    assert {r["metric"] for r in rows} == {
        f"dw_{p}{s}" for p in ("gate", "up", "down", "expert") for s in ("", "_rel")
    }
    with open(run / "metrics.csv", newline="") as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    assert {"dw_router", "dw_experts", "dw_shared_expert", "dw_mlp"} <= metrics
    assert json.loads((run / "config.json").read_text())["steps"]["weights"]


# -- routing shift (analyze) ----------------------------------------------------------------------

TEXTS = [
    "Question: how many 3 + 4 ? Answer: 7 #### 7",
    "a 1",
    "Question: 1 2 3 4 5 6 7 8 9 0 1 2 3 Answer: 4 #### 4",
    "the 2 * 5 is ? 10",
]


def _independent_routing(base, sft, tok, cfg) -> tuple[dict, dict]:
    """route_js / route_load_tv per MoE layer and loads per (model, layer, expert), from the
    models' own ``output_router_logits``, one unpadded prompt at a time, numpy/scipy float64."""
    from scipy.spatial.distance import jensenshannon

    k = cfg.num_experts_per_tok
    layers = surgery.moe_layers(cfg)
    js: dict[int, list[float]] = {layer: [] for layer in layers}
    counts = {(m, layer): np.zeros(4) for m in ("base", "sft") for layer in layers}
    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        probs = {}
        for m, model in (("base", base), ("sft", sft)):
            with torch.no_grad():
                out = model(input_ids=ids, output_router_logits=True)
            assert len(out.router_logits) == len(layers)  # one per MoE layer, in order
            for layer, logits in zip(layers, out.router_logits, strict=True):
                z = logits.double().numpy()
                p = np.exp(z - z.max(-1, keepdims=True))
                probs[(m, layer)] = p / p.sum(-1, keepdims=True)
                for row in probs[(m, layer)]:
                    counts[(m, layer)][np.argsort(-row)[:k]] += 1
        for layer in layers:
            js[layer] += [
                jensenshannon(p, q) ** 2
                for p, q in zip(probs[("base", layer)], probs[("sft", layer)], strict=True)
            ]
    pair, loads = {}, {}
    for layer in layers:
        pair[("route_js", layer)] = float(np.mean(js[layer]))
        lb, ls = (counts[(m, layer)] / counts[(m, layer)].sum() for m in ("base", "sft"))
        pair[("route_load_tv", layer)] = 0.5 * float(np.abs(lb - ls).sum())
        for e in range(4):
            loads[("base", layer, e)], loads[("sft", layer, e)] = lb[e], ls[e]
    return pair, loads


def _pass_tables(acc) -> tuple[dict, dict]:
    rows, _ = acc.rows()
    pair = {(r["metric"], r["layer"]): r["value"] for r in rows if r["metric"].startswith("route")}
    loads = {(r["model"], r["layer"], r["expert"]): r["value"] for r in acc.expert_rows()}
    return pair, loads


@pytest.mark.parametrize("model_type", MOE)
def test_route_js_and_loads_match_scipy_with_padding_masked(moe_pairs, model_type):
    from sftlens.models.loading import load_model
    from sftlens.representations import run_pass

    base_dir, sft_dir = moe_pairs[model_type]
    base, tok = load_model(base_dir)
    sft, _ = load_model(sft_dir)
    want_pair, want_loads = _independent_routing(base, sft, tok, base.config)
    assert want_pair[("route_js", surgery.moe_layers(base.config)[0])] > 1e-4  # SFT reroutes
    for side in ("left", "right"):  # 3 of 4 prompts padded, on either side
        acc = run_pass(
            base,
            sft,
            tok,
            TEXTS,
            batch_size=4,
            max_length=64,
            padding_side=side,
            attention=False,
            progress=False,
        )
        pair, loads = _pass_tables(acc)
        assert pair.keys() == want_pair.keys() and loads.keys() == want_loads.keys()
        for key, value in {**pair, **loads}.items():
            want = {**want_pair, **want_loads}[key]
            assert value == pytest.approx(want, rel=1e-5, abs=1e-9), (side, key)


@pytest.mark.parametrize("model_type", ["qwen2_moe"])
def test_a_model_against_itself_routes_identically(moe_pairs, model_type):
    from sftlens.models.loading import load_model
    from sftlens.representations import run_pass

    base, tok = load_model(moe_pairs[model_type][0])
    acc = run_pass(
        base, base, tok, TEXTS, batch_size=3, max_length=64, attention=False, progress=False
    )
    pair, loads = _pass_tables(acc)
    assert pair and all(v == 0.0 for v in pair.values())  # exactly
    assert {layer for _, layer in pair} == {0, 2}  # layer 1 is dense: no routing rows
    assert all(loads[("base", *k[1:])] == loads[("sft", *k[1:])] for k in loads)


def test_analyze_in_memory_and_layer_major_agree_and_share_experts_csv(moe_pairs, tmp_path):
    from sftlens import api

    base, sft = moe_pairs["olmoe"]
    opts = dict(data="synthetic", max_prompts=6, batch_size=3, max_length=48, progress=False)

    def tables(out: Path) -> tuple[dict, dict]:
        with open(out / "metrics.csv", newline="") as f:
            metrics = {(r["model"], r["layer"], r["metric"]): r["value"] for r in csv.DictReader(f)}
        with open(out / "experts.csv", newline="") as f:
            experts = {
                (r["model"], r["layer"], r["expert"], r["metric"]): r["value"]
                for r in csv.DictReader(f)
            }
        return metrics, experts

    api.weights(str(base), str(sft), out=str(tmp_path / "a"), progress=False)
    mem = tables(api.analyze(str(base), str(sft), out=str(tmp_path / "a"), **opts))
    stream = tables(
        api.analyze(str(base), str(sft), out=str(tmp_path / "b"), stream_layers=True, **opts)
    )
    route = {k: v for k, v in mem[0].items() if k[2].startswith("route")}
    assert len(route) == 2 * 3 and {k[0] for k in route} == {"pair"}
    for key, value in route.items():
        assert float(stream[0][key]) == pytest.approx(float(value), rel=1e-6), key
    loads = {k: v for k, v in mem[1].items() if k[3] == "route_load"}
    assert len(loads) == 2 * 3 * 4  # base and sft, 3 layers, 4 experts
    for key, value in loads.items():
        assert float(stream[1][key]) == pytest.approx(float(value), rel=1e-9), key
    # analyze kept the weights command's per-expert rows in the shared experts.csv
    assert any(k[3] == "dw_expert" for k in mem[1])
    # the report shows the routing shift and the router's weight change per layer
    report = (tmp_path / "a" / "report.html").read_text()
    assert "route_js" in report and "dw_router" in report
    assert (tmp_path / "a" / "plots" / "routing.png").is_file()


def test_a_router_that_cannot_be_hooked_is_a_one_line_error():
    from sftlens.capture import Batch, record_routers, router_logits

    model = _model("olmoe")
    spec = surgery.arch_spec(model)
    block = model.model.layers[0]
    del block.mlp.gate
    with (
        pytest.raises(
            SftlensError,
            match=r"^block 0 has no router at 'mlp\.gate', so its routing cannot be recorded; "
            r"pass --no-routing or report this model type$",
        ) as err,
        record_routers(spec, {0: block}),
    ):
        pass
    assert "\n" not in str(err.value)
    ids = torch.ones(1, 3, dtype=torch.long)
    batch = Batch(ids, ids, ids, [0])
    with pytest.raises(SftlensError, match="the router of layer 1 did not run"):
        router_logits({}, [1], batch)
    with (
        pytest.raises(
            SftlensError,
            match=r"^gpt2 has no router: routing metrics need a mixture-of-experts model$",
        ),
        record_routers(surgery.arch_spec_of("gpt2"), {0: block}),
    ):
        pass


# -- tune: LoRA on MoE models -----------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE)
def test_lora_targets_attention_of_the_planned_layers_and_refuses_expert_mlps(model_type):
    from sftlens.config import TuneConfig
    from sftlens.tuning import lora

    model = _model(model_type)
    plan = lora.plan_lora(model, [2], TuneConfig(model="m", targets="attn"))
    peft_model = lora.apply_lora(model, plan)  # checks: exactly q,k,v,o of layer 2 adapted
    adapted = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert adapted == {f"base_model.model.model.layers.2.self_attn.{p}_proj" for p in "qkvo"}
    for targets in ("attn+mlp", "mlp") + (("q,gate",) if model_type == "qwen2_moe" else ()):
        with pytest.raises(SftlensError, match="mixtures of experts .* pass --targets attn") as err:
            lora.plan_lora(_model(model_type), [2], TuneConfig(model="m", targets=targets))
        assert "\n" not in str(err.value)
