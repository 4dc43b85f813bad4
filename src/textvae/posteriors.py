"""Posteriors and priors as ``torch.distributions`` objects.

q(z|x) = N(mu, diag sigma^2) with event shape (D,); the prior p(z) = N(0, I).

Two remedies for posterior collapse live in the posterior head, because they constrain the
variational family rather than the objective: BN-VAE (batch-normalised means, Zhu et al.
2020) and a delta-VAE style minimum rate (bounded variances, Razavi et al. 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal

LOGVAR_MIN, LOGVAR_MAX = -20.0, 10.0
# the minimum rate is solved for delta + this margin, so float32 rounding of the KL cannot take a
# dimension below delta (measured rounding error of the closed-form KL is ~1e-7 nats)
MIN_RATE_MARGIN = 1e-5


def min_rate_max_logvar(delta: float, margin: float = MIN_RATE_MARGIN) -> float:
    """Largest log sigma^2 < 0 with KL(N(mu, sigma^2) || N(0, 1)) >= delta for every mu.

    Per dimension KL = (mu^2 + sigma^2 - 1 - log sigma^2) / 2 >= (s - 1 - log s) / 2 with
    s = sigma^2, and f(s) = s - 1 - log s is convex with its minimum 0 at s = 1, decreasing on
    (0, 1). So every s <= s_l, with s_l < 1 the root of f(s_l) = 2 (delta + margin), gives
    KL >= delta + margin whatever mu is (Razavi et al. 2019, section 2.1: a committed rate by
    a posterior family kept away from the standard Gaussian prior; the branch sigma < 1, a
    posterior narrower than the prior, is our choice). The root is found by bisection on
    u = log s in (-(1 + 2 (delta + margin)), 0), where g(u) = e^u - 1 - u - 2 (delta + margin)
    changes sign; float64.

    Args:
        delta: committed rate in nats per dimension, > 0.
        margin: nats added to delta before solving.

    Returns:
        log s_l (nats of log-variance), a float < 0.

    Raises:
        ValueError: delta <= 0.
    """
    if delta <= 0:
        raise ValueError(f"min_rate delta must be > 0 nats per dimension, got {delta}")
    target = 2.0 * (delta + margin)
    lo, hi = -(1.0 + target), 0.0  # g(lo) > 0 > g(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.exp(mid) - 1.0 - mid - target > 0:
            lo = mid
        else:
            hi = mid
    return lo  # g(lo) >= 0: the conservative end of the bracket


class GaussianHead(nn.Module):
    """Linear heads from a summary vector to mu and log sigma^2.

    ``forward(h (B, H_in)) -> Independent(Normal(mu, sigma), 1)`` with batch shape (B,) and
    event shape (D,), float32. log sigma^2 is computed in float32 and clamped to [-20, 10] so
    that sigma stays finite under bf16 autocast.

    BN-VAE (``bn_gamma > 0``; Zhu et al. 2020, "A Batch Normalized Inference Network Keeps the
    KL Vanishing Away"): the means are batch-normalised with a fixed scale gamma and a learnable
    shift beta (D,):  mu_hat_bd = gamma (mu_bd - m_d) / sqrt(v_d + eps) + beta_d, with m_d and
    v_d the batch mean and biased batch variance of dimension d in training (eps = 1e-5), the
    running statistics at evaluation (momentum 0.1, as ``nn.BatchNorm1d``). Over a training
    batch, mean_b mu_hat_bd = beta_d and mean_b (mu_hat_bd - beta_d)^2 = gamma^2 v_d/(v_d+eps),
    and KL_bd = (mu_hat_bd^2 + sigma_bd^2 - 1 - log sigma_bd^2) / 2 with the last three terms
    >= 0, so the batch-mean KL per sentence (nats) satisfies exactly

        mean_b KL_b >= 1/2 sum_d (beta_d^2 + gamma^2 v_d / (v_d + eps)),

    the paper's E[KL] >= 1/2 sum_d (gamma^2 + beta_d^2) >= D gamma^2 / 2 once v_d >> eps (the
    paper writes it without eps; v_d near eps, i.e. near-identical pre-normalisation means
    across the batch, weakens it). At evaluation the map is a fixed affine function of mu (a
    sentence's posterior never depends on its batch), and the bound holds only as far as the
    running statistics match the evaluated data. A training batch of one sentence has no batch
    variance: it is normalised with the running statistics.

    Minimum rate (``min_rate_delta > 0``; delta-VAE, Razavi et al. 2019 "Preventing Posterior
    Collapse with delta-VAEs"): log sigma^2 = u_max - softplus(u_max - a), a the linear head's
    output, u_max = :func:`min_rate_max_logvar` (delta), so sigma^2 < s_l and each dimension's
    KL to N(0, 1) is >= delta nats for every input, whatever mu is. Assumes the prior is
    N(0, I).

    Raises:
        ValueError: ``bn_gamma`` < 0, ``min_rate_delta`` < 0, or a delta so large that the
            bound would need log sigma^2 below the clamp at -20 (delta > 9).
    """

    def __init__(
        self, in_dim: int, latent_dim: int, bias: bool = True, bn_gamma: float = 0.0,
        min_rate_delta: float = 0.0,
    ):
        super().__init__()
        if bn_gamma < 0 or min_rate_delta < 0:
            raise ValueError(f"bn_gamma ({bn_gamma}) and min_rate_delta ({min_rate_delta}) must be >= 0")
        self.mu = nn.Linear(in_dim, latent_dim, bias=bias)
        self.logvar = nn.Linear(in_dim, latent_dim, bias=bias)
        self.bn_gamma = float(bn_gamma)
        self.bn_eps, self.bn_momentum = 1e-5, 0.1
        if self.bn_gamma > 0:
            self.bn_shift = nn.Parameter(torch.zeros(latent_dim))  # beta, learnable
            self.register_buffer("bn_running_mean", torch.zeros(latent_dim))
            self.register_buffer("bn_running_var", torch.ones(latent_dim))
        self.max_logvar = None
        if min_rate_delta > 0:
            self.max_logvar = min_rate_max_logvar(min_rate_delta)
            if self.max_logvar <= LOGVAR_MIN:
                raise ValueError(f"min_rate_delta={min_rate_delta} needs log sigma^2 <= "
                                 f"{self.max_logvar:.2f}, below the clamp at {LOGVAR_MIN}; use delta <= 9")

    def normalise_means(self, mu: torch.Tensor) -> torch.Tensor:
        """BN-VAE: (B, D) float32 means -> gamma * batchnorm(mu) + beta, (B, D) float32."""
        use_batch = self.training and mu.size(0) > 1
        with torch.autocast(mu.device.type, enabled=False):
            normed = F.batch_norm(mu.float(), self.bn_running_mean, self.bn_running_var,
                                  training=use_batch, momentum=self.bn_momentum, eps=self.bn_eps)
        return self.bn_gamma * normed + self.bn_shift

    def forward(self, h: torch.Tensor) -> Independent:
        mu = self.mu(h).float()
        if self.bn_gamma > 0:
            mu = self.normalise_means(mu)
        logvar = self.logvar(h).float()
        if self.max_logvar is not None:
            logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def standard_normal(latent_dim: int, batch_shape: tuple[int, ...] = (), device=None) -> Independent:
    """p(z) = N(0, I): batch shape ``batch_shape``, event shape (D,), float32."""
    loc = torch.zeros(*batch_shape, latent_dim, device=device)
    return Independent(Normal(loc, torch.ones_like(loc)), 1)
