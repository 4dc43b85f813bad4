"""One objective path: the KL estimator is chosen by the types of posterior and prior, and
training (``elbo``) and evaluation (``evaluate``) use the same one; the objective's settings
travel as one object; the auxiliary terms come from the model."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from tests.conftest import make_sentences
from textvae import objectives
from textvae.config import KLConfig
from textvae.data import TextDataset
from textvae.flows import FlowDistribution
from textvae.metrics import evaluate
from textvae.objectives import (
    CLOSED_FORM,
    MONTE_CARLO,
    KLEstimator,
    ObjectiveSettings,
    elbo,
    kl_estimate,
    kl_estimator,
)

FAMILIES = [  # (model name, model overrides, expected estimator)
    ("lstm_vae", {}, "closed_form"),
    ("lstm_vae", {"posterior_flow": "iaf", "posterior_flow_steps": 2}, "monte_carlo"),
    ("lstm_vae", {"prior_flow": "iaf", "prior_flow_steps": 1}, "monte_carlo"),
    ("t5_vae", {}, "closed_form"),
    ("cvrae", {}, "closed_form"),
    ("della", {}, "layerwise"),
    ("della", {"kl_reduction": "mean"}, "layerwise"),
    ("della_cvae", {}, "layerwise"),
]


@pytest.mark.parametrize(("name", "extra", "kind"), FAMILIES)
def test_the_estimator_is_chosen_by_the_distribution_types(
    name, extra, kind, tiny_model, tiny_batch
):
    model = tiny_model(name, **extra)
    q, p = model.posterior_and_prior(tiny_batch)
    assert kl_estimator(q, p).name == kind


@pytest.mark.parametrize(
    ("name", "extra", "kind"), [f for f in FAMILIES if f[0] in ("lstm_vae", "della")]
)
def test_training_and_evaluation_compute_the_same_kl(
    name, extra, kind, tiny_model, tokenizer, monkeypatch
):
    """Both routes ask the registry (a spy on each estimator records who called which), and
    their numbers agree: exactly for a closed form; for the sampled estimators the mean of
    ``elbo``'s one-sample KL over many copies of each sentence and ``evaluate``'s KL over as
    many IW samples agree within their Monte Carlo error. A layer mean (``kl_reduction: mean``)
    that one route scaled and the other did not would differ by a factor L."""
    model = tiny_model(name, **extra)
    calls = []
    for pair, estimator in list(objectives.KL_ESTIMATORS.items()):

        def spy(*args, _real=estimator.estimate, _name=estimator.name):
            calls.append(_name)
            return _real(*args)

        wrapped = KLEstimator(estimator.name, estimator.needs_samples, spy)
        monkeypatch.setitem(objectives.KL_ESTIMATORS, pair, wrapped)
    sentences = make_sentences(4, seed=9)
    k = 200
    evaluated = evaluate(model, TextDataset(sentences, tokenizer), iw_samples=k, batch_size=4)
    eval_calls, calls[:] = list(calls), []
    copies = TextDataset(sentences * k, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = elbo(model, copies.collate(list(range(len(copies)))))["kl"].double()  # (4k,)
    assert set(eval_calls) == set(calls) == {kind}
    if kind == "closed_form":
        assert trained.mean().item() == pytest.approx(evaluated["kl"], rel=1e-6)
        return
    se = trained.std().item() / math.sqrt(trained.numel())
    assert abs(trained.mean().item() - evaluated["kl"]) < 5 * se + 1e-4
    assert evaluated["bound_valid"] == (extra.get("kl_reduction", "sum") == "sum")


def test_an_unregistered_pair_is_a_clear_error(tiny_model, tiny_batch):
    q = tiny_model("della").posterior(tiny_batch)
    p = Independent(Normal(torch.zeros(6, 4), torch.ones(6, 4)), 1)
    with pytest.raises(NotImplementedError, match="LayerwiseGaussian and prior Independent"):
        kl_estimator(q, p)
    with pytest.raises(NotImplementedError, match="KL_ESTIMATORS"):
        kl_estimate(q, p, q.sample((1,)))


def test_a_subclass_uses_its_parents_entry_and_the_most_specific_pair_wins(tiny_model, tiny_batch):
    q = tiny_model("lstm_vae", posterior_flow="planar").posterior(tiny_batch)

    class MyFlow(FlowDistribution):
        pass

    mine = MyFlow(q.base_dist, list(q.transforms))
    p = Independent(Normal(torch.zeros(6, 4), torch.ones(6, 4)), 1)
    assert kl_estimator(mine, p) is MONTE_CARLO
    assert kl_estimator(q.base_dist, p) is CLOSED_FORM  # (Independent, Independent)


def test_a_sampled_estimator_without_samples_is_a_clear_error(tiny_model, tiny_batch):
    q, p = tiny_model("della").posterior_and_prior(tiny_batch)
    with pytest.raises(ValueError, match="layerwise KL needs samples"):
        kl_estimate(q, p)


def test_settings_are_built_once_from_the_kl_section():
    kl = KLConfig(
        beta_max=0.7, free_bits=0.3, free_bits_mode="total", target=4.0, target_weight=2.0
    )
    settings = ObjectiveSettings.from_config(kl)
    assert settings == ObjectiveSettings(0.7, 0.3, "total", 4.0, 2.0)
    assert settings.at(0.1) == ObjectiveSettings(0.1, 0.3, "total", 4.0, 2.0)
    assert settings.at(0.0, kl_target=False).kl_target_weight == 0.0  # the autoencoder phase


def test_every_setting_reaches_the_loss(tiny_model, tiny_batch):
    """Each field of the settings changes the loss on the same sample (a caller that dropped one,
    as a bench script once dropped the free-bits mode and the KL target, would not)."""
    model = tiny_model("lstm_vae")
    base = ObjectiveSettings(beta=0.5, free_bits=0.2, free_bits_mode="per_dim")
    variants = [
        ObjectiveSettings(beta=0.9, free_bits=0.2),
        ObjectiveSettings(beta=0.5, free_bits=5.0),
        ObjectiveSettings(beta=0.5, free_bits=0.2, free_bits_mode="total"),
        ObjectiveSettings(beta=0.5, free_bits=0.2, kl_target=50.0, kl_target_weight=1.0),
    ]
    with torch.no_grad():
        torch.manual_seed(0)
        reference = elbo(model, tiny_batch, base)["loss"]
        for settings in variants:
            torch.manual_seed(0)
            assert elbo(model, tiny_batch, settings)["loss"] != reference, settings


def test_the_auxiliary_terms_come_from_the_model(tiny_model, tiny_batch):
    """``elbo`` adds whatever the model's ``auxiliary_losses`` returns (weight x mean) and reaches
    for no bag-of-words attribute of its own: with the model's terms replaced, its BoW head is
    not used."""
    model = tiny_model("lstm_vae", bow_weight=0.5)
    with torch.no_grad():
        torch.manual_seed(0)
        with_bow = elbo(model, tiny_batch)
        assert with_bow["bow"] is not None
        assert with_bow["loss"] == pytest.approx(
            float(with_bow["rec"].mean() + with_bow["kl"].mean() + 0.5 * with_bow["bow"].mean()),
            rel=1e-6,
        )
        model.auxiliary_losses = lambda batch, z: {"norm": (2.0, z.pow(2).sum(-1))}
        torch.manual_seed(0)
        out = elbo(model, tiny_batch)
    assert out["bow"] is None and out["norm"].shape == (6,)
    expect = out["rec"].mean() + out["kl"].mean() + 2.0 * out["norm"].mean()
    assert float(out["loss"]) == pytest.approx(float(expect), rel=1e-6)
