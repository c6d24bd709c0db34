"""``sftlens eval``: GSM8K accuracy (strict and flexible) and teacher-forced answer scores.

The flow, top to bottom:

1. Resolve MODEL (and ``--adapter``), the test problems and the k exemplars; build the
   :class:`~sftlens.evaluation.task.GSM8KTask` and every prompt's token ids.
2. Hash what decides the results (checkpoint and adapter files, task, exemplars, problems,
   prompt token ids, dtype) into the run's ``eval_{role}`` step: a finished step with the same
   hash is not run again.
3. Generate greedily in batches (:mod:`sftlens.evaluation.generate`: left padding, one shared
   prefix KV cache, finished rows leave the batch), score each completion with both answer
   filters and, on the same prompts, the gold solution teacher-forced
   (:func:`~sftlens.evaluation.teacher_forced.answer_scores`).
4. Append each finished batch to ``predictions_{role}.jsonl`` (flushed and fsynced). Each
   record is reusable per problem: ``.predictions_{role}.json`` keeps the hash of everything
   but the problem set (model, task, exemplars, options) and one hash per problem, so a rerun
   skips the problems already there whose hash is unchanged: an interrupted run resumes, a
   larger ``--limit`` generates only the new problems, a smaller one reuses its subset. At the
   end the file is rewritten in problem order, identical to an uninterrupted run's.
5. Write ``metrics.csv`` rows (model column ``role``: ``base`` by default), counts and 95%
   intervals in ``summary.json`` under ``eval.{role}``, and the report section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftlens.config import EvalConfig, InterpolateConfig, SwapConfig
from sftlens.data.gsm8k import Example
from sftlens.errors import SftlensError
from sftlens.evaluation.scoring import Accuracy, answers_match
from sftlens.evaluation.task import ANSWER_FILTERS, GSM8KTask
from sftlens.io import atomic_write_json, atomic_write_text, config_hash, read_json, sha256_file

log = logging.getLogger("sftlens.evaluation")

Record = dict[str, Any]
METRICS = {"strict": "gsm8k_strict", "flexible": "gsm8k_flexible"}
_HASHED = ("dtype", "teacher_forced")  # config fields that enter the step hash as they are


# -- inputs ---------------------------------------------------------------------------------


def task_from_config(cfg: EvalConfig | SwapConfig | InterpolateConfig) -> GSM8KTask:
    """The task a config's shared generation options (``shots``, ``chat``, ...) describe."""
    return GSM8KTask(
        shots=cfg.shots,
        prompt_format="chat" if cfg.chat else "qa",
        max_new_tokens=cfg.max_new_tokens,
    )


def load_exemplars(data: str, fewshot_data: str | None, task: GSM8KTask) -> list[Example]:
    """The first ``task.shots`` problems of the few-shot source's train split, in file order.

    The source is ``fewshot_data``, or ``data`` when that is None.
    """
    from sftlens.data import resolve_dataset

    if task.shots == 0:
        return []
    spec = fewshot_data if fewshot_data is not None else data
    if fewshot_data is None and Path(spec).expanduser().is_file():
        raise SftlensError(
            f"--data {spec} is a single file, so it has no {task.fewshot_split} split for the "
            "exemplars; pass --fewshot-data (a train .jsonl or a folder holding "
            f"{task.fewshot_split}.jsonl), or --shots 0"
        )
    exemplars = resolve_dataset(spec, split=task.fewshot_split, limit=task.shots)
    if len(exemplars) < task.shots:
        raise SftlensError(
            f"--shots {task.shots} needs {task.shots} exemplars but {spec} "
            f"({task.fewshot_split}) holds only {len(exemplars)}; lower --shots or pass a "
            "larger --fewshot-data"
        )
    return exemplars


