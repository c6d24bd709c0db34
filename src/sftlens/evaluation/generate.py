"""Batched generation over token ids (greedy, or seeded sampling), with one shared-prefix KV cache.

The engine works on token ids, never on text, so that what it generates is exactly what
``model.generate(do_sample=False)`` would give for each prompt alone:

- A batch is LEFT padded, with explicit ``position_ids`` counted over each row's real tokens
  and an ``attention_mask`` that hides the padding, so a row's numbers do not depend on its
  neighbours (models with learned absolute positions, like GPT-2, included).
- The prompts of an evaluation share a long prefix (the k solved exemplars). It is run through
  the model ONCE; every batch starts from a copy of its KV cache, broadcast to the batch. Each
  row's remaining tokens are then left padded BETWEEN the prefix and the row:
  ``[prefix][pad ...][suffix]``. The prefix keeps positions ``0..P-1``, the suffix continues
  at ``P``, the padding is masked, so the result equals running the whole prompt alone.
  The shared prefix is the longest common prefix of the prompts' token ids, each prompt
  tokenized WHOLE, so a token that straddles the exemplar/question boundary never differs
  from the plain tokenization (the prefix just ends one token earlier).
- Models with sliding-window attention layers count the window in cache slots, padding
  included, so padding in the middle would shift their window: when a sequence can outgrow the
  window, :func:`shared_prefix` gives no cache and batches are plain left padded (exact, since
  the padding then lies outside every real token's window).
- Decoding is pure ``argmax`` (the model's ``generation_config`` processors, e.g. a repetition
  penalty, are not applied), unless a :class:`Sampling` is given: then each row draws its next
  token from the temperature-scaled, nucleus-filtered (top-p) distribution with its OWN
  random generator, seeded from the sampling seed and the item's key, so a sample does not
  depend on the batch size, the other rows or a resume (``sftlens dpo`` samples this way).
  The greedy path is untouched by sampling. A row stops at an EOS id, when its decoded new text contains a
  stop string, or after ``max_new_tokens``; a finished row leaves the batch (its cache rows
  are dropped), so it stops costing work.
- Prompts are sorted by length (longest first) so batches carry little padding and the first
  batch shows the peak memory.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

log = logging.getLogger("sftlens.evaluation")

K = TypeVar("K", bound=Hashable)
StopReason = Literal["eos", "stop_string", "length"]


@dataclass(frozen=True)
class StopRule:
    """When a row stops: an id in ``eos_ids``, a stop string in its new text, or the bound.

    ``decode`` maps new token ids to text (special tokens skipped); stop strings are looked
    for in that text after every token.
    """

    decode: Any
    stop_strings: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    max_new_tokens: int = 256

    def check(self, tokens: Sequence[int]) -> StopReason | None:
        """Why generation must stop after ``tokens`` (all new tokens so far), or None."""
        if tokens and tokens[-1] in self.eos_ids:
            return "eos"
        if self.stop_strings:
            text = self.decode(list(tokens))
            if any(s in text for s in self.stop_strings):
                return "stop_string"
        if len(tokens) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, tokens: Sequence[int]) -> str:
        """The completion: new tokens decoded (EOS dropped), cut at the first stop string."""
        ids = list(tokens)
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        text = self.decode(ids)
        cut = min((i for s in self.stop_strings if s and (i := text.find(s)) >= 0), default=None)
        return text if cut is None else text[:cut]


@dataclass(frozen=True)
class Sampling:
    """Seeded temperature / nucleus (top-p) sampling instead of greedy decoding.

    Each item draws with its own ``torch.Generator`` seeded by :meth:`row_seed` from ``seed``
    and the item's key, so an item's sample is the same in any batch and after a resume.

    >>> Sampling(seed=1).row_seed((3, 0)) == Sampling(seed=1).row_seed((3, 0))
    True
    >>> Sampling(seed=1).row_seed((3, 0)) == Sampling(seed=2).row_seed((3, 0))
    False
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def row_seed(self, key: Hashable) -> int:
        """A 63-bit seed from ``seed`` and ``repr(key)`` (stable across processes)."""
        digest = hashlib.sha256(f"{self.seed}:{key!r}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def draw(self, logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One token per row of ``logits`` (B, V), row ``i`` drawn with ``generators[i]``."""
        probs = nucleus_probs(logits, self.temperature, self.top_p)
        return torch.cat(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
        )


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities (float32) of ``softmax(logits / temperature)`` restricted to the nucleus:
    the most likely tokens whose mass before them is below ``top_p`` (the first always kept),
    renormalised.

    >>> nucleus_probs(torch.tensor([[2.0, 1.0, 0.0]]), 1.0, 0.5).tolist()
    [[1.0, 0.0, 0.0]]
    >>> p = nucleus_probs(torch.tensor([[0.0, 0.0, -50.0]]), 1.0, 0.9)
    >>> [round(x, 3) for x in p[0].tolist()]
    [0.5, 0.5, 0.0]
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


@dataclass
class Generation:
    """One prompt's continuation: the new token ids (the stop token included)."""

    tokens: list[int] = field(default_factory=list)
    reason: StopReason = "length"
    text: str = ""


def shared_prefix_length(prompts: Iterable[Sequence[int]]) -> int:
    """Length of the longest common prefix of the prompts, leaving each at least one token."""
    seqs = [list(p) for p in prompts]
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def forward_params(model: Any) -> Any:
    """The parameters of ``model``'s forward (the wrapped model's, for a PEFT model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(inner.forward).parameters


def cache_kwarg(model: Any) -> str:
    """``cache`` (transformers >= 5) or ``past_key_values`` (4.x): where a KV cache goes."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _step(model: Any, cache: Any = None, **inputs: Any) -> Any:
    """One forward that returns the next-token logits only and the updated KV cache.

    ``cache`` travels as ``cache`` (transformers >= 5) or ``past_key_values`` (4.x); logits are
    computed for the last position only where the model accepts ``logits_to_keep``.
    """
    if cache is not None:
        inputs[cache_kwarg(model)] = cache
    if "logits_to_keep" in forward_params(model):
        inputs["logits_to_keep"] = 1
    out = model(use_cache=True, **inputs)
    cached = getattr(out, "cache", None)
    return out.logits[:, -1], (cached if cached is not None else out["past_key_values"])


def sliding_window(model: Any) -> int | None:
    """The smallest attention window of ``model``'s sliding-window layers, or None if none."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    if types is None and (window is None or not getattr(cfg, "use_sliding_window", True)):
        return None
    return int(window) if isinstance(window, int) and window > 0 else 1


class PrefixCache:
    """The KV cache of a prefix shared by every prompt, computed once, copied per batch."""

    def __init__(self, model: Any, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        device = next(model.parameters()).device
        x = torch.tensor([self.ids], device=device)
        with torch.no_grad():
            _, self.cache = _step(model, input_ids=x, attention_mask=torch.ones_like(x))

    def __len__(self) -> int:
        return len(self.ids)

    def expand(self, batch: int) -> Any:
        """A fresh cache holding the prefix for ``batch`` rows (the stored one is untouched)."""
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


@torch.no_grad()
def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    rule: StopRule,
    *,
    pad_id: int,
    prefix: PrefixCache | None = None,
    sampling: Sampling | None = None,
    seeds: Sequence[int] = (),
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (whole prompts; each starts with ``prefix.ids``), or
    with ``sampling`` samples, prompt ``i`` drawn by a generator seeded with ``seeds[i]``."""
    device = next(model.parameters()).device
    gens: list[torch.Generator] = []
    if sampling is not None:
        if len(seeds) != len(prompts):
            raise ValueError("sampling needs one seed per prompt")
        gens = [torch.Generator(device=device).manual_seed(int(x)) for x in seeds]
    p = len(prefix) if prefix is not None else 0
    if prefix is not None and any(list(q[:p]) != prefix.ids for q in prompts):
        raise ValueError("every prompt must start with the prefix's token ids")
    suffixes = [list(q[p:]) for q in prompts]
    if any(not s for s in suffixes):
        raise ValueError("every prompt needs at least one token after the prefix")
    b, width = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p + width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, p + width - len(s) :] = 1
        pos[i, width - len(s) :] = torch.arange(p, p + len(s))
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    next_pos = torch.tensor([p + len(s) for s in suffixes], device=device)
    logits, cache = _step(
        model,
        prefix.expand(b) if prefix is not None else None,
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
    )
    results = [Generation() for _ in suffixes]
    active = list(range(b))  # batch row -> prompt index
    while True:
        if sampling is None:
            step = logits.float().argmax(-1)
        else:
            step = sampling.draw(logits, [gens[i] for i in active])
        chosen = step.tolist()  # one device sync per step, not one per row
        keep: list[int] = []
        for row, i in enumerate(active):
            res = results[i]
            res.tokens.append(chosen[row])
            reason = rule.check(res.tokens)
            if reason is None:
                keep.append(row)
            else:
                res.reason = reason
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows from the batch and its cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            step, mask, next_pos = step[sel], mask[sel], next_pos[sel]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        logits, cache = _step(
            model,
            cache,
            input_ids=step[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
        )
        next_pos = next_pos + 1
    for res in results:
        res.text = rule.text(res.tokens)
    return results


def shared_prefix(
    model: Any, prompts: Sequence[Sequence[int]], *, longest: int
) -> PrefixCache | None:
    """The KV cache of the prompts' longest common prefix, or None where it cannot be exact.

    ``longest`` is the longest sequence that will be run after it (prompt plus new tokens, or
    plus a teacher-forced answer). None when the prompts share nothing, or when ``longest``
    could outgrow a sliding attention window (padding after the prefix would shift it).
    """
    n = shared_prefix_length(prompts)
    if n == 0:
        return None
    window = sliding_window(model)
    if window is not None and longest > window - 1:
        log.info(
            "sequences of up to %d tokens exceed the model's attention window of %d: "
            "the shared-prefix KV cache is not used",
            longest,
            window,
        )
        return None
    return PrefixCache(model, list(prompts[0][:n]))


def generate(
    model: Any,
    items: Sequence[tuple[K, Sequence[int]]],
    rule: StopRule,
    *,
    pad_id: int,
    batch_size: int = 16,
    prefix: PrefixCache | None = None,
    sampling: Sampling | None = None,
) -> Iterator[list[tuple[K, Generation]]]:
    """Greedy continuations of ``(key, prompt ids)`` items, yielded one finished batch at a time.

    Items are sorted longest first. With ``prefix`` (see :func:`shared_prefix`) every prompt
    must start with ``prefix.ids``; their KV cache is reused by every batch. With ``sampling``
    each item is sampled with the generator of ``sampling.row_seed(key)`` (keys must then
    differ between items that repeat a prompt, e.g. ``(problem, sample)``).
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        gens = generate_batch(
            model,
            [ids for _, ids in chunk],
            rule,
            pad_id=pad_id,
            prefix=prefix,
            sampling=sampling,
            seeds=[sampling.row_seed(key) for key, _ in chunk] if sampling is not None else (),
        )
        yield [(key, g) for (key, _), g in zip(chunk, gens)]
