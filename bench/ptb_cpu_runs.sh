#!/bin/bash
# The README's real-data runs: the four CPU presets on PTB, then the protocol on the full PTB
# test set (K=500, bf16 autocast). Wall times go to runs/timings.txt.
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
mkdir -p runs
for p in lstm-lm lstm-vae lstm-vae-maxpool lstm-vae-meanpool; do
  s=$(date +%s)
  textvae train configs/ptb/$p-cpu.yaml train.progress=false --run-dir runs/ptb-$p-cpu > runs/ptb-$p-cpu.train.log 2>&1
  echo "$p train_s $(( $(date +%s) - s ))" >> runs/timings.txt
done
for p in lstm-lm lstm-vae lstm-vae-maxpool lstm-vae-meanpool; do
  s=$(date +%s)
  textvae evaluate runs/ptb-$p-cpu --split test --iw-samples 500 --precision bf16 --output runs/ptb-$p-cpu/eval-test.json > runs/ptb-$p-cpu.eval.log 2>&1
  echo "$p eval_s $(( $(date +%s) - s ))" >> runs/timings.txt
done
