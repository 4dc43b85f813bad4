"""The estimators ``metrics.evaluate`` is composed of, each on its own, and the per-family
statistics chosen by the posterior's type (as the KL is)."""

import math

import pytest
import torch
from torch.distributions import Distribution, Independent, kl_divergence

from tests.conftest import make_sentences
from textvae import metrics
from textvae.data import TextDataset
from textvae.flows import FlowDistribution
from textvae.metrics import (
    AU_DELTA_PAPER,
    FLOW_STATISTICS,
    GAUSSIAN_STATISTICS,
    LAYERWISE_STATISTICS,
    MI_ESTIMATOR,
    POSTERIOR_STATISTICS,
    EvaluatedSet,
    PosteriorStatistics,
    aggregate_mi,
    batch_mi,
    distribution_mi,
    evaluate,
    posterior_statistics,
)
from textvae.models import MODELS
from textvae.objectives import KL, iw_log_weights, kl_estimator, rsample_and_log_prob


def _batch(tokenizer, n=6, seed=5, labels=None):
    ds = TextDataset(make_sentences(n, seed=seed), tokenizer, labels)
    return ds.collate(list(range(n)))


def _run(iw_samples=4, chunk_tokens=16384, seed=0):
    return metrics._Run(torch.device("cpu"), "fp32", seed, iw_samples, chunk_tokens)


# --- per batch ------------------------------------------------------------------------------


def test_exact_likelihood_is_the_models_own(tiny_model, tokenizer):
    model, batch = tiny_model("lstm_lm"), _batch(tokenizer)
    r = metrics._exact_likelihood(model, batch, "fp32")
    with torch.no_grad():
        want = -model.log_likelihood(batch, None)[0]
    assert torch.equal(r["nll"], want) and torch.equal(r["rec"], want)


def test_closed_form_kl_sums_the_dimensions_over_the_batch(tiny_model, tokenizer):
    model, batch = tiny_model(), _batch(tokenizer)
    with torch.no_grad():
        q, p = model.posterior_and_prior(batch)
        r = metrics._closed_form_kl(q, p, kl_estimator(q, p))
    per_dim = kl_divergence(q.base_dist, p.base_dist)  # (B, D)
    assert r["closed_form"] and r["bound_valid"]
    assert torch.allclose(r["kl"], per_dim.sum(-1)) and torch.allclose(r["kl_dims"], per_dim.sum(0))
    flow = tiny_model(posterior_flow="iaf", posterior_flow_steps=2)
    with torch.no_grad():
        q, p = flow.posterior_and_prior(batch)
    assert metrics._closed_form_kl(q, p, kl_estimator(q, p)) == {"closed_form": False}


def test_sampled_kl_is_the_mean_over_samples_per_sentence_or_per_dimension():
    torch.manual_seed(0)
    totals = [torch.randn(3, 5), torch.randn(2, 5)]  # two chunks of (s, B) Monte Carlo values
    mc = metrics._SampledKL(5, torch.device("cpu"))
    for t in totals:
        mc.add(KL(t, None))
    r = mc.result(5)
    assert torch.allclose(r["kl"], torch.cat(totals).mean(0)) and "kl_dims" not in r
    dims = [torch.rand(3, 5, 2, 4), torch.rand(2, 5, 2, 4)]  # layer-wise (s, B, L, D)
    lw = metrics._SampledKL(5, torch.device("cpu"))
    for d in dims:
        lw.add(KL(d.flatten(-2).sum(-1) * 0.5, d, 0.5, False))
    r = lw.result(5)
    mean = torch.cat(dims).mean(0)  # (B, L, D)
    assert torch.allclose(r["kl"], 0.5 * mean.flatten(1).sum(-1))  # scaled by log_prob_scale
    assert torch.allclose(r["kl_dims"], mean.sum(0)) and r["bound_valid"] is False


def test_importance_sampled_with_one_sample_is_the_elbo_on_that_sample(tiny_model, tokenizer):
    model, batch = tiny_model(), _batch(tokenizer)
    with torch.no_grad():
        q, p = model.posterior_and_prior(batch)
        torch.manual_seed(1)
        r = metrics._importance_sampled(model, batch, q, p, kl_estimator(q, p), _run(1))
        torch.manual_seed(1)
        z, log_q = rsample_and_log_prob(q, (1,))
        log_w, ll = iw_log_weights(model, batch, q, p, z, log_q)
    assert torch.allclose(r["rec"], -ll[0]) and torch.allclose(r["nll"], -log_w[0])
    assert set(r) == {"rec", "nll"}  # the closed-form KL is not sampled


