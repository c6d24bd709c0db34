"""Lenses: read a residual-stream state ``h_l`` as next-token logits.

One contract, after tuned-lens's ``nn/lenses.py``: ``lens(h, layer) -> logits`` for a state
``h`` of shape ``(..., d)`` taken at ``layer`` (``-1`` = the embeddings, ``0..L-1`` = raw block
outputs, before the final norm, as :func:`sftlens.capture.capture` returns them).

- :class:`Unembed` is the model's own readout, frozen: final norm, LM head and, for Gemma 2/3,
  the final logit soft-capping ``cap * tanh(logits / cap)``. Applied to the last block's output
  it gives exactly the model's logits; the final norm is applied once, here, and nowhere else.
- :class:`LogitLens` applies :class:`Unembed` to every layer as it is (nostalgebraist 2020).
- :class:`TunedLens` first maps ``h_l`` through a per-layer affine translator ``A_l h + b_l``
  (identity-initialised, so an untrained tuned lens IS the logit lens), fitted to minimise
  ``KL(final || lens(h_l))`` (Belrose et al. 2023). The last layer has no translator: its
  readout is the model's own. Translators are saved as safetensors plus a JSON config.

"Frozen" means no gradient reaches the model's parameters (they are used detached), without
changing their ``requires_grad`` flags: the lens never edits the model it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, read_json
from sftlens.models import surgery

log = logging.getLogger("sftlens.lens")

TRANSLATORS_FILE = "translators.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def _frozen_call(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with the module's parameters detached (gradients flow to ``x`` only)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    out: Tensor = torch.func.functional_call(module, params, (x,))
    return out


class Unembed(nn.Module):
    """The model's frozen readout: final norm, LM head, final logit soft-capping (Gemma 2/3)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.final_norm = surgery.get_final_norm(model)
        self.head = surgery.get_unembedding(model)
        self.softcap = surgery.final_logit_softcap(model)
        weight = getattr(self.head, "weight", None)
        if not isinstance(weight, Tensor):
            raise SftlensError(
                f"{type(self.head).__name__} LM head has no weight matrix; "
                "pass a causal LM whose head is a linear layer"
            )
        self.vocab_size, self.hidden_size = int(weight.shape[0]), int(weight.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        weight = self.head.weight
        assert isinstance(weight, Tensor)
        return weight.dtype

    def forward(self, h: Tensor) -> Tensor:
        """Logits ``(..., V)`` in float32 from states ``(..., d)`` (cast to the model's dtype)."""
        logits = _frozen_call(self.head, _frozen_call(self.final_norm, h.to(self.dtype))).float()
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


class LogitLens(nn.Module):
    """``logits_l = unembed(final_norm(h_l))`` for every layer."""

    def __init__(self, unembed: Unembed) -> None:
        super().__init__()
        self.unembed = unembed

    def forward(self, h: Tensor, layer: int) -> Tensor:
        return self.unembed(h)


class TunedLens(nn.Module):
    """``logits_l = unembed(A_l h_l + b_l)``; layers ``-1..L-2`` have a translator, ``L-1`` none.

    Translators are float32 ``nn.Linear(d, d)`` initialised to the identity and zero bias, so
    before fitting this lens equals :class:`LogitLens`. ``translators[l + 1]`` serves layer ``l``.
    """

    def __init__(self, unembed: Unembed, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        if hidden_size != unembed.hidden_size:
            raise SftlensError(
                f"tuned lens is for hidden size {hidden_size} but the model's LM head takes "
                f"{unembed.hidden_size}; fit a tuned lens for this model"
            )
        self.unembed = unembed
        self.num_layers, self.hidden_size = num_layers, hidden_size
        layers = [nn.Linear(hidden_size, hidden_size) for _ in range(num_layers)]
        with torch.no_grad():
            for t in layers:
                t.weight.copy_(torch.eye(hidden_size))
                t.bias.zero_()
        self.translators = nn.ModuleList(layers).to(next(unembed.head.parameters()).device)

    def forward(self, h: Tensor, layer: int) -> Tensor:
        if not -1 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside -1..{self.num_layers - 1}")
        if layer == self.num_layers - 1:
            return self.unembed(h)
        return self.unembed(self.translators[layer + 1](h.float()))

    # -- persistence: safetensors + JSON, no pickle -------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tuned_lens",
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "translator_layers": list(range(-1, self.num_layers - 1)),
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any], unembed: Unembed) -> TunedLens:
        if config.get("kind") != "tuned_lens" or config.get("format_version") != FORMAT_VERSION:
            raise SftlensError(
                f"not a tuned lens config of format {FORMAT_VERSION}: kind={config.get('kind')!r}, "
                f"format_version={config.get('format_version')!r}; fit the tuned lens again"
            )
        return cls(unembed, int(config["num_layers"]), int(config["hidden_size"]))

    def save(self, folder: str | Path, **meta: Any) -> Path:
        """Write ``translators.safetensors`` and ``config.json`` (``meta`` under ``"meta"``).

        The config is written last and atomically: its presence marks a complete save.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in self.translators.state_dict().items()
        }
        tmp = folder / f".{TRANSLATORS_FILE}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / TRANSLATORS_FILE)
        atomic_write_json(folder / CONFIG_FILE, {**self.to_dict(), "meta": meta})
        return folder

    @classmethod
    def load(cls, folder: str | Path, unembed: Unembed) -> TunedLens:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / TRANSLATORS_FILE).is_file():
            raise SftlensError(
                f"{folder} holds no saved tuned lens ({CONFIG_FILE} + {TRANSLATORS_FILE}); "
                "fit one with `sftlens probe --lens tuned`"
            )
        lens = cls.from_dict(read_json(folder / CONFIG_FILE), unembed)
        state = load_file(str(folder / TRANSLATORS_FILE))
        lens.translators.load_state_dict({k: v.float() for k, v in state.items()})
        return lens

    @staticmethod
    def saved_meta(folder: str | Path) -> dict[str, Any] | None:
        """The ``meta`` a complete save recorded, or None when there is none."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file() or not (Path(folder) / TRANSLATORS_FILE).is_file():
            return None
        meta = read_json(path).get("meta")
        return meta if isinstance(meta, dict) else None


