"""Achieved FLOP/s of the Transformer VAE CPU presets (T5 VAE, DELLA) in training and in IW
evaluation, against this CPU's matrix-multiply rate for the models' own shapes (issue 17, item 3).

Measures, in one process on ONE thread (``torch.set_num_threads(1)``), every rate both per
wall-clock second and per CPU-second of the process (``time.process_time()``): on a shared
machine the CPU-second figures, and above all the ratio achieved / matmul rate (both measured
the same way in the same run), are what stay meaningful.

1. The float32 and bfloat16 rate of ``F.linear`` for the models' dominant shapes (rows x K
   times K x N: the attention projections, the feed-forward layers d_model x d_ff and back, the
   output projection to the vocabulary), at the row count of a training batch (1,024) and of an
   IW chunk (16,384, ``eval.chunk_tokens``); measured at the start and again at the end.
2. An analytic count of the forward FLOPs (2 per multiply-add, matrix products only: layer
   norms, softmax, activations, dropout, the log-softmax and the Adam update are left out) of
   each measured batch, from its real (B, T) shape, checked against
   ``torch.utils.flop_counter.FlopCounterMode`` on the real model (one training forward, its
   backward, and a whole ``evaluate`` at a small K).
3. Training: ``--train-steps`` optimizer steps (after ``--warmup``) of the preset's objective
   on shuffled PTB training batches (the preset's batch size and optimizer, AdamW, fused, as
   ``textvae train`` builds it; the loop's update ``textvae.train.optimizer_step`` with its
   gradient clipping; bf16 autocast as ``train.precision`` says), tokens/s (predicted
   tokens, EOS counted) and achieved GFLOP/s, training FLOPs = 3 x forward (the usual
   convention: the backward of a matrix product costs two products of the same size, one for
   the gradient of each operand; it holds here for every product, attention scores included,
   because no part is frozen: the CPU presets set ``train.ae_freeze_decoder: false`` and
   nothing else freezes; the embedding's backward is a scatter-add, not a product).
4. IW evaluation: ``textvae.metrics.evaluate`` at K = ``--iw-samples`` (500) on the first
   ``--sentences`` (20) PTB test sentences, in each of ``--precisions`` (default bf16; the
   presets' ``eval.precision`` is fp32, what ``textvae evaluate`` uses unless ``--precision
   bf16``; bench/RESULTS.md records both): sentences/s and
   achieved GFLOP/s, the FLOPs counted as ``evaluate`` runs them (below).

Usage (PYTHONPATH=src, or the package installed):

    OMP_NUM_THREADS=1 TEXTVAE_DATA_DIR=../shared/data python bench/bench_transformer_flops.py \\
        --model both --precisions bf16 fp32     # or --model t5|della --run-dir RUN

About 4.5 CPU-minutes for both models and both precisions (most of it DELLA's fp32 evaluation);
``--no-profile`` skips the two ``torch.profiler`` runs per model.

The count covers the two presets' structure and the options named below; other options (a
bag-of-words head, DELLA's baseline fusions or a subset of latent layers, a pretrained
backbone) are refused with an error rather than miscounted. Without ``--run-dir`` the model
is freshly initialised (seed 0; speed does not depend on the weights; no pretrained weights are
used) and the tokenizer trained on the PTB training split as ``textvae train`` trains it.

The FLOP count. Notation: B sentences, T the batch's padded length (EOS counted), R the real
tokens of the batch (sum of the mask), N rows through a network (B, or S x B for S samples).

T5 VAE (``textvae.models.t5_vae``, transformers' ``T5Stack``; d = t5_d_model, f = t5_d_ff,
I = t5_num_heads x t5_d_kv, V the tokenizer's types, D latent_dim):

- encoder layer (``T5LayerSelfAttention`` + ``T5LayerFF``), per position of (N, T):
  q, k, v and o projections 4 x 2 d I, feed-forward ``DenseReluDense`` (wi d->f, wo f->d)
  2 x 2 d f; attention QK^T and AV over all T keys (eager attention computes the full
  score matrix, padding masked): 2 x 2 T I.
- decoder layer: the same with T + 1 keys (the memory slot of z is a one-position prefix of
  the self-attention cache; the full (T, T + 1) score matrix is computed, the causal mask
  applied to it); the cross-attention is removed.
- latent heads: posterior head d -> 2D per sentence (2 d 2D), the memory projection
  D -> L_dec x 2 x I per decoder row (2 D L_dec 2 I) (``latent_injection`` embedding: 2 D d
  per row; ``pooling=attention``: 2 d^2 + 4 d per encoder position).
- LM head (tied embedding, scaled): 2 d V per real token only (``sequence_log_prob``
  projects only real positions).
- training: the encoder reads the sentence with ``encoder_token_drop`` of its tokens deleted
  (``delete_tokens``: round(p (n - 1)) of n per sentence, columns of only padding cut), so its
  T is the longest survivor, computed from the batch; the decoder reads all T.

DELLA (``textvae.models.della``, its own copy of the GPT-2 block; H = gpt2_n_embd, L =
gpt2_n_layer, all L layers carry a latent in the preset, D = latent_dim per layer):

- block, per position: c_attn H -> 3H (2 H 3H), c_proj (2 H H), MLP H -> 4H -> H (2 x 2 H 4H),
  i.e. 24 H^2, plus attention 2 x 2 T_k H over T_k keys (SDPA with a boolean mask: the full
  score matrix).
- encoder: the L blocks on [BOS] + x, (B, T + 1), bidirectional, T_k = T + 1; ``first``
  pooling and no LayerNorm on x_l (the preset) cost no product (``model.pooling=attention``:
  2 H^2 + 4 H per position and layer, ``AttentionPool``); the posterior head's feature map
  x_l -> 2D for every layer: 2 H 2D L per sentence.
- decoder: the L blocks on (N, T), T_k = T, plus the DELLA fusion (``ValueFusion``, kind
  ``della``: the r factors summed first, so one [v ; 1] W_v product H -> H per position,
  2 H H, and one [z ; 1] W_z per row, 2 D H).
- layer-wise Gaussians: one pass of a ``LayerwiseGaussian`` (ancestral sample,
  ``conditionals`` or ``log_prob``) costs g = L x 2 D 2D (the maps of zbar_l to mu, log
  sigma^2) + (L - 1) x 2 x 2 D D (the recurrence); training makes 3 passes per sentence (one
  sample, q and p conditionals for the KL); evaluation 4 per IW sample (sample with log q,
  log p, q and p conditionals for the per-layer KL), 1 + 256 per sentence (a code and
  E_q[z|x] by 256 draws), and B_1 x B_1 + N x N for the MI (each z under each posterior).
- LM head (tied wte): 2 H V per real token.

IW evaluation (``evaluate``, one batch of up to ``eval.batch_size`` = 64 sentences): the
encoder once per batch for q (T5: twice, the encoder summary for the dispersion is a second
pass; DELLA: once more on the first batch at the end, the template posterior for the MI), the
decoder on 2B rows for the z-usage gap and on K B rows for the K samples (in chunks; the count
is linear in the rows), the LM head on the real tokens of every row.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import textvae
from textvae.config import load_config
from textvae.data import TextDataset, load_split
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings, kl_weight
from textvae.train import build_optimizer, optimizer_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "ptb"
PRESETS = {"t5": CONFIGS / "t5-vae-cpu.yaml", "della": CONFIGS / "della-cpu.yaml"}
LAYERWISE_MEAN_DRAWS = 256  # textvae.posteriors: E_q[z|x] of a LayerwiseGaussian


class Clock:
    """Wall and CPU seconds (of this process) since the start."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_rate(rows: int, k: int, n: int, dtype: torch.dtype, min_cpu: float = 0.15):
    """GFLOP/s of ``F.linear`` (rows, k) x (n, k)^T in ``dtype``: (per wall second, per CPU
    second), over as many repetitions as fill ``min_cpu`` CPU-seconds (after one untimed)."""
    a, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    F.linear(a, w)
    clock, reps = Clock(), 0
    while time.process_time() - clock.cpu < min_cpu:
        F.linear(a, w)
        reps += 1
    wall, cpu = clock.stop()
    flops = 2 * rows * k * n * reps
    return flops / wall / 1e9, flops / cpu / 1e9


