"""Benchmark: the streaming ``analyze`` pass against plain forwards and the paper code's approach.

Three variants, each in a fresh subprocess (so peak RSS is its own), side by side:

  (a) plain   - the two forward passes alone (the floor: no hooks, no metrics)
  (a') body    - the same without the LM head (what analyze runs: it needs no logits), to show
                how much of (b)/(a) comes from skipping the logits
  (b) analyze - sftlens' streaming pass (hooks + float64 accumulators), attention metrics off
  (c) paper   - the paper code's approach: output_hidden_states for every prompt, all layers'
                states of both models materialised, then metrics from n x n Gram matrices

Prints wall time and peak RSS of each, and the ratios (b)/(a) and (c)/(b), for each number of
prompts. Usage:

    python benchmarks/bench_analyze.py --base smollm2-135m-instruct \
        --sft runs/smollm2-gsm8k-sft --prompts 256 1024 --text question
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(variant: str, base: str, sft: str, prompts: int, text: str, batch_size: int) -> dict:
    import torch

    from sftlens.capture import make_batches, tokenize
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.models.loading import load_model, resolve_model

    torch.set_grad_enabled(False)
    b_model, tok = load_model(resolve_model(base))
    s_model, _ = load_model(resolve_model(sft))
    examples = resolve_dataset("gsm8k", split="test", limit=prompts)
    texts = [
        format_question(e.question) + (format_target(e.answer) if text == "qa" else "")
        for e in examples
    ]
    tokens = sum(len(t) for t in tokenize(tok, texts, max_length=512))
    t0 = time.perf_counter()
    if variant in ("plain", "body"):
        from sftlens.models.surgery import get_body

        ids = tokenize(tok, texts, max_length=512)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        models = (
            (b_model, s_model) if variant == "plain" else tuple(map(get_body, (b_model, s_model)))
        )
        for batch in make_batches(
            ids, batch_size=batch_size, pad_id=tok.pad_token_id, indices=order
        ):
            for m in models:
                m(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
    elif variant == "analyze":
        from sftlens.representations import run_pass

        run_pass(
            b_model,
            s_model,
            tok,
            texts,
            batch_size=batch_size,
            max_length=512,
            attention=False,
            progress=False,
        ).rows()
    elif variant == "paper":
        paper_approach(b_model, s_model, tok, texts, batch_size)
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "prompts": prompts,
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def paper_approach(b_model, s_model, tok, texts, batch_size) -> None:
    """Materialise every layer's hidden states, then compute metrics from Gram matrices."""
    import torch

    from sftlens.capture import make_batches, tokenize
    from sftlens.metrics.information import alpha_entropy_from_eigenvalues

    ids = tokenize(tok, texts, max_length=512)
    states = {"base": [], "sft": []}  # [prompt][layer] -> (n_tokens, d)
    for batch in make_batches(ids, batch_size=batch_size, pad_id=tok.pad_token_id):
        for name, m in (("base", b_model), ("sft", s_model)):
            hs = m(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            ).hidden_states
            for row in range(batch.input_ids.shape[0]):
                real = batch.attention_mask[row].bool()
                states[name].append([h[row][real].clone() for h in hs])
    n_layers = len(states["base"][0])

    def gram_entropy(z):  # paper: rows normalised, not centred, G/d + 1e-6 I
        z = torch.nn.functional.normalize(z.double(), dim=1)
        g = z @ z.T / z.shape[1] + 1e-6 * torch.eye(z.shape[0], dtype=torch.float64)
        lam = torch.linalg.eigvalsh(g / torch.trace(g)).clamp(min=0)
        return float(alpha_entropy_from_eigenvalues(lam))

    for layer in range(n_layers):
        for name in ("base", "sft"):
            [gram_entropy(p[layer]) for p in states[name]]  # prompt entropy
            pooled = torch.stack([p[layer].double().mean(0) for p in states[name]])
            gram_entropy(pooled)  # dataset entropy
            torch.linalg.svdvals(pooled - pooled.mean(0))  # erank
        x = torch.cat([p[layer] for p in states["base"]]).double()
        y = torch.cat([p[layer] for p in states["sft"]]).double()
        x, y = x - x.mean(0), y - y.mean(0)
        (
            torch.linalg.matrix_norm(y.T @ x) ** 2
            / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
        )
        torch.nn.functional.cosine_similarity(x, y).mean()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--sft", default="runs/smollm2-gsm8k-sft")
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--text", default="question", choices=["question", "qa"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["plain", "analyze", "paper"])
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.base, a.sft, a.prompts[0], a.text, a.batch_size)))
        return
    results = []
    for n in a.prompts:
        for variant in a.variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--base",
                a.base,
                "--sft",
                a.sft,
                "--prompts",
                str(n),
                "--text",
                a.text,
                "--batch-size",
                str(a.batch_size),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{variant} @ {n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                results.append(
                    {
                        "variant": variant,
                        "prompts": n,
                        "seconds": float("nan"),
                        "peak_rss_mib": float("nan"),
                        "tokens": 0,
                    }
                )
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"{variant:>8} prompts={n:5d} tokens={r['tokens']:7d} {r['seconds']:8.1f} s  {r['peak_rss_mib']:8.0f} MiB",
                flush=True,
            )
    print(
        "\nratios (goal: analyze/plain <= 1.2; paper/analyze >= 3 in time and >= 5 in memory at 1024)"
    )
    for n in a.prompts:
        r = {x["variant"]: x for x in results if x["prompts"] == n}
        if "plain" in r and "analyze" in r:
            print(
                f"  prompts={n}: analyze/plain time {r['analyze']['seconds'] / r['plain']['seconds']:.2f}x, "
                f"memory {r['analyze']['peak_rss_mib'] / r['plain']['peak_rss_mib']:.2f}x"
            )
        if "body" in r and "analyze" in r:
            print(
                f"  prompts={n}: analyze/body  time {r['analyze']['seconds'] / r['body']['seconds']:.2f}x "
                "(both without the LM head)"
            )
        if "paper" in r and "analyze" in r:
            print(
                f"  prompts={n}: paper/analyze time {r['paper']['seconds'] / r['analyze']['seconds']:.2f}x, "
                f"memory {r['paper']['peak_rss_mib'] / r['analyze']['peak_rss_mib']:.2f}x"
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
