"""Markdown table of evaluation JSONs (and wall times from runs/timings.txt) for docs/results/.

Usage: python bench/results_table.py runs/ptb-lstm-lm-cpu runs/ptb-lstm-vae-cpu ...

Headers and formats of the evaluation fields come from ``textvae.fields.EVAL_FIELDS``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from textvae.fields import field
from textvae.report import format_value

FIELDS = ("rec", "kl", "nll", "ppl_word", "mi", "mi_batch", "au", "iw_samples")


def main(run_dirs: list[str]) -> None:
    timings: dict[tuple[str, str], str] = {}
    timing_file = Path("runs/timings.txt")
    if timing_file.is_file():
        for line in timing_file.read_text().splitlines():
            name, kind, seconds = line.split()
            timings[(name, kind)] = f"{int(seconds) / 60:.1f}"
    head = ["run", *(field(key).column for key in FIELDS), "train min", "eval min"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for run in run_dirs:
        r = json.loads((Path(run) / "eval-test.json").read_text())
        name = Path(run).name.removeprefix("ptb-").removesuffix("-cpu")
        cells = [name, *(format_value(r, key) for key in FIELDS)]
        cells += [timings.get((name, "train_s"), "?"), timings.get((name, "eval_s"), "?")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
