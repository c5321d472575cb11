#!/usr/bin/env bash
# Study 5 (README "Results"): the nested prefixes of one Matryoshka BatchTopK SAE (4,096 latents,
# k = 32, 400k tokens) against those of a plain BatchTopK SAE trained alike (its latents in order
# of firing frequency), on study 4's store and held-out tokens (layer 15 of SmolLM2).
#   bash studies/matryoshka.sh study/transcoders study/matryoshka
#   python studies/tables.py prefixes study/matryoshka study/transcoders
set -euo pipefail
store=${1:-study/transcoders}/store
out=${2:-study/matryoshka}
for arch in matryoshka_batchtopk batchtopk; do
  darkmatter train --store "$store" --architecture "$arch" --widths 4096 --k 32 -o "$out/saes"
done
darkmatter decompose --store "$store" --sae "$out/saes/matryoshka_batchtopk-w4096-k32" \
  --prefixes auto -o "$out/prefixes"
darkmatter decompose --store "$store" --sae "$out/saes/batchtopk-w4096-k32" \
  --prefixes auto --latent-order frequency -o "$out/prefixes"
