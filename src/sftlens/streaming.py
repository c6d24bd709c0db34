"""Layer-major analysis (``analyze --stream-layers``): one block of each model in memory at a time.

The in-memory pass (:func:`sftlens.representations.run_pass`) runs batch after batch through
two whole models. This pass turns the loops around and walks the depth once:

1. Each model is built without memory (:func:`accelerate.init_empty_weights`: parameters on
   the meta device, buffers such as rotary frequencies real); only the parts outside the blocks
   (embeddings, final norm) are read from the checkpoint.
2. Every batch runs through the model's own body with each block replaced by a recorder that
   keeps the arguments the block is called with and hands its input on unchanged. That gives
   the input of block 0 (``h_emb``, with GPT-2's learned positions or Gemma's ``sqrt(d)``
   scaling) and exactly what each real block would receive: the mask of its layer type
   (Gemma 3's sliding-window and global layers), its position embeddings, position ids. No
   per-family code: the architecture's forward does it.
3. For ``l = 0 .. L-1``: block ``l`` of BASE and of SFT is read from the safetensors shards
   (once per run), every batch's activations go through it (``h_l = block_l(h_{l-1}, **kw_l)``,
   the raw block output, as :func:`sftlens.capture.capture` takes it), layer ``l``'s
   accumulators are fed, reduced over ranks, turned into rows, and freed with the block.
   A mixture-of-experts block's router logits are recorded on the way
   (:func:`sftlens.capture.record_routers`); its fused 3-D experts are assembled from the
   per-expert tensors when the checkpoint stores one per expert
   (:func:`sftlens.models.surgery.load_block_tensor`).

Activations of all batches wait between blocks in memory, or in a scratch file in the run
folder (:class:`ActivationStore`) when they do not fit. The results equal the in-memory pass's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sftlens.capture import Batch, output_tensor, record_routers, router_logits
from sftlens.errors import SftlensError
from sftlens.memory import format_bytes
from sftlens.models import surgery
from sftlens.models.checkpoint import CheckpointReader
from sftlens.representations import RepresentationPass, Row

log = logging.getLogger("sftlens.analyze")

MODELS = ("base", "sft")
Call = tuple[tuple[Any, ...], dict[str, Any]]  # what a block is called with, hidden states aside


class _Recorder(nn.Module):
    """Stands in for block ``index``: keeps its call's other arguments, returns its input."""

    def __init__(self, index: int, calls: dict[int, Call], inputs: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.index, self.calls, self.inputs = index, calls, inputs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls[self.index] = (rest, kwargs)
        self.inputs[self.index] = hidden
        return hidden


def _materialise_buffers(model: nn.Module) -> None:
    """Give the buffers built on the meta device (rotary frequencies, Gemma's embedding scale)
    real values, computed by transformers' own initialisation of the modules that own them
    (what ``from_pretrained`` does for the buffers of a model it builds on the meta device)."""
    owners: dict[str, nn.Module] = {}
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[leaf] = torch.empty_like(buf, device="cpu")
            owners[owner] = module
    init = getattr(model, "_init_weights", None)
    if owners and not callable(init):
        raise SftlensError(
            f"{type(model).__name__} cannot initialise its buffers; "
            "analyse this model without --stream-layers"
        )
    for module in owners.values():
        init(module)  # type: ignore[misc]


class Skeleton:
    """One causal LM whose blocks hold no memory until :meth:`load_block` reads one.

    >>> skel = Skeleton("path/to/model", dtype=torch.float32)   # doctest: +SKIP
    >>> h_emb, calls = skel.record(batch)                       # doctest: +SKIP
    >>> skel.load_block(0); h0, attn = skel.run_block(0, h_emb, calls[0])  # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        dtype: torch.dtype,
        device: str = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader = CheckpointReader(folder)
        self.dtype, self.device = dtype, torch.device(device)
        config = AutoConfig.from_pretrained(folder)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        # everything on the meta device: no parameter is ever allocated (accelerate's
        # init_empty_weights allocates each on the CPU first, untouched, which costs no resident
        # memory but grows the address space by the model's size: fatal under `ulimit -v`)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        _materialise_buffers(model)
        for name, buf in list(model.named_buffers()):  # rotary frequencies where the blocks run
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(self.device)
        self.model = model.eval()
        self.spec = surgery.arch_spec(model)
        self.body = surgery.get_body(model)
        self.block_list = surgery.get_blocks(model)
        self.blocks = list(self.block_list)
        self.bytes_read = 0
        self.experts = surgery.num_experts(model.config) if self.spec.is_moe else 0
        # checkpoint key of each block tensor: (layer, name inside the block) -> key
        self._block_keys: dict[tuple[int, str], str] = {}
        for key in self.reader.keys():  # noqa: SIM118  (a reader, not a dict)
            found = surgery.block_key(self.spec, key)
            if found is not None:
                self._block_keys[found] = key
        in_blocks = {id(p) for b in self.blocks for p in b.parameters()}
        self._outside = [name for name, p in self.body.named_parameters() if id(p) not in in_blocks]
        prefix = next(n for n, m in model.named_modules() if m is self.body)
        for name in self._outside:  # embeddings, final norm: what the body needs besides blocks
            full = f"{prefix}.{name}" if prefix else name
            self._set(self.body, name, self.reader.get(self._outside_key(full)))
        buffers = [n for n, b in model.named_buffers() if b.device.type == "meta"]
        if buffers:
            raise SftlensError(
                f"{self.reader.folder}: buffers {buffers[:3]} were not built; "
                "analyse this model without --stream-layers"
            )

    def _outside_key(self, name: str) -> str:
        module, _, leaf = name.rpartition(".")
        for variant in surgery.path_variants(module):
            if f"{variant}.{leaf}" in self.reader:
                return f"{variant}.{leaf}"
        raise SftlensError(
            f"{self.reader.folder} has no tensor for {name}; check that the checkpoint is "
            "complete (re-copy or re-download it)"
        )

    def _set(self, module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        if tensor is None:  # back to the meta device: the memory is freed
            set_module_tensor_to_device(module, name, "meta")
            return
        self.bytes_read += tensor.numel() * tensor.element_size()
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        set_module_tensor_to_device(module, name, self.device, value=tensor)

    def free_outside(self) -> None:
        """Drop the embeddings and the final norm (once every batch has been recorded)."""
        for name in self._outside:
            self._set(self.body, name, None)
        release_freed_memory()

    # -- per batch ----------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, batch: Batch) -> tuple[torch.Tensor, list[Call]]:
        """``h_emb`` (B, T, D) and the arguments each block gets for this batch, from the
        model's own forward with every block replaced by a recorder."""
        calls: dict[int, Call] = {}
        inputs: dict[int, torch.Tensor] = {}
        for i in range(len(self.blocks)):
            self.block_list[i] = _Recorder(i, calls, inputs)
        try:
            self.body(  # as sftlens.capture.capture calls it
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        finally:
            for i, block in enumerate(self.blocks):
                self.block_list[i] = block
        if len(calls) != len(self.blocks):
            missing = sorted(set(range(len(self.blocks))) - set(calls))
            raise SftlensError(
                f"the model's forward skipped blocks {missing}; "
                "analyse this model without --stream-layers"
            )
        shapes = {tuple(h.shape) for h in inputs.values()}
        if len(shapes) != 1:  # a forward that unpacks block outputs would hand on a slice
            raise SftlensError(
                f"blocks of {type(self.model).__name__} received inputs of shapes {sorted(shapes)}; "
                "analyse this model without --stream-layers"
            )
        return inputs[0], [calls[i] for i in range(len(self.blocks))]

    # -- per block ----------------------------------------------------------------------------
    def block_bytes(self, layer: int) -> int:
        """Bytes of block ``layer`` once loaded (at the run's dtype)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(p.numel() * size for p in self.blocks[layer].parameters())

    def load_block(self, layer: int) -> None:
        """Read block ``layer``'s tensors from the shards into its (meta) parameters."""
        block = self.blocks[layer]

        def find(inner: str) -> torch.Tensor | None:
            key = self._block_keys.get((layer, inner))
            return None if key is None else self.reader.get(key)

        for name, _ in list(block.named_parameters()):
            tensor = surgery.load_block_tensor(self.spec, name, find, self.experts)
            if tensor is None:
                raise SftlensError(
                    f"{self.reader.folder} has no tensor for block {layer}'s {name}; check "
                    "that the checkpoint is complete (re-copy or re-download it)"
                )
            self._set(block, name, tensor)

    def free_block(self, layer: int) -> None:
        for name, _ in list(self.blocks[layer].named_parameters()):
            self._set(self.blocks[layer], name, None)
        release_freed_memory()

    @torch.no_grad()
    def run_block(
        self, layer: int, hidden: torch.Tensor, call: Call, *, attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``layer``'s raw output for ``hidden`` (and its attention weights if asked)."""
        block = self.blocks[layer]
        weights: dict[str, torch.Tensor] = {}
        handle = None
        if attention:
            module = block.get_submodule(self.spec.attention)
            handle = module.register_forward_hook(
                lambda m, i, out: (
                    weights.__setitem__("a", out[1])
                    if isinstance(out, (tuple, list)) and len(out) > 1 and out[1] is not None
                    else None
                )
            )
        try:
            args, kwargs = call
            out = output_tensor(block(hidden, *args, **kwargs))
        finally:
            if handle is not None:
                handle.remove()
        if attention and "a" not in weights:
            raise SftlensError(
                "the model did not return attention weights; sftlens loads it with eager "
                "attention when attention metrics are on, or pass --no-attention"
            )
        return out, weights.get("a")


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    A block's tensors (a few MB each, under glibc's mmap threshold once it has adapted) are
    carved from the heap; without a trim the freed blocks stay resident and the process grows
    layer after layer although it never holds more than two blocks.
    """
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _same(a: Any, b: Any) -> bool:
    """Structural equality of block arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


class ActivationStore:
    """Each batch's hidden states of both models between two blocks: in memory, or in a
    scratch file (``path``) with plain positioned reads and writes.

    Not memory-mapped on purpose: pages of a mapped file stay in the process's resident memory
    once touched (see :meth:`sftlens.models.checkpoint.CheckpointReader.get_rows`), so a
    mapped spill file would end up as resident as keeping the activations in memory.
    """

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, path: Path | None = None
    ) -> None:
        self.shapes, self.dtype, self.path = list(shapes), dtype, path
        size = torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = [size * int(torch.Size(s).numel()) for s in self.shapes]
        self.nbytes = len(MODELS) * sum(self.slot_bytes)
        self._memory: dict[tuple[int, str], torch.Tensor] = {}
        self._offsets: dict[tuple[int, str], int] = {}
        self._fd: int | None = None
        if path is not None:
            offset = 0
            for i, nb in enumerate(self.slot_bytes):
                for model in MODELS:
                    self._offsets[(i, model)] = offset
                    offset += nb
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def put(self, i: int, model: str, h: torch.Tensor) -> None:
        if self._fd is None:
            self._memory[(i, model)] = h
            return
        data = h.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        done = os.pwrite(self._fd, data.reshape(-1).data, self._offsets[(i, model)])
        if done != self.slot_bytes[i]:
            raise SftlensError(
                f"could not write activations to {self.path} (disk full?); free disk space "
                "or keep them in memory (--activations memory)"
            )

    def get(self, i: int, model: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._fd is None:
            return self._memory[(i, model)]
        out = torch.empty(self.shapes[i], dtype=self.dtype)
        view = out.view(torch.uint8).numpy().reshape(-1).data
        got = os.preadv(self._fd, [view], self._offsets[(i, model)])
        if got != self.slot_bytes[i]:
            raise SftlensError(f"{self.path} was truncated while analysing; run again")
        return out.to(device)

    def close(self) -> None:
        self._memory.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self.path is not None:
                self.path.unlink(missing_ok=True)


def stream_pass(
    base_dir: Path,
    sft_dir: Path,
    batches: Sequence[Batch],
    *,
    make_pass: Callable[[list[int]], RepresentationPass],
    keep: Sequence[int],
    dtype: torch.dtype,
    device: str = "cpu",
    attention: bool = True,
    spill: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    done: frozenset[int] = frozenset(),
    on_layer: Callable[[int, list[Row], list[Row], list[Row]], None] | None = None,
    progress: bool = True,
) -> tuple[list[Row], list[Row], list[Row]]:
    """The layer-major pass over this rank's ``batches``; returns (metrics rows, heads rows,
    experts rows) of the layers in ``keep`` (``-1`` = embedding output) except those in ``done``.

    ``make_pass(layers)`` builds the accumulators of one layer (a :class:`RepresentationPass`
    keeping ``layers``). Each layer's accumulators are all-reduced over ranks before its rows
    are computed, so every rank must call this with the same ``keep`` and ``done``.
    ``on_layer(layer, rows, heads, experts)`` is called after each layer (to persist it). With ``spill``
    the activations wait in that scratch file between blocks (removed at the end).
    """
    todo = sorted(set(keep) - set(done))
    mine = [b for i, b in enumerate(batches) if i % world_size == rank]
    attn_impl = "eager" if attention else None
    skel = {
        m: Skeleton(d, dtype=dtype, device=device, attn_implementation=attn_impl)
        for m, d in zip(MODELS, (base_dir, sft_dir))
    }
    num_layers = len(skel["base"].blocks)
    if len(skel["sft"].blocks) != num_layers:
        raise SftlensError("base and sft differ in layer count; compare checkpoints of one model")
    shapes = [(*b.input_ids.shape, surgery.hidden_size(skel["base"].model.config)) for b in mine]
    store = ActivationStore(shapes, dtype, spill)
    calls: dict[str, list[list[Call]]] = {m: [] for m in MODELS}
    rows: list[Row] = []
    heads: list[Row] = []
    experts: list[Row] = []

    def finish(layer: int, acc: RepresentationPass | None) -> None:
        if acc is None:
            return
        acc.all_reduce_()
        layer_rows, layer_heads = acc.rows()
        layer_experts = acc.expert_rows()
        rows.extend(layer_rows)
        heads.extend(layer_heads)
        experts.extend(layer_experts)
        if on_layer is not None:
            on_layer(layer, layer_rows, layer_heads, layer_experts)

    bar = tqdm(
        total=len(mine) * (max(todo, default=-1) + 2),
        desc="analyze (layer-major)",
        unit="batch",
        disable=not progress,
    )
    try:
        acc = make_pass([-1]) if -1 in todo else None
        for i, batch in enumerate(mine):
            batch = batch.to(device)
            emb = {}
            for m in MODELS:
                emb[m], model_calls = skel[m].record(batch)
                if m == "sft" and _same(model_calls, calls["base"][i]):
                    model_calls = calls["base"][i]  # one copy when both models get the same
                calls[m].append(model_calls)
                store.put(i, m, emb[m])
            if acc is not None:
                acc.update_layers(batch, {-1: (emb["base"], emb["sft"])})
            bar.update()
        finish(-1, acc)
        for m in MODELS:
            skel[m].free_outside()
        seen: set[int] = set()
        kw_bytes = sum(_tensor_bytes(calls[m], seen) for m in MODELS)
        log.info(
            "layer-major pass: activations of %d batches %s (%s), block arguments %s in memory",
            len(mine),
            f"spilled to {spill}" if store.on_disk else "in memory",
            format_bytes(store.nbytes),
            format_bytes(kw_bytes),
        )
        for layer in range(max(todo, default=-1) + 1):  # nothing past the last layer asked for
            for m in MODELS:
                skel[m].load_block(layer)
            acc = make_pass([layer]) if layer in todo else None
            want_attn = attention and acc is not None
            routed = [layer] if acc is not None and layer in acc.routing else []
            for i, batch in enumerate(mine):
                batch = batch.to(device)
                out, attn, logits = {}, {}, {}
                for m in MODELS:
                    blocks = {layer: skel[m].blocks[layer]} if routed else {}
                    with record_routers(skel[m].spec, blocks) as recorded:
                        out[m], attn[m] = skel[m].run_block(
                            layer, store.get(i, m, device), calls[m][i][layer], attention=want_attn
                        )
                    logits[m] = router_logits(recorded, routed, batch)
                    store.put(i, m, out[m])
                if acc is not None:
                    acc.update_layers(
                        batch,
                        {layer: (out["base"], out["sft"])},
                        {layer: (attn["base"], attn["sft"])} if want_attn else None,  # type: ignore[dict-item]
                        **(
                            {"routes": {layer: (logits["base"][layer], logits["sft"][layer])}}
                            if routed
                            else {}
                        ),
                    )
                bar.update()
            for m in MODELS:
                skel[m].free_block(layer)
            finish(layer, acc)
    finally:
        bar.close()
        store.close()
    read = sum(s.bytes_read for s in skel.values())
    log.info("layer-major pass read %s of weights (each tensor once)", format_bytes(read))
    return rows, heads, experts
