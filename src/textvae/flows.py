"""Normalising flows for posteriors and priors: ``torch.distributions`` transforms, exact log-dets.

A flow posterior (Chien & Luo, APSIPA ASC 2022, "Flow-Based Variational Sequence
Autoencoder") pushes the encoder's diagonal Gaussian
q0(z_0|x) through K invertible maps, z_K = f_K(...f_1(z_0)), and

    log q(z_K|x) = log q0(z_0|x) - sum_k log |det df_k/dz_{k-1}|         (Rezende & Mohamed 2015, eq. 7)

with every log-determinant exact. The flows are *amortised*: their parameters are computed from
the encoder summary h of each sentence (Rezende & Mohamed 2015 sec. 4; Kingma et al. 2016;
van den Berg et al. 2018), so a transform holds per-sentence parameters of batch shape (B,) and
broadcasts over leading sample dimensions: it maps z of shape (S, B, D) to (S, B, D), and its
``log_abs_det_jacobian`` is (S, B), nats.

Flow families (each a :class:`FlowTransform`; ``has_inverse`` says whether ``.inv`` works):

- :class:`PlanarTransform` (Rezende & Mohamed 2015, eqs. 10-12 and appendix A.1): inverse by
  the one-dimensional root equation of w^T z (monotone, bracketed).
- :class:`RadialTransform` (eq. 14 and appendix A.2): inverse in closed form (a quadratic in r).
- :class:`IAFTransform` (Kingma et al. 2016, eqs. 10-14, the numerically stable form with a
  MADE of Germain et al. 2015): inverse by D sequential passes, one dimension per pass.
- :class:`CCLinIAFTransform` (Tomczak & Welling 2017): linear, unit lower triangular, volume
  preserving (log-det 0); inverse by a triangular solve.
- :class:`SylvesterTransform` (van den Berg et al. 2018, the triangular variant): inverse by
  back-substitution, one monotone one-dimensional root per dimension (the map is triangular).

Planar and Sylvester inverses are iterative (safeguarded Newton on a bracket that always holds
the root) and their residual ||f(f^-1(y)) - y|| is checked (:data:`INVERSE_TOL`); the density of
an arbitrary z (``FlowDistribution.log_prob``) is what the aggregate-posterior MI of z_K needs
(:func:`textvae.metrics.evaluate`). The density of the flow's *own samples* needs no inverse:
:meth:`FlowDistribution.rsample_and_log_prob` returns z_K together with log q(z_K|x),
accumulating the log-dets while it pushes z_0 forward (the same method name as ``zuko``'s flows).
The ELBO, the IW bound and the Monte Carlo KL use that method (see
:func:`textvae.objectives.rsample_and_log_prob`), so every flow gives an exact log q and the
IW-NLL stays a valid bound with no special case per flow family.

The prior flow (:class:`AutoregressivePrior`) runs the same MADE affine map in the other
direction (an "AF prior", Chen et al. 2017 "Variational Lossy Autoencoder", sec. 3.2: an
autoregressive flow prior is the IAF posterior read backwards): log p(z) of any z costs one
MADE pass per step (needed at every training step), sampling costs D passes per step (needed
only for generation).

Library choice: ``zuko`` and Pyro both ship IAF/planar/radial/Sylvester-style transforms, but
(a) nothing may be installed in this project's environment now, and (b) amortised, batch-
conditioned transforms with per-sentence parameters broadcast over S importance samples are
what the protocol needs; ``torch.distributions.Transform`` carries that with no extra
dependency. docs/flows.md says more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    TransformedDistribution,
    constraints,
)
from torch.distributions.transforms import Transform

FLOWS = ("none", "planar", "radial", "iaf", "cclin_iaf", "sylvester")
PRIOR_FLOWS = ("none", "iaf")
# E_q[z_K|x] of a flow posterior: Monte Carlo over this many base draws, the same draws for every
# sentence (common random numbers), so the estimate is a deterministic function of the sentence
MEAN_SAMPLES, MEAN_SEED, MEAN_CHUNK = 256, 0, 32
# Kingma et al. 2016: initialise the gate's bias so that sigma starts near 1 ("+1 or +2")
IAF_GATE_BIAS = 1.0
# iterative inverses (planar, sylvester): most root-search steps, the float64 |g| at which they
# stop, and the largest accepted residual max |f(f^-1(y)) - y| / (1 + |y|)
ROOT_ITERS, ROOT_TOL, INVERSE_TOL = 120, 1e-13, 1e-4


class InverseError(ArithmeticError):
    """An iterative flow inverse did not reach :data:`INVERSE_TOL` (the residual is named)."""


def _monotone_root(fn, lo: torch.Tensor, hi: torch.Tensor, iters: int = ROOT_ITERS) -> torch.Tensor:
    """Elementwise root of an increasing function on [lo, hi] (g(lo) <= 0 <= g(hi)): Newton
    steps inside a shrinking bracket, bisection where a step would leave it or where |g| does
    not fall fast enough (the safeguard of Numerical Recipes' ``rtsafe``), so it always
    converges, quadratically near the root. ``fn(x) -> (g, g')``; tensors of one shape."""
    x = 0.5 * (lo + hi)
    dx_old = hi - lo
    dx = dx_old
    for _ in range(iters):
        g, dg = fn(x)
        if bool((g.abs() <= ROOT_TOL * (1 + x.abs())).all()):
            break
        lo = torch.where(g < 0, x, lo)
        hi = torch.where(g > 0, x, hi)
        newton = x - g / dg
        bisect = ~((newton > lo) & (newton < hi)) | (2 * g.abs() > (dx_old * dg).abs())
        dx_old, dx = dx, torch.where(bisect, 0.5 * (hi - lo), g / dg)
        x_new = torch.where(g == 0, x, torch.where(bisect, 0.5 * (lo + hi), newton))
        if torch.equal(x_new, x):
            break
        x = x_new
    return x


def _check_residual(name: str, fx: torch.Tensor, y: torch.Tensor) -> None:
    """Raise :class:`InverseError` unless f(x) (computed in float64 by the caller: in float32 a
    planar step with a large u_hat cannot even reproduce its own forward map) gives back y."""
    y = y.double()
    err = ((fx - y).abs() / (1 + y.abs())).amax() if fx.numel() else fx.new_zeros(())
    if not bool(err <= INVERSE_TOL):
        raise InverseError(f"{name} inverse residual {float(err):.2e} exceeds {INVERSE_TOL:.0e}")


_REAL_VECTOR = constraints.independent(constraints.real, 1)


class FlowTransform(Transform):
    """A bijection of R^D (event dim 1) with an exact log |det J|, shape (..., D) -> (...,).

    ``call_and_ladj(x) -> (y, log|det dy/dx|)`` computes both in one pass (subclasses avoid
    recomputing the shared pre-activations). ``has_inverse``: whether ``.inv`` is implemented.
    """

    domain = _REAL_VECTOR
    codomain = _REAL_VECTOR
    bijective = True
    has_inverse = False

    def __init__(self):
        super().__init__(cache_size=0)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self(x)
        return y, self.log_abs_det_jacobian(x, y)

    def _inverse(self, y):
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form inverse, so log q(z) of an arbitrary z is "
            "not available; use FlowDistribution.rsample_and_log_prob (log q of its own samples)"
        )


class PlanarTransform(FlowTransform):
    """Planar flow (Rezende & Mohamed 2015, eqs. 10-12; appendix A.1 for invertibility).

    f(z) = z + u_hat tanh(w^T z + b), with
    u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 and m(a) = -1 + softplus(a), so w^T u_hat > -1 and
    f is invertible. psi(z) = (1 - tanh^2(w^T z + b)) w and

        log |det df/dz| = log |1 + u_hat^T psi(z)| = log(1 + (1 - tanh^2(w^T z + b)) w^T u_hat),

    the argument being > 0 since 1 - tanh^2 is in (0, 1].

    Inverse (appendix A.1): with alpha = w^T z, w^T y = alpha + w^T u_hat tanh(alpha + b), an
    increasing function of alpha (derivative 1 + w^T u_hat tanh' > 0) whose root lies within
    |w^T u_hat| of w^T y; then z = y - u_hat tanh(alpha + b). Solved in float64 by
    :func:`_monotone_root`, residual checked.

    Args:
        u, w: (B, D) raw parameters (u is constrained to u_hat here); b: (B,).
    """

    def __init__(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        wu = (w * u).sum(-1, keepdim=True)  # (B, 1)
        self.w, self.b = w, b
        self.u = u + (F.softplus(wu) - 1 - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        self.wu = (w * self.u).sum(-1)  # w^T u_hat = m(w^T u) > -1, (B,)

    has_inverse = True

    def _inverse(self, y):
        w, b, wu = self.w.double(), self.b.double(), self.wu.double()
        wy = (y.double() * w).sum(-1)  # (..., B)

        def g(alpha):
            a = torch.tanh(alpha + b)
            return alpha + wu * a - wy, 1 + wu * (1 - a * a)

        reach = wu.abs().expand_as(wy)
        alpha = _monotone_root(g, wy - reach, wy + reach)
        u = self.u.double()
        x = y.double() - u * torch.tanh(alpha + b).unsqueeze(-1)
        _check_residual(
            type(self).__name__, x + u * torch.tanh((x * w).sum(-1) + b).unsqueeze(-1), y
        )
        return x.to(y.dtype)

    def call_and_ladj(self, x):
        a = torch.tanh((x * self.w).sum(-1) + self.b)  # (S, B)
        return x + self.u * a.unsqueeze(-1), torch.log1p((1 - a * a) * self.wu)

    def _call(self, x):
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x, y):
        return self.call_and_ladj(x)[1]


class RadialTransform(FlowTransform):
    """Radial flow (Rezende & Mohamed 2015, eq. 14; appendix A.2 for invertibility).

    f(z) = z + beta h(alpha, r) (z - z0), r = ||z - z0||, h = 1 / (alpha + r), with
    alpha = softplus(a) > 0 and beta = -alpha + softplus(b) >= -alpha (invertible). With
    h' = -1 / (alpha + r)^2,

        log |det df/dz| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h' r)
                        = (D - 1) log(1 + beta h) + log(1 + alpha beta / (alpha + r)^2).

    Inverse (derived here, not in the paper): ||f(z) - z0|| = r (alpha + r + beta) / (alpha + r)
    =: r_y, so r is the positive root of r^2 + (alpha + beta - r_y) r - alpha r_y = 0 and
    z = z0 + (y - z0) (alpha + r) / (alpha + r + beta).

    Args:
        z0: (B, D) centre; a, b: (B,) raw parameters of alpha and beta.
    """

    has_inverse = True

    def __init__(self, z0: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.z0 = z0
        self.alpha = F.softplus(a).unsqueeze(-1)  # (B, 1)
        self.beta = -self.alpha + F.softplus(b).unsqueeze(-1)

    def call_and_ladj(self, x):
        diff = x - self.z0
        r = diff.norm(dim=-1, keepdim=True)  # (S, B, 1)
        h = 1.0 / (self.alpha + r)
        bh = self.beta * h
        ladj = (x.size(-1) - 1) * torch.log1p(bh) + torch.log1p(self.alpha * self.beta * h * h)
        return x + bh * diff, ladj.squeeze(-1)

    def _call(self, x):
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x, y):
        return self.call_and_ladj(x)[1]

    def _inverse(self, y):
        diff = y - self.z0
        r_y = diff.norm(dim=-1, keepdim=True)
        c = self.alpha + self.beta - r_y
        r = 0.5 * (-c + torch.sqrt(c * c + 4 * self.alpha * r_y))
        return self.z0 + diff * (self.alpha + r) / (self.alpha + r + self.beta)


class MADE(nn.Module):
    """Masked autoencoder (Germain et al. 2015) for the autoregressive affine steps.

    ``forward(z (..., D), context (B, C) or None) -> (m, s)``, each (..., D) float32 (float64
    for a float64 module), where
    output d depends only on the z's that come before d in the step's order (``reverse``
    flips the order, as Kingma et al. 2016 reverse it between steps); the context (the encoder
    summary, or the dialogue context for a conditional prior) reaches every output. One hidden
    layer (ELU) of ``hidden_dim`` units; hidden degrees cycle over 1..D-1.

    Raises:
        ValueError: a context is needed (``context_dim`` > 0) and not given.
    """

    def __init__(
        self, latent_dim: int, hidden_dim: int, context_dim: int = 0, reverse: bool = False
    ):
        super().__init__()
        d = latent_dim
        order = torch.arange(1, d + 1)
        if reverse:
            order = order.flip(0)
        self.register_buffer("order", order, persistent=False)  # (D,) degrees 1..D
        hidden_deg = torch.arange(hidden_dim) % max(1, d - 1) + 1
        self.register_buffer(
            "mask_in", (hidden_deg[:, None] >= order[None, :]).float(), persistent=False
        )
        mask_out = (order[:, None] > hidden_deg[None, :]).float()  # (D, H_f)
        self.register_buffer("mask_out", torch.cat([mask_out, mask_out]), persistent=False)
        self.inp = nn.Linear(d, hidden_dim)
        self.out = nn.Linear(hidden_dim, 2 * d)
        self.ctx = nn.Linear(context_dim, hidden_dim, bias=False) if context_dim else None
        self.ctx_out = nn.Linear(context_dim, 2 * d, bias=False) if context_dim else None
        with torch.no_grad():
            self.out.bias[d:].fill_(IAF_GATE_BIAS)
        self.latent_dim = d

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None):
        if self.ctx is not None and context is None:
            raise ValueError("this MADE is conditioned on a context; pass one")
        dt = z.dtype if z.dtype == torch.float64 else self.inp.weight.dtype  # float64 inverses
        h = F.linear(z, (self.inp.weight * self.mask_in).to(dt), self.inp.bias.to(dt))
        if self.ctx is not None:
            h = h + F.linear(context.to(dt), self.ctx.weight.to(dt))
        out = F.linear(F.elu(h), (self.out.weight * self.mask_out).to(dt), self.out.bias.to(dt))
        if self.ctx_out is not None:
            out = out + F.linear(context.to(dt), self.ctx_out.weight.to(dt))
        m, s = _full_precision(out).chunk(2, dim=-1)
        return m, s


class IAFTransform(FlowTransform):
    """One inverse autoregressive flow step (Kingma et al. 2016, eqs. 10-14, the numerically
    stable LSTM-like form): [m, s] = MADE(z, h), sigma = sigmoid(s),

        f(z) = sigma * z + (1 - sigma) * m,     log |det df/dz| = sum_d log sigma_d,

    exact because df/dz is triangular in the MADE's order with diagonal sigma (m and sigma of
    dimension d depend only on earlier dimensions). Inverse: z_d = y_d + (y_d - m_d) exp(-s_d)
    (= (y_d - (1 - sigma_d) m_d) / sigma_d without dividing by a sigma that underflows), in D
    sequential passes, pass k setting only the k-th dimension in order (the others stay 0
    until set, so no unfinished value can overflow and poison the MADE's masked products), in
    float32 autocast off (float64 for a float64 module or value). Far in the tails the true
    inverse can exceed the float range (each dimension's scale grows like exp(-s) of the
    previous): such a point comes back with inf from the overflowing dimension on (never NaN),
    and :meth:`FlowDistribution.log_prob` gives it density 0.

    Args:
        made: the step's :class:`MADE`; context: (B, C) per-sentence conditioning or None.
    """

    has_inverse = True

    def __init__(self, made: MADE, context: torch.Tensor | None = None):
        super().__init__()
        self.made, self.context = made, context

    def call_and_ladj(self, x):
        m, s = self.made(x, self.context)
        sigma = torch.sigmoid(s)
        return sigma * x + (1 - sigma) * m, F.logsigmoid(s).sum(-1)

    def _call(self, x):
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x, y):
        return self.call_and_ladj(x)[1]

    def _inverse(self, y):
        dtype = torch.promote_types(y.dtype, self.made.inp.weight.dtype)
        yd = y.to(dtype)
        context = None if self.context is None else self.context.to(dtype)
        x = torch.zeros(
            torch.broadcast_shapes(y.shape, (*self._batch_shape(), y.size(-1))),
            dtype=dtype,
            device=y.device,
        )
        with torch.autocast(y.device.type, enabled=False):
            # dimensions by increasing degree: each depends only on those set before it
            out = torch.zeros((), dtype=torch.bool, device=y.device)  # points past float64
            for k in torch.argsort(self.made.order).tolist():
                m, s = self.made(torch.where(out.unsqueeze(-1), 0.0, x), context)
                value = yd[..., k] + (yd[..., k] - m[..., k]) * torch.exp(-s[..., k])
                value = torch.where(out, float("inf"), value)
                out = out | ~torch.isfinite(value)
                is_k = torch.arange(x.size(-1), device=x.device) == k
                x = torch.where(is_k, value.unsqueeze(-1), x)  # not in place: autograd-safe
        return x.to(y.dtype)

    def _batch_shape(self) -> tuple[int, ...]:
        return () if self.context is None else tuple(self.context.shape[:-1])


