"""Markdown table of evaluation JSONs (and wall times from runs/timings.txt) for docs/results/.

Usage: python bench/results_table.py runs/ptb-lstm-lm-cpu runs/ptb-lstm-vae-cpu ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dirs: list[str]) -> None:
    timings: dict[tuple[str, str], str] = {}
    timing_file = Path("runs/timings.txt")
    if timing_file.is_file():
        for line in timing_file.read_text().splitlines():
            name, kind, seconds = line.split()
            timings[(name, kind)] = f"{int(seconds) / 60:.1f}"
    print(
        "| run | rec | kl | nll ± stderr | ppl_word | mi | mi_batch | au (δ) | K | train min | eval min |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in run_dirs:
        r = json.loads((Path(run) / "eval-test.json").read_text())
        name = Path(run).name.removeprefix("ptb-").removesuffix("-cpu")

        def f(key, fmt="{:.2f}", r=r):
            return "–" if r[key] is None else fmt.format(r[key])

        au = "–" if r["au"] is None else f"{r['au']} ({r['au_delta']})"
        print(
            f"| {name} | {f('rec')} | {f('kl')} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} | "
            f"{f('ppl_word', '{:.1f}')} | {f('mi', '{:.3f}')} | {f('mi_batch', '{:.3f}')} | {au} | "
            f"{r['iw_samples'] or 'exact'} | {timings.get((name, 'train_s'), '?')} | "
            f"{timings.get((name, 'eval_s'), '?')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
