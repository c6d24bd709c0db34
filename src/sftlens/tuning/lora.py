"""LoRA on chosen layers only: the PEFT config from the architecture layer, budget matching, and
the weight change ``||scaling * B A||_F`` that an adapter makes.

Nothing here names a module by hand: the target modules are the projections of the model's
:class:`~sftlens.models.surgery.ArchSpec` (``self_attn.q_proj``... for Llama, ``attn.c_attn`` for
GPT-2), ``layers_pattern`` is the last name of the path of :func:`surgery.get_blocks` (``layers``,
``h``), and after PEFT has built the model :func:`apply_lora` checks that exactly the planned
modules of exactly the planned layers were adapted (PEFT silently adapts nothing when a pattern
does not match, and may read an expert index as a layer index on MoE models).

Budget matching (SPEC "Mid-Block efficient tuning"): with ``L`` layers, ``L_active`` of them
trained and baseline rank ``r``, every trained layer gets ``r_mask = round(r * L / L_active)``,
rounded half up, at least 1. The total rank per target module, ``r_mask * L_active``, then
equals ``r * L`` up to the rounding: ``|r_mask * L_active - r * L| <= L_active / 2``
(exactly equal when ``L_active`` divides ``r * L``).

>>> budget_rank(8, 30, 12)  # 8 * 30 / 12 = 20
20
>>> budget_rank(8, 5, 3)  # 13.33 -> 13: total 39 for a budget of 40
13
>>> budget_rank(1, 3, 2)  # 1.5 rounds half up
2
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sftlens.config import TARGET_GROUPS, TuneConfig
from sftlens.errors import SftlensError
from sftlens.metrics.weights import lora_delta_norm
from sftlens.models import surgery

__all__ = [
    "LoraPlan",
    "apply_lora",
    "budget_rank",
    "check_adapted",
    "lora_dw_rows",
    "plan_lora",
    "target_projs",
]

Row = dict[str, Any]
ADAPTER = "default"  # PEFT's adapter name


def budget_rank(rank: int, num_layers: int, active: int) -> int:
    """``round(rank * L / L_active)`` rounded half up in exact integer arithmetic (>= 1)."""
    if not 1 <= active <= num_layers:
        raise SftlensError(f"{active} active layers do not fit a model of {num_layers} layers")
    return max(1, (2 * rank * num_layers + active) // (2 * active))


def target_projs(spec: surgery.ArchSpec, targets: str) -> tuple[str, ...]:
    """The projections ``--targets`` names, as the architecture stores them.

    ``attn`` -> ``q,k,v,o`` (or ``qkv,o`` for a fused model), ``mlp`` -> its MLP projections,
    ``attn+mlp`` both; a list of names is checked against the architecture. Mixture-of-experts
    MLPs are refused: transformers 5 stores the experts as fused 3-D parameters, not the
    ``nn.Linear`` modules that PEFT's ``target_modules`` adapts (and per-expert module names
    would put an expert index where PEFT looks for the layer index).
    """
    if spec.is_moe and (
        "mlp" in targets.split("+") or any(t.strip() in spec.mlp_projs for t in targets.split(","))
    ):
        raise SftlensError(
            f"--targets {targets}: {'/'.join(spec.model_types)} MLPs are mixtures of experts "
            "(fused 3-D expert weights) that LoRA cannot target; pass --targets attn "
            "(or a list of q,k,v,o)"
        )
    if targets in TARGET_GROUPS:
        out: tuple[str, ...] = ()
        if "attn" in targets:
            out += spec.attn_projs
        if "mlp" in targets:
            out += spec.mlp_projs
        return out
    names = tuple(dict.fromkeys(t.strip() for t in targets.split(",")))
    available = spec.attn_projs + spec.mlp_projs
    missing = [n for n in names if n not in available]
    if missing:
        raise SftlensError(
            f"--targets {targets}: {'/'.join(spec.model_types)} blocks have no projection "
            f"{', '.join(missing)}; available: {', '.join(available)}"
        )
    return names


@dataclass(frozen=True)
class LoraPlan:
    """Which modules of which layers get LoRA, with which rank and alpha."""

    layers: tuple[int, ...]
    num_layers: int
    projs: tuple[str, ...]  # projection names (q, k, v, o, qkv, gate, ...)
    target_modules: tuple[str, ...]  # block-relative module names (self_attn.q_proj, ...)
    layers_pattern: str  # the name of the block list (layers, h)
    rank: int  # per trained layer
    alpha: float
    dropout: float = 0.0
    fan_in_fan_out: bool = False  # weights stored (in, out): GPT-2's Conv1D

    @property
    def scaling(self) -> float:
        """PEFT's ``lora_alpha / r`` (rsLoRA off)."""
        return self.alpha / self.rank

    def lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # annotated int; floats work
            lora_dropout=self.dropout,
            fan_in_fan_out=self.fan_in_fan_out,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers),
            layers_pattern=self.layers_pattern,
            bias="none",
            task_type="CAUSAL_LM",
        )


def _blocks_name(model: nn.Module) -> str:
    blocks = surgery.get_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name.rsplit(".", 1)[-1]
    raise SftlensError("the block list is not a submodule of the model; cannot place LoRA")


