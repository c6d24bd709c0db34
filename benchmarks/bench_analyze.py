"""Benchmark: the streaming ``analyze`` pass against plain forwards and the paper code's approach.

Variants, each in a fresh subprocess (so peak RSS is its own), side by side:

  (a)  plain      the two forward passes alone (the floor: no hooks, no metrics)
  (a') body       the same without the LM head: analyze needs no logits and skips it, so
                  analyze/body is the like-for-like overhead of hooks and metrics
  (b)  analyze    sftlens' streaming pass (hooks + float64 accumulators), attention metrics off
  (c)  paper      the paper code's approach: output_hidden_states for every prompt, all layers'
                  states of both models materialised, entropies from n x n Gram matrices; token
                  CKA from d x d moments (sftlens' trick, so only materialising costs extra)
  (c') paper-gram the same with token CKA from the n x n token Grams (n = all tokens), the
                  reference Gram form; skipped when those Grams cannot fit in memory

Prints wall time and peak RSS of each, the ratios, and how far each variant's per-layer CKA is
from analyze's (they compute the same quantity). Usage:

    python benchmarks/bench_analyze.py --base smollm2-135m-instruct \
        --sft runs/smollm2-gsm8k-sft --prompts 256 1024 --text question

On a GPU add ``--device cuda`` (``--dtype auto``: bf16 weights; float64 sums on the GPU); the
variants then also report their peak GPU memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(
    variant: str,
    base: str,
    sft: str,
    prompts: int,
    text: str,
    batch_size: int,
    device: str = "cpu",
    dtype: str = "auto",
) -> dict:
    import torch

    from sftlens.capture import make_batches, tokenize
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.models.loading import load_model, resolve_model

    torch.set_grad_enabled(False)
    b_model, tok = load_model(resolve_model(base), dtype=dtype, device=device)
    s_model, _ = load_model(resolve_model(sft), dtype=dtype, device=device)
    dev = next(b_model.parameters()).device
    examples = resolve_dataset("gsm8k", split="test", limit=prompts)
    texts = [
        format_question(e.question) + (format_target(e.answer) if text == "qa" else "")
        for e in examples
    ]
    tokens = sum(len(t) for t in tokenize(tok, texts, max_length=512))
    gram_bytes = 2 * tokens**2 * 8  # paper-gram's K and L, float64 n x n, centred in place
    if variant == "paper-gram" and gram_bytes > 0.8 * _available_bytes():
        return {
            "variant": variant,
            "prompts": prompts,
            "tokens": tokens,
            "seconds": float("nan"),
            "peak_rss_mib": float("nan"),
            "skipped": f"needs {gram_bytes / 2**30:.0f} GiB for the n x n token Grams, "
            f"{_available_bytes() / 2**30:.0f} GiB available",
        }
    cka: list[float] = []
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
            batch = batch.to(dev)
            for m in models:
                m(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
    elif variant == "analyze":
        from sftlens.representations import run_pass

        rows, _ = run_pass(
            b_model,
            s_model,
            tok,
            texts,
            batch_size=batch_size,
            max_length=512,
            attention=False,
            progress=False,
        ).rows()
        cka = [r["value"] for r in rows if r["model"] == "pair" and r["metric"] == "cka"]
    elif variant in ("paper", "paper-gram"):
        cka = paper_approach(b_model, s_model, tok, texts, batch_size, gram=variant == "paper-gram")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # the kernels queued above are part of the time
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "prompts": prompts,
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # models, activations and (analyze) the float64 sums on the GPU
        "peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20
        if dev.type == "cuda"
        else None,
        "device": str(dev),
        "dtype": str(next(b_model.parameters()).dtype).removeprefix("torch."),
        "cka": cka,
    }


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def paper_approach(b_model, s_model, tok, texts, batch_size, *, gram: bool) -> list[float]:
    """Materialise every layer's hidden states, then compute metrics from Gram matrices.

    Entropies and effective rank follow the paper code's conventions (n x n Grams per prompt
    and over pooled prompts). Token-level CKA: with ``gram`` from the n x n token Grams over all
    tokens (Kornblith et al.'s reference form: centre K = XX^T and L = YY^T, HSIC = <K_c, L_c>),
    as the paper code does; without it from the d x d feature-space moments (sftlens' form, so
    that variant isolates the cost of materialising states).
    """
    import torch

    from sftlens.capture import make_batches, tokenize
    from sftlens.metrics.information import alpha_entropy_from_eigenvalues

    ids = tokenize(tok, texts, max_length=512)
    states = {"base": [], "sft": []}  # [prompt][layer] -> (n_tokens, d)
    dev = next(b_model.parameters()).device
    for batch in make_batches(ids, batch_size=batch_size, pad_id=tok.pad_token_id):
        batch = batch.to(dev)
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
        g = z @ z.T / z.shape[1] + 1e-6 * torch.eye(
            z.shape[0], dtype=torch.float64, device=z.device
        )
        lam = torch.linalg.eigvalsh(g / torch.trace(g)).clamp(min=0)
        return float(alpha_entropy_from_eigenvalues(lam))

    def centre_(k):  # H K H in place
        means = k.mean(0)
        k -= means[None, :]
        k -= means[:, None]
        k += means.mean()
        return k

    cka = []
    for layer in range(n_layers):
        for name in ("base", "sft"):
            [gram_entropy(p[layer]) for p in states[name]]  # prompt entropy
            pooled = torch.stack([p[layer].double().mean(0) for p in states[name]])
            gram_entropy(pooled)  # dataset entropy
            torch.linalg.svdvals(pooled - pooled.mean(0))  # erank
        x = torch.cat([p[layer] for p in states["base"]]).double()  # (n_tokens, d)
        y = torch.cat([p[layer] for p in states["sft"]]).double()
        torch.nn.functional.cosine_similarity(x, y).mean()
        if gram:
            k, l_ = centre_(x @ x.T), centre_(y @ y.T)  # (n_tokens, n_tokens) each
            k, l_ = k.view(-1), l_.view(-1)
            cka.append(float(k.dot(l_) / (k.dot(k) * l_.dot(l_)).sqrt()))
            del k, l_
        else:
            x, y = x - x.mean(0), y - y.mean(0)
            cka.append(
                float(
                    torch.linalg.matrix_norm(y.T @ x) ** 2
                    / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
                )
            )
    return cka


CHEAP = ("plain", "body", "analyze")


def run_child(a: argparse.Namespace, variant: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--base", a.base, "--sft", a.sft]
    cmd += ["--prompts", str(n), "--text", a.text, "--batch-size", str(a.batch_size)]
    cmd += ["--device", a.device, "--dtype", a.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{variant} @ {n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        nan = float("nan")
        return {"variant": variant, "prompts": n, "seconds": nan, "peak_rss_mib": nan, "tokens": 0}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(results: list[dict], n: int, variant: str) -> dict:
    """One result per (prompts, variant): the run with the median time (its memory with it)."""
    runs = sorted(
        (r for r in results if r["prompts"] == n and r["variant"] == variant),
        key=lambda r: r["seconds"],
    )
    if not runs:
        return {"variant": variant, "prompts": n, "seconds": float("nan"), "tokens": 0}
    best = dict(runs[(len(runs) - 1) // 2])
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--sft", default="runs/smollm2-gsm8k-sft")
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--text", default="question", choices=["question", "qa"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "body", "analyze", "paper", "paper-gram"],
        choices=["plain", "body", "analyze", "paper", "paper-gram"],
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of plain/body/analyze (medians reported)"
    )
    p.add_argument(
        "--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (every variant)"
    )
    p.add_argument(
        "--dtype", default="auto", help="model dtype: 'auto' (bf16 on a GPU, float32 on CPU) ..."
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        r = child(a.child, a.base, a.sft, a.prompts[0], a.text, a.batch_size, a.device, a.dtype)
        print(json.dumps(r))
        return
    results = []
    for n in a.prompts:
        for rep in range(a.repeats):
            # the cheap variants repeat (interleaved, so drift hits all alike); the paper
            # variants run once: their ratios are far from the goals' boundaries
            for variant in a.variants if rep == 0 else [v for v in a.variants if v in CHEAP]:
                r = run_child(a, variant, n)
                results.append(r)
                if "skipped" in r:
                    print(
                        f"{variant:>10} prompts={n:5d} tokens={r['tokens']:7d} skipped: {r['skipped']}"
                    )
                    continue
                gpu = r.get("peak_gpu_mib")
                print(
                    f"{variant:>10} prompts={n:5d} tokens={r['tokens']:7d} {r['seconds']:8.1f} s  "
                    f"{r['peak_rss_mib']:8.0f} MiB"
                    + (f"  GPU peak {gpu:8.0f} MiB" if gpu is not None else ""),
                    flush=True,
                )
    results = [median_of(results, n, v) for n in a.prompts for v in a.variants]
    print(
        "\nratios (goal: analyze/plain <= 1.2; paper/analyze >= 3 in time and >= 5 in memory at 1024)"
    )
    for n in a.prompts:
        r = {x["variant"]: x for x in results if x["prompts"] == n}
        if "analyze" not in r:
            continue
        t, m = r["analyze"]["seconds"], r["analyze"]["peak_rss_mib"]
        for other, label in (("plain", "analyze/plain"), ("body", "analyze/body")):
            if other in r:
                print(
                    f"  prompts={n}: {label:<18} time {t / r[other]['seconds']:.2f}x, "
                    f"memory {m / r[other]['peak_rss_mib']:.2f}x"
                )
        for other in ("paper", "paper-gram"):
            if other in r and "skipped" in r[other]:
                print(f"  prompts={n}: {other} skipped: {r[other]['skipped']}")
            elif other in r:
                label = f"{other}/analyze"
                print(
                    f"  prompts={n}: {label:<18} time {r[other]['seconds'] / t:.2f}x, "
                    f"memory {r[other]['peak_rss_mib'] / m:.2f}x"
                )
                if r[other].get("cka") and r["analyze"].get("cka"):
                    # HF's last hidden state is after the final norm, analyze's is before it
                    pairs = list(zip(r[other]["cka"], r["analyze"]["cka"], strict=True))[:-1]
                    gap = max(abs(u - v) for u, v in pairs)
                    print(
                        f"  prompts={n}: {other} CKA vs analyze, layers -1..L-2: max |diff| {gap:.1e}"
                    )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
