"""Bit-identity check of a refactoring: the same tiny trainings and evaluations on two source
trees must give the same logged numbers, weights and evaluation results.

For each tree (``name=path``, a checkout whose ``src/`` holds ``textvae``), every run of
:data:`RUNS` is trained with ``textvae train`` (no preset, ``key=value`` overrides only, on a
tiny corpus written once, one thread) and then evaluated with ``textvae evaluate
--max-sentences 30 --iw-samples 10``. The runs exercise the remedies: bag-of-words, free bits in
each mode, the cyclical and linear KL schedules, the KL target, autoencoder pretraining with the
decoder reset, early stopping and a frozen decoder, aggressive training, the collapse watch, a
flow posterior, DELLA's layer-wise latents and a resume mid-run. Compared between the trees:

- ``log``: every ``log.jsonl`` record with the wall-clock fields (``tokens_per_s``) removed;
- ``weights``: the sha256 of every ``*.safetensors`` file of the run folder (best, last,
  ae_best checkpoints);
- ``samples``: ``samples.txt``;
- ``eval``: the evaluation JSON without its timing and provenance fields.

    OMP_NUM_THREADS=1 TEXTVAE_DATA_DIR=../shared/data python bench/identical.py \\
        --trees before=../base after=. --out runs/identical

(``../base``: a second checkout, e.g. ``git worktree add ../base <commit>``.) Prints one line per
run and item (``identical`` or what differs) and exits 1 on any difference. A tree's runs are
kept under ``--out/<name>/`` (a tree already run is not re-run: delete its folder to redo it).

:data:`RUNS` holds the keys of today's per-model configs (issue 13): the LSTM sizes
``model.embed_dim`` / ``model.hidden_dim`` only for the LSTM runs (``t5_vae`` and ``della``
refuse them), and DELLA's bag-of-words width as ``model.bow_hidden``. When the keys differ
between the trees, change one tree's overrides with ``--set TREE:RUN:KEY=VALUE`` (added) and
``--set TREE:RUN:~KEY`` (left out). Against a tree from before per-model configs, where
``model.hidden_dim`` set DELLA's bag-of-words width and ``model.bow_hidden`` did not exist::

    --set before:della-cyclical:~model.bow_hidden --set before:della-cyclical:model.hidden_dim=16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")
WORDS = "the a cat dog sat ran on under mat log big small red blue".split()

# every run's: the latent size and the training settings
SMALL = [
    "model.latent_dim=4",
    "train.batch_size=16",
    "train.optimizer=adam",
    "train.lr=0.01",
    "train.lr_scheduler=constant",
    "train.log_every=3",
    "train.progress=false",
    "train.num_samples=2",
    "train.eval_every=6",
    "train.max_steps=24",
    "train.seed=3",
]
# the LSTM models' sizes (lstm_vae): the configs of t5_vae and della refuse these keys
LSTM_SMALL = ["model.embed_dim=16", "model.hidden_dim=16", *SMALL]
# the tiny backbones of tests/conftest.py, written out here: this script runs other trees'
# code (older ones too), and bench scripts do not import the test package (its __init__
# sets the suite's OpenMP wait policy)
TINY_T5 = [
    "model.t5_d_model=16",
    "model.t5_d_ff=32",
    "model.t5_num_layers=1",
    "model.t5_num_decoder_layers=2",
    "model.t5_num_heads=2",
    "model.t5_d_kv=8",
    "model.t5_vocab_size=60",
]
TINY_GPT2 = [
    "model.gpt2_n_embd=16",
    "model.gpt2_n_layer=2",
    "model.gpt2_n_head=2",
    "model.gpt2_n_positions=128",
    "model.gpt2_vocab_size=60",
]
# name -> (overrides, resume_overrides or None): the second trains on from the first's
# checkpoint with --resume (same overrides plus these)
RUNS: dict[str, tuple[list[str], list[str] | None]] = {
    "lstm-bow-cyclical": (
        [
            *LSTM_SMALL,
            "model.bow_weight=0.5",
            "kl.schedule=cyclical",
            "kl.cycle_epochs=1",
            "kl.free_bits=0.3",
            "kl.free_bits_mode=per_dim",
            "train.lr_scheduler=plateau",
            "train.lr_patience=0",
        ],
        None,
    ),
    "lstm-target-sentence-fb": (
        [
            *LSTM_SMALL,
            "model.pooling=max",
            "kl.schedule=linear",
            "kl.warmup_steps=10",
            "kl.free_bits=0.2",
            "kl.free_bits_mode=per_sentence_dim",
            "kl.target=2.0",
            "kl.target_weight=2.0",
            "train.collapse_patience=1",
            "train.collapse_kl=100",
        ],
        None,
    ),
    "lstm-ae-aggressive-resume": (
        [
            *LSTM_SMALL,
            "train.max_steps=12",
            "train.ae_pretrain_steps=8",
            "train.ae_reset_decoder=true",
            "train.aggressive=true",
            "train.aggressive_max_inner=4",
            "train.aggressive_window=2",
            "train.eval_every=4",
            "kl.warmup_steps=5",
        ],
        ["train.max_steps=30"],
    ),
    "t5-ae-earlystop-frozen": (
        [
            *SMALL,
            *TINY_T5,
            "model.name=t5_vae",
            "model.latent_injection=both",
            "train.ae_pretrain_steps=100",
            "train.ae_patience=1",
            "train.ae_freeze_decoder=true",
            "train.ae_reset_decoder=false",
            "train.ae_start=best",
            "train.eval_every=2",
            "train.lr=0.05",
            "kl.schedule=constant",
        ],
        None,
    ),
    "flow-iaf-total-fb": (
        [
            *LSTM_SMALL,
            "model.posterior_flow=iaf",
            "model.posterior_flow_steps=2",
            "model.flow_hidden=16",
            "kl.free_bits=0.5",
            "kl.free_bits_mode=total",
            "kl.warmup_steps=10",
        ],
        None,
    ),
    "della-cyclical": (
        [
            *SMALL,
            *TINY_GPT2,
            "model.name=della",
            "model.backbone=gpt2",
            "model.gpt2_tokenizer=bpe",
            "model.bow_weight=0.5",
            "model.bow_hidden=16",
            "kl.schedule=cyclical",
            "kl.cycle_epochs=1",
            "kl.free_bits=0.1",
            "kl.free_bits_mode=per_layer",
            "train.max_steps=12",
        ],
        None,
    ),
}
TIMING = ("tokens_per_s",)
EVAL_SKIP = ("seconds", "time", "elapsed", "run_dir", "threads", "textvae_version", "command")


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in zip(SPLITS, (200, 40, 40), (0, 1, 2), strict=True):
        rng = random.Random(seed)
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (folder / "tiny.yaml").write_text(
        "data:\n  corpus: null\n"
        + "".join(f"  {s}_path: {folder.resolve() / (s + '.txt')}\n" for s in SPLITS)
    )


def _run(command: list[str], env: dict, tree: Path) -> None:
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)}\nfailed in {tree}:\n{done.stderr[-3000:]}")


def run_tree(tree: Path, out: Path, corpus: Path, extra: dict[str, list[str]]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    preset = corpus / "tiny.yaml"  # the CLI's train wants a preset: the corpus only
    cli = [sys.executable, "-m", "textvae.cli"]
    for name, (overrides, resume) in RUNS.items():
        run_dir = out / name
        if (run_dir / "eval.json").is_file():
            continue
        drop = {e[1:] for e in extra.get(name, []) if e.startswith("~")}  # ~key: leave it out
        kept = [o for o in overrides if o.split("=", 1)[0] not in drop]
        args = [str(preset), *kept, *(e for e in extra.get(name, []) if not e.startswith("~"))]
        train = [*cli, "train", "--threads", "1", "--run-dir", str(run_dir), *args]
        _run(train, env, tree)
        if resume is not None:
            _run([*train, *resume, "--resume"], env, tree)
        evaluate = [*cli, "evaluate", str(run_dir), "--max-sentences", "30", "--iw-samples"]
        evaluate += ["10", "--threads", "1", "--no-progress", "--output"]
        evaluate += [str(run_dir / "eval.json")]
        _run(evaluate, env, tree)
        print(f"{tree}: {name} done", file=sys.stderr)


def fingerprint(run_dir: Path) -> dict[str, object]:
    records = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if k not in TIMING})
    weights = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*.safetensors"))
    }
    evaluation = json.loads((run_dir / "eval.json").read_text())
    evaluation = {k: v for k, v in evaluation.items() if not any(s in k for s in EVAL_SKIP)}
    return {
        "log": records,
        "weights": weights,
        "samples": (run_dir / "samples.txt").read_text(),
        "eval": evaluation,
    }


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} entries"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def max_relative(a, b) -> float:
    """The largest |a - b| / max(|a|, |b|) over the numbers the two structures share."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((max_relative(a[k], b[k]) for k in set(a) & set(b)), default=0.0)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((max_relative(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and a != b:
        return abs(a - b) / max(abs(a), abs(b))
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs=2, required=True, metavar="NAME=PATH")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TREE:RUN:KEY=VALUE",
        help="an extra override for one tree's run (e.g. after a key moved); "
        "TREE:RUN:~KEY leaves the run's KEY out",
    )
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    corpus = args.out / "corpus"
    write_corpus(corpus)
    prints = {}
    for name, path in trees.items():
        extra: dict[str, list[str]] = {}
        for item in args.set:
            tree, run, override = item.split(":", 2)
            if tree == name:
                extra.setdefault(run, []).append(override)
        run_tree(Path(path).resolve(), args.out / name, corpus.resolve(), extra)
        prints[name] = {run: fingerprint(args.out / name / run) for run in RUNS}
    (first, a), (second, b) = prints.items()
    failed = False
    for run in RUNS:
        for item in ("log", "weights", "samples", "eval"):
            diff = differences(a[run][item], b[run][item])
            n = len(a[run][item]) if isinstance(a[run][item], (list, dict)) else 1
            status = "identical"
            if diff:
                rel = max_relative(a[run][item], b[run][item])
                status = f"DIFFERENT ({len(diff)}, max rel. {rel:.1e}): {'; '.join(diff[:3])}"
            print(f"{run:28s} {item:8s} ({n:3d} entries) {first} vs {second}: {status}")
            failed |= bool(diff)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
