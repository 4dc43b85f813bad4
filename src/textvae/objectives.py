"""The maths of training and of the likelihood bounds, written once for every model.

Units: everything here is in nats **per sentence** (summed over a sentence's real tokens,
EOS counted, padding never), float32. Loss values are means over the batch of per-sentence
quantities, so the KL weight means what the ELBO says (no per-token averaging that would
silently re-weight the KL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from textvae.config import KLConfig


def sequence_log_prob(
    hidden: torch.Tensor,
    output: torch.nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor,
    float32_softmax: bool = True,
    block_rows: int = 512,
) -> torch.Tensor:
    """log p(x) of each sequence: sum over real positions of log softmax(output(h_t))[x_t].

    The output projection runs only on real positions (padding costs nothing), in blocks of
    ``block_rows`` positions so that the (block, V) logits stay in cache while they are cast
    and normalised (measured 1.5x faster than one (M, V) pass on CPU, bench/RESULTS.md);
    per-sentence sums are accumulated in float32.

    Args:
        hidden: (N, T, H) decoder outputs; position t predicts ``targets[:, t]``.
        output: the vocabulary projection, H -> V.
        targets: (N, T) int64 token ids.
        mask: (N, T), 1 on real tokens (EOS included), 0 on padding.
        float32_softmax: take the log-softmax in float32 even under bf16 autocast (always for
            evaluation). False lets training under bf16 autocast keep it in bf16, which is
            about a third cheaper; the per-token rounding (~2^-8 relative) is unbiased noise
            far below the noise of a one-sample ELBO gradient.

    Returns:
        (N,) float32, nats per sequence.
    """
    n, t = targets.shape
    real = mask.bool()
    h, y = hidden[real], targets[real]  # (M, H), (M,): M real positions
    nll = []
    for i in range(0, h.size(0), block_rows):
        logits = output(h[i : i + block_rows])  # (block, V)
        if float32_softmax:
            logits = logits.float()
        with torch.autocast(logits.device.type, enabled=False):
            nll.append(F.cross_entropy(logits, y[i : i + block_rows], reduction="none").float())
    nll = torch.cat(nll)  # (M,)
    rows = torch.arange(n, device=targets.device).unsqueeze(1).expand(n, t)[real]
    return -torch.zeros(n, device=nll.device, dtype=torch.float32).index_add_(0, rows, nll)


def kl_weight(step: int, cfg: KLConfig) -> float:
    """beta at optimizer step ``step`` (0-based) under ``cfg.schedule``.

    - constant: ``beta_max``.
    - linear (Bowman et al. 2016): ``beta_start`` rising linearly to ``beta_max`` over
      ``warmup_steps``, then held.
    - logistic (Bowman et al. 2016): ``beta_max / (1 + exp(-logistic_k (step - logistic_x0)))``.
    - cyclical (Fu et al. 2019, with the zero phase of their code): period ``cycle_steps``;
      with tau = (step mod period) / period, beta = 0 for tau < ratio_zero, then rises
      linearly to ``beta_max`` over a further ``ratio_increase`` of the period, then held.
    """
    if cfg.schedule == "constant":
        return cfg.beta_max
    if cfg.schedule == "linear":
        if cfg.warmup_steps <= 0:
            return cfg.beta_max
        frac = min(1.0, step / cfg.warmup_steps)
        return cfg.beta_start + (cfg.beta_max - cfg.beta_start) * frac
    if cfg.schedule == "logistic":
        return cfg.beta_max / (1.0 + math.exp(-cfg.logistic_k * (step - cfg.logistic_x0)))
    if cfg.schedule == "cyclical":
        tau = (step % cfg.cycle_steps) / cfg.cycle_steps
        if tau < cfg.ratio_zero:
            return 0.0
        return cfg.beta_max * min(1.0, (tau - cfg.ratio_zero) / max(cfg.ratio_increase, 1e-12))
    raise ValueError(f"unknown kl.schedule '{cfg.schedule}'")


def kl_per_dim(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """Closed-form KL(q||p) per latent dimension, (B, D), when both are diagonal Gaussians.

    Returns None when no per-dimension closed form exists (a flow posterior or a flow prior:
    the caller then estimates the KL by Monte Carlo, log q(z) - log p(z) on samples of q).
    """
    if isinstance(q, Independent) and isinstance(p, Independent):
        if isinstance(q.base_dist, Normal) and isinstance(p.base_dist, Normal):
            return kl_divergence(q.base_dist, p.base_dist)
    return None


def conditional_kl(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor | None:
    """Per-layer closed-form KL of two layer-wise distributions at a sample of the layers below.

    For q and p that factorise over layers given the layers below (both with a ``conditionals(z)``
    method, e.g. :class:`textvae.posteriors.LayerwiseGaussian`), the chain rule of the KL gives

        KL(q || p) = E_{z ~ q} [ sum_l KL(q(z_l | z_<l, x) || p(z_l | z_<l)) ],

    so the closed-form KL of each layer's conditionals at z_<l drawn from q, summed over layers,
    is an unbiased estimate of KL(q || p) with the innermost expectation taken exactly (Hu et al.
    2022 train DELLA on these terms). The sum over layers of this estimate and the Monte Carlo
    estimate log q(z) - log p(z) have the same expectation.

    Args:
        z: (*S, B, L, D) samples of q.

    Returns:
        (*S, B, L, D) float32, nats (not scaled by ``log_prob_scale``); None when q or p has no
        ``conditionals`` (use :func:`kl_per_dim` or Monte Carlo).
    """
    if not (hasattr(q, "conditionals") and hasattr(p, "conditionals")):
        return None
    return kl_divergence(q.conditionals(z), p.conditionals(z))


def rsample_and_log_prob(
    q: Distribution, sample_shape: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised samples of q with their exact log-density: the one way the ELBO, the IW
    bound and the Monte Carlo KL draw from a posterior.

    A flow posterior (:class:`textvae.flows.FlowDistribution`) returns log q(z_K|x) accumulated
    while it pushes its base samples forward, so flows without an inverse (planar, Sylvester)
    get an exact log q of their own samples; any other distribution uses ``q.log_prob(z)``.

    Returns:
        (z (*sample_shape, B, *event), log q(z) (*sample_shape, B)), nats.
    """
    if hasattr(q, "rsample_and_log_prob"):
        return q.rsample_and_log_prob(sample_shape)
    z = q.rsample(sample_shape)
    return z, q.log_prob(z)