def kl_from_final(final_logp: Tensor, logp: Tensor) -> Tensor:
    """``KL(final || layer)`` per row, in nats: ``sum_v p_final (log p_final - log p_layer)``."""
    return (final_logp.exp() * (final_logp - logp)).sum(-1)


def fit_tuned_lens(
    lens: TunedLens,
    model: nn.Module,
    batches: Callable[[int], tuple[Any, Tensor]],
    *,
    steps: int,
    lr: float,
    chunk: int = 256,
    progress: bool = False,
    desc: str = "tuned lens",
) -> list[float]:
    """Fit the translators with Adam; returns the loss of every step.

    ``batches(step)`` returns a :class:`sftlens.capture.Batch` and a ``(B, T)`` bool mask of
    the positions to fit on (the caller decides the data and its seeded order). The loss of a step is, summed over translated layers, the mean
    over those positions of ``KL(final || lens(h_l))``; ``final`` is the model's own
    distribution. Layers are independent (disjoint parameters), so each layer's loss is
    backpropagated on its own, in chunks of ``chunk`` positions: memory holds one chunk's
    logits, never all layers'.
    """
    from sftlens.capture import capture

    opt = torch.optim.Adam(lens.translators.parameters(), lr=lr)
    history: list[float] = []
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        batch, keep = batches(step)
        with torch.no_grad():
            states, _ = capture(model, batch)
        keep = keep.to(states[0].device)
        rows = [s[keep] for s in states]  # (n, d) per layer -1..L-1
        del states
        n = int(keep.sum())
        if n == 0:
            raise SftlensError(
                "a tuned-lens training batch has no positions to fit; check the data"
            )
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=keep.device)
        for start in range(0, n, chunk):
            with torch.no_grad():
                final = torch.log_softmax(lens.unembed(rows[-1][start : start + chunk]), -1)
            for layer in range(-1, lens.num_layers - 1):
                logp = torch.log_softmax(lens(rows[layer + 1][start : start + chunk], layer), -1)
                loss = kl_from_final(final, logp).sum() / n
                loss.backward()
                total += loss.detach()
        if not bool(torch.isfinite(total)):
            raise SftlensError(
                f"tuned-lens loss became {float(total)} at step {step}; lower --tuned-lr"
            )
        opt.step()
        history.append(float(total))
    return history