def plan_lora(model: nn.Module, layers: list[int] | tuple[int, ...], cfg: TuneConfig) -> LoraPlan:
    """The plan for ``layers`` of ``model`` under ``cfg``'s rank, budget and alpha policy."""
    spec = surgery.arch_spec(model)
    num_layers = len(surgery.get_blocks(model))
    projs = target_projs(spec, cfg.targets)
    rank = budget_rank(cfg.rank, num_layers, len(layers)) if cfg.budget_match else cfg.rank
    alpha = cfg.alpha if cfg.alpha is not None else cfg.alpha_ratio * rank
    return LoraPlan(
        layers=tuple(sorted(layers)),
        num_layers=num_layers,
        projs=projs,
        target_modules=tuple(spec.module_name(p) for p in projs),
        layers_pattern=_blocks_name(model),
        rank=rank,
        alpha=float(alpha),
        dropout=cfg.lora_dropout,
        fan_in_fan_out=spec.transposed,
    )


def apply_lora(model: nn.Module, plan: LoraPlan) -> Any:
    """``model`` wrapped by PEFT with the plan's adapter; everything but LoRA frozen.

    Nothing forces a gradient below the lowest trained layer: gradient checkpointing stays off
    and the input-embedding hook that PEFT adds for it (``enable_input_require_grads``) is
    removed, so autograd starts at the first LoRA module.
    """
    from peft import get_peft_model

    if getattr(model, "is_activation_checkpointing", False):
        model.gradient_checkpointing_disable()  # type: ignore[operator]
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        try:
            peft_model = get_peft_model(model, plan.lora_config())
        except ValueError as exc:  # PEFT's "no target module found"
            raise SftlensError(
                f"PEFT found none of {', '.join(plan.target_modules)} in layers "
                f"{list(plan.layers)} under '{plan.layers_pattern}' ({str(exc).splitlines()[0][:120]}); "
                "report this model type to sftlens"
            ) from None
    disable = getattr(surgery._unwrap(peft_model), "disable_input_require_grads", None)
    if callable(disable):
        disable()
    check_adapted(peft_model, plan)
    return peft_model


def _lora_module(block: nn.Module, name: str) -> Any:
    module: Any = block.get_submodule(name)
    return module if hasattr(module, "lora_A") and ADAPTER in module.lora_A else None


def check_adapted(model: nn.Module, plan: LoraPlan) -> None:
    """Refuse a PEFT model whose LoRA modules are not exactly the plan's, or that trains more."""
    blocks = surgery.get_blocks(model)
    adapted = {
        (i, name)
        for i, block in enumerate(blocks)
        for name in plan.target_modules
        if _lora_module(block, name) is not None
    }
    want = {(i, name) for i in plan.layers for name in plan.target_modules}
    if adapted != want:
        extra, missing = sorted(adapted - want), sorted(want - adapted)
        raise SftlensError(
            f"PEFT adapted {len(adapted)} modules, not the {len(want)} planned "
            f"(missing e.g. {missing[:2]}, unexpected e.g. {extra[:2]}); "
            "report this model type to sftlens"
        )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        bad = [n for n in trainable if "lora_" not in n]
        raise SftlensError(
            f"after PEFT, {len(bad)} non-LoRA parameters are trainable (e.g. {bad[:1]}); "
            "report this model type to sftlens"
        )


def lora_dw_rows(model: nn.Module, plan: LoraPlan) -> list[Row]:
    """Per-layer weight change of the adapter, ``model=pair`` rows like ``dw_*``.

    For each adapted module ``dW = scaling * B A`` (PEFT's delta weight, computed in float64);
    ``lora_dw_{q,k,v,o}`` and the MLP projections are ``||dW||_F`` (a fused ``qkv`` /
    ``gate_up`` split by the architecture's layout first), ``lora_dw_attn`` and ``lora_dw_mlp``
    are ``sqrt`` of the sum of the squared norms of their projections, as ``dw_attn`` /
    ``dw_mlp`` of the weights analysis. Every layer gets a row; layers without LoRA are 0.
    Only projections that ``--targets`` adapted get rows.
    """
    spec = surgery.arch_spec(model)
    config = surgery._text_config(surgery._unwrap(model))
    blocks = surgery.get_blocks(model)
    rows: list[Row] = []
    for layer in range(plan.num_layers):
        sq: dict[str, float] = {}
        for proj, name in zip(plan.projs, plan.target_modules):
            group = "attn" if proj in spec.attn_projs else "mlp"
            module = _lora_module(blocks[layer], name)
            parts = surgery._FUSED_PARTS.get(proj, (proj,))
            if module is None:
                for part in parts:
                    sq[part] = 0.0
                sq.setdefault(group, 0.0)
                continue
            a = module.lora_A[ADAPTER].weight.detach()
            b = module.lora_B[ADAPTER].weight.detach()
            scaling = float(module.scaling[ADAPTER])
            if len(parts) == 1:
                sq[proj] = lora_delta_norm(a, b, scaling) ** 2
            else:  # fused: split the (out, in) delta by the layout, in checkpoint orientation
                delta = scaling * (b.double() @ a.double())
                stored = delta.t() if spec.transposed else delta
                for part, t in surgery.split_fused(spec, config, proj, stored, "weight").items():
                    sq[part] = float(torch.linalg.vector_norm(t)) ** 2
            sq[group] = sq.get(group, 0.0) + sum(sq[p] for p in parts)
        for key, value in sq.items():
            rows.append(
                {
                    "model": "pair",
                    "layer": layer,
                    "metric": f"lora_dw_{key}",
                    "value": math.sqrt(value),
                }
            )
    return rows