def dominant_shapes(name: str, m, v: int) -> list[tuple[str, int, int]]:
    """(label, K, N) of the model's largest products (F.linear K -> N)."""
    if name == "t5":
        d, f, inner = m.t5_d_model, m.t5_d_ff, m.t5_num_heads * m.t5_d_kv
        return [
            (f"q/k/v/o {d}x{inner}", d, inner),
            (f"ffn wi {d}x{f}", d, f),
            (f"ffn wo {f}x{d}", f, d),
            (f"lm head {d}x{v}", d, v),
        ]
    h = m.gpt2_n_embd
    return [
        (f"c_attn {h}x{3 * h}", h, 3 * h),
        (f"mlp fc {h}x{4 * h}", h, 4 * h),
        (f"mlp proj {4 * h}x{h}", 4 * h, h),
        (f"lm head {h}x{v}", h, v),
    ]


# --- the analytic count (module docstring) ---------------------------------------------------


def t5_stack(m, n: int, t: int, keys: int, layers: int) -> int:
    """Forward FLOPs of ``layers`` T5 layers (self-attention + FFN) on (n, t), ``keys`` keys."""
    d, f, inner = m.t5_d_model, m.t5_d_ff, m.t5_num_heads * m.t5_d_kv
    per_layer = n * t * (4 * 2 * d * inner + 2 * 2 * d * f) + n * 2 * 2 * t * keys * inner
    return layers * per_layer


