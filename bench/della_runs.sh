#!/bin/bash
# The README's DELLA comparison (issue 6). PTB: configs/ptb/della-cpu.yaml (layer-wise latents,
# KL summed over layers), its single-latent baselines della-embedding-cpu.yaml and
# della-memory-cpu.yaml on the same backbone and budget, and della-cpu.yaml with
# model.kl_reduction=mean (the released code's layer-averaged KL: not a bound; evaluation says
# bound_valid false; bench/della_klmean_sum.py then evaluates its weights with the sum); each evaluated with K=500 IW-NLL (bf16) on the first 500 PTB test sentences
# (the sentences of bench/flow_runs.sh and bench/t5_runs.sh). DailyDialog: della-cvae-cpu.yaml,
# TRAINED ON THE TEST SPLIT, evaluated on the first 1,000 VALIDATION pairs as bench/dialogue_runs.sh
# does for the cvrae and seq2seq: IW-NLL with K=500 (eval-test-k500.json; 15 minutes on 2 threads),
# then K=100 with greedy generation (eval-test.json) and K=1 with nucleus generation.
# Usage: bash bench/della_runs.sh [ENTRY ...] with entries della, embedding, memory, klmean,
# cvae (default: all, in that order); two queues with disjoint entries can share the two cores.
# One thread per job; wall times go to runs/della/timings.txt.
D=runs/della
source "$(dirname "$0")/runs_lib.sh"
N=${EVAL_SENTENCES:-500}
ptb() {  # run-dir, config, overrides...
  local r=$1
  train_run "$@"
  [ -f $r/eval-test$N.json ] || t textvae evaluate $r --split test --max-sentences $N --iw-samples 500 --precision bf16 --output $r/eval-test$N.json > $r.eval$N.log 2>&1
}
for e in ${@:-della embedding memory klmean cvae}; do
  case $e in
    della) ptb $D/ptb-della-cpu configs/ptb/della-cpu.yaml ;;
    embedding) ptb $D/ptb-della-embedding-cpu configs/ptb/della-embedding-cpu.yaml ;;
    memory) ptb $D/ptb-della-memory-cpu configs/ptb/della-memory-cpu.yaml ;;
    klmean)
      r=$D/ptb-della-klmean-cpu
      ptb $r configs/ptb/della-cpu.yaml model.kl_reduction=mean
      # the same weights with the KL summed over layers: the valid bound
      [ -f $r/eval-test$N-sum.json ] || t python bench/della_klmean_sum.py $r --max-sentences $N --iw-samples 500 > $r.eval$N-sum.log 2>&1
      ;;
    cvae)
      r=$D/dailydialog-della-cvae-cpu
      train_run $r configs/dailydialog/della-cvae-cpu.yaml
      G="--generation --gen-sentences 1000 --gen-responses 5"
      [ -f $r/eval-test-k500.json ] || t textvae evaluate $r --split test --max-sentences 1000 --iw-samples 500 --precision bf16 --output $r/eval-test-k500.json > $r.eval-k500.log 2>&1
      [ -f $r/eval-test.json ] || t textvae evaluate $r --split test --max-sentences 1000 --iw-samples 100 --precision bf16 $G --output $r/eval-test.json > $r.eval.log 2>&1
      [ -f $r/eval-test-sample.json ] || t textvae evaluate $r --split test --max-sentences 1000 --iw-samples 1 --precision bf16 $G --gen-strategy sample --top-p 0.9 --output $r/eval-test-sample.json > $r.eval-sample.log 2>&1
      ;;
    *) echo "unknown entry $e" >&2; exit 2 ;;
  esac
done
