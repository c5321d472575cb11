#!/usr/bin/env bash
# Whole-pipeline check on one NVIDIA GPU against the CPU, unattended, in under 8 minutes.
#
#   scripts/gpu_check.sh                       # install (no deps), then every check on CUDA
#   scripts/gpu_check.sh --no-install --device cpu --families llama --checks families
#
# Installs the package with `pip install --no-deps --no-build-isolation -e .` (the machine
# brings torch, transformers, ...; nothing is downloaded), unless --no-install; then runs
# scripts/gpu_check.py with the other arguments (see its --help). An install that fails is a
# FAIL row and the check goes on from src/. Exit status: 0 when every check passed, else
# non-zero. GPU_CHECK_LIMIT_S (default 480) bounds the whole script, install included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT_S:-480}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$SECONDS

install=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-install" ]; then install=0; else args+=("$a"); fi
done

status="skipped (--no-install)"
if [ "$install" = 1 ]; then
  log=$(mktemp)
  if timeout 120 "$PY" -m pip install --disable-pip-version-check -q --no-deps \
      --no-build-isolation -e . >"$log" 2>&1; then
    status="pip install --no-deps --no-build-isolation -e . ($((SECONDS - start)) s)"
  else
    cat "$log" >&2
    status="failed: pip install -e . (log above); running from src/"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
  rm -f "$log"
fi
if ! "$PY" -c "import sae_darkmatter" 2>/dev/null; then  # e.g. --no-install outside a venv
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# The Python part stops itself at its budget and prints the table; `timeout` is the backstop
# (TERM also makes it print the table; KILL 15 s later).
left=$((LIMIT - (SECONDS - start)))
budget=$((left - 25))
if [ "$budget" -lt 30 ]; then echo "gpu_check: no time left after the install" >&2; exit 1; fi
exec timeout --kill-after=15 "$((left - 10))" "$PY" scripts/gpu_check.py \
  --budget-s "$budget" --install "$status" ${args[@]+"${args[@]}"}
