"""Posterior-collapse remedies in the model: BN-VAE, delta-VAE minimum rate, bag-of-words loss."""

import math

import pytest
import torch

from tests.conftest import WORDS
from textvae.config import ConfigError, load_config
from textvae.data import TextDataset
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings, elbo, kl_per_dim
from textvae.posteriors import GaussianHead, min_rate_max_logvar, standard_normal


def _random_batch(tokenizer, n: int, seed: int) -> dict[str, torch.Tensor]:
    """n random sentences of random length over the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    texts = [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(k),), generator=g))
        for k in torch.randint(1, 12, (n,), generator=g)
    ]
    ds = TextDataset(texts, tokenizer)
    return ds.collate(list(range(n)))


# --- BN-VAE --------------------------------------------------------------------------------------


def _bn_bound(head: GaussianHead, h: torch.Tensor) -> torch.Tensor:
    """1/2 (beta_d^2 + gamma^2 v_d / (v_d + eps)) per dimension, v_d the biased batch variance of
    the pre-normalisation means."""
    v = head.mu(h).float().var(0, unbiased=False)
    beta = head.bn_shift.detach()
    return 0.5 * (beta**2 + head.bn_gamma**2 * v / (v + head.bn_eps))


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.5])
@torch.no_grad()
def test_bn_vae_expected_kl_lower_bound_holds_on_random_inputs(gamma):
    torch.manual_seed(0)
    d = 6
    head = GaussianHead(10, d, bn_gamma=gamma).train()
    with torch.no_grad():
        head.bn_shift.copy_(torch.randn(d) * 0.5)  # a learnt shift, so the beta term counts too
    p = standard_normal(d, (64,))
    for trial in range(20):
        h = torch.randn(64, 10) * (0.01 + trial)  # from near-constant to widely spread inputs
        q = head(h)
        kl = kl_per_dim(q, p)  # (B, D)
        bound = _bn_bound(head, h)
        mean_kl = kl.mean(0)
        assert torch.all(mean_kl >= bound - 1e-6), (trial, mean_kl, bound)
        # the slack is exactly the variance part 1/2 mean_b(sigma^2 - 1 - log sigma^2) >= 0
        var = q.base_dist.scale**2
        slack = 0.5 * (var - 1 - torch.log(var)).mean(0)
        assert torch.allclose(mean_kl - bound, slack, atol=1e-5)
        # the paper's form, E[KL] >= D gamma^2 / 2, once the batch variance dwarfs eps
        v = head.mu(h).detach().var(0, unbiased=False)
        if bool((v > 1e-2).all()):
            total = float(kl.detach().sum(-1).mean())
            assert total >= d * gamma**2 / 2 * float((v / (v + head.bn_eps)).min()) - 1e-5


@torch.no_grad()
def test_bn_vae_floor_vanishes_when_the_encoder_shrinks_below_eps():
    """The trap measured on PTB (posteriors.GaussianHead docstring): batch-normalised means keep
    the KL floor D gamma^2 / 2 only while the pre-normalisation variance v_d dwarfs eps; an
    encoder whose means vary by ~1e-8 across sentences (what the PTB matrix's BN run learnt)
    gets almost no floor, and its normalised means almost no spread (no active unit)."""
    torch.manual_seed(0)
    d, gamma = 8, 0.6
    head = GaussianHead(10, d, bn_gamma=gamma).train()
    p = standard_normal(d, (256,))
    h = torch.randn(256, 10)
    q = head(h)
    var = q.base_dist.scale**2
    healthy = float(
        kl_per_dim(q, p).sum(-1).mean() - 0.5 * (var - 1 - torch.log(var)).sum(-1).mean()
    )
    assert healthy == pytest.approx(d * gamma**2 / 2, rel=1e-3)  # the floor, at v_d >> eps
    head.mu.weight.mul_(1e-4 / head.mu.weight.abs().max())  # v_d ~ 1e-8 << eps = 1e-5
    head.mu.bias.zero_()
    assert float(head.mu(h).var(0).max()) < 1e-7
    floor = float(_bn_bound(head, h).sum())
    assert floor < 0.01 * d * gamma**2 / 2
    assert float(head(h).mean.var(0).max()) < 0.01  # below the AU threshold in every dimension


@torch.no_grad()
def test_bn_vae_small_eps_keeps_the_floor(tiny_model):
    """model.posterior_bn_eps: the same shrunken encoder (v_d ~ 1e-8) as the test above keeps
    the KL floor D gamma^2 / 2 and active units with eps = 1e-12, where the default 1e-5 loses
    both (the KL is measured, not the bound: the variance terms are zeroed by sigma = 1)."""
    torch.manual_seed(0)
    d, gamma = 8, 0.6
    p = standard_normal(d, (256,))
    h = torch.randn(256, 10)
    floors, spreads = {}, {}
    for eps in (1e-5, 1e-12):
        torch.manual_seed(1)
        head = GaussianHead(10, d, bn_gamma=gamma, bn_eps=eps).train()
        head.mu.weight.mul_(1e-4 / head.mu.weight.abs().max())  # v_d ~ 1e-8
        head.mu.bias.zero_()
        head.logvar.weight.zero_()
        head.logvar.bias.zero_()  # sigma = 1: the KL is the means' part alone
        q = head(h)
        floors[eps] = float(kl_per_dim(q, p).sum(-1).mean())
        spreads[eps] = float(q.mean.var(0).min())
    assert floors[1e-5] < 0.01 * d * gamma**2 / 2 and spreads[1e-5] < 0.01
    assert floors[1e-12] == pytest.approx(d * gamma**2 / 2, rel=1e-2)
    assert spreads[1e-12] > 0.01  # every dimension above the AU threshold
    # the config key reaches the model's head; eps must be positive
    model = tiny_model("lstm_vae", posterior_bn_gamma=gamma, posterior_bn_eps=1e-12)
    assert model.posterior_head.bn_eps == 1e-12
    assert tiny_model("lstm_vae", posterior_bn_gamma=gamma).posterior_head.bn_eps == 1e-5
    with pytest.raises(ConfigError, match="posterior_bn_eps"):
        load_config(None, ["model.posterior_bn_eps=0"])


@torch.no_grad()
def test_bn_vae_bound_holds_for_the_model_on_random_sentences(tiny_model, tokenizer):
    gamma = 0.6
    model = tiny_model("lstm_vae", posterior_bn_gamma=gamma).train()
    plain = tiny_model("lstm_vae").train()
    head = model.posterior_head
    for seed in range(5):
        batch = _random_batch(tokenizer, 32, seed)
        h = model.encoder(batch["input_ids"], batch["attention_mask"])
        kl = kl_per_dim(head(h), model.prior(batch)).mean(0)  # (D,)
        bound = _bn_bound(head, h)
        assert torch.all(kl >= bound - 1e-6)
        # an untrained encoder's means vary by ~1e-5 across a batch, the order of eps: the bound
        # is then a fraction v / (v + eps) of the paper's D gamma^2 / 2 (docs/remedies.md)
        assert float(bound.sum()) > 0.1 * model.latent_dim * gamma**2 / 2
        # without BN the same untrained encoder is well below it: the floor is BN's doing
        kl_plain = kl_per_dim(plain.posterior(batch), plain.prior(batch)).sum(-1).mean()
        assert float(kl_plain) < 0.5 * float(bound.sum())


def test_bn_vae_evaluation_does_not_depend_on_the_batch(tiny_model, tokenizer):
    """At evaluation the running statistics are used: a sentence's posterior is its own."""
    model = tiny_model("lstm_vae", posterior_bn_gamma=0.5).train()
    for seed in range(3):  # move the running statistics away from their (0, 1) start
        model.posterior(_random_batch(tokenizer, 16, seed))
    assert not torch.allclose(model.posterior_head.bn_running_mean, torch.zeros(4))
    model.eval()
    batch = _random_batch(tokenizer, 8, 9)
    one = {
        k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items() if v.dim() == 2
    }
    assert torch.allclose(model.posterior(batch).mean[:1], model.posterior(one).mean, atol=1e-5)
    # and a training batch of one sentence falls back to the running statistics instead of failing
    model.train()
    assert torch.isfinite(model.posterior(one).mean).all()


def test_bn_vae_parameters_saved_and_shift_learnable(tiny_model):
    model = tiny_model("lstm_vae", posterior_bn_gamma=0.5)
    keys = set(model.state_dict())
    assert {
        "posterior_head.bn_shift",
        "posterior_head.bn_running_mean",
        "posterior_head.bn_running_var",
    } <= keys
    assert model.posterior_head.bn_shift.requires_grad
    assert "posterior_head.bn_shift" not in tiny_model("lstm_vae").state_dict()


# --- delta-VAE minimum rate ----------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.01, 0.1, 0.5, 2.0, 8.0])
def test_min_rate_root_solves_the_kl_floor(delta):
    u = min_rate_max_logvar(delta, margin=0.0)
    s = math.exp(u)
    assert s < 1 and 0.5 * (s - 1 - u) == pytest.approx(delta, rel=1e-9)


@pytest.mark.parametrize("delta", [0.05, 0.5, 3.0])
@torch.no_grad()
def test_min_rate_every_dimension_kl_at_least_delta_on_random_inputs(delta):
    torch.manual_seed(0)
    d = 8
    head = GaussianHead(12, d, min_rate_delta=delta)
    p = standard_normal(d, (256,))
    for scale in (0.0, 0.1, 1.0, 10.0, 1000.0):  # zero input, small and saturating pre-activations
        h = torch.randn(256, 12) * scale
        kl = kl_per_dim(head(h), p)
        assert float(kl.min()) >= delta, (scale, float(kl.min()))
    # without the constraint the same head collapses below delta on small inputs
    free = GaussianHead(12, d)
    free.load_state_dict(head.state_dict())
    assert float(kl_per_dim(free(torch.randn(256, 12) * 0.01), p).min()) < delta


def test_min_rate_for_the_model_on_random_sentences_and_still_learnable(tiny_model, tokenizer):
    delta = 0.2
    model = tiny_model("lstm_vae", min_rate_delta=delta, posterior_bn_gamma=0.3).train()
    batch = _random_batch(tokenizer, 32, 0)
    q = model.posterior(batch)
    assert float(kl_per_dim(q, model.prior(batch)).detach().min()) >= delta
    q.stddev.sum().backward()  # the variance head still gets a gradient inside the bound
    assert model.posterior_head.logvar.weight.grad.abs().sum() > 0


def test_remedy_config_keys_are_checked():
    with pytest.raises(ConfigError, match="min_rate_delta"):
        load_config(None, ["model.min_rate_delta=12"])
    with pytest.raises(ConfigError, match="posterior_bn_gamma"):
        load_config(None, ["model.posterior_bn_gamma=-1"])
    with pytest.raises(ConfigError, match="no latent variable"):
        load_config(None, ["model.name=lstm_lm", "model.bow_weight=1"])
    with pytest.raises(ConfigError, match="train.aggressive"):
        load_config(None, ["model.name=lstm_lm", "train.aggressive=true"])


# --- bag-of-words loss ---------------------------------------------------------------------------


@torch.no_grad()
def test_bow_loss_is_a_masked_sum_of_log_softmax(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", bow_weight=1.0)
    z = torch.randn(tiny_batch["input_ids"].size(0), 4)
    got = model.bow_head.log_prob(z, tiny_batch["input_ids"], tiny_batch["attention_mask"])
    logp = torch.log_softmax(model.bow_head.net(z), -1)
    for b in range(z.size(0)):
        n = int(tiny_batch["attention_mask"][b].sum())
        expect = sum(float(logp[b, tok]) for tok in tiny_batch["input_ids"][b, :n])
        assert float(got[b]) == pytest.approx(expect, abs=1e-4)


def test_bow_gradient_reaches_the_latent_and_the_encoder(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", bow_weight=1.0).train()
    q = model.posterior(tiny_batch)
    z = q.rsample()
    z.retain_grad()
    bow = -model.bow_head.log_prob(z, tiny_batch["input_ids"], tiny_batch["attention_mask"])
    bow.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name in (
        "encoder.lstm.weight_ih_l0",
        "encoder.embed.weight",
        "posterior_head.mu.weight",
        "posterior_head.logvar.weight",
    ):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    assert model.decoder.lstm.weight_ih_l0.grad is None  # the BoW loss bypasses the decoder


def test_bow_is_reported_separately_and_weighted_into_the_loss(tiny_model, tiny_batch):
    model, plain_model = tiny_model("lstm_vae", bow_weight=0.5), tiny_model("lstm_vae")
    torch.manual_seed(1)
    out = elbo(model, tiny_batch, ObjectiveSettings(beta=0.3))
    torch.manual_seed(1)
    plain = elbo(plain_model, tiny_batch, ObjectiveSettings(beta=0.3))
    assert out["bow"].shape == out["rec"].shape and torch.all(out["bow"] > 0)
    assert torch.allclose(out["rec"], plain["rec"]) and torch.allclose(out["kl"], plain["kl"])
    expect = out["rec"].mean() + 0.3 * out["kl"].mean() + 0.5 * out["bow"].mean()
    assert torch.allclose(out["loss"], expect)
    assert plain["bow"] is None
    assert not any(k.startswith("bow_head") for k in tiny_model("lstm_vae").state_dict())


def test_bow_never_enters_evaluation(tiny_model, tokenizer):
    with_bow = tiny_model("lstm_vae", bow_weight=2.0)
    without = MODELS["lstm_vae"](
        load_config(
            None, ["model.embed_dim=16", "model.hidden_dim=16", "model.latent_dim=4"]
        ).model,
        tokenizer,
    ).eval()
    without.load_state_dict(
        {k: v for k, v in with_bow.state_dict().items() if not k.startswith("bow_head")}
    )
    ds = TextDataset(["the cat sat on the mat", "a dog ran", "big red cat sat"], tokenizer)
    a, b = evaluate(with_bow, ds, iw_samples=5), evaluate(without, ds, iw_samples=5)
    for key in ("rec", "kl", "elbo", "nll", "mi", "au"):
        assert a[key] == b[key], key
    assert "bow" not in a
