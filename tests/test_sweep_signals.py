"""Stopping `textvae sweep --jobs 2` with a real SIGTERM to its parent process alone (as
`kill PID`, a container runtime or a scheduler does): the workers stop with it, after a
finished step with `checkpoints/last` written, and the same sweep resumes their trials."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
from omegaconf import OmegaConf

from tests.conftest import tiny_overrides
from textvae.sweep import run_sweep
from textvae.train import train

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 100_000  # trials that only a signal ends
SWEEP = f"""
base: tiny.yaml
overrides: [train.eval_every=50, train.valid_limit_eval=8]
space:
  kl.free_bits: {{grid: [0.0, 0.5]}}
budget: {{max_steps: {MAX_STEPS}}}
evaluation: {{max_sentences: 8, iw_samples: 2}}
study: {{heartbeat_seconds: 1}}
"""
FOLDERS = ("trial-0000", "trial-0001")


def _write_sweep(corpus: Path) -> Path:
    items = dict(o.split("=", 1) for o in tiny_overrides(corpus))
    OmegaConf.save(
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in items.items()]), corpus / "tiny.yaml"
    )
    path = corpus / "stop.yaml"
    path.write_text(SWEEP)
    return path


def _start(path: Path, out: Path, stderr) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "textvae.cli", "sweep", str(path), "--jobs", "2"]
    return subprocess.Popen(
        [*command, "--out-dir", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=stderr
    )


def _wait_until_both_train(proc: subprocess.Popen, out: Path, log: Path) -> list[psutil.Process]:
    """Both workers have logged training steps; returns the processes the sweep started (its
    two workers, then multiprocessing's resource tracker)."""
    deadline = time.time() + 600
    while not all(_trained(out / f) for f in FOLDERS):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the workers did not start training in 600 s"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, children
    return workers + [p for p in children if p not in workers]


def _trained(folder: Path) -> bool:
    """Whether ``folder/log.jsonl`` has a ``train`` record (its last line may be half written)."""
    lines = (folder / "log.jsonl").read_text() if (folder / "log.jsonl").is_file() else ""
    return any(line.startswith("{") and '"type": "train"' in line for line in lines.splitlines())


def _kill(proc: subprocess.Popen, known: list[psutil.Process]) -> None:
    """End what this test started, by PID: the sweep's processes found earlier, and the
    parent's current children while it runs (its PID cannot name another process then)."""
    found = list(known)
    if proc.poll() is None:
        found += psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
    for child in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()  # psutil checks that the PID still names the process it found


def _alive(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running (zombies count as ended) after up to ``timeout`` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_sigterm_to_the_parent_stops_the_workers_and_the_sweep_resumes(tiny_corpus):
    path, out = _write_sweep(tiny_corpus), tiny_corpus / "out"
    log = tiny_corpus / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = _start(path, out, stderr)
        children = []
        try:
            children = _wait_until_both_train(proc, out, log)
            proc.send_signal(signal.SIGTERM)  # the parent alone, as `kill PID` does
            # (a) the parent exits, by SIGTERM as a shell reports it (143) or dying of it
            assert proc.wait(timeout=300) in (-signal.SIGTERM, 128 + signal.SIGTERM)
            # (b) it waited for its workers: none is left, each stopped after a finished step
            assert not _alive(children[:2], 1), log.read_text()[-3000:]
            assert not _alive(children, 10)  # nor the resource tracker
        finally:  # on failure, end the processes this test started (by their PIDs)
            _kill(proc, children)
    stops = {}
    for folder in FOLDERS:
        events = _events(out / folder)
        stops[folder] = [e["step"] for e in events if e.get("event") == "interrupted"]
        assert [e["signal"] for e in events if e.get("event") == "interrupted"] == ["SIGTERM"]
        assert (out / folder / "checkpoints" / "last").is_dir(), folder
    # (c) the same sweep continues both trials in their folders from where they stopped
    run_sweep(path, out, train=_resume_ten_steps)
    trials = optuna.load_study(study_name="stop", storage=f"sqlite:///{out / 'study.db'}").trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.system_attrs.get("failed_trial", t.number) for t in done) == [0, 1]
    assert sorted(p.name for p in out.glob("trial-*")) == list(FOLDERS)  # no folder.2
    for folder in FOLDERS:
        events = _events(out / folder)
        assert [e["step"] for e in events if e.get("event") == "resume"] == stops[folder]
        steps = [e["step"] for e in events if e.get("type") == "train"]
        assert steps == sorted(steps), folder  # no step trained twice
        assert (events[-1]["event"], events[-1]["step"]) == ("finished", stops[folder][0] + 10)
        assert (out / folder / "eval-valid.json").is_file()


def _resume_ten_steps(config, run_dir, resume=False, on_validation=None) -> Path:
    """The re-run's trainer: ``textvae.train.train``, but it must resume the folder (a trial
    started afresh fails here) and trains 10 steps past the step where it stopped, not to
    ``MAX_STEPS``."""
    assert resume and config is None, f"{run_dir}: trained afresh instead of resumed"
    step = next(e["step"] for e in _events(run_dir) if e.get("event") == "interrupted")
    overrides = [f"train.max_steps={step + 10}"]
    return train(None, run_dir, resume=True, overrides=overrides, on_validation=on_validation)
