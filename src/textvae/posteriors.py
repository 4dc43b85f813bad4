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
from torch.distributions import Distribution, Independent, Normal

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
    v_d the batch mean and biased batch variance of dimension d in training (eps = ``bn_eps``,
    default 1e-5 as ``nn.BatchNorm1d``), the
    running statistics at evaluation (momentum 0.1, as ``nn.BatchNorm1d``). Over a training
    batch, mean_b mu_hat_bd = beta_d and mean_b (mu_hat_bd - beta_d)^2 = gamma^2 v_d/(v_d+eps),
    and KL_bd = (mu_hat_bd^2 + sigma_bd^2 - 1 - log sigma_bd^2) / 2 with the last three terms
    >= 0, so the batch-mean KL per sentence (nats) satisfies exactly

        mean_b KL_b >= 1/2 sum_d (beta_d^2 + gamma^2 v_d / (v_d + eps)),

    the paper's E[KL] >= 1/2 sum_d (gamma^2 + beta_d^2) >= D gamma^2 / 2 once v_d >> eps (the
    paper writes it without eps; v_d near eps, i.e. near-identical pre-normalisation means
    across the batch, weakens it). **Trap, measured on PTB**: the encoder can escape the bound
    this way. In the remedy matrix (bench/RESULTS.md, gamma 0.6, 2,000 steps) the trained
    encoder's pre-normalisation means varied by v_d ~ 1e-8 across sentences, three orders below
    eps = 1e-5 (the ``nn.BatchNorm1d`` default, which Zhu et al.'s code also uses), so
    gamma^2 v_d/(v_d+eps) ~ 4e-4 instead of 0.36 and the evaluated AU was 0
    (``test_bn_vae_floor_vanishes_when_the_encoder_shrinks_below_eps``). A smaller ``bn_eps``
    (config ``model.posterior_bn_eps``, e.g. 1e-12) moves the escape far below: at v_d ~ 1e-8 the
    factor v_d/(v_d+eps) is then ~1 and the floor holds (``test_bn_vae_small_eps_keeps_the_floor``);
    to escape, the pre-normalisation means would have to agree to ~1e-6 across a batch, near
    float32's resolution, where rounding noise is itself normalised to variance gamma^2. Not
    measured in training yet, so the default stays 1e-5. At evaluation the map is a fixed affine function of mu (a
    sentence's posterior never depends on its batch), and the bound holds only as far as the
    running statistics match the evaluated data. A training batch of one sentence has no batch
    variance: it is normalised with the running statistics.

    Minimum rate (``min_rate_delta > 0``; delta-VAE, Razavi et al. 2019 "Preventing Posterior
    Collapse with delta-VAEs"): log sigma^2 = u_max - softplus(u_max - a), a the linear head's
    output, u_max = :func:`min_rate_max_logvar` (delta), so sigma^2 < s_l and each dimension's
    KL to N(0, 1) is >= delta nats for every input, whatever mu is. Assumes the prior is
    N(0, I).

    Raises:
        ValueError: ``bn_gamma`` < 0, ``min_rate_delta`` < 0, ``bn_eps`` <= 0, or a delta so
            large that the bound would need log sigma^2 below the clamp at -20 (delta > 9).
    """

    def __init__(
        self,
        in_dim: int,
        latent_dim: int,
        bias: bool = True,
        bn_gamma: float = 0.0,
        min_rate_delta: float = 0.0,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        if bn_gamma < 0 or min_rate_delta < 0:
            raise ValueError(
                f"bn_gamma ({bn_gamma}) and min_rate_delta ({min_rate_delta}) must be >= 0"
            )
        if bn_eps <= 0:
            raise ValueError(f"bn_eps ({bn_eps}) must be > 0")
        self.mu = nn.Linear(in_dim, latent_dim, bias=bias)
        self.logvar = nn.Linear(in_dim, latent_dim, bias=bias)
        self.bn_gamma = float(bn_gamma)
        self.bn_eps, self.bn_momentum = float(bn_eps), 0.1
        if self.bn_gamma > 0:
            self.bn_shift = nn.Parameter(torch.zeros(latent_dim))  # beta, learnable
            self.register_buffer("bn_running_mean", torch.zeros(latent_dim))
            self.register_buffer("bn_running_var", torch.ones(latent_dim))
        self.max_logvar = None
        if min_rate_delta > 0:
            self.max_logvar = min_rate_max_logvar(min_rate_delta)
            if self.max_logvar <= LOGVAR_MIN:
                raise ValueError(
                    f"min_rate_delta={min_rate_delta} needs log sigma^2 <= "
                    f"{self.max_logvar:.2f}, below the clamp at {LOGVAR_MIN}; use delta <= 9"
                )

    def normalise_means(self, mu: torch.Tensor) -> torch.Tensor:
        """BN-VAE: (B, D) float32 means -> gamma * batchnorm(mu) + beta, (B, D) float32."""
        use_batch = self.training and mu.size(0) > 1
        with torch.autocast(mu.device.type, enabled=False):
            normed = F.batch_norm(
                mu.float(),
                self.bn_running_mean,
                self.bn_running_var,
                training=use_batch,
                momentum=self.bn_momentum,
                eps=self.bn_eps,
            )
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


# --- layer-wise latents (DELLA, Hu et al., NAACL 2022, arXiv 2207.06130) ----------------------------------------

# E_q[z|x] of a layer-wise posterior is estimated from this many ancestral draws with common random
# numbers (the same draws for every sentence, so the estimate is a fixed function of x)
LAYERWISE_MEAN_SAMPLES, LAYERWISE_MEAN_SEED = 256, 0


class LatentRecurrence(nn.Module):
    """The deterministic summary of the latents below a layer (DELLA, Hu et al., NAACL 2022):
    zbar_1 = 0 and zbar_l = tanh(W_hh^l zbar_{l-1} + W_ih^l z_{l-1}) for l = 2..L (zbar_0 = z_0 = 0
    makes zbar_1 = tanh(0) = 0), bias-free as the paper writes it (the released code's cells have
    biases, so its zbar_1 = tanh(b) is a learned constant). Prior and posterior share it.

    Args:
        n_layers: L, the number of latents; the module holds L - 1 cells (layer 1 needs none;
            for L = 1 no parameter at all).
        latent_dim: D, the size of each z_l and of each zbar_l.
    """

    def __init__(self, n_layers: int, latent_dim: int):
        super().__init__()
        self.n_layers, self.latent_dim = n_layers, latent_dim
        cells = n_layers - 1
        if cells < 1:  # one latent: no cell (empty tensors would alias in a safetensors file)
            self.register_parameter("weight_hh", None)
            self.register_parameter("weight_ih", None)
            return
        bound = latent_dim**-0.5  # nn.Linear's default range for fan-in D
        self.weight_hh = nn.Parameter(
            torch.empty(cells, latent_dim, latent_dim).uniform_(-bound, bound)
        )
        self.weight_ih = nn.Parameter(
            torch.empty(cells, latent_dim, latent_dim).uniform_(-bound, bound)
        )

    def step(self, layer: int, zbar_prev: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
        """zbar of layer ``layer`` (0-based, >= 1) from zbar and z of the layer below: (..., D)."""
        w_hh, w_ih = self.weight_hh[layer - 1], self.weight_ih[layer - 1]
        return torch.tanh(zbar_prev @ w_hh.T + z_prev @ w_ih.T)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """zbar of every layer given all the latents: z (..., L, D) -> zbar (..., L, D) float32
        (row 0 zeros; row l depends on z_<l only)."""
        zbar = [torch.zeros_like(z[..., 0, :])]
        for layer in range(1, self.n_layers):
            zbar.append(self.step(layer, zbar[-1], z[..., layer - 1, :]))
        return torch.stack(zbar, dim=-2)


class LayerwiseGaussian(Distribution):
    """A joint distribution over layer-wise latents z = (z_1, ..., z_L), event shape (L, D):

        p(z) = prod_l N(z_l; mu_l, diag sigma_l^2),  [mu_l ; log sigma_l^2] = A_l zbar_l + o_l,

    with zbar_l = :class:`LatentRecurrence` (z_<l), A_l (2D, D) the map of the summary and o_l
    (2D) an offset that carries everything else the layer conditions on (DELLA's posterior
    q(z_l | z_<l, x): o_l = W_x x_l + b from the pooled encoder layer l; its prior
    p(z_l | z_<l): o_l = b, or W_c c_l + b for conditional DELLA; Hu et al., NAACL 2022).
    Because zbar is a function of the sample itself, ``log_prob(z)`` of the prior needs nothing
    from the posterior: it recomputes zbar from the posterior's sample, so p and q are two
    distributions over the same (L, D) space and the shared protocol (ELBO, IW bound, Monte
    Carlo KL) applies unchanged.

    - ``rsample(shape)``: ancestral, layer by layer (z_1, then zbar_2, z_2, ...), reparameterised.
    - ``log_prob(z)``: sum over layers (and dimensions) of log N(z_l; mu_l(z_<l), sigma_l^2(z_<l))
      (nats), times ``log_prob_scale``.
    - ``conditionals(z)``: the L per-layer Gaussians given z_<l, a ``Normal`` of batch shape
      (..., L, D): the hook the layer-wise KL of :func:`textvae.objectives.kl_estimate` uses.
    - ``mean``: E[z] estimated from 256 ancestral draws with common random numbers, averaging
      mu_l(z_<l) over the draws (layer 1 exact).

    The offset broadcasts against leading dimensions of a value: ``log_prob`` of z of shape
    (M, 1, L, D) under batch shape (B,) gives (M, B), every sample under every sentence's
    distribution (what the aggregate-posterior MI needs).

    ``reduction="mean"`` reproduces the released DELLA code, which averages log-densities and KL
    terms over layers instead of summing them: ``log_prob`` is then (1/L) sum_l, not a
    log-density, ``log_prob_scale`` = 1/L and ``bound_valid`` False (objectives scale the KL the
    same way and evaluation marks its ELBO and NLL as not bounds).

    Args:
        offset: (*batch, L, 2D) o_l, float32: [mu part ; log sigma^2 part].
        recurrence: the shared :class:`LatentRecurrence`.
        weight: (L, 2D, D) A_l.
        reduction: ``sum`` (a density) or ``mean`` (the released code's layer average).

    Raises:
        ValueError: shapes that do not fit, or an unknown reduction.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        offset: torch.Tensor,
        recurrence: LatentRecurrence,
        weight: torch.Tensor,
        reduction: str = "sum",
    ):
        n_layers, two_d = offset.shape[-2:]
        if two_d % 2 or weight.shape != (n_layers, two_d, two_d // 2):
            raise ValueError(
                f"offset (..., L, 2D) {tuple(offset.shape)} and weight (L, 2D, D) "
                f"{tuple(weight.shape)} do not fit"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"unknown layer reduction '{reduction}' (sum or mean)")
        self.offset, self.recurrence, self.weight = offset.float(), recurrence, weight
        self.reduction = reduction
        self.n_layers, self.latent_dim = n_layers, two_d // 2
        super().__init__(
            offset.shape[:-2], torch.Size((n_layers, self.latent_dim)), validate_args=False
        )

    def with_offset(self, offset: torch.Tensor) -> LayerwiseGaussian:
        """The distribution with the same layer maps, recurrence and reduction and another offset
        (*batch', L, 2D): how the evaluation rebuilds a batch's posterior from its offset alone
        (a tensor, which can be gathered across processes; the distribution holds modules)."""
        return type(self)(offset, self.recurrence, self.weight, self.reduction)

    @property
    def log_prob_scale(self) -> float:
        """1 for the density (``sum``); 1/L for the released code's layer mean."""
        return 1.0 if self.reduction == "sum" else 1.0 / self.n_layers

    @property
    def bound_valid(self) -> bool:
        """Whether ``log_prob`` is a log-density, so that ELBO and IW estimates are bounds."""
        return self.reduction == "sum"

    def _layer(self, layer: int, zbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of layer ``layer`` given its summary zbar (..., D): broadcast with the
        batch shape, float32."""
        out = self.offset[..., layer, :] + zbar.float() @ self.weight[layer].T.float()
        mu, logvar = out.chunk(2, dim=-1)
        return mu, torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def conditionals(self, z: torch.Tensor) -> Normal:
        """The Gaussians N(mu_l(z_<l), sigma_l^2(z_<l)) of every layer given the layers below it in
        z (..., L, D): a ``Normal`` of batch shape broadcast(z.shape, batch + (L, D))."""
        zbar = self.recurrence(z.float())  # (..., L, D)
        out = self.offset + torch.einsum("...lk,lmk->...lm", zbar, self.weight.float())
        mu, logvar = out.chunk(2, dim=-1)
        return Normal(mu, torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        per_layer = self.conditionals(value).log_prob(value.float()).sum(-1)  # (..., L)
        return per_layer.sum(-1) * self.log_prob_scale

    def rsample_and_log_prob(
        self, sample_shape: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral reparameterised samples (*sample_shape, *batch, L, D) with their log_prob
        (*sample_shape, *batch), from the same per-layer parameters."""
        shape = torch.Size(sample_shape) + self.batch_shape
        zbar = self.offset.new_zeros(shape + (self.latent_dim,))
        zs, log_p = [], 0.0
        for layer in range(self.n_layers):
            if layer > 0:
                zbar = self.recurrence.step(layer, zbar, zs[-1])
            mu, sigma = self._layer(layer, zbar)
            normal = Normal(
                mu.expand(shape + (self.latent_dim,)), sigma.expand(shape + (self.latent_dim,))
            )
            zs.append(normal.rsample())
            log_p = log_p + normal.log_prob(zs[-1]).sum(-1)
        return torch.stack(zs, dim=-2), log_p * self.log_prob_scale

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return self.rsample_and_log_prob(tuple(sample_shape))[0]

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def mean(self) -> torch.Tensor:
        """E[z] (*batch, L, D), estimated: the average of mu_l(z_<l) over 256 ancestral draws
        that use the same random numbers for every sentence (so two runs on the same sentence
        agree); layer 1 is exact. The released code's AU instead reads mu_l at one fresh sample
        of z_<l per pass, so sampling noise counts as variation across sentences."""
        gen = torch.Generator(device=self.offset.device).manual_seed(LAYERWISE_MEAN_SEED)
        n = LAYERWISE_MEAN_SAMPLES
        eps = torch.randn(
            (n, *([1] * len(self.batch_shape)), self.n_layers, self.latent_dim),
            generator=gen,
            device=self.offset.device,
        )
        zbar = self.offset.new_zeros((n, *self.batch_shape, self.latent_dim))
        means, z = [], None
        for layer in range(self.n_layers):
            if layer > 0:
                zbar = self.recurrence.step(layer, zbar, z)
            mu, sigma = self._layer(layer, zbar)  # (n, *batch, D)
            z = mu + sigma * eps[..., layer, :]
            means.append(mu.expand_as(z).mean(0))
        return torch.stack(means, dim=-2)
