"""Wall time of ``textvae evaluate`` on 1 process vs N processes (sharded, gloo), one thread each.

Runs the real command twice on the same run folder and sentences: once as one process, once
under ``torchrun --nproc_per_node N`` (what ``accelerate launch --multi_gpu --num_processes N``
runs), each process with ``OMP_NUM_THREADS=1``; checks that the two evaluation JSONs agree (every
field to 1e-6, ``seconds`` aside) and prints one result line per run with the evaluation's own
time (the JSON's ``seconds``: model loaded, process group up), the wall time of the whole
command (start-up included) and the load average of the machine before and after, read from
``/proc/loadavg`` (figures taken while other work shares the cores are contended).

Usage:
    TEXTVAE_DATA_DIR=../shared/data python bench/bench_sharded_eval.py RUN_DIR \\
        [--max-sentences 200] [--iw-samples 500] [--processes 2] [--batch-size B]
        [--precision bf16] [--keep DIR]

``--keep DIR`` keeps the two evaluation JSONs as ``DIR/eval-1proc.json`` and
``DIR/eval-Nproc.json`` (e.g. the run folder, so the timed evaluation is also the run's
evaluation); without it they are written to a temporary folder and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args, output: Path) -> dict:
    cli = [
        "-m",
        "textvae.cli",
        "evaluate",
        args.run_dir,
        "--split",
        args.split,
        "--iw-samples",
        str(args.iw_samples),
        "--max-sentences",
        str(args.max_sentences),
        "--output",
        str(output),
    ]
    if args.batch_size:
        cli += ["--batch-size", str(args.batch_size)]
    if args.precision:
        cli += ["--precision", args.precision]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *cli,
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
    }
    before, start = loadavg(), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    result = json.loads(output.read_text())
    return {
        "processes": processes,
        "eval_s": result["seconds"],
        "wall_s": wall,
        "load_before": before,
        "load_after": loadavg(),
        "result": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-sentences", type=int, default=200)
    parser.add_argument("--iw-samples", type=int, default=500)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluation batch (default: the run's eval.batch_size); the processes "
        "share whole batches, so there must be at least as many as processes",
    )
    parser.add_argument(
        "--precision", default=None, help="evaluation precision (default: the run's eval config)"
    )
    parser.add_argument("--keep", default=None, help="folder to keep the two evaluation JSONs in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        for name in ("eval-1proc.json", f"eval-{args.processes}proc.json"):
            if (folder / name).exists():
                raise SystemExit(f"{folder / name} exists; it is never overwritten")
        one = run(1, args, folder / "eval-1proc.json")
        many = run(args.processes, args, folder / f"eval-{args.processes}proc.json")
    a, b = one.pop("result"), many.pop("result")
    worst = 0.0
    for key in a:
        if key == "seconds":
            continue
        x, y = a[key], b[key]
        if isinstance(x, float):
            worst = max(worst, abs(x - y))
        elif isinstance(x, list) and x and isinstance(x[0], float):
            worst = max(worst, max(abs(u - v) for u, v in zip(x, y, strict=True)))
        elif x != y:
            raise SystemExit(
                f"the {args.processes}-process evaluation differs in {key}: {x} vs {y}"
            )
    print(
        f"{args.run_dir}, {args.split} first {args.max_sentences} sentences, K={args.iw_samples}, "
        f"batch size {args.batch_size or 'of the run'}, "
        f"nll {a['nll']:.4f}; largest difference between the two JSONs: {worst:.2e}"
    )
    for r in (one, many):
        print(
            f"  {r['processes']} process(es), 1 thread each: evaluation {r['eval_s']:.1f} s, "
            f"command {r['wall_s']:.1f} s; load average {r['load_before']} -> {r['load_after']}"
        )
    print(f"  speed-up of the evaluation: {one['eval_s'] / many['eval_s']:.2f}x")


if __name__ == "__main__":
    main()
