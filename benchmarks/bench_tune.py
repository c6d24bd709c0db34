"""Benchmark: LoRA step time and peak memory per mask, and against PEFT + transformers Trainer.

Claims (issue #9):

1. Backward stops at the lowest trained layer, so a mask that leaves the bottom frozen trains
   faster: the ``00011`` step is <= 0.6x the ``11111`` step (same batch, same budget).
2. ``sftlens tune`` is no slower than the stack people use for this, PEFT + transformers
   ``Trainer`` with the same LoRA config, data, order, batch and steps (ratio <= 1.0x), and the
   two loss curves agree within noise.

Every variant runs in a fresh subprocess (peak RSS is its own):

  sftlens:MASK   ``sftlens.tuning.tune.run_tune`` (steps, batch, max length as given)
  trainer:MASK   the same base model, the same PEFT ``LoraConfig`` (built by sftlens' plan, so
                 rank, alpha and layers agree) and the same initial adapter (same seed), the
                 same examples in the same order (pre-tokenized with ``encode_example`` and
                 fed by a sequential sampler), AdamW with the same warmup + cosine schedule,
                 clipping and batch, trained by ``transformers.Trainer``

Step time is the median over steps 2..N (step 1 pays one-off costs), then the median over
``--repeats`` interleaved rounds (a shared machine's load comes in bursts); the sftlens step includes
tokenizing its batch, the Trainer's does not (its data is pre-tokenized), which favours the
Trainer slightly.

    python benchmarks/bench_tune.py --tiny                  # random 10-layer Llama, synthetic data
    OMP_NUM_THREADS=1 python benchmarks/bench_tune.py --steps 5 --batch-size 2 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MASKS = "11111,00011,01100,10000"


def make_tiny_model(root: Path) -> Path:
    """A random Llama (10 layers, hidden 256) saved as a folder with a word-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return save_model(AutoModelForCausalLM.from_config(config), root / "tiny")


def _tune_config(opts: dict, mask: str, out: str):
    from sftlens.config import TuneConfig

    return TuneConfig(
        model=opts["model"],
        out=out,
        mask=mask,
        data=opts["data"],
        max_examples=opts["max_examples"],
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        max_length=opts["max_length"],
        rank=opts["rank"],
        lr=opts["lr"],
        save_every=0,
        device="cpu",
        progress=False,
    )


def child_sftlens(opts: dict, mask: str) -> dict:
    from sftlens.tuning.tune import run_tune

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = run_tune(_tune_config(opts, mask, tmp))
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        history = json.loads((out / "trainer_state.json").read_text())["history"]
    return {
        "layers": summary["layer_range"],
        "rank": summary["rank_per_layer"],
        "trainable": summary["trainable_params"],
        "step_seconds": [h["seconds"] for h in history],
        "losses": [h["loss"] for h in history],
        "wall": wall,
    }


