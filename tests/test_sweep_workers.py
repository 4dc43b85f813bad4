"""Sweeps across machines (issue 17, item 4): two separate ``textvae sweep`` commands, each with
its own sweep folder (as on two machines), draw trials from one study given by ``--storage``;
no trial runs twice and each trial records the worker that ran it. The PostgreSQL version of
this is ``bench/sweep_postgres.sh`` (recorded in bench/RESULTS.md); here the RDB is SQLite."""

import collections
import os
import subprocess
import sys
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from tests.conftest import tiny_overrides

SWEEP = """
base: tiny.yaml
space:
  model.pooling: {grid: [last, max, mean]}
  kl.free_bits: {grid: [0.0, 0.5]}
budget: {max_steps: 3}
evaluation: {max_sentences: 8, iw_samples: 2}
study: {heartbeat_seconds: 1}
"""


def test_two_sweep_commands_share_one_study_without_duplicates(tiny_corpus):
    items = dict(o.split("=", 1) for o in tiny_overrides(tiny_corpus))
    OmegaConf.save(
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in items.items()]), tiny_corpus / "tiny.yaml"
    )
    (tiny_corpus / "shared.yaml").write_text(SWEEP)
    url = f"sqlite:///{tiny_corpus / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "textvae.cli", "sweep", str(tiny_corpus / "shared.yaml")]
    workers = [
        subprocess.Popen(
            [*cmd, "--storage", url, "--out-dir", str(tiny_corpus / f"machine-{w}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in "ab"
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = optuna.load_study(study_name="shared", storage=url).trials
    done = [t for t in trials if not t.user_attrs.get("overflow")]
    assert all(t.state.name == "COMPLETE" for t in done)
    points = collections.Counter(
        (t.params["model.pooling"], t.params["kl.free_bits"]) for t in done
    )
    assert len(points) == 6 and set(points.values()) == {1}  # every grid point exactly once
    for t in done:  # the run folder is where the recorded worker wrote it
        folder = Path(t.user_attrs["worker"].split(":", 1)[1])
        assert folder.parent == tiny_corpus and (folder / t.user_attrs["run_dir"]).is_dir()
    folders = {Path(t.user_attrs["worker"].split(":", 1)[1]).name for t in done}
    trial_dirs = sorted(
        p.name for w in "ab" for p in (tiny_corpus / f"machine-{w}").glob("trial-*")
    )
    assert len(trial_dirs) == 6 and len(set(trial_dirs)) == 6  # no folder in both machines
    assert folders <= {"machine-a", "machine-b"}
