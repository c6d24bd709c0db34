"""Resolve a model spec to a local Hugging Face folder, and load it.

A spec is one of:
- an alias from :data:`sftlens.models.aliases.ALIASES` (``smollm2-135m-instruct``, ``gemma3-270m``);
- a local folder with ``config.json`` and safetensors weights;
- a ``.gguf`` file (dequantized by transformers' ``gguf_file=``, then cached once as safetensors);
- a hub id like ``HuggingFaceTB/SmolLM2-135M`` (downloaded when online).

Pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle=True``, and
``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlens.errors import SftlensError
from sftlens.io import sha256_file
from sftlens.models.aliases import ALIASES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("sftlens.models")


def cache_dir() -> Path:
    """``$SFTLENS_CACHE``, else ``$XDG_CACHE_HOME/sftlens``, else ``~/.cache/sftlens``."""
    if env := os.environ.get("SFTLENS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sftlens"


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()


def resolve_model(spec: str | os.PathLike[str], *, allow_pickle: bool = False) -> Path:
    """Return a local folder with ``config.json`` + safetensors for ``spec`` (see module doc)."""
    text = str(spec)
    if text in ALIASES:
        return convert_gguf(ALIASES[text].resolve(cache_dir()))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
            raise SftlensError(
                f"{path} has no config.json; pass a Hugging Face model folder, a .gguf file "
                f"or one of the aliases {sorted(ALIASES)}"
            )
        if not has_weights(path):
            if any(path.glob("*.bin")) and not allow_pickle:
                raise SftlensError(
                    f"{path} holds only pickle weights (*.bin); convert them to safetensors or "
                    "pass --allow-pickle if you trust the file"
                )
            if not any(path.glob("*.bin")):
                raise SftlensError(
                    f"{path} has config.json but no *.safetensors weights; copy the weight "
                    "files into the folder"
                )
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise SftlensError(
            f"model '{text}' is not a folder, a .gguf file, a hub id or an alias; "
            f"aliases: {', '.join(sorted(ALIASES))}"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # offline, missing repo, gated repo ...
        raise SftlensError(
            f"could not fetch '{repo_id}' from the hub ({type(exc).__name__}); pass a local "
            "folder or .gguf file, or one of the aliases " + ", ".join(sorted(ALIASES))
        ) from None
    return Path(folder)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file to fp32 once and cache it as a safetensors folder.

    The cache key is the file's sha256, so a changed file is converted again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf_path)
    target = cache_dir() / "converted" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file() and has_weights(target):
        return target
    log.info("converting %s to safetensors (once) in %s", gguf_path.name, target)
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
    except Exception as exc:
        raise SftlensError(
            f"transformers could not read {gguf_path} ({type(exc).__name__}: "
            f"{_first_line(exc)}); check the file or reinstall it"
        ) from None
    # The weights are already dequantized fp32; drop the GGUF "quantizer" marker so that
    # save_pretrained writes a plain safetensors checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "sftlens_source.txt").write_text(f"{gguf_path}\nsha256 {digest}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else "no message"


def resolve_dtype(dtype: str) -> torch.dtype:
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise SftlensError(f"dtype '{dtype}' is not supported; use one of {sorted(table)}")
    return table[dtype]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(
    device: str, *, cuda_available: bool | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The torch device a ``--device`` value means in this process.

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. Under ``torchrun`` /
    ``accelerate launch`` (``LOCAL_RANK`` set) a bare ``cuda`` is this rank's own GPU, so that
    the ranks of a node do not all load their models onto GPU 0. ``cuda_available`` and ``env``
    default to this machine's.

    >>> resolve_device("auto", cuda_available=False)
    'cpu'
    >>> resolve_device("auto", cuda_available=True, env={})
    'cuda'
    >>> resolve_device("cuda", cuda_available=True, env={"LOCAL_RANK": "3"})
    'cuda:3'
    >>> resolve_device("cuda:1", cuda_available=True, env={"LOCAL_RANK": "3"})  # explicit wins
    'cuda:1'
    """
    if device not in ("auto", "cuda"):
        return device
    if not (_cuda_available() if cuda_available is None else cuda_available):
        if device == "cuda":
            raise SftlensError(
                "--device cuda but torch sees no CUDA GPU; install a CUDA build of torch "
                "(or check CUDA_VISIBLE_DEVICES), or pass --device cpu"
            )
        return "cpu"
    local_rank = (os.environ if env is None else env).get("LOCAL_RANK")
    return f"cuda:{int(local_rank)}" if local_rank else "cuda"


#: what ``--dtype auto`` means: bf16 weights on a GPU, float32 on CPU (where bf16 matmuls
#: are ~100x slower)
AUTO_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


def pick_dtype(
    dtype: str, device: str, *, cuda_available: bool | None = None, on_cuda: str = "bfloat16"
) -> str:
    """The concrete dtype name of ``--dtype`` on ``--device``: ``auto`` becomes ``on_cuda``
    (bf16 unless the command asks otherwise) when the device resolves to a GPU, else float32;
    any other value is returned as it is.

    >>> pick_dtype("auto", "auto", cuda_available=False)
    'float32'
    >>> pick_dtype("auto", "auto", cuda_available=True)
    'bfloat16'
    >>> pick_dtype("auto", "cpu", cuda_available=True)
    'float32'
    >>> pick_dtype("float16", "cpu")
    'float16'
    """
    if dtype != "auto":
        return dtype
    if device == "cpu":  # no need to ask torch
        return AUTO_DTYPES["cpu"]
    kind = torch_device_type(resolve_device(device, cuda_available=cuda_available, env={}))
    return on_cuda if kind == "cuda" else AUTO_DTYPES["cpu"]


def torch_device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``, ``cpu`` -> ``cpu``.

    >>> torch_device_type("cuda:1")
    'cuda'
    """
    return device.split(":", 1)[0]


def load_tokenizer(folder: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved model folder; a missing pad token becomes the EOS token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | None = "auto",
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode. fp32 on CPU by default (bf16 is ~100x slower there).

    ``dtype="auto"``: bf16 on a GPU, float32 on CPU (:func:`pick_dtype`). ``device=None``
    leaves the weights where ``from_pretrained`` put them (CPU, or meta on the ranks > 0 of an
    FSDP launch with ``cpu_ram_efficient_loading``), for ``accelerate`` to place.
    Pass ``attn_implementation="eager"`` when attention weights are needed.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model(spec, allow_pickle=allow_pickle)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(pick_dtype(dtype, device or "cpu")),
        "trust_remote_code": trust_remote_code,
        "use_safetensors": not allow_pickle,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except SftlensError:
        raise
    except Exception as exc:
        raise SftlensError(
            f"could not load the model in {folder} ({type(exc).__name__}: {_first_line(exc)}); "
            "check that its files are complete (re-copy or re-download them)"
        ) from None
    tok = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if device is not None:  # None: leave it where from_pretrained put it (FSDP shards it)
        model.to(resolve_device(device))  # type: ignore[arg-type]
    model.eval()
    return model, tok
