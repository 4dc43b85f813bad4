#!/bin/bash
# The README's DailyDialog comparison (issue 4): the conditional flow VRAE (cvrae-cpu.yaml) and
# its baseline without latent (seq2seq-cpu.yaml), both TRAINED ON THE TEST SPLIT (the only
# training data shipped) and evaluated on the first 1,000 (context, response) pairs of the
# VALIDATION split: IW-NLL (K=500, bf16) of the response given the context, then response BLEU
# and distinct-n over 5 responses per context, greedy (eval-test.json) and nucleus sampling
# top-p 0.9 (eval-test-sample.json, K=1: only its generation fields are new).
# One thread per job (OMP_NUM_THREADS=1); wall times go to runs/dialogue/timings.txt.
set -e
cd "$(dirname "$0")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
D=runs/dialogue
mkdir -p $D
t() { local s=$(date +%s); "$@"; echo "$* : $(( $(date +%s) - s )) s" >> $D/timings.txt; }
for p in cvrae seq2seq; do
  [ -f $D/$p-cpu/samples.txt ] || t textvae train configs/dailydialog/$p-cpu.yaml train.progress=false --run-dir $D/$p-cpu > $D/$p-cpu.train.log 2>&1
done
G="--generation --gen-sentences 1000 --gen-responses 5"
for p in cvrae seq2seq; do
  [ -f $D/$p-cpu/eval-test.json ] || t textvae evaluate $D/$p-cpu --split test --max-sentences 1000 --iw-samples 500 --precision bf16 $G --output $D/$p-cpu/eval-test.json > $D/$p-cpu.eval.log 2>&1
  [ -f $D/$p-cpu/eval-test-sample.json ] || t textvae evaluate $D/$p-cpu --split test --max-sentences 1000 --iw-samples 1 --precision bf16 $G --gen-strategy sample --top-p 0.9 --output $D/$p-cpu/eval-test-sample.json > $D/$p-cpu.eval-sample.log 2>&1
done