def check_adapter(folder: str | None, allow_pickle: bool) -> Path | None:
    """The adapter folder, checked to hold a PEFT adapter (safetensors unless allowed)."""
    if folder is None:
        return None
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SftlensError(
            f"adapter folder {path} does not exist; pass a folder written by PEFT's "
            "save_pretrained (adapter_config.json + adapter_model.safetensors)"
        )
    if not (path / "adapter_config.json").is_file():
        raise SftlensError(
            f"{path} has no adapter_config.json; pass a folder written by PEFT's save_pretrained"
        )
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").is_file() and not allow_pickle:
            raise SftlensError(
                f"{path} holds only a pickle adapter (adapter_model.bin); convert it to "
                "safetensors or pass --allow-pickle if you trust the file"
            )
        if not (path / "adapter_model.bin").is_file():
            raise SftlensError(
                f"{path} has adapter_config.json but no adapter_model.safetensors; copy the "
                "adapter weights into the folder"
            )
    return path


def load_adapter(model: Any, folder: Path) -> Any:
    """``model`` with the PEFT adapter in ``folder`` on top, in eval mode (not merged)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise SftlensError(
            "--adapter needs the 'peft' package; pip install 'sftlens[tune]'"
        ) from None
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated attribute
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or ["no message"])[0][:160]
        raise SftlensError(
            f"could not load the adapter in {folder} onto the model ({type(exc).__name__}: "
            f"{first}); check that it was trained on this MODEL"
        ) from None
    wrapped.eval()
    return wrapped


def _adapter_fingerprint(folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.glob("adapter_*") if p.is_file())
    return {
        "path": str(folder.resolve()),
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files},
    }


def load_tokenizer(folder: Path) -> Any:
    """MODEL's tokenizer, as :func:`sftlens.models.loading.load_model` sets it up."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tok: Any, text: str) -> list[int]:
    """A whole prompt's ids, special tokens as :func:`sftlens.tuning.sft.encode_example` adds."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _context_length(config: Any) -> int | None:
    cfg = getattr(config, "get_text_config", lambda: config)()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


@dataclasses.dataclass(frozen=True)
class Problems:
    """The scored problems of one GSM8K evaluation, with their prompts as the model reads them.

    ``prompts[i]`` / ``ids[i]`` are the prompt text and token ids of ``examples[i]``.
    """

    task: GSM8KTask
    examples: list[Example]
    exemplars: list[Example]
    prompts: list[str]
    ids: list[list[int]]
    stop_strings: tuple[str, ...]
    stop_ids: frozenset[int]

    def shared_inputs(self) -> Record:
        """What decides every problem's record other than the problem itself."""
        return {
            "task": self.task.to_dict(),
            "exemplars": config_hash([dataclasses.asdict(e) for e in self.exemplars]),
            "stops": {"strings": list(self.stop_strings), "ids": sorted(self.stop_ids)},
        }

    def inputs(self) -> Record:
        """:meth:`shared_inputs` plus the whole problem set (what a finished step hashes)."""
        return {
            "task": self.task.to_dict(),
            "exemplars": self.shared_inputs()["exemplars"],
            "problems": config_hash([dataclasses.asdict(e) for e in self.examples]),
            "prompt_ids": config_hash(self.ids),
            "stops": self.shared_inputs()["stops"],
        }

    def problem_hashes(self) -> list[str]:
        """Per problem: a hash of the problem and its prompt ids (a stored record is reused for
        problem ``i`` only while its hash, and :meth:`shared_inputs`, are unchanged)."""
        return problem_hashes(self.examples, self.ids)


def problem_hashes(examples: Sequence[Example], ids: Sequence[Sequence[int]]) -> list[str]:
    """One hash per problem of the problem and its prompt ids (the per-record key of
    :func:`reusable_predictions`)."""
    return [config_hash([dataclasses.asdict(e), x]) for e, x in zip(examples, ids)]


def load_problems(
    tok: Any,
    task: GSM8KTask,
    *,
    data: str,
    split: str,
    limit: int | None,
    fewshot_data: str | None = None,
) -> Problems:
    """The first ``limit`` problems (None: all) of ``data``'s ``split``, prompted by ``task``."""
    from sftlens.data import resolve_dataset

    examples = resolve_dataset(data, split=split, limit=limit)
    exemplars = load_exemplars(data, fewshot_data, task)
    if split == task.fewshot_split and exemplars and fewshot_data is None:
        log.warning("scoring the %s split, which also gives the exemplars", split)
    prompts = [task.prompt(tok, exemplars, e.question) for e in examples]
    stop_strings, stop_ids = task.resolved_stops(tok)
    return Problems(
        task=task,
        examples=list(examples),
        exemplars=exemplars,
        prompts=prompts,
        ids=[encode_prompt(tok, p) for p in prompts],
        stop_strings=stop_strings,
        stop_ids=stop_ids,
    )


