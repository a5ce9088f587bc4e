#!/usr/bin/env bash
# The whole csrtool chain on the embedded SmolLM2-135M and the built-in corpus:
# collect -> train-dict -> cache -> compress -> inspect -> decompress -> eval.
set -euo pipefail
OUT=${1:-out}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s elapsed)"; }

step "1/6 collect K/V activations (defaults: 32,768 calibration tokens, keys before RoPE, which code better)"
csrtool collect -o "$OUT/acts" --force --json "$OUT/collect.json"

step "2/6 train dictionaries (defaults: 8,192 atoms per layer, k-means, on what the token predictor and the decoded layer below leave; docs/quality.md) and calibrate layer sensitivities"
csrtool train-dict "$OUT/acts" -o "$OUT/dicts.safetensors" --force --json "$OUT/train.json"

step "3/6 save the KV cache of a 2,048-token held-out prompt"
csrtool cache --heldout --max-tokens 2048 -o "$OUT/cache.pt" --force

step "4/6 compress it at ~1 bit per channel (adaptive: atoms per vector where the fit needs them) and inspect the file"
csrtool compress "$OUT/cache.pt" --dicts "$OUT/dicts.safetensors" --bits 1 -o "$OUT/cache.csr" --force
csrtool inspect "$OUT/cache.csr" --dicts "$OUT/dicts.safetensors"
csrtool inspect "$OUT/cache.csr" --dicts "$OUT/dicts.safetensors" --json > "$OUT/inspect.json"

step "5/6 decompress it back to a cache model.generate accepts"
csrtool decompress "$OUT/cache.csr" --dicts "$OUT/dicts.safetensors" -o "$OUT/restored.pt" --force

step "6/6 evaluate against KIVI-2, PQ and quanto on 2 held-out documents, with 95% intervals"
csrtool eval --dicts "$OUT/dicts.safetensors" --json "$OUT/eval.json" --plot "$OUT/eval.png"

echo; echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/"
