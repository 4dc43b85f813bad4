"""Long et al. 2019's encoder feature dispersion on PTB (issue 15, item 7), at initialisation.

Usage: python bench/dispersion.py [--sentences N] [--preset configs/ptb/lstm-vae-cpu.yaml]

For each pooling (last, mean, max): the preset's LSTM VAE built with random weights (seed 0, the
preset's sizes), its word-level tokenizer built on the PTB training split, and the
``encoder_dispersion`` field of ``textvae.metrics.evaluate`` (iw_samples=0) over the first N
test sentences. After training, the same field is in every run's ``eval-*.json`` and in its
validation log (``textvae report`` draws it).
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
