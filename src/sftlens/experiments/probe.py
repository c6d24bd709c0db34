"""``sftlens probe``: what every layer of BASE and SFT already "says" about the gold answer.

Each problem is encoded as the SFT trainer encodes it (:func:`sftlens.tuning.sft.encode_example`:
prompt, then `` {solution}`` and EOS, labels on the answer only) and fed, teacher-forced, through
both models in the same batch. At every answer position ``t`` (the position whose next token
``t + 1`` is an answer token) the state of every layer ``l`` (``-1`` = embeddings, ``0..L-1``
= raw block outputs from :func:`sftlens.capture.capture`) is read out by a lens
(:mod:`sftlens.experiments.lens`) and scored against the gold next token:

- ``probe_acc``: top-1 accuracy; ``probe_logprob``: mean log-prob of the gold token (nats);
- ``probe_kl``: mean ``KL(final || layer)`` from the model's OWN final distribution to the
  layer's (nats; 0 at the last layer, whose readout is the model's own logits);
- ``probe_agreement`` (``pair``): how often BASE's and SFT's top-1 tokens agree at that layer.

``--lens tuned`` (or ``both``) also fits a tuned lens per model on the TRAIN split first and
writes the same metrics prefixed ``tuned_``. Logits are formed per layer and per chunk of
answer positions and reduced at once into float64 sums, so memory does not grow with the
number of prompts. Padding never counts; left and right padding give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sftlens.capture import Batch, capture, make_batches
from sftlens.config import ProbeConfig
from sftlens.errors import SftlensError
from sftlens.experiments.lens import (
    LogitLens,
    TunedLens,
    Unembed,
    fit_tuned_lens,
    kl_from_final,
)

if TYPE_CHECKING:
    from sftlens.run import RunFolder

log = logging.getLogger("sftlens.probe")
Row = dict[str, Any]

PREFIX = {"logit": "", "tuned": "tuned_"}
MODEL_METRICS = ("probe_acc", "probe_logprob", "probe_kl")
PAIR_METRIC = "probe_agreement"
MODELS = ("base", "sft")
IGNORE = -100


# -- encoding and batches -----------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids per problem and, per position, the gold NEXT token (-100: not an answer token)."""

    ids: list[list[int]]
    gold: list[list[int]]
    truncated: int = 0

    @property
    def answer_tokens(self) -> int:
        return sum(sum(g != IGNORE for g in row) for row in self.gold)


