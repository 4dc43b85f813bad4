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
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from textvae.data import TextDataset
from textvae.fields import EVAL_KEYS
from textvae.flows import InverseError, base_gaussian
from textvae.objectives import iw_bound, iw_log_weights, kl_estimator, rsample_and_log_prob
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
    limit = getattr(model, "max_positions", None)
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
    """
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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    precision = runnable_precision(precision, device)  # bf16 without native support runs fp32
    summary_fn, classifier = (
        getattr(model, "encoder_summary", None),
        getattr(model, "classifier", None),
    )
    batches = [
        [i for i in b if i not in skip_set] for b in dataset.batches(batch_size, shuffle=False)
    ]
    batches = [b for b in batches if b]
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
    records = []  # one per batch scored here, everything on the CPU (gathered when sharded)
    mine = sum(len(b) for j, b in enumerate(batches) if j % num_processes == process_index)
    bar, done = _progress_bar(mine, "evaluate", progress and process_index == 0), 0
    for j, indices in enumerate(batches):
        if j % num_processes != process_index:
            continue
        bar.update(done)  # the previous batch's sentences
        done = len(indices)
        r = {"batch": j, "indices": indices}
        records.append(r)
        batch = {k: v.to(device) for k, v in dataset.collate(indices).items()}
        b, t = batch["input_ids"].shape
        # the z-usage gap's permutations have their own generator: the IW samples stay as they were
        perm_gen = torch.Generator(device=device).manual_seed(batch_seed(seed, j))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, j))
            if not model.has_latent:
                with _autocast(device, precision):
                    ll = model.log_likelihood(batch, None)[0].float()
                r["nll"] = r["rec"] = (-ll).cpu()
                continue
            with _autocast(device, precision):
                q = model.posterior(batch)
                if summary_fn is not None:
                    r["summary"] = summary_fn(batch).float().cpu()
            p = model.prior(batch)
            # the training objective's KL (objectives.kl_estimate), chosen by the types of q, p
            estimator = kl_estimator(q, p)
            if not estimator.needs_samples:  # closed form: (B,), (B, D)
                closed = estimator.estimate(q, p)
                r["kl"], r["kl_dims"] = closed.total.cpu(), closed.per_dim.sum(0).cpu()
                r["bound_valid"] = closed.bound_valid
            r["closed_form"] = not estimator.needs_samples
            layerwise = estimator.name == "layerwise"
            z1 = (
                q.sample()
            )  # (B, *event): the z-usage gap's codes (and the MI samples without a flow)
            r["layerwise"], r["flow"], r["b"] = layerwise, False, b
            if layerwise:
                # the posterior is rebuilt from its offset after gathering (it holds modules)
                r["offset"], r["z"] = q.offset.cpu(), z1.cpu()
                r["mean"] = q.mean.float().cpu()
                r["mi_b"] = distribution_mi([q], [z1])
            elif base_gaussian(q) is not q:  # a flow: MI of z_K after the loop (_flow_mi)
                r["flow"] = True
                r["mean"] = q.mean.float().cpu()
            else:
                mu, logvar = q.mean.float(), (2 * torch.log(q.stddev)).float()
                r["mu"], r["logvar"], r["z"], r["mean"] = mu.cpu(), logvar.cpu(), z1.cpu(), mu.cpu()
                r["mi_b"] = batch_mi(mu, logvar, z1)
            if classifier is not None and "labels" in batch:  # from E_q[z|x], labelled only
                labelled = batch["labels"] >= 0
                pred = classifier(r["mean"].to(device).float()).argmax(-1)
                r["cls_correct"] = int((pred == batch["labels"])[labelled].sum())
                r["cls_n"] = int(labelled.sum())
            with _autocast(device, precision):
                gap = z_usage_gap(model, batch, z1, perm_gen)
            r["gap"] = gap.cpu() if gap is not None else None
            n_samples = iw_samples or 1
            step = max(1, chunk_tokens // (b * t))
            log_w, ll_sum = [], torch.zeros(b, device=device)
            kl_sum = torch.zeros(b, device=device)
            layer_kl = None  # (B, L, D): per-layer closed-form KL summed over the samples
            for start in range(0, n_samples, step):
                # (s, B, *event) with log q (s, B): exact also for flows without an inverse;
                # layer-wise latents drawn ancestrally, all layers once per sample
                z, log_q = rsample_and_log_prob(q, (min(step, n_samples - start),))
                with _autocast(device, precision):
                    lw, ll = iw_log_weights(model, batch, q, p, z, log_q)
                log_w.append(lw.float())
                ll_sum += ll.float().sum(0)
                if estimator.needs_samples:  # one KL value per sample (s, B) (and per layer)
                    chunk = estimator.estimate(q, p, z, log_q)
                    r["bound_valid"] = chunk.bound_valid
                    if layerwise:
                        chunk_kl = chunk.per_dim.float().sum(0)  # (B, L, D)
                        layer_kl = chunk_kl if layer_kl is None else layer_kl + chunk_kl
                    else:
                        kl_sum += chunk.total.float().sum(0)
            r["rec"] = (-ll_sum / n_samples).cpu()
            if layerwise:
                layer_kl = layer_kl / n_samples
                r["kl"] = (layer_kl.flatten(1).sum(-1) * chunk.scale).cpu()
                r["kl_dims"] = layer_kl.sum(0).cpu()
            elif estimator.needs_samples:
                r["kl"] = (kl_sum / n_samples).cpu()
            if iw_samples:
                r["nll"] = (-iw_bound(torch.cat(log_w, dim=0))).cpu()
    bar.update(done)
    bar.close()
    if num_processes > 1:
        from accelerate.utils import gather_object

        records = sorted(gather_object(records), key=lambda r: r["batch"])
    # the batch results in batch order, as one process computes them
    order = [i for r in records for i in r["indices"]]  # length-sorted; un-sorted below
    nll = [r["nll"] for r in records if r.get("nll") is not None]
    rec = [r["rec"] for r in records]
    kl = [r["kl"] for r in records if r.get("kl") is not None]
    kl_dims_sum = None
    for r in records:
        if r.get("kl_dims") is not None:
            kl_dims_sum = r["kl_dims"] if kl_dims_sum is None else kl_dims_sum + r["kl_dims"]
    closed_form = all(r.get("closed_form", True) for r in records)
    layerwise = any(r.get("layerwise", False) for r in records)
    flow = any(r.get("flow", False) for r in records)
    bound_valid = all(r.get("bound_valid", True) for r in records)
    zs = [r["z"].to(device) if layerwise else r["z"] for r in records if "z" in r]
    mus = [r["mu"] for r in records if "mu" in r]
    logvars = [r["logvar"] for r in records if "logvar" in r]
    means = [r["mean"] for r in records if "mean" in r]
    mi_b = [(r["mi_b"], r["b"]) for r in records if "mi_b" in r]
    gaps = [r["gap"] for r in records if r.get("gap") is not None]
    cls_correct = sum(r.get("cls_correct", 0) for r in records)
    cls_n = sum(r.get("cls_n", 0) for r in records)
    dispersion = DispersionSums()
    for r in records:
        if "summary" in r:
            dispersion.add(r["summary"])
    posteriors = []  # layer-wise posteriors of the whole set, for the aggregate MI
    if layerwise:
        # the shared recurrence and layer maps of this model's posteriors (from the first batch)
        first = {k: v.to(device) for k, v in dataset.collate(batches[0]).items()}
        template = model.posterior(first)
        posteriors = [
            type(template)(
                r["offset"].to(device), template.recurrence, template.weight, template.reduction
            )
            for r in records
        ]
    if flow:
        cap = (
            flow_mi_sentences
            if flow_mi_sentences is not None
            else (FLOW_MI_EVAL_SENTENCES if iw_samples else FLOW_MI_VALIDATION_SENTENCES)
        )
        cap = cap or None  # 0 = every sentence
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, -1))
            flow_mi = _flow_mi(
                model, dataset, sorted(order)[:cap], len(order), batch_size, device, precision
            )
    bar.update(done)
    bar.close()
    model.train(was_training)
    n = len(order)
    index = sorted(order)
    n_tokens = sum(len(dataset.ids[i]) for i in index)
    n_words_each = [dataset.n_words[i] for i in index]
    n_words = sum(n_words_each)
    rec_t = torch.cat(rec).double()
    out: dict = dict.fromkeys(EVAL_KEYS)
    out.update(
        n_sentences=n,
        n_tokens=n_tokens,
        n_words=n_words,
        rec=float(rec_t.mean()),
        tokenizer=tokenizer_kind(dataset.tokenizer),
        precision=precision,
        seed=seed,
        bound_valid=bound_valid,
        n_skipped=len(skipped),
    )
    if nll:
        nll_t = torch.cat(nll).double()
        out["nll"] = float(nll_t.mean())
        out["nll_stderr"] = float(nll_t.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        # back to dataset order: nll_t[j] is the value of sentence order[j]
        out["nll_per_sentence"] = nll_t[torch.argsort(torch.tensor(order))].tolist()
        out["sentence_index"] = index
        out["n_words_per_sentence"] = n_words_each
        out["ppl_token"] = math.exp(float(nll_t.sum()) / n_tokens)
        out["ppl_word"] = math.exp(float(nll_t.sum()) / n_words)
    if not model.has_latent:
        out["elbo"] = -out["rec"]  # exact log-likelihood: the bound is tight
        out["ppl_elbo_token"] = math.exp(out["rec"] * n / n_tokens)
        return out
    if not (closed_form or layerwise) and kl_dims_sum is not None:
        raise ValueError("the KL had a closed form for some batches only; cannot mix estimates")
    out["kl"] = float(torch.cat(kl).double().mean())
    out["kl_samples"] = None if closed_form else (iw_samples or 1)
    out["elbo"] = -(out["rec"] + out["kl"])
    out["ppl_elbo_token"] = math.exp(-out["elbo"] * n / n_tokens)
    out["iw_samples"] = iw_samples or None
    out["kl_per_dim"] = (kl_dims_sum.double() / n).tolist() if kl_dims_sum is not None else None
    if layerwise:
        out["kl_per_layer"] = (kl_dims_sum.double() / n).sum(-1).tolist()
        out["mi"] = distribution_mi(posteriors, zs)
        out["mi_estimator"] = LAYERWISE_ESTIMATOR
    elif flow:  # never the z_0 value under the name mi
        out["mi"], mi_b, out["mi_estimator"] = flow_mi
    else:
        out["mi"] = aggregate_mi(torch.cat(mus), torch.cat(logvars), torch.cat(zs))
        out["mi_estimator"] = MI_ESTIMATOR
    out["mi_batch"] = sum(m * b for m, b in mi_b) / sum(b for _, b in mi_b) if mi_b else None
    mean_all = torch.cat(means)  # (N, *event)
    out["au"], var = active_units(mean_all, au_delta)
    out["au_delta"] = au_delta
    deltas = sorted({au_delta, AU_DELTA_PAPER})
    out["au_by_delta"] = {str(d): int((var > d).sum()) for d in deltas}
    if mean_all.dim() == 3:  # (N, L, D): per layer
        per_layer = var.view(mean_all.shape[1:])
        out["au_per_layer"] = {str(d): (per_layer > d).sum(-1).tolist() for d in deltas}
        # DELLA's own AU (Hu et al. 2022, A.3): the mean over layers of the per-layer count at 0.2
        out["au_layer_mean"] = sum(out["au_per_layer"][str(AU_DELTA_PAPER)]) / per_layer.size(0)
    out["z_gap"] = float(torch.cat(gaps).double().mean()) if gaps else None
    if cls_n:
        out["classifier_accuracy"], out["classifier_n"] = cls_correct / cls_n, cls_n
    if summary_fn is not None:
        out["encoder_dispersion"] = encoder_dispersion(dispersion)
    else:
        out["encoder_dispersion"] = {
            "total_variance": None,
            "relative_variance": None,
            "mean_cosine_distance": None,
            "reason": f"{type(model).__name__} has no single encoder "
            "summary before its posterior heads "
            "(encoder_summary)",
        }
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

    if not getattr(model, "conditional", False):
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
