"""Benchmark: ``analyze --stream-layers`` on a pair larger than memory, against accelerate's disk
offload, and against the in-memory ``analyze`` when the pair fits.

A synthetic pair of an existing architecture (Llama- or OLMo2-shaped, random weights; the SFT
model is the base plus noise on every tensor) is written once, shard by shard, to ``--scratch``
(never to the repository; reused while its shape is unchanged). Variants, each in a fresh
process, side by side:

  (a) stream     ``sftlens analyze --stream-layers`` under the memory cap: time of the analysis
                 step (as the run folder records it; the process's wall time beside it, which
                 adds fingerprinting the checkpoints, plots and the report), peak RSS, prompt
                 tokens per second through both models, checkpoint sizes
  (b) offload    transformers + accelerate, ``device_map="auto"`` with ``max_memory`` and
                 ``offload_folder``, both models loaded under the same cap, the same batches
                 through both with ``output_hidden_states=True`` (token CKA per layer from the
                 captured states): time ratio (goal: offload / stream >= 3) and peak RSS
  (c) fits       a smaller pair of the same kind, no cap: ``--stream-layers`` against the
                 in-memory ``analyze`` (goal: time <= 1.3x) and their per-layer CKA (equal)

The cap: cgroup v2 ``memory.max`` or cgroup v1 ``memory.limit_in_bytes`` when this process may
create a cgroup (root on a writable cgroup fs), else ``RLIMIT_AS`` (address space; stricter than
RSS: memory-mapped files count, which is why the offload baseline may fail under it, and it is
reported when it does). The line ``cap:`` says which one ran. Usage:

    python benchmarks/bench_stream.py --scratch /tmp/bench_stream                      # tiny
    python benchmarks/bench_stream.py --scratch /data/bench_stream --family olmo2 \\
        --hidden 4096 --layers 32 --heads 32 --inter 11008 --vocab 100352 --dtype bfloat16 \\
        --cap 12GiB --prompts 64 --batch-size 8 --max-length 256 --json stream.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- the synthetic pair ---------------------------------------------------------------------------


def _config(a: argparse.Namespace, hidden: int, layers: int):
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "olmo2": tf.Olmo2Config}[a.family]
    return cls(
        vocab_size=a.vocab,
        hidden_size=hidden,
        intermediate_size=a.inter or (hidden * 8 // 3 // 64 + 1) * 64,
        num_hidden_layers=layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=max(2048, a.max_length),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )


def write_pair(a: argparse.Namespace, hidden: int, layers: int) -> tuple[Path, Path]:
    """BASE and SFT folders (one shard per block), written once per shape."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_tokenizer

    config = _config(a, hidden, layers)
    name = f"{a.family}-d{hidden}-l{layers}-v{a.vocab}-{a.dtype}"
    root = Path(a.scratch) / name
    folders = (root / "base", root / "sft")
    if all((f / "done").is_file() for f in folders):
        return folders
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shards: dict[str, list[str]] = {}
    for n in shapes:
        parts = n.split(".")
        shard = f"block-{int(parts[2]):03d}" if parts[1] == "layers" else "outside"
        shards.setdefault(shard, []).append(n)
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    tok = tiny_tokenizer(a.vocab)
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(f)
        tok.save_pretrained(f)
    index: dict[str, str] = {}
    for shard, names in shards.items():
        base, sft = {}, {}
        for n in names:
            if n.endswith("norm.weight"):
                w = torch.ones(shapes[n])
            else:
                w = torch.randn(shapes[n], generator=g) * 0.02
            base[n] = w.to(dtype)
            sft[n] = (w + 0.002 * torch.randn(shapes[n], generator=g)).to(dtype)
            index[n] = f"{shard}.safetensors"
        save_file(base, str(folders[0] / f"{shard}.safetensors"), metadata={"format": "pt"})
        save_file(sft, str(folders[1] / f"{shard}.safetensors"), metadata={"format": "pt"})
        print(f"  wrote {shard} of {root}", flush=True)
    for f in folders:
        (f / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index})
        )
        (f / "done").write_text("")
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# -- the cap --------------------------------------------------------------------------------------


def cap_method(cap: int | None, method: str) -> tuple[str, object, Path | None]:
    """(description, preexec function, cgroup folder to remove) of the cap.

    ``cgroup``: a new cgroup nested in this process's own memory cgroup (v2 ``memory.max`` or
    v1 ``memory.limit_in_bytes``; needs the right to create one), the child moved into it.
    ``rlimit``: ``RLIMIT_AS`` on the child (works anywhere; counts address space, not RSS).
    """
    if cap is None:
        return "none", None, None
    if method == "cgroup":
        from sftlens.memory import _cgroup_dirs

        for folder, limit, _ in _cgroup_dirs():
            procs = "cgroup.procs"
            group = folder / f"sftlens-bench-{os.getpid()}"
            if not (folder / procs).is_file():
                continue
            try:
                group.mkdir()
            except OSError:
                continue
            if not (group / limit).is_file():  # not a cgroup file system after all
                group.rmdir()
                continue
            (group / limit).write_text(str(cap))

            def enter(group: Path = group) -> None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

            return f"cgroup {group}/{limit} = {cap}", enter, group
        raise SystemExit("--cap-method cgroup: no memory cgroup this process may create")

    def rlimit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return f"RLIMIT_AS = {cap} (address space)", rlimit, None


