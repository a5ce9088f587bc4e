#!/usr/bin/env bash
# The whole csrtool chain on the embedded SmolLM2-135M and the built-in corpus.
set -euo pipefail
OUT=${1:-out}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s elapsed)"; }

step "collect K/V activations"
csrtool collect --max-tokens 4096 --seq-len 512 -o "$OUT/acts" --force

echo; echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/"
