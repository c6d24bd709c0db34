"""The samples behind ``sftlens dpo``'s pairs (:func:`sftlens.tuning.preference.collect_samples`):
sample ``j`` of problem ``i`` is that problem's own seeded draw, whatever the batching; samples
stop as an eval answer stops; ``samples.jsonl`` records every completion with its verdicts; a
rerun under the same key samples nothing, a changed key samples again. A tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval_helpers import record_generated_batches, tiny_lm
from sftlens.data.gsm8k import Example
from sftlens.evaluation.generate import Sampling, StopRule, generate_batch
from sftlens.io import read_json
from sftlens.tuning import preference
from sftlens.tuning.preference import SampleJob, collect_samples
from tiny_models import tiny_tokenizer

QUESTIONS = ["how many w1 w2 ?", "the w3 is 4 + 5 ?", "how many w7 of the w8 w9 w10 ?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama whose continuations depend on the prompt (large init range)."""
    return tiny_lm("llama")


def make_job(tok, questions=QUESTIONS, **kw) -> SampleJob:
    examples = [Example(q, f"w1 = {a}\n#### {a}") for a, q in enumerate(questions)]
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    opts: dict = dict(
        k=3,
        temperature=0.7,
        top_p=0.9,
        seed=5,
        max_new_tokens=5,
        stop_strings=(),
        stop_ids=frozenset({1}),
    )
    opts.update(kw)
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    return SampleJob(examples=examples, prompts=prompts, ids=ids, **opts)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def drawn_alone(lm, tok, job: SampleJob) -> list[list[tuple[str, str, int]]]:
    """Each sample drawn alone (no batch, no shared prefix) with the generator seeded from
    (seed, (i, j)) at the job's temperature and top-p: (completion, stop, new tokens)."""
    sampling = Sampling(temperature=job.temperature, top_p=job.top_p, seed=job.seed)
    rule = StopRule(
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        stop_strings=job.stop_strings,
        eos_ids=job.stop_ids,
        max_new_tokens=job.max_new_tokens,
    )
    out = []
    for i, ids in enumerate(job.ids):
        gens = [
            generate_batch(
                lm,
                [ids],
                rule,
                pad_id=tok.pad_token_id,
                sampling=sampling,
                seeds=[sampling.row_seed((i, j))],
            )[0]
            for j in range(job.k)
        ]
        out.append([(g.text, g.reason, len(g.tokens)) for g in gens])
    return out


def _samples(records: list[dict]) -> list[list[tuple[str, str, int]]]:
    return [[(s["completion"], s["stop"], s["new_tokens"]) for s in r["samples"]] for r in records]


def test_sample_j_of_problem_i_is_its_own_seeded_draw(lm, tok, tmp_path, monkeypatch):
    batches = record_generated_batches(monkeypatch)
    job = make_job(tok)  # temperature 0.7, top-p 0.9, seed 5
    records, _ = collect_samples(
        tmp_path, job, "key", lambda: lm, tok, batch_size=4, progress=False
    )
    assert [len(b) for b in batches] == [4, 4, 1]  # 3 problems x 3 samples, 4 at a time
    assert [r["id"] for r in records] == [0, 1, 2]
    assert _samples(records) == drawn_alone(lm, tok, job)
    # sampled, not greedy: some problem's samples differ
    assert any(len({s["completion"] for s in r["samples"]}) > 1 for r in records)
    assert _jsonl(tmp_path / "samples.jsonl") == records


def test_a_sliding_window_model_samples_as_each_prompt_alone(tok, tmp_path):
    """Prompt plus new tokens outgrow the attention window of 8 (7 and 13 prompt tokens, 6
    new): a shared-prefix cache would put padding inside the short prompt's window, so none is
    used and every sample is still its prompt's own seeded draw."""
    lm = tiny_lm("mistral")  # sliding_window=8
    job = make_job(tok, ["w1 ?", "how many w7 of the w8 ?"], max_new_tokens=6)
    assert sorted(len(x) for x in job.ids) == [7, 13]
    records, _ = collect_samples(tmp_path, job, "key", lambda: lm, tok, progress=False)
    assert _samples(records) == drawn_alone(lm, tok, job)


