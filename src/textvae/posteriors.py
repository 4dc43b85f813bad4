"""Posteriors and priors as ``torch.distributions`` objects.

q(z|x) = N(mu, diag sigma^2) with event shape (D,); the prior p(z) = N(0, I).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, Normal


class GaussianHead(nn.Module):
    """Linear heads from a summary vector to mu and log sigma^2.

    ``forward(h (B, H_in)) -> Independent(Normal(mu, sigma), 1)`` with batch shape (B,) and
    event shape (D,). log sigma^2 is computed in float32 and clamped to [-20, 10] so that
    sigma stays finite under bf16 autocast.
    """

    def __init__(self, in_dim: int, latent_dim: int, bias: bool = True):
        super().__init__()
        self.mu = nn.Linear(in_dim, latent_dim, bias=bias)
        self.logvar = nn.Linear(in_dim, latent_dim, bias=bias)

    def forward(self, h: torch.Tensor) -> Independent:
        mu = self.mu(h).float()
        logvar = self.logvar(h).float().clamp(-20.0, 10.0)
        return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def standard_normal(latent_dim: int, batch_shape: tuple[int, ...] = (), device=None) -> Independent:
    """p(z) = N(0, I): batch shape ``batch_shape``, event shape (D,), float32."""
    loc = torch.zeros(*batch_shape, latent_dim, device=device)
    return Independent(Normal(loc, torch.ones_like(loc)), 1)
