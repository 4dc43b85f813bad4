#!/usr/bin/env bash
# Two sweep workers sharing one Optuna study on a local PostgreSQL server (issue 17, item 4).
#
# Starts a throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql` package; the server
# runs as the `postgres` user when this script runs as root), runs experiments/postgres-demo.yaml
# as TWO separate `textvae sweep` commands with the same --storage URL and their own --out-dir
# (as two machines would), checks in the study that every grid point ran exactly once, prints
# which worker ran which trial, and stops the server (also on error). Needs the `postgres` extra
# (`pip install -e ".[postgres]"`: psycopg 3) and TEXTVAE_DATA_DIR with PTB.
#   bash bench/sweep_postgres.sh            # writes runs/postgres-demo-<time>/
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-54329}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
OUT=${OUT:-runs/postgres-demo-$(date +%Y%m%d-%H%M%S)}
DB=$(mktemp -d -t textvae-pg.XXXXXX)  # under $TMPDIR, else /tmp
mkdir -p "$OUT"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DB"
as_pg "$BIN/initdb" -D "$DB/data" -A trust -U sweep > "$OUT/initdb.log"
as_pg "$BIN/pg_ctl" -D "$DB/data" -l "$DB/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DB" start > /dev/null
stop() { as_pg "$BIN/pg_ctl" -D "$DB/data" -m fast -w stop > /dev/null; cp "$DB/server.log" "$OUT/"; rm -rf "$DB"; }
trap stop EXIT
as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U sweep sweeps
URL="postgresql://sweep@127.0.0.1:$PORT/sweeps"
echo "server: $("$BIN/postgres" --version), $URL"
start=$(date +%s)
for w in a b; do
    OMP_NUM_THREADS=1 textvae sweep experiments/postgres-demo.yaml --storage "$URL" \
        --out-dir "$OUT/worker-$w" > "$OUT/worker-$w.log" 2>&1 &
done
wait
echo "two workers done in $(( $(date +%s) - start )) s"
python - "$URL" "$OUT" <<'PY'
import collections, sys
from pathlib import Path
import optuna
url, out = sys.argv[1], Path(sys.argv[2])
trials = optuna.load_study(study_name="postgres-demo", storage=url).trials
done = [t for t in trials if t.state.name == "COMPLETE" and not t.user_attrs.get("overflow")]
points = collections.Counter((t.params["model.pooling"], t.params["kl.free_bits"]) for t in done)
for t in sorted(done, key=lambda t: t.number):
    worker = Path(t.user_attrs["worker"]).name
    print(f"trial {t.number}: {worker}/{t.user_attrs['run_dir']} pooling={t.params['model.pooling']} "
          f"free_bits={t.params['kl.free_bits']} nll={t.values[0]:.2f} mi={t.values[1]:.3f}")
print(f"{len(trials)} trials in the study, {len(done)} complete, {len(points)} grid points")
assert len(points) == 6 and set(points.values()) == {1}, f"a grid point ran twice: {points}"
workers = collections.Counter(Path(t.user_attrs["worker"]).name for t in done)
assert len(workers) == 2, f"one worker ran every trial: {workers}"
print("every grid point ran exactly once; trials per worker:", dict(workers))
PY
