"""``answer_scores`` (batched, padded, logits only where answers are) vs a plain per-example loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from eval_helpers import ARCHS, loop_scores, tiny_lm
from sftlens.evaluation.generate import PrefixCache, shared_prefix_length
from sftlens.evaluation.teacher_forced import AnswerScores, answer_scores

SHOTS = "Question : how many is 1 + 2 ? Answer : 1 + 2 = 3 . #### 3 " * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_scores_match_a_per_example_loop(arch, tok):
    model = tiny_lm(arch)
    prompts = [
        SHOTS + "Question : how many ? Answer :",
        "Question : 7 ? Answer :",  # much shorter: the batch is padded, the answer starts early
        SHOTS + "Question : how many is the 3 + 4 and 5 ? Answer :",
        SHOTS[:40] + "Question : a ? Answer :",
        "Question : 5 + 5 ? Answer :",
    ]
    targets = [
        " 3 #### 3",
        " 1 + 6 = 7 . #### 7",
        " 12 #### 12",
        " 2 #### 2",
        " 5 + 5 = 10 #### 10",
    ]
    got = answer_scores(model, tok, prompts, targets, batch_size=3)
    want = [loop_scores(model, tok, p, t) for p, t in zip(prompts, targets)]
    for pe, (nll, hits, n) in zip(got.per_example, want):
        assert pe["tokens"] == n
        assert pe["correct"] == hits
        assert pe["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert got.tokens == sum(w[2] for w in want)
    assert got.answer_nll == pytest.approx(sum(w[0] for w in want) / got.tokens, rel=1e-5)
    assert got.answer_token_acc == sum(w[1] for w in want) / got.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_scores_from_a_shared_prefix_cache(arch, tok):
    model = tiny_lm(arch)
    questions = ["how many ?", "7 ?", "how many is the 3 + 4 and 5 ?", "a ?"]
    prompts = [SHOTS + f"Question : {q} Answer :" for q in questions]
    targets = [" 3 #### 3", " 1 + 6 = 7 . #### 7", " 12 #### 12", " 2 #### 2"]
    ids = [tok(p)["input_ids"] for p in prompts]
    prefix = PrefixCache(model, ids[0][: shared_prefix_length(ids)])
    assert len(prefix) > 40
    got = answer_scores(model, tok, prompts, targets, batch_size=3, prefix=prefix)
    for pe, p, t in zip(got.per_example, prompts, targets):
        nll, hits, n = loop_scores(model, tok, p, t)
        assert (pe["tokens"], pe["correct"]) == (n, hits)
        assert pe["nll_sum"] == pytest.approx(nll, rel=1e-5)
    with pytest.raises(ValueError, match="start with the prefix"):
        answer_scores(model, tok, ["Question : 1 ?"], [" 1"], prefix=prefix)


def test_answer_scores_means_and_rows():
    s = AnswerScores(nll_sum=3.0, correct=1, tokens=4)
    assert (s.answer_nll, s.answer_token_acc) == (0.75, 0.25)
    assert s.rows() == [
        {"layer": None, "metric": "answer_nll", "value": 0.75},
        {"layer": None, "metric": "answer_token_acc", "value": 0.25},
    ]
    empty = AnswerScores()
    assert math.isnan(empty.answer_nll) and math.isnan(empty.answer_token_acc)


class _Oracle(torch.nn.Module):
    """Predicts the next token exactly in rows of more than ``cut`` real tokens, nothing in the
    others (all-zero logits: argmax 0, never a label here): per-row hit counts differ."""

    def __init__(self, vocab: int, cut: int) -> None:
        super().__init__()
        self.vocab, self.cut = vocab, cut
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        nxt = torch.roll(input_ids, -1, dims=1)  # the token each position must predict
        good = attention_mask.sum(-1) > self.cut
        logits[good] = torch.nn.functional.one_hot(nxt[good], self.vocab).float() * 10
        return SimpleNamespace(logits=logits)


def test_per_example_scores_belong_to_their_own_row(tok):
    """The per-row sums are computed on the device in one go: each example must get its own
    row's hits, not a neighbour's (a random model hits nothing, so the loop test cannot tell)."""
    prompts = ["Question : 7 ? Answer :", SHOTS + "Question : a ? Answer :", "Question : 5 ?"]
    targets = [" 1 + 6 = 7 . #### 7", " 2 #### 2", " 5 + 5 = 10 #### 10"]
    cut = 30
    got = answer_scores(_Oracle(len(tok), cut), tok, prompts, targets, batch_size=3)
    lengths = [len(tok(p + t)["input_ids"]) + 1 for p, t in zip(prompts, targets)]  # + EOS
    want = [pe["tokens"] if n > cut else 0 for pe, n in zip(got.per_example, lengths)]
    assert [pe["correct"] for pe in got.per_example] == want
    assert 0 < sum(want) < sum(pe["tokens"] for pe in got.per_example)  # rows differ
    assert got.correct == sum(want)