def free_bits_kl(kl_dims: torch.Tensor, free_bits: float, mode: str = "per_dim") -> torch.Tensor:
    """The KL term of the training loss with free bits / KL thresholding.

    Args:
        kl_dims: (B, *event) KL per sentence and latent dimension, nats: (B, D), or (B, L, D)
            for layer-wise latents.
        free_bits: lambda in nats; 0 disables it.
        mode: ``per_dim`` (Kingma et al. 2016, Li et al. 2019): sum over dimensions of
            max(mean_B KL_d, lambda), the clamp applied to each dimension's **batch mean**;
            ``per_layer`` (layer-wise latents only; the per-layer KL floor of DELLA):
            sum_l max(mean_B sum_d KL_ld, lambda); ``total``: max(mean_B sum KL, lambda);
            ``per_sentence_dim`` (Park & Lee 2021's released code): mean_B sum_d max(KL_bd,
            lambda), the clamp applied to each sentence and dimension before the batch mean
            (a dimension below lambda for one sentence gets no gradient from it even when
            the batch mean is above).

    Returns:
        Scalar, nats per sentence. Below the threshold the term is constant, so no gradient
        pushes that dimension's (layer's) KL further down.

    Raises:
        ValueError: unknown mode, or ``per_layer`` on a KL without a layer dimension.
    """
    if free_bits <= 0:
        return kl_dims.flatten(1).sum(-1).mean()
    if mode == "per_dim":
        return torch.clamp(kl_dims.mean(0), min=free_bits).sum()
    if mode == "per_layer":
        if kl_dims.dim() != 3:
            raise ValueError(
                f"free_bits_mode per_layer needs a KL of shape (B, L, D), got "
                f"{tuple(kl_dims.shape)}: use per_dim or total"
            )
        return torch.clamp(kl_dims.sum(-1).mean(0), min=free_bits).sum()
    if mode == "total":
        return torch.clamp(kl_dims.flatten(1).sum(-1).mean(), min=free_bits)
    if mode == "per_sentence_dim":
        return torch.clamp(kl_dims, min=free_bits).flatten(1).sum(-1).mean()
    raise ValueError(
        f"unknown free_bits_mode '{mode}' (per_dim, per_layer, total or per_sentence_dim)"
    )


