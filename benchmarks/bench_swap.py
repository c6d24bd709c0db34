"""Benchmark: block swapping by exchanging module references, against hybrids built by copying.

Workload: 5 depth blocks x 2 directions = 10 hybrids of a (base, sft) pair, each scored by the
teacher-forced answer NLL on ``--limit`` problems. Variants, each in a fresh subprocess (so
peak RSS is its own), side by side:

  hold      load both models and score each once: the floor (just holding the two models)
  sftlens   the same, then the 10 hybrids through ``sftlens.experiments.edit.swap_blocks``
            (module references exchanged in place, both directions from one exchange)
  baseline  the same, then each hybrid built in a THIRD model copy by ``load_state_dict``
            of the host's state dict with the donor's block tensors, then scored

Prints per variant: seconds spent building hybrids (``build s``), total seconds after loading
(``work s``), peak RSS; then the ratios: sftlens / hold peak RSS (goal <= 1.1x) and baseline /
sftlens time; and that both variants found the same NLL for every hybrid.

    python benchmarks/bench_swap.py                                   # tiny random Llama pair
    python benchmarks/bench_swap.py --model smollm2-135m-instruct --limit 8 --threads 1

With ``--model`` both copies are the same checkpoint (every hybrid then equals the model,
which is fine for timing and memory). ``--sft`` pairs it with another checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("hold", "sftlens", "baseline")
BLOCKS = 5


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """A random Llama (10 layers, hidden 256) and a perturbed copy, saved as folders."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_tokenizer  # a word-level tokenizer built in memory

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
    model = AutoModelForCausalLM.from_config(config)
    tok = tiny_tokenizer(128)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    return root / "base", root / "sft"


def child(variant: str, base_dir: str, sft_dir: str, limit: int, batch_size: int) -> dict:
    import copy
    import re

    import torch

    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.evaluation.teacher_forced import answer_scores
    from sftlens.experiments.edit import swap_blocks
    from sftlens.layers import depth_blocks
    from sftlens.models import surgery
    from sftlens.models.loading import load_model

    torch.set_grad_enabled(False)
    base, tok = load_model(base_dir, device="cpu")
    sft, _ = load_model(sft_dir, device="cpu")
    examples = resolve_dataset("synthetic", split="test", limit=limit)
    prompts = [format_question(e.question) for e in examples]
    targets = [format_target(e.answer) for e in examples]

    def nll(model) -> float:
        return answer_scores(model, tok, prompts, targets, batch_size=batch_size).answer_nll

    t0 = time.perf_counter()
    refs = {"base": nll(base), "sft": nll(sft)}
    spans = depth_blocks(len(surgery.get_blocks(base)), BLOCKS)
    hybrids: dict[str, float] = {}
    build = 0.0
    if variant == "sftlens":
        for span in spans:
            tb = time.perf_counter()
            ctx = swap_blocks(base, sft, span.layers)
            ctx.__enter__()
            build += time.perf_counter() - tb
            try:
                hybrids[f"sft_into_base/{span.name}"] = nll(base)
                hybrids[f"base_into_sft/{span.name}"] = nll(sft)
            finally:
                tb = time.perf_counter()
                ctx.__exit__(None, None, None)
                build += time.perf_counter() - tb
    elif variant == "baseline":
        block_key = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
        tb = time.perf_counter()
        third = copy.deepcopy(base)  # the hybrid's home: one more model in memory
        build += time.perf_counter() - tb
        states = {"base": base.state_dict(), "sft": sft.state_dict()}
        for span in spans:
            for direction, host, donor in (
                ("sft_into_base", "base", "sft"),
                ("base_into_sft", "sft", "base"),
            ):
                tb = time.perf_counter()
                state = dict(states[host])
                for key, value in states[donor].items():
                    m = block_key.search(key)
                    if m and span.start <= int(m.group(1)) < span.stop:
                        state[key] = value
                third.load_state_dict(state)
                build += time.perf_counter() - tb
                hybrids[f"{direction}/{span.name}"] = nll(third)
    work = time.perf_counter() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "work_s": work,
        "build_s": build,
        "peak_rss_mib": rss_mib,
        "refs": refs,
        "hybrids": hybrids,
    }