def attention_pool(m, h: int, b: int, t: int) -> int:
    """``AttentionPool`` over (b, t, h) when ``model.pooling`` is ``attention`` (W h_t, v^T,
    the weighted sum), else 0 (first, last, mean, max: no product)."""
    return b * t * (2 * h * h + 4 * h) if m.pooling == "attention" else 0


def t5_encoder(m, b: int, t: int) -> int:
    """The encoder on (b, t), the pooling and the posterior head."""
    d = m.t5_d_model
    pool = attention_pool(m, d, b, t)
    return t5_stack(m, b, t, t, m.t5_num_layers) + pool + b * 2 * d * 2 * m.latent_dim


def t5_decoder(m, v: int, n: int, t: int, real: int) -> int:
    """The decoder on (n, t) with z by memory (a key and value slot per layer: T + 1 keys,
    the projection of z) and/or embedding (W z), the LM head on ``real`` tokens."""
    inner = m.t5_num_heads * m.t5_d_kv
    memory = m.latent_injection in ("memory", "both")
    z_maps = n * 2 * m.latent_dim * m.t5_num_decoder_layers * 2 * inner if memory else 0
    if m.latent_injection in ("embedding", "both"):
        z_maps += n * 2 * m.latent_dim * m.t5_d_model
    lm = real * 2 * m.t5_d_model * v
    keys = t + 1 if memory else t
    return t5_stack(m, n, t, keys, m.t5_num_decoder_layers) + z_maps + lm


def gpt2_stack(m, n: int, t: int, keys: int, fused: bool) -> int:
    """Forward FLOPs of the L GPT-2 blocks on (n, t) over ``keys`` keys, with the DELLA value
    fusion of z in every block when ``fused``."""
    h, d = m.gpt2_n_embd, m.latent_dim
    per_layer = n * t * 24 * h * h + n * 2 * 2 * t * keys * h
    if fused:
        per_layer += n * t * 2 * h * h + n * 2 * d * h
    return m.gpt2_n_layer * per_layer


