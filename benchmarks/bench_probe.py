"""Benchmark: the streamed ``probe`` pass against one plain forward pass of both models.

Variants, each in a fresh subprocess (so peak memory is its own), on the same encoded problems
(question + gold answer, as ``sftlens probe`` feeds them) and the same batches:

  plain       both models' ordinary forward (LM head included: logits for every position)
  probe       the logit-lens pass: both models' block outputs captured, every layer (-1..L-1)
              read out at every answer position, streamed into float64 sums
  probe-both  the same with a (unfitted) tuned lens beside the logit lens: the pass cost of
              ``--lens both``, not counting the fit

Printed per variant and prompt count: wall time of the work (after loading), peak RSS, the peak
RSS growth during the work (``grown``: what the work itself added), and the CUDA peak on a GPU;
after a warm-up forward of both models; then the ratios probe/plain and probe's memory at the largest vs the smallest prompt count
(goal: flat, since logits are never held for all layers or all prompts). The readout costs
``2 * d * V`` FLOPs per layer and answer token, ``L + 1`` times per model where the plain
forward pays it once, so expect probe/plain well above 1 for a small model with a large
vocabulary (SmolLM2-135M: d = 576, V = 49152, L = 30). Usage:

    python benchmarks/bench_probe.py                                    # tiny random Llama
    python benchmarks/bench_probe.py --model smollm2-135m-instruct --prompts 16 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(folder: Path) -> Path:
    """A random 4-layer Llama (d = 64) with the tests' word-level tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_model, tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, max_position_embeddings=1024
    )
    return save_model(AutoModelForCausalLM.from_config(config), folder)


def child(a: argparse.Namespace) -> dict:
    import torch

    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.experiments.lens import LogitLens, TunedLens, Unembed
    from sftlens.experiments.probe import batches, encode, probe_pass
    from sftlens.models import surgery
    from sftlens.models.loading import load_model

    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    base, tok = load_model(a.model, device=a.device)
    sft, _ = load_model(a.sft or a.model, device=a.device)
    examples = resolve_dataset(a.data, split="test", limit=a.prompts[0])
    enc = encode(
        tok, [(format_question(e.question), format_target(e.answer)) for e in examples], 512
    )
    device = next(base.parameters()).device
    cuda = device.type == "cuda"
    # warm-up: fault in the memory-mapped weights and first-call buffers before measuring, so
    # "grown" is what the work adds, not the page-in of two checkpoints
    warm = torch.tensor([enc.ids[0][:16]], device=device)
    for m in (base, sft):
        m(input_ids=warm, use_cache=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _maxrss_mib()
    data = batches(enc, batch_size=a.batch_size, pad_id=tok.pad_token_id)
    t0 = time.perf_counter()
    if a.child == "plain":
        for batch, _ in data:
            batch = batch.to(device)
            for m in (base, sft):
                m(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
    else:
        L = surgery.num_layers(base.config)
        lenses = {"logit": (LogitLens(Unembed(base)), LogitLens(Unembed(sft)))}
        if a.child == "probe-both":
            d = surgery.hidden_size(base.config)
            lenses["tuned"] = (TunedLens(Unembed(base), L, d), TunedLens(Unembed(sft), L, d))
        probe_pass(base, sft, lenses, data, num_layers=L, chunk=a.chunk_size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _maxrss_mib()
    return {
        "variant": a.child,
        "prompts": a.prompts[0],
        "tokens": sum(len(x) for x in enc.ids),
        "answer_tokens": enc.answer_tokens,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "grown_mib": peak - rss_loaded,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_child(a: argparse.Namespace, variant: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", a.model, "--data", a.data]
    cmd += ["--prompts", str(n), "--batch-size", str(a.batch_size), "--device", a.device]
    cmd += ["--chunk-size", str(a.chunk_size), "--threads", str(a.threads)]
    if a.sft:
        cmd += ["--sft", a.sft]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{variant} @ {n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {"variant": variant, "prompts": n, "seconds": float("nan"), "failed": True}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="'tiny' (random, offline) or any model spec")
    p.add_argument("--sft", default=None, help="SFT model spec (default: --model again)")
    p.add_argument("--data", default="auto", help="problems: 'auto' (GSM8K test if found)")
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "probe"],
        choices=["plain", "probe", "probe-both"],
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.model == "tiny":
        a.model = str(tiny_model(Path(tempfile.gettempdir()) / "sftlens_bench_probe_tiny"))
    results = []
    for n in a.prompts:
        for variant in a.variants:
            r = run_child(a, variant, n)
            results.append(r)
            if r.get("failed"):
                continue
            cuda = f"  cuda peak {r['cuda_peak_mib']:7.0f} MiB" if r["cuda_peak_mib"] else ""
            print(
                f"{variant:>10} prompts={n:4d} tokens={r['tokens']:6d} "
                f"answer={r['answer_tokens']:6d} {r['seconds']:8.2f} s  "
                f"peak {r['peak_rss_mib']:7.0f} MiB  grown {r['grown_mib']:6.0f} MiB{cuda}",
                flush=True,
            )
    ok = [r for r in results if not r.get("failed")]
    print("\nratios")
    for n in a.prompts:
        by = {r["variant"]: r for r in ok if r["prompts"] == n}
        for variant in ("probe", "probe-both"):
            if variant in by and "plain" in by:
                print(
                    f"  prompts={n}: {variant}/plain time "
                    f"{by[variant]['seconds'] / by['plain']['seconds']:.2f}x, peak RSS "
                    f"{by[variant]['peak_rss_mib'] / by['plain']['peak_rss_mib']:.2f}x"
                )
    lo, hi = min(a.prompts), max(a.prompts)
    for variant in a.variants:
        r_lo = next((r for r in ok if r["variant"] == variant and r["prompts"] == lo), None)
        r_hi = next((r for r in ok if r["variant"] == variant and r["prompts"] == hi), None)
        if r_lo and r_hi and lo != hi:
            cuda = ""
            if r_lo["cuda_peak_mib"]:
                cuda = f", cuda peak {r_hi['cuda_peak_mib'] / r_lo['cuda_peak_mib']:.2f}x"
            print(
                f"  {variant}: memory at {hi} vs {lo} prompts (goal: flat): peak RSS "
                f"{r_hi['peak_rss_mib'] / r_lo['peak_rss_mib']:.2f}x, grown "
                f"{r_hi['grown_mib']:.0f} vs {r_lo['grown_mib']:.0f} MiB{cuda}"
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