def run_child(variant: str, base: Path, sft: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--base", str(base), "--sft", str(sft)]
    cmd += ["--limit", str(a.limit), "--batch-size", str(a.batch_size)]
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {variant} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.perf_counter() - t0
    return r


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model spec for BOTH copies (default: a tiny random pair)")
    p.add_argument("--sft", help="a second checkpoint to pair with --model")
    p.add_argument("--limit", type=int, default=16, help="problems scored per model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per variant; medians reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: default)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.base, a.sft, a.limit, a.batch_size)))
        return

    from sftlens.models.loading import resolve_model

    tmp = tempfile.TemporaryDirectory(prefix="bench_swap_")
    if a.model:
        base = resolve_model(a.model)  # a GGUF alias is converted once, outside the timing
        sft = resolve_model(a.sft) if a.sft else base
    else:
        base, sft = make_tiny_pair(Path(tmp.name))
    print(f"base: {base}\nsft:  {sft}")
    print(f"{a.limit} problems, batch {a.batch_size}, {BLOCKS} blocks x 2 directions")
    print(f"torch threads per child: {a.threads or 'default'}; load {os.getloadavg()[0]:.2f}")

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(a.repeats):
        order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            r = run_child(v, base, sft, a)
            runs[v].append(r)
            print(
                f"  repeat {rep + 1} {v:8s} work {r['work_s']:7.2f} s  build {r['build_s']:7.3f} s"
                f"  peak RSS {r['peak_rss_mib']:8.1f} MiB",
                flush=True,
            )

    def med(v: str, k: str) -> float:
        return statistics.median(r[k] for r in runs[v])

    print(f"\n{'variant':9s} {'build s':>9s} {'work s':>9s} {'peak RSS':>12s}")
    for v in VARIANTS:
        print(
            f"{v:9s} {med(v, 'build_s'):9.3f} {med(v, 'work_s'):9.2f} "
            f"{med(v, 'peak_rss_mib'):8.1f} MiB"
        )
    hybrid_work = {v: med(v, "work_s") - med("hold", "work_s") for v in ("sftlens", "baseline")}
    ratios = {
        "rss_sftlens_over_hold": med("sftlens", "peak_rss_mib") / med("hold", "peak_rss_mib"),
        "rss_baseline_over_hold": med("baseline", "peak_rss_mib") / med("hold", "peak_rss_mib"),
        "build_baseline_over_sftlens": med("baseline", "build_s")
        / max(med("sftlens", "build_s"), 1e-9),
        "work_baseline_over_sftlens": med("baseline", "work_s") / med("sftlens", "work_s"),
        "hybrid_work_baseline_over_sftlens": hybrid_work["baseline"] / hybrid_work["sftlens"],
    }
    print()
    print(f"peak RSS  sftlens / hold   {ratios['rss_sftlens_over_hold']:.3f}x  (goal <= 1.1x)")
    print(f"peak RSS  baseline / hold  {ratios['rss_baseline_over_hold']:.3f}x")
    print(f"build     baseline / sftlens {ratios['build_baseline_over_sftlens']:.0f}x")
    print(
        f"hybrids   baseline / sftlens {ratios['hybrid_work_baseline_over_sftlens']:.3f}x "
        "(work minus hold's: building + scoring the 10 hybrids)"
    )
    print(f"work      baseline / sftlens {ratios['work_baseline_over_sftlens']:.3f}x")
    s, b = runs["sftlens"][0]["hybrids"], runs["baseline"][0]["hybrids"]
    diff = max(abs(s[k] - b[k]) for k in s) if s.keys() == b.keys() else float("nan")
    print(f"check: {len(s)} hybrids, max |NLL sftlens - NLL baseline| = {diff:.3e}")
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