def della_latent_pass(m) -> int:
    """One pass of a LayerwiseGaussian over one sentence (or one sample): g in the docstring."""
    n_layers, d = m.gpt2_n_layer, m.latent_dim
    return n_layers * 2 * d * 2 * d + (n_layers - 1) * 2 * 2 * d * d


def della_encoder(m, b: int, t: int) -> int:
    """The encoder on [BOS] + x, (b, t + 1), the pooling of every layer and the posterior
    head's feature maps."""
    h, n_layers = m.gpt2_n_embd, m.gpt2_n_layer
    heads = b * n_layers * 2 * h * 2 * m.latent_dim
    pool = n_layers * attention_pool(m, h, b, t + 1)
    return gpt2_stack(m, b, t + 1, t + 1, fused=False) + pool + heads


def della_decoder(m, v: int, n: int, t: int, real: int) -> int:
    """The fused decoder on (n, t) and the LM head on ``real`` tokens."""
    return gpt2_stack(m, n, t, t, fused=True) + real * 2 * m.gpt2_n_embd * v


def check_counted(name: str, m) -> None:
    """The count covers the presets' structure and the options listed here.

    Raises:
        ValueError: a configuration whose extra products the count leaves out.
    """
    if m.bow_weight > 0:
        raise ValueError("model.bow_weight > 0: the bag-of-words head is not counted")
    if name == "della" and (m.fusion != "della" or m.latent_layers is not None):
        raise ValueError(
            f"model.fusion={m.fusion!r}, model.latent_layers={m.latent_layers!r}: the count "
            "covers the della fusion in every layer (the della-cpu preset)"
        )
    if m.pretrained is not None:
        raise ValueError(
            "model.pretrained: the count reads the t5_* / gpt2_* sizes of a fresh model"
        )


def encoder_length(mask: torch.Tensor, fraction: float) -> int:
    """The encoder's padded length after ``delete_tokens`` (same rounding: half to even)."""
    lengths = mask.sum(1).double()
    kept = lengths - torch.round(fraction * (lengths - 1).clamp_min(0))
    return int(kept.max())


def train_forward_flops(name: str, m, v: int, batch: dict) -> int:
    """Forward FLOPs of one training step's objective on ``batch``."""
    mask = batch["attention_mask"]
    b, t = mask.shape
    real = int(mask.sum())
    if name == "t5":
        te = encoder_length(mask, m.encoder_token_drop)
        return t5_encoder(m, b, te) + t5_decoder(m, v, b, t, real)
    te = encoder_length(mask, m.encoder_token_drop) if m.encoder_token_drop > 0 else t
    return della_encoder(m, b, te) + della_decoder(m, v, b, t, real) + 3 * b * della_latent_pass(m)


def iw_flops(name: str, m, v: int, ds: TextDataset, k: int, batch_size: int) -> int:
    """Forward FLOPs of ``evaluate(model, ds, iw_samples=k, batch_size=batch_size)``."""
    total, n = 0, len(ds)
    batches = ds.batches(batch_size, shuffle=False)
    for j, idx in enumerate(batches):
        mask = ds.collate(idx)["attention_mask"]
        b, t = mask.shape
        real = int(mask.sum())
        rows = k + (2 if b >= 2 else 0)  # the K samples and the z-usage gap's two
        if name == "t5":
            total += 2 * t5_encoder(m, b, t)  # q, and the encoder summary
            total += t5_decoder(m, v, rows * b, t, rows * real)
        else:
            total += della_encoder(m, b, t) * (2 if j == 0 else 1)  # + the MI's template
            total += della_decoder(m, v, rows * b, t, rows * real)
            passes = b * (4 * k + 1 + LAYERWISE_MEAN_DRAWS) + b * b  # + the batch's MI
            total += passes * della_latent_pass(m)
    if name == "della":
        total += n * n * della_latent_pass(m)  # the MI over the whole set
    return total