# -- children -------------------------------------------------------------------------------------


def child(a: argparse.Namespace) -> dict:
    variant, base, sft = a.child, a.child_base, a.child_sft
    out: dict = {"variant": variant}
    t0 = time.perf_counter()
    if variant in ("stream", "inmem"):
        from sftlens.cli import main as cli

        run = Path(a.child_out)
        args = ["analyze", base, sft, "--out", str(run), "--data", a.data, "--max-prompts"]
        args += [str(a.prompts), "--batch-size", str(a.batch_size), "--max-length"]
        args += [str(a.max_length), "--no-attention", "--no-progress", "--text", "question"]
        args += ["--stream-layers" if variant == "stream" else "--no-stream-layers"]
        if int(a.child_cap):
            args += ["--max-memory", str(a.child_cap)]
        rc = cli(args)
        if rc != 0:
            raise SystemExit(rc)
        with open(run / "metrics.csv") as f:
            cka = {
                int(r["layer"]): float(r["value"])
                for r in csv.DictReader(f)
                if r["model"] == "pair" and r["metric"] == "cka"
            }
        out["cka"] = [cka[k] for k in sorted(cka)]
        steps = json.loads((run / "config.json").read_text())["steps"]
        out["pass_seconds"] = steps["analyze"]["seconds"]  # the analysis itself, as timed by
        # the run folder: no fingerprints (sha256 of the checkpoints), plots or report
    else:  # offload: accelerate's disk offload, hidden states of every batch captured
        import torch
        from transformers import AutoModelForCausalLM

        from sftlens.metrics.accumulators import StreamingCKA

        torch.set_grad_enabled(False)
        models = []
        for i, folder in enumerate((base, sft)):
            kw = {"offload_folder": str(Path(a.child_out) / f"offload{i}")}
            if int(a.child_cap):  # each model may hold this share of the cap; the rest on disk
                kw["max_memory"] = {"cpu": int(int(a.child_cap) * a.offload_share)}
            models.append(
                AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, device_map="auto", **kw
                ).eval()
            )
        batches = _batches(a, base)
        accs: list[StreamingCKA] = []
        for batch in batches:
            states = [
                m(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
                for m in models
            ]
            mask = batch.attention_mask.bool()
            if not accs:
                accs = [StreamingCKA(h.shape[-1], h.shape[-1]) for h in states[0]]
            for acc, x, y in zip(accs, *states):
                acc.update(x[mask].double(), y[mask].double())
        out["cka"] = [acc.compute() for acc in accs]  # the last one is after the final norm
        out["pass_seconds"] = time.perf_counter() - t0  # loading (offload set-up) included
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _batches(a: argparse.Namespace, folder: str):
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question
    from sftlens.models.loading import load_tokenizer
    from sftlens.representations import pass_batches

    texts = [
        format_question(e.question) for e in resolve_dataset(a.data, split="test", limit=a.prompts)
    ]
    return pass_batches(
        load_tokenizer(folder), texts, batch_size=a.batch_size, max_length=a.max_length
    )


def run_child(a, variant: str, base: Path, sft: Path, out: Path, cap: int | None, preexec) -> dict:
    cmd = [sys.executable, __file__, "--scratch", a.scratch, "--child", variant]
    cmd += ["--child-base", str(base)]
    cmd += ["--child-sft", str(sft), "--child-out", str(out), "--data", a.data]
    cmd += ["--prompts", str(a.prompts), "--batch-size", str(a.batch_size)]
    cmd += ["--max-length", str(a.max_length), "--child-cap", str(cap or 0)]
    cmd += ["--offload-share", str(a.offload_share)]
    shutil.rmtree(out, ignore_errors=True)  # a finished run folder would be resumed, not rerun
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=preexec)
    if proc.returncode < 0:  # e.g. SIGKILL from the cgroup's out-of-memory killer
        why = f"killed by signal {-proc.returncode}"
        if -proc.returncode == 9 and cap:
            why += f" (out of memory under the {cap / 2**30:.2f} GiB cap)"
        return {"variant": variant, "failed": why}
    if proc.returncode != 0:
        return {"variant": variant, "failed": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scratch", required=True, help="folder for the synthetic checkpoints")
    p.add_argument("--family", default="llama", choices=["llama", "olmo2"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inter", type=int, default=0, help="MLP width (default: ~8/3 hidden)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--cap", default="1GiB", help="memory cap of (a) and (b); 'none' for none")
    p.add_argument("--cap-method", default="rlimit", choices=["rlimit", "cgroup"])
    p.add_argument("--small-hidden", type=int, default=0, help="(c) pair width (default hidden/4)")
    p.add_argument("--small-layers", type=int, default=0, help="(c) pair depth (default layers)")
    p.add_argument("--data", default="auto")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    p.add_argument("--variants", nargs="+", default=["stream", "offload", "fits"])
    p.add_argument(
        "--offload-share",
        type=float,
        default=0.3,
        help="(b): accelerate's max_memory per model as a share of the cap (the rest is offloaded "
        "to disk); accelerate's process needs well over twice this, lower it when (b) is killed",
    )
    p.add_argument("--json", type=Path)
    for hidden in ("--child", "--child-base", "--child-sft", "--child-out", "--child-cap"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    sys.path.insert(0, str(REPO / "src"))
    from sftlens.memory import parse_size

    cap = None if a.cap == "none" else parse_size(a.cap)
    how, preexec, group = cap_method(cap, a.cap_method)
    try:
        run_all(a, cap, how, preexec)
    finally:
        if group is not None:
            group.rmdir()


def run_all(a: argparse.Namespace, cap: int | None, how: str, preexec: object) -> None:
    from sftlens.memory import format_bytes

    scratch = Path(a.scratch)
    base, sft = write_pair(a, a.hidden, a.layers)
    sizes = folder_bytes(base) + folder_bytes(sft)
    tokens = sum(int(b.attention_mask.sum()) for b in _batches(a, str(base)))
    print(f"pair: {base.parent.name}, checkpoints {format_bytes(sizes)} together")
    print(f"cap: {how}; checkpoints / cap = {sizes / cap:.1f}x" if cap else "cap: none")
    print(f"prompts: {a.prompts} ({tokens} tokens), batch {a.batch_size}")
    results: dict[str, dict] = {}
    for variant in ("stream", "offload"):
        if variant in a.variants:
            r = run_child(a, variant, base, sft, scratch / f"run-{variant}", cap, preexec)
            if "failed" in r and variant == "offload" and preexec is not None:
                # e.g. RLIMIT_AS counts the memory-mapped shards: time it without the OS cap,
                # max_memory (what accelerate keeps in memory) unchanged, and say so
                print(f"  (b) offload  failed under the cap ({r['failed']}); rerun without it")
                r = run_child(a, variant, base, sft, scratch / f"run-{variant}", cap, None)
                r["uncapped"] = True
            results[variant] = r
            if "failed" in r:
                print(
                    f"  ({'a' if variant == 'stream' else 'b'}) {variant:8} FAILED: {r['failed']}"
                )
                continue
            print(
                f"  ({'a' if variant == 'stream' else 'b'}) {variant:8} pass "
                + ("[no OS cap] " if r.get("uncapped") else "")
                + f"{r['pass_seconds']:7.1f} s (process {r['seconds']:7.1f} s)  peak RSS "
                f"{r['peak_rss_mib']:7.0f} MiB  {tokens / r['pass_seconds']:8.1f} tokens/s",
                flush=True,
            )
    s, o = results.get("stream", {}), results.get("offload", {})
    if "seconds" in s and "seconds" in o:
        gap = max(
            abs(u - v) for u, v in zip(s["cka"][:-1], o["cka"][:-1])
        )  # HF's last is post-norm
        print(
            f"  offload / stream: time {o['pass_seconds'] / s['pass_seconds']:.2f}x (goal >= 3), "
            f"peak RSS {o['peak_rss_mib'] / s['peak_rss_mib']:.2f}x; CKA layers -1..L-2 "
            f"max |diff| {gap:.1e}"
        )
    if "fits" in a.variants:
        small = (a.small_hidden or max(a.heads * 8, a.hidden // 4), a.small_layers or a.layers)
        sb, ss = write_pair(a, *small)
        print(
            f"(c) pair that fits: {sb.parent.name}, checkpoints "
            f"{format_bytes(folder_bytes(sb) + folder_bytes(ss))}, no cap"
        )
        for variant in ("inmem", "stream"):
            r = run_child(a, variant, sb, ss, scratch / f"run-fits-{variant}", None, None)
            results[f"fits-{variant}"] = r
            if "failed" in r:
                print(f"  {variant:8} FAILED: {r['failed']}")
                continue
            print(
                f"  {variant:8} pass {r['pass_seconds']:7.1f} s (process {r['seconds']:7.1f} s)  "
                f"peak RSS {r['peak_rss_mib']:7.0f} MiB"
            )
        i, st = results.get("fits-inmem", {}), results.get("fits-stream", {})
        if "seconds" in i and "seconds" in st:
            gap = max(abs(u - v) for u, v in zip(i["cka"], st["cka"], strict=True))
            print(
                f"  stream / in-memory: time {st['pass_seconds'] / i['pass_seconds']:.2f}x (goal <= 1.3), "
                f"peak RSS {st['peak_rss_mib'] / i['peak_rss_mib']:.2f}x; per-layer CKA max "
                f"|diff| {gap:.1e}"
            )
    if a.json:
        a.json.write_text(json.dumps({"cap": how, "tokens": tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
