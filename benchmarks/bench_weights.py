"""Streamed weight diff vs. "load both models and diff the state dicts", side by side.

Claim under test: ``sftlens.weight_diff.weight_diff`` (one tensor pair at a time, straight from
the safetensors files) is >= 2x faster and needs >= 4x less memory than the obvious baseline
(``AutoModelForCausalLM.from_pretrained`` twice, then a loop over the two ``state_dict``s).

Every measurement runs in a FRESH Python process (this script re-run with ``--child``), so the
peak RSS of one variant never leaks into another's. Three children per repeat:

- ``floor``: python + ``import torch, transformers, sftlens.weight_diff`` and nothing else;
- ``baseline``: the same imports, then load both models and compute dW from the state dicts;
- ``sftlens``: the same imports, then ``weight_diff(base, sft)``.

Both variants compute the same numbers with the same float64 kernels
(``sftlens.metrics.weights``), so the difference is only how the tensors reach memory. The
per-layer ``dw_attn`` of both is compared at the end.

    python benchmarks/bench_weights.py --base smollm2-135m-instruct --sft runs/smollm2-gsm8k-sft
    python benchmarks/bench_weights.py --sft /tmp/sft_smoke --repeats 1 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

VARIANTS = ("floor", "baseline", "sftlens")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- child side


class _AnonSampler:
    """Samples ``RssAnon`` / ``RssFile`` from /proc/self/status (Linux) every few ms.

    ``ru_maxrss`` is exact but counts file-backed pages of memory-mapped checkpoints too; the
    sampled anonymous peak shows how much private memory a variant really held.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_anon_kib = 0
        self.peak_file_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = Path("/proc/self/status").is_file()

    def _sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.peak_anon_kib = max(self.peak_anon_kib, int(line.split()[1]))
                elif line.startswith("RssFile:"):
                    self.peak_file_kib = max(self.peak_file_kib, int(line.split()[1]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> _AnonSampler:
        if self.available:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self._sample()


def _baseline(base: str, sft: str) -> list[float]:
    """Per-layer dw_attn from two fully loaded models (the approach sftlens replaces)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from sftlens.metrics.weights import frobenius_sq, frobenius_sq_diff
    from sftlens.models import surgery

    mb = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ms = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    sb, ss = mb.state_dict(), ms.state_dict()
    spec = surgery.arch_spec(mb.config)
    attn: dict[int, float] = {}
    totals = {"diff": 0.0, "base": 0.0}
    seen: set[int] = set()
    with torch.no_grad():
        for name, a in sb.items():
            if a.data_ptr() in seen:  # tied lm_head: the same storage as the embeddings
                continue
            seen.add(a.data_ptr())
            b = ss[name]
            if a.shape != b.shape:  # grown vocabulary: shared rows only
                b = b[: a.shape[0]]
            totals["diff"] += frobenius_sq_diff(a, b)
            totals["base"] += frobenius_sq(a)
            role = surgery.classify_param(spec, name)
            if role.group != "attn" or role.kind != "weight" or role.layer is None:
                continue
            pa = surgery.split_fused(spec, mb.config, role.proj, a, role.kind)
            pb = surgery.split_fused(spec, mb.config, role.proj, b, role.kind)
            for part in pa:
                attn[role.layer] = attn.get(role.layer, 0.0) + frobenius_sq_diff(pa[part], pb[part])
    return [math.sqrt(attn[i]) for i in range(len(attn))]


def _sftlens(base: str, sft: str) -> list[float]:
    from sftlens.weight_diff import weight_diff

    return weight_diff(base, sft, progress=False).series("dw_attn")


def child(variant: str, base: str, sft: str, out: str, threads: int = 0) -> None:
    t_start = time.perf_counter()
    import torch  # (the floor every variant pays)
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import sftlens.weight_diff  # noqa: F401

    if threads > 0:
        torch.set_num_threads(threads)
    t_imported = time.perf_counter()
    after_imports_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dw_attn: list[float] = []
    with _AnonSampler() as sampler:
        if variant == "baseline":
            dw_attn = _baseline(base, sft)
        elif variant == "sftlens":
            dw_attn = _sftlens(base, sft)
    t_done = time.perf_counter()
    result = {
        "variant": variant,
        "import_s": t_imported - t_start,
        "work_s": t_done - t_imported,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_after_imports_mib": after_imports_kib / 1024,
        "peak_anon_mib": sampler.peak_anon_kib / 1024 if sampler.available else None,
        "peak_file_mib": sampler.peak_file_kib / 1024 if sampler.available else None,
        "torch_threads": torch.get_num_threads(),
        "dw_attn": dw_attn,
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent side


def _run_child(variant: str, base: Path, sft: Path, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", variant, "--base", str(base)]
        cmd += ["--sft", str(sft), "--child-out", str(out), "--threads", str(threads)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"error: the {variant} child failed (exit {proc.returncode})")
        result: dict[str, Any] = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def _warm_page_cache(*folders: Path) -> None:
    """Read every weight file once, so no variant pays for a cold disk the other skips."""
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model spec")
    p.add_argument("--sft", default="runs/smollm2-gsm8k-sft", help="SFT model spec")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; medians reported")
    p.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in every child (0: torch's default); 1 is steadier on a busy machine",
    )
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child(args.child, args.base, args.sft, args.child_out, args.threads)
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    from sftlens.errors import SftlensError
    from sftlens.models.loading import resolve_model

    try:  # conversion (GGUF -> safetensors, once) is not part of the timing
        base, sft = resolve_model(args.base), resolve_model(args.sft)
    except SftlensError as exc:
        raise SystemExit(f"error: {exc}") from None
    _warm_page_cache(base, sft)
    print(f"base: {args.base} -> {base}")
    print(f"sft:  {args.sft} -> {sft}")
    print(f"torch threads per child: {args.threads or 'default'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        # Alternate the order so neither variant always runs first (page cache, thermals).
        order = (
            ("floor", "baseline", "sftlens") if rep % 2 == 0 else ("floor", "sftlens", "baseline")
        )
        for variant in order:
            r = _run_child(variant, base, sft, args.threads)
            runs[variant].append(r)
            print(
                f"  repeat {rep + 1}/{args.repeats} {variant:8s} wall {r['wall_s']:6.2f}s  "
                f"work {r['work_s']:6.2f}s  peak RSS {r['maxrss_mib']:7.1f} MiB",
                flush=True,
            )

    floor_rss = _median(runs["floor"], "maxrss_mib")
    med = {
        v: {
            k: _median(runs[v], k)
            for k in (
                "wall_s",
                "import_s",
                "work_s",
                "maxrss_mib",
                "peak_anon_mib",
                "peak_file_mib",
            )
        }
        for v in VARIANTS
    }
    for v in VARIANTS:
        med[v]["rss_above_floor_mib"] = med[v]["maxrss_mib"] - floor_rss

    b_attn, s_attn = runs["baseline"][0]["dw_attn"], runs["sftlens"][0]["dw_attn"]
    same_len = len(b_attn) == len(s_attn) and len(b_attn) > 0
    max_abs = max(abs(x - y) for x, y in zip(b_attn, s_attn)) if same_len else float("nan")
    max_val = max(abs(x) for x in s_attn) if s_attn else float("nan")

    def ratio(key: str) -> float:
        s = med["sftlens"][key]
        return med["baseline"][key] / s if s else float("nan")

    ratios = {
        "wall": ratio("wall_s"),
        "work": ratio("work_s"),
        "peak_rss": ratio("maxrss_mib"),
        "rss_above_floor": ratio("rss_above_floor_mib"),
        "peak_anon": ratio("peak_anon_mib"),
    }

    print()
    print(f"median of {args.repeats} run(s), each variant in a fresh process")
    header = (
        f"{'variant':10s} {'wall s':>8s} {'work s':>8s} {'peak RSS':>10s} "
        f"{'above floor':>12s} {'peak anon*':>11s}"
    )
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        m = med[v]
        print(
            f"{v:10s} {_fmt(m['wall_s'], 2):>8s} {_fmt(m['work_s'], 2):>8s} "
            f"{_fmt(m['maxrss_mib']):>7s} MiB {_fmt(m['rss_above_floor_mib']):>8s} MiB "
            f"{_fmt(m['peak_anon_mib']):>7s} MiB"
        )
    print("-" * len(header))
    print(
        f"{'base/sft':10s} {_fmt(ratios['wall'], 2) + 'x':>8s} {_fmt(ratios['work'], 2) + 'x':>8s} "
        f"{_fmt(ratios['peak_rss'], 2) + 'x':>10s} {_fmt(ratios['rss_above_floor'], 2) + 'x':>12s} "
        f"{_fmt(ratios['peak_anon'], 2) + 'x':>11s}"
    )
    print("goal: >= 2x faster (work s), >= 4x less memory (peak RSS above floor)")
    print("* sampled RssAnon peak (private memory, excludes mmap'd file pages); approximate")
    print(
        f"check: per-layer dw_attn over {len(s_attn)} layers, max |baseline - sftlens| = "
        f"{max_abs:.3e} (largest dw_attn {max_val:.3e})"
        + ("" if same_len else "  LAYER COUNTS DIFFER")
    )

    if args.json:
        record = {
            "base": args.base,
            "sft": args.sft,
            "base_dir": str(base),
            "sft_dir": str(sft),
            "repeats": args.repeats,
            "threads": args.threads,
            "medians": med,
            "ratios_baseline_over_sftlens": ratios,
            "dw_attn_max_abs_diff": max_abs,
            "runs": runs,
            "env": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "loadavg_after": os.getloadavg(),
                "versions": _versions(),
            },
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if same_len else 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "safetensors", "sftlens"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


if __name__ == "__main__":
    sys.exit(main())
