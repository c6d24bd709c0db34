"""Benchmark: ``trajectory`` over 4 checkpoints against 4 separate ``analyze`` runs.

Same prompts, same options, same process (the models' files are in the page cache for both):

  (a) analyze x4     ``sftlens.analyze(BASE, CKPT_i)`` for each checkpoint: 8 forwards per batch
  (b) trajectory     ``sftlens.trajectory(BASE, CKPT_1..4)``: BASE once per batch (5 forwards),
                     and more work than (a): weight metrics and the 3 ``previous`` pairs too

Prints the seconds of each, the ratio (goal <= 0.6x), the seconds of the 4 ``weights`` runs
that (b) also covers, and the largest difference between (b)'s ``against=base`` rows and (a)'s
metrics.csv rows (0: the same numbers). Without ``--base``, BASE and 4 checkpoints are small
random Llamas (each a perturbation of the last). Usage:

    python benchmarks/bench_trajectory.py                                   # small random models
    python benchmarks/bench_trajectory.py --base smollm2-135m-instruct \\
        --checkpoints runs/sft/checkpoint-10 runs/sft/checkpoint-20 runs/sft/checkpoint-30 \\
        runs/sft/checkpoint-40 --data gsm8k --prompts 64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def small_chain(root: Path, hidden: int, layers: int) -> tuple[str, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import perturb_all, save_model, tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
    )
    model = AutoModelForCausalLM.from_config(config)
    base = save_model(model, root / "base")
    ckpts = []
    for i in range(4):
        perturb_all(model, scale=0.01, seed=i + 1)
        ckpts.append(str(save_model(model, root / f"checkpoint-{10 * (i + 1)}")))
    return str(base), ckpts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default=None)
    p.add_argument("--checkpoints", nargs=4, default=None)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="random models: hidden size")
    p.add_argument("--layers", type=int, default=8, help="random models: layers")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import sftlens
    from sftlens.experiments.trajectory import read_trajectory_csv
    from sftlens.io import read_metrics_csv

    tmp = Path(tempfile.mkdtemp(prefix="bench_trajectory_"))
    if args.base:
        base, ckpts = args.base, list(args.checkpoints or [])
        if len(ckpts) != 4:
            p.error("--base needs --checkpoints with 4 folders")
    else:
        base, ckpts = small_chain(tmp / "models", args.hidden, args.layers)
    opts = dict(
        data=args.data,
        max_prompts=args.prompts,
        batch_size=args.batch_size,
        max_length=args.max_length,
        attention=args.attention,
        device=args.device,
        progress=False,
    )
    # warm-up: imports, the page cache, the tokenizer (not timed)
    sftlens.analyze(base, ckpts[0], out=str(tmp / "warm"), **{**opts, "max_prompts": 2})

    t0 = time.perf_counter()
    analyze_runs = [
        sftlens.analyze(base, c, out=str(tmp / f"analyze{i}"), **opts) for i, c in enumerate(ckpts)
    ]
    t_analyze = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, c in enumerate(ckpts):
        sftlens.weights(base, c, out=str(tmp / f"weights{i}"), progress=False)
    t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = sftlens.trajectory(base, ckpts, out=str(tmp / "trajectory"), **opts)
    t_traj = time.perf_counter() - t0

    rows = read_trajectory_csv(run / "trajectory.csv")
    worst, compared = 0.0, 0
    for c, a in zip(ckpts, analyze_runs):
        mine = {
            (r["model"], r["layer"], r["metric"]): r["value"]
            for r in rows
            if r["checkpoint"] == c and r["against"] == "base"
        }
        for r in read_metrics_csv(a / "metrics.csv"):
            v, w = mine[(r["model"], r["layer"], r["metric"])], r["value"]
            if not (math.isnan(v) and math.isnan(w)):
                worst = max(worst, abs(v - w))
            compared += 1
    result = {
        "prompts": args.prompts,
        "checkpoints": 4,
        "analyze_x4_s": round(t_analyze, 3),
        "weights_x4_s": round(t_weights, 3),
        "trajectory_s": round(t_traj, 3),
        "ratio_vs_analyze": round(t_traj / t_analyze, 3),
        "ratio_vs_analyze_and_weights": round(t_traj / (t_analyze + t_weights), 3),
        "rows_compared": compared,
        "max_abs_diff": worst,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
