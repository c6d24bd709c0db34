"""Streaming accumulators: feed batches with ``update``, read results with ``compute``.

They keep float64 sums only and reuse the pure functions of :mod:`sftlens.metrics` for every
formula. For data-parallel analysis call ``all_reduce_()`` ONCE on every rank after the last
``update`` and before ``compute``: it sums the state over ranks when ``torch.distributed`` is
initialised and does nothing otherwise. Create the accumulator on the device the process group
communicates on (``device="cuda"`` for NCCL), or move it there with ``to_``. The state is
float64 on every device: exact enough for the moment sums' cancellation (``sxx - sx sx^T / n``)
even with massive-activation features; on a GPU with slow float64 (consumer cards run it at
1/32-1/64 of float32) it is the one cost to expect, still far below the same sums on the CPU. ``compute`` returns values keyed by their
``metrics.csv`` names.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import Tensor

from sftlens.errors import SftlensError
from sftlens.metrics.attention import attention_entropy_sums, attention_js_sums
from sftlens.metrics.geometry import (
    _pair,
    cka_from_moments,
    linear_cka,
    mean_shift_from_means,
    row_cosine,
    top_feature_share_from_moments,
    unbiased_cka,
)
from sftlens.metrics.information import (
    PAPER_RIDGE,
    Preset,
    _matrix,
    alpha_entropy_from_eigenvalues,
    alpha_entropy_rows,
    dataset_entropy,
    erank_from_singular_values,
    gram_spectrum,
    masked_gram,
    matrix_entropy,
    normalize_entropy,
)
from sftlens.metrics.routing import load_tv, routing_sums

Device = torch.device | str | None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _Accumulator:
    """Holds named float64 state tensors; ``all_reduce_`` sums them over ranks."""

    _state: tuple[str, ...] = ()

    def __init__(self, device: Device = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def _count(self) -> float:
        n = float(getattr(self, "count", 0.0))
        if n <= 0:
            raise SftlensError(
                f"{type(self).__name__}.compute() called before any update; feed at least one batch"
            )
        return n

    def state_dict(self) -> dict[str, Tensor]:
        """The float64 state tensors by name (to checkpoint a long pass and resume it)."""
        return {name: getattr(self, name) for name in self._state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._state:
            getattr(self, name).copy_(state[name])

    def to_(self, device: Device) -> None:
        """Move the state to ``device`` in place (the models' device: no host copy per batch,
        and NCCL reduces CUDA tensors). The state stays float64 there."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # plain tensors even when called under torch.inference_mode (analyze runs its pass in
        # one): an inference tensor could not be updated in place after the block (resume,
        # a second pass)
        with torch.inference_mode(False):
            for name in self._state:
                setattr(self, name, getattr(self, name).to(self.device))

    def all_reduce_(self) -> None:
        """Sum every state tensor over ranks in place (no-op without a process group)."""
        if _distributed():
            for name in self._state:
                dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM)


