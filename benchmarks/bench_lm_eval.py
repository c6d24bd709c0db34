"""Benchmark: ``sftlens eval`` against lm-evaluation-harness's ``hf`` backend on the same task.

Claim under test: on the same model, the same N test problems, the same k exemplars (the first
k of the train split) and the same prompt text, sftlens' strict and flexible verdicts agree
with lm-eval's ``strict-match`` and ``flexible-extract`` per example, and sftlens takes less
wall time.

lm-eval runs a LOCAL task file written by this script (a copy of lm-eval's gsm8k.yaml with
``dataset_path: json`` on the jsonl files, ``fewshot_config.sampler: first_n`` for the fixed
exemplar order, ``max_gen_toks`` = ``--max-new-tokens``), so nothing is downloaded. Both sides
load the model themselves and are timed end to end (model loading and lm-eval's task setup
included) and over generation alone (lm-eval's ``generate_until``; sftlens' batches, the
prefix forward included); sftlens runs without its teacher-forced scores so both do the same
work. Needs ``pip install lm-eval``.

    python benchmarks/bench_lm_eval.py                    # tiny random Llama, 10 problems
    python benchmarks/bench_lm_eval.py --model smollm2-135m-instruct --n 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
fewshot_config:
  sampler: first_n
num_fewshot: {shots}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_new}
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
"""


def tiny_model_folder(root: Path) -> Path:
    """A small random Llama with the tests' word-level tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return save_model(AutoModelForCausalLM.from_config(cfg), root / "tiny", tok)


def run_lm_eval(folder: Path, data: Path, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    gen_seconds = [0.0]
    plain = HFLM.generate_until

    def timed(self: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return plain(self, *args, **kw)
        finally:
            gen_seconds[0] += time.perf_counter() - t

    HFLM.generate_until = timed  # type: ignore[method-assign]

    name = "gsm8k_sftlens_bench"
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / f"{name}.yaml").write_text(
        TASK_YAML.format(
            name=name,
            train=data / "train.jsonl",
            test=data / "test.jsonl",
            shots=a.shots,
            max_new=a.max_new_tokens,
        )
    )
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=[name],
        num_fewshot=a.shots,
        limit=a.n,
        batch_size=a.batch_size,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False),
    )
    seconds = time.perf_counter() - t0
    HFLM.generate_until = plain  # type: ignore[method-assign]
    assert out is not None
    per: dict[int, dict[str, Any]] = {}
    for s in out["samples"][name]:
        rec = per.setdefault(int(s["doc_id"]), {"completion": s["resps"][0][0]})
        key = "strict" if s["filter"] == "strict-match" else "flexible"
        rec[key + "_correct"] = bool(s["exact_match"])
    return {"seconds": seconds, "generation_seconds": gen_seconds[0], "per_example": per}


def run_sftlens(folder: Path, data: Path, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from sftlens.config import EvalConfig
    from sftlens.evaluation import generate as gen_mod
    from sftlens.evaluation.evaluate import predictions_path, read_predictions, run_eval

    gen_seconds = [0.0]
    plain = gen_mod.generate

    def timed(*args: Any, **kw: Any) -> Any:  # time spent producing batches (prefix included)
        it = plain(*args, **kw)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                gen_seconds[0] += time.perf_counter() - t
                return
            gen_seconds[0] += time.perf_counter() - t
            yield batch

    gen_mod.generate = timed  # type: ignore[assignment]

    cfg = EvalConfig(
        model=str(folder),
        data=str(data),
        shots=a.shots,
        limit=a.n,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        teacher_forced=False,
        out=str(tmp / "sftlens_run"),
        progress=False,
    )
    t0 = time.perf_counter()
    run = run_eval(cfg)
    seconds = time.perf_counter() - t0
    gen_mod.generate = plain  # type: ignore[assignment]
    per = {r["id"]: r for r in read_predictions(predictions_path(run, "base"))}
    return {"seconds": seconds, "generation_seconds": gen_seconds[0], "per_example": per}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random) or any sftlens model spec")
    p.add_argument("--n", type=int, default=10, help="test problems")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default="gsm8k", help="'gsm8k' or a folder with train/test jsonl")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the numbers here too")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from sftlens.data import resolve_dataset
    from sftlens.models.loading import resolve_model

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # the same problems for both, as plain jsonl files (lm-eval reads them with `datasets`)
        data = tmp / "data"
        data.mkdir()
        for split, limit in (("train", a.shots or 1), ("test", a.n)):
            rows = resolve_dataset(a.data, split=split, limit=limit)
            (data / f"{split}.jsonl").write_text(
                "".join(
                    json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in rows
                )
            )
        folder = tiny_model_folder(tmp) if a.model == "tiny" else resolve_model(a.model)
        ours = run_sftlens(folder, data, a, tmp)
        theirs = run_lm_eval(folder, data, a, tmp)

    ids = sorted(ours["per_example"])
    same_text = sum(
        ours["per_example"][i]["completion"] == theirs["per_example"][i]["completion"] for i in ids
    )
    print(
        f"model {a.model}, {len(ids)} problems, {a.shots}-shot, max {a.max_new_tokens} new tokens"
    )
    print(f"identical completions: {same_text}/{len(ids)}")
    result: dict[str, Any] = {"args": vars(a), "identical_completions": same_text, "n": len(ids)}
    for key in ("strict", "flexible"):
        agree = sum(
            ours["per_example"][i][f"{key}_correct"] == theirs["per_example"][i][f"{key}_correct"]
            for i in ids
        )
        k_ours = sum(ours["per_example"][i][f"{key}_correct"] for i in ids)
        k_theirs = sum(theirs["per_example"][i][f"{key}_correct"] for i in ids)
        print(
            f"{key:<9} verdicts agree {agree}/{len(ids)}  "
            f"(sftlens {k_ours}/{len(ids)}, lm-eval {k_theirs}/{len(ids)})"
        )
        result[key] = {"agree": agree, "sftlens": k_ours, "lm_eval": k_theirs}
    for what, key in (("end to end", "seconds"), ("generation", "generation_seconds")):
        ratio = theirs[key] / ours[key]
        print(
            f"{what:<11} wall time: lm-eval {theirs[key]:.1f} s, sftlens {ours[key]:.1f} s "
            f"(lm-eval / sftlens = {ratio:.2f}x)"
        )
        result[key] = {"lm_eval": theirs[key], "sftlens": ours[key], "ratio": ratio}
    for i in ids:  # show disagreements, if any, so they can be read
        o, t = ours["per_example"][i], theirs["per_example"][i]
        if o["completion"] != t["completion"]:
            print(f"--- problem {i}\nsftlens: {o['completion']!r}\nlm-eval: {t['completion']!r}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
