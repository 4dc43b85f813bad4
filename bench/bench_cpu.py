"""CPU throughput of the PTB CPU preset: training tokens/s, IW-NLL sentences/s, FLOP/s.

Measures, on the machine it runs on (results recorded in bench/RESULTS.md):

1. the float32 and bfloat16 matrix-multiply rate for the model's dominant shape (the output
   projection: rows x H times H x V);
2. training throughput (predicted tokens/s, EOS counted) of ``configs/ptb/lstm-vae-cpu.yaml`` in
   float32 and under bf16 autocast, with achieved FLOP/s from an analytic FLOP count;
   optionally one full epoch of each from the same initialisation, to compare validation ELBO;
3. IW evaluation (sentences/s at K) of ``textvae.metrics.evaluate`` (batched over sentences and
   samples, in float32 and bf16) against a one-sentence-at-a-time loop like the public
   implementations (batch of one sentence, 100 samples per chunk, encoder re-run per chunk),
   with the NLL each gives.

Usage:
    TEXTVAE_DATA_DIR=../shared/data python bench/bench_cpu.py [--run-dir RUN] [--one-epoch]

``--run-dir`` takes the weights of a trained run (the NLL comparison is then meaningful);
without it the model is freshly initialised (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

import textvae
from textvae.config import load_config
from textvae.data import TextDataset, build_tokenizer, load_split
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings, iw_bound, iw_log_weights, kl_weight
from textvae.train import build_optimizer, optimizer_step

PRESET = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "lstm-vae-cpu.yaml"


def matmul_rate(rows: int, h: int, v: int, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of (rows, h) @ (h, v) in ``dtype``."""
    a, w = torch.randn(rows, h, dtype=dtype), torch.randn(v, h, dtype=dtype)
    a @ w.T
    start = time.perf_counter()
    for _ in range(reps):
        a @ w.T
    return 2 * rows * h * v * reps / (time.perf_counter() - start) / 1e9


def forward_flops_per_token(e: int, h: int, d: int, v: int, decoder_only: bool = False) -> float:
    """Multiply-adds x 2 of one predicted token: LSTM gates (4H x (input + H)) and the output."""
    dec = 2 * 4 * h * (e + d + h) + 2 * h * v
    return dec if decoder_only else dec + 2 * 4 * h * (e + h)