def encode(tok: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> Encoded:
    """Encode (prompt, target) pairs exactly as SFT trains on them; see the module doc."""
    from sftlens.tuning.sft import encode_example

    ids, gold, truncated = [], [], 0
    for prompt, target in pairs:
        full = len(tok(prompt, add_special_tokens=True)["input_ids"]) + len(
            tok(target, add_special_tokens=False)["input_ids"]
        )
        x, labels = encode_example(tok, prompt, target, max_length)
        truncated += full + (tok.eos_token_id is not None) > len(x)
        ids.append(x)
        gold.append([*labels[1:], IGNORE])  # logits at t predict token t + 1
    if truncated:
        log.warning(
            "%d of %d problems were truncated to %d tokens", truncated, len(ids), max_length
        )
    return Encoded(ids, gold, truncated)


def batches(
    enc: Encoded,
    *,
    batch_size: int,
    pad_id: int,
    padding_side: str = "right",
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[Batch, Tensor]]:
    """Padded batches and their ``(B, T)`` gold next tokens (-100 on padding and non-answers).

    Without ``indices``: longest first (little padding; the peak-memory batch comes first).
    """
    order = (
        list(indices)
        if indices is not None
        else sorted(range(len(enc.ids)), key=lambda i: -len(enc.ids[i]))
    )
    for batch in make_batches(
        enc.ids, batch_size=batch_size, pad_id=pad_id, padding_side=padding_side, indices=order
    ):
        gold = torch.full_like(batch.input_ids, IGNORE)
        for row, i in enumerate(batch.index):
            gold[row, batch.attention_mask[row].bool()] = torch.tensor(enc.gold[i])
        yield batch, gold


# -- the streamed reduction ---------------------------------------------------------------------


@dataclass
class ProbeSums:
    """float64 sums over answer positions, per model (base, sft) and layer (-1..L-1).

    The sums stay on the models' device (no host sync per chunk); :meth:`rows` reads them once.
    """

    num_layers: int
    device: torch.device | str = "cpu"
    correct: Tensor = field(init=False)  # (2, L + 1)
    logprob: Tensor = field(init=False)
    kl: Tensor = field(init=False)
    agree: Tensor = field(init=False)  # (L + 1,)
    tokens: int = 0

    def __post_init__(self) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)

        self.correct, self.logprob, self.kl = (zeros(2, self.num_layers + 1) for _ in range(3))
        self.agree = zeros(self.num_layers + 1)

    def update(
        self, layer: int, gold: Tensor, logps: Sequence[Tensor], finals: Sequence[Tensor]
    ) -> None:
        """One chunk at one layer: per model, log-probs ``(n, V)`` and the final log-probs."""
        i = layer + 1
        tops = []
        for m, (logp, final) in enumerate(zip(logps, finals)):
            top = logp.argmax(-1)
            tops.append(top)
            self.correct[m, i] += (top == gold).sum()
            self.logprob[m, i] += logp.gather(-1, gold[:, None]).double().sum()
            if logp is not final:  # the model's own readout has KL 0 by definition
                self.kl[m, i] += kl_from_final(final, logp).double().sum()
        self.agree[i] += (tops[0] == tops[1]).sum()

    def check_finite(self) -> None:
        for m, model in enumerate(MODELS):
            bad = ~torch.isfinite(self.logprob[m] + self.kl[m])
            if bool(bad.any()):
                layer = int(bad.nonzero()[0, 0]) - 1
                raise SftlensError(
                    f"{model} model gave NaN/inf log-probs at layer {layer}; check the "
                    "checkpoint, or run in float32 (--dtype float32)"
                )

    def rows(self, prefix: str = "") -> list[Row]:
        n = self.tokens
        out: list[Row] = []
        for layer in range(-1, self.num_layers):
            i = layer + 1
            for m, model in enumerate(MODELS):
                for metric, total in (
                    ("probe_acc", self.correct),
                    ("probe_logprob", self.logprob),
                    ("probe_kl", self.kl),
                ):
                    value = float(total[m, i]) / n if n else float("nan")
                    out.append(
                        {"model": model, "layer": layer, "metric": prefix + metric, "value": value}
                    )
            value = float(self.agree[i]) / n if n else float("nan")
            out.append(
                {"model": "pair", "layer": layer, "metric": prefix + PAIR_METRIC, "value": value}
            )
        return out


LensPair = tuple[Callable[[Tensor, int], Tensor], Callable[[Tensor, int], Tensor]]


@torch.no_grad()
def probe_pass(
    base: Any,
    sft: Any,
    lenses: Mapping[str, LensPair],
    data: Iterable[tuple[Batch, Tensor]],
    *,
    num_layers: int,
    chunk: int = 256,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, ProbeSums]:
    """Stream ``data`` through both models; one :class:`ProbeSums` per lens name.

    For each batch both models' states are captured, the answer positions gathered, and for
    each chunk of ``chunk`` positions the final distributions are formed once, then every
    layer's readout by every lens, reduced into the sums and dropped.
    """
    device = next(base.parameters()).device
    sums = {name: ProbeSums(num_layers, device) for name in lenses}
    last = num_layers - 1
    first = next(iter(lenses.values()))  # every lens reads the last layer as the model does
    for batch, gold in tqdm(data, desc="probe", unit="batch", disable=not progress, total=total):
        batch = batch.to(device)
        keep = (gold != IGNORE).to(device)
        target = gold.to(device)[keep]
        if target.numel() == 0:
            continue
        rows = []
        for model in (base, sft):
            states, _ = capture(model, batch)
            rows.append([s[keep] for s in states])  # (n, d) per layer -1..L-1
            del states
        for name in lenses:
            sums[name].tokens += int(target.numel())
        for start in range(0, target.numel(), chunk):
            sl = slice(start, start + chunk)
            g = target[sl]
            # the last layer's readout is the model's own logits, the same for every lens
            finals = [torch.log_softmax(first[m](rows[m][-1][sl], last), -1) for m in range(2)]
            for layer in range(-1, num_layers):
                for name, pair in lenses.items():
                    if layer == last:
                        logps = finals
                    else:
                        logps = [
                            torch.log_softmax(pair[m](rows[m][layer + 1][sl], layer), -1)
                            for m in range(2)
                        ]
                    sums[name].update(layer, g, logps, finals)
    for s in sums.values():
        s.check_finite()
    return sums