def test_importance_sampled_in_chunks_of_one_sample(tiny_model, tokenizer):
    """With chunk_tokens=1 every chunk is one sample: rec, nll and the Monte Carlo KL of a flow
    posterior are the per-sample values drawn in that order, combined; iw_samples=0 (training's
    validation) gives one sample and no nll."""
    model, batch = tiny_model(posterior_flow="iaf", posterior_flow_steps=2), _batch(tokenizer)
    with torch.no_grad():
        q, p = model.posterior_and_prior(batch)
        est = kl_estimator(q, p)
        torch.manual_seed(2)
        r = metrics._importance_sampled(model, batch, q, p, est, _run(3, chunk_tokens=1))
        torch.manual_seed(2)
        log_w, ll, kl = [], [], []
        for _ in range(3):
            z, log_q = rsample_and_log_prob(q, (1,))
            lw, l1 = iw_log_weights(model, batch, q, p, z, log_q)
            log_w.append(lw)
            ll.append(l1)
            kl.append(log_q - p.log_prob(z))
        val = metrics._importance_sampled(model, batch, q, p, est, _run(0))
    log_w, ll, kl = torch.cat(log_w), torch.cat(ll), torch.cat(kl)  # (3, B)
    assert torch.allclose(r["rec"], -ll.mean(0)) and torch.allclose(r["kl"], kl.mean(0))
    assert torch.allclose(r["nll"], -(torch.logsumexp(log_w, 0) - math.log(3)))
    assert (r["nll"] <= r["rec"] + r["kl"] + 1e-4).all()  # the IW bound beats the ELBO
    assert set(val) == {"rec", "kl", "bound_valid"}


def test_classifier_counts_only_labelled_sentences(tiny_model, tokenizer):
    labels = [0, 1, -1, 1, 0, -1]
    batch = _batch(tokenizer, labels=labels)
    model = tiny_model(classifier_weight=1.0)
    mean = torch.randn(6, 4)
    r = metrics._classifier_counts(model, mean, batch)
    with torch.no_grad():
        pred = model.classifier(mean).argmax(-1)
    right = sum(int(pred[i]) == y for i, y in enumerate(labels) if y >= 0)
    assert r == {"cls_correct": right, "cls_n": 4}
    assert metrics._classifier_counts(tiny_model(), mean, batch) == {}  # no classifier
    assert metrics._classifier_counts(model, mean, _batch(tokenizer)) == {}  # no labels


@torch.no_grad()
def test_score_batch_is_repeatable_and_leaves_the_callers_rng(tiny_model, tokenizer):
    model, batch = tiny_model(), _batch(tokenizer)
    torch.manual_seed(7)
    a = metrics._score_batch(model, batch, 3, _run())
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1))  # the batch sampled under its own seed
    b = metrics._score_batch(model, batch, 3, _run())
    assert a["family"] is GAUSSIAN_STATISTICS and torch.equal(a["nll"], b["nll"])
    assert torch.equal(a["mi"]["z"], b["mi"]["z"]) and torch.equal(a["gap"], b["gap"])
    assert set(a) >= {"rec", "kl", "kl_dims", "mean", "summary", "gap", "closed_form"}
    c = metrics._score_batch(model, batch, 4, _run())  # another batch index: other samples
    assert not torch.equal(a["mi"]["z"], c["mi"]["z"])


# --- over the whole set ----------------------------------------------------------------------


def test_likelihood_fields_put_the_values_back_in_dataset_order(tokenizer):
    texts = ["a b c", "a", "a b"]
    ds = TextDataset(texts, tokenizer)
    records = [  # batches in length order: sentences 0, 2 then 1
        {"indices": [0, 2], "rec": torch.tensor([3.0, 2.0]), "nll": torch.tensor([2.5, 1.5])},
        {"indices": [1], "rec": torch.tensor([1.0]), "nll": torch.tensor([0.5])},
    ]
    r = metrics._likelihood_fields(records, ds)
    assert r["nll_per_sentence"] == [2.5, 0.5, 1.5] and r["sentence_index"] == [0, 1, 2]
    assert r["n_words_per_sentence"] == [4, 2, 3] and r["n_words"] == 9 == r["n_tokens"]
    assert r["nll"] == pytest.approx(1.5) and r["rec"] == pytest.approx(2.0)
    assert r["nll_stderr"] == pytest.approx(1.0 / math.sqrt(3))
    assert r["ppl_token"] == pytest.approx(math.exp(4.5 / 9))
    no_iw = [{k: v for k, v in rec.items() if k != "nll"} for rec in records]
    assert set(metrics._likelihood_fields(no_iw, ds)) == {
        "n_sentences",
        "n_tokens",
        "n_words",
        "rec",
    }


