"""The honest numbers of a DELLA run trained with the released code's layer-averaged KL.

`textvae evaluate` on a run trained with ``model.kl_reduction: mean`` reports what that
objective reports (the KL and log-densities averaged over the L layers) and marks
``bound_valid: false``. This script evaluates the same weights with the KL and log-densities
SUMMED over layers, the valid ELBO and IW bound (Hu et al. 2022 sum the layer KLs in the paper's
objective; the released code averages them), on the same sentences with the
same seed, so the two JSONs show how much the averaging inflates the reported likelihood.
kl_reduction changes no parameter: only how the layer terms are combined.

Usage (after `textvae sweep experiments/della-ptb.yaml`, which trains the klmean entry):
    TEXTVAE_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python analysis/della_klmean_sum.py \
        runs/della/ptb-della-klmean-cpu --max-sentences 500 --iw-samples 500
writes RUN/eval-test<N>-sum.json (bf16, seed 0, the test split).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import textvae
from textvae.atomic import write_json
from textvae.data import TextDataset, load_split
from textvae.metrics import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-sentences", type=int, default=500)
    parser.add_argument("--iw-samples", type=int, default=500)
    args = parser.parse_args()
    model, tokenizer = textvae.load(args.run_dir)
    if getattr(model, "kl_reduction", None) != "mean":
        raise SystemExit(f"{args.run_dir}: not a DELLA run trained with model.kl_reduction=mean")
    model.kl_reduction = "sum"
    corpus = load_split(model.config.data, "test", whole=True)
    dataset = TextDataset(corpus.texts[: args.max_sentences], tokenizer)
    start = time.perf_counter()
    result = evaluate(model, dataset, iw_samples=args.iw_samples, precision="bf16", seed=0)
    assert result["bound_valid"], "the summed KL must give a valid bound"
    result.update(
        data=corpus.source,
        split="test",
        seconds=time.perf_counter() - start,
        note="weights trained with kl_reduction=mean, evaluated with the sum over layers",
    )
    out = Path(args.run_dir) / f"eval-test{args.max_sentences}-sum.json"
    write_json(out, result)
    print(
        f"nll {result['nll']:.2f} ± {result['nll_stderr']:.2f}, kl {result['kl']:.2f}, "
        f"ppl_word {result['ppl_word']:.1f}; written: {out}"
    )


if __name__ == "__main__":
    main()