# -- the command ----------------------------------------------------------------------------------

# fields that do not change the numbers (chunk_size only regroups float64 sums)
_NOT_HASHED = {"base", "sft", "out", "progress", "device", "allow_pickle", "chunk_size", "lens"}
_TUNED_FIELDS = {"tuned_data", "tuned_prompts", "tuned_steps", "tuned_lr", "seed"}


def _lenses(cfg: ProbeConfig) -> list[str]:
    return ["logit", "tuned"] if cfg.lens == "both" else [cfg.lens]


def run_probe(cfg: ProbeConfig, run: RunFolder | None = None) -> Path:
    """Run the probe into ``cfg.out`` (resuming finished steps) and return the run folder."""
    from transformers import AutoTokenizer

    from sftlens import api
    from sftlens.data import resolve_dataset
    from sftlens.data.prompts import format_question, format_target
    from sftlens.io import config_hash
    from sftlens.models.checkpoint import CheckpointReader
    from sftlens.models.loading import load_model, resolve_model
    from sftlens.models.pair import check_pair
    from sftlens.reporting.plots import plot_probe
    from sftlens.run import RunFolder, fingerprint

    run = run or RunFolder(cfg.out)
    dirs = {
        "base": resolve_model(cfg.base, allow_pickle=cfg.allow_pickle),
        "sft": resolve_model(cfg.sft, allow_pickle=cfg.allow_pickle),
    }
    info = check_pair(CheckpointReader(dirs["base"]).config, CheckpointReader(dirs["sft"]).config)
    lenses = _lenses(cfg)
    tok = AutoTokenizer.from_pretrained(dirs["base"])  # BASE tokenizer for both models
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples = resolve_dataset(cfg.data, split=cfg.split, limit=cfg.max_prompts)
    enc = encode(
        tok,
        [(format_question(e.question), format_target(e.answer)) for e in examples],
        cfg.max_length,
    )
    if enc.answer_tokens == 0:
        raise SftlensError(
            f"no answer tokens survive --max-length {cfg.max_length}; raise it or shorten the prompts"
        )
    train: Encoded | None = None
    if "tuned" in lenses:
        train_examples = resolve_dataset(
            cfg.tuned_data or cfg.data, split="train", limit=cfg.tuned_prompts, seed=cfg.seed
        )
        probed = {e.question for e in examples}
        overlap = sum(e.question in probed for e in train_examples)
        if overlap:
            raise SftlensError(
                f"{overlap} of the {len(train_examples)} tuned-lens training problems are also "
                "probed; pass a folder with train.jsonl and test.jsonl as --data, or --tuned-data"
            )
        train = encode(
            tok,
            [(format_question(e.question), format_target(e.answer)) for e in train_examples],
            cfg.max_length,
        )
    prints = {m: fingerprint(d) for m, d in dirs.items()}
    run.save_config(
        models={"base": cfg.base, "sft": cfg.sft},
        fingerprints=prints,
        probe=dataclasses.asdict(cfg),
    )
    hashed = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in _NOT_HASHED and k not in _TUNED_FIELDS
    }
    inputs: dict[str, dict[str, Any]] = {
        "logit": {
            "fingerprints": {k: v["files"] for k, v in prints.items()},
            "config": hashed,
            "encoded": config_hash([enc.ids, enc.gold]),
        }
    }
    tuned_config = {k: getattr(cfg, k) for k in sorted(_TUNED_FIELDS)}
    if train is not None:
        inputs["tuned"] = {
            **inputs["logit"],
            "tuned": tuned_config,
            "train": config_hash([train.ids, train.gold]),
        }

    models: dict[str, Any] = {}

    def model(name: str) -> Any:  # loaded only when a step has to compute
        if name not in models:
            models[name], _ = load_model(
                dirs[name], dtype=cfg.dtype, device=cfg.device, allow_pickle=cfg.allow_pickle
            )
        return models[name]

    def tuned_lens(name: str) -> TunedLens:
        assert train is not None
        m = model(name)
        folder = run.path / f"tuned_lens_{name}"
        key = config_hash(
            {
                "fingerprint": prints[name]["files"],
                "train": inputs["tuned"]["train"],
                "tuned": tuned_config,
                "config": {
                    k: hashed[k] for k in ("batch_size", "max_length", "padding_side", "dtype")
                },
            }
        )
        meta = TunedLens.saved_meta(folder)
        if meta is not None and meta.get("key") == key:
            log.info("reusing the tuned lens in %s", folder)
            return TunedLens.load(folder, Unembed(m))
        lens = TunedLens(Unembed(m), info.num_layers, info.hidden_size)
        history = fit_tuned_lens(
            lens,
            m,
            _train_batches(train, cfg, tok.pad_token_id),
            steps=cfg.tuned_steps,
            lr=cfg.tuned_lr,
            chunk=cfg.chunk_size,
            progress=cfg.progress,
            desc=f"tuned lens ({name})",
        )
        lens.save(
            folder,
            key=key,
            model=name,
            loss_first=history[0],
            loss_last=history[-1],
            losses=history,
        )
        return lens

    steps = {"logit": "probe", "tuned": "probe_tuned"}

    def finished(name: str) -> bool:
        done = run.state["steps"].get(steps[name])
        return bool(done) and done.get("hash") == config_hash(inputs[name])

    pending = [name for name in lenses if not finished(name)]
    computed: dict[str, list[Row]] = {}

    def compute(name: str) -> list[Row]:
        # one pass serves every lens still to compute; a finished step's lens is not redone
        if name not in computed:
            todo = [n for n in pending if n not in computed]
            todo = todo if name in todo else [*todo, name]
            pairs: dict[str, LensPair] = {}
            for n in todo:
                if n == "logit":
                    pairs[n] = (LogitLens(Unembed(model("base"))), LogitLens(Unembed(model("sft"))))
                else:
                    pairs[n] = (tuned_lens("base"), tuned_lens("sft"))
            sums = probe_pass(
                model("base"),
                model("sft"),
                pairs,
                batches(
                    enc,
                    batch_size=cfg.batch_size,
                    pad_id=tok.pad_token_id,
                    padding_side=cfg.padding_side,
                ),
                num_layers=info.num_layers,
                chunk=cfg.chunk_size,
                progress=cfg.progress,
                total=math.ceil(len(enc.ids) / cfg.batch_size),
            )
            computed.update({n: s.rows(PREFIX[n]) for n, s in sums.items()})
        return computed[name]

    for name in lenses:
        run.step(steps[name], inputs[name], functools.partial(compute, name))
    # summary and plots show every lens the run folder holds, as the report's table does
    names = {p + m for p in PREFIX.values() for m in (*MODEL_METRICS, PAIR_METRIC)}
    rows = [r for r in run.metrics() if r["metric"] in names]
    run.write_summary(
        {
            "pair": dataclasses.asdict(info),
            "probe": summarize(
                rows, info.num_layers, len(enc.ids), enc.answer_tokens, enc.truncated
            ),
        }
    )
    plot_probe(rows, run.path / "plots")
    api.report(run.path)
    return run.path