def test_kl_fields_per_dimension_per_layer_and_a_mix_refused():
    closed = [
        {"closed_form": True, "kl": torch.tensor([1.0, 2.0]), "kl_dims": torch.tensor([1.0, 2.0])},
        {"closed_form": True, "kl": torch.tensor([3.0]), "kl_dims": torch.tensor([2.0, 1.0])},
    ]
    r = metrics._kl_fields(closed, 3, 10, per_layer=False)
    assert r == {"kl": 2.0, "kl_samples": None, "kl_per_dim": [1.0, 1.0]}
    layers = [{"closed_form": False, "kl": torch.tensor([3.0, 3.0]), "kl_dims": torch.ones(2, 3)}]
    r = metrics._kl_fields(layers, 2, 0, per_layer=True)
    assert r["kl_samples"] == 1 and r["kl_per_layer"] == [1.5, 1.5]
    mc = [{"closed_form": False, "kl": torch.tensor([0.5])}]
    assert metrics._kl_fields(mc, 1, 7, per_layer=False)["kl_per_dim"] is None
    with pytest.raises(ValueError, match="closed form for some batches only"):
        metrics._kl_fields(closed + mc, 4, 7, per_layer=False)


def test_mi_fields_weight_the_batch_values_by_batch_size():
    family = PosteriorStatistics(
        "stub", lambda q, z: {}, lambda kept, e: (1.0, [(2.0, 1), (5.0, 3)], "x")
    )
    r = metrics._mi_fields([{"mi": {}}], family, None)
    assert r == {"mi": 1.0, "mi_batch": pytest.approx(17 / 4), "mi_estimator": "x"}
    none = PosteriorStatistics("stub", lambda q, z: {}, lambda kept, e: (None, [], "why"))
    assert metrics._mi_fields([{"mi": {}}], none, None)["mi_batch"] is None


def test_au_fields_count_per_threshold_and_per_layer():
    torch.manual_seed(0)
    means = torch.zeros(400, 2, 3)  # (N, L, D)
    means[:, 0, 0] = torch.randn(400)  # variance ~1: active at 0.01 and 0.2
    means[:, 1, 1] = 0.3 * torch.randn(400)  # ~0.09: active at 0.01 only
    r = metrics._au_fields([means[:150], means[150:]], 0.01, per_layer=True)
    assert r["au"] == 2 and r["au_by_delta"] == {"0.01": 2, str(AU_DELTA_PAPER): 1}
    assert r["au_per_layer"] == {"0.01": [1, 1], "0.2": [1, 0]} and r["au_layer_mean"] == 0.5
    flat = metrics._au_fields([means[:, 0]], 0.01, per_layer=False)
    assert flat["au"] == 1 and "au_per_layer" not in flat


def test_classifier_and_dispersion_fields(tiny_model):
    assert metrics._classifier_fields([{}, {}]) == {}
    r = metrics._classifier_fields([{"cls_correct": 1, "cls_n": 2}, {"cls_correct": 2, "cls_n": 2}])
    assert r == {"classifier_accuracy": 0.75, "classifier_n": 4}
    reason = metrics._dispersion_field([{}], tiny_model("della"))
    assert reason["total_variance"] is None and "DELLA has no single encoder" in reason["reason"]
    h = torch.randn(5, 3)
    d = metrics._dispersion_field([{"summary": h[:2]}, {"summary": h[2:]}], tiny_model())
    assert d["n"] == 5 and d["total_variance"] == pytest.approx(
        float(h.double().var(0, unbiased=False).sum())
    )


# --- the per-family statistics, chosen by the posterior's type ------------------------------


@pytest.mark.parametrize(
    ("name", "extra", "family"),
    [
        ("lstm_vae", {}, GAUSSIAN_STATISTICS),
        ("lstm_vae", {"prior_flow": "iaf", "prior_flow_steps": 1}, GAUSSIAN_STATISTICS),
        ("lstm_vae", {"posterior_flow": "planar", "posterior_flow_steps": 1}, FLOW_STATISTICS),
        ("t5_vae", {}, GAUSSIAN_STATISTICS),
        ("cvrae", {}, GAUSSIAN_STATISTICS),
        ("della", {}, LAYERWISE_STATISTICS),
        ("della_cvae", {}, LAYERWISE_STATISTICS),
    ],
)
def test_the_statistics_are_chosen_by_the_posteriors_type(
    name, extra, family, tiny_model, tiny_batch
):
    with torch.no_grad():
        q = tiny_model(name, **extra).posterior(tiny_batch)
    assert posterior_statistics(q) is family


