"""GSM8K loading, dataset resolution and prompt formats (fixtures are hand-written)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from sftlens.data import (
    Example,
    few_shot_prefix,
    format_chat,
    format_question,
    format_target,
    load_jsonl,
    resolve_dataset,
)
from sftlens.errors import SftlensError
from sftlens.evaluation import answers_match, extract_strict, normalize_number

GOOD = {
    "question": "Tom has 2 cats and buys 3 more. How many cats?",
    "answer": "2+3=<<2+3=5>>5\n#### 5",
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record(q: str, n: int) -> str:
    return json.dumps({"question": q, "answer": f"It is {n}.\n#### {n}"})


@pytest.fixture(autouse=True)
def _no_gsm8k_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFTLENS_GSM8K_DIR", raising=False)


def first_records(path: Path, n: int) -> list[tuple[str, str]]:
    """The first ``n`` (question, answer) pairs of a jsonl file, read with plain ``json``."""
    with path.open(encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(n)]
    return [(r["question"], r["answer"]) for r in records]


def test_real_test_split_has_1319_parseable_rows(gsm8k_dir: Path) -> None:
    examples = load_jsonl(gsm8k_dir / "test.jsonl")
    assert len(examples) == 1319
    for e in examples:
        assert normalize_number(e.final_answer) is not None, e.answer
        assert answers_match(extract_strict(e.answer), e.final_answer)


def test_real_train_limit_is_first_rows_in_file_order(gsm8k_dir: Path) -> None:
    got = resolve_dataset(str(gsm8k_dir), split="train", limit=4)
    assert [(e.question, e.answer) for e in got] == first_records(gsm8k_dir / "train.jsonl", 4)


def test_gsm8k_keyword_finds_shared_folder(
    gsm8k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the layout the lookup expects, wherever the data lives: REPO/../shared/data/gsm8k
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "gsm8k").symlink_to(gsm8k_dir.resolve())
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    want = first_records(gsm8k_dir / "test.jsonl", 3)  # the real rows, not any 3 problems
    got = resolve_dataset("gsm8k", split="test", limit=3)
    assert [(e.question, e.answer) for e in got] == want
    monkeypatch.chdir(tmp_path)  # ./shared/data/gsm8k works too
    assert [(e.question, e.answer) for e in resolve_dataset("gsm8k", split="test", limit=3)] == want
    monkeypatch.chdir(tmp_path / "shared" / "data")  # neither: not found locally, and offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftlensError, match="not found in"):
        resolve_dataset("gsm8k", split="test")
    monkeypatch.setenv("SFTLENS_GSM8K_DIR", str(gsm8k_dir))
    everything = resolve_dataset("GSM8K", split="test")
    assert len(everything) == 1319 and [(e.question, e.answer) for e in everything[:3]] == want


def test_example_final_answer() -> None:
    assert Example("q", "a = 1,234\n#### 1,234 ").final_answer == "1,234"
    assert Example("q", "step\n####-7").final_answer == "-7"


def test_blank_lines_skipped_and_limit(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "d.jsonl", [record("a", 1), "", "   ", record("b", 2), record("c", 3)]
    )
    assert [e.final_answer for e in load_jsonl(f)] == ["1", "2", "3"]
    assert [e.question for e in load_jsonl(f, limit=2)] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("{not json", "not valid JSON"),
        ('["question", "answer"]', "expected a JSON object"),
        (json.dumps({"answer": "#### 1"}), "'question' is missing"),
        (json.dumps({"question": "q", "answer": "   "}), "'answer' is not a non-empty string"),
        (json.dumps({"question": "q", "answer": 5}), "'answer' is not a non-empty string"),
        (json.dumps({"question": "q", "answer": "the answer is 5"}), "no '####'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, words: str) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(SftlensError) as info:
        load_jsonl(f)
    message = str(info.value)
    assert f"{f}:3:" in message and words in message
    assert "\n" not in message


def test_limit_stops_before_a_later_bad_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "oops"])
    assert len(load_jsonl(f, limit=1)) == 1
    with pytest.raises(SftlensError, match=r"d\.jsonl:2"):
        load_jsonl(f)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(SftlensError, match="no examples"):
        load_jsonl(f)
    with pytest.raises(SftlensError, match="no examples"):
        resolve_dataset(str(f))


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(SftlensError, match="UTF-8"):
        load_jsonl(f)
    with pytest.raises(SftlensError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_invalid_limit(tmp_path: Path, limit: object) -> None:
    f = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)])
    with pytest.raises(SftlensError, match="limit"):
        resolve_dataset(str(f), limit=limit)  # type: ignore[arg-type]


def test_directory_and_split_resolution(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.jsonl", [record("tr1", 1), record("tr2", 2)])
    write_lines(tmp_path / "test.jsonl", [record("te1", 9)])
    assert [e.question for e in resolve_dataset(tmp_path)] == ["tr1", "tr2"]
    assert [e.question for e in resolve_dataset(str(tmp_path), split="test")] == ["te1"]
    # a file path ignores the split
    assert [e.question for e in resolve_dataset(str(tmp_path / "train.jsonl"), split="test")] == [
        "tr1",
        "tr2",
    ]
    with pytest.raises(SftlensError, match=r"no validation\.jsonl"):
        resolve_dataset(str(tmp_path), split="validation")
    with pytest.raises(SftlensError, match="neither a file, a folder"):
        resolve_dataset(str(tmp_path / "missing"))
    with pytest.raises(SftlensError, match="split"):
        resolve_dataset(str(tmp_path), split="../train")


def test_gsm8k_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lines(tmp_path / "test.jsonl", [record("env", 4)])
    monkeypatch.setenv("SFTLENS_GSM8K_DIR", str(tmp_path))
    assert [e.question for e in resolve_dataset("gsm8k", split="test")] == ["env"]
    with pytest.raises(SftlensError, match=r"SFTLENS_GSM8K_DIR=.* has no train\.jsonl"):
        resolve_dataset("gsm8k", split="train")


def test_auto_uses_local_gsm8k(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_lines(tmp_path / "train.jsonl", [record("local", 4)])
    monkeypatch.setenv("SFTLENS_GSM8K_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="sftlens.data"):
        got = resolve_dataset("auto")
    assert [e.question for e in got] == ["local"]
    assert "using GSM8K" in caplog.text


def test_gsm8k_absent_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # neither ./shared nor ../shared holds GSM8K here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftlensError, match="pass a path"):
        resolve_dataset("gsm8k")
    with caplog.at_level(logging.INFO, logger="sftlens.data"):
        got = resolve_dataset("auto", limit=5, seed=3)
    assert "using synthetic" in caplog.text
    assert got == resolve_dataset("synthetic", limit=5, seed=3)


class _Rows(list):  # the slice of datasets.Dataset that the loader uses
    def select(self, indices: range) -> _Rows:
        return _Rows(self[i] for i in indices)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> None:
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_gsm8k_from_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str, split: str) -> _Rows:
        calls.append((name, config, split))
        return _Rows([{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.chdir(tmp_path)
    got = resolve_dataset("gsm8k", split="test", limit=2)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [e.final_answer for e in got] == ["0", "1"]


def test_hub_failure_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftlensError, match=r"ConnectionError: no network.*pass a local path"):
        resolve_dataset("gsm8k")
    with caplog.at_level(logging.INFO, logger="sftlens.data"):
        got = resolve_dataset("auto", limit=3)
    assert got == resolve_dataset("synthetic", limit=3)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "using synthetic" in caplog.text


def test_prompt_formats() -> None:
    assert format_question("What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert format_target("2+2=4\n#### 4") == " 2+2=4\n#### 4"
    shots = [Example("Q1?", "A1\n#### 1"), Example("Q2?", "A2\n#### 2")]
    expected = "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\n"
    assert few_shot_prefix(shots) == expected
    assert few_shot_prefix([]) == ""


def test_format_chat_real_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template)
    assert format_chat(tok, "2+2?") == "<|user|>2+2?\n<|assistant|>"
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(SftlensError, match="no chat template"):
        format_chat(plain, "2+2?")
