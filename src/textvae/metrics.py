"""The evaluation protocol (SPEC section 3), written once against the model interface.

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
  list of floats), so two models evaluated on the same sentences can be compared pairwise
  (``textvae compare`` reports the paired difference and its standard error).
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
- ``bound_valid``: whether ``elbo`` and ``nll`` are bounds on log p(x): False when the posterior
  declares that its ``log_prob`` is not a log-density (``bound_valid`` False, e.g. DELLA with
  ``model.kl_reduction: mean``, the released code's layer average of the KL and log-densities);
  then ``kl``, ``elbo``, ``nll``, the perplexities and ``mi`` follow that average.

Layer-wise latents (DELLA, event shape (L, D); a posterior and prior with ``conditionals``):
``kl`` is the closed form per layer at each IW sample of z_<l, averaged over the samples
(:func:`textvae.objectives.conditional_kl`; ``kl_samples`` = their number); ``kl_per_dim`` is
(L, D) and ``kl_per_layer`` (L,); ``mi`` (and ``mi_batch``, the same estimator within each batch)
uses the joint log q(z|x) of every sample under every sentence's posterior
(:func:`distribution_mi`); ``au`` uses E_q[z|x] estimated by 256 common-random-number ancestral
draws, and ``au_per_layer`` gives the count per layer at each threshold of ``au_by_delta``. The IW
estimate draws all layers ancestrally once per importance sample and sums
log p(z_l|z_<l) - log q(z_l|z_<l,x) over layers, the (S x B) samples going through the decoder
in chunks like every model's.

Flow posteriors (see docs/flows.md): ``nll``, ``rec``, ``kl`` use z_K and its exact log q;
``mi`` (both estimators) is that of the base Gaussian z_0 (the aggregate posterior of z_K needs
q(z_K|x_n) at other sentences' samples, i.e. an inverse that planar and Sylvester flows lack);
``au`` uses E_q[z_K|x] estimated by :attr:`textvae.flows.FlowDistribution.mean` (256 common
random draws). ``mi_estimator`` says so.

Conditional models (``cvrae``): every field is conditioned on the context c of each response:
``nll`` bounds -log p(x|c), ``kl`` is KL(q(z|x,c) || p(z|c)); ``mi`` and ``au`` are taken over
the (context, response) pairs (the aggregate posterior mixes q(z|x_n, c_n) over all pairs).
- ``z_gap``: the z-usage gap, rec with z shuffled across the batch minus rec with each
  sentence's own z (:func:`z_usage_gap`); near 0 means the decoder ignores z.

Generation metrics (:func:`generation_metrics`, BLEU through ``sacrebleu``): ``rec_bleu``,
``self_bleu``, ``distinct_1``, ``distinct_2``; for conditional models
(:func:`response_metrics`): ``response_bleu``, ``distinct_1``, ``distinct_2`` of generated
responses. Latent probe: :func:`probe_accuracy`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from textvae.data import TextDataset
from textvae.flows import base_gaussian
from textvae.objectives import (
    conditional_kl,
    iw_bound,
    iw_log_weights,
    kl_per_dim,
    rsample_and_log_prob,
)

# The one table of evaluation fields: (name, unit, meaning). The evaluation JSON of ``textvae
# evaluate`` holds the "protocol" fields (:func:`evaluate`, in this order), the "record" fields
# and, with --generation, the "generation" (or, for conditional models, "response") fields;
# the CLI prints each with its unit and README's key list is rendered from it
# (:func:`fields_markdown`; tests/test_first_day.py checks README against it).
EVAL_FIELDS: tuple[tuple[str, str, str, str], ...] = (  # (group, name, unit, meaning)
    ("protocol", "rec", "nats/sentence",
     "E_q[-log p(x|z)], Monte Carlo over the K samples"),
    ("protocol", "kl", "nats/sentence",
     "KL(q(z|x) || p(z)): closed form, or Monte Carlo with `kl_samples` samples (flows; layer-wise for DELLA)"),
    ("protocol", "kl_samples", "MC samples/sentence (null: closed form)",
     "samples behind a Monte Carlo `kl`"),
    ("protocol", "elbo", "nats/sentence", "-(rec + kl)"),
    ("protocol", "nll", "nats/sentence (IW)",
     "IW estimate -log (1/K) Σ p(x,z_k)/q(z_k|x) (Burda et al. 2016); exact for the LM"),
    ("protocol", "nll_stderr", "nats/sentence", "standard error of `nll` over sentences"),
    ("protocol", "ppl_token", "per token incl. EOS", "exp(Σ nll / predicted tokens)"),
    ("protocol", "ppl_word", "per word incl. EOS",
     "exp(Σ nll / (whitespace words + one EOS per sentence)); comparable across tokenizers"),
    ("protocol", "ppl_elbo_token", "per token incl. EOS",
     "exp(-Σ elbo / tokens): a bound, Park & Lee's 'PPL', not the NLL"),
    ("protocol", "mi", "nats (aggregate posterior, whole set)",
     "I_q(x;z) with the aggregate posterior over the **whole** evaluated set (chunked, memory "
     "linear in the set; at most log N)"),
    ("protocol", "mi_batch", "nats (He et al. 2019 minibatch)",
     "the minibatch estimator of He et al. 2019, over the evaluation batches"),
    ("protocol", "au", "dimensions", "dimensions with Cov_x(E_q[z|x]) > `au_delta`"),
    ("protocol", "au_delta", "threshold", "the active-unit threshold (default 0.01)"),
    ("protocol", "kl_per_dim", "nats/sentence", "mean KL per latent dimension (null for a flow)"),
    ("protocol", "z_gap", "nats/sentence (rec with shuffled z - rec with own z)",
     "z-usage gap: rec with z shuffled across the batch minus rec with each sentence's own z "
     "(one z ~ q per sentence, a derangement, so no sentence keeps its z); 0 = the decoder ignores z"),
    ("protocol", "iw_samples", "K", "importance samples K (null for the exact LM)"),
    ("protocol", "n_sentences", "sentences", "evaluated sentences"),
    ("protocol", "n_tokens", "incl. EOS", "predicted tokens"),
    ("protocol", "n_words", "incl. EOS", "whitespace words plus one EOS per sentence"),
    ("protocol", "tokenizer", "", "tokenizer kind and size"),
    ("protocol", "mi_estimator", "", "how `mi` and `mi_batch` were estimated"),
    ("protocol", "precision", "", "fp32, or bf16 autocast for the network"),
    ("protocol", "seed", "", "sampling seed"),
    ("protocol", "au_by_delta", "active dimensions at each threshold (0.2: DELLA's)",
     "`au` at `au_delta` and at 0.2"),
    ("protocol", "kl_per_layer", "nats/sentence per latent layer", "layer-wise latents only"),
    ("protocol", "au_per_layer", "active dimensions per latent layer, at each threshold",
     "layer-wise latents only"),
    ("protocol", "bound_valid", "false: elbo/nll are not bounds (kl_reduction: mean)",
     "whether `elbo` and `nll` bound log p(x)"),
    ("protocol", "nll_per_sentence", "nats/sentence, dataset order",
     "the N values behind `nll` (JSON only), for paired comparisons"),
    ("record", "data", "", "the evaluated file"),
    ("record", "split", "", "the split name (null for `--data FILE`)"),
    ("record", "max_sentences", "", "the `--max-sentences` cap (null: the whole split or file)"),
    ("record", "seconds", "s", "wall time of the evaluation"),
    ("generation", "rec_bleu", "BLEU 0-100 (greedy reconstruction vs input)",
     "sacrebleu corpus BLEU of greedy decodings of each sentence's posterior mean against the "
     "sentence, over the first `--gen-sentences` evaluated sentences"),
    ("generation", "self_bleu", "BLEU 0-100 (prior samples vs each other)",
     "mean sentence BLEU of each of `--gen-samples` prior samples against all the others "
     "(Zhu et al. 2018); high = repetitive"),
    ("generation", "distinct_1", "distinct unigrams / unigrams (prior samples; responses for cvrae)",
     "distinct unigrams over all unigrams (Li et al. 2016)"),
    ("generation", "distinct_2", "distinct bigrams / bigrams (prior samples; responses for cvrae)",
     "distinct bigrams over all bigrams"),
    ("generation", "generation", "", "decoding settings and sacrebleu signatures"),
    ("response", "response_bleu", "BLEU 0-100 (responses from z ~ p(z|c) vs the reference)",
     "conditional models: corpus BLEU of `--gen-responses` responses per context"),
)
UNITS = {name: unit for _, name, unit, _ in EVAL_FIELDS}
EVAL_KEYS = tuple(name for group, name, _, _ in EVAL_FIELDS if group == "protocol")


def fields_markdown(groups: tuple[str, ...] = ("protocol", "record")) -> str:
    """README's key table (``| key | unit | meaning |``) of the :data:`EVAL_FIELDS` in
    ``groups``, one row per field."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {cell(unit)} | {cell(meaning)} |"
              for group, name, unit, meaning in EVAL_FIELDS if group in groups]
    return "\n".join(lines)