def elbo(
    model,
    batch: dict[str, torch.Tensor],
    beta: float = 1.0,
    free_bits: float = 0.0,
    free_bits_mode: str = "per_dim",
    kl_target: float = 0.0,
    kl_target_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Single-sample ELBO and the training loss (Kingma & Welling 2014; Bowman et al. 2016).

    loss = mean_B[rec] + beta * KL_term (+ kl_target_weight * |mean_B[KL] - kl_target|)
    (+ bow_weight * mean_B[bow]), where rec = -log p(x|z), z ~ q(z|x) reparameterised, and
    KL_term is :func:`free_bits_kl` of the closed-form KL. Without a closed form (a flow
    posterior or prior) the KL is the single-sample estimate log q(z|x) - log p(z) on the same
    z, with log q from :func:`rsample_and_log_prob` (exact, also for flows without an inverse);
    free bits then floor the batch-mean total KL, at ``D * free_bits`` in ``per_dim`` mode (no
    per-dimension KL exists) and at ``free_bits`` in ``total`` mode. A model without latent
    gets loss = -log p(x).

    KL target (``kl_target`` > 0 and ``kl_target_weight`` > 0): the penalty
    kl_target_weight * |mean_B KL - kl_target| (nats per sentence) holds the batch-mean KL near
    the target when the weight exceeds beta (Burgess et al. 2018, "Understanding disentangling
    in beta-VAE", eq. 8, is the case beta = 0). Not part of the ELBO.

    Layer-wise latents (a posterior and prior with ``conditionals``, DELLA): z is one ancestral
    sample of q; the KL is :func:`conditional_kl` at that sample, closed form per layer, summed
    over layers and dimensions (free bits per dimension, per layer or in total); a distribution
    whose ``log_prob_scale`` is not 1 (the released DELLA code's layer mean,
    ``model.kl_reduction: mean``) has its KL scaled by it, which is not an ELBO.

    The classifier term (Chien & Luo 2022; when ``model.classifier`` is set and the batch has
    ``labels``): ``cls`` = mean cross-entropy (nats per labelled sentence) of the classifier's
    prediction from the same z over the batch's sentences with a label >= 0 (None when there
    is none), added as ``model.classifier_weight * cls``; not part of the ELBO.

    The bag-of-words term (Zhao et al. 2017; when ``model.bow_head`` is set) is
    bow = -log p_bow(x | z) on the same z: an auxiliary loss, **not** part of the ELBO; it is
    returned separately and evaluation never includes it.

    Returns:
        dict with ``loss`` (scalar), ``rec`` (B,), ``kl`` (B,), ``kl_per_dim`` (B, D) (for
        layer-wise latents (B, L, D), unscaled) or None, ``bow`` (B,) or None and ``cls``
        (scalar) or None; nats per sentence (``cls`` per labelled sentence).
    """
    if not model.has_latent:
        rec = -model.log_likelihood(batch, None)[0]
        return {
            "loss": rec.mean(),
            "rec": rec,
            "kl": torch.zeros_like(rec),
            "kl_per_dim": None,
            "bow": None,
            "cls": None,
        }
    q, p = model.posterior_and_prior(batch)
    scale = getattr(q, "log_prob_scale", 1.0)
    kl_dims = kl_per_dim(q, p)
    if kl_dims is not None:
        z = q.rsample((1,))  # (1, B, D)
        kl = kl_dims.sum(-1)
        kl_term = free_bits_kl(kl_dims, free_bits, free_bits_mode)
    else:
        z, log_q = rsample_and_log_prob(q, (1,))  # (1, B, *event), (1, B)
        kl_dims = conditional_kl(q, p, z)
        if kl_dims is not None:  # layer-wise: closed form per layer at the sampled z_<l
            kl_dims = kl_dims[0]  # (B, L, D)
            kl = kl_dims.flatten(1).sum(-1) * scale
            kl_term = free_bits_kl(kl_dims, free_bits, free_bits_mode) * scale
        else:
            kl = (log_q - p.log_prob(z))[0]
            floor = free_bits * (z[0, 0].numel() if free_bits_mode != "total" else 1)
            if free_bits > 0 and free_bits_mode == "per_sentence_dim":  # each sentence's total
                kl_term = torch.clamp(kl, min=floor).mean()
            else:
                kl_term = torch.clamp(kl.mean(), min=floor) if free_bits > 0 else kl.mean()
    rec = -model.log_likelihood(batch, z)[0]  # (B,)
    loss = rec.mean() + beta * kl_term
    if kl_target > 0 and kl_target_weight > 0:
        loss = loss + kl_target_weight * (kl.mean() - kl_target).abs()
    bow = None
    if model.bow_head is not None:
        bow = -model.bow_head.log_prob(z[0], batch["input_ids"], batch["attention_mask"])  # (B,)
        loss = loss + model.bow_weight * bow.mean()
    cls = None
    if getattr(model, "classifier", None) is not None and "labels" in batch:
        labelled = batch["labels"] >= 0  # -1: hidden from the semi-supervised classifier
        if bool(labelled.any()):
            logits = model.classifier(z[0][labelled].float())  # (B_labelled, classes)
            cls = F.cross_entropy(logits, batch["labels"][labelled])
            loss = loss + model.classifier_weight * cls
    return {"loss": loss, "rec": rec, "kl": kl, "kl_per_dim": kl_dims, "bow": bow, "cls": cls}


def iw_log_weights(
    model,
    batch: dict[str, torch.Tensor],
    q: Distribution,
    p: Distribution,
    z: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance log-weights log p(x, z_s) - log q(z_s|x) (Burda et al. 2016, eq. 8).

    Args:
        q, p: posterior and prior of the batch (batch shape (B,)).
        z: (S, B, *event) samples from q.
        log_q: (S, B) log q(z|x) of those samples when it came with them
            (:func:`rsample_and_log_prob`; needed for flows without an inverse); else
            ``q.log_prob(z)``.

    Returns:
        (log_w (S, B), log p(x|z) (S, B)), float32, nats per sentence. With S = 1 and the same
        z, log_w is the single-sample ELBO estimate rec + (log p(z) - log q(z|x)).
    """
    ll = model.log_likelihood(batch, z)  # (S, B)
    if log_q is None:
        log_q = q.log_prob(z)
    return ll + p.log_prob(z) - log_q, ll


def iw_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s exp(log_w_s) per sentence: (S, B) -> (B,), float32."""
    return torch.logsumexp(log_w.float(), dim=0) - math.log(log_w.size(0))
