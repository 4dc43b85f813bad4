"""The maths of training and of the likelihood bounds, written once for every model.

Units: everything here is in nats **per sentence** (summed over a sentence's real tokens,
EOS counted, padding never), float32. Loss values are means over the batch of per-sentence
quantities, so the KL weight means what the ELBO says (no per-token averaging that would
silently re-weight the KL).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.distributions import (
    Distribution,
    Independent,
    TransformedDistribution,
    kl_divergence,
)

from textvae.config import KLConfig
from textvae.posteriors import LayerwiseGaussian


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


@dataclass(frozen=True)
class ObjectiveSettings:
    """Everything the training objective takes besides the model and the batch, built once
    from the config (:meth:`from_config`) and passed whole to :func:`elbo` (through the model's
    ``forward``); the loop only sets this step's beta (:meth:`at`).

    Attributes:
        beta: the KL weight of this step (Higgins et al. 2017; 1 is the ELBO).
        free_bits: lambda in nats; 0 disables it (:func:`free_bits_kl`).
        free_bits_mode: ``per_dim``, ``per_layer``, ``total`` or ``per_sentence_dim``.
        kl_target: the batch-mean KL (nats per sentence) the target penalty holds; 0 = off.
        kl_target_weight: the weight of |mean_B KL - kl_target| (Burgess et al. 2018, eq. 8);
            0 = off.

    The model-side auxiliary terms (bag-of-words, classifier) carry their own weights with the
    model (:meth:`textvae.models.base.TextVAE.auxiliary_losses`).
    """

    beta: float = 1.0
    free_bits: float = 0.0
    free_bits_mode: str = "per_dim"
    kl_target: float = 0.0
    kl_target_weight: float = 0.0

    @classmethod
    def from_config(cls, kl: KLConfig) -> ObjectiveSettings:
        """The settings of the ``kl`` section (beta at its maximum ``kl.beta_max``)."""
        return cls(
            beta=kl.beta_max,
            free_bits=kl.free_bits,
            free_bits_mode=kl.free_bits_mode,
            kl_target=kl.target,
            kl_target_weight=kl.target_weight,
        )

    def at(self, beta: float, kl_target: bool = True) -> ObjectiveSettings:
        """These settings at one training step: KL weight ``beta`` (the schedule's), and
        without the KL target penalty when ``kl_target`` is False (the autoencoder phase of
        ``train.ae_pretrain_steps`` trains with KL weight 0 and no target)."""
        return dataclasses.replace(
            self, beta=beta, kl_target_weight=self.kl_target_weight if kl_target else 0.0
        )


class KL(NamedTuple):
    """An estimate of KL(q || p) (:func:`kl_estimate`).

    Attributes:
        total: per sentence, nats, times ``scale``: (B,) for a closed form (no sample), else
            (*S, B), one value per sample of q.
        per_dim: per latent dimension, nats, not scaled: (B, D) for a closed form, (*S, B, L, D)
            layer-wise; None for a Monte Carlo estimate (no per-dimension value exists).
        scale: the posterior's ``log_prob_scale`` (1/L for DELLA's ``kl_reduction: mean``, which
            is not an ELBO); 1 otherwise.
        bound_valid: whether q's ``log_prob`` is a log-density, so that ELBO and IW estimates are
            bounds on log p(x) (False with ``kl_reduction: mean``).
    """

    total: torch.Tensor
    per_dim: torch.Tensor | None
    scale: float = 1.0
    bound_valid: bool = True


@dataclass(frozen=True)
class KLEstimator:
    """How KL(q || p) is computed for one (posterior type, prior type) pair.

    Attributes:
        name: ``closed_form``, ``layerwise`` or ``monte_carlo``.
        needs_samples: whether :attr:`estimate` reads samples z of q (and their log q).
        estimate: (q, p, z (*S, B, *event) or None, log q (*S, B) or None) -> :class:`KL`.
    """

    name: str
    needs_samples: bool
    estimate: Callable[..., KL]


def _closed_form(q: Independent, p: Independent, z=None, log_q=None) -> KL:
    """Closed form per dimension of two diagonal Gaussians: (B, D) nats, no sample needed."""
    per_dim = kl_divergence(q.base_dist, p.base_dist)  # (B, D)
    return KL(per_dim.sum(-1), per_dim)


def _layerwise(q: LayerwiseGaussian, p: LayerwiseGaussian, z: torch.Tensor, log_q=None) -> KL:
    """The chain rule of the KL for layer-wise distributions (DELLA, Hu et al. 2022):

        KL(q || p) = E_{z ~ q} [ sum_l KL(q(z_l | z_<l, x) || p(z_l | z_<l)) ],

    so the closed-form KL of each layer's conditionals at z_<l drawn from q, summed over layers,
    is an unbiased estimate of KL(q || p) with the innermost expectation taken exactly; it has the
    expectation of the Monte Carlo estimate log q(z) - log p(z). Per dimension (*S, B, L, D)."""
    per_dim = kl_divergence(q.conditionals(z), p.conditionals(z))  # (*S, B, L, D)
    scale = q.log_prob_scale
    return KL(per_dim.flatten(-2).sum(-1) * scale, per_dim, scale, q.bound_valid)


def _monte_carlo(q: Distribution, p: Distribution, z: torch.Tensor, log_q: torch.Tensor) -> KL:
    """log q(z|x) - log p(z) at samples of q (a flow posterior or prior: no closed form), with
    the exact log q that came with the samples (:func:`rsample_and_log_prob`). (*S, B).

    Rounding, and why evaluation is not bit-identical to the tree before the one objective path
    (17bbe5b): there, training computed this same ``log_q - p.log_prob(z)``, but
    ``metrics.evaluate`` took the KL from the importance log-weights as ``ll - log_w`` with
    ``log_w = (ll + log p) - log q`` (``iw_log_weights``), i.e. it added and subtracted the
    reconstruction log-likelihood ll (~ -20 to -100 nats) around a KL of a few nats. In float32
    that cancellation leaves an error of the order of ulp(ll), not ulp(KL). One function for
    training and evaluation can reproduce only one of the two old roundings; it keeps this one,
    which is the correctly rounded float32 difference of log q and log p: on a tiny IAF VAE
    (rec 18.4, KL 1.18 nats; 640 samples) it equals float64(log q - log p) rounded to float32 in
    640 of 640 cases (max error 1.2e-7 nats), the old ``ll - log_w`` in 136 of 640 (max error
    2.9e-6 nats). Hence the flow's evaluation ``kl``, ``elbo`` and ``ppl_elbo_token`` (and the
    validation ``kl``/``elbo`` of ``log.jsonl``) differ from 17bbe5b's by rounding only (<= 8.2e-7
    relative in ``bench/identical.py``), and are the more accurate ones."""
    return KL(log_q - p.log_prob(z), None)


CLOSED_FORM = KLEstimator("closed_form", False, _closed_form)
LAYERWISE = KLEstimator("layerwise", True, _layerwise)
MONTE_CARLO = KLEstimator("monte_carlo", True, _monte_carlo)

# (posterior type, prior type) -> estimator; the most specific registered pair wins (as
# torch.distributions.kl.register_kl): a subclass of a registered type uses its entry
KL_ESTIMATORS: dict[tuple[type, type], KLEstimator] = {
    (Independent, Independent): CLOSED_FORM,  # diagonal Gaussians (Independent Normal)
    (Independent, TransformedDistribution): MONTE_CARLO,  # Gaussian posterior, flow prior
    (TransformedDistribution, Distribution): MONTE_CARLO,  # flow posterior, any prior
    (LayerwiseGaussian, LayerwiseGaussian): LAYERWISE,
}


def kl_estimator(q: Distribution, p: Distribution) -> KLEstimator:
    """The KL estimator registered for the types of q and p (:data:`KL_ESTIMATORS`), the most
    specific pair by the classes' method resolution order (the posterior's first).

    Raises:
        NotImplementedError: no pair fits (the message names both types and the registry).
    """
    q_mro, p_mro = type(q).__mro__, type(p).__mro__
    best = None  # (rank, estimator); a plain loop, which torch.compile traces without a break
    for (q_type, p_type), estimator in KL_ESTIMATORS.items():
        if q_type in q_mro and p_type in p_mro:
            rank = (q_mro.index(q_type), p_mro.index(p_type))
            if best is None or rank < best[0]:
                best = (rank, estimator)
    if best is None:
        raise NotImplementedError(
            f"no KL estimator for posterior {type(q).__name__} and prior {type(p).__name__}: "
            "add the pair to textvae.objectives.KL_ESTIMATORS (closed_form, layerwise or "
            "monte_carlo)"
        )
    return best[1]


def kl_estimate(
    q: Distribution,
    p: Distribution,
    z: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> KL:
    """KL(q || p), chosen by the types of q and p (:func:`kl_estimator`): the one KL of training
    (:func:`elbo`) and evaluation (:func:`textvae.metrics.evaluate`).

    - diagonal Gaussians: the closed form per dimension (Kingma & Welling 2014, appendix B);
      z is not needed.
    - layer-wise Gaussians (DELLA): the closed form of each layer's conditionals at the sampled
      z_<l, summed over layers (Hu et al. 2022).
    - a flow posterior or prior: the Monte Carlo estimate log q(z|x) - log p(z).

    Args:
        q, p: posterior and prior, batch shape (B,).
        z: (*S, B, *event) samples of q (layer-wise and Monte Carlo only).
        log_q: (*S, B) their log q (Monte Carlo only; :func:`rsample_and_log_prob`).

    Returns:
        :class:`KL`, nats per sentence.

    Raises:
        NotImplementedError: no estimator is registered for the pair.
        ValueError: the estimator needs samples and none were given.
    """
    estimator = kl_estimator(q, p)
    if estimator.needs_samples and (
        z is None or (log_q is None and estimator.name == "monte_carlo")
    ):
        raise ValueError(f"the {estimator.name} KL needs samples z of q (and log q)")
    return estimator.estimate(q, p, z, log_q)


def kl_per_dim(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """Closed-form KL(q||p) per latent dimension, (B, D), when the pair has a closed form
    (:func:`kl_estimate`); None otherwise (a flow posterior or prior, layer-wise latents)."""
    if kl_estimator(q, p) is not CLOSED_FORM:
        return None
    return kl_estimate(q, p).per_dim


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
    model, batch: dict[str, torch.Tensor], settings: ObjectiveSettings | None = None
) -> dict[str, torch.Tensor]:
    """Single-sample ELBO and the training loss (Kingma & Welling 2014; Bowman et al. 2016).

    loss = mean_B[rec] + beta * KL_term (+ kl_target_weight * |mean_B[KL] - kl_target|)
    (+ the model's auxiliary terms), where rec = -log p(x|z), z ~ q(z|x) reparameterised, with
    beta, free bits and the KL target from ``settings``. The KL is :func:`kl_estimate`'s, chosen
    by the types of q and p (``settings`` None: beta 1, nothing else): KL_term is :func:`free_bits_kl` of its per-dimension values when
    they exist (closed form; layer-wise at the sampled z_<l for DELLA, free bits per dimension,
    per layer or in total); without them (a flow posterior or prior) the KL is the single-sample
    estimate log q(z|x) - log p(z) on the same z, with log q from :func:`rsample_and_log_prob`
    (exact, also for flows without an inverse), and free bits floor the batch-mean total KL, at
    ``D * free_bits`` in ``per_dim`` mode (no per-dimension KL exists) and at ``free_bits`` in
    ``total`` mode. A distribution whose ``log_prob_scale`` is not 1 (the released DELLA code's
    layer mean, ``model.kl_reduction: mean``) has its KL scaled by it, which is not an ELBO. A
    model without latent gets loss = -log p(x).

    KL target (``kl_target`` > 0 and ``kl_target_weight`` > 0): the penalty
    kl_target_weight * |mean_B KL - kl_target| (nats per sentence) holds the batch-mean KL near
    the target when the weight exceeds beta (Burgess et al. 2018, "Understanding disentangling
    in beta-VAE", eq. 8, is the case beta = 0). Not part of the ELBO.

    Auxiliary terms (:meth:`textvae.models.base.TextVAE.auxiliary_losses`, on the same z; not
    part of the ELBO, never in evaluation): each ``name -> (weight, value)`` adds
    ``weight * mean(value)`` to the loss and is returned under its name: the bag-of-words term
    ``bow`` (Zhao et al. 2017) = -log p_bow(x | z), (B,); the classifier term ``cls`` (Chien &
    Luo 2022) = the mean cross-entropy over the batch's labelled sentences (None without one).

    Returns:
        dict with ``loss`` (scalar), ``rec`` (B,), ``kl`` (B,), ``kl_per_dim`` (B, D) (for
        layer-wise latents (B, L, D), unscaled) or None, ``bow`` (B,) or None and ``cls``
        (scalar) or None (plus any other auxiliary term of the model); nats per sentence
        (``cls`` per labelled sentence).
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
    estimator = kl_estimator(q, p)
    if estimator.needs_samples:
        z, log_q = rsample_and_log_prob(q, (1,))  # (1, B, *event), (1, B)
        kl = estimator.estimate(q, p, z, log_q)
        kl = kl._replace(total=kl.total[0], per_dim=None if kl.per_dim is None else kl.per_dim[0])
    else:
        kl = estimator.estimate(q, p)  # (B,), (B, D)
        z = q.rsample((1,))  # (1, B, D)
    s = settings if settings is not None else ObjectiveSettings()
    if kl.per_dim is not None:
        kl_term = free_bits_kl(kl.per_dim, s.free_bits, s.free_bits_mode) * kl.scale
    else:  # no per-dimension KL: free bits floor the total
        floor = s.free_bits * (z[0, 0].numel() if s.free_bits_mode != "total" else 1)
        if s.free_bits > 0 and s.free_bits_mode == "per_sentence_dim":  # each sentence's total
            kl_term = torch.clamp(kl.total, min=floor).mean()
        else:
            kl_term = (
                torch.clamp(kl.total.mean(), min=floor) if s.free_bits > 0 else kl.total.mean()
            )
    rec = -model.log_likelihood(batch, z)[0]  # (B,)
    loss = rec.mean() + s.beta * kl_term
    if s.kl_target > 0 and s.kl_target_weight > 0:
        loss = loss + s.kl_target_weight * (kl.total.mean() - s.kl_target).abs()
    out = {"rec": rec, "kl": kl.total, "kl_per_dim": kl.per_dim, "bow": None, "cls": None}
    for name, (weight, value) in model.auxiliary_losses(batch, z[0]).items():
        if value is not None:
            loss = loss + weight * value.mean()
        out[name] = value
    return {"loss": loss, **out}


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