class StreamingCKA(_Accumulator):
    """Token-level linear CKA over any number of tokens in O(d^2) memory.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(100, 4, generator=g), torch.randn(100, 6, generator=g)
        >>> acc = StreamingCKA(4, 6)
        >>> acc.update(x[:30], y[:30]); acc.update(x[30:], y[30:])
        >>> abs(acc.compute() - float(linear_cka(x, y))) < 1e-12
        True
    """

    _state = ("sxx", "syy", "sxy", "sx", "sy", "count")

    def __init__(self, d_x: int, d_y: int, *, device: Device = None) -> None:
        super().__init__(device)
        self.d_x, self.d_y = d_x, d_y
        self.sxx, self.syy, self.sxy = (
            self._zeros(d_x, d_x),
            self._zeros(d_y, d_y),
            self._zeros(d_y, d_x),
        )
        self.sx, self.sy, self.count = self._zeros(d_x), self._zeros(d_y), self._zeros()
        self.own = (True, True)  # which sides' own moments (x: sxx, sx; y: syy, sy) it feeds

    _SIDES = (("sxx", "sx"), ("syy", "sy"))

    def share(self, side: int, other: StreamingCKA, other_side: int) -> None:
        """Read side ``side``'s own moments (0: x, 1: y) from ``other``'s side ``other_side``
        (the same model's rows over the same tokens, fed there) instead of feeding a copy: one
        model's ``X^T X`` serves every pair it is in. Call after :meth:`to_`.

        >>> g = torch.Generator().manual_seed(0)
        >>> x, y, z = (torch.randn(50, 3, generator=g) for _ in range(3))
        >>> a, b = StreamingCKA(3, 3), StreamingCKA(3, 3)
        >>> b.share(0, a, 1)  # b's x is a's y
        >>> a.update(x, y); b.update(y, z)
        >>> abs(b.compute() - float(linear_cka(y, z))) < 1e-12
        True
        """
        for mine, theirs in zip(self._SIDES[side], self._SIDES[other_side]):
            setattr(self, mine, getattr(other, theirs))
        self.own = (self.own[0] and side != 0, self.own[1] and side != 1)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add token rows x (N, d_x) of the base model and y (N, d_y) of the SFT model."""
        x, y = _pair(x.to(self.device), y.to(self.device))
        if x.shape[1] != self.d_x or y.shape[1] != self.d_y:
            raise SftlensError(
                f"expected widths ({self.d_x}, {self.d_y}), got ({x.shape[1]}, {y.shape[1]}); build StreamingCKA with the models' hidden sizes"
            )
        if self.own[0]:  # a shared side is fed by its owner
            self.sxx.addmm_(x.T, x)  # in place: no (d, d) temporaries
            self.sx += x.sum(dim=0)
        if self.own[1]:
            self.syy.addmm_(y.T, y)
            self.sy += y.sum(dim=0)
        self.sxy.addmm_(y.T, x)
        self.count += x.shape[0]

    def all_reduce_(self) -> None:
        """Sum the state over ranks; shared moments are summed by their owner only."""
        if _distributed():
            shared = {n for side, own in enumerate(self.own) if not own for n in self._SIDES[side]}
            for name in self._state:
                if name not in shared:
                    dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM)

    def compute(self, *, standardize: bool = False) -> float:
        """Linear CKA of all tokens seen (``cka`` in metrics.csv; ``cka_std`` with
        ``standardize=True``: CKA of z-scored features, see :func:`linear_cka`)."""
        n = self._count()
        return float(
            cka_from_moments(
                self.sxx, self.syy, self.sxy, self.sx, self.sy, n, standardize=standardize
            )
        )

    def top_feature_shares(self) -> tuple[float, float]:
        """Largest single feature's share of the token variance, (base, SFT)."""
        n = self._count()
        return (
            float(top_feature_share_from_moments(self.sxx, self.sx, n)),
            float(top_feature_share_from_moments(self.syy, self.sy, n)),
        )


