#!/bin/bash
# The README's diagnostics runs (issue 3): a CPU LSTM VAE on Yelp sentiment (trained on the test
# split, validated/evaluated/probed on dev), the last-state and mean-pool PTB CPU presets with
# dense validation diagnostics, then evaluation (K=500, bf16, generation metrics), the probe,
# the reports and the comparison. Wall times go to runs/diag/timings.txt.
set -e
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
D=runs/diag
mkdir -p $D
t() { local s=$(date +%s); "$@"; echo "$* : $(( $(date +%s) - s )) s" >> $D/timings.txt; }
t textvae train configs/yelp/lstm-vae-cpu.yaml train.progress=false --run-dir $D/yelp-lstm-vae-cpu > $D/yelp-lstm-vae-cpu.train.log 2>&1
for p in lstm-vae lstm-vae-meanpool; do
  t textvae train configs/ptb/$p-cpu.yaml train.progress=false --run-dir $D/ptb-$p-cpu > $D/ptb-$p-cpu.train.log 2>&1
done
t textvae probe $D/yelp-lstm-vae-cpu --data yelp_sentiment --labels 100,1000,all > $D/yelp-lstm-vae-cpu.probe.log 2>&1
t textvae evaluate $D/yelp-lstm-vae-cpu --split valid --max-sentences 2000 --iw-samples 500 --precision bf16 --generation --output $D/yelp-lstm-vae-cpu/eval-valid.json > $D/yelp-lstm-vae-cpu.eval.log 2>&1
t textvae report $D/yelp-lstm-vae-cpu > /dev/null 2>&1
for p in lstm-vae lstm-vae-meanpool; do
  t textvae evaluate $D/ptb-$p-cpu --split test --iw-samples 500 --precision bf16 --generation --output $D/ptb-$p-cpu/eval-test.json > $D/ptb-$p-cpu.eval.log 2>&1
  t textvae report $D/ptb-$p-cpu > /dev/null 2>&1
done
t textvae compare $D/ptb-lstm-vae-cpu $D/ptb-lstm-vae-meanpool-cpu --output $D/compare > $D/compare.log 2>&1
