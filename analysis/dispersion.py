"""Long et al. 2019's encoder feature dispersion on PTB (issue 15, item 7), at initialisation
and after training.

Usage: python analysis/dispersion.py [--sentences N] [--preset configs/ptb/lstm-vae-cpu.yaml]
       python analysis/dispersion.py --runs RUN [RUN ...] [--sentences N]

Without ``--runs``, for each pooling (last, mean, max): the preset's LSTM VAE built with random
weights (seed 0, the preset's sizes), its word-level tokenizer built on the PTB training split,
and the ``encoder_dispersion`` field of ``textvae.metrics.evaluate`` (iw_samples=0) over the
first N test sentences. With ``--runs``: the same field for each trained run folder's best
checkpoint (its own tokenizer) on the same first N test sentences, with the run's pooling, its
KL (nats per sentence, one-sample, EOS counted) and active units (delta 0.01) on those sentences.
The same field is also in every run's ``eval-*.json`` and in its validation log (``textvae
report`` draws it).
"""

from __future__ import annotations

import argparse
import time

import torch

from textvae.config import load_config
from textvae.data import TextDataset, build_tokenizer, load_split
from textvae.metrics import evaluate
from textvae.models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--preset", default="configs/ptb/lstm-vae-cpu.yaml")
    parser.add_argument("--runs", nargs="+", help="trained run folders (best checkpoint)")
    args = parser.parse_args()
    if args.runs:
        trained(args.runs, args.sentences)
        return
    base = load_config(args.preset)
    tok = build_tokenizer(
        load_split(base.data, "train").texts, base.data.min_frequency, base.data.max_vocab
    )
    texts = load_split(base.data, "test", whole=True).texts[: args.sentences]
    ds = TextDataset(texts, tok)
    print("| pooling | mean pairwise cosine distance | total variance | relative variance | s |")
    print("|---|---:|---:|---:|---:|")
    for pooling in ("last", "mean", "max"):
        cfg = load_config(args.preset, [f"model.pooling={pooling}"])
        torch.manual_seed(0)
        model = MODELS[cfg.model.name](cfg.model, tok)
        start = time.perf_counter()
        d = evaluate(model, ds, iw_samples=0, batch_size=64)["encoder_dispersion"]
        print(
            f"| {pooling} | {d['mean_cosine_distance']:.4f} | {d['total_variance']:.4g} | "
            f"{d['relative_variance']:.4f} | {time.perf_counter() - start:.0f} |"
        )


def trained(runs: list[str], sentences: int) -> None:
    """One row per trained run folder (best checkpoint): its pooling, KL (one-sample, nats per
    sentence, EOS counted), AU (delta 0.01) and ``encoder_dispersion`` on the first
    ``sentences`` test sentences (whole, in dataset order). Raises what ``textvae.load`` raises
    for a folder without a checkpoint (``RunDirError``, ``FileNotFoundError``)."""
    import textvae

    print(
        "| run | pooling | KL | AU | mean pairwise cosine distance | total variance | "
        "relative variance |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in runs:
        model, tok = textvae.load(run)
        cfg = model.config
        texts = load_split(cfg.data, "test", whole=True).texts[:sentences]
        r = evaluate(model, TextDataset(texts, tok), iw_samples=0, batch_size=64)
        d = r["encoder_dispersion"]
        print(
            f"| {run} | {cfg.model.pooling} | {r['kl']:.2f} | {r['au']} | "
            f"{d['mean_cosine_distance']:.4f} | {d['total_variance']:.4g} | "
            f"{d['relative_variance']:.4f} |"
        )


if __name__ == "__main__":
    main()
