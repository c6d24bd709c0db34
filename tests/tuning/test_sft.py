"""Full SFT on a tiny model: the loss against an independent per-token cross-entropy, the
learning-rate schedule against its formula, gradient clipping, EOS, the one-line errors, which
examples and prompts are trained on, what trainer_state.json records, resume and the checkpoint
schedule, the optimizer state round trip, weight decay, bf16 and the progress bar."""

from __future__ import annotations

import json
import math
import re
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


def reference_loss(
    model_dir: Path, examples, max_length: int, prompt_text=lambda tok, q: f"Question: {q}\nAnswer:"
) -> tuple[float, int]:
    """Mean next-token cross-entropy over answer tokens (EOS included), one unpadded sequence
    at a time, in float64 numpy: (loss, number of answer tokens)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for q, a in examples:
        prompt = tok(prompt_text(tok, q))["input_ids"]
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


# -- what is trained on, what is recorded --------------------------------------------------------

DEV = [(f"what is {i} + {i} ?", f"{i} + {i} = {2 * i} .\n#### {2 * i}") for i in range(1, 7)]


def _dev_folder(root: Path) -> Path:
    root.mkdir()
    write_data(root / "train.jsonl")
    write_data(root / "dev.jsonl", DEV)
    return root


@pytest.mark.parametrize("source", ["folder", "synthetic"])
def test_the_step_trains_on_the_examples_the_data_options_select(tiny_pair, tmp_path, source):
    """--split picks the file, --max-examples keeps the first N, --seed picks the synthetic
    problems: one step of 2 x 2 sees each of the 4 selected examples once."""
    from sftlens.data import resolve_dataset

    base, _ = tiny_pair
    if source == "folder":
        kw = dict(data=str(_dev_folder(tmp_path / "data")), split="dev", max_examples=4)
        chosen = DEV[:4]
    else:
        kw = dict(data="synthetic", max_examples=4, seed=3)
        chosen = [(e.question, e.answer) for e in resolve_dataset("synthetic", limit=4, seed=3)]
        other = [(e.question, e.answer) for e in resolve_dataset("synthetic", limit=4, seed=0)]
        assert chosen != other  # so that a dropped seed shows
    out = sft(base, tmp_path / "out", **kw)
    want_loss, want_tokens = reference_loss(base, chosen, 64)
    st = state(out)
    assert st["train_examples"] == 4
    (h,) = st["history"]
    assert h["tokens"] == want_tokens
    assert h["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_trainer_state_and_sftlens_sft_json_record_the_run(tiny_pair, tmp_path):
    import time

    from sftlens.models.loading import resolve_model

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    t0 = time.perf_counter()
    out = sft(base, tmp_path / "out", data, steps=2, batch_size=1, grad_accum=1, lr=2e-3)
    wall = time.perf_counter() - t0
    st = state(out)
    assert set(st) == {
        "step", "history", "config_hash", "config", "base_model", "train_examples",
        "train_tokens", "seconds_this_run", "world_size", "mixed_precision", "peak_memory_mb",
    }  # fmt: skip
    assert st["mixed_precision"] == "no" and st["peak_memory_mb"] > 0
    assert st["step"] == 2 and [h["step"] for h in st["history"]] == [1, 2]
    assert set(st["history"][0]) == {"step", "loss", "tokens", "lr", "seconds"}
    assert st["base_model"] == str(resolve_model(str(base)))
    assert st["train_examples"] == len(EXAMPLES) and st["world_size"] == 1
    assert st["train_tokens"] == sum(h["tokens"] for h in st["history"])
    assert 0 < st["seconds_this_run"] <= wall
    assert st["config"]["lr"] == 2e-3 and st["config"]["steps"] == 2
    assert json.loads((out / "sftlens_sft.json").read_text()) == st["config"]


def _crash_on_step(monkeypatch, n: int) -> dict:
    """Count AdamW steps; the ``n``-th raises KeyboardInterrupt (a kill during that step)."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def test_resume_redoes_no_step_keeps_the_history_and_follows_the_checkpoint_schedule(
    tiny_pair, tmp_path, monkeypatch
):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(steps=5, batch_size=1, grad_accum=1, save_every=3)
    fresh = state(sft(base, tmp_path / "fresh", data, **kw))

    out = tmp_path / "run"
    (out / "checkpoint-3.tmp").mkdir(parents=True)  # left by a save that was killed
    (out / "checkpoint-3.tmp" / "junk").write_text("x")
    calls = _crash_on_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        sft(base, out, data, **kw)
    assert not (out / "checkpoint-3.tmp").exists()
    ckpt = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert ckpt["step"] == 3  # saved after step 3 only (every 3 steps)
    assert [h["step"] for h in ckpt["history"]] == [1, 2, 3]
    calls["n"] = -100
    sft(base, out, data, **kw)
    assert calls["n"] == -100 + 2  # only steps 4 and 5 ran
    st = state(out)
    assert [h["step"] for h in st["history"]] == [1, 2, 3, 4, 5]
    for a, b in zip(st["history"], fresh["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # the snapshot stays

    # without --save-every a killed run leaves no checkpoint
    calls = _crash_on_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        sft(base, tmp_path / "nosave", data, **{**kw, "save_every": 0})
    assert not list((tmp_path / "nosave").glob("checkpoint-*"))


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_save_every_keeps_a_model_folder_per_save_ordered_by_step(tiny_pair, tmp_path, monkeypatch):
    """``--save-every 2`` of 10 steps: checkpoint-2 ... checkpoint-8 stay as loadable model
    folders (a trajectory); only the newest carries the optimizer while training, none after."""
    from safetensors.torch import load_file

    from sftlens.models.loading import load_model
    from sftlens.tuning.sft import list_checkpoints

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(steps=10, batch_size=1, grad_accum=1, save_every=2, lr=5e-3)
    out = tmp_path / "run"
    _crash_on_step(monkeypatch, 7)  # killed during step 7: checkpoints 2, 4, 6 written
    with pytest.raises(KeyboardInterrupt):
        sft(base, out, data, **kw)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    assert "optimizer.safetensors" in _files(out / "checkpoint-6")
    assert "optimizer.safetensors" not in _files(out / "checkpoint-4")  # snapshots stay light
    monkeypatch.undo()
    sft(base, out, data, **kw)  # resumes from checkpoint-6
    found = list_checkpoints(out)
    assert [s for s, _ in found] == [2, 4, 6, 8]
    assert [s for s, _ in list_checkpoints(tmp_path / "d.jsonl")] == []
    previous = load_file(base / "model.safetensors")
    for step, path in found:
        st = json.loads((path / "trainer_state.json").read_text())
        assert st["step"] == step and [h["step"] for h in st["history"]] == list(range(1, step + 1))
        assert not {"optimizer.safetensors", "optimizer.json"} & _files(path)
        load_model(path, device="cpu")  # a complete model folder
        weights = load_file(path / "model.safetensors")
        assert any(not torch.equal(weights[k], previous[k]) for k in previous), step
        previous = weights
    # the last snapshot is the same training as the final model, 2 steps earlier: the history
    final = state(out)["history"]
    assert json.loads((found[-1][1] / "trainer_state.json").read_text())["history"] == final[:8]

    # a rerun of ANOTHER config into the same folder drops the old run's snapshots
    sft(base, out, data, **{**kw, "steps": 3, "save_every": 0})
    assert list_checkpoints(out) == []


def test_no_keep_checkpoints_keeps_only_the_newest_and_removes_it_at_the_end(
    tiny_pair, tmp_path, monkeypatch
):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(steps=6, batch_size=1, grad_accum=1, save_every=2, keep_checkpoints=False)
    out = tmp_path / "run"
    _crash_on_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        sft(base, out, data, **kw)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    monkeypatch.undo()
    sft(base, out, data, **kw)
    assert not list(out.glob("checkpoint-*"))
    assert state(out)["step"] == 6


def test_a_save_killed_over_a_finished_run_leaves_nothing_to_reuse(
    tiny_pair, tmp_path, monkeypatch
):
    """Retraining into a finished run's folder first removes its trainer_state.json (the mark
    of a complete save): killed after the new weights are written, the folder is not reused
    for the old config."""
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    want = load_file(sft(base, tmp_path / "ref", data) / "model.safetensors")
    sft(base, out, data)
    real = PreTrainedModel.save_pretrained

    def save_then_die(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft(base, out, data, lr=5e-3)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert not (out / "trainer_state.json").exists()
    got = load_file(sft(base, out, data) / "model.safetensors")  # the first config again
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_unwrap_optimizer_takes_the_torch_optimizer_out_of_accelerates_wrapper():
    from accelerate import Accelerator

    from sftlens.tuning.loop import unwrap_optimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(opt) is opt  # a plain torch optimizer is its own
    wrapped = Accelerator(cpu=True).prepare(opt)
    assert wrapped is not opt and unwrap_optimizer(wrapped) is opt


def test_pruning_removes_older_checkpoints_but_never_fails_or_deletes_through_a_link(tmp_path):
    from sftlens.tuning.sft import _prune

    def checkpoint(path: Path) -> Path:
        path.mkdir(parents=True)
        for name in ("trainer_state.json", "optimizer.json", "optimizer.safetensors"):
            (path / name).write_text("{}")
        return path

    out = tmp_path / "out"
    old, new = checkpoint(out / "checkpoint-1"), checkpoint(out / "checkpoint-4")
    elsewhere = checkpoint(tmp_path / "elsewhere")
    (out / "checkpoint-2").symlink_to(elsewhere, target_is_directory=True)
    legacy = checkpoint(out / "checkpoint-last")  # where older sftlens kept its one checkpoint
    _prune(out, keep=new, keep_snapshots=False)
    assert not legacy.exists()
    assert not old.exists() and sorted(p.name for p in new.iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    assert len(list(elsewhere.iterdir())) == 3  # rmtree refuses a link: left, not followed


def test_another_mixed_precision_retrains_and_the_weights_load_on_the_runs_device(
    tiny_pair, tmp_path, monkeypatch
):
    """The reuse/resume key holds the launch's mixed precision (a bf16-autocast run never reuses
    an fp32 one); the weights load on the accelerator's device (the rank's GPU under torchrun),
    whose peak-memory counter each run restarts."""
    from sftlens.models import loading
    from sftlens.tuning import sft as sft_module

    data = write_data(tmp_path / "train.jsonl")
    loads, resets = [], []
    real_load, real_reset = loading.load_model, sft_module.reset_peak_memory

    def spy_load(*a, **k):
        loads.append(k.get("device", "default"))
        return real_load(*a, **k)

    def spy_reset(*a):
        resets.append(a)
        return real_reset(*a)

    monkeypatch.setattr(loading, "load_model", spy_load)
    monkeypatch.setattr(sft_module, "reset_peak_memory", spy_reset)
    out = sft(tiny_pair[0], tmp_path / "run", data)
    assert loads == ["cpu"] and resets == [(torch.device("cpu"),)]
    sft(tiny_pair[0], out, data)  # the same run again: reused, nothing loaded
    assert loads == ["cpu"]
    monkeypatch.setattr(sft_module, "precision_key", lambda accel: {"mixed_precision": "bf16"})
    sft(tiny_pair[0], out, data)
    assert loads == ["cpu", "cpu"]  # trained again
    assert resets == [(torch.device("cpu"),)] * 3


def test_optimizer_state_round_trips_tensors_and_scalars(tmp_path):
    from sftlens.tuning.loop import load_optimizer, save_optimizer

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
        return params, opt, sched

    params, opt, sched = make()
    for _ in range(2):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        sched.step()
    # a plain-number entry first (before the tensors) and one after
    opt.state[params[0]] = {"count": 7, **opt.state[params[0]], "flag": 0.5}
    save_optimizer(opt, sched, tmp_path)
    _, opt2, sched2 = make()
    load_optimizer(opt2, sched2, tmp_path)
    a, b = opt.state_dict(), opt2.state_dict()
    assert json.loads(json.dumps(a["param_groups"])) == b["param_groups"]  # betas: a list
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        assert list(a["state"][idx]) == list(b["state"][idx])
        for key, value in a["state"][idx].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["state"][idx][key])
            else:
                assert b["state"][idx][key] == value
    assert b["state"][0]["count"] == 7 and b["state"][0]["flag"] == 0.5
    assert sched2.state_dict() == sched.state_dict()


def test_weight_decay_reaches_adamw(tiny_pair, tmp_path):
    """AdamW decays before its update: one step with decay wd differs from one without by
    exactly -lr * wd * w."""
    from safetensors.torch import load_file

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    lr, wd = 1e-3, 0.5
    plain = load_file(
        sft(base, tmp_path / "plain", data, lr=lr, weight_decay=0.0) / "model.safetensors"
    )
    decayed = load_file(
        sft(base, tmp_path / "wd", data, lr=lr, weight_decay=wd) / "model.safetensors"
    )
    original = load_file(base / "model.safetensors")
    for k, w in original.items():
        torch.testing.assert_close(decayed[k] - plain[k], -lr * wd * w, rtol=1e-3, atol=1e-9)


def test_chat_prompt_format_puts_the_template_before_the_answer(tiny_pair, tmp_path):
    import shutil

    base, _ = tiny_pair
    chat = shutil.copytree(base, tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = (
        "{% for m in messages %}user : {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tok.save_pretrained(chat)
    data = write_data(tmp_path / "d.jsonl")
    out = sft(chat, tmp_path / "out", data, prompt_format="chat")

    def chat_prompt(tok, q):
        return tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )

    want_loss, want_tokens = reference_loss(chat, EXAMPLES, 64, chat_prompt)
    plain_loss, _ = reference_loss(chat, EXAMPLES, 64)
    assert abs(want_loss - plain_loss) > 1e-3  # so that the prompt format shows
    (h,) = state(out)["history"]
    assert h["tokens"] == want_tokens
    assert h["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_a_one_token_prompt_still_counts_every_answer_token(tiny_pair, tmp_path):
    """With a bare chat template the prompt is the one-word question: the answer starts at
    position 1, and every answer token (EOS included) carries loss."""
    import shutil

    base, _ = tiny_pair
    bare = shutil.copytree(base, tmp_path / "bare")
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = "{{ messages[0]['content'] }}"
    tok.save_pretrained(bare)
    examples = [("seven", "3 + 4 = 7\n#### 7")]
    assert len(tok("seven")["input_ids"]) == 1
    data = write_data(tmp_path / "d.jsonl", examples)
    out = sft(bare, tmp_path / "out", data, prompt_format="chat", batch_size=1, grad_accum=1)
    want_loss, want_tokens = reference_loss(bare, examples, 64, lambda tok, q: q)
    (h,) = state(out)["history"]
    assert h["tokens"] == want_tokens
    assert h["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_bfloat16_training_saves_bfloat16_weights(tiny_pair, tmp_path):
    from safetensors.torch import load_file

    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    out = sft(base, tmp_path / "out", data, dtype="bfloat16", batch_size=1, grad_accum=1)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_progress_bar_counts_the_steps_and_no_progress_shows_none(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    data = write_data(tmp_path / "d.jsonl")
    sft(base, tmp_path / "bar", data, steps=3, batch_size=1, grad_accum=1, progress=True)
    counts = re.findall(r"SFT: .*?\| (\d+)/(\d+) ", capsys.readouterr().err)
    assert counts[0] == ("0", "3") and counts[-1] == ("3", "3")  # 0 of 3 steps .. 3 of 3
    sft(base, tmp_path / "quiet", data, steps=3, batch_size=1, grad_accum=1, progress=False)
    assert "SFT:" not in capsys.readouterr().err