class PairMoments(_Accumulator):
    """Mean cosine similarity and mean shift between base and SFT token rows of width ``d``.

    Example:
        >>> acc = PairMoments(2)
        >>> acc.update(torch.tensor([[2.0, 4.0], [4.0, 4.0]]), torch.tensor([[2.0, 4.0], [3.0, 5.0]]))
        >>> {k: round(v, 4) for k, v in acc.compute().items()}
        {'cosine': 0.9851, 'mean_shift': 0.7071, 'mean_shift_rel': 0.1414}
    """

    _state = ("cos_sum", "sum_x", "sum_y", "count")

    def __init__(self, d: int, *, device: Device = None) -> None:
        super().__init__(device)
        self.cos_sum, self.count = self._zeros(), self._zeros()
        self.sum_x, self.sum_y = self._zeros(d), self._zeros(d)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add token rows x (N, d) of the base model and y (N, d) of the SFT model."""
        x, y = _pair(x.to(self.device), y.to(self.device))
        if x.shape[1] != self.sum_x.numel():
            raise SftlensError(
                f"expected width {self.sum_x.numel()}, got {x.shape[1]}; build PairMoments with the model's hidden size"
            )
        self.cos_sum += row_cosine(x, y).sum()
        self.sum_x += x.sum(dim=0)
        self.sum_y += y.sum(dim=0)
        self.count += x.shape[0]

    def compute(self) -> dict[str, float]:
        n = self._count()
        shift, rel = mean_shift_from_means(self.sum_x / n, self.sum_y / n)
        return {
            "cosine": float(self.cos_sum) / n,
            "mean_shift": float(shift),
            "mean_shift_rel": float(rel),
        }


class PromptEntropy(_Accumulator):
    """Prompt entropy: the matrix entropy of each prompt's real tokens, averaged over prompts.

    Example:
        >>> acc = PromptEntropy()
        >>> acc.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # 2 tokens: 1 direction after centring
        >>> acc.compute()
        {'prompt_entropy': 0.0, 'prompt_entropy_norm': 0.0}
    """

    _state = ("raw_sum", "norm_sum", "count")

    def __init__(
        self,
        alpha: float = 1.0,
        preset: Preset = "default",
        *,
        device: Device = None,
        background: bool | None = None,
    ) -> None:
        """``background``: solve :meth:`update_batch`'s Grams on a host thread (default: when
        they are on a GPU, the one case where it pays)."""
        super().__init__(device)
        self.background = background
        alpha_entropy_from_eigenvalues(torch.ones(1), alpha)  # raises now on a bad alpha
        if preset not in ("default", "paper"):
            raise SftlensError(f"unknown entropy preset {preset!r}; use 'default' or 'paper'")
        self.alpha, self.preset = alpha, preset
        self.raw_sum, self.norm_sum, self.count = self._zeros(), self._zeros(), self._zeros()
        self._pending: deque[Future[tuple[Tensor, Tensor]]] = deque()

    def update(self, z: Tensor) -> None:
        """Add one prompt: its real tokens at one layer, (n_tokens, d)."""
        raw = matrix_entropy(z, self.alpha, preset=self.preset).to(self.device)
        self.raw_sum += raw
        self.norm_sum += normalize_entropy(raw, z.shape[0], z.shape[1])
        self.count += 1

    def update_batch(self, h: Tensor, mask: Tensor) -> None:
        """Add every prompt of a padded batch at once: ``h`` (B, T, d), ``mask`` (B, T) real tokens.

        Same values as :meth:`update` on each prompt's real rows, with one batched
        eigendecomposition instead of B (padding adds exact zero eigenvalues). On a GPU the
        Grams are built there and solved on the host, in a background thread while the GPU
        runs on (see :func:`~sftlens.metrics.information.gram_spectrum` for why); the sums are
        added in submission order, so the result does not depend on thread timing.
        """
        mask = mask.bool()
        if self.preset == "default":
            gram = masked_gram(h, mask, center=True)
        else:
            gram = masked_gram(h, mask, center=False, ridge=PAPER_RIDGE, scale_by_d=True)
        m = torch.clamp(mask.sum(-1).to(torch.float64), max=h.shape[-1])  # min(n_b, d)
        if not (gram.is_cuda if self.background is None else self.background):
            self._add(*self._sums(gram, m))
        else:
            ready = None
            if gram.is_cuda:  # copy to pinned host memory without waiting for the GPU
                host = torch.empty(gram.shape, dtype=gram.dtype, pin_memory=True)
                host_m = torch.empty(m.shape, dtype=m.dtype, pin_memory=True)
                gram, m = host.copy_(gram, non_blocking=True), host_m.copy_(m, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            self._pending.append(_host_pool().submit(self._sums, gram.cpu(), m.cpu(), ready))
            while len(self._pending) > _MAX_PENDING:  # bound the host memory held
                self._add(*self._pending.popleft().result())
        self.count += h.shape[0]

    def _sums(
        self, gram: Tensor, m: Tensor, ready: torch.cuda.Event | None = None
    ) -> tuple[Tensor, Tensor]:
        """(sum of raw entropies, sum of normalised ones) of a batch of Grams."""
        if ready is not None:
            ready.synchronize()  # the non-blocking copy to the host has landed
        if not bool(torch.isfinite(gram.sum())):  # the solver's own error would not say why
            raise SftlensError(
                "h contains NaN or inf (real tokens); run the model in float32/bfloat16 instead "
                "of float16 or check its inputs"
            )
        raw = alpha_entropy_rows(gram_spectrum(gram), self.alpha)  # (B,)
        norm = torch.where(m > 1, raw / m.clamp_min(2.0).log(), torch.zeros_like(raw))
        return raw.sum(), norm.sum()

    def _add(self, raw: Tensor, norm: Tensor) -> None:
        self.raw_sum += raw.to(self.device)
        self.norm_sum += norm.to(self.device)

    def _drain(self) -> None:
        """Add the sums of every batch still being solved on the host, in order."""
        while self._pending:
            self._add(*self._pending.popleft().result())

    def state_dict(self) -> dict[str, Tensor]:
        self._drain()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._drain()
        super().load_state_dict(state)

    def to_(self, device: Device) -> None:
        self._drain()
        super().to_(device)

    def all_reduce_(self) -> None:
        self._drain()
        super().all_reduce_()

    def compute(self) -> dict[str, float]:
        self._drain()
        n = self._count()
        return {
            "prompt_entropy": float(self.raw_sum) / n,
            "prompt_entropy_norm": float(self.norm_sum) / n,
        }


#: batches of Grams a GPU pass may have in flight to the host solvers before it waits
_MAX_PENDING = 64
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)


def _host_pool() -> ThreadPoolExecutor:
    """The threads that solve GPU Grams on the host (LAPACK releases the GIL). A forked
    process makes its own: the parent's threads do not exist in it."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="sftlens-eigh"))
    return _POOL[1]


