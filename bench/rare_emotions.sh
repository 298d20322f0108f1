#!/usr/bin/env bash
# Issue 19, items 2-3: how to learn MELD's rare emotions, compared at one fixed budget (same steps, seed, data,
# prompt layout), each followed by the label-prior correction, scored on all 1,109 MELD dev utterances through
# the serving path. Resumable: a cell whose adapter exists is skipped, a cell whose training was interrupted
# resumes from its checkpoint (the same command again), an evaluated cell has its JSON in $OUT.
#
# Started 2026-12-01 19:55 UTC on the AVX-512 BF16 machine (bf16 autocast, 1 thread at nice 19, ~10.5 s/step):
#   ERC=.venv/bin/erc-stream STORE=/work/train-store OUT=docs/rare_emotions THREADS=1 \
#     nohup nice -n 19 bash bench/rare_emotions.sh > /work/train-store/rare_emotions.log 2>&1 &
#
# Cells: natural  = today's sampling (the data's own label distribution)
#        bal05    = label-balanced draws, weight freq^-0.5
#        bal10    = label-balanced draws, every label equally often
set -euo pipefail
ERC=${ERC:-erc-stream}
STORE=${STORE:-$HOME/.cache/erc-stream/store}
OUT=${OUT:-docs/rare_emotions}
THREADS=${THREADS:-1}
STEPS=${STEPS:-300}
CELLS=${CELLS:-"natural:0.0 bal05:0.5 bal10:1.0"}
export ERC_STORE__DIR="$STORE" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
for cell in $CELLS; do
  name=rare-${cell%%:*}; balance=${cell##*:}
  # Done when the adapter has a version (or, trained before versions existed, its files directly).
  if ! ls "$STORE/adapters/$name"/erc_meta.json "$STORE/adapters/$name"/[0-9a-f]*/erc_meta.json >/dev/null 2>&1; then
    echo "== train $name (balance $balance, $STEPS steps) $(date -u +%FT%TZ)"
    "$ERC" models train --dataset meld --name "$name" --speaker-steps 20 --steps "$STEPS" --batch-size 8 \
      --window 12 --aux-weight 0.1 --balance "$balance" --calibration 300 --no-demonstrations \
      --threads "$THREADS" --dtype auto --checkpoint-every 10 --no-progress
  fi
  if [ ! -f "$OUT/$name-meld-dev.json" ]; then
    echo "== eval $name $(date -u +%FT%TZ)"
    ERC_MODEL__THREADS=$THREADS "$ERC" models eval --dataset meld --split dev --adapter "$name" --no-zero-shot \
      --json > "$OUT/$name-meld-dev.json.tmp"
    mv "$OUT/$name-meld-dev.json.tmp" "$OUT/$name-meld-dev.json"
  fi
done
echo "== done $(date -u +%FT%TZ)"
