"""The evaluation protocol (IW-NLL and AU of Burda et al. 2016, MI of He et al. 2019), written once against the model interface.

Units: nats per sentence unless a name says otherwise; EOS is counted as a predicted token
and as one word per sentence; padding never counts.

- ``rec``: E_q[-log p(x|z)], Monte Carlo over the IW samples.
- ``kl``: KL(q(z|x) || p(z)), closed form when both are diagonal Gaussians (``kl_samples``
  None); otherwise (a flow posterior or prior) the Monte Carlo estimate
  mean_s [log q(z_s|x) - log p(z_s)] over the same samples as ``rec`` (``kl_samples`` = their
  number per sentence), with the exact log q that comes with each sample.
- ``elbo``: -(rec + kl).
- ``nll``: -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), with its
  standard error over sentences; exact -log p(x) for a model without latent.
- ``nll_per_sentence``: the N per-sentence values behind ``nll``, in the dataset's order (a
  list of floats; evaluation batches are sorted by token length, which differs between
  tokenizers, and the values are put back), with ``sentence_index`` (the dataset position of
  each value) and ``n_words_per_sentence``, so two models evaluated on the same sentences are
  compared pairwise by index (``textvae compare`` reports the paired difference and its
  standard error, and refuses evaluations of different sentences).
- ``n_skipped``: sentences left out because they exceed the model's position limit (only with
  ``skip_too_long``; otherwise such a sentence is an error). Every sentence is scored whole:
  ``data.max_length`` is a training setting and does not apply to evaluation.
- ``ppl_token`` = exp(sum nll / predicted tokens incl. EOS); ``ppl_word`` = exp(sum nll /
  (whitespace words + one EOS per sentence)).
- ``ppl_elbo_token`` = exp(-sum elbo / predicted tokens incl. EOS): the perplexity of the ELBO,
  an upper bound on the true perplexity (never below ``ppl_token`` in expectation). It is what
  Park & Lee 2021's released code reports as "PPL" (there from one z sample per sentence and
  with EOS left out of the token count); here ``rec`` averages the IW samples. Not the NLL.
- ``mi``: I_q(x; z) with the aggregate posterior over the whole evaluated set (chunked, memory
  linear in the set size); ``mi_batch``: the minibatch estimator of He et al. 2019 over the
  evaluation batches. ``mi`` is at most log N (``mi_batch`` about log of the batch size): q(z_i)
  includes the sentence's own posterior, so log q(z_i) >= log q(z_i|x_i) - log N. A value at
  log N means the estimator saturated (each z identifies its sentence among the N), not that
  I(x; z) is log N: with N = 500 sentences, mi = 6.21 says "at least about 6.2 nats".
- ``au``: dimensions with Cov_x(E_q[z|x]) > ``au_delta`` (Burda et al. 2016's active units).
- ``kl_per_dim``: the closed-form KL per dimension; None without a closed form (a flow has no
  per-dimension decomposition of its KL).
- ``au_by_delta``: the active units at ``au_delta`` and at 0.2 (:data:`AU_DELTA_PAPER`, DELLA's
  threshold), ``{"0.01": n, "0.2": n}``, for comparison with papers that use the larger one.
- ``bound_valid``: whether ``elbo`` and ``nll`` are bounds on log p(x): False when the posterior's
  type declares that its ``log_prob`` is not a log-density (:class:`textvae.objectives.KL`'s
  ``bound_valid``: :class:`textvae.posteriors.LayerwiseGaussian` with
  ``model.kl_reduction: mean``, the released code's layer average of the KL and log-densities);
  then ``kl``, ``elbo``, ``nll``, the perplexities and ``mi`` follow that average.

The KL is the training objective's (:func:`textvae.objectives.kl_estimate`, chosen by the
types of posterior and prior): closed form for diagonal Gaussians, layer-wise for DELLA, Monte
Carlo log q(z|x) - log p(z) over the IW samples otherwise.

Layer-wise latents (DELLA, event shape (L, D); :class:`textvae.posteriors.LayerwiseGaussian`):
``kl`` is the closed form per layer at each IW sample of z_<l, averaged over the samples
(:func:`textvae.objectives.kl_estimate`; ``kl_samples`` = their number); ``kl_per_dim`` is
(L, D) and ``kl_per_layer`` (L,); ``mi`` (and ``mi_batch``, the same estimator within each batch)
uses the joint log q(z|x) of every sample under every sentence's posterior
(:func:`distribution_mi`); ``au`` uses E_q[z|x] estimated by 256 common-random-number ancestral
draws, and ``au_per_layer`` gives the count per layer at each threshold of ``au_by_delta``;
``au_layer_mean`` is DELLA's own active-unit figure (Hu et al. 2022, A.3), the mean over layers
of the per-layer count at delta 0.2, comparable with the paper's table (``au`` counts all L x D). The IW
estimate draws all layers ancestrally once per importance sample and sums
log p(z_l|z_<l) - log q(z_l|z_<l,x) over layers, the (S x B) samples going through the decoder
in chunks like every model's.

Flow posteriors (see docs/flows.md): every field refers to z_K, the latent the decoder reads.
``nll``, ``rec``, ``kl`` use z_K and its exact log q; ``mi`` (and ``mi_batch``) is I(x; z_K)
with the aggregate posterior of z_K (:func:`distribution_mi` over the flow posteriors: log
q(z_K|x_n) of every sentence's sample z_K under every sentence's flow, through the inverse of
each step, :meth:`textvae.flows.FlowDistribution.log_prob`); where that cannot be computed (an
iterative inverse that does not converge, a non-finite estimate) ``mi`` and ``mi_batch`` are
None and ``mi_estimator`` gives the reason (the base Gaussian's I(x; z_0) is never reported in
their place: a flow whose base ignores x can still carry information in z_K). ``au`` uses
E_q[z_K|x] estimated by :attr:`textvae.flows.FlowDistribution.mean` (256 common random draws).
Cost: N^2 inverse evaluations (the IAF's sequential in D), chunked.

Conditional models (``cvrae``): every field is conditioned on the context c of each response:
``nll`` bounds -log p(x|c), ``kl`` is KL(q(z|x,c) || p(z|c)); ``mi`` and ``au`` are taken over
the (context, response) pairs (the aggregate posterior mixes q(z|x_n, c_n) over all pairs).
- ``encoder_dispersion``: how spread the encoder summaries (the vectors the posterior heads
  read) are across the evaluated sentences (Long et al. 2019; :func:`encoder_dispersion`):
  ``total_variance``, ``relative_variance``, ``mean_cosine_distance``, ``dim``, ``n``; for a
  model without ``encoder_summary`` (DELLA: per-layer features read together with the latent
  recurrence) the values are None with a ``reason``; None for a model without latent.
- ``classifier_accuracy``: with a jointly trained classifier on z (``model.classifier_weight``,
  Chien & Luo 2022) and a labelled dataset, the fraction of the ``classifier_n`` labelled
  sentences whose label it predicts from E_q[z|x] (E_q[z_K|x] for a flow); else None.
- ``z_gap``: the z-usage gap, rec with z shuffled across the batch minus rec with each
  sentence's own z (:func:`z_usage_gap`); near 0 means the decoder ignores z.

Generation metrics (:func:`generation_metrics`, BLEU through ``sacrebleu``): ``rec_bleu``,
``self_bleu``, ``distinct_1``, ``distinct_2``; for conditional models
(:func:`response_metrics`): ``response_bleu``, ``distinct_1``, ``distinct_2`` of generated
responses. Latent probe: :func:`probe_accuracy`.

How :func:`evaluate` is put together: each batch, under its own seed (:func:`batch_seed`), goes
through the per-batch estimators (:func:`_score_batch`: the exact likelihood of a model without
latent, the closed-form KL, the IW bound with rec and a sampled KL over the same samples, E_q[z|x],
the classifier counts, the z-usage gap, the encoder summary); the batch records (gathered across
processes when sharded) then go through one function per field group (:func:`_likelihood_fields`,
:func:`_kl_fields`, :func:`_mi_fields`, :func:`_au_fields`, :func:`_classifier_fields`,
:func:`_dispersion_field`). What differs between posterior families is chosen by the
posterior's type, never by a name: the KL by :func:`textvae.objectives.kl_estimator`, the MI (what
a batch keeps, the whole set's estimate) and the per-layer fields by
:func:`posterior_statistics` (:data:`POSTERIOR_STATISTICS`: diagonal Gaussian, flow, layer-wise);
E_q[z|x] is the distribution's ``mean`` and log q(z|x) its ``log_prob`` for every family. A
model's optional parts come through its interface: :meth:`textvae.models.base.TextVAE.encoder_summary`
and :meth:`~textvae.models.base.TextVAE.classify_latent` (None without them). A new posterior
family registers one :class:`PosteriorStatistics` (and its KL pair in
:data:`textvae.objectives.KL_ESTIMATORS`); evaluating a run folder is
:func:`textvae.evaluation.evaluate_run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import Distribution, Independent, TransformedDistribution

from textvae.data import TextDataset
from textvae.fields import EVAL_KEYS
from textvae.flows import InverseError, base_gaussian
from textvae.objectives import (
    KL,
    iw_bound,
    iw_log_weights,
    kl_estimator,
    rsample_and_log_prob,
)
from textvae.posteriors import LayerwiseGaussian
from textvae.precision import runnable_precision

log = logging.getLogger(__name__)

AU_DELTA_PAPER = 0.2  # DELLA's (Hu et al. 2022) active-unit threshold, reported beside au_delta
MI_ESTIMATOR = (
    "aggregate posterior q(z) over all evaluated sentences, one z ~ q(z|x) per sentence used "
    "in both terms; mi_batch: He et al. 2019 calc_mi (q(z) over each evaluation batch, "
    "closed-form entropy)"
)
FLOW_ESTIMATOR = (
    "flow posterior, I(x; z_K) of the latent the decoder reads: aggregate posterior q(z_K) over "
    "all evaluated sentences, log q(z_K|x_n) of every sentence's sample under every sentence's "
    "flow through the flow's inverse (closed form for iaf, cclin_iaf, radial; checked root "
    "search for planar, sylvester), one z_K ~ q(z_K|x) per sentence used in both terms; mi_batch: "
    "the same estimator within each evaluation batch; kl: Monte Carlo over z_K; au from "
    "E_q[z_K|x] by 256 common random draws"
)
FLOW_ESTIMATOR_NONE = "flow posterior: I(x; z_K) not computed (mi and mi_batch null)"
# I(x; z_K) costs N^2 flow inverses (an IAF's sequential over D; about 85 s for N=256 with a
# 4-step IAF on one CPU thread, so hours for the 3,761 PTB test sentences): unless
# flow_mi_sentences says otherwise it is taken over the first FLOW_MI_EVAL_SENTENCES sentences
# at evaluation and FLOW_MI_VALIDATION_SENTENCES at training's validation (iw_samples=0)
FLOW_MI_EVAL_SENTENCES = 500
FLOW_MI_VALIDATION_SENTENCES = 128
LAYERWISE_ESTIMATOR = (
    "aggregate posterior q(z) over all evaluated sentences from the joint log q(z|x) of the "
    "layer-wise posterior, one ancestral z ~ q(z|x) per sentence used in both terms; mi_batch: "
    "the same estimator within each evaluation batch; au from E_q[z|x] by 256 common random "
    "ancestral draws"
)
GENERATION_KEYS = ("rec_bleu", "self_bleu", "distinct_1", "distinct_2", "generation")
RESPONSE_KEYS = ("response_bleu", "distinct_1", "distinct_2", "generation")
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density_matrix(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """log N(z_i; mu_n, diag exp(logvar_n)) for every pair: (M, D), (N, D), (N, D) -> (M, N).

    Computed in float64 through matrix products (no (M, N, D) tensor).
    """
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    inv_var = torch.exp(-logvar)  # (N, D)
    quad = (z * z) @ inv_var.T - 2 * z @ (mu * inv_var).T + (mu * mu * inv_var).sum(-1)  # (M, N)
    return -0.5 * (quad + logvar.sum(-1) + z.size(-1) * LOG_2PI)


def _neg_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """E_q[log q(z|x)] of diagonal Gaussians, (N, D) -> (N,) float64."""
    return -0.5 * (logvar.double().size(-1) * (LOG_2PI + 1) + logvar.double().sum(-1))


def aggregate_mi(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    z: torch.Tensor,
    chunk: int = 1024,
    analytic_entropy: bool = False,
) -> float:
    """I_q(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], q(z) = (1/N) sum_n q(z|x_n).

    Args:
        mu, logvar: (N, D) posterior parameters of the whole evaluated set.
        z: (N, D), one sample z_i ~ q(z|x_i) per sentence.
        chunk: rows of z per step; memory is O(chunk * N), not O(N^2).
        analytic_entropy: take the first term in closed form (as He et al. 2019's ``calc_mi``);
            by default both terms use the same samples z_i, whose noise then largely cancels
            (identical posteriors give exactly 0).

    Returns:
        nats, at most log N: q(z_i) includes the sentence's own posterior (as He et al. 2019),
        so posteriors that do not overlap give log N whatever the true I(x; z) (tested).
    """
    n = mu.size(0)
    log_q_agg, log_q_own = [], []
    for i in range(0, n, chunk):
        dens = gaussian_log_density_matrix(z[i : i + chunk], mu, logvar)  # (c, N)
        log_q_agg.append(torch.logsumexp(dens, dim=1) - math.log(n))
        rows = torch.arange(dens.size(0))
        log_q_own.append(dens[rows, rows + i])
    first = _neg_entropy(logvar) if analytic_entropy else torch.cat(log_q_own)
    return float(first.mean() - torch.cat(log_q_agg).mean())


def distribution_mi(posteriors: list, zs: list[torch.Tensor], chunk: int = 256) -> float:
    """I_q(x; z) for any posterior family: E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with
    q(z) = (1/N) sum_n q(z|x_n) over the whole evaluated set, from each distribution's own
    ``log_prob`` (e.g. the joint density of DELLA's layer-wise posterior).

    Args:
        posteriors: the posteriors of the evaluated batches, each of batch shape (B_i,), whose
            ``log_prob`` broadcasts a value of shape (M, 1, *event) to (M, B_i) (true of
            ``torch.distributions`` Gaussians and of
            :class:`textvae.posteriors.LayerwiseGaussian`).
        zs: one sample per sentence of each batch, (B_i, *event), on the posteriors' device.
        chunk: samples per step; memory is O(chunk * N * prod(event)), not O(N^2 * prod(event)).

    Returns:
        nats. For diagonal Gaussians it equals :func:`aggregate_mi` (tested); q(z_i) includes
        the sentence's own posterior.
    """
    z_all = torch.cat(zs)  # (N, *event)
    n = z_all.size(0)
    own = torch.cat([q.log_prob(z) for q, z in zip(posteriors, zs, strict=True)]).double()
    log_q_agg = []
    for i in range(0, n, chunk):
        block = z_all[i : i + chunk].unsqueeze(1)  # (c, 1, *event)
        dens = torch.cat([q.log_prob(block) for q in posteriors], dim=1).double()  # (c, N)
        log_q_agg.append(torch.logsumexp(dens, dim=1) - math.log(n))
    return float(own.mean() - torch.cat(log_q_agg).mean())


class DispersionSums:
    """Running sums over the evaluated set for :func:`encoder_dispersion`: count, sum of h,
    sum of ||h||^2 and sum of h / ||h|| (float64), so the set never has to be held at once."""

    def __init__(self):
        self.n, self.sum, self.sum_sq, self.sum_unit = 0, None, 0.0, None

    def add(self, h: torch.Tensor) -> None:
        """h: (B, H) summaries of one batch."""
        h = h.detach().double().cpu()
        unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.n += h.size(0)
        self.sum = h.sum(0) if self.sum is None else self.sum + h.sum(0)
        self.sum_unit = unit.sum(0) if self.sum_unit is None else self.sum_unit + unit.sum(0)
        self.sum_sq += float((h * h).sum())


def encoder_dispersion(sums: DispersionSums) -> dict:
    """Dispersion of the encoder summaries h_n (the vectors the posterior heads read) across
    the N evaluated sentences: Long, Cao & Cheung 2019 ("On Posterior Collapse and Encoder
    Feature Dispersion in Sequence VAEs") argue that with the last LSTM state different
    sentences get nearly the same h, so q(z|x) cannot tell them apart, and that pooling
    disperses them. The paper's own formula could not be read here (only its abstract); these
    are the issue's definition (issue 15, item 7), over the whole evaluated set:

    - ``total_variance``: trace of the population covariance of h, sum_d Var_n(h_nd)
      (squared units of h);
    - ``relative_variance``: total_variance / mean_n ||h_n||^2, in [0, 1], free of h's scale
      (max pooling shifts all features up; this does not reward that);
    - ``mean_cosine_distance``: 1 - mean over pairs n != m of cos(h_n, h_m), in [0, 2],
      computed in O(N) from the sum of unit vectors;
    - ``dim``, ``n``: H and N.

    Returns:
        the dict above (floats).
    """
    n = sums.n
    mean = sums.sum / n
    mean_sq = sums.sum_sq / n
    total = mean_sq - float(mean @ mean)
    pair_cos = (float(sums.sum_unit @ sums.sum_unit) - n) / (n * (n - 1)) if n > 1 else 1.0
    return {
        "total_variance": max(total, 0.0),
        "relative_variance": max(total, 0.0) / mean_sq if mean_sq > 0 else 0.0,
        "mean_cosine_distance": 1.0 - pair_cos,
        "dim": int(mean.numel()),
        "n": n,
    }


def batch_mi(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> float:
    """The minibatch MI estimator of He et al. 2019 (``calc_mi``): aggregate posterior over
    the batch only, closed-form entropy term. Shapes (B, D); returns nats."""
    return aggregate_mi(mu, logvar, z, chunk=mu.size(0), analytic_entropy=True)


def active_units(mu: torch.Tensor, delta: float = 0.01) -> tuple[int, torch.Tensor]:
    """Active units (Burda et al. 2016): count of dims with Var_x(E_q[z|x]) > delta.

    Args:
        mu: (N, D) posterior means over the evaluated set ((N, *event) is flattened to
            (N, prod(event))).

    Returns:
        (count, per-dimension variance (D,) float64).
    """
    mu = mu.flatten(1)
    var = mu.double().var(dim=0, unbiased=True) if mu.size(0) > 1 else torch.zeros(mu.size(1))
    return int((var > delta).sum()), var


def z_usage_gap(
    model, batch: dict[str, torch.Tensor], z: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """The z-usage gap: how much worse each sentence is reconstructed from another's z.

    gap_b = -log p(x_b | z_pi(b)) - (-log p(x_b | z_b)), with pi a derangement of the batch
    (a random permutation composed with a shift, so no sentence keeps its own z) and the same
    codes z reused, so a decoder that ignores z gives exactly 0. The sign makes a larger gap
    mean more use of z (the shuffled reconstruction is the worse one).

    Args:
        batch: a collated batch of B >= 2 sentences.
        z: (B, D) one latent code per sentence (e.g. one sample of q(z|x)).
        generator: draws the permutation (on z's device); the global RNG when None.

    Returns:
        (B,) float32, nats per sentence (EOS counted); None when B < 2.
    """
    b = z.size(0)
    if b < 2:
        return None
    perm = torch.randperm(b, device=z.device, generator=generator)
    other = perm.roll(1)  # other[i] != perm[i]: sentence perm[i] gets z of other[i]
    shuffled = torch.empty_like(z)
    shuffled[perm] = z[other]
    ll = model.log_likelihood(batch, torch.stack([z, shuffled]))  # (2, B)
    return (ll[0] - ll[1]).float()


def _flow_mi(
    model,
    dataset: TextDataset,
    indices: list[int],
    n_scored: int,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> tuple[float | None, list, str]:
    """I(x; z_K) of a flow posterior over the sentences ``indices`` (dataset order, batches of
    ``batch_size``): one z_K ~ q(z_K|x) per sentence, the aggregate posterior through the flow's
    inverse (:func:`distribution_mi`); the same within each batch for ``mi_batch``.

    Returns:
        (mi or None, [(mi_batch of a batch, its size)], the ``mi_estimator`` text, which gives
        the reason when mi is None: an iterative inverse that did not converge, or a non-finite
        estimate).
    """
    posteriors, zs, per_batch = [], [], []
    try:
        for start in range(0, len(indices), batch_size):
            batch = {
                k: v.to(device)
                for k, v in dataset.collate(indices[start : start + batch_size]).items()
            }
            with _autocast(device, precision):
                q = model.posterior(batch)
            z = q.sample()
            posteriors.append(q)
            zs.append(z)
            per_batch.append((distribution_mi([q], [z]), z.size(0)))
        mi = distribution_mi(posteriors, zs)
    except InverseError as err:
        return None, [], f"{FLOW_ESTIMATOR_NONE}: {err}"
    if not math.isfinite(mi) or not all(math.isfinite(m) for m, _ in per_batch):
        return (
            None,
            [],
            (
                f"{FLOW_ESTIMATOR_NONE}: the estimate is not finite ({mi}): log "
                "q(z_K|x) through the inverse is -inf or nan at some points (a flow "
                "numerically not invertible there, e.g. an IAF gate sigma near 0)"
            ),
        )
    n = len(indices)
    scope = "" if n == n_scored else f"; mi and mi_batch over the first {n} of {n_scored} sentences"
    return mi, per_batch, FLOW_ESTIMATOR + scope


def tokenizer_kind(tokenizer) -> str:
    """A short description of a tokenizer for the evaluation record, e.g. ``WordLevel (10002
    types)``: perplexities are only comparable across runs together with this."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    return f"{kind} ({len(tokenizer)} types)"


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr counting sentences (a no-op when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sent", disable=not enabled, leave=False)


def _autocast(device: torch.device, precision: str):
    if runnable_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def too_long(model, dataset: TextDataset) -> list[int]:
    """Indices of the sentences ``model`` cannot take whole: those needing more than its
    :attr:`max_positions` (:meth:`positions_needed`, context included); empty without a limit."""
    limit = model.max_positions
    if limit is None:
        return []
    ctx = dataset.context_ids
    return [
        i
        for i, ids in enumerate(dataset.ids)
        if model.positions_needed(len(ids), len(ctx[i]) if ctx is not None else 0) > limit
    ]


def batch_seed(seed: int, index: int) -> int:
    """The RNG seed of evaluation batch ``index`` (0-based, in the length-sorted order of
    ``dataset.batches(batch_size)``) for evaluation seed ``seed``: every batch draws its samples
    from its own seed, so how the batches are shared among processes cannot change them
    (index -1 seeds the flow-MI pass)."""
    return seed * 1_000_003 + index


# --- what differs between posterior families: chosen by the posterior's type ------------------


class EvaluatedSet(NamedTuple):
    """What a posterior family's whole-set MI (:attr:`PosteriorStatistics.set_mi`) may read
    besides the values its batches kept.

    Attributes:
        model: the evaluated model (in eval mode).
        dataset: the evaluated :class:`textvae.data.TextDataset`.
        first_batch: dataset indices of the first scored batch (for a template posterior).
        scored: dataset indices of every scored sentence, in batch (length-sorted) order.
        batch_size: sentences per evaluation batch.
        device: where the network runs.
        precision: ``fp32`` or ``bf16``, as it runs (:func:`runnable_precision`).
        seed: the evaluation seed (:func:`batch_seed`).
        iw_samples: K of the evaluation (0: training's validation).
        flow_mi_sentences: the cap on a flow's MI sentences that was asked for (None: default).
    """

    model: torch.nn.Module
    dataset: TextDataset
    first_batch: list[int]
    scored: list[int]
    batch_size: int
    device: torch.device
    precision: str
    seed: int
    iw_samples: int
    flow_mi_sentences: int | None


class PosteriorStatistics(NamedTuple):
    """The evaluation statistics that differ between posterior families, registered for the
    posterior's type in :data:`POSTERIOR_STATISTICS` as :data:`textvae.objectives.KL_ESTIMATORS`
    registers the KL. What every family shares lives on the distribution: E_q[z|x] is ``q.mean``
    (exact for a Gaussian; 256 common random draws for a flow or layer-wise posterior) and
    log q(z|x) is ``q.log_prob``. What differs is how I(x; z) is estimated from them and whether
    the KL and the active units are also reported per layer.

    Attributes:
        name: the family, for messages.
        keep: ``(q, z) -> dict``: what one batch keeps for the whole set's MI, from q (batch
            (B,)) and one sample z (B, *event) per sentence: CPU tensors and floats (gathered
            across processes when sharded), with ``mi_b`` (the batch's MI, nats) and ``b`` (B)
            when the family's minibatch MI comes from these samples.
        set_mi: ``(kept, evaluated) -> (mi or None, [(mi_b, B)], mi_estimator)``: the MI of the
            whole set (nats) from the kept dicts in batch order and an :class:`EvaluatedSet`,
            the per-batch values ``mi_batch`` averages (weighted by B) and the estimator's
            description (the reason when mi is None).
        per_layer: the event shape is (L, D): ``kl_per_layer``, ``au_per_layer`` and
            ``au_layer_mean`` are reported.
    """

    name: str
    keep: Callable[[Distribution, torch.Tensor], dict]
    set_mi: Callable[[list[dict], EvaluatedSet], tuple[float | None, list, str]]
    per_layer: bool = False


def _gaussian_keep(q: Independent, z: torch.Tensor) -> dict:
    """Diagonal Gaussian: mu, log sigma^2 and z (B, D) float32, and the minibatch MI of He et
    al. 2019 (:func:`batch_mi`, closed-form entropy).

    Raises:
        ValueError: q is an ``Independent`` of something other than ``Normal``.
    """
    base_gaussian(q)
    mu, logvar = q.mean.float(), (2 * torch.log(q.stddev)).float()
    mi_b = batch_mi(mu, logvar, z)
    return {"mu": mu.cpu(), "logvar": logvar.cpu(), "z": z.cpu(), "mi_b": mi_b, "b": z.size(0)}


def _gaussian_set_mi(kept: list[dict], evaluated: EvaluatedSet) -> tuple[float, list, str]:
    """Diagonal Gaussian: :func:`aggregate_mi` over the whole set (closed-form log-densities,
    float64 matrix products)."""
    mi = aggregate_mi(
        torch.cat([k["mu"] for k in kept]),
        torch.cat([k["logvar"] for k in kept]),
        torch.cat([k["z"] for k in kept]),
    )
    return mi, [(k["mi_b"], k["b"]) for k in kept], MI_ESTIMATOR


def _layerwise_keep(q: LayerwiseGaussian, z: torch.Tensor) -> dict:
    """Layer-wise Gaussian: the offset (B, L, 2D) that, with the model's shared layer maps,
    rebuilds q after gathering (:meth:`LayerwiseGaussian.with_offset`), the ancestral sample z
    (B, L, D), and the batch's MI from the joint log q(z|x) (:func:`distribution_mi`)."""
    mi_b = distribution_mi([q], [z])
    return {"offset": q.offset.cpu(), "z": z.cpu(), "mi_b": mi_b, "b": z.size(0)}


def _layerwise_set_mi(kept: list[dict], evaluated: EvaluatedSet) -> tuple[float, list, str]:
    """Layer-wise Gaussian: :func:`distribution_mi` over the whole set, every batch's posterior
    rebuilt from its offset on a template posterior of the first batch (the layer maps and the
    latent recurrence are the model's, shared by every sentence)."""
    e = evaluated
    first = {k: v.to(e.device) for k, v in e.dataset.collate(e.first_batch).items()}
    template = e.model.posterior(first)
    posteriors = [template.with_offset(k["offset"].to(e.device)) for k in kept]
    mi = distribution_mi(posteriors, [k["z"].to(e.device) for k in kept])
    return mi, [(k["mi_b"], k["b"]) for k in kept], LAYERWISE_ESTIMATOR


def _flow_keep(q: Distribution, z: torch.Tensor) -> dict:
    """Flow posterior: nothing; its MI is a pass of its own (:func:`_flow_set_mi`)."""
    return {}


def _flow_set_mi(kept: list[dict], evaluated: EvaluatedSet) -> tuple[float | None, list, str]:
    """Flow posterior: I(x; z_K) by :func:`_flow_mi` over the first ``flow_mi_sentences``
    scored sentences in dataset order (default :data:`FLOW_MI_EVAL_SENTENCES`, or
    :data:`FLOW_MI_VALIDATION_SENTENCES` without IW samples; 0 = all), under its own seed
    (:func:`batch_seed` index -1); never the base Gaussian's I(x; z_0) in its place."""
    e = evaluated
    cap = e.flow_mi_sentences
    if cap is None:
        cap = FLOW_MI_EVAL_SENTENCES if e.iw_samples else FLOW_MI_VALIDATION_SENTENCES
    indices = sorted(e.scored)[: cap or None]  # 0 = every sentence
    with torch.random.fork_rng(devices=[e.device] if e.device.type == "cuda" else []):
        torch.manual_seed(batch_seed(e.seed, -1))
        return _flow_mi(
            e.model, e.dataset, indices, len(e.scored), e.batch_size, e.device, e.precision
        )


GAUSSIAN_STATISTICS = PosteriorStatistics("diagonal Gaussian", _gaussian_keep, _gaussian_set_mi)
FLOW_STATISTICS = PosteriorStatistics("flow", _flow_keep, _flow_set_mi)
LAYERWISE_STATISTICS = PosteriorStatistics(
    "layer-wise Gaussian", _layerwise_keep, _layerwise_set_mi, per_layer=True
)

# posterior type -> its statistics; the most specific registered type wins (a subclass of a
# registered type uses its entry), as the KL estimators of textvae.objectives.KL_ESTIMATORS
POSTERIOR_STATISTICS: dict[type, PosteriorStatistics] = {
    Independent: GAUSSIAN_STATISTICS,  # diagonal Gaussian (Independent Normal)
    TransformedDistribution: FLOW_STATISTICS,  # a flow over a diagonal Gaussian
    LayerwiseGaussian: LAYERWISE_STATISTICS,  # DELLA's layer-wise latents
}


def posterior_statistics(q: Distribution) -> PosteriorStatistics:
    """The statistics registered for the type of q (:data:`POSTERIOR_STATISTICS`): the entry of
    the first class in q's method resolution order that has one.

    Raises:
        NotImplementedError: no class of q is registered (the message names q's type).
    """
    for cls in type(q).__mro__:
        if cls in POSTERIOR_STATISTICS:
            return POSTERIOR_STATISTICS[cls]
    raise NotImplementedError(
        f"no evaluation statistics for posterior {type(q).__name__}: register its type in "
        "textvae.metrics.POSTERIOR_STATISTICS (a PosteriorStatistics: what a batch keeps for "
        "the MI, the whole set's MI, whether it has layers)"
    )


# --- the estimators of one batch -----------------------------------------------------------


class _Run(NamedTuple):
    """The settings every batch of one evaluation shares (see :func:`evaluate`)."""

    device: torch.device
    precision: str  # as it runs
    seed: int
    iw_samples: int
    chunk_tokens: int


def _exact_likelihood(model, batch: dict[str, torch.Tensor], precision: str) -> dict:
    """A model without latent: its exact -log p(x) (B,) float32 nats, as ``nll`` and ``rec``."""
    with _autocast(batch["input_ids"].device, precision):
        ll = model.log_likelihood(batch, None)[0].float()
    nll = (-ll).cpu()
    return {"nll": nll, "rec": nll}


def _closed_form_kl(q: Distribution, p: Distribution, estimator) -> dict:
    """The KL of a batch when its estimator needs no sample: ``kl`` (B,) and ``kl_dims`` (D,)
    summed over the batch, nats; only ``closed_form`` False otherwise (:class:`_SampledKL`)."""
    if estimator.needs_samples:
        return {"closed_form": False}
    closed = estimator.estimate(q, p)  # (B,), (B, D)
    return {
        "closed_form": True,
        "kl": closed.total.cpu(),
        "kl_dims": closed.per_dim.sum(0).cpu(),
        "bound_valid": closed.bound_valid,
    }


class _SampledKL:
    """The KL of a batch from its IW samples (an estimator that needs samples), summed over
    the sample chunks: per dimension when the estimator gives per-dimension values (layer-wise:
    (B, L, D)), else per sentence (Monte Carlo: (B,))."""

    def __init__(self, b: int, device: torch.device):
        self.total = torch.zeros(b, device=device)
        self.per_dim, self.scale, self.bound_valid = None, 1.0, True

    def add(self, kl: KL) -> None:
        """One chunk's :class:`textvae.objectives.KL` of s samples: total (s, B), per_dim
        (s, B, *event) or None."""
        self.bound_valid, self.scale = kl.bound_valid, kl.scale
        if kl.per_dim is not None:
            chunk = kl.per_dim.float().sum(0)
            self.per_dim = chunk if self.per_dim is None else self.per_dim + chunk
        else:
            self.total += kl.total.float().sum(0)

    def result(self, n_samples: int) -> dict:
        """``kl`` (B,) nats (scaled by the posterior's ``log_prob_scale``), the mean over the
        ``n_samples``; ``kl_dims`` (*event) summed over the batch when per-dimension values exist."""
        if self.per_dim is None:
            return {"kl": (self.total / n_samples).cpu(), "bound_valid": self.bound_valid}
        per_dim = self.per_dim / n_samples
        return {
            "kl": (per_dim.flatten(1).sum(-1) * self.scale).cpu(),
            "kl_dims": per_dim.sum(0).cpu(),
            "bound_valid": self.bound_valid,
        }


def _importance_sampled(model, batch, q, p, estimator, run: _Run) -> dict:
    """The estimates over the K = ``run.iw_samples`` (at least one) importance samples of a
    batch, drawn in chunks of s = max(1, chunk_tokens // (B * T)) samples (:func:`evaluate`):
    ``rec`` (B,) = mean_k -log p(x|z_k); ``nll`` (B,) = the IW bound (Burda et al. 2016, only
    with K > 0); the KL over the same samples when the estimator needs samples
    (:class:`_SampledKL`). Nats per sentence, float32, on the CPU."""
    b, t = batch["input_ids"].shape
    n_samples = run.iw_samples or 1
    step = max(1, run.chunk_tokens // (b * t))
    log_w, ll_sum = [], torch.zeros(b, device=run.device)
    kl = _SampledKL(b, run.device) if estimator.needs_samples else None
    for start in range(0, n_samples, step):
        # (s, B, *event) with log q (s, B): exact also for flows without an inverse;
        # layer-wise latents drawn ancestrally, all layers once per sample
        z, log_q = rsample_and_log_prob(q, (min(step, n_samples - start),))
        with _autocast(run.device, run.precision):
            lw, ll = iw_log_weights(model, batch, q, p, z, log_q)
        log_w.append(lw.float())
        ll_sum += ll.float().sum(0)
        if kl is not None:  # one KL value per sample (s, B) (and per dimension)
            kl.add(estimator.estimate(q, p, z, log_q))
    out = {"rec": (-ll_sum / n_samples).cpu()}
    if kl is not None:
        out.update(kl.result(n_samples))
    if run.iw_samples:
        out["nll"] = (-iw_bound(torch.cat(log_w, dim=0))).cpu()
    return out


def _classifier_counts(model, mean: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict:
    """With the model's classifier on z (:meth:`textvae.models.base.TextVAE.classify_latent`)
    and a batch with labels: ``cls_n`` labelled sentences (label >= 0) and ``cls_correct``, how
    many of them it labels right from E_q[z|x] (``mean`` (B, *event)); {} otherwise."""
    if "labels" not in batch:
        return {}
    logits = model.classify_latent(mean.to(batch["labels"].device).float())
    if logits is None:
        return {}
    labelled = batch["labels"] >= 0
    pred = logits.argmax(-1)
    return {
        "cls_correct": int((pred == batch["labels"])[labelled].sum()),
        "cls_n": int(labelled.sum()),
    }


def _score_batch(model, batch: dict[str, torch.Tensor], index: int, run: _Run) -> dict:
    """Every per-batch estimate of batch ``index`` (its own seed, :func:`batch_seed`), as CPU
    tensors and numbers: ``rec``, ``nll``, ``kl``, ``kl_dims``, ``closed_form``,
    ``bound_valid``, ``family`` (:func:`posterior_statistics`), ``mean`` (E_q[z|x]), ``mi``
    (what the family keeps), ``summary`` (the encoder summary), ``gap`` (the z-usage gap), the
    classifier counts; only ``nll`` and ``rec`` for a model without latent."""
    device = run.device
    # the z-usage gap's permutations have their own generator: the IW samples stay as they were
    perm_gen = torch.Generator(device=device).manual_seed(batch_seed(run.seed, index))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(batch_seed(run.seed, index))
        if not model.has_latent:
            return _exact_likelihood(model, batch, run.precision)
        with _autocast(device, run.precision):
            q = model.posterior(batch)
            summary = model.encoder_summary(batch)  # (B, H) or None
        p = model.prior(batch)
        # the training objective's KL (objectives.kl_estimate), chosen by the types of q, p
        estimator = kl_estimator(q, p)
        r = _closed_form_kl(q, p, estimator)
        z = q.sample()  # (B, *event): the z-usage gap's codes (and the MI samples without a flow)
        family = posterior_statistics(q)
        r.update(family=family, mean=q.mean.float().cpu(), mi=family.keep(q, z))
        if summary is not None:
            r["summary"] = summary.float().cpu()
        r.update(_classifier_counts(model, r["mean"], batch))
        with _autocast(device, run.precision):
            gap = z_usage_gap(model, batch, z, perm_gen)
        r["gap"] = gap.cpu() if gap is not None else None
        r.update(_importance_sampled(model, batch, q, p, estimator, run))
    return r


def _score_batches(
    model,
    dataset: TextDataset,
    batches: list[list[int]],
    run: _Run,
    num_processes: int,
    process_index: int,
    progress: bool,
) -> list[dict]:
    """:func:`_score_batch` of this process's share of ``batches`` (batch j goes to process
    j mod ``num_processes``), each record with its ``batch`` number and dataset ``indices``;
    when sharded, every process's records gathered to every process, in batch order."""
    mine = [(j, b) for j, b in enumerate(batches) if j % num_processes == process_index]
    bar = _progress_bar(sum(len(b) for _, b in mine), "evaluate", progress and process_index == 0)
    records = []
    for j, indices in mine:
        batch = {k: v.to(run.device) for k, v in dataset.collate(indices).items()}
        records.append({"batch": j, "indices": indices, **_score_batch(model, batch, j, run)})
        bar.update(len(indices))
    bar.close()
    if num_processes > 1:
        from accelerate.utils import gather_object

        records = sorted(gather_object(records), key=lambda r: r["batch"])
    return records


# --- the estimators of the whole set, from the batch records in batch order -------------------


def _likelihood_fields(records: list[dict], dataset: TextDataset) -> dict:
    """``n_sentences``, ``n_tokens``, ``n_words`` (EOS counted), ``rec`` and, with an IW (or
    exact) NLL, ``nll``, ``nll_stderr``, the per-sentence values in dataset order
    (``nll_per_sentence``, ``sentence_index``, ``n_words_per_sentence``), ``ppl_token`` and
    ``ppl_word``."""
    order = [i for r in records for i in r["indices"]]  # length-sorted; un-sorted below
    index = sorted(order)
    n = len(order)
    n_words_each = [dataset.n_words[i] for i in index]
    out = {
        "n_sentences": n,
        "n_tokens": sum(len(dataset.ids[i]) for i in index),
        "n_words": sum(n_words_each),
        "rec": float(torch.cat([r["rec"] for r in records]).double().mean()),
    }
    nll = [r["nll"] for r in records if r.get("nll") is not None]
    if not nll:
        return out
    nll_t = torch.cat(nll).double()
    out["nll"] = float(nll_t.mean())
    out["nll_stderr"] = float(nll_t.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    # back to dataset order: nll_t[j] is the value of sentence order[j]
    out["nll_per_sentence"] = nll_t[torch.argsort(torch.tensor(order))].tolist()
    out["sentence_index"] = index
    out["n_words_per_sentence"] = n_words_each
    out["ppl_token"] = math.exp(float(nll_t.sum()) / out["n_tokens"])
    out["ppl_word"] = math.exp(float(nll_t.sum()) / out["n_words"])
    return out


def _kl_fields(records: list[dict], n: int, iw_samples: int, per_layer: bool) -> dict:
    """``kl`` (mean over the N sentences), ``kl_samples`` (None for a closed form),
    ``kl_per_dim`` ((D,) or (L, D) as lists; None without per-dimension values) and, with
    layers, ``kl_per_layer`` (L,). Nats per sentence.

    Raises:
        ValueError: some batches had a closed-form KL and others not.
    """
    closed_form = {r["closed_form"] for r in records}
    if len(closed_form) > 1:
        raise ValueError("the KL had a closed form for some batches only; cannot mix estimates")
    kl_dims_sum = None
    for r in records:
        if r.get("kl_dims") is not None:
            kl_dims_sum = r["kl_dims"] if kl_dims_sum is None else kl_dims_sum + r["kl_dims"]
    per_dim = kl_dims_sum.double() / n if kl_dims_sum is not None else None
    out = {
        "kl": float(torch.cat([r["kl"] for r in records]).double().mean()),
        "kl_samples": None if closed_form == {True} else (iw_samples or 1),
        "kl_per_dim": per_dim.tolist() if per_dim is not None else None,
    }
    if per_layer:
        out["kl_per_layer"] = per_dim.sum(-1).tolist()
    return out


def _mi_fields(records: list[dict], family: PosteriorStatistics, evaluated: EvaluatedSet) -> dict:
    """``mi``, ``mi_batch`` (the batch MIs weighted by batch size; None without them) and
    ``mi_estimator``, by the posterior family's :attr:`PosteriorStatistics.set_mi`."""
    mi, per_batch, estimator = family.set_mi([r["mi"] for r in records], evaluated)
    mi_batch = (
        sum(m * b for m, b in per_batch) / sum(b for _, b in per_batch) if per_batch else None
    )
    return {"mi": mi, "mi_batch": mi_batch, "mi_estimator": estimator}


def _au_fields(means: list[torch.Tensor], au_delta: float, per_layer: bool) -> dict:
    """Active units (:func:`active_units`) of the posterior means (B_i, *event) of every
    batch: ``au``, ``au_delta``, ``au_by_delta`` (at ``au_delta`` and :data:`AU_DELTA_PAPER`)
    and, with layers, ``au_per_layer`` and ``au_layer_mean`` (Hu et al. 2022, A.3)."""
    mean_all = torch.cat(means)  # (N, *event)
    au, var = active_units(mean_all, au_delta)
    deltas = sorted({au_delta, AU_DELTA_PAPER})
    out = {
        "au": au,
        "au_delta": au_delta,
        "au_by_delta": {str(d): int((var > d).sum()) for d in deltas},
    }
    if per_layer:  # (N, L, D): per layer
        var_layers = var.view(mean_all.shape[1:])
        out["au_per_layer"] = {str(d): (var_layers > d).sum(-1).tolist() for d in deltas}
        # DELLA's own AU (Hu et al. 2022, A.3): the mean over layers of the per-layer count at 0.2
        out["au_layer_mean"] = sum(out["au_per_layer"][str(AU_DELTA_PAPER)]) / var_layers.size(0)
    return out


def _classifier_fields(records: list[dict]) -> dict:
    """``classifier_accuracy`` (fraction) and ``classifier_n`` over the labelled sentences; {}
    when none was scored (no classifier, or no labels)."""
    n = sum(r.get("cls_n", 0) for r in records)
    if not n:
        return {}
    return {
        "classifier_accuracy": sum(r.get("cls_correct", 0) for r in records) / n,
        "classifier_n": n,
    }


def _dispersion_field(records: list[dict], model) -> dict:
    """``encoder_dispersion`` of the batches' encoder summaries (:func:`encoder_dispersion`),
    or None values with a ``reason`` for a model without one (``encoder_summary`` None)."""
    summaries = [r["summary"] for r in records if "summary" in r]
    if not summaries:
        return {
            "total_variance": None,
            "relative_variance": None,
            "mean_cosine_distance": None,
            "reason": f"{type(model).__name__} has no single encoder "
            "summary before its posterior heads "
            "(encoder_summary)",
        }
    sums = DispersionSums()
    for h in summaries:
        sums.add(h)
    return encoder_dispersion(sums)


def _protocol_fields(
    records: list[dict], evaluated: EvaluatedSet, au_delta: float, n_skipped: int
) -> dict:
    """The evaluation dict (exactly :data:`EVAL_KEYS`) from the batch records in batch order:
    each whole-set estimator on its own."""
    model = evaluated.model
    out: dict = dict.fromkeys(EVAL_KEYS)
    out.update(_likelihood_fields(records, evaluated.dataset))
    out.update(
        tokenizer=tokenizer_kind(evaluated.dataset.tokenizer),
        precision=evaluated.precision,
        seed=evaluated.seed,
        bound_valid=all(r.get("bound_valid", True) for r in records),
        n_skipped=n_skipped,
    )
    n, n_tokens = out["n_sentences"], out["n_tokens"]
    if not model.has_latent:
        out["elbo"] = -out["rec"]  # exact log-likelihood: the bound is tight
        out["ppl_elbo_token"] = math.exp(out["rec"] * n / n_tokens)
        return out
    family = records[0]["family"]  # every batch's posterior has the same type
    out.update(_kl_fields(records, n, evaluated.iw_samples, family.per_layer))
    out["elbo"] = -(out["rec"] + out["kl"])
    out["ppl_elbo_token"] = math.exp(-out["elbo"] * n / n_tokens)
    out["iw_samples"] = evaluated.iw_samples or None
    out.update(_mi_fields(records, family, evaluated))
    out.update(_au_fields([r["mean"] for r in records], au_delta, family.per_layer))
    gaps = [r["gap"] for r in records if r.get("gap") is not None]
    out["z_gap"] = float(torch.cat(gaps).double().mean()) if gaps else None
    out.update(_classifier_fields(records))
    out["encoder_dispersion"] = _dispersion_field(records, model)
    return out


# --- the protocol ----------------------------------------------------------------------------


def _check_arguments(iw_samples: int, dataset, num_processes: int, process_index: int) -> None:
    """Raises ValueError for the arguments :func:`evaluate` refuses (its Raises)."""
    if iw_samples < 0:
        raise ValueError(f"iw_samples must be >= 0, got {iw_samples}")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate an empty dataset")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
    if num_processes > 1 and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError(
            f"num_processes={num_processes} needs torch.distributed initialised "
            "(run under accelerate launch or torchrun, or call PartialState())"
        )


def _evaluation_batches(
    model, dataset: TextDataset, batch_size: int, skip_too_long: bool
) -> tuple[list[list[int]], int]:
    """The length-sorted batches of dataset indices that are scored (sentences past the
    model's position limit left out with ``skip_too_long``) and the number left out.

    Raises:
        ValueError: sentences past the limit without ``skip_too_long``, or all of them past it.
    """
    skipped = too_long(model, dataset)
    if skipped and not skip_too_long:
        longest = max(skipped, key=lambda i: len(dataset.ids[i]))
        raise ValueError(
            f"{len(skipped)} of {len(dataset)} sentences (e.g. sentence {longest}, "
            f"{len(dataset.ids[longest])} tokens) are longer than the model's "
            f"{model.max_positions} positions; evaluation never shortens a sentence: pass "
            "skip_too_long=True (textvae evaluate --skip-too-long) to score the others and report "
            "how many were skipped"
        )
    if len(skipped) == len(dataset):
        raise ValueError(
            f"all {len(dataset)} sentences are longer than the model's "
            f"{model.max_positions} positions"
        )
    skip_set = set(skipped)
    batches = [
        [i for i in b if i not in skip_set] for b in dataset.batches(batch_size, shuffle=False)
    ]
    return [b for b in batches if b], len(skipped)


@torch.no_grad()
def evaluate(
    model,
    dataset: TextDataset,
    iw_samples: int = 500,
    au_delta: float = 0.01,
    batch_size: int = 64,
    chunk_tokens: int = 16384,
    precision: str = "fp32",
    seed: int = 0,
    skip_too_long: bool = False,
    flow_mi_sentences: int | None = None,
    progress: bool = False,
    num_processes: int = 1,
    process_index: int = 0,
) -> dict:
    """Run the protocol over ``dataset``; returns a dict with exactly :data:`EVAL_KEYS`.

    Composed of small estimators: each batch (:func:`_score_batch`, its own seed) gets the IW
    bound, rec and a sampled KL over the same importance samples (:func:`_importance_sampled`)
    or the closed-form KL (:func:`_closed_form_kl`), E_q[z|x], the MI statistics of its
    posterior family (:func:`posterior_statistics`), the z-usage gap, the encoder summary and
    the classifier counts; the field groups (``_likelihood``/``_kl``/``_mi``/``_au``/
    ``_classifier_fields``, ``_dispersion_field``) then come from the records in batch order.

    The IW samples of a batch go through the decoder as one (s * B, T) batch per chunk, with
    s = max(1, chunk_tokens // (B * T)); the encoder runs once per batch. ``iw_samples=0``
    skips the IW estimate (``nll`` and the perplexities are None; ``rec`` and a Monte Carlo
    ``kl`` then use one sample), which is what training's validation uses. Each batch samples
    under a forked RNG seeded by :func:`batch_seed` (``seed``, batch index), so evaluation is
    repeatable, leaves the caller's RNG untouched and does not depend on the process count.
    With ``precision="bf16"`` the network runs under bfloat16 autocast (fp32 where the device
    has no native bf16, :func:`runnable_precision`; ``precision`` records what ran); log-softmax,
    log-densities, log-sum-exp and all sums stay float32/float64. ``progress`` shows a tqdm
    bar on stderr (sentences done, elapsed, remaining; the main process's share when sharded).

    A flow posterior's ``mi`` (I(x; z_K), N^2 flow inverses) is taken over the first
    ``flow_mi_sentences`` scored sentences in dataset order (0 = all of them; default
    :data:`FLOW_MI_EVAL_SENTENCES`, and with ``iw_samples=0``, training's validation,
    :data:`FLOW_MI_VALIDATION_SENTENCES`); ``mi_estimator`` records the count.

    Every sentence is scored whole (build the dataset with ``load_split(..., whole=True)``).
    ``nll_per_sentence`` is in dataset order, ``sentence_index[i]`` being the dataset position
    of its i-th value and ``n_words_per_sentence`` its words (+1 EOS), so that two evaluations
    are paired by index (:func:`textvae.report.paired_differences`). A sentence longer than
    the model's position limit (``model.max_positions``, e.g. DELLA's GPT-2) is an error,
    unless ``skip_too_long``: then it is left out, counted in ``n_skipped`` and absent from
    ``sentence_index``, and every field is over the sentences scored.

    Sharded evaluation (``num_processes`` > 1, inside ``accelerate launch``/``torchrun``, so
    ``torch.distributed`` is initialised): process ``process_index`` scores batches
    ``process_index, process_index + num_processes, ...`` of the same length-sorted batches a
    single process would make, each with its own seed (whole batches: with fewer batches than
    processes some processes idle, and a warning says so); the per-batch results (per-sentence
    values, posterior parameters and one z per sentence for the MI, encoder summaries: memory
    linear in the set) are gathered to every process (``accelerate.utils.gather_object``) and
    reduced in batch order, so every process returns the single-process result. A flow's MI
    pass (its own seed) runs whole on every process.

    Raises:
        ValueError: ``iw_samples`` < 0, an empty dataset, sentences past the model's
            position limit without ``skip_too_long``, ``process_index`` not in
            [0, ``num_processes``), or several processes without ``torch.distributed``.
        NotImplementedError: no KL estimator or no evaluation statistics are registered for
            the model's posterior (and prior) types (:func:`posterior_statistics`).
    """
    _check_arguments(iw_samples, dataset, num_processes, process_index)
    batches, n_skipped = _evaluation_batches(model, dataset, batch_size, skip_too_long)
    if len(batches) < num_processes and process_index == 0:
        log.warning(
            "%d evaluation batches of %d sentences for %d processes: %d processes have "
            "nothing to score; a smaller batch size shares the work (it changes the "
            "Monte Carlo draws, not the estimator)",
            len(batches),
            batch_size,
            num_processes,
            num_processes - len(batches),
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # bf16 without native support runs fp32
    run = _Run(device, runnable_precision(precision, device), seed, iw_samples, chunk_tokens)
    records = _score_batches(model, dataset, batches, run, num_processes, process_index, progress)
    scored = [i for r in records for i in r["indices"]]
    evaluated = EvaluatedSet(
        model,
        dataset,
        batches[0],
        scored,
        batch_size,
        device,
        run.precision,
        seed,
        iw_samples,
        flow_mi_sentences,
    )
    out = _protocol_fields(records, evaluated, au_delta, n_skipped)
    model.train(was_training)
    return out


# --- generation metrics (BLEU via sacrebleu, self-BLEU, distinct-n of Li et al. 2016) ----------


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the whole list.

    Tokens are whitespace-separated words; n-grams do not cross sentence boundaries. Returns
    0.0 when the list has no n-gram.
    """
    grams = [
        tuple(words[i : i + n])
        for words in (t.split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU-4 of hypotheses against one reference each, by ``sacrebleu`` (0-100).

    sacrebleu's default ``13a`` tokenizer runs on top of the corpus's own tokenization (PTB and
    Yelp ship tokenized; 13a leaves such text almost unchanged), with ``force=True`` so that
    sacrebleu does not warn about tokenized input; the signature records the settings.

    Returns:
        (score, sacrebleu signature string, which records tokenizer, smoothing and version).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"BLEU needs equally many hypotheses and references, got "
            f"{len(hypotheses)} and {len(references)}"
        )
    bleu = BLEU(force=True)
    return bleu.corpus_score(hypotheses, [references]).score, str(bleu.get_signature())


def self_bleu(texts: list[str]) -> tuple[float, str]:
    """Self-BLEU (Zhu et al. 2018, Texygen): each sentence scored by BLEU-4 against all the
    others as references, averaged (0-100; high = the samples repeat each other).

    Sentence-level BLEU is ``sacrebleu``'s with ``effective_order`` (as recommended for single
    sentences); cost is O(N^2) n-gram extractions (16 s for N = 500 PTB sentences, 68 s for
    1,000; bench/RESULTS.md). The score grows with N on the same kind of text (24 at N = 100,
    37 at N = 1,000 on PTB test sentences): compare self-BLEU at equal N only.

    Returns:
        (score, sacrebleu signature string).

    Raises:
        ValueError: fewer than two texts.
    """
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least two sentences, got {len(texts)}")
    bleu = BLEU(effective_order=True, force=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores), str(bleu.get_signature())


@torch.no_grad()
def generation_metrics(
    model,
    texts: list[str],
    n_samples: int = 500,
    strategy: str = "greedy",
    max_length: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """BLEU of reconstructions, self-BLEU and distinct-1/2 of prior samples.

    ``rec_bleu``: corpus BLEU of greedy decodings of each sentence's posterior mean against the
    sentence itself (None for a model without latent). ``self_bleu``, ``distinct_1``,
    ``distinct_2``: over ``n_samples`` decodings of z ~ p(z) with ``strategy`` (for a model
    without latent: ancestral decoding with the same strategy). A collapsed model's greedy
    prior samples are all the same sentence: self-BLEU near 100, distinct-n near 0.

    Returns:
        dict with :data:`GENERATION_KEYS`; ``generation`` records the decoding settings, the
        number of reconstructed sentences and sacrebleu's signatures. Runs under a forked RNG
        seeded by ``seed``. ``progress``: a tqdm bar on stderr (sentences decoded).

    Raises:
        ValueError: ``n_samples`` < 2 (self-BLEU needs two samples), or an unknown strategy.
    """
    from textvae.generate import reconstruct, sample_prior

    options = dict(
        strategy=strategy, max_length=max_length, temperature=temperature, top_k=top_k, top_p=top_p
    )
    bar = _progress_bar(n_samples + (len(texts) if model.has_latent else 0), "generation", progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples: list[str] = []
        for start in range(0, n_samples, batch_size):
            samples += sample_prior(model, min(batch_size, n_samples - start), **options)
            bar.update(min(batch_size, n_samples - start))
    out = dict.fromkeys(GENERATION_KEYS)
    settings = {
        "prior_samples": n_samples,
        **options,
        "seed": seed,
        "reconstruction": None,
        "rec_sentences": 0,
    }
    if model.has_latent:
        recs: list[str] = []
        for start in range(0, len(texts), batch_size):
            recs += reconstruct(
                model, texts[start : start + batch_size], strategy="greedy", max_length=max_length
            )
            bar.update(len(texts[start : start + batch_size]))
        references = [" ".join(t.split()) for t in texts]
        out["rec_bleu"], settings["bleu_signature"] = corpus_bleu(recs, references)
        settings.update(reconstruction="greedy from the posterior mean", rec_sentences=len(texts))
    bar.close()
    out["self_bleu"], settings["self_bleu_signature"] = self_bleu(samples)
    out["distinct_1"], out["distinct_2"] = distinct_n(samples, 1), distinct_n(samples, 2)
    out["generation"] = settings
    return out


@torch.no_grad()
def response_metrics(
    model,
    contexts: list[str],
    references: list[str],
    n_responses: int = 5,
    strategy: str = "greedy",
    max_length: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Response generation of a conditional model (BLEU and distinct-n of responses, as in
    Zhao, Zhao & Eskenazi 2017 and Chien & Luo 2022's dialogue task): for each context, ``n_responses`` responses decoded from z ~ p(z|c) with
    ``strategy`` (:func:`textvae.generate.respond`).

    ``response_bleu``: corpus BLEU-4 (sacrebleu, 0-100) of all generated responses, each scored
    against its context's one reference (the reference repeated ``n_responses`` times: the
    average-case BLEU of a sampled response). ``distinct_1``, ``distinct_2``: over all generated
    responses together.

    Returns:
        dict with :data:`RESPONSE_KEYS`; ``generation`` records the settings and the sacrebleu
        signature. Runs under a forked RNG seeded by ``seed``. ``progress``: a tqdm bar on
        stderr (contexts answered).

    Raises:
        ValueError: contexts and references differ in length or are empty, or the model is not
            conditional.
    """
    from textvae.generate import respond

    if not model.conditional:
        raise ValueError(f"{type(model).__name__} is not a conditional model")
    if len(contexts) != len(references) or not contexts:
        raise ValueError(
            f"response metrics need equally many contexts and references, got "
            f"{len(contexts)} and {len(references)}"
        )
    options = dict(
        strategy=strategy, max_length=max_length, temperature=temperature, top_k=top_k, top_p=top_p
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        groups: list[list[str]] = []
        bar = _progress_bar(len(contexts), "responses", progress)
        for start in range(0, len(contexts), batch_size):
            groups += respond(model, contexts[start : start + batch_size], n_responses, **options)
            bar.update(len(contexts[start : start + batch_size]))
        bar.close()
    hypotheses = [r for group in groups for r in group]
    refs = [
        " ".join(ref.split()) for ref, group in zip(references, groups, strict=True) for _ in group
    ]
    out = dict.fromkeys(RESPONSE_KEYS)
    out["response_bleu"], signature = corpus_bleu(hypotheses, refs)
    out["distinct_1"], out["distinct_2"] = distinct_n(hypotheses, 1), distinct_n(hypotheses, 2)
    out["generation"] = {
        "contexts": len(contexts),
        "responses_per_context": n_responses,
        "latent": "z ~ p(z|c)" if model.has_latent else "none",
        **options,
        "seed": seed,
        "bleu_signature": signature,
    }
    return out


# --- latent probe (label from E_q[z|x], Chien & Luo 2022's sentiment task) ---------------------


def probe_accuracy(
    fit_x,
    fit_y,
    score_x,
    score_y,
    sizes: list[int | None],
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Logistic-regression probe: how well a label can be read off the latent.

    For each n in ``sizes`` (None = all fit examples), ``repeats`` random subsets of n fit
    examples (one when n covers the set) train a standardised scikit-learn
    ``LogisticRegression``; accuracy is measured on all score examples. The majority-class
    baseline predicts the most frequent label of the same subset.

    Args:
        fit_x, score_x: (N, D) features (e.g. posterior means), arrays or tensors.
        fit_y, score_y: (N,) integer labels.

    Returns:
        One dict per size: ``n``, ``accuracy`` (mean), ``accuracy_std`` (over repeats),
        ``majority`` (mean baseline accuracy), ``repeats``. Accuracies are fractions in [0, 1].

    Raises:
        ValueError: a size is below 2 or exceeds the fit set, or a subset has one class only.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit_x, score_x = np.asarray(fit_x, dtype=np.float64), np.asarray(score_x, dtype=np.float64)
    fit_y, score_y = np.asarray(fit_y), np.asarray(score_y)
    rng = np.random.default_rng(seed)
    results = []
    for size in sizes:
        n = len(fit_y) if size is None else int(size)
        if not 2 <= n <= len(fit_y):
            raise ValueError(f"probe size {n} must be between 2 and the {len(fit_y)} fit examples")
        runs = 1 if n == len(fit_y) else repeats
        accs, majs = [], []
        for _ in range(runs):
            idx = rng.permutation(len(fit_y))[:n]
            labels = fit_y[idx]
            classes, counts = np.unique(labels, return_counts=True)
            if len(classes) < 2:
                raise ValueError(f"a probe subset of {n} examples has one class only; use more")
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            clf.fit(fit_x[idx], labels)
            accs.append(float((clf.predict(score_x) == score_y).mean()))
            majs.append(float((score_y == classes[counts.argmax()]).mean()))
        results.append(
            {
                "n": n,
                "accuracy": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "majority": float(np.mean(majs)),
                "repeats": runs,
            }
        )
    return results
