#!/usr/bin/env bash
# What moves the R² of the error norm ‖e‖² (the paper: > 0.9)? README "Results", study 1.
# On SmolLM2-135M, one store (the default run's 1,792 × 128 stdlib contexts) harvested at five
# layers; a 1,024-wide k = 32 TopK SAE per setting. Factors, one at a time from the base
# (layer 15, 400k training tokens, norm filter 5× the median):
#   layer 5, 10, 15, 20, 25 · training 100k, 400k, 1.6M tokens · norm filter off, 5×, 2×, and
#   off with positions 1..7 left out (where every token over 5× the median norm sits)
#   · target ‖e‖² vs ‖e‖ (in studies/tables.py).
# The paper's protocol is studies/paper_protocol.toml; SAEs trained toward a plateau are
# studies/converged.toml's. Usage: studies/norm_r2.sh [OUT]
set -euo pipefail
OUT=${1:-study/norm_r2}
DM=${DM:-darkmatter}
S=$OUT/store
once() { [ -e "$1" ] || "${@:2}"; }  # skip a step whose output exists (reruns resume)

hooks=()
for L in 5 10 15 20 25; do hooks+=(--hook "resid_post.$L"); done
$DM harvest -o "$S" "${hooks[@]}" --n-contexts 1792 --context-length 128 --no-loss

sae() {  # sae NAME LAYER TRAIN-ARGS...: train one SAE and decompose it
  local name=$1 layer=$2; shift 2
  once "$OUT/saes/$name/topk-w1024-k32/training.json" \
    $DM train --store "$S" --hook "resid_post.$layer" --widths 1024 --k 32 "$@" -o "$OUT/saes/$name"
  once "$OUT/decompose/$name" $DM decompose --store "$S" --hook "resid_post.$layer" \
    --sae "$OUT/saes/$name/topk-w1024-k32" -o "$OUT/decompose/$name"
}
for L in 5 10 15 20 25; do sae "layer$L" "$L" --train-tokens 400000; done
sae tokens100k 15 --train-tokens 100000
sae tokens1600k 15 --train-tokens 1600000
for R in 0 2; do  # 0: no filter; the base (layer15) has the default 5
  once "$OUT/decompose/filter$R" $DM decompose --store "$S" --hook resid_post.15 \
    --sae "$OUT/saes/layer15/topk-w1024-k32" --max-norm-ratio "$R" -o "$OUT/decompose/filter$R"
done
once "$OUT/decompose/filter0_from8" $DM decompose --store "$S" --hook resid_post.15 \
  --sae "$OUT/saes/layer15/topk-w1024-k32" --max-norm-ratio 0 --skip-positions 8 \
  -o "$OUT/decompose/filter0_from8"
