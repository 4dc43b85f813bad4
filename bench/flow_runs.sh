#!/bin/bash
# The README's flow-VRAE comparison on PTB (issue 4): the planar, IAF and ccLinIAF ablation
# presets at the budget of lstm-vae-cpu.yaml (5 epochs), then K=500 IW-NLL (bf16) on the first
# 500 test sentences for them, for the base VAE (runs/diag/ptb-lstm-vae-cpu, from
# bench/diagnostics_runs.sh) and for the full flow VRAE (runs/flow/ptb-flow-vrae-cpu:
# `textvae train configs/ptb/flow-vrae-cpu.yaml --run-dir runs/flow/ptb-flow-vrae-cpu`).
# Each job uses one thread (OMP_NUM_THREADS=1) so two queues can share the two cores; wall
# times go to runs/flow/timings.txt.
set -e
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
D=runs/flow
N=${EVAL_SENTENCES:-500}
mkdir -p $D
t() { local s=$(date +%s); "$@"; echo "$* : $(( $(date +%s) - s )) s" >> $D/timings.txt; }
for p in flow-planar flow-iaf flow-cclin; do
  [ -f $D/ptb-$p-cpu/checkpoints/best/model.safetensors ] && [ -f $D/ptb-$p-cpu/samples.txt ] && continue
  t textvae train configs/ptb/$p-cpu.yaml train.progress=false --run-dir $D/ptb-$p-cpu > $D/ptb-$p-cpu.train.log 2>&1
done
for r in runs/diag/ptb-lstm-vae-cpu $D/ptb-flow-planar-cpu $D/ptb-flow-iaf-cpu $D/ptb-flow-cclin-cpu $D/ptb-flow-vrae-cpu; do
  [ -f $r/eval-test$N.json ] && continue
  t textvae evaluate $r --split test --max-sentences $N --iw-samples 500 --precision bf16 --output $r/eval-test$N.json > $r.eval$N.log 2>&1
done
