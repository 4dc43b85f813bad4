"""Why bf16 runs as fp32 on a CPU without native bfloat16 (textvae.precision).

Times training steps of the PTB CPU preset (``configs/ptb/lstm-vae-cpu.yaml``: embedding 256,
hidden 256, latent 32, batch 32, the full PTB vocabulary) on the machine it runs on, in three
ways: fp32; bf16 autocast as PyTorch runs it (every op autocast lists, the LSTM included); bf16
autocast with the LSTM kept in float32 (``textvae.precision.lstm_forward``'s fallback). Prints
seconds per step (mean over ``--steps`` after 2 untimed steps; bench_cpu.train_steps: the
preset's Adam, objective and beta schedule, the training loop's update
``textvae.train.optimizer_step`` with its clipping) and tokens/s, or the error a way raised.
Results: bench/RESULTS.md.

Usage:
    TEXTVAE_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python bench/bf16_fallback.py [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import textvae.precision
from bench_cpu import train_steps  # the same timed training loop (bench/ is on sys.path)
from textvae.config import load_config
from textvae.data import TextDataset, build_tokenizer, load_split

PRESET = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "lstm-vae-cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(PRESET)
    texts = load_split(cfg.data, "train").texts
    tok = build_tokenizer(texts)
    ds = TextDataset(texts[:2000], tok)
    native = textvae.precision.bf16_native("cpu")
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native}"
    )
    ways = {
        "fp32": (False, native),
        "bf16 autocast, LSTM in bf16 (PyTorch as is)": (True, True),
        "bf16 autocast, LSTM in fp32 (textvae's fallback)": (True, False),
    }
    for name, (bf16, treat_as_native) in ways.items():
        textvae.precision.bf16_native = lambda kind, v=treat_as_native: v
        try:
            _, tokens_per_s, seconds = train_steps(
                cfg, tok, ds, "bf16" if bf16 else "fp32", args.steps, warmup=2
            )
            print(f"{name}: {seconds / args.steps:.3f} s/step, {tokens_per_s:.0f} tokens/s")
        except RuntimeError as err:
            print(f"{name}: RuntimeError: {str(err).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