def gsm8k_scores(
    model: Any, tok: Any, problems: Problems, *, batch_size: int = 16, prefix_cache: bool = True
) -> Record:
    """Greedy GSM8K accuracy of a loaded model on ``problems``: :func:`summarize`'s summary
    (``problems``, ``gsm8k_strict`` / ``gsm8k_flexible`` with count, accuracy and 95% interval,
    ``stops``, ``new_tokens``), by the same batched engine as ``sftlens eval`` (no teacher
    forcing, no files)."""
    records = [
        r
        for batch in evaluate_batches(
            model,
            tok,
            problems.task,
            problems.examples,
            problems.ids,
            prompts=problems.prompts,
            batch_size=batch_size,
            prefix_cache=prefix_cache,
            teacher_forced=False,
        )
        for r in batch
    ]
    return summarize(records, problems.task)[0]


# -- the work: generation, scores, teacher forcing -----------------------------------------


def score_completion(text: str, gold: str, filters: Sequence[str]) -> Record:
    """Each named filter's extracted answer and whether it matches ``gold``."""
    out: Record = {}
    for name in filters:
        out[name] = ANSWER_FILTERS[name][0](text)
    for name in filters:
        out[f"{name}_correct"] = answers_match(out[name], gold)
    return out


def evaluate_batches(
    model: Any,
    tok: Any,
    task: GSM8KTask,
    examples: Sequence[Example],
    prompt_ids: Sequence[Sequence[int]],
    *,
    prompts: Sequence[str],
    skip: set[int] | frozenset[int] = frozenset(),
    batch_size: int = 16,
    prefix_cache: bool = True,
    teacher_forced: bool = True,
) -> Iterator[list[Record]]:
    """One prediction record per problem, yielded a finished batch at a time.

    ``prompt_ids[i]`` are the ids of ``prompts[i]`` (the prompt of ``examples[i]``); problems
    whose index is in ``skip`` are left out. The shared prefix is taken over ALL prompts, so a
    resumed run batches and caches exactly as an uninterrupted one; generation and the
    teacher-forced pass both start from its KV cache.
    """
    from sftlens.evaluation.generate import StopRule, generate, shared_prefix
    from sftlens.evaluation.teacher_forced import answer_scores

    stop_strings, stop_ids = task.resolved_stops(tok)
    rule = StopRule(
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        stop_strings=stop_strings,
        eos_ids=stop_ids,
        max_new_tokens=task.max_new_tokens,
    )
    items = [(i, prompt_ids[i]) for i in range(len(examples)) if i not in skip]
    targets = [task.target(e.answer) for e in examples]
    prefix = None
    if prefix_cache and items:
        longest = max(len(x) for x in prompt_ids) + task.max_new_tokens
        if teacher_forced:  # prompt + answer + EOS
            longest = max(
                longest,
                *(
                    len(x) + len(tok(t, add_special_tokens=False)["input_ids"]) + 1
                    for x, t in zip(prompt_ids, targets)
                ),
            )
        prefix = shared_prefix(model, prompt_ids, longest=longest)
    for batch in generate(
        model, items, rule, pad_id=tok.pad_token_id, batch_size=batch_size, prefix=prefix
    ):
        idx = [i for i, _ in batch]
        tf = None
        if teacher_forced:
            tf = answer_scores(
                model,
                tok,
                [prompts[i] for i in idx],
                [targets[i] for i in idx],
                batch_size=min(batch_size, 8),
                max_length=1 << 30,  # never truncate: the context was checked up front
                prefix=prefix,
            )
        records = []
        for row, (i, gen) in enumerate(batch):
            ex = examples[i]
            rec: Record = {
                "id": i,
                "question": ex.question,
                "gold": ex.final_answer,
                "completion": gen.text,
                "stop": gen.reason,
                "new_tokens": len(gen.tokens),
                **score_completion(gen.text, ex.final_answer, task.filters),
            }
            if tf is not None:
                pe = tf.per_example[row]
                rec["answer_tokens"] = int(pe["tokens"])
                rec["answer_nll_sum"] = float(pe["nll_sum"])
                rec["answer_correct_tokens"] = int(pe["correct"])
                rec["answer_nll"] = pe["nll_sum"] / pe["tokens"] if pe["tokens"] else None
            records.append(rec)
        yield records