class PooledRows(_Accumulator):
    """One pooled vector per prompt (kept on CPU, float64) for dataset-level statistics.

    ``all_reduce_`` gathers the rows of every rank in rank order (call it on the base and the
    SFT accumulators alike so that their rows stay aligned for :meth:`cka`).

    Example:
        >>> acc = PooledRows(3)
        >>> acc.update(torch.eye(3) * 5.0)
        >>> acc.update(torch.ones(3))
        >>> acc.rows.shape
        torch.Size([4, 3])
    """

    def __init__(self, d: int) -> None:
        super().__init__("cpu")
        self.d = d
        self._rows: list[Tensor] = []

    def to_(self, device: Device) -> None:
        """The rows stay in host memory (they grow with the dataset); :meth:`compute` and
        :meth:`cka` do their linear algebra on ``device`` (the pass's: on a GPU each layer's
        eigensolve and SVD of the (n_prompts, d) rows is far quicker than on the host)."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def update(self, rows: Tensor) -> None:
        """Add pooled vectors, (P, d) or one (d,)."""
        rows = _matrix(rows.reshape(1, -1) if rows.dim() == 1 else rows, "rows").cpu()  # (P, d)
        if rows.shape[1] != self.d:
            raise SftlensError(
                f"expected pooled rows of width {self.d}, got {rows.shape[1]}; build PooledRows with the hidden size"
            )
        self._rows.append(rows)

    @property
    def rows(self) -> Tensor:
        """All pooled rows so far, (n_prompts, d) float64."""
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.d, dtype=torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._rows = [state["rows"].to(torch.float64)]

    def all_reduce_(self) -> None:
        """Gather the rows of all ranks (in rank order); no-op without a process group."""
        if _distributed():
            gathered: list[Tensor | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.rows)
            self._rows = [t for t in gathered if t is not None]

    def compute(self, alpha: float = 1.0, preset: Preset = "default") -> dict[str, float]:
        """Dataset entropy (raw and normalised, :func:`dataset_entropy` of ``preset``) and
        effective rank (both variants, centred)."""
        z = self.rows.to(self.device)
        if z.shape[0] == 0:
            raise SftlensError(
                "PooledRows.compute() called before any update; feed at least one prompt"
            )
        raw = dataset_entropy(z, alpha, preset=preset)
        sigma = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))  # centred, as effective_rank
        return {
            "dataset_entropy": float(raw),
            "dataset_entropy_norm": float(normalize_entropy(raw, z.shape[0], z.shape[1])),
            "erank": float(erank_from_singular_values(sigma, variant="roy_vetterli")),
            "erank_sigma2": float(erank_from_singular_values(sigma, variant="sigma2")),
        }

    def cka(self, other: PooledRows, *, unbiased: bool = False) -> float:
        """Pooled CKA between these rows (base) and ``other``'s (SFT), prompt by prompt."""
        x, y = self.rows.to(self.device), other.rows.to(self.device)
        return float((unbiased_cka if unbiased else linear_cka)(x, y))