def test_samples_stop_as_an_eval_answer_stops_and_hold_no_special_tokens(lm, tmp_path, monkeypatch):
    batches = record_generated_batches(monkeypatch)
    tok = tiny_tokenizer()  # with 30 common words made special: skipped when decoded
    tok.add_special_tokens({"additional_special_tokens": [f"w{i}" for i in range(20, 50)]})
    eos = {1, *tok.convert_tokens_to_ids([f"w{i}" for i in range(50, 60)])}
    job = make_job(
        tok,
        k=4,
        temperature=3.0,
        top_p=1.0,
        max_new_tokens=6,
        stop_strings=("w6",),
        stop_ids=frozenset(eos),
    )
    records, _ = collect_samples(tmp_path, job, "key", lambda: lm, tok, progress=False)
    samples = [s for r in records for s in r["samples"]]
    assert {s["stop"] for s in samples} == {"eos", "stop_string", "length"}
    for s in samples:
        assert "w6" not in s["completion"] and s["new_tokens"] <= 6
        assert s["new_tokens"] == 6 or s["stop"] != "length"
    # special tokens were drawn, yet no completion shows one
    specials = set(tok.all_special_ids) - eos
    assert any(specials & set(g.tokens) for batch in batches for _, g in batch)
    assert not any(re.search(r"<(pad|unk)>|\bw[234][0-9]\b", s["completion"]) for s in samples)


def test_a_rerun_reuses_the_samples_under_the_same_key_only(lm, tok, tmp_path, monkeypatch):
    clock = iter([100.0, 102.5, 200.0, 201.0])
    monkeypatch.setattr(preference, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    job = make_job(tok)
    records, stats = collect_samples(tmp_path, job, "key-1", lambda: lm, tok, progress=False)
    lengths = [s["new_tokens"] for r in records for s in r["samples"]]
    assert stats == {"seconds": 2.5, "new_tokens": sum(lengths)}
    assert read_json(tmp_path / ".samples.json") == {
        "key": "key-1",
        "problems": job.problem_hashes(),
    }

    def no_model():
        raise AssertionError("loaded with nothing to sample")

    again, stats = collect_samples(tmp_path, job, "key-1", no_model, tok, progress=False)
    assert again == records and stats == {"seconds": 0.0, "new_tokens": 0.0}

    loads = []

    def load():
        loads.append(1)
        return lm

    _, stats = collect_samples(tmp_path, job, "key-2", load, tok, progress=False)
    assert loads == [1] and stats["seconds"] == 1.0


def test_the_bar_counts_problems_from_those_already_sampled(lm, tok, tmp_path, capsys):
    job = make_job(tok, k=2)
    collect_samples(tmp_path, job, "key", lambda: lm, tok, progress=False)
    assert "dpo samples" not in capsys.readouterr().err
    first = (tmp_path / "samples.jsonl").read_text().splitlines(keepends=True)[0]
    (tmp_path / "samples.jsonl").write_text(first)  # interrupted after problem 0
    collect_samples(tmp_path, job, "key", lambda: lm, tok, batch_size=2, progress=True)
    counts = re.findall(r"dpo samples: .*?\| ?(\d+)/(\d+) ", capsys.readouterr().err)
    assert counts[0] == ("1", "3") and counts[-1] == ("3", "3")


def test_a_problems_record_holds_each_completion_its_stop_length_and_verdicts():
    ex = Example("How much?", "1 + 1 = 2\n#### 2")
    gens = {
        1: SimpleNamespace(text=" #### 3 \n", reason="length", tokens=[5, 6, 7]),
        0: SimpleNamespace(text=" so 2", reason="eos", tokens=[8, 1]),
    }
    assert preference._record(4, ex, gens) == {
        "id": 4,
        "question": "How much?",
        "gold": "2",
        "samples": [
            {
                "completion": " so 2",
                "stop": "eos",
                "new_tokens": 2,
                "strict": None,
                "flexible": "2",
                "strict_correct": False,
                "flexible_correct": True,
                "wrong": False,
            },
            {
                "completion": " #### 3 \n",
                "stop": "length",
                "new_tokens": 3,
                "strict": "3",
                "flexible": "3",
                "strict_correct": False,
                "flexible_correct": False,
                "wrong": True,
            },
        ],
    }


def test_the_samples_key_changes_with_everything_that_decides_a_sample(tok):
    job = make_job(tok)
    keys = {
        job.key({"model.safetensors": "h1"}, "float32"),
        job.key({"model.safetensors": "h2"}, "float32"),
        job.key({"model.safetensors": "h1"}, "bfloat16"),
    }
    changes: list[dict] = [
        dict(k=4),
        dict(temperature=0.8),
        dict(top_p=0.8),
        dict(seed=6),
        dict(max_new_tokens=6),
        dict(stop_strings=("w3",)),
        dict(stop_ids=frozenset({1, 2})),
    ]
    for change in changes:
        keys.add(dataclasses.replace(job, **change).key({"model.safetensors": "h1"}, "float32"))
    assert len(keys) == 3 + len(changes)
    # the problems are not in it (each has its own hash): a stored problem is reused under it
    fewer = dataclasses.replace(job, examples=job.examples[:1], ids=job.ids[:1])
    assert fewer.key({"m": "h"}, "float32") == job.key({"m": "h"}, "float32")
