#!/bin/bash
# The README's two-phase T5 VAE comparison on PTB (issue 5): configs/ptb/t5-vae-cpu.yaml (phase 1
# autoencoder + phase 2 VAE) and t5-vae-cpu-nophase1.yaml (phase 2 only, same 5,000 steps), then
# K=500 IW-NLL (bf16) on the first 500 test sentences for both, the LSTM LM (exact) and the LSTM
# VAE (runs/ptb-lstm-lm-cpu and runs/diag/ptb-lstm-vae-cpu, from bench/ptb_cpu_runs.sh and
# bench/diagnostics_runs.sh). A training cut off part-way is resumed (--resume). Each job uses one
# thread so two queues can share the two cores (run this script beside bench/della_runs.sh); wall
# times go to runs/t5/timings.txt.
D=runs/t5
source "$(dirname "$0")/runs_lib.sh"
N=${EVAL_SENTENCES:-500}
for p in t5-vae-cpu t5-vae-cpu-nophase1; do
  train_run $D/ptb-$p configs/ptb/$p.yaml
done
for r in runs/ptb-lstm-lm-cpu $D/ptb-t5-vae-cpu $D/ptb-t5-vae-cpu-nophase1; do
  [ -f $r/eval-test$N.json ] && continue
  t textvae evaluate $r --split test --max-sentences $N --iw-samples 500 --precision bf16 --output $r/eval-test$N.json > $r.eval$N.log 2>&1
done
