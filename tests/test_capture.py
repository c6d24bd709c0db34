"""capture's pieces without a model: tokenize, make_batches, router_logits, Batch.to, output_tensor.

Exact tensors and whole error messages (the model-driven parts are in test_representations.py
and test_moe.py).
"""

from __future__ import annotations

import logging

import pytest
import torch

from sftlens.capture import Batch, make_batches, output_tensor, router_logits, tokenize
from sftlens.errors import SftlensError


def fake_tok(vocab: dict[str, list[int]]):
    """A tokenizer returning fixed ids per text, with the keyword tokenize passes."""

    def tok(text: str, *, add_special_tokens: bool) -> dict[str, list[int]]:
        assert add_special_tokens is True
        return {"input_ids": list(vocab[text])}

    return tok


def test_tokenize_keeps_the_first_tokens_of_too_long_prompts_and_counts_them(caplog):
    tok = fake_tok({"a": [1, 2, 3, 4, 5], "b": [6, 7], "c": [8, 9, 10], "d": [4, 3, 2, 1]})
    with caplog.at_level(logging.WARNING, logger="sftlens.capture"):
        got = tokenize(tok, ["a", "b", "c", "d"], max_length=3)
    assert got == [[1, 2, 3], [6, 7], [8, 9, 10], [4, 3, 2]]
    assert "2 of 4 prompts were truncated to 3 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sftlens.capture"):
        assert tokenize(tok, ["b", "c"], max_length=3) == [[6, 7], [8, 9, 10]]  # exactly 3 fits
    assert "truncated" not in caplog.text


def test_tokenize_error_messages_whole():
    tok = fake_tok({"a": [1, 2, 3, 4, 5], "b": [6], "": []})
    with pytest.raises(
        SftlensError,
        match=r"^prompt 1 has 5 tokens, more than --max-length 4; raise --max-length \(up to the "
        r"model's context\) or pass --truncate$",
    ):
        tokenize(tok, ["b", "a"], max_length=4, truncate=False)
    with pytest.raises(
        SftlensError, match=r"^prompt 1 has no tokens; remove empty prompts from the data$"
    ):
        tokenize(tok, ["b", ""], max_length=4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_make_batches_pads_each_group_to_its_longest_on_the_side_asked(side):
    ids = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    batches = list(make_batches(ids, batch_size=2, pad_id=0, padding_side=side, indices=[3, 1, 2]))
    assert [b.index for b in batches] == [[3, 1], [2]]
    first, second = batches
    if side == "right":
        want_ids = [[11, 12, 13, 14], [8, 0, 0, 0]]
        want_mask = [[1, 1, 1, 1], [1, 0, 0, 0]]
        want_pos = [[0, 1, 2, 3], [0, 0, 0, 0]]
    else:
        want_ids = [[11, 12, 13, 14], [0, 0, 0, 8]]
        want_mask = [[1, 1, 1, 1], [0, 0, 0, 1]]
        want_pos = [[0, 1, 2, 3], [0, 0, 0, 0]]
    assert first.input_ids.tolist() == want_ids
    assert first.attention_mask.tolist() == want_mask
    assert first.position_ids.tolist() == want_pos
    assert second.input_ids.tolist() == [[9, 10]] and second.position_ids.tolist() == [[0, 1]]
    for b in batches:
        assert b.input_ids.dtype == b.attention_mask.dtype == b.position_ids.dtype == torch.long


def test_make_batches_defaults_to_every_sequence_in_order_padded_right():
    batches = list(make_batches([[1], [2, 3], [4]], batch_size=2, pad_id=9))
    assert [b.index for b in batches] == [[0, 1], [2]]
    assert batches[0].input_ids.tolist() == [[1, 9], [2, 3]]
    assert batches[0].position_ids.tolist() == [[0, 0], [0, 1]]


def test_make_batches_padding_side_message_whole():
    with pytest.raises(
        SftlensError, match=r"^padding side must be 'left' or 'right', got 'middle'$"
    ):
        next(make_batches([[1]], batch_size=1, pad_id=0, padding_side="middle"))


def test_batch_to_moves_every_tensor_and_keeps_the_index():
    ids = torch.ones(1, 2, dtype=torch.long)
    moved = Batch(ids, ids * 2, ids * 3, [7]).to("meta")
    assert [t.device.type for t in (moved.input_ids, moved.attention_mask, moved.position_ids)] == [
        "meta"
    ] * 3
    assert moved.index == [7]
    back = Batch(ids, ids * 2, ids * 3, [7]).to("cpu")
    assert [back.input_ids.sum(), back.attention_mask.sum(), back.position_ids.sum()] == [2, 4, 6]


def test_output_tensor_takes_the_first_of_a_tuple_or_list():
    a, b = torch.zeros(1), torch.ones(1)
    assert output_tensor((a, b)) is a and output_tensor([b, a]) is b and output_tensor(a) is a


def test_router_logits_are_reshaped_per_token_and_bad_ones_are_one_line_errors():
    mask = torch.ones(2, 3, dtype=torch.long)
    batch = Batch(mask, mask, mask, [0, 1])
    flat = torch.arange(24.0).reshape(6, 4)  # (B*T, E), as a router hook records them
    got = router_logits({5: flat, 6: flat.reshape(2, 3, 4)}, [5, 6], batch)
    assert list(got) == [5, 6]
    torch.testing.assert_close(got[5], flat.reshape(2, 3, 4), rtol=0, atol=0)
    torch.testing.assert_close(got[6], flat.reshape(2, 3, 4), rtol=0, atol=0)
    tail = r" for a batch of 2x3 tokens; pass --no-routing or report this model type$"
    with pytest.raises(SftlensError, match=r"^the router of layer 4 did not run" + tail):
        router_logits({5: flat}, [5, 4], batch)
    with pytest.raises(
        SftlensError, match=r"^the router of layer 5 gave logits of shape \(5, 4\)" + tail
    ):
        router_logits({5: flat[:5]}, [5], batch)
    with pytest.raises(
        SftlensError, match=r"^the router of layer 5 gave logits of shape \(6,\)" + tail
    ):
        router_logits({5: torch.zeros(6)}, [5], batch)