class AttentionStats(_Accumulator):
    """Per-head attention entropy of base and SFT, and their Jensen-Shannon divergence.

    Example:
        >>> acc = AttentionStats(2)
        >>> acc.update(torch.full((1, 2, 3, 3), 1 / 3), torch.full((1, 2, 3, 3), 1 / 3))
        >>> acc.compute()["attn_js"]
        tensor([0., 0.], dtype=torch.float64)
    """

    _state = ("ent_base", "ent_sft", "js", "count")

    def __init__(self, num_heads: int, *, device: Device = None) -> None:
        super().__init__(device)
        self.num_heads = num_heads
        self.ent_base, self.ent_sft, self.js = (self._zeros(num_heads) for _ in range(3))
        self.count = self._zeros()

    def update(
        self,
        attn_base: Tensor,
        attn_sft: Tensor,
        key_mask: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> None:
        """Add one layer's attention (B, H, Q, K) of both models on the same batch."""
        if attn_base.dim() != 4 or attn_base.shape[1] != self.num_heads:
            raise SftlensError(
                f"expected attention (batch, {self.num_heads}, queries, keys), got {tuple(attn_base.shape)}; build AttentionStats with the model's head count"
            )
        js, count = attention_js_sums(attn_base, attn_sft, key_mask, query_mask)
        self.ent_base += attention_entropy_sums(attn_base, key_mask, query_mask)[0].to(self.device)
        self.ent_sft += attention_entropy_sums(attn_sft, key_mask, query_mask)[0].to(self.device)
        self.js += js.to(self.device)
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        """Means per head (H,) float64: ``attn_entropy_base``, ``attn_entropy_sft``, ``attn_js``."""
        n = self._count()
        return {
            "attn_entropy_base": self.ent_base / n,
            "attn_entropy_sft": self.ent_sft / n,
            "attn_js": self.js / n,
        }


class RoutingStats(_Accumulator):
    """Routing shift of one mixture-of-experts layer: JS between the base and SFT routers'
    distributions, and each model's expert load (see :mod:`sftlens.metrics.routing`).

    The state is sums (JS over tokens, top-k assignment counts per expert, tokens), so shards
    of any size all-reduce exactly.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> za, zb = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
        >>> acc = RoutingStats(4, top_k=2)
        >>> acc.update(za[:3], zb[:3]); acc.update(za[3:], zb[3:])
        >>> out = acc.compute()
        >>> from sftlens.metrics.routing import route_js
        >>> abs(out["route_js"] - route_js(za, zb)) < 1e-12, float(out["load_base"].sum())
        (True, 1.0)
    """

    _state = ("js", "count_base", "count_sft", "count")

    def __init__(self, num_experts: int, top_k: int, *, device: Device = None) -> None:
        super().__init__(device)
        self.num_experts, self.top_k = num_experts, top_k
        self.js, self.count = self._zeros(), self._zeros()
        self.count_base, self.count_sft = self._zeros(num_experts), self._zeros(num_experts)

    def update(self, logits_base: Tensor, logits_sft: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch's router logits of both models, (B, T, E) with a (B, T) mask of real
        tokens, or (N, E) of real tokens."""
        if logits_base.shape[-1] != self.num_experts:
            raise SftlensError(
                f"expected router logits over {self.num_experts} experts, got "
                f"{tuple(logits_base.shape)}; build RoutingStats with the model's expert count"
            )
        js, cb, cs, n = routing_sums(logits_base, logits_sft, self.top_k, mask)
        self.js += js.to(self.device)
        self.count_base += cb.to(self.device)
        self.count_sft += cs.to(self.device)
        self.count += n

    def compute(self) -> dict[str, float | Tensor]:
        """``route_js`` and ``route_load_tv`` (floats), ``load_base`` / ``load_sft`` ((E,),
        fractions of the top-k assignments, each summing to 1)."""
        n = self._count()
        base = self.count_base / (n * self.top_k)
        sft = self.count_sft / (n * self.top_k)
        return {
            "route_js": float(self.js) / n,
            "route_load_tv": load_tv(base, sft),
            "load_base": base,
            "load_sft": sft,
        }