def _train_batches(
    train: Encoded, cfg: ProbeConfig, pad_id: int
) -> Callable[[int], tuple[Batch, Tensor]]:
    """Step ``s`` -> the next ``batch_size`` training problems in a seeded order (fresh per epoch)."""
    from sftlens.tuning.sft import example_order

    def get(step: int) -> tuple[Batch, Tensor]:
        idx = [
            example_order(len(train.ids), cfg.seed, step * cfg.batch_size + j)
            for j in range(cfg.batch_size)
        ]
        batch, gold = next(
            batches(
                train,
                batch_size=len(idx),
                pad_id=pad_id,
                padding_side=cfg.padding_side,
                indices=idx,
            )
        )
        return batch, gold != IGNORE

    return get


# -- summary and report ---------------------------------------------------------------------------


def _depth(layer: int, num_layers: int) -> float:
    """Relative depth of a layer; the embeddings (-1) are at 0."""
    return 0.0 if layer < 0 else (layer + 0.5) / num_layers


def _values(rows: Sequence[Row], metric: str, model: str) -> dict[int, float]:
    return {
        int(r["layer"]): float(r["value"])
        for r in rows
        if r["metric"] == metric and r["model"] == model and r["layer"] is not None
    }


def summarize(
    rows: Sequence[Row], num_layers: int, prompts: int, tokens: int, truncated: int = 0
) -> dict[str, Any]:
    """Per lens and model: final accuracy and the first layer whose accuracy reaches half of it."""
    out: dict[str, Any] = {
        "prompts": prompts,
        "answer_tokens": tokens,
        "truncated": truncated,
        "kl_direction": "KL(final || layer): expectation under the model's own final distribution",
    }
    for lens, prefix in PREFIX.items():
        per_model: dict[str, Any] = {}
        for model in MODELS:
            acc = _values(rows, prefix + "probe_acc", model)
            if not acc:
                continue
            final = acc.get(num_layers - 1, float("nan"))
            half = None
            if final > 0:
                layer = next((ly for ly in sorted(acc) if acc[ly] >= final / 2), None)
                if layer is not None:
                    half = {"layer": layer, "relative_depth": _depth(layer, num_layers)}
            per_model[model] = {"final_acc": final, "half_final_acc_at": half}
        if per_model:
            out[lens] = per_model
    return out


