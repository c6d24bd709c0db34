"""Preference pairs for ``sftlens dpo``: the gold worked answer against the model's own wrong one.

1. Every train problem is prompted exactly as ``sftlens sft`` trains it
   (:func:`sftlens.data.prompts.format_prompt`: ``Question: ...\\nAnswer:`` or the chat
   template) and answered ``k`` times by the batched engine of ``sftlens eval``
   (:mod:`sftlens.evaluation.generate`) with seeded sampling: sample ``j`` of problem ``i`` draws
   with a generator seeded from ``(seed, (i, j))``, so it is the same whatever the batch size
   and after a resume. It stops where an eval answer stops (EOS, ``Question:``, the chat
   end-of-turn, ``--max-new-tokens``).
2. Each sample is scored by the project's GSM8K scorer (:mod:`sftlens.evaluation.scoring`):
   ``strict`` (first ``#### N``) and ``flexible`` (last number), compared as numbers. A sample
   is WRONG only when it is wrong under both; a sample right under either is never rejected.
3. Pair: ``prompt``, ``chosen`` = the gold solution as SFT's target (`` {solution}``),
   ``rejected`` = the first wrong sample (trailing whitespace dropped, the text that was scored).
   Problems with no wrong sample among the ``k`` are skipped and counted.

``samples.jsonl`` (one record per problem: every sample with its verdicts) is written as
batches finish, fsynced; ``.samples.json`` holds the hash of what decides the samples and one
hash per problem, so an interrupted run resumes and a rerun with the same inputs samples
nothing (the resume rule of ``sftlens eval``'s predictions). ``pairs.jsonl`` is rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftlens.data.gsm8k import Example
from sftlens.data.prompts import format_target
from sftlens.evaluation.evaluate import (
    append_records,
    jsonl_line,
    problem_hashes,
    reusable_predictions,
    score_completion,
)
from sftlens.io import atomic_write_text, config_hash

log = logging.getLogger("sftlens.dpo")

Record = dict[str, Any]
FILTERS = ("strict", "flexible")
SAMPLES = "samples.jsonl"
PAIRS = "pairs.jsonl"


def score_sample(text: str, gold: str) -> Record:
    """The sample's extracted answers and verdicts, and ``wrong``: wrong under BOTH filters.

    >>> score_sample("so 1,234 apples\\n#### 1,234", "1234")["wrong"]
    False
    >>> score_sample("#### 17. Then it is $18.00", "18")["wrong"]  # strict wrong, flexible right
    False
    >>> s = score_sample("#### 17", "18"); s["strict"], s["wrong"]
    ('17', True)
    >>> score_sample("no number here", "18")["wrong"]
    True
    """
    verdict = score_completion(text, gold, FILTERS)
    verdict["wrong"] = not any(verdict[f"{name}_correct"] for name in FILTERS)
    return verdict


def make_pair(
    index: int, example: Example, prompt: str, completions: Sequence[str]
) -> Record | None:
    """The pair of one problem: the gold solution against the first wrong completion, or None
    when every completion is right (under strict or flexible scoring).

    >>> ex = Example("2 + 2?", "2 + 2 = 4\\n#### 4")
    >>> make_pair(0, ex, "Question: 2 + 2?\\nAnswer:", [" #### 4", " 5 \\n"])["rejected"]
    ' 5'
    >>> make_pair(0, ex, "Q", [" #### 4", " it is 4."]) is None
    True
    """
    gold = example.final_answer
    wrong = []
    for j, text in enumerate(completions):
        rejected = text.rstrip()
        verdict = score_sample(rejected, gold)
        if verdict["wrong"]:
            wrong.append((j, rejected, verdict))
    if not wrong:
        return None
    j, rejected, verdict = wrong[0]
    return {
        "id": index,
        "prompt": prompt,
        "chosen": format_target(example.answer),
        "rejected": rejected,
        "gold": gold,
        "sample": j,
        "wrong_samples": len(wrong),
        "samples": len(completions),
        **{f"rejected_{k}": v for k, v in verdict.items() if k != "wrong"},
    }


def build_pairs(
    examples: Sequence[Example], prompts: Sequence[str], records: Sequence[Record]
) -> tuple[list[Record], int]:
    """(pairs in problem order, number of problems skipped for want of a wrong sample) from
    ``samples.jsonl`` records (``{"id", "samples": [{"completion", ...}]}``)."""
    pairs: list[Record] = []
    skipped = 0
    for rec in sorted(records, key=lambda r: r["id"]):
        i = rec["id"]
        pair = make_pair(i, examples[i], prompts[i], [s["completion"] for s in rec["samples"]])
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    return pairs, skipped


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """What decides the samples: the problems, their prompts, the sampling and stopping."""

    examples: list[Example]
    prompts: list[str]
    ids: list[list[int]]
    k: int
    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    stop_ids: frozenset[int]

    def key(self, model_files: Any, dtype: str) -> str:
        """Hash of everything but the problem set (a stored problem is reused under it)."""
        return config_hash(
            {
                "version": 1,
                "model_files": model_files,
                "dtype": dtype,
                "k": self.k,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
                "max_new_tokens": self.max_new_tokens,
                "stops": {"strings": list(self.stop_strings), "ids": sorted(self.stop_ids)},
            }
        )

    def problem_hashes(self) -> list[str]:
        return problem_hashes(self.examples, self.ids)


def collect_samples(
    out: Path,
    job: SampleJob,
    key: str,
    load_model: Callable[[], Any],
    tok: Any,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[Record], dict[str, float]]:
    """Every problem's ``k`` scored samples (resumable, see the module doc) and timings
    (``seconds``, ``new_tokens`` generated this run). ``load_model`` is called only when some
    problem still needs sampling."""
    from sftlens.evaluation.generate import Sampling, StopRule, generate, shared_prefix

    path, state = out / SAMPLES, out / ".samples.json"
    done = reusable_predictions(path, state, key, job.problem_hashes())
    n = len(job.examples)
    stats = {"seconds": 0.0, "new_tokens": 0.0}
    if done:
        log.info("reusing the samples of %d of %d problems in %s", len(done), n, path.name)
    todo = sorted(set(range(n)) - {r["id"] for r in done})
    if todo:
        t0 = time.perf_counter()
        model = load_model()
        rule = StopRule(
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            stop_strings=job.stop_strings,
            eos_ids=job.stop_ids,
            max_new_tokens=job.max_new_tokens,
        )
        sampling = Sampling(temperature=job.temperature, top_p=job.top_p, seed=job.seed)
        longest = max(len(x) for x in job.ids) + job.max_new_tokens
        prefix = shared_prefix(model, job.ids, longest=longest)  # over ALL prompts, as eval
        items = [((i, j), job.ids[i]) for i in todo for j in range(job.k)]
        pending: dict[int, dict[int, Any]] = {}
        bar = tqdm(
            total=n, initial=n - len(todo), desc="dpo samples", unit="problem", disable=not progress
        )
        with bar:
            for batch in generate(
                model,
                items,
                rule,
                pad_id=tok.pad_token_id,
                batch_size=batch_size,
                prefix=prefix,
                sampling=sampling,
            ):
                finished = []
                for (i, j), gen in batch:
                    pending.setdefault(i, {})[j] = gen
                    stats["new_tokens"] += len(gen.tokens)
                    if len(pending[i]) == job.k:
                        finished.append(_record(i, job.examples[i], pending.pop(i)))
                if finished:
                    append_records(path, finished)
                    done += finished
                    bar.update(len(finished))
        stats["seconds"] = time.perf_counter() - t0
    done.sort(key=lambda r: r["id"])
    atomic_write_text(path, "".join(jsonl_line(r) for r in done))
    return done, stats


def _record(i: int, example: Example, gens: dict[int, Any]) -> Record:
    samples = []
    for j in sorted(gens):
        g = gens[j]
        verdict = score_sample(g.text.rstrip(), example.final_answer)
        samples.append(
            {"completion": g.text, "stop": g.reason, "new_tokens": len(g.tokens), **verdict}
        )
    return {"id": i, "question": example.question, "gold": example.final_answer, "samples": samples}


def write_pairs(out: Path, pairs: Sequence[Record]) -> Path:
    """``pairs.jsonl``, written atomically."""
    path = out / PAIRS
    atomic_write_text(path, "".join(jsonl_line(p) for p in pairs))
    return path