AU_DELTA_PAPER = 0.2  # DELLA's (Hu et al. 2022) active-unit threshold, reported beside au_delta
MI_ESTIMATOR = (
    "aggregate posterior q(z) over all evaluated sentences, one z ~ q(z|x) per sentence used "
    "in both terms; mi_batch: He et al. 2019 calc_mi (q(z) over each evaluation batch, "
    "closed-form entropy)"
)
FLOW_ESTIMATOR_NOTE = (
    "; flow posterior: mi and mi_batch of the base Gaussian z_0, au from E_q[z_K|x] by 256 "
    "common random draws"
)
LAYERWISE_ESTIMATOR = (
    "aggregate posterior q(z) over all evaluated sentences from the joint log q(z|x) of the "
    "layer-wise posterior, one ancestral z ~ q(z|x) per sentence used in both terms; mi_batch: "
    "the same estimator within each evaluation batch; au from E_q[z|x] by 256 common random "
    "ancestral draws"
)
GENERATION_KEYS = ("rec_bleu", "self_bleu", "distinct_1", "distinct_2", "generation")
RESPONSE_KEYS = ("response_bleu", "distinct_1", "distinct_2", "generation")
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density_matrix(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
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
    mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, chunk: int = 1024,
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
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model, dataset: TextDataset, iw_samples: int = 500, au_delta: float = 0.01,
    batch_size: int = 64, chunk_tokens: int = 16384, precision: str = "fp32", seed: int = 0,
    progress: bool = False,
) -> dict:
    """Run the protocol over ``dataset``; returns a dict with exactly :data:`EVAL_KEYS`.

    The IW samples of a batch go through the decoder as one (s * B, T) batch per chunk, with
    s = max(1, chunk_tokens // (B * T)); the encoder runs once per batch. ``iw_samples=0``
    skips the IW estimate (``nll`` and the perplexities are None; ``rec`` and a Monte Carlo
    ``kl`` then use one sample), which is what training's validation uses. Sampling runs under a forked RNG
    seeded by ``seed``, so evaluation is repeatable and leaves the caller's RNG untouched.
    With ``precision="bf16"`` the network runs under bfloat16 autocast; log-softmax,
    log-densities, log-sum-exp and all sums stay float32/float64. ``progress`` shows a tqdm
    bar on stderr (sentences done, elapsed, remaining).

    Raises:
        ValueError: ``iw_samples`` < 0 or an empty dataset.
    """
    if iw_samples < 0:
        raise ValueError(f"iw_samples must be >= 0, got {iw_samples}")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate an empty dataset")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, rec, kl = [], [], []
    mus, logvars, zs, means = [], [], [], []
    closed_form, flow, layerwise, bound_valid = True, False, False, True
    posteriors = []  # layer-wise posteriors of the whole set, for the aggregate MI
    mi_b, kl_dims_sum, gaps = [], None, []
    # the z-usage gap's permutations have their own generator: the IW samples stay as they were
    perm_gen = torch.Generator(device=device).manual_seed(seed)
    bar, done = _progress_bar(len(dataset), "evaluate", progress), 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for indices in dataset.batches(batch_size, shuffle=False):
            bar.update(done)  # the previous batch's sentences
            done = len(indices)
            batch = {k: v.to(device) for k, v in dataset.collate(indices).items()}
            b, t = batch["input_ids"].shape
            if not model.has_latent:
                with _autocast(device, precision):
                    ll = model.log_likelihood(batch, None)[0].float()
                nll.append(-ll)
                rec.append(-ll)
                continue
            with _autocast(device, precision):
                q = model.posterior(batch)
            p = model.prior(batch)
            dims = kl_per_dim(q, p)  # (B, D), or None without a closed form
            if dims is not None:
                kl.append(dims.sum(-1))
                kl_dims_sum = dims.sum(0) if kl_dims_sum is None else kl_dims_sum + dims.sum(0)
            closed_form = closed_form and dims is not None
            layerwise = dims is None and hasattr(q, "conditionals") and hasattr(p, "conditionals")
            scale = getattr(q, "log_prob_scale", 1.0)
            bound_valid = bound_valid and getattr(q, "bound_valid", True)
            z1 = q.sample()  # (B, *event): the z-usage gap's codes (and the MI samples without a flow)
            if layerwise:
                posteriors.append(q)
                zs.append(z1)
                means.append(q.mean.float().cpu())
                mi_b.append((distribution_mi([q], [z1]), b))
            else:
                base = base_gaussian(q)  # q itself, or a flow's base q0
                flow = base is not q
                mu, logvar = base.mean.float(), (2 * torch.log(base.stddev)).float()
                z_mi = base.sample() if flow else z1
                mus.append(mu.cpu())
                logvars.append(logvar.cpu())
                zs.append(z_mi.cpu())
                means.append(q.mean.float().cpu() if flow else mu.cpu())
                mi_b.append((batch_mi(mu, logvar, z_mi), b))
            with _autocast(device, precision):
                gap = z_usage_gap(model, batch, z1, perm_gen)
            if gap is not None:
                gaps.append(gap)
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
                kl_sum += (ll.float() - lw.float()).sum(0)  # log q - log p of each sample
                if layerwise:
                    chunk_kl = conditional_kl(q, p, z).float().sum(0)
                    layer_kl = chunk_kl if layer_kl is None else layer_kl + chunk_kl
            rec.append(-ll_sum / n_samples)
            if layerwise:
                layer_kl = layer_kl / n_samples
                kl.append(layer_kl.flatten(1).sum(-1) * scale)
                kl_dims_sum = layer_kl.sum(0) if kl_dims_sum is None else kl_dims_sum + layer_kl.sum(0)
            elif dims is None:
                kl.append(kl_sum / n_samples)
            if iw_samples:
                nll.append(-iw_bound(torch.cat(log_w, dim=0)))
    bar.update(done)
    bar.close()
    model.train(was_training)
    n = len(dataset)
    n_tokens, n_words = dataset.n_tokens, sum(dataset.n_words)
    rec_t = torch.cat(rec).double()
    out: dict = dict.fromkeys(EVAL_KEYS)
    out.update(n_sentences=n, n_tokens=n_tokens, n_words=n_words, rec=float(rec_t.mean()),
               tokenizer=tokenizer_kind(dataset.tokenizer), precision=precision, seed=seed,
               bound_valid=bound_valid)
    if nll:
        nll_t = torch.cat(nll).double()
        out["nll"] = float(nll_t.mean())
        out["nll_stderr"] = float(nll_t.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        out["nll_per_sentence"] = nll_t.tolist()
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
    else:
        out["mi"] = aggregate_mi(torch.cat(mus), torch.cat(logvars), torch.cat(zs))
        out["mi_estimator"] = MI_ESTIMATOR + (FLOW_ESTIMATOR_NOTE if flow else "")
    out["mi_batch"] = sum(m * b for m, b in mi_b) / n
    mean_all = torch.cat(means)  # (N, *event)
    out["au"], var = active_units(mean_all, au_delta)
    out["au_delta"] = au_delta
    deltas = sorted({au_delta, AU_DELTA_PAPER})
    out["au_by_delta"] = {str(d): int((var > d).sum()) for d in deltas}
    if mean_all.dim() == 3:  # (N, L, D): per layer
        per_layer = var.view(mean_all.shape[1:])
        out["au_per_layer"] = {str(d): (per_layer > d).sum(-1).tolist() for d in deltas}
    out["z_gap"] = float(torch.cat(gaps).double().mean()) if gaps else None
    return out


# --- generation metrics (SPEC section 3) -------------------------------------------------------

def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the whole list.

    Tokens are whitespace-separated words; n-grams do not cross sentence boundaries. Returns
    0.0 when the list has no n-gram.
    """
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
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
        raise ValueError(f"BLEU needs equally many hypotheses and references, got "
                         f"{len(hypotheses)} and {len(references)}")
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
    model, texts: list[str], n_samples: int = 500, strategy: str = "greedy",
    max_length: int = 50, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    seed: int = 0, batch_size: int = 256, progress: bool = False,
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

    options = dict(strategy=strategy, max_length=max_length, temperature=temperature,
                   top_k=top_k, top_p=top_p)
    bar = _progress_bar(n_samples + (len(texts) if model.has_latent else 0), "generation", progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples: list[str] = []
        for start in range(0, n_samples, batch_size):
            samples += sample_prior(model, min(batch_size, n_samples - start), **options)
            bar.update(min(batch_size, n_samples - start))
    out = dict.fromkeys(GENERATION_KEYS)
    settings = {"prior_samples": n_samples, **options, "seed": seed,
                "reconstruction": None, "rec_sentences": 0}
    if model.has_latent:
        recs: list[str] = []
        for start in range(0, len(texts), batch_size):
            recs += reconstruct(model, texts[start : start + batch_size], strategy="greedy",
                                max_length=max_length)
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
    model, contexts: list[str], references: list[str], n_responses: int = 5,
    strategy: str = "greedy", max_length: int = 50, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = False,
) -> dict:
    """Response generation of a conditional model (SPEC 3, "BLEU/distinct for conditional
    tasks"): for each context, ``n_responses`` responses decoded from z ~ p(z|c) with
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
        raise ValueError(f"response metrics need equally many contexts and references, got "
                         f"{len(contexts)} and {len(references)}")
    options = dict(strategy=strategy, max_length=max_length, temperature=temperature,
                   top_k=top_k, top_p=top_p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        groups: list[list[str]] = []
        bar = _progress_bar(len(contexts), "responses", progress)
        for start in range(0, len(contexts), batch_size):
            groups += respond(model, contexts[start : start + batch_size], n_responses, **options)
            bar.update(len(contexts[start : start + batch_size]))
        bar.close()
    hypotheses = [r for group in groups for r in group]
    refs = [" ".join(ref.split()) for ref, group in zip(references, groups, strict=True) for _ in group]
    out = dict.fromkeys(RESPONSE_KEYS)
    out["response_bleu"], signature = corpus_bleu(hypotheses, refs)
    out["distinct_1"], out["distinct_2"] = distinct_n(hypotheses, 1), distinct_n(hypotheses, 2)
    out["generation"] = {"contexts": len(contexts), "responses_per_context": n_responses,
                         "latent": "z ~ p(z|c)" if model.has_latent else "none", **options, "seed": seed,
                         "bleu_signature": signature}
    return out


# --- latent probe (SPEC section 3) --------------------------------------------------------------

def probe_accuracy(
    fit_x, fit_y, score_x, score_y, sizes: list[int | None], repeats: int = 5, seed: int = 0,
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
        results.append({"n": n, "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                        "majority": float(np.mean(majs)), "repeats": runs})
    return results