def report_section(
    run: Path, rows: list[dict[str, Any]], summary: dict[str, Any]
) -> tuple[str, str] | None:
    """(title, html) of this experiment's report section, or None when the run has no such files."""
    from sftlens.reporting.html import esc, fmt, image

    lenses = [
        lens for lens, p in PREFIX.items() if any(r["metric"] == p + "probe_acc" for r in rows)
    ]
    if not lenses:
        return None
    s = summary.get("probe", {})
    body = (
        f"<p>{esc(s.get('prompts', '?'))} problems, {esc(s.get('answer_tokens', '?'))} answer "
        "tokens, teacher-forced through both models. Every layer is read out by the "
        f"{esc(' and the '.join(lenses))} lens; <code>probe_kl</code> is KL(final || layer) "
        "from the model's own output distribution (0 at the last layer). Layer -1 is the "
        "embeddings; the plots show blocks 0..L-1 against relative depth.</p>"
    )
    items = []
    for lens in lenses:
        for model in MODELS:
            entry = s.get(lens, {}).get(model)
            if not entry:
                continue
            half = entry.get("half_final_acc_at")
            where = (
                f"half of it is first reached at layer {half['layer']} "
                f"(relative depth {half['relative_depth']:.2f})"
                if half
                else "so no depth reaches half of it"
            )
            items.append(
                f"<li>{esc(lens)} lens, {esc(model)}: final accuracy "
                f"{fmt(entry.get('final_acc'))}; {esc(where)}</li>"
            )
    body += f"<ul>{''.join(items)}</ul>"
    for metric in ("probe_acc", "probe_logprob", "probe_kl", "probe_agreement"):
        if (run / "plots" / f"{metric}.png").is_file():
            body += image(run / "plots" / f"{metric}.png", metric)
    for lens in lenses:
        body += f"<h3>{esc(lens)} lens</h3>" + _table(rows, lens)
    return "Layer-wise probing (logit / tuned lens)", body


def _table(rows: Sequence[Row], lens: str) -> str:
    """Layers -1..L-1 by (metric, model) for one lens."""
    from sftlens.reporting.html import esc, fmt

    columns = [
        (model, PREFIX[lens] + metric)
        for metric in (*MODEL_METRICS, PAIR_METRIC)
        for model in (("pair",) if metric == PAIR_METRIC else MODELS)
    ]
    value = {(r["model"], r["layer"], r["metric"]): r["value"] for r in rows}
    layers = sorted(
        {
            int(r["layer"])
            for r in rows
            if r["layer"] is not None and r["metric"] in {c[1] for c in columns}
        }
    )
    head = "<tr><th>layer</th>" + "".join(
        f"<th>{esc(metric)}<br>{esc(model)}</th>" for model, metric in columns
    )
    body = "".join(
        f"<tr><td>{layer}</td>"
        + "".join(f"<td>{fmt(value.get((m, layer, k), float('nan')))}</td>" for m, k in columns)
        + "</tr>"
        for layer in layers
    )
    return f"<table>{head}</tr>{body}</table>"