def summarize(records: Sequence[Record], task: GSM8KTask) -> tuple[Record, list[Record]]:
    """(summary, whole-model metric rows without the model column) from all records."""
    records = sorted(records, key=lambda r: r["id"])
    summary: Record = {"problems": len(records)}
    rows: list[Record] = []
    for name in task.filters:
        acc = Accuracy.from_flags(r[f"{name}_correct"] for r in records)
        lo, hi = acc.interval
        summary[METRICS[name]] = {
            "correct": acc.correct,
            "total": acc.total,
            "accuracy": acc.value,
            "ci95": [lo, hi],
            "text": str(acc),
        }
        rows.append({"layer": None, "metric": METRICS[name], "value": acc.value})
    if records and "answer_tokens" in records[0]:
        tokens = sum(r["answer_tokens"] for r in records)
        nll = sum(r["answer_nll_sum"] for r in records)
        hits = sum(r["answer_correct_tokens"] for r in records)
        summary["answer_tokens"] = tokens
        summary["answer_nll"] = nll / tokens if tokens else float("nan")
        summary["answer_token_acc"] = hits / tokens if tokens else float("nan")
        rows += [
            {"layer": None, "metric": "answer_nll", "value": summary["answer_nll"]},
            {"layer": None, "metric": "answer_token_acc", "value": summary["answer_token_acc"]},
        ]
    stops: dict[str, int] = {}
    for r in records:
        stops[r["stop"]] = stops.get(r["stop"], 0) + 1
    summary["stops"] = dict(sorted(stops.items()))
    summary["new_tokens"] = sum(r["new_tokens"] for r in records)
    return summary, rows


# -- predictions file: durable appends, resume ---------------------------------------------


def predictions_path(run: Path, role: str) -> Path:
    return run / f"predictions_{role}.jsonl"


def _state_path(run: Path, role: str) -> Path:
    return run / f".predictions_{role}.json"


def read_predictions(path: Path, repair: bool = True) -> list[Record]:
    """The complete records in ``path``; a torn last line (a crash mid-write) is dropped.

    With ``repair`` the file is rewritten without that line, so appends continue cleanly.
    """
    if not path.is_file():
        return []
    records: list[Record] = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for n, line in enumerate(lines):
        try:
            if not line.endswith("\n"):
                raise ValueError("torn line")
            records.append(json.loads(line))
        except ValueError:
            if n != len(lines) - 1:
                raise SftlensError(
                    f"{path}:{n + 1} is not a JSON line; delete the file to evaluate from scratch"
                ) from None
            if repair:
                log.warning("%s: dropping a torn last line (interrupted mid-write)", path)
                atomic_write_text(path, "".join(lines[:-1]))
    return records


