"""``answer_scores`` (batched, padded, logits only where answers are) vs a plain per-example loop."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import ARCHS, tiny_lm

from sftlens.evaluation.teacher_forced import answer_scores
from sftlens.tuning.sft import encode_example

SHOTS = "Question : how many is 1 + 2 ? Answer : 1 + 2 = 3 . #### 3 " * 3


def loop_scores(model, tok, prompt: str, target: str) -> tuple[float, int, int]:
    """(summed NLL, top-1 hits, tokens) of ``target``'s tokens, one unpadded forward, float64."""
    ids, labels = encode_example(tok, prompt, target, 10_000)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll, hits, n = 0.0, 0, 0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            nll -= float(logp[t - 1, labels[t]])
            hits += int(int(logits[t - 1].argmax()) == labels[t])
            n += 1
    return nll, hits, n


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
