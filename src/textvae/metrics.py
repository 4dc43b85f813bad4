"""The evaluation protocol (SPEC section 3), written once against the model interface.

Units: nats per sentence unless a name says otherwise; EOS is counted as a predicted token
and as one word per sentence; padding never counts.

- ``rec``: E_q[-log p(x|z)], Monte Carlo over the IW samples.
- ``kl``: KL(q(z|x) || p(z)), closed form (diagonal Gaussians).
- ``elbo``: -(rec + kl).
- ``nll``: -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), with its
  standard error over sentences; exact -log p(x) for a model without latent.
- ``ppl_token`` = exp(sum nll / predicted tokens incl. EOS); ``ppl_word`` = exp(sum nll /
  (whitespace words + one EOS per sentence)).
- ``mi``: I_q(x; z) with the aggregate posterior over the whole evaluated set (chunked, memory
  linear in the set size); ``mi_batch``: the minibatch estimator of He et al. 2019 over the
  evaluation batches.
- ``au``: dimensions with Cov_x(E_q[z|x]) > ``au_delta`` (Burda et al. 2016's active units).
"""

from __future__ import annotations

import contextlib
import math

import torch

from textvae.data import TextDataset
from textvae.objectives import iw_bound, iw_log_weights, kl_per_dim

EVAL_KEYS = (
    "rec", "kl", "elbo", "nll", "nll_stderr", "ppl_token", "ppl_word", "mi", "mi_batch", "au",
    "au_delta", "kl_per_dim", "iw_samples", "n_sentences", "n_tokens", "n_words",
)
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
        nats. q(z_i) includes the sentence's own posterior (as He et al. 2019).
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


def batch_mi(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> float:
    """The minibatch MI estimator of He et al. 2019 (``calc_mi``): aggregate posterior over
    the batch only, closed-form entropy term. Shapes (B, D); returns nats."""
    return aggregate_mi(mu, logvar, z, chunk=mu.size(0), analytic_entropy=True)


def active_units(mu: torch.Tensor, delta: float = 0.01) -> tuple[int, torch.Tensor]:
    """Active units (Burda et al. 2016): count of dims with Var_x(E_q[z|x]) > delta.

    Args:
        mu: (N, D) posterior means over the evaluated set.

    Returns:
        (count, per-dimension variance (D,) float64).
    """
    var = mu.double().var(dim=0, unbiased=True) if mu.size(0) > 1 else torch.zeros(mu.size(1))
    return int((var > delta).sum()), var


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model, dataset: TextDataset, iw_samples: int = 500, au_delta: float = 0.01,
    batch_size: int = 64, chunk_tokens: int = 16384, precision: str = "fp32", seed: int = 0,
) -> dict:
    """Run the protocol over ``dataset``; returns a dict with exactly :data:`EVAL_KEYS`.

    The IW samples of a batch go through the decoder as one (s * B, T) batch per chunk, with
    s = max(1, chunk_tokens // (B * T)); the encoder runs once per batch. ``iw_samples=0``
    skips the IW estimate (``nll`` and the perplexities are None; ``rec`` then uses one
    sample), which is what training's validation uses. Sampling runs under a forked RNG
    seeded by ``seed``, so evaluation is repeatable and leaves the caller's RNG untouched.
    With ``precision="bf16"`` the network runs under bfloat16 autocast; log-softmax,
    log-densities, log-sum-exp and all sums stay float32/float64.

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
    mus, logvars, zs = [], [], []
    mi_b, kl_dims_sum = [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for indices in dataset.batches(batch_size, shuffle=False):
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
            dims = kl_per_dim(q, p)  # (B, D)
            kl.append(dims.sum(-1))
            kl_dims_sum = dims.sum(0) if kl_dims_sum is None else kl_dims_sum + dims.sum(0)
            mu, logvar = q.mean.float(), (2 * torch.log(q.stddev)).float()
            z1 = q.sample()  # (B, D): the MI samples
            mus.append(mu.cpu())
            logvars.append(logvar.cpu())
            zs.append(z1.cpu())
            mi_b.append((batch_mi(mu, logvar, z1), b))
            n_samples = iw_samples or 1
            step = max(1, chunk_tokens // (b * t))
            log_w, ll_sum = [], torch.zeros(b, device=device)
            for start in range(0, n_samples, step):
                z = q.sample((min(step, n_samples - start),))  # (s, B, D)
                with _autocast(device, precision):
                    lw, ll = iw_log_weights(model, batch, q, p, z)
                log_w.append(lw.float())
                ll_sum += ll.float().sum(0)
            rec.append(-ll_sum / n_samples)
            if iw_samples:
                nll.append(-iw_bound(torch.cat(log_w, dim=0)))
    model.train(was_training)
    n = len(dataset)
    n_tokens, n_words = dataset.n_tokens, sum(dataset.n_words)
    rec_t = torch.cat(rec).double()
    out: dict = dict.fromkeys(EVAL_KEYS)
    out.update(n_sentences=n, n_tokens=n_tokens, n_words=n_words, rec=float(rec_t.mean()))
    if nll:
        nll_t = torch.cat(nll).double()
        out["nll"] = float(nll_t.mean())
        out["nll_stderr"] = float(nll_t.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        out["ppl_token"] = math.exp(float(nll_t.sum()) / n_tokens)
        out["ppl_word"] = math.exp(float(nll_t.sum()) / n_words)
    if not model.has_latent:
        out["elbo"] = -out["rec"]  # exact log-likelihood: the bound is tight
        return out
    mu_all, logvar_all, z_all = torch.cat(mus), torch.cat(logvars), torch.cat(zs)
    out["kl"] = float(torch.cat(kl).double().mean())
    out["elbo"] = -(out["rec"] + out["kl"])
    out["iw_samples"] = iw_samples or None
    out["kl_per_dim"] = (kl_dims_sum.double() / n).tolist()
    out["mi"] = aggregate_mi(mu_all, logvar_all, z_all)
    out["mi_batch"] = sum(m * b for m, b in mi_b) / n
    out["au"], _ = active_units(mu_all, au_delta)
    out["au_delta"] = au_delta
    return out