# --- measurements ----------------------------------------------------------------------------


def autocast(precision: str):
    return (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )


def step(model, opt, batch: dict, beta: float, cfg) -> torch.Tensor:
    """One optimizer step of the training objective (the preset's ``kl`` settings at KL weight
    ``beta``), as ``textvae train`` takes it: the forward, then its update
    (:func:`textvae.train.optimizer_step`)."""
    with autocast(cfg.train.precision):
        out = model(batch, ObjectiveSettings.from_config(cfg.kl).at(beta))
    optimizer_step(out["loss"], model, [opt], cfg.train.grad_clip)
    return out["loss"]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention dispatches to here; registered with torch's own formulas
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def counted(fn, cpu_attention: bool = True) -> int:
    """FLOPs FlopCounterMode sees while ``fn()`` runs (with the CPU attention kernel counted
    when ``cpu_attention``)."""
    mapping = CPU_ATTENTION if cpu_attention else None
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def attention_and_lm_flops(name: str, m, v: int, b: int, t_enc: int, t: int, real: int):
    """(attention score FLOPs (QK^T and AV, encoder and decoder), LM head FLOPs) of one
    forward of B sentences: the part of :func:`train_forward_flops` that grows with T^2, and the
    output projection."""
    if name == "t5":
        inner = m.t5_num_heads * m.t5_d_kv
        enc = m.t5_num_layers * b * 4 * t_enc * t_enc * inner
        dec = m.t5_num_decoder_layers * b * 4 * t * (t + 1) * inner
        return enc + dec, real * 2 * m.t5_d_model * v
    h = m.gpt2_n_embd
    attn = m.gpt2_n_layer * b * 4 * h * ((t_enc + 1) ** 2 + t * t)
    return attn, real * 2 * h * v