def train_steps(
    cfg,
    tok,
    ds,
    precision: str,
    n_batches: int | None = None,
    warmup: int = 5,
    compile_model: bool = False,
) -> tuple[torch.nn.Module, float, float]:
    """Train a fresh model (seed 0) with the preset's optimizer, clip, objective and beta schedule
    for ``n_batches`` steps (None: one epoch) after ``warmup`` untimed steps (which include the
    compilation when ``compile_model``): the forward under bf16 autocast with ``precision`` bf16,
    then the training loop's update (:func:`textvae.train.optimizer_step`). Returns (model,
    tokens/s, timed seconds)."""
    torch.manual_seed(0)
    model = MODELS[cfg.model.name](cfg.model, tok).train()
    opt = build_optimizer(cfg, model.parameters())
    step_fn = torch.compile(model, dynamic=True) if compile_model else model
    batches = ds.batches(cfg.train.batch_size, True, 0, 0)
    batches = batches[: warmup + n_batches] if n_batches is not None else batches
    objective = ObjectiveSettings.from_config(cfg.kl)  # free bits, their mode, KL target
    tokens, start = 0, time.perf_counter()
    for step, idx in enumerate(batches):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        batch = ds.collate(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = step_fn(batch, objective.at(kl_weight(step, cfg.kl)))
        optimizer_step(out["loss"], model, [opt], cfg.train.grad_clip)
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return model, tokens / seconds, seconds


@torch.no_grad()
def reference_iw_loop(
    model, ds: TextDataset, k: int, per_chunk: int = 100
) -> tuple[float, list[float]]:
    """The public implementations' IW loop: one sentence at a time, ``per_chunk`` samples per
    decoder call, the encoder re-run for every chunk. Returns (seconds, per-sentence nll)."""
    model.eval()
    nll = []
    start = time.perf_counter()
    for i in range(len(ds)):
        batch = ds.collate([i])
        log_w = []
        for _ in range(math.ceil(k / per_chunk)):
            q, p = model.posterior(batch), model.prior(batch)
            lw, _ = iw_log_weights(model, batch, q, p, q.sample((per_chunk,)))
            log_w.append(lw)
        nll.append(-float(iw_bound(torch.cat(log_w)[:k])[0]))
    return time.perf_counter() - start, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="use the weights (and tokenizer) of a trained run")
    parser.add_argument("--sentences", type=int, default=128, help="test sentences for IW timing")
    parser.add_argument("--reference-sentences", type=int, default=16)
    parser.add_argument("--iw-samples", type=int, default=500)
    parser.add_argument("--train-batches", type=int, default=60)
    parser.add_argument(
        "--one-epoch", action="store_true", help="also train one epoch in fp32 and bf16"
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (bf16)")
    args = parser.parse_args()

    cfg = load_config(PRESET)
    m = cfg.model
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.run_dir:
        model, tok = textvae.load(args.run_dir)
        cfg = model.config
    else:
        tok = build_tokenizer(load_split(cfg.data, "train").texts)
        torch.manual_seed(0)
        model = MODELS[m.name](m, tok).eval()
    v = len(tok)
    print(
        f"model: embed {m.embed_dim}, hidden {m.hidden_dim}, latent {m.latent_dim}, vocab {v}, "
        f"batch {cfg.train.batch_size}"
    )

    print(
        f"\n## matmul rate, output projection shape (16384 x {m.hidden_dim}) @ ({m.hidden_dim} x {v})"
    )
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates[name] = matmul_rate(16384, m.hidden_dim, v, dtype)
        print(f"  {name}: {rates[name]:.0f} GFLOP/s")

    train_texts = load_split(cfg.data, "train").texts
    ds = TextDataset(train_texts, tok)
    f_train = 3 * forward_flops_per_token(m.embed_dim, m.hidden_dim, m.latent_dim, v)
    print(
        f"\n## training throughput ({args.train_batches} steps, {f_train / 1e6:.1f} MFLOP per token fwd+bwd)"
    )
    for precision in ("fp32", "bf16"):
        _, tps, sec = train_steps(cfg, tok, ds, precision, args.train_batches)
        print(
            f"  {precision}: {tps:.0f} tokens/s, {tps * f_train / 1e9:.0f} GFLOP/s achieved "
            f"({100 * tps * f_train / 1e9 / rates[precision]:.0f}% of the {precision} matmul rate)"
        )

    if args.compile:
        start = time.perf_counter()
        try:
            _, tps, sec = train_steps(cfg, tok, ds, "bf16", args.train_batches, compile_model=True)
            print(
                f"  bf16 + torch.compile: {tps:.0f} tokens/s "
                f"(warm-up incl. compilation {time.perf_counter() - start - sec:.0f} s)"
            )
        except Exception as err:  # report, do not hide: compile support varies by machine
            print(f"  bf16 + torch.compile: failed ({type(err).__name__}: {str(err)[:200]})")

    if args.one_epoch:
        valid = TextDataset(load_split(cfg.data, "valid").texts[:1000], tok)
        print(
            "\n## one epoch from the same init (validation: first 1000 valid sentences, 1-sample ELBO)"
        )
        for precision in ("fp32", "bf16"):
            trained, tps, sec = train_steps(cfg, tok, ds, precision, None, warmup=0)
            r = evaluate(trained, valid, iw_samples=0)
            print(
                f"  {precision}: {tps:.0f} tokens/s over {sec:.0f} s, "
                f"valid ELBO {r['elbo']:.2f}, KL {r['kl']:.2f} nats/sentence"
            )

    test = TextDataset(load_split(cfg.data, "test").texts[: args.sentences], tok)
    k = args.iw_samples
    f_eval = forward_flops_per_token(m.embed_dim, m.hidden_dim, m.latent_dim, v, decoder_only=True)
    tokens_per_sentence = test.n_tokens / len(test)
    print(f"\n## IW-NLL, K={k}, first {len(test)} PTB test sentences")
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        r = evaluate(model, test, iw_samples=k, precision=precision)
        sec = time.perf_counter() - start
        sps = len(test) / sec
        gflops = sps * k * tokens_per_sentence * f_eval / 1e9
        print(
            f"  textvae evaluate ({precision}): {sps:.2f} sentences/s, "
            f"nll {r['nll']:.3f} +- {r['nll_stderr']:.3f}, {gflops:.0f} GFLOP/s achieved"
        )
    ref = TextDataset(test.texts[: args.reference_sentences], tok)
    sec, nll = reference_iw_loop(model, ref, k)
    batched = evaluate(model, ref, iw_samples=k)
    print(
        f"  one-sentence loop (fp32, 100 samples/chunk, encoder re-run): "
        f"{len(ref) / sec:.2f} sentences/s on the first {len(ref)}; its nll {sum(nll) / len(nll):.3f} "
        f"vs batched {batched['nll']:.3f} +- {batched['nll_stderr']:.3f} on the same sentences"
    )


if __name__ == "__main__":
    main()
