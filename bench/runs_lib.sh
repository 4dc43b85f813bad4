# Shared by the real-data run scripts (bench/t5_runs.sh, bench/della_runs.sh); source it after
# setting D (the folder of the runs and of timings.txt). It moves to the repository root, points
# TEXTVAE_DATA_DIR at ../shared/data unless set, runs every job on one thread (two queues can then
# share the two cores), and defines:
#   t CMD ...                       run CMD and append its wall time to $D/timings.txt
#   train_run RUN CONFIG [KEY=V ...] train RUN, or continue it with --resume if a checkpoint of
#                                   an interrupted training exists; RUN/train.done marks it
#                                   finished (samples.txt is written at every validation, so it
#                                   does not say the training ended)
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TEXTVAE_DATA_DIR=${TEXTVAE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$D"
t() { local s=$(date +%s); "$@"; echo "$* : $(( $(date +%s) - s )) s" >> "$D/timings.txt"; }
train_run() {
  local r=$1; shift
  [ -f "$r/train.done" ] && return 0
  if [ -d "$r/checkpoints/last" ]; then t textvae train --resume --run-dir "$r" >> "$r.train.log" 2>&1
  else t textvae train "$@" train.progress=false --run-dir "$r" > "$r.train.log" 2>&1; fi
  touch "$r/train.done"
}
