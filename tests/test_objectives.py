"""Maths checks of the ELBO, the IW bound, KL, free bits and the beta schedules."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from textvae.config import KLConfig
from textvae.decoders import sequence_log_prob
from textvae.objectives import (
    elbo,
    free_bits_kl,
    iw_bound,
    iw_log_weights,
    kl_per_dim,
    kl_weight,
)


def test_iw_bound_with_one_sample_is_the_elbo_on_the_same_z(tiny_model, tiny_batch):
    model = tiny_model()
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    torch.manual_seed(1)
    z = q.sample((1,))
    log_w, ll = iw_log_weights(model, tiny_batch, q, p, z)
    elbo_same_z = ll[0] - (q.log_prob(z) - p.log_prob(z))[0]
    assert torch.allclose(iw_bound(log_w), elbo_same_z, atol=1e-5)


@torch.no_grad()
def test_iw_bound_grows_with_k(tiny_model, tiny_batch):
    """E[log mean_K w] is non-decreasing in K (Burda et al. 2016, theorem 1)."""
    model = tiny_model()
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    torch.manual_seed(0)
    bounds = []
    for k in (1, 10, 100):
        reps = [
            iw_bound(iw_log_weights(model, tiny_batch, q, p, q.sample((k,)))[0]).mean()
            for _ in range(20)
        ]
        bounds.append(float(torch.stack(reps).mean()))
    assert bounds[0] < bounds[1] < bounds[2]


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = Independent(Normal(torch.randn(3, 5), torch.rand(3, 5) + 0.3), 1)
    p = Independent(Normal(torch.zeros(3, 5), torch.ones(3, 5)), 1)
    closed = kl_per_dim(q, p).sum(-1)
    z = q.sample((200000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(closed, mc, atol=0.03)


def test_sequence_log_prob_ignores_padding_and_matches_log_softmax():
    torch.manual_seed(0)
    out = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = sequence_log_prob(hidden, out, targets, mask, block_rows=3)
    logp = torch.log_softmax(out(hidden), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got, (logp * mask).sum(1), atol=1e-5)
    hidden2 = hidden.clone()
    hidden2[0, 3:] = 100.0  # garbage at padded positions changes nothing
    assert torch.allclose(sequence_log_prob(hidden2, out, targets, mask), got, atol=1e-5)


def test_elbo_reconstruction_is_summed_not_averaged_over_padding(tiny_model, tiny_batch):
    """Doubling the padding of a batch must not change per-sentence rec (the pitfall of
    averaging over padded positions)."""
    model = tiny_model()
    pad = torch.full((tiny_batch["input_ids"].size(0), 7), model.pad_id)
    padded = {
        "input_ids": torch.cat([tiny_batch["input_ids"], pad], 1),
        "attention_mask": torch.cat([tiny_batch["attention_mask"], torch.zeros_like(pad)], 1),
    }
    torch.manual_seed(3)
    a = elbo(model, tiny_batch)
    torch.manual_seed(3)
    b = elbo(model, padded)
    assert torch.allclose(a["rec"], b["rec"], atol=1e-4)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-4)


def test_free_bits_per_dim_and_total():
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # (B=2, D=2); batch means 0.2, 3.0
    assert float(free_bits_kl(kl, 0.0)) == pytest.approx(3.2)
    assert float(free_bits_kl(kl, 0.5, "per_dim")) == pytest.approx(0.5 + 3.0)
    assert float(free_bits_kl(kl, 5.0, "total")) == pytest.approx(5.0)
    assert float(free_bits_kl(kl, 1.0, "total")) == pytest.approx(3.2)
    x = kl.clone().requires_grad_()
    free_bits_kl(x, 0.5, "per_dim").backward()
    assert torch.all(x.grad[:, 0] == 0) and torch.all(x.grad[:, 1] > 0)  # no push below lambda


def test_free_bits_per_sentence_and_dimension_as_park_and_lee_released_code():
    """The clamp on each sentence's KL per dimension, before the batch mean: the two sentences'
    KLs (0, 2) and (2, 0) have batch means (1, 1), so the batch-mean clamp at lambda = 1 gives 2
    while the per-sentence clamp gives (1 + 2 + 2 + 1) / 2 = 3."""
    kl = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    assert float(free_bits_kl(kl, 1.0, "per_dim")) == pytest.approx(2.0)
    assert float(free_bits_kl(kl, 1.0, "per_sentence_dim")) == pytest.approx(3.0)
    x = kl.clone().requires_grad_()
    free_bits_kl(x, 1.0, "per_sentence_dim").backward()
    assert x.grad.tolist() == [[0.0, 0.5], [0.5, 0.0]]  # no gradient where a sentence is below
    from textvae.config import load_config

    assert (
        load_config(None, ["kl.free_bits_mode=per_sentence_dim"]).kl.free_bits_mode
        == "per_sentence_dim"
    )


def test_kl_schedules():
    lin = KLConfig(schedule="linear", beta_start=0.1, beta_max=1.0, warmup_steps=100)
    assert kl_weight(0, lin) == pytest.approx(0.1)
    assert kl_weight(50, lin) == pytest.approx(0.55)
    assert kl_weight(1000, lin) == pytest.approx(1.0)
    assert kl_weight(7, KLConfig(schedule="constant", beta_max=0.3)) == 0.3
    lg = KLConfig(schedule="logistic", beta_max=1.0, logistic_k=0.1, logistic_x0=50)
    assert kl_weight(50, lg) == pytest.approx(0.5)
    assert kl_weight(0, lg) == pytest.approx(1 / (1 + math.exp(5)))
    cyc = KLConfig(
        schedule="cyclical", beta_max=1.0, cycle_steps=100, ratio_zero=0.25, ratio_increase=0.5
    )
    assert [kl_weight(s, cyc) for s in (0, 24, 25, 50, 75, 99, 100, 150)] == pytest.approx(
        [0, 0, 0, 0.5, 1, 1, 0, 0.5]
    )