def jsonl_line(rec: Record) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def append_records(path: Path, records: Sequence[Record]) -> None:
    """Append ``records`` as one write, flushed and fsynced (a crash loses at most this batch)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(jsonl_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


# -- the command -----------------------------------------------------------------------------


def run_eval(cfg: EvalConfig) -> Path:
    """Evaluate ``cfg.model`` on GSM8K into the run folder ``cfg.out``; returns its path."""
    from sftlens.models.loading import resolve_model
    from sftlens.reporting.build import build_report
    from sftlens.run import RunFolder, fingerprint

    model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    adapter_dir = check_adapter(cfg.adapter, cfg.allow_pickle)
    task = task_from_config(cfg)
    tok = load_tokenizer(model_dir)
    problems = load_problems(
        tok,
        task,
        data=cfg.data,
        split=cfg.split,
        limit=cfg.limit or None,
        fewshot_data=cfg.fewshot_data,
    )
    check_context(model_dir, tok, problems, cfg.teacher_forced)
    examples, prompts, ids = problems.examples, problems.prompts, problems.ids

    run = RunFolder(cfg.out)
    prints: dict[str, Any] = {"model": fingerprint(model_dir)}
    if adapter_dir is not None:
        prints["adapter"] = _adapter_fingerprint(adapter_dir)
    run.save_config(
        models={**run.state.get("models", {}), cfg.role: cfg.model},
        **{f"eval_{cfg.role}": {**dataclasses.asdict(cfg), "fingerprints": prints}},
    )
    fingerprints = {k: v["files"] for k, v in prints.items()}
    config = {k: getattr(cfg, k) for k in _HASHED}
    inputs = {"fingerprints": fingerprints, **problems.inputs(), "config": config}
    # a stored record is reused under the same model, task, exemplars and options when its own
    # problem (and prompt) is unchanged, whatever the other problems are (--limit may change)
    key = config_hash({"fingerprints": fingerprints, **problems.shared_inputs(), "config": config})

    def compute() -> list[Record]:
        from sftlens.models.loading import load_model

        t0 = time.perf_counter()
        path, state = predictions_path(run.path, cfg.role), _state_path(run.path, cfg.role)
        done = reusable_predictions(path, state, key, problems.problem_hashes())
        if done:
            log.info("reusing %d of %d problems already in %s", len(done), len(ids), path.name)
        if len(done) < len(ids):
            model, _ = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
            if adapter_dir is not None:
                model = load_adapter(model, adapter_dir)
            bar = tqdm(
                total=len(ids),
                initial=len(done),
                desc=f"eval {cfg.role}",
                unit="problem",
                disable=not cfg.progress,
            )
            with bar:
                for records in evaluate_batches(
                    model,
                    tok,
                    task,
                    examples,
                    ids,
                    prompts=prompts,
                    skip={r["id"] for r in done},
                    batch_size=cfg.batch_size,
                    prefix_cache=cfg.prefix_cache,
                    teacher_forced=cfg.teacher_forced,
                ):
                    append_records(path, records)
                    done += records
                    bar.update(len(records))
        done.sort(key=lambda r: r["id"])
        atomic_write_text(path, "".join(jsonl_line(r) for r in done))
        summary, rows = summarize(done, task)
        summary = {
            "model": cfg.model,
            "adapter": cfg.adapter,
            "split": cfg.split,
            "shots": task.shots,
            "prompt_format": task.prompt_format,
            "task_hash": task.hash(),
            **summary,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        run.write_summary({"eval": {**run.summary().get("eval", {}), cfg.role: summary}})
        return [{"model": cfg.role, **r} for r in rows]

    run.step(f"eval_{cfg.role}", inputs, compute)
    build_report(run.path)
    return run.path


def reusable_predictions(path: Path, state: Path, key: str, hashes: Sequence[str]) -> list[Record]:
    """The records in ``path`` that hold for the problems ``hashes`` under ``key``; the files
    are left holding exactly those, and ``state`` the new key and hashes, ready for appends.

    ``state`` records the key and the per-problem hashes that the records in ``path`` were
    computed under; record ``id`` is kept when the key is the same and problem ``id`` still has
    the hash it had, so an interrupted run resumes and a changed ``--limit`` reuses the
    problems both runs share (a smaller one: the subset; a larger one: all, the rest is new).
    """
    old = read_json(state) if state.is_file() else {}
    done: list[Record] = []
    if old.get("key") == key:
        before = old.get("problems", [])
        done = [
            r
            for r in read_predictions(path)
            if r["id"] < min(len(hashes), len(before)) and before[r["id"]] == hashes[r["id"]]
        ]
    # first the file (its records hold under both states), then the state
    atomic_write_text(path, "".join(jsonl_line(r) for r in done))
    atomic_write_json(state, {"key": key, "problems": list(hashes)})
    return done


def check_generation_fits(
    model_dir: Path, ids: Sequence[Sequence[int]], max_new_tokens: int, fix: str
) -> int | None:
    """Refuse prompts that, plus ``max_new_tokens``, exceed the model's context (``fix`` ends
    the message); returns the context length (None: unknown, or no prompts)."""
    from transformers import AutoConfig

    limit = _context_length(AutoConfig.from_pretrained(model_dir))
    if limit is None or not ids:
        return None
    longest = max(len(x) for x in ids)
    if longest + max_new_tokens > limit:
        raise SftlensError(
            f"the longest prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} "
            f"exceeds the model's context of {limit} tokens; {fix}"
        )
    return limit


def check_context(model_dir: Path, tok: Any, problems: Problems, teacher_forced: bool) -> None:
    """Refuse prompts (plus new tokens, or plus gold answers) longer than the model's context."""
    task, ids, examples = problems.task, problems.ids, problems.examples
    limit = check_generation_fits(
        model_dir, ids, task.max_new_tokens, fix="lower --max-new-tokens or --shots"
    )
    if limit is None:
        return
    if teacher_forced:
        extra = 1 if tok.eos_token_id is not None else 0
        need = max(
            len(x) + len(tok(task.target(e.answer), add_special_tokens=False)["input_ids"]) + extra
            for x, e in zip(ids, examples)
        )
        if need > limit:
            raise SftlensError(
                f"a prompt plus its gold answer takes {need} tokens, more than the model's "
                f"context of {limit}; lower --shots or pass --no-teacher-forced"
            )


