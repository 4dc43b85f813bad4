"""MI, AU and the evaluation protocol on cases with known answers."""

import math

import pytest
import torch

from tests.conftest import make_sentences
from textvae.data import TextDataset
from textvae.metrics import (
    EVAL_KEYS,
    active_units,
    aggregate_mi,
    batch_mi,
    evaluate,
    gaussian_log_density_matrix,
)


def test_log_density_matrix_matches_distributions():
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 3)
    got = gaussian_log_density_matrix(z, mu, logvar)
    want = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[:, None]).sum(-1)
    assert torch.allclose(got.float(), want, atol=1e-4)


def test_mi_is_zero_when_every_posterior_is_the_same():
    torch.manual_seed(0)
    mu, logvar = torch.zeros(500, 4), torch.zeros(500, 4)
    z = torch.randn(500, 4)
    assert aggregate_mi(mu, logvar, z) == pytest.approx(0.0, abs=1e-9)


def test_mi_is_log_two_for_two_separated_clusters():
    """x is one bit (which cluster); a sharp posterior reveals it: I(x; z) = log 2."""
    torch.manual_seed(0)
    n = 2000
    mu = torch.zeros(n, 2)
    mu[: n // 2, 0], mu[n // 2 :, 0] = -10.0, 10.0
    logvar = torch.full((n, 2), math.log(0.01))
    z = mu + 0.1 * torch.randn(n, 2)  # posteriors identical inside a cluster: only the bit
    assert aggregate_mi(mu, logvar, z, chunk=300) == pytest.approx(math.log(2), abs=0.01)


def test_mi_saturates_at_log_n_whatever_the_true_information():
    """Non-overlapping posteriors carry unbounded information about x (a continuous code), but
    the aggregate estimator over N sentences cannot exceed log N: mi = log N means saturated."""
    torch.manual_seed(0)
    for n in (50, 500):
        mu = torch.randn(n, 8) * 100.0  # far apart
        logvar = torch.full((n, 8), math.log(1e-4))
        z = mu + 0.01 * torch.randn(n, 8)
        mi = aggregate_mi(mu, logvar, z)
        assert mi == pytest.approx(math.log(n), abs=1e-6)
        # sharper posteriors: more information, the same estimate
        assert aggregate_mi(mu, logvar - 4.0, mu + 0.001 * torch.randn(n, 8)) == pytest.approx(
            mi, abs=1e-6
        )


def test_mi_chunking_changes_nothing():
    torch.manual_seed(0)
    mu, logvar = torch.randn(300, 3), torch.randn(300, 3) * 0.3
    z = mu + torch.exp(0.5 * logvar) * torch.randn(300, 3)
    assert aggregate_mi(mu, logvar, z, chunk=7) == pytest.approx(
        aggregate_mi(mu, logvar, z, chunk=300)
    )
    assert batch_mi(mu, logvar, z) == pytest.approx(
        aggregate_mi(mu, logvar, z, analytic_entropy=True)
    )


def test_active_units_known_answer():
    torch.manual_seed(0)
    mu = torch.zeros(1000, 3)
    mu[:, 0] = torch.randn(1000)  # variance ~1: active
    mu[:, 1] = 0.05 * torch.randn(1000)  # variance ~0.0025: inactive at delta 0.01
    count, var = active_units(mu, 0.01)
    assert count == 1 and var.shape == (3,)
    assert active_units(mu, 0.001)[0] == 2


def test_evaluate_protocol_fields(tiny_model, tokenizer):
    model = tiny_model()
    ds = TextDataset(make_sentences(30, seed=9), tokenizer)
    r = evaluate(model, ds, iw_samples=20, batch_size=8, chunk_tokens=50)
    assert tuple(r) == EVAL_KEYS
    assert r["n_sentences"] == 30 and r["iw_samples"] == 20 and len(r["kl_per_dim"]) == 4
    assert r["n_tokens"] == sum(len(s.split()) + 1 for s in ds.texts) == r["n_words"]
    assert r["elbo"] == pytest.approx(-(r["rec"] + r["kl"]))
    assert r["nll"] <= -r["elbo"] + 3 * r["nll_stderr"]  # IW bound is tighter than the ELBO
    assert r["ppl_token"] == pytest.approx(math.exp(r["nll"] * 30 / r["n_tokens"]))
    assert sum(r["kl_per_dim"]) == pytest.approx(r["kl"], rel=1e-6)
    again = evaluate(model, ds, iw_samples=20, batch_size=5, chunk_tokens=1000)
    assert again["kl"] == pytest.approx(r["kl"], rel=1e-5)  # batching changes no closed form


def test_evaluate_language_model_is_exact_and_latent_fields_null(tiny_model, tokenizer):
    model = tiny_model("lstm_lm")
    ds = TextDataset(make_sentences(12, seed=3), tokenizer)
    r = evaluate(model, ds, iw_samples=500)
    for key in ("kl", "mi", "mi_batch", "au", "au_delta", "kl_per_dim", "iw_samples"):
        assert r[key] is None
    batch = ds.collate(list(range(12)))
    with torch.no_grad():
        exact = -model.log_likelihood(batch, None)[0].double().mean()
    assert r["nll"] == pytest.approx(float(exact), rel=1e-5)


def test_bf16_evaluation_stays_close_to_float32(tiny_model, tokenizer):
    model = tiny_model()
    ds = TextDataset(make_sentences(16, seed=4), tokenizer)
    a = evaluate(model, ds, iw_samples=10)
    b = evaluate(model, ds, iw_samples=10, precision="bf16")
    assert b["nll"] == pytest.approx(a["nll"], abs=0.2)
