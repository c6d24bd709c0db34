"""Full SFT on a tiny model: the loss against an independent per-token cross-entropy, the
learning-rate schedule against its formula, gradient clipping, EOS, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clitools import error_line
from sftlens import api
from sftlens.cli import main
from sftlens.errors import SftlensError

# distinct lengths, so every micro-batch of two carries padding
EXAMPLES = [
    ("how many 3 + 4 ?", "3 + 4 = 7 .\n#### 7"),
    ("the 2 * 5 is ?", "2 * 5 = 10\n#### 10"),
    ("a 9 ?", "#### 9"),
    ("how many of the 1 + 2 + 3 + 4 ?", "1 + 2 = 3 , 3 + 3 = 6 , 6 + 4 = 10 .\n#### 10"),
]


def write_data(path: Path, examples=EXAMPLES) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in examples),
        encoding="utf-8",
    )
    return path


def sft(model, out, data, **kw) -> Path:
    opts = dict(
        out=str(out),
        data=str(data),
        steps=1,
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        warmup_ratio=0.0,
        max_length=64,
        save_every=0,
        device="cpu",
        progress=False,
    )
    opts.update(kw)
    return api.sft(str(model), **opts)


def state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def reference_loss(model_dir: Path, examples, max_length: int) -> tuple[float, int]:
    """Mean next-token cross-entropy over answer tokens (EOS included), one unpadded sequence
    at a time, in float64 numpy: (loss, number of answer tokens)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for q, a in examples:
        prompt = tok(f"Question: {q}\nAnswer:")["input_ids"]
        answer = [*tok(f" {a}", add_special_tokens=False)["input_ids"], tok.eos_token_id]
        ids = (prompt + answer)[:max_length]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for pos in range(len(prompt), len(ids)):  # token at pos is predicted at pos - 1
            total -= logp[pos - 1, ids[pos]]
            count += 1
    return total / count, count


@pytest.mark.parametrize("max_length", [64, 12])  # 12 cuts answers, and one prompt entirely
def test_loss_is_the_mean_cross_entropy_over_answer_tokens_only(tiny_pair, tmp_path, max_length):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    # one step of batch 2 x accumulation 2 sees each of the 4 examples once
    out = sft(base, tmp_path / "out", data, max_length=max_length)
    want_loss, want_tokens = reference_loss(base, EXAMPLES, max_length)
    (h,) = state(out)["history"]
    assert h["tokens"] == want_tokens and state(out)["train_tokens"] == want_tokens
    assert h["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_eos_is_learned_after_the_answer(tiny_pair, tmp_path):
    base, _ = tiny_pair
    q, a = EXAMPLES[0]
    data = write_data(tmp_path / "d.jsonl", [(q, a)])
    out = sft(base, tmp_path / "out", data, steps=40, batch_size=1, grad_accum=1, lr=1e-2)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok(f"Question: {q}\nAnswer: {a}")["input_ids"]])

    def next_token(folder: Path) -> int:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return int(model(ids).logits[0, -1].argmax())

    assert next_token(base) != tok.eos_token_id  # not there before training
    assert next_token(out) == tok.eos_token_id
    losses = [h["loss"] for h in state(out)["history"]]
    assert losses[-1] < 0.1 * losses[0]


def _record_steps(monkeypatch) -> list[dict]:
    """Wrap AdamW.step: the learning rate and the gradient norm each update applies."""
    real = torch.optim.AdamW.step
    seen: list[dict] = []

    def step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        seen.append({"lr": self.param_groups[0]["lr"], "grad_norm": norm})
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_linear_warmup_then_cosine_decay(tiny_pair, tmp_path, monkeypatch):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    seen = _record_steps(monkeypatch)
    steps, peak, warmup = 10, 1e-3, 3  # ceil(0.25 * 10) = 3 warmup steps
    out = sft(base, tmp_path / "out", data, steps=steps, lr=peak, warmup_ratio=0.25, batch_size=1)
    want = [
        peak * k / warmup
        if k < warmup
        else peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))
        for k in range(steps)
    ]
    assert [s["lr"] for s in seen] == pytest.approx(want, rel=1e-12, abs=1e-15)
    history = state(out)["history"]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    # the history records the rate each step applied
    assert [h["lr"] for h in history] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_gradient_clipping_limits_the_gradient_and_the_update(tiny_pair, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    seen = _record_steps(monkeypatch)
    lr = 1e-3
    free = sft(base, tmp_path / "free", data, lr=lr, max_grad_norm=0.0)
    clipped = sft(base, tmp_path / "clipped", data, lr=lr, max_grad_norm=1e-10)
    free_norm, clipped_norm = seen[0]["grad_norm"], seen[1]["grad_norm"]
    assert free_norm > 1e-3 and clipped_norm <= 1e-10 * (1 + 1e-6)

    original = load_file(base / "model.safetensors")

    def largest_change(folder: Path) -> float:
        new = load_file(folder / "model.safetensors")
        return max(float((new[k] - original[k]).abs().max()) for k in original)

    # Adam's first step moves a weight by lr * g / (|g| + 1e-8): ~lr for an unclipped gradient,
    # at most lr / 100 once every gradient entry is clipped below 1e-10
    assert largest_change(free) > 0.5 * lr
    assert largest_change(clipped) < 0.011 * lr


def test_no_answer_tokens_is_one_line_error(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(SftlensError, match=r"no answer tokens survive --max-length 5; raise it"):
        sft(base, tmp_path / "api", data, max_length=5)
    args = ["sft", str(base), "--out", str(tmp_path / "cli"), "--data", str(data)]
    assert main([*args, "--max-length", "5", "--device", "cpu", "--no-progress"]) == 2
    assert error_line(capsys.readouterr().err).startswith("error: step 0: no answer tokens")


def test_nan_loss_is_one_line_error(tmp_path, capsys):
    from tiny_models import save_model, tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    broken = save_model(model, tmp_path / "broken")
    data = write_data(tmp_path / "d.jsonl")
    args = ["sft", str(broken), "--out", str(tmp_path / "out"), "--data", str(data)]
    assert main([*args, "--steps", "2", "--device", "cpu", "--no-progress"]) == 2
    assert error_line(capsys.readouterr().err).startswith("error: SFT loss became nan at step 0")
    assert not (tmp_path / "out" / "model.safetensors").exists()