def profile_top(fn, n: int = 8) -> str:
    """The ``n`` operators with the most self CPU time while ``fn()`` runs (torch.profiler), as
    'name share%' (shares of the total self time, which includes Python-side op dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top)


def bench_model(name: str, args, rates: dict) -> None:
    if args.run_dir:
        model, tok = textvae.load(args.run_dir)
        cfg = model.config
    else:
        cfg = load_config(PRESETS[name])
        clock = Clock()
        tok = MODELS[cfg.model.name].make_tokenizer(cfg, load_split(cfg.data, "train").texts)
        print(f"\n# {name}: tokenizer of {len(tok)} types trained in {clock.stop()[0]:.0f} s")
        torch.manual_seed(0)
        model = MODELS[cfg.model.name](cfg.model, tok)
    m, v = cfg.model, len(tok)
    check_counted(name, m)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# {name}: {cfg.model.name}, {n_params / 1e6:.2f} M parameters, vocab {v}, "
        f"batch {cfg.train.batch_size}, train precision {cfg.train.precision}"
    )
    peak = {}  # (precision, rows) -> the best rate over this model's shapes
    for (n_, prec, rows, _), r in rates.items():
        if n_ == name:
            peak[(prec, rows)] = max(peak.get((prec, rows), 0.0), r[0 if args.wall else 1])

    train_ds = TextDataset(load_split(cfg.data, "train").texts, tok)
    batches = train_ds.batches(cfg.train.batch_size, True, cfg.train.seed, 0)

    # the analytic count against FlopCounterMode: one training forward and its backward
    model.train()
    opt = build_optimizer(cfg, model.parameters())
    batch = train_ds.collate(batches[0])
    torch.manual_seed(1)
    box = {}

    def fwd():
        with autocast(cfg.train.precision):
            box["loss"] = model(batch, ObjectiveSettings.from_config(cfg.kl).at(1.0))["loss"]

    measured_fwd = counted(fwd)
    measured_bwd = counted(lambda: box["loss"].backward())
    opt.zero_grad(set_to_none=True)
    analytic = train_forward_flops(name, m, v, batch)
    b, t = batch["input_ids"].shape
    print(
        f"\n## {name}: FLOP count of one training batch (B={b}, T={t}, "
        f"{int(batch['attention_mask'].sum())} real tokens)\n"
        f"  forward:  analytic {analytic / 1e9:.3f} GFLOP, FlopCounterMode {measured_fwd / 1e9:.3f} "
        f"({100 * (measured_fwd / analytic - 1):+.1f}%)\n"
        f"  backward: analytic (2 x forward) {2 * analytic / 1e9:.3f} GFLOP, FlopCounterMode "
        f"{measured_bwd / 1e9:.3f} ({100 * (measured_bwd / (2 * analytic) - 1):+.1f}%)"
    )

    te = encoder_length(batch["attention_mask"], m.encoder_token_drop)
    attn, lm = attention_and_lm_flops(name, m, v, b, te, t, int(batch["attention_mask"].sum()))
    print(
        f"  of the forward: attention scores (QK^T, AV) {100 * attn / analytic:.1f}%, "
        f"LM head {100 * lm / analytic:.1f}%"
    )

    # training: N optimizer steps after the warm-up
    flops = tokens = 0
    for i in range(args.warmup + args.train_steps):
        if i == args.warmup:
            flops = tokens = 0
            clock = Clock()
        batch = train_ds.collate(batches[(i + 1) % len(batches)])
        step(model, opt, batch, kl_weight(i, cfg.kl), cfg)
        flops += 3 * train_forward_flops(name, m, v, batch)
        tokens += int(batch["attention_mask"].sum())
    wall, cpu = clock.stop()
    prec = cfg.train.precision
    ref = peak[(prec, 1024)]
    sec = wall if args.wall else cpu
    print(
        f"\n## {name}: training, {args.train_steps} steps of batch {cfg.train.batch_size} "
        f"({prec}), {flops / tokens / 1e6:.1f} MFLOP per token fwd+bwd\n"
        f"  wall {wall:.1f} s, CPU {cpu:.1f} s: {tokens / wall:.0f} tokens/s wall, "
        f"{tokens / cpu:.0f} tokens per CPU-second; {flops / wall / 1e9:.1f} GFLOP/s wall, "
        f"{flops / cpu / 1e9:.1f} GFLOP per CPU-second = "
        f"{100 * flops / sec / 1e9 / ref:.1f}% of the best {prec} matmul rate at 1,024 rows "
        f"({ref:.0f})"
    )

    if args.profile:
        prof_batches = [train_ds.collate(batches[-1 - i]) for i in range(2)]
        top = profile_top(lambda: [step(model, opt, x, 1.0, cfg) for x in prof_batches])
        print(f"  profile of 2 more steps, self CPU time: {top}")

    # IW evaluation
    test = TextDataset(load_split(cfg.data, "test", whole=True).texts[: args.sentences], tok)
    bs = cfg.eval.batch_size
    k_check = 10
    measured = counted(lambda: evaluate(model, test, iw_samples=k_check, batch_size=bs))
    plain = counted(lambda: evaluate(model, test, iw_samples=k_check, batch_size=bs), False)
    analytic = iw_flops(name, m, v, test, k_check, bs)
    shapes = [tuple(test.collate(i)["input_ids"].shape) for i in test.batches(bs)]
    padded = sum(b_ * t_ for b_, t_ in shapes)
    print(
        f"\n## {name}: IW evaluation, first {len(test)} PTB test sentences ({test.n_tokens} "
        f"tokens incl. EOS; batches (B, T) {shapes}: {100 * test.n_tokens / padded:.0f}% of "
        f"the padded positions are real)\n"
        f"  FLOP count at K={k_check}: analytic {analytic / 1e9:.3f} GFLOP, FlopCounterMode "
        f"{measured / 1e9:.3f} ({100 * (measured / analytic - 1):+.1f}%); without the CPU "
        f"attention kernel registered {plain / 1e9:.3f} ({100 * (plain / analytic - 1):+.1f}%)"
    )
    if args.profile:
        top = profile_top(
            lambda: evaluate(model, test, iw_samples=20, batch_size=bs, precision="bf16")
        )
        print(f"  profile of evaluate at K=20 (bf16), self CPU time: {top}")
    flops = iw_flops(name, m, v, test, args.iw_samples, bs)
    for prec in args.precisions:
        clock = Clock()
        r = evaluate(model, test, iw_samples=args.iw_samples, batch_size=bs, precision=prec)
        wall, cpu = clock.stop()
        ref = peak[(prec, 16384)]
        sec = wall if args.wall else cpu
        print(
            f"  K={args.iw_samples} {prec}: wall {wall:.1f} s, CPU {cpu:.1f} s: "
            f"{len(test) / wall:.3f} sentences/s wall, {len(test) / cpu:.3f} per CPU-second; "
            f"{flops / 1e9:.0f} GFLOP, {flops / wall / 1e9:.1f} GFLOP/s wall, "
            f"{flops / cpu / 1e9:.1f} per CPU-second = {100 * flops / sec / 1e9 / ref:.1f}% of "
            f"the best {prec} matmul rate at 16,384 rows ({ref:.0f}); nll {r['nll']:.2f}"
        )


def measure_rates(names: list[str], shapes: dict, when: str) -> dict:
    """Matmul rates of every model's dominant shapes; printed as a table."""
    print(f"\n## matmul rate ({when}), GFLOP/s: per wall second / per CPU-second")
    rates = {}
    for name in names:
        for label, k, n in shapes[name]:
            cells = []
            for rows in (1024, 16384):
                for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    r = matmul_rate(rows, k, n, dtype)
                    rates[(name, prec, rows, label)] = r
                    cells.append(f"{prec} x{rows}: {r[0]:.0f} / {r[1]:.0f}")
            print(f"  {name} {label}: " + ", ".join(cells))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["t5", "della", "both"], default="both")
    parser.add_argument("--run-dir", help="the weights and tokenizer of a trained run (one model)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=20, help="test sentences for IW timing")
    parser.add_argument("--iw-samples", type=int, default=500)
    parser.add_argument("--precisions", nargs="+", default=["bf16"])
    parser.add_argument(
        "--wall", action="store_true", help="percentages per wall second (default: CPU-second)"
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the torch.profiler runs"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ["t5", "della"] if args.model == "both" else [args.model]
    if args.run_dir:
        if args.model == "both":
            parser.error("--run-dir holds one model: pass --model t5 or --model della")
        kind = "t5" if textvae.load(args.run_dir)[0].config.model.name == "t5_vae" else "della"
        if kind != args.model:
            parser.error(f"{args.run_dir} holds a {kind} model, not {args.model}")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread; load average {Path('/proc/loadavg').read_text()[:14]}"
    )
    clock = Clock()
    shapes = {}
    for name in names:
        cfg = (
            load_config(PRESETS[name]) if not args.run_dir else textvae.load(args.run_dir)[0].config
        )
        v = cfg.model.t5_vocab_size if name == "t5" else cfg.model.gpt2_vocab_size
        shapes[name] = dominant_shapes(name, cfg.model, v)
    start = measure_rates(names, shapes, "start")
    for name in names:
        bench_model(name, args, start)
    end = measure_rates(names, shapes, "end")
    drift = max(abs(end[key][1] / start[key][1] - 1) for key in start)
    wall, cpu = clock.stop()
    print(
        f"\nlargest change of a matmul rate (per CPU-second) between start and end: "
        f"{100 * drift:.0f}%; the whole run: wall {wall:.0f} s, CPU {cpu:.0f} s; load average "
        f"{Path('/proc/loadavg').read_text()[:14]}"
    )


if __name__ == "__main__":
    main()
