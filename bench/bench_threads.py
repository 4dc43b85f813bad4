"""Training and evaluation rates alone and beside one busy process, at several thread settings.

Runs the real command line (``python -m textvae.cli``) of the source trees given by ``--trees``
(so the same script measures an old checkout and the current one, interleaved) on the main preset
``configs/ptb/lstm-vae-maxpool-cpu.yaml`` and the real PTB corpus (``TEXTVAE_DATA_DIR``):

- training: ``--steps`` optimizer steps (default 100), tokens/s = mean of the ``tokens_per_s``
  of the log windows after the first (10 steps each; the first holds the warm-up);
- evaluation: ``textvae evaluate`` of a 10-step checkpoint of the preset (trained first, untimed) on the first ``--eval-sentences``
  PTB test sentences with K = ``--iw-samples`` in bf16, sentences/s = sentences / the
  ``seconds`` recorded in the evaluation JSON (model loading excluded).

Each setting runs alone, or beside one ``python -c "while True: pass"`` process that this script
starts before and kills after the measurement. Thread settings: ``default`` (no
``OMP_NUM_THREADS``, no ``--threads``: what a user gets), and a forced count (``--threads N``
when the tree's CLI has it, else ``OMP_NUM_THREADS=N``). ``/proc/loadavg`` is printed before
each measurement, since "alone" means "without this script's busy process", not an idle machine.

Usage::

    git worktree add --detach ../textvae-before 63ac92f   # any folder outside the checkout
    TEXTVAE_DATA_DIR=../shared/data python bench/bench_threads.py \\
        --trees before=../textvae-before/src after=src --settings alone:2 busy:default
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "configs/ptb/lstm-vae-maxpool-cpu.yaml"


def _env(src: Path, threads: str, has_option: bool, extra_env: list[str]) -> tuple[dict, list[str]]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    env["PYTHONPATH"] = str(src)
    env.update(item.split("=", 1) for item in extra_env)
    extra: list[str] = []
    if threads != "default":
        if has_option:
            extra = ["--threads", threads]
        else:
            env["OMP_NUM_THREADS"] = threads
    return env, extra


def _has_threads_option(src: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-m", "textvae.cli", "train", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "--threads" in out


def _train(
    src: Path, run_dir: Path, steps: int, env: dict, extra: list[str], limit: float
) -> subprocess.CompletedProcess | None:
    """Train the preset for ``steps`` steps; None when killed after ``limit`` seconds."""
    cmd = [
        sys.executable,
        "-m",
        "textvae.cli",
        "train",
        PRESET,
        f"train.max_steps={steps}",
        "train.log_every=10",
        "train.eval_every=0",
        "train.valid_limit_eval=100",
        "train.num_samples=0",
        "train.progress=false",
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    try:
        return subprocess.run(
            cmd, env=env, check=True, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        return None


def measure(
    src: Path, setting: str, args: argparse.Namespace, work: Path, eval_run: Path, has_option: bool
) -> dict:
    where, threads = setting.split(":")
    env, extra = _env(src, threads, has_option, args.env)
    busy = None
    if where == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
        work.mkdir(parents=True, exist_ok=True)
        run_dir = work / f"run-{setting.replace(':', '-')}"
        done = _train(src, run_dir, args.steps, env, extra, args.limit)
        records = [
            json.loads(line)
            for line in (run_dir / "log.jsonl").read_text().splitlines()
            if line.strip()
        ]
        rates = [r["tokens_per_s"] for r in records if r.get("type") == "train"][1:]
        train_note = "" if done else f" (killed at {args.limit:.0f} s: {len(rates)} windows)"
        chosen = re.search(r"^threads: (.*)$", done.stderr, re.M) if done else None
        out_json = work / f"eval-{setting.replace(':', '-')}.json"
        cmd = [
            sys.executable,
            "-m",
            "textvae.cli",
            "evaluate",
            str(eval_run),
            "--max-sentences",
            str(args.eval_sentences),
            "--iw-samples",
            str(args.iw_samples),
            "--precision",
            "bf16",
            "--output",
            str(out_json),
            *extra,
        ]
        try:
            subprocess.run(
                cmd, env=env, check=True, capture_output=True, text=True, timeout=args.limit
            )
            result = json.loads(out_json.read_text())
            eval_rate = f"{result['n_sentences'] / result['seconds']:.2f}"
        except subprocess.TimeoutExpired:
            eval_rate = f"< {args.eval_sentences / args.limit:.2f} (killed at {args.limit:.0f} s)"
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    train_rate = f"{statistics.mean(rates):.0f}" if rates else "n/a"
    return {
        "setting": setting,
        "loadavg_before": " ".join(load),
        "train": train_rate + train_note,
        "eval": eval_rate,
        "threads": chosen.group(1).split(";")[0] + ")" if chosen else "n/a (not printed)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trees",
        nargs="+",
        default=["current=src"],
        metavar="LABEL=SRC",
        help="textvae source trees to measure, interleaved: each setting runs "
        "on every tree before the next setting, so the machine's load is shared fairly",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["alone:2", "alone:1", "alone:default", "busy:default", "busy:1", "busy:2"],
        help="WHERE:THREADS with WHERE alone|busy and THREADS a count or default",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-sentences", type=int, default=100)
    parser.add_argument("--iw-samples", type=int, default=50)
    parser.add_argument(
        "--limit",
        type=float,
        default=150,
        help="seconds after which a training or evaluation is killed (the "
        "training rate then comes from the windows logged so far)",
    )
    parser.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the measured commands (e.g. OMP_WAIT_POLICY=PASSIVE)",
    )
    args = parser.parse_args()
    trees = {}
    for item in args.trees:
        label, src = item.split("=", 1)
        trees[label] = (Path(src).resolve(), _has_threads_option(Path(src).resolve()))
    print(
        f"# {os.cpu_count()} CPUs; "
        + "; ".join(
            f"{label}: {src}, --threads option: {opt}" for label, (src, opt) in trees.items()
        )
        + f"; extra environment: {' '.join(args.env) or 'none'}"
    )
    print(
        "| tree | setting | /proc/loadavg before | training's threads | train tokens/s | "
        "eval sentences/s |"
    )
    print("|---|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        # the checkpoint every evaluation reads: 10 steps of the preset, not timed
        eval_run = Path(work) / "eval-run"
        src, has_option = next(iter(trees.values()))
        env, extra = _env(src, "1", has_option, args.env)
        if _train(src, eval_run, 10, env, extra, 600) is None:
            raise SystemExit("the untimed 10-step training for the evaluation checkpoint timed out")
        for setting in args.settings:
            for label, (src, has_option) in trees.items():
                r = measure(src, setting, args, Path(work) / label, eval_run, has_option)
                print(
                    f"| {label} | {r['setting']} | {r['loadavg_before']} | {r['threads']} | "
                    f"{r['train']} | {r['eval']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
