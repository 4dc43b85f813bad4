"""Seconds per training step of a preset, to size its step budget (e.g. the T5 VAE and DELLA CPU
presets; a dialogue preset's batches carry their contexts).

Builds the preset's tokenizer and model exactly as ``textvae train`` does, then times
``--steps`` optimizer steps of the training objective (the forward, then the training loop's
update ``textvae.train.optimizer_step``: backward, clip, the preset's optimizer; the preset's
batch size, beta 1, the preset's free bits, their mode and KL target) on shuffled batches of
the training split, after ``--warmup`` untimed steps, and one validation pass (``evaluate`` with
``iw_samples=0`` on ``train.valid_limit_eval`` sentences), under fp32 and bf16 autocast. No run
folder is written; nothing is trained beyond the timed steps.

    OMP_NUM_THREADS=1 TEXTVAE_DATA_DIR=../shared/data python bench/t5_step_time.py \\
        configs/ptb/t5-vae-cpu.yaml --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from textvae.config import load_config
from textvae.data import TextDataset, load_split
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings
from textvae.train import build_optimizer, optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    t = config.train
    start = time.perf_counter()
    train_corpus, valid_corpus = load_split(config.data, "train"), load_split(config.data, "valid")
    # a dialogue corpus: the vocabulary covers responses and contexts, as textvae train builds it
    tokenizer = MODELS[config.model.name].make_tokenizer(
        config, train_corpus.texts + (train_corpus.contexts or [])
    )
    print(f"tokenizer: {len(tokenizer)} types, built in {time.perf_counter() - start:.1f} s")
    train_ds = TextDataset(train_corpus.texts, tokenizer, contexts=train_corpus.contexts)
    n_valid = t.valid_limit_eval or len(valid_corpus.texts)
    valid_contexts = valid_corpus.contexts[:n_valid] if valid_corpus.contexts is not None else None
    valid_ds = TextDataset(valid_corpus.texts[:n_valid], tokenizer, contexts=valid_contexts)
    print(f"tokens per sentence (EOS counted): train {train_ds.n_tokens / len(train_ds):.2f}")
    batches = train_ds.batches(t.batch_size, True, t.seed, 0)
    print(f"torch threads: {torch.get_num_threads()}; steps per epoch: {len(batches)}")
    for precision in args.precisions:
        torch.manual_seed(t.seed)
        model = MODELS[config.model.name](config.model, tokenizer).train()
        n_params = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(config, model.parameters())
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        times, tokens = [], 0
        # the preset's objective (free bits and their mode, KL target) at beta 1
        objective = ObjectiveSettings.from_config(config.kl).at(1.0)
        for i in range(args.warmup + args.steps):
            batch = train_ds.collate(batches[i % len(batches)])
            t0 = time.perf_counter()
            with autocast:
                out = model(batch, objective)
            optimizer_step(out["loss"], model, [opt], t.grad_clip)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens += int(batch["attention_mask"].sum())
        per_step = sum(times) / len(times)
        t0 = time.perf_counter()
        evaluate(
            model,
            valid_ds,
            iw_samples=0,
            batch_size=config.eval.batch_size,
            chunk_tokens=config.eval.chunk_tokens,
            precision=precision,
        )
        valid_s = time.perf_counter() - t0
        print(
            f"{precision}: {n_params / 1e6:.2f} M parameters, {per_step:.3f} s/step "
            f"(mean of {len(times)}; min {min(times):.3f}, max {max(times):.3f}), "
            f"{tokens / sum(times):.0f} tokens/s; one validation ({len(valid_ds)} sentences) "
            f"{valid_s:.1f} s"
        )
        if t.max_steps:
            n_valid_passes = t.max_steps // t.eval_every if t.eval_every else 0
            total = t.max_steps * per_step + n_valid_passes * valid_s
            print(
                f"  projected for train.max_steps={t.max_steps} with {n_valid_passes} "
                f"validations: {total / 60:.1f} min"
            )


if __name__ == "__main__":
    main()