def child_trainer(opts: dict, mask: str) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.layers import parse_layer_selection
    from sftlens.models.loading import load_model, resolve_model
    from sftlens.tuning import lora
    from sftlens.tuning.loop import collate, encode_example, example_order

    cfg = _tune_config(opts, mask, "unused")
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_examples, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # as run_tune: the same initial LoRA A
    model, tok = load_model(resolve_model(cfg.model), dtype=cfg.dtype, device="cpu")
    selection = parse_layer_selection(mask, len(lora.surgery.get_blocks(model)))
    plan = lora.plan_lora(model, selection.layers, cfg)
    model = lora.apply_lora(model, plan)
    n = cfg.steps * cfg.batch_size
    encoded = []
    for position in range(n):  # the examples run_tune sees, in its order
        ex = examples[example_order(len(examples), cfg.seed, position)]
        encoded.append(
            encode_example(
                tok, format_question(ex.question), format_target(ex.answer), cfg.max_length
            )
        )

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=1,
            max_steps=cfg.steps,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="cosine",
            warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=cfg.seed,
            disable_tqdm=True,
        )
        trainer = InOrder(
            model=model,
            args=args,
            train_dataset=encoded,
            data_collator=lambda batch: collate(batch, tok.pad_token_id),
            callbacks=[Clock()],
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {
        "layers": ", ".join(str(i) for i in plan.layers),
        "rank": plan.rank,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_seconds": times,
        "losses": losses,
        "wall": wall,
    }


def run_child(opts: dict, variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({"opts": opts, "variant": variant})],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(opts["threads"] or os.cpu_count())},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(arg: str) -> None:
    spec = json.loads(arg)
    opts, variant = spec["opts"], spec["variant"]
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    kind, mask = variant.split(":")
    result = (child_sftlens if kind == "sftlens" else child_trainer)(opts, mask)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a random 10-layer Llama, synthetic data")
    p.add_argument("--data", default="gsm8k")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--masks", default=DEFAULT_MASKS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (0: default)")
    p.add_argument("--trainer-masks", default="11111,00011", help="masks also run by Trainer")
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds over all variants (interleaved; medians)"
    )
    p.add_argument("--json", help="write every result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        _child_main(ns.child)
        return
    tmp = tempfile.TemporaryDirectory()
    model = str(make_tiny_model(Path(tmp.name))) if ns.tiny else ns.model
    opts = {
        "model": model,
        "data": "synthetic" if ns.tiny else ns.data,
        "max_examples": ns.max_examples,
        "steps": ns.steps,
        "batch_size": ns.batch_size,
        "max_length": ns.max_length,
        "rank": ns.rank,
        "lr": ns.lr,
        "threads": ns.threads,
    }
    if not ns.tiny:  # resolve (and convert a GGUF) once, outside the timed children
        from sftlens.models.loading import resolve_model

        opts["model"] = str(resolve_model(model))
    masks = [m.strip() for m in ns.masks.split(",")]
    variants = [f"sftlens:{m}" for m in masks]
    variants += [f"trainer:{m}" for m in ns.trainer_masks.split(",") if m.strip()]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(ns.repeats):  # interleaved, so a burst of load hits every variant alike
        for v in variants:
            runs[v].append(run_child(opts, v))
    results = {}
    for v in variants:
        results[v] = r = dict(runs[v][0])
        r["repeats"] = runs[v]
        r["step_median"] = statistics.median(
            _median_after_first(x["step_seconds"]) for x in runs[v]
        )
        r["peak_rss_mb"] = statistics.median(x["peak_rss_mb"] for x in runs[v])
        print(
            f"{v:16s} layers {r['layers']:>8s}  rank {r['rank']:3d}  trainable {r['trainable']:>9,d}"
            f"  step {r['step_median']:.3f} s  peak RSS {r['peak_rss_mb']:.0f} MB"
            f"  final loss {r['losses'][-1]:.4f}",
            flush=True,
        )
    load = os.getloadavg()
    print(
        f"\n{ns.steps} steps, batch {ns.batch_size}, max length {ns.max_length}, "
        f"{ns.threads or 'default'} thread(s); load average {load[0]:.1f}"
    )
    base = results.get("sftlens:11111")
    if base:
        for m in masks:
            if m != "11111":
                ratio = results[f"sftlens:{m}"]["step_median"] / base["step_median"]
                goal = "  (goal <= 0.6x)" if m == "00011" else ""
                print(f"step {m} / step 11111: {ratio:.2f}x{goal}")
    for m in ns.trainer_masks.split(","):
        s, t = results.get(f"sftlens:{m}"), results.get(f"trainer:{m}")
        if s and t:
            print(
                f"\nmask {m}: sftlens step / Trainer step: "
                f"{s['step_median'] / t['step_median']:.2f}x (goal <= 1.0x)"
            )
            print("  loss per step  sftlens: " + " ".join(f"{x:.4f}" for x in s["losses"]))
            print("                 Trainer: " + " ".join(f"{x:.4f}" for x in t["losses"]))
    if ns.json:
        Path(ns.json).write_text(json.dumps({"options": opts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
