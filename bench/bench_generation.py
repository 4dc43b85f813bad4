"""Cost of the generation metrics: self-BLEU is O(N^2) sentence-BLEU reference extractions.

Usage:
    TEXTVAE_DATA_DIR=../shared/data python bench/bench_generation.py [--run-dir RUN]

Prints the wall time of ``self_bleu`` over N PTB test sentences (stand-ins for prior samples)
for several N, and, with ``--run-dir``, of ``generation_metrics`` (500 greedy prior samples,
1,000 greedy reconstructions of PTB test sentences) on a trained run, split into decoding and
scoring. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from textvae.config import DataConfig
from textvae.data import load_split
from textvae.metrics import corpus_bleu, distinct_n, generation_metrics, self_bleu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir")
    parser.add_argument("--sizes", default="100,250,500,1000")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    texts = load_split(DataConfig(corpus="ptb"), "test").texts
    print(
        f"## self-BLEU (sacrebleu sentence BLEU vs all others), PTB test sentences, {torch.get_num_threads()} threads"
    )
    for n in map(int, args.sizes.split(",")):
        start = time.perf_counter()
        score, _ = self_bleu(texts[:n])
        print(f"  N={n:5d}: {time.perf_counter() - start:7.2f} s  (self-BLEU {score:.2f})")
    start = time.perf_counter()
    corpus_bleu(texts[:1000], texts[1:1001])
    distinct_n(texts[:1000], 2)
    print(f"  corpus BLEU + distinct-2 over 1000 sentences: {time.perf_counter() - start:.2f} s")
    if args.run_dir:
        import textvae
        from textvae.generate import reconstruct, sample_prior

        model, _ = textvae.load(args.run_dir)
        start = time.perf_counter()
        sample_prior(model, 500)
        t_samples = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, 1000, 256):
            reconstruct(model, texts[i : min(1000, i + 256)])
        t_recs = time.perf_counter() - start
        start = time.perf_counter()
        generation_metrics(model, texts[:1000], n_samples=500)
        total = time.perf_counter() - start
        print(
            f"## generation_metrics on {args.run_dir}: {total:.1f} s in all; greedy decoding of "
            f"500 prior samples {t_samples:.1f} s, of 1000 reconstructions {t_recs:.1f} s"
        )


if __name__ == "__main__":
    main()
