"""Flows: exact log-dets against autograd, inverses, Monte Carlo KL, the IW bound with flows, and
the flow-VRAE options (amortised regularisation, skip connection, KL target)."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from tests.conftest import make_sentences
from textvae.config import ConfigError, load_config
from textvae.data import TextDataset
from textvae.flows import FLOWS, AutoregressivePrior, FlowDistribution, PosteriorFlow
from textvae.metrics import EVAL_KEYS, evaluate
from textvae.objectives import (
    ObjectiveSettings,
    elbo,
    iw_bound,
    iw_log_weights,
    kl_per_dim,
    rsample_and_log_prob,
)
from textvae.train import train

KINDS = [k for k in FLOWS if k != "none"]
INVERTIBLE = ("radial", "iaf", "cclin_iaf")
D, C, B, S = 3, 5, 2, 2


def _gaussian(b=B, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64)
    scale = torch.rand(b, d, generator=g, dtype=torch.float64) + 0.5
    return Independent(Normal(loc, scale), 1)


def _flow(kind, steps=3, seed=0) -> FlowDistribution:
    """A float64 amortised flow over a Gaussian, from a random summary h (B, C)."""
    torch.manual_seed(seed)
    module = PosteriorFlow(kind, D, C, steps, hidden=8, components=2).double()
    h = 2.0 * torch.randn(B, C, dtype=torch.float64)  # scaled so the log-dets are far from 0
    return module(_gaussian(), h)


def _block_jacobians(fn, x):
    """Jacobian of fn: (S, B, D) -> (S, B, D): the (S*B) diagonal (D, D) blocks and the largest
    entry outside them (rows of different samples/sentences must not interact)."""
    n = x.shape[0] * x.shape[1]
    jac = torch.autograd.functional.jacobian(fn, x).reshape(n, D, n, D)
    blocks = torch.stack([jac[i, :, i, :] for i in range(n)])
    off = jac.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    return blocks, off.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_flow_log_det_matches_autograd_jacobian_in_float64(kind):
    """Every step's log|det J| (call_and_ladj and log_abs_det_jacobian) equals slogdet of its
    autograd Jacobian, per sample and sentence; and log q of the flow's own samples equals
    log q0(z0) - log|det| of the whole composition."""
    q = _flow(kind)
    x = torch.randn(S, B, D, dtype=torch.float64)
    for t in q.transforms:
        y, ladj = t.call_and_ladj(x)
        blocks, off = _block_jacobians(t, x)
        assert off == 0
        sign, logdet = torch.linalg.slogdet(blocks)
        assert torch.all(sign > 0)
        assert torch.allclose(logdet.view(S, B), ladj, atol=1e-10), kind
        assert torch.allclose(t.log_abs_det_jacobian(x, y), ladj, atol=1e-12)
        x = y.detach()
    z0 = q.base_dist.sample((S,))
    z, log_q = q.push(z0)

    def compose(v):
        for t in q.transforms:
            v = t(v)
        return v

    blocks, _ = _block_jacobians(compose, z0)
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(blocks)[1].view(S, B)
    assert torch.allclose(log_q, expected, atol=1e-10)
    assert torch.allclose(z, compose(z0), atol=1e-12)


def test_cclin_iaf_is_volume_preserving():
    q = _flow("cclin_iaf")
    z, log_q = q.rsample_and_log_prob((4,))
    x = q.base_dist.sample((4,))
    for t in q.transforms:
        assert torch.all(t.log_abs_det_jacobian(x, t(x)) == 0)
        lower = t.lower
        assert torch.allclose(lower, torch.tril(lower)) and torch.all(
            lower.diagonal(dim1=-2, dim2=-1) == 1
        )


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_round_trip_and_log_prob_of_any_point(kind):
    """Every flow now inverts (planar and sylvester by a checked root search), so log q(z_K|x)
    of any point is available; through the inverse it equals the density carried forward."""
    q = _flow(kind)
    assert q.has_inverse
    x = 3 * torch.randn(S, B, D, dtype=torch.float64)
    for t in q.transforms:
        assert torch.allclose(t.inv(t(x)), x, atol=1e-9), kind
    z, log_q = q.rsample_and_log_prob((5,))
    assert torch.allclose(q.log_prob(z), log_q, atol=1e-9)  # through the inverse, same density
    z2, log_q2 = rsample_and_log_prob(q, (2,))  # the one sampling path of ELBO, IW and MC KL
    assert z2.shape == (2, B, D) and torch.all(torch.isfinite(log_q2))


def test_autoregressive_prior_density_matches_change_of_variables():
    """log p(z) of the flow prior equals log N(eps) + log|d eps/dz| by autograd (eps = the
    one-pass map z -> eps), and sampling (D passes per step) inverts that map."""
    torch.manual_seed(0)
    prior = AutoregressivePrior(D, 3, hidden=8, context_dim=C).double()
    base = Independent(
        Normal(torch.zeros(B, D, dtype=torch.float64), torch.ones(B, D, dtype=torch.float64)), 1
    )
    p = prior(base, 2.0 * torch.randn(B, C, dtype=torch.float64))
    z = 2.0 * torch.randn(S, B, D, dtype=torch.float64)

    def to_eps(v):
        for t in reversed(p.transforms):
            v = t.inv(v)
        return v

    blocks, off = _block_jacobians(to_eps, z)
    assert off == 0
    expected = base.log_prob(to_eps(z)) + torch.linalg.slogdet(blocks)[1].view(S, B)
    assert torch.allclose(p.log_prob(z), expected, atol=1e-10)
    eps = base.sample((S,))
    sample = eps
    for t in p.transforms:
        sample = t(sample)
    assert torch.allclose(to_eps(sample), eps, atol=1e-9)
    assert p.sample((4,)).shape == (4, B, D)


def test_zero_step_flow_monte_carlo_kl_equals_the_closed_form(tiny_model, tiny_batch, tokenizer):
    """A flow with no step is the Gaussian: its Monte Carlo KL (no closed form is used for a
    flow distribution) matches the closed form within Monte Carlo error, and evaluate records
    the sample count."""
    gauss = tiny_model("lstm_vae")
    flowed = tiny_model("lstm_vae", posterior_flow="planar", posterior_flow_steps=0)
    q, p = flowed.posterior(tiny_batch), flowed.prior(tiny_batch)
    assert isinstance(q, FlowDistribution) and kl_per_dim(q, p) is None
    closed = kl_per_dim(gauss.posterior(tiny_batch), p).sum(-1)  # same weights, same q0
    torch.manual_seed(0)
    with torch.no_grad():
        z, log_q = q.rsample_and_log_prob((20000,))
        terms = log_q - p.log_prob(z)  # (S, B)
    stderr = terms.std(0) / math.sqrt(terms.size(0))
    assert torch.all((terms.mean(0) - closed).abs() < 4 * stderr + 1e-6)
    ds = TextDataset(make_sentences(12, seed=3), tokenizer)
    mc = evaluate(flowed, ds, iw_samples=400, batch_size=6)
    exact = evaluate(gauss, ds, iw_samples=400, batch_size=6)
    assert mc["kl_samples"] == 400 and exact["kl_samples"] is None
    assert mc["kl_per_dim"] is None and len(exact["kl_per_dim"]) == 4
    assert mc["kl"] == pytest.approx(exact["kl"], abs=0.05)
    assert mc["mi"] == pytest.approx(exact["mi"], abs=0.05)  # both of the same q0, other draws


def test_cclin_iaf_monte_carlo_kl_matches_the_full_covariance_closed_form():
    """z = L z0 with q0 = N(mu, diag s^2) is N(L mu, L diag(s^2) L^T): the MC KL of the flow
    matches that Gaussian's closed-form KL to N(0, I)."""
    q = _flow("cclin_iaf", steps=2)
    lower = q.transforms[1].lower @ q.transforms[0].lower
    normal = q.base_dist.base_dist
    cov = lower @ torch.diag_embed(normal.scale**2) @ lower.transpose(-1, -2)
    full = MultivariateNormal((lower @ normal.loc.unsqueeze(-1)).squeeze(-1), cov)
    prior = MultivariateNormal(
        torch.zeros(B, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    )
    closed = kl_divergence(full, prior)
    torch.manual_seed(0)
    z, log_q = q.rsample_and_log_prob((40000,))
    terms = log_q - prior.log_prob(z)
    assert torch.allclose(log_q, full.log_prob(z), atol=1e-9)  # the density itself is exact
    stderr = terms.std(0) / math.sqrt(terms.size(0))
    assert torch.all((terms.mean(0) - closed).abs() < 4 * stderr)


@pytest.mark.parametrize("kind", ["planar", "iaf", "sylvester"])
def test_iw_bound_with_one_sample_is_the_elbo_on_the_same_flow_sample(kind, tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", posterior_flow=kind, posterior_flow_steps=2, flow_hidden=8)
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    torch.manual_seed(1)
    out = elbo(model, tiny_batch)
    torch.manual_seed(1)
    z, log_q = rsample_and_log_prob(q, (1,))
    log_w, ll = iw_log_weights(model, tiny_batch, q, p, z, log_q)
    assert torch.allclose(iw_bound(log_w), -(out["rec"] + out["kl"]), atol=1e-5)
    assert out["kl_per_dim"] is None


@torch.no_grad()
def test_iw_bound_with_a_flow_grows_with_k(tiny_model, tiny_batch):
    """E[log mean_K w] is non-decreasing in K, with log q of the planar flow's own samples."""
    model = tiny_model("lstm_vae", posterior_flow="planar", posterior_flow_steps=2)
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    torch.manual_seed(0)
    bounds = []
    for k in (1, 10, 100):
        reps = []
        for _ in range(20):
            z, log_q = rsample_and_log_prob(q, (k,))
            reps.append(iw_bound(iw_log_weights(model, tiny_batch, q, p, z, log_q)[0]).mean())
        bounds.append(float(torch.stack(reps).mean()))
    assert bounds[0] < bounds[1] < bounds[2]


@pytest.mark.parametrize("kind", KINDS)
def test_every_flow_trains_evaluates_and_generates(kind, tiny_model, tiny_batch, tokenizer):
    from textvae.generate import reconstruct, sample_prior

    model = tiny_model(
        "lstm_vae",
        posterior_flow=kind,
        posterior_flow_steps=2,
        flow_hidden=8,
        prior_flow="iaf",
        prior_flow_steps=1,
    )
    q = model.posterior(tiny_batch)
    b = tiny_batch["input_ids"].size(0)
    assert q.batch_shape == (b,) and q.event_shape == (4,) and q.sample((3,)).shape == (3, b, 4)
    model.train()
    out = model(tiny_batch, ObjectiveSettings(beta=1.0))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.posterior_flow.parameters())
    assert all(p.grad is not None for p in model.prior_flow.parameters())
    model.eval()
    r = evaluate(
        model, TextDataset(make_sentences(10, seed=4), tokenizer), iw_samples=8, batch_size=5
    )
    assert tuple(r) == EVAL_KEYS and r["kl_samples"] == 8 and r["kl_per_dim"] is None
    assert all(math.isfinite(r[k]) for k in ("rec", "kl", "nll", "mi", "mi_batch"))
    assert "flow posterior" in r["mi_estimator"]
    assert len(sample_prior(model, 2)) == 2  # the prior flow samples through its inverse
    assert len(reconstruct(model, ["the cat sat"])) == 1


def test_flow_mean_is_a_function_of_the_sentence_alone(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", posterior_flow="iaf", posterior_flow_steps=2, flow_hidden=8)
    with torch.no_grad():
        together = model.posterior(tiny_batch).mean
        alone = model.posterior({k: v[2:3] for k, v in tiny_batch.items()}).mean
        again = model.posterior(tiny_batch).mean
    assert torch.allclose(together[2:3], alone, atol=1e-6) and torch.equal(together, again)


def test_kl_target_penalty_and_free_bits_without_closed_form(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", posterior_flow="planar", posterior_flow_steps=1)
    torch.manual_seed(0)
    plain = elbo(model, tiny_batch, ObjectiveSettings(beta=0.5))
    torch.manual_seed(0)
    held = elbo(model, tiny_batch, ObjectiveSettings(beta=0.5, kl_target=7.0, kl_target_weight=3.0))
    kl = plain["kl"].mean()
    assert torch.allclose(held["loss"], plain["loss"] + 3.0 * (kl - 7.0).abs())
    torch.manual_seed(0)
    floored = elbo(
        model, tiny_batch, ObjectiveSettings(beta=1.0, free_bits=50.0)
    )  # per_dim: D * lambda = 200
    assert torch.allclose(floored["loss"], plain["rec"].mean() + 200.0)


def test_embed_noise_acts_in_training_only(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", embed_noise=0.5)
    ids, mask = tiny_batch["input_ids"], tiny_batch["attention_mask"]
    clean = tiny_model("lstm_vae").encoder(ids, mask)
    assert torch.equal(model.encoder(ids, mask), clean)  # eval mode: no noise, same weights
    model.train()
    assert not torch.allclose(model.encoder(ids, mask), clean)


def test_skip_connection_alone_carries_z(tiny_model, tiny_batch):
    """With no initial state and no concatenation, z reaches the decoder only through the skip."""
    off = tiny_model("lstm_vae", z_init_state=False, z_every_step=False)
    on = tiny_model("lstm_vae", z_init_state=False, z_every_step=False, z_skip=True)
    z = torch.randn(2, tiny_batch["input_ids"].size(0), 4)
    ll_off = off.log_likelihood(tiny_batch, z)
    assert torch.allclose(ll_off[0], ll_off[1])
    ll_on = on.log_likelihood(tiny_batch, z)
    assert not torch.allclose(ll_on[0], ll_on[1])
    assert on.decoder.skip.weight.shape == (16, 4)


def test_flow_options_are_validated():
    with pytest.raises(ConfigError, match="model.posterior_flow='maf'"):
        load_config(None, ["model.posterior_flow=maf"])
    with pytest.raises(ConfigError, match="model.posterior_flow"):
        load_config(None, ["model.name=lstm_lm", "model.posterior_flow=iaf"])
    with pytest.raises(ConfigError, match="model.z_skip"):
        load_config(None, ["model.name=lstm_lm", "model.z_skip=true"])
    with pytest.raises(ConfigError, match="kl.target"):
        load_config(None, ["kl.target=-1"])


def test_a_model_without_flow_options_is_unchanged(tiny_model):
    """Flow modules of kind none hold no parameters: existing checkpoints keep their keys."""
    keys = set(tiny_model("lstm_vae").state_dict())
    assert not any(k.startswith(("posterior_flow", "prior_flow", "decoder.skip")) for k in keys)


def test_flow_presets_share_their_flow_options():
    """The CPU and full-size flow-VRAE presets (and the dialogue preset) differ in size only."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    keys = (
        "posterior_flow",
        "posterior_flow_steps",
        "flow_hidden",
        "prior_flow",
        "prior_flow_steps",
        "embed_noise",
        "z_skip",
    )
    full, cpu = (
        load_config(root / "ptb/flow-vrae.yaml"),
        load_config(root / "ptb/flow-vrae-cpu.yaml"),
    )
    dialogue = load_config(root / "dailydialog/cvrae-cpu.yaml")
    for key in keys:
        assert (
            getattr(full.model, key) == getattr(cpu.model, key) == getattr(dialogue.model, key)
        ), key
    assert full.model.hidden_dim == 1024 and cpu.model.hidden_dim == 256
    assert dialogue.model.name == "cvrae" and dialogue.data.train_split == "test"
    assert dialogue.data.valid_split == dialogue.data.test_split == "validation"


@pytest.mark.parametrize("name", ["lstm_vae", "cvrae"])
def test_flows_run_under_bf16_autocast(name, tiny_model, tiny_batch, tokenizer):
    """Flow parameters and contexts computed under bf16 autocast are kept in float32, so the
    flow can be sampled later outside autocast (evaluate, generation)."""
    model = tiny_model(
        name,
        posterior_flow="iaf",
        posterior_flow_steps=2,
        flow_hidden=8,
        prior_flow="iaf",
        prior_flow_steps=1,
    )
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tiny_batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    contexts = make_sentences(8, seed=2) if model.conditional else None
    ds = TextDataset(make_sentences(8, seed=1), tokenizer, contexts=contexts)
    r = evaluate(model, ds, iw_samples=4, batch_size=4, precision="bf16")
    assert math.isfinite(r["nll"]) and r["kl_samples"] == 4


def test_report_of_a_flow_run_has_no_per_dimension_kl(tiny_config, tmp_path):
    from textvae.report import write_report

    run = train(
        tiny_config(
            **{
                "train.max_steps": 4,
                "model.posterior_flow": "planar",
                "model.posterior_flow_steps": 2,
            }
        ),
        tmp_path / "flow",
    )
    folder = write_report(run, max_sentences=20, n_examples=2)
    md = (folder / "report.md").read_text()
    assert "**Latent status**" in md and "Reconstructions" in md
    assert (folder / "kl_per_dim.png").read_bytes()[:4] == b"\x89PNG"


# --- issue 15, items 3-4: the MI of z_K, inverses of other sentences' points --------------------


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_takes_every_point_under_every_sentence(kind):
    """A value (M, 1, D) broadcasts against the batch (B,) to (M, B): the aggregate posterior's
    shape (the ccLinIAF inverse failed to broadcast it)."""
    q = _flow(kind)
    z = q.sample((4,)).reshape(8, 1, D)  # other sentences' points
    dense = q.log_prob(z)
    assert dense.shape == (8, B)
    assert torch.allclose(dense, q.log_prob(z.expand(8, B, D)), atol=1e-9)


def test_iaf_inverse_stays_finite_far_in_the_tails():
    """Far from the posterior the inverse's magnitude explodes (the scale of each dimension grows
    like exp(-s) of the previous); the old D full passes overflowed unfinished dimensions and
    multiplied inf by the MADE's zero masks: NaN. Now: no NaN, exact where representable, and
    log q = -inf where the inverse leaves float range."""
    torch.manual_seed(0)
    module = PosteriorFlow("iaf", 8, C, 2, hidden=16)
    q = module(Independent(Normal(torch.zeros(3, 8), torch.ones(3, 8)), 1), torch.randn(3, C))
    y = 100 * torch.randn(5, 3, 8)
    t = q.transforms[0]
    x = t.inv(y)
    assert not torch.isnan(x).any()
    ok = torch.isfinite(x).all(-1) & (x.abs() < 1e3).all(-1)
    assert ok.any() and not ok.all()  # some points far enough to overflow, some not
    fx = t(torch.where(ok.unsqueeze(-1), x, 0.0))
    assert torch.allclose(fx[ok], y[ok], rtol=1e-4, atol=1e-3)
    log_q = q.log_prob(y)
    assert not torch.isnan(log_q).any() and (log_q == float("-inf")).any()


def test_flow_mi_equals_the_gaussian_mi_of_z_k():
    """A ccLinIAF flow is linear: z_K = L z_0 ~ N(L mu, L Sigma L^T) exactly. The flow's
    aggregate-posterior MI (through its inverse) equals the MI computed from those full-covariance
    Gaussians on the same samples, and differs from the MI of z_0."""
    from textvae.metrics import aggregate_mi, distribution_mi

    torch.manual_seed(0)
    n_batches, flows, gaussians, zs = 3, [], [], []
    for i in range(n_batches):
        module = PosteriorFlow("cclin_iaf", D, C, 2, components=2).double()
        base = _gaussian(seed=i)
        q = module(base, 3.0 * torch.randn(B, C, dtype=torch.float64))
        lower = q.transforms[1].lower @ q.transforms[0].lower  # (B, D, D)
        mean = (lower @ base.mean.unsqueeze(-1)).squeeze(-1)
        cov = lower @ torch.diag_embed(base.variance) @ lower.transpose(-1, -2)
        flows.append(q)
        gaussians.append(MultivariateNormal(mean, cov))
        zs.append(q.sample())
    with torch.no_grad():
        mi_flow = distribution_mi(flows, zs)
        assert mi_flow == pytest.approx(distribution_mi(gaussians, zs), abs=1e-9)
    bases = [q.base_dist for q in flows]
    mi_z0 = aggregate_mi(
        torch.cat([b.mean for b in bases]),
        torch.cat([b.variance.log() for b in bases]),
        torch.cat([b.sample() for b in bases]),
    )
    assert abs(mi_flow - mi_z0) > 0.05


@pytest.mark.parametrize(
    ("kind", "scale"), [("planar", 30.0), ("iaf", 150.0), ("cclin_iaf", 30.0), ("sylvester", 30.0)]
)
def test_evaluate_reports_the_mi_of_z_k_not_z_0(tokenizer, kind, scale):
    """The base q0 is N(0, I) for every sentence (heads zeroed), so I(x; z_0) = 0 exactly (what
    evaluate reported before: identical Gaussians give 0.0), while the flow, computed from the
    sentence (its parameters scaled up), moves z_K: I(x; z_K) > 0 (radial flows, which only
    stretch around a centre, give too small a value at this size to tell from noise)."""
    from tests.conftest import make_sentences as sentences
    from textvae.models import MODELS

    cfg = load_config(
        None,
        [
            "model.embed_dim=16",
            "model.hidden_dim=16",
            "model.latent_dim=4",
            f"model.posterior_flow={kind}",
            "model.posterior_flow_steps=2",
            "model.flow_hidden=16",
        ],
    )
    torch.manual_seed(0)
    model = MODELS["lstm_vae"](cfg.model, tokenizer).eval()
    with torch.no_grad():
        for p in model.posterior_head.parameters():
            p.zero_()
        if kind == "iaf":  # the shift m of each step, from the sentence
            for made in model.posterior_flow.mades:
                made.ctx_out.weight[:4].mul_(scale)
        else:
            for p in model.posterior_flow.parameters():
                p.mul_(scale)
    r = evaluate(model, TextDataset(sentences(24, seed=3), tokenizer), iw_samples=2, batch_size=8)
    assert "z_K" in r["mi_estimator"]
    assert r["mi"] > 0.1 and r["mi_batch"] > 0.1, (kind, r["mi"])  # 0.30 to 0.45 here
    assert r["mi"] <= math.log(24) + 1e-6


def test_flow_mi_is_null_with_the_reason_when_the_inverse_fails(tokenizer, monkeypatch):
    import textvae.flows
    from textvae.models import MODELS

    cfg = load_config(
        None,
        [
            "model.embed_dim=16",
            "model.hidden_dim=16",
            "model.latent_dim=4",
            "model.posterior_flow=sylvester",
            "model.posterior_flow_steps=2",
        ],
    )
    model = MODELS["lstm_vae"](cfg.model, tokenizer).eval()
    monkeypatch.setattr(textvae.flows, "INVERSE_TOL", -1.0)  # no residual is accepted
    r = evaluate(model, TextDataset(make_sentences(6, seed=3), tokenizer), iw_samples=2)
    assert r["mi"] is None and r["mi_batch"] is None
    assert (
        "not computed" in r["mi_estimator"]
        and "SylvesterTransform inverse residual" in r["mi_estimator"]
    )
    assert r["nll"] is not None and r["au"] is not None


def test_flow_mi_over_the_first_sentences_when_capped(tokenizer):
    """flow_mi_sentences (and training's validation, iw_samples=0) bounds the N^2 inverses; the
    estimator text records how many sentences it used."""
    from textvae.metrics import FLOW_MI_VALIDATION_SENTENCES
    from textvae.models import MODELS

    cfg = load_config(
        None,
        [
            "model.embed_dim=16",
            "model.hidden_dim=16",
            "model.latent_dim=4",
            "model.posterior_flow=radial",
            "model.posterior_flow_steps=1",
        ],
    )
    model = MODELS["lstm_vae"](cfg.model, tokenizer).eval()
    ds = TextDataset(make_sentences(10, seed=3), tokenizer)
    r = evaluate(model, ds, iw_samples=2, flow_mi_sentences=6)
    assert "over the first 6 of 10 sentences" in r["mi_estimator"] and r["mi"] <= math.log(6) + 1e-6
    assert "over the first" not in evaluate(model, ds, iw_samples=2)["mi_estimator"]
    assert FLOW_MI_VALIDATION_SENTENCES >= 100


def test_flow_mi_default_cap_at_evaluation_and_zero_means_all(tokenizer, monkeypatch):
    """evaluate's default bounds the N^2 inverses (FLOW_MI_EVAL_SENTENCES: all 3,761 PTB test
    sentences would take hours with an IAF on a CPU); flow_mi_sentences=0 takes every sentence."""
    from textvae import metrics
    from textvae.models import MODELS

    cfg = load_config(
        None,
        [
            "model.embed_dim=16",
            "model.hidden_dim=16",
            "model.latent_dim=4",
            "model.posterior_flow=radial",
            "model.posterior_flow_steps=1",
        ],
    )
    model = MODELS["lstm_vae"](cfg.model, tokenizer).eval()
    ds = TextDataset(make_sentences(10, seed=3), tokenizer)
    monkeypatch.setattr(metrics, "FLOW_MI_EVAL_SENTENCES", 4)
    assert "over the first 4 of 10 sentences" in evaluate(model, ds, iw_samples=2)["mi_estimator"]
    assert (
        "over the first"
        not in evaluate(model, ds, iw_samples=2, flow_mi_sentences=0)["mi_estimator"]
    )
