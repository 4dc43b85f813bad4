#!/bin/bash
# Generation metrics of the diagnostics runs again after the <unk> fix in ids_to_text (before it,
# generated text silently lost PTB's <unk>): the same --generation settings as
# experiments/diagnostics-*.yaml (formerly bench/diagnostics_runs.sh), with K=1 (only the generation fields are new) into eval-*-gen.json.
set -e
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
D=runs/diag
for p in lstm-vae lstm-vae-meanpool; do
  textvae evaluate $D/ptb-$p-cpu --split test --iw-samples 1 --precision bf16 --generation --output $D/ptb-$p-cpu/eval-test-gen.json > $D/ptb-$p-cpu.eval-gen.log 2>&1
done
textvae evaluate $D/yelp-lstm-vae-cpu --split valid --max-sentences 2000 --iw-samples 1 --precision bf16 --generation --output $D/yelp-lstm-vae-cpu/eval-valid-gen.json > $D/yelp-lstm-vae-cpu.eval-gen.log 2>&1
