#!/bin/bash
# The README's remedy matrix on PTB (bench/RESULTS.md): every entry of bench/matrix.py on the CPU
# preset's sizes at a reduced budget of 2,000 steps (1.5 epochs), the KL warm-up and the
# cyclical period shortened to 1,000 steps so beta reaches 1 halfway, validation every 250 steps,
# aggressive training capped at 10 inner steps (window 5), IW-NLL with K=100 (bf16) on the first
# 1,000 PTB test sentences. One thread per process (OMP_NUM_THREADS=1).
# For the recorded table the entries ran as separate processes with disjoint ENTRIES (two at a
# time, to share the two cores), then this command once more with all of them, which reuses
# every finished entry and writes the table: runs/matrix-ptb-2k/matrix.md.
set -e
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
python bench/matrix.py --entries ${ENTRIES:-lm,vae,anneal,cyclical,freebits,worddrop,pooling,bn,aepretrain,bow,minrate,flow,aggressive} \
  --max-steps 2000 --iw-samples 100 --eval-sentences 1000 --out-dir runs/matrix-ptb-2k \
  --set kl.warmup_steps=1000 --set kl.cycle_steps=1000 --set train.eval_every=250 \
  --set train.aggressive_max_inner=10 --set train.aggressive_window=5 \
  --set eval.precision=bf16 --set train.progress=false