def test_a_subclass_uses_its_parents_statistics(tiny_model, tiny_batch):
    q = tiny_model("lstm_vae", posterior_flow="planar").posterior(tiny_batch)

    class MyFlow(FlowDistribution):
        pass

    class MyGaussian(Independent):
        pass

    assert posterior_statistics(MyFlow(q.base_dist, list(q.transforms))) is FLOW_STATISTICS
    base = q.base_dist
    assert posterior_statistics(MyGaussian(base.base_dist, 1)) is GAUSSIAN_STATISTICS


def test_an_unregistered_posterior_type_is_a_clear_error(tiny_model, tokenizer, monkeypatch):
    class Mystery(Distribution):
        arg_constraints: dict = {}

    with pytest.raises(NotImplementedError, match="posterior Mystery: register its type"):
        posterior_statistics(Mystery(validate_args=False))
    # evaluate asks the registry: without an entry for Independent a Gaussian VAE is refused
    monkeypatch.delitem(POSTERIOR_STATISTICS, Independent)
    ds = TextDataset(make_sentences(4, seed=1), tokenizer)
    with pytest.raises(NotImplementedError, match="posterior Independent.*POSTERIOR_STATISTICS"):
        evaluate(tiny_model(), ds, iw_samples=2)


def test_evaluate_reads_the_registered_entry(tiny_model, tokenizer, monkeypatch):
    """A registered entry is what evaluate uses: a spy keeps one number per batch and reports
    their sum as the MI."""
    seen = []

    def keep(q, z):
        seen.append(type(q).__name__)
        return {"b": z.size(0)}

    def set_mi(kept, evaluated: EvaluatedSet):
        return float(sum(k["b"] for k in kept)), [], f"spy over {len(evaluated.scored)}"

    monkeypatch.setitem(POSTERIOR_STATISTICS, Independent, PosteriorStatistics("spy", keep, set_mi))
    r = evaluate(
        tiny_model(), TextDataset(make_sentences(7, seed=2), tokenizer), iw_samples=2, batch_size=3
    )
    assert seen == ["Independent"] * 3 and r["mi"] == 7.0 and r["mi_estimator"] == "spy over 7"
    assert r["mi_batch"] is None


def test_gaussian_and_layerwise_statistics_are_the_mi_estimators(tiny_model, tiny_batch):
    torch.manual_seed(0)
    with torch.no_grad():
        q = tiny_model().posterior(tiny_batch)
        z = q.sample()
        kept = GAUSSIAN_STATISTICS.keep(q, z)
        mi, per_batch, text = GAUSSIAN_STATISTICS.set_mi([kept], None)
    mu, logvar = q.mean, 2 * torch.log(q.stddev)
    assert mi == aggregate_mi(mu, logvar, z) and text == MI_ESTIMATOR
    assert per_batch == [(batch_mi(mu, logvar, z), 6)]
    model = tiny_model("della")
    ds = TextDataset(make_sentences(6, seed=5), model.tokenizer)
    with torch.no_grad():
        q = model.posterior(ds.collate([0, 1, 2]))
        q2 = model.posterior(ds.collate([3, 4, 5]))
        zs = [q.sample(), q2.sample()]
        kept = [LAYERWISE_STATISTICS.keep(d, z) for d, z in zip([q, q2], zs, strict=True)]
        evaluated = EvaluatedSet(
            model, ds, [0, 1, 2], list(range(6)), 3, torch.device("cpu"), "fp32", 0, 2, None
        )
        mi, per_batch, _ = LAYERWISE_STATISTICS.set_mi(kept, evaluated)
        assert mi == pytest.approx(distribution_mi([q, q2], zs), abs=1e-6)  # rebuilt from offsets
        rebuilt = q.with_offset(q2.offset)
        assert torch.equal(rebuilt.log_prob(zs[1]), q2.log_prob(zs[1]))
    assert [b for _, b in per_batch] == [3, 3] and LAYERWISE_STATISTICS.per_layer


# --- the model interface evaluation asks ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_optional_parts_come_through_the_model_interface(name, tiny_model, tiny_batch):
    model = tiny_model(name)
    with torch.no_grad():
        summary = model.encoder_summary(tiny_batch)
        assert model.classify_latent(torch.zeros(6, 4)) is None  # no classifier configured
    has_summary = name in ("lstm_vae", "cvrae", "t5_vae")
    assert (summary is not None) == has_summary
    if has_summary:
        assert summary.dim() == 2 and summary.size(0) == 6
    if name == "lstm_vae":
        with torch.no_grad():
            logits = tiny_model(name, classifier_weight=1.0).classify_latent(torch.zeros(6, 4))
        assert logits.shape == (6, 2)