class CCLinIAFTransform(FlowTransform):
    """Convex-combination linear IAF (Tomczak & Welling 2017, arXiv 1706.02326): f(z) = L z with
    L = sum_c y_c L_c, y = softmax over C components, each L_c lower triangular with ones on the
    diagonal; in their released code (``vae_vpflows``) both the L_c and y are computed from the
    encoder summary, as here. L is unit lower triangular, so

        log |det df/dz| = log |det L| = 0                     (volume preserving),

    and f^{-1}(y) is a triangular solve.

    Args:
        lower: (B, D, D) the unit-lower-triangular L of each sentence.
    """

    has_inverse = True

    def __init__(self, lower: torch.Tensor):
        super().__init__()
        self.lower = lower

    def _call(self, x):
        return (self.lower @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y):
        batch = torch.broadcast_shapes(y.shape[:-1], self.lower.shape[:-2])  # e.g. (M, 1) x (B,)
        lower = self.lower.expand(*batch, *self.lower.shape[-2:])
        rhs = y.expand(*batch, y.size(-1)).unsqueeze(-1)
        return torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True).squeeze(
            -1
        )

    def log_abs_det_jacobian(self, x, y):
        return x.new_zeros(x.shape[:-1])


class SylvesterTransform(FlowTransform):
    """Triangular Sylvester flow (van den Berg et al. 2018, eqs. 9-14, the T-SNF variant):

        f(z) = z + Q R tanh(R~ Q^T z + b),

    R, R~ (D, D) upper triangular, Q a permutation (identity, or the reversal on alternate steps
    when ``reverse``). By Sylvester's determinant identity and Q^T Q = I,
    det df/dz = det(I + diag(tanh'(a)) R~ R), a = R~ Q^T z + b, an upper-triangular matrix, so

        log |det df/dz| = sum_m log(1 + tanh'(a_m) R~_mm R_mm),

    and with the diagonals squashed by tanh (|R~_mm R_mm| < 1, as the paper) every factor is
    > 0 and f is invertible.

    Inverse (no closed form): in the coordinates x = Q^T z, y' = Q^T y the map is triangular,
    y'_m = x_m + sum_{j >= m} R_mj tanh(a_j), a_j = sum_{k >= j} R~_jk x_k + b_j, so x is found by
    back-substitution from the last dimension: each x_m solves the increasing one-dimensional
    equation x + R_mm tanh(R~_mm x + c_m) = t_m (derivative 1 + R_mm R~_mm tanh' > 0, root within
    |R_mm| of t_m), by :func:`_monotone_root` in float64; the residual is checked. This always
    converges, unlike the fixed-point iteration z <- y - Q R tanh(R~ Q^T z + b), which is a
    contraction only when ||R diag(tanh') R~|| < 1.

    Args:
        r1, r2: (B, D, D) raw matrices of R and R~ (their strict lower parts are ignored, their
            diagonals squashed by tanh here); b: (B, D); reverse: Q is the reversal.
    """

    def __init__(self, r1: torch.Tensor, r2: torch.Tensor, b: torch.Tensor, reverse: bool = False):
        super().__init__()
        self.r1, self.r2 = _upper_tanh_diagonal(r1), _upper_tanh_diagonal(r2)
        self.b, self.reverse = b, reverse
        self.diag = self.r1.diagonal(dim1=-2, dim2=-1) * self.r2.diagonal(
            dim1=-2, dim2=-1
        )  # (B, D)

    def call_and_ladj(self, x):
        xq = x.flip(-1) if self.reverse else x  # Q^T z
        a = torch.tanh((self.r2 @ xq.unsqueeze(-1)).squeeze(-1) + self.b)  # (S, B, D)
        v = (self.r1 @ a.unsqueeze(-1)).squeeze(-1)
        v = v.flip(-1) if self.reverse else v  # Q R tanh(.)
        return x + v, torch.log1p((1 - a * a) * self.diag).sum(-1)

    def _call(self, x):
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x, y):
        return self.call_and_ladj(x)[1]

    has_inverse = True

    def _inverse(self, y):
        r1, r2, b = self.r1.double(), self.r2.double(), self.b.double()
        yq = y.double().flip(-1) if self.reverse else y.double()  # Q^T y
        batch = torch.broadcast_shapes(yq.shape[:-1], b.shape[:-1])
        yq = yq.expand(*batch, yq.size(-1))
        d = yq.size(-1)
        x = torch.zeros_like(yq)
        tanh_a = torch.zeros_like(yq)  # tanh(a_j) of the dimensions already solved
        for m in range(d - 1, -1, -1):
            t = yq[..., m] - (r1[..., m, m + 1 :] * tanh_a[..., m + 1 :]).sum(-1)
            c = b[..., m] + (r2[..., m, m + 1 :] * x[..., m + 1 :]).sum(-1)
            rm, sm = r1[..., m, m], r2[..., m, m]

            def g(v, t=t, c=c, rm=rm, sm=sm):
                a = torch.tanh(sm * v + c)
                return v + rm * a - t, 1 + rm * sm * (1 - a * a)

            reach = rm.abs().expand_as(t)
            x[..., m] = _monotone_root(g, t - reach, t + reach)
            tanh_a[..., m] = torch.tanh(sm * x[..., m] + c)
        a = torch.tanh((r2 @ x.unsqueeze(-1)).squeeze(-1) + b)  # the forward map again, float64
        fx = x + (r1 @ a.unsqueeze(-1)).squeeze(-1)  # in the Q^T coordinates
        _check_residual(type(self).__name__, fx, yq)
        x = x.flip(-1) if self.reverse else x
        return x.to(y.dtype)


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (bf16 autocast), float64 kept (the exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _upper_tanh_diagonal(raw: torch.Tensor) -> torch.Tensor:
    """(..., D, D) -> upper-triangular matrix whose diagonal is tanh of raw's diagonal."""
    diag = torch.tanh(raw.diagonal(dim1=-2, dim2=-1))
    return torch.triu(raw, diagonal=1) + torch.diag_embed(diag)


class FlowDistribution(TransformedDistribution):
    """q(z_K|x): a diagonal Gaussian base q0 (batch (B,), event (D,)) pushed through flow steps.

    - ``rsample_and_log_prob(sample_shape) -> (z (*S, B, D), log q (*S, B))``: reparameterised
      samples of z_K with their exact log-density, float32 nats; works for every flow.
    - ``log_prob(z)``: exact for any z (every step has an inverse: closed form for radial, iaf,
      cclin_iaf; a checked root search for planar and sylvester).
    - ``mean``: E_q[z_K|x] by Monte Carlo over :data:`MEAN_SAMPLES` base draws that are the same
      for every sentence (common random numbers, fixed seed), so it is a deterministic function
      of the sentence alone, whatever its batch; its error is a Monte Carlo error of 256 draws.
      It is what generation decodes from (``reconstruct``, ``interpolate``, the probe) and what
      AU measures for flow posteriors.
    - ``sample``, ``rsample``: as ``TransformedDistribution``.
    """

    def __init__(self, base: Independent, transforms: list[FlowTransform], validate_args=None):
        super().__init__(base, transforms, validate_args=validate_args)

    @property
    def has_inverse(self) -> bool:
        return all(t.has_inverse for t in self.transforms)

    def push(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Push base points z0 (..., B, D) through the flow: (z_K, log q(z_K|x)), the latter
        log q0(z0) - sum_k log |det df_k|, (..., B)."""
        log_q = self.base_dist.log_prob(z0)
        z = z0
        for t in self.transforms:
            z, ladj = t.call_and_ladj(z)
            log_q = log_q - ladj
        return z, log_q

    def rsample_and_log_prob(
        self, sample_shape: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.push(self.base_dist.rsample(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z_K = value | x) of any point, through the inverse of every step:
        log q0(f^-1(value)) - sum_k log |det df_k| at the inverted points, nats. ``value`` (..., D)
        broadcasts against the batch shape, e.g. (M, 1, D) -> (M, B): every point under every
        sentence's posterior (the aggregate posterior of :func:`textvae.metrics.evaluate`).

        A point whose inverse overflows (non-finite, possible only far in the tails, see
        :class:`IAFTransform`) gets -inf: its base density is below exp(-1e76).

        Raises:
            InverseError: an iterative inverse (planar, sylvester) did not converge.
        """
        y = value
        ladj = 0.0
        overflow = torch.zeros((), dtype=torch.bool, device=value.device)
        for t in reversed(self.transforms):
            x = t.inv(y)
            bad = ~torch.isfinite(x).all(-1)
            overflow = overflow | bad
            x = torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x)
            ladj = ladj + t.log_abs_det_jacobian(x, y)
            y = x
        log_q = self.base_dist.log_prob(y) - ladj
        return log_q.masked_fill(overflow, float("-inf"))

    @property
    def mean(self) -> torch.Tensor:
        normal = self.base_dist.base_dist
        loc, scale = normal.loc, normal.scale  # (B, D)
        gen = torch.Generator(device=loc.device).manual_seed(MEAN_SEED)
        eps = torch.randn(
            (MEAN_SAMPLES, *([1] * (loc.dim() - 1)), loc.size(-1)),
            generator=gen,
            device=loc.device,
            dtype=loc.dtype,
        )  # (M, 1, D): shared by sentences
        total = torch.zeros_like(loc)
        for i in range(0, MEAN_SAMPLES, MEAN_CHUNK):
            z = loc + scale * eps[i : i + MEAN_CHUNK]
            for t in self.transforms:
                z = t(z)
            total = total + z.sum(0)
        return total / MEAN_SAMPLES


def base_gaussian(q: Distribution) -> Independent:
    """The diagonal Gaussian a posterior is built on: q itself, or a flow's base q0.

    Raises:
        ValueError: q is neither a diagonal Gaussian nor a flow over one.
    """
    base = q.base_dist if isinstance(q, TransformedDistribution) else q
    if isinstance(base, Independent) and isinstance(base.base_dist, Normal):
        return base
    raise ValueError(f"expected a diagonal Gaussian or a flow over one, got {type(q).__name__}")


class PosteriorFlow(nn.Module):
    """The amortised flow of a posterior: parameters of K steps computed from the encoder
    summary h, ``forward(q0, h (B, H_in)) -> Distribution``.

    ``kind`` ``none`` returns q0 unchanged and holds no parameter (a model without a flow is
    bit-for-bit what it was). Otherwise a :class:`FlowDistribution` with ``steps`` transforms
    (``steps`` = 0 gives a flow distribution with no step: the Gaussian, but with its KL
    estimated by Monte Carlo). Parameter networks (one linear map from h unless stated):

    - planar: (u, w, b) per step, 2D + 1 numbers; radial: (z0, a, b), D + 2;
    - sylvester: (R, R~, b), 2 D^2 + D (van den Berg et al.'s amortised matrices);
    - cclin_iaf: ``components`` matrices and their mixture logits, C (D^2 + 1);
    - iaf: one :class:`MADE` per step (``hidden`` units) taking h as its context, orders
      alternating.

    Flow parameters computed in bf16 under autocast are cast to float32, so the flow itself
    runs in float32 (float64 when the module is float64).

    Raises:
        ValueError: unknown ``kind`` or ``steps`` < 0.
    """

    def __init__(
        self,
        kind: str,
        latent_dim: int,
        context_dim: int,
        steps: int,
        hidden: int = 256,
        components: int = 3,
    ):
        super().__init__()
        if kind not in FLOWS:
            raise ValueError(f"unknown flow '{kind}' (use one of {', '.join(FLOWS)})")
        if steps < 0:
            raise ValueError(f"flow steps must be >= 0, got {steps}")
        self.kind, self.steps, self.latent_dim, self.components = (
            kind,
            steps,
            latent_dim,
            components,
        )
        d = latent_dim
        per_step = {
            "planar": 2 * d + 1,
            "radial": d + 2,
            "sylvester": 2 * d * d + d,
            "cclin_iaf": components * (d * d + 1),
        }.get(kind, 0)
        self.params = nn.Linear(context_dim, steps * per_step) if per_step and steps else None
        self.mades = None
        if kind == "iaf" and steps:
            self.mades = nn.ModuleList(
                MADE(d, hidden, context_dim, reverse=k % 2 == 1) for k in range(steps)
            )

    def transforms(self, h: torch.Tensor) -> list[FlowTransform]:
        """The K transforms of the sentences summarised by h (B, H_in)."""
        d, batch = self.latent_dim, h.shape[:-1]
        if self.kind == "iaf":  # the context is kept for later sampling, maybe outside autocast
            return [IAFTransform(made, _full_precision(h)) for made in self.mades or []]
        if self.params is None:
            return []
        raw = _full_precision(self.params(h)).view(*batch, self.steps, -1)  # (B, K, per_step)
        out: list[FlowTransform] = []
        for k in range(self.steps):
            p = raw[..., k, :]
            if self.kind == "planar":
                out.append(PlanarTransform(p[..., :d], p[..., d : 2 * d], p[..., 2 * d]))
            elif self.kind == "radial":
                out.append(RadialTransform(p[..., :d], p[..., d], p[..., d + 1]))
            elif self.kind == "sylvester":
                r1 = p[..., : d * d].reshape(*batch, d, d)
                r2 = p[..., d * d : 2 * d * d].reshape(*batch, d, d)
                out.append(SylvesterTransform(r1, r2, p[..., 2 * d * d :], reverse=k % 2 == 1))
            else:  # cclin_iaf
                c = self.components
                mats = p[..., : c * d * d].reshape(*batch, c, d, d)
                weights = torch.softmax(p[..., c * d * d :], dim=-1)  # (B, C)
                strict = torch.tril(mats, diagonal=-1)
                eye = torch.eye(d, device=h.device, dtype=strict.dtype)
                out.append(CCLinIAFTransform(eye + (weights[..., None, None] * strict).sum(-3)))
        return out

    def forward(self, base: Independent, h: torch.Tensor) -> Distribution:
        if self.kind == "none":
            return base
        return FlowDistribution(base, self.transforms(h))


class AutoregressivePrior(nn.Module):
    """A flow prior: p(z) (or p(z|c)) = a Gaussian base pushed through K autoregressive steps.

    Each step k is an :class:`IAFTransform` used backwards (``.inv``): sampling maps eps -> z
    by inverting y = sigma(z) * z + (1 - sigma(z)) * m(z) (D MADE passes), density evaluation
    maps z -> eps in one pass, with log p(z) = log p0(eps) + sum_k sum_d log sigma_dk (Chen et
    al. 2017's autoregressive-flow prior; the IAF prior of Luo & Chien 2021 in this reading).
    Orders alternate between steps. With ``context_dim`` > 0 each MADE is conditioned on a
    context vector (the dialogue context of a conditional prior).

    ``forward(base (batch (B,) or ()), context (B, C) or None) -> TransformedDistribution``
    with the base's batch shape, event (D,); ``log_prob`` of any z (..., D) exact.
    """

    def __init__(self, latent_dim: int, steps: int, hidden: int = 256, context_dim: int = 0):
        super().__init__()
        if steps < 0:
            raise ValueError(f"prior flow steps must be >= 0, got {steps}")
        self.mades = nn.ModuleList(
            MADE(latent_dim, hidden, context_dim, reverse=k % 2 == 1) for k in range(steps)
        )

    def forward(
        self, base: Distribution, context: torch.Tensor | None = None
    ) -> TransformedDistribution:
        if context is not None:
            context = _full_precision(context)
        return TransformedDistribution(base, [IAFTransform(m, context).inv for m in self.mades])