# -- report ----------------------------------------------------------------------------------


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of this experiment's report section, or None when the run has no such files."""
    from sftlens.reporting.html import esc, kv_table

    evals = summary.get("eval")
    if not isinstance(evals, dict) or not evals:
        return None
    body = (
        "<p>Greedy generation, scored two ways: <b>strict</b> reads the first "
        "<code>#### N</code>, <b>flexible</b> the last number; 95% Wilson intervals. "
        "<code>answer_nll</code> / <code>answer_token_acc</code>: the gold solution "
        "teacher-forced after the same prompt (nats per token, top-1 token accuracy).</p>"
    )
    for role in ("base", "sft"):
        s = evals.get(role)
        if not isinstance(s, dict):
            continue
        items: list[tuple[str, Any]] = [
            ("model", s.get("model")),
            ("adapter", s.get("adapter") or "none"),
            ("problems", f"{s.get('problems')} ({s.get('split')} split)"),
            ("prompt", f"{s.get('shots')}-shot, {s.get('prompt_format')} format"),
        ]
        for metric in METRICS.values():
            if isinstance(s.get(metric), dict):
                items.append((metric, s[metric].get("text")))
        for metric in ("answer_nll", "answer_token_acc"):
            if metric in s:
                items.append((metric, s[metric]))
        items += [("stops", ", ".join(f"{k}: {v}" for k, v in s.get("stops", {}).items()))]
        items += [("task hash", s.get("task_hash")), ("seconds", s.get("seconds"))]
        body += f"<h3>{esc(role)}</h3>" + kv_table(items)
        body += _examples_html(predictions_path(run, role))
    return "GSM8K evaluation", body


def _examples_html(path: Path, n: int = 3) -> str:
    """The first ``n`` problems of a predictions file: question, completion, verdicts, escaped."""
    from sftlens.reporting.html import esc, fmt

    if not path.is_file():
        return ""
    try:
        records = read_predictions(path, repair=False)[:n]
    except SftlensError:
        return ""
    out = ""
    for r in records:
        verdicts = ", ".join(
            f"{name} {esc(r.get(name))} ({'right' if r.get(f'{name}_correct') else 'wrong'})"
            for name in METRICS
            if name in r
        )
        out += (
            f"<p class=note>problem {esc(r.get('id'))}: {esc(str(r.get('question', ''))[:300])}</p>"
            f"<pre>{esc(r.get('completion', ''))}</pre>"
            f"<p class=note>gold {esc(r.get('gold'))}; {verdicts}; "
            f"answer nll {fmt(r.get('answer_nll'))}</p>"
        )
    return f"<h4>Example completions</h4>{out}" if out else ""
