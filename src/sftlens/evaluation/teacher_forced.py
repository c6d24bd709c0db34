"""Teacher-forced scores on gold answers: ``answer_nll`` and ``answer_token_acc``.

Each example is encoded exactly as :mod:`sftlens.tuning.sft` trains it (prompt with the
tokenizer's special tokens, then `` {solution}`` and EOS; labels only on the answer), so the
numbers read the same thing the SFT loss optimised. Padding never counts. Useful where exact
match on GSM8K is near zero for a small model, and as the cheap score of the experiments
(swap, interpolate) that build many model variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sftlens.errors import SftlensError

if TYPE_CHECKING:
    from sftlens.evaluation.generate import PrefixCache


@dataclass
class AnswerScores:
    """Summed answer-token NLL, top-1 hits and token counts, overall and per example."""

    nll_sum: float = 0.0
    correct: int = 0
    tokens: int = 0
    per_example: list[dict[str, float]] = field(default_factory=list)

    @property
    def answer_nll(self) -> float:
        """Mean negative log-likelihood (nats) of a gold answer token."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def answer_token_acc(self) -> float:
        """Fraction of gold answer tokens that are the model's top-1 prediction."""
        return self.correct / self.tokens if self.tokens else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """Whole-model ``metrics.csv`` rows (model filled in by the caller)."""
        return [
            {"layer": None, "metric": "answer_nll", "value": self.answer_nll},
            {"layer": None, "metric": "answer_token_acc", "value": self.answer_token_acc},
        ]


@torch.no_grad()
def answer_scores(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 4,
    max_length: int = 512,
    progress: bool = False,
    desc: str = "answer nll",
    prefix: PrefixCache | None = None,
) -> AnswerScores:
    """Teacher-forced NLL and top-1 accuracy of ``targets`` given ``prompts``.

    With ``prefix`` (the KV cache of token ids every encoded prompt starts with, e.g. the
    k-shot exemplars) only the rest of each sequence is run, after a copy of that cache; the
    scores are the same as without it.

    >>> from tiny_models import tiny_llama_config, tiny_tokenizer  # doctest: +SKIP
    >>> s = answer_scores(model, tok, ["Question: 1 + 1 ?\\nAnswer:"], [" 2 #### 2"])  # doctest: +SKIP
    >>> s.answer_nll, s.answer_token_acc, s.tokens                                     # doctest: +SKIP
    """
    from sftlens.evaluation.generate import cache_kwarg, forward_params
    from sftlens.tuning.sft import collate, encode_example

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [encode_example(tok, p, t, max_length) for p, t in zip(prompts, targets)]
    skip = len(prefix) if prefix is not None else 0
    if prefix is not None:
        if any(ids[:skip] != prefix.ids or len(ids) <= skip for ids, _ in encoded):
            raise ValueError("every encoded prompt must start with the prefix and go beyond it")
        if any(any(y != -100 for y in labels[: skip + 1]) for _, labels in encoded):
            raise ValueError("the prefix must end before the first answer token's prompt token")
        encoded = [(ids[skip:], labels[skip:]) for ids, labels in encoded]
    # longest first: the first batch shows the peak memory at once, batches carry little padding
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = next(model.parameters()).device
    keep_ok = "logits_to_keep" in forward_params(model)
    out = AnswerScores(per_example=[{} for _ in encoded])
    for start in tqdm(
        range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        idx = order[start : start + batch_size]
        batch = {
            k: v.to(device) for k, v in collate([encoded[i] for i in idx], tok.pad_token_id).items()
        }
        # Only the positions from the earliest answer token on need logits: with k-shot prompts
        # the full (B, T, vocab) tensor would be mostly prompt and can take gigabytes.
        answer_at = (batch["labels"] != -100).nonzero()[:, 1]
        first = max(int(answer_at.min()) - 1, 0) if answer_at.numel() else 0
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if keep_ok:
            kwargs["logits_to_keep"] = batch["labels"].shape[1] - first
        if prefix is not None:  # right padding after the prefix: real tokens count from `skip`
            width = batch["input_ids"].shape[1]
            kwargs[cache_kwarg(model)] = prefix.expand(len(idx))
            kwargs["attention_mask"] = torch.cat(
                [batch["attention_mask"].new_ones((len(idx), skip)), batch["attention_mask"]], 1
            )
            kwargs["position_ids"] = torch.arange(skip, skip + width, device=device).expand(
                len(idx), width
            )
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
        if not keep_ok:
            logits = logits[:, first:]
        labels = batch["labels"][:, first + 1 :]
        keep = labels != -100
        logits = logits[:, :-1][keep].float()  # (answer tokens, V): logits at t predict t + 1
        gold = labels[keep]
        nll = torch.nn.functional.cross_entropy(logits, gold, reduction="none").double()
        hit = logits.argmax(-1) == gold
        owner = keep.nonzero()[:, 0]  # batch row of each answer token
        # per-row sums on the device, read back in one transfer (not 3 syncs per row)
        nll_rows = nll.new_zeros(len(idx)).index_add_(0, owner, nll)
        hit_rows = torch.zeros(len(idx), dtype=torch.long, device=nll.device)
        hit_rows.index_add_(0, owner, hit.long())
        nll_list, hit_list, n_list = (
            nll_rows.tolist(),
            hit_rows.tolist(),
            keep.sum(-1).tolist(),
        )
        for row, i in enumerate(idx):
            out.per_example[i] = {
                "nll_sum": nll_list[row],
                "correct": hit_list[row],
                "tokens": n_list[row],
            }
        out.nll_sum += float(nll.sum())
        out.correct += sum(hit_list)
        out.tokens += sum(n_list)
    if out.tokens == 0:
        raise SftlensError(
            f"no answer tokens survive --max-length {max_length}; raise it or shorten the prompts"
        )
    return out
