"""Issue 15, item 6: the flow VRAE's jointly trained, semi-supervised classifier on z."""

import random

import pytest
import torch

from tests.conftest import make_sentences, tiny_overrides
from textvae.config import ConfigError, load_config
from textvae.data import TextDataset, semi_supervised_labels
from textvae.metrics import evaluate
from textvae.objectives import elbo
from textvae.train import train


def _labelled_corpus(folder, n, seed):
    """TSV sentences whose label is readable from the first word (good = 1, bad = 0)."""
    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for s in make_sentences(n, seed):
        label = rng.randint(0, 1)
        rows.append(f"{'good' if label else 'bad'} {s}\t{label}")
    return "\n".join(rows) + "\n"


def test_semi_supervised_labels_are_a_fixed_fraction():
    labels = [i % 2 for i in range(100)]
    kept = semi_supervised_labels(labels, 0.3)
    assert kept == semi_supervised_labels(labels, 0.3)  # deterministic by index
    assert sum(k >= 0 for k in kept) == 30
    assert all(k in (-1, x) for k, x in zip(kept, labels, strict=True))
    assert semi_supervised_labels(labels, 1.0) == labels
    with pytest.raises(ValueError, match="fraction"):
        semi_supervised_labels(labels, 0.0)


def test_classifier_loss_uses_the_labelled_sentences_only(tiny_model, tokenizer):
    model = tiny_model("lstm_vae", classifier_weight=2.0).train()
    assert model.classifier is not None
    ds = TextDataset(make_sentences(6, seed=1), tokenizer, labels=[1, 0, -1, -1, 1, 0])
    batch = ds.collate(list(range(6)))
    torch.manual_seed(0)
    out = elbo(model, batch)
    torch.manual_seed(0)
    plain = elbo(model, {k: v for k, v in batch.items() if k != "labels"})
    assert plain["cls"] is None and out["cls"] > 0
    assert out["loss"].item() == pytest.approx(
        plain["loss"].item() + 2.0 * out["cls"].item(), rel=1e-5
    )
    out["loss"].backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.encoder.embed.weight.grad.abs().sum() > 0  # the classifier shapes z
    none = ds.collate([2, 3])
    assert elbo(model, none)["cls"] is None  # a batch without a visible label adds nothing


def test_classifier_trains_jointly_and_evaluate_reports_its_accuracy(tmp_path):
    for name, n, seed in (("train", 240, 0), ("valid", 40, 1), ("test", 60, 2)):
        (tmp_path / f"{name}.tsv").write_text(_labelled_corpus(tmp_path, n, seed))
    overrides = {k: v for k, v in (o.split("=", 1) for o in tiny_overrides(tmp_path))}
    overrides.update(
        {
            "data.train_path": str(tmp_path / "train.tsv"),
            "data.valid_path": str(tmp_path / "valid.tsv"),
            "data.test_path": str(tmp_path / "test.tsv"),
            "data.label_field": "label",
            "model.classifier_weight": "10.0",
            "model.classifier_label_fraction": "0.5",
            "model.pooling": "mean",
            "model.posterior_flow": "iaf",
            "model.posterior_flow_steps": "1",
            "model.flow_hidden": "16",
            "train.max_steps": "90",
        }
    )
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    run = train(cfg, tmp_path / "run")
    import textvae
    from textvae.data import load_split

    model, tok = textvae.load(run)
    test = load_split(model.config.data, "test", whole=True)
    r = evaluate(model, TextDataset(test.texts, tok, test.labels), iw_samples=2)
    assert r["classifier_n"] == 60
    assert r["classifier_accuracy"] >= 0.9, r["classifier_accuracy"]  # the first word decides
    with torch.no_grad():
        mean = model.posterior(TextDataset(test.texts, tok).collate(list(range(60)))).mean
        manual = (model.classifier(mean).argmax(-1) == torch.tensor(test.labels)).float().mean()
    assert r["classifier_accuracy"] == pytest.approx(float(manual), abs=1 / 60 + 1e-9)
    assert (
        evaluate(model, TextDataset(test.texts, tok), iw_samples=2)["classifier_accuracy"] is None
    )
    logged = [line for line in (run / "log.jsonl").read_text().splitlines() if '"cls"' in line]
    assert logged  # the cross-entropy is in the training log
    # a sweep evaluates with the same dataset as `textvae evaluate`, labels included (it used
    # to drop them, so experiments/yelp-classifier.yaml's objective was always missing)
    from textvae.sweep import evaluate_run, load_sweep

    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"name: cls\nbase: {run / 'config.yaml'}\n"
        "evaluation: {split: test, iw_samples: 2, output: eval-sweep}\n"
        "objectives: {classifier_accuracy: maximize}\n"
    )
    swept = evaluate_run(run, load_sweep(spec).evaluation)
    assert swept["classifier_n"] == 60
    assert swept["classifier_accuracy"] == pytest.approx(r["classifier_accuracy"], abs=1e-9)
    assert (run / "eval-sweep.json").is_file()


def test_classifier_options_are_validated(tiny_corpus):
    with pytest.raises(ConfigError, match="classifier_label_fraction"):
        load_config(None, tiny_overrides(tiny_corpus, **{"model.classifier_label_fraction": 1.5}))
    with pytest.raises(ConfigError, match=r"'model.classifier_weight'.*\(a key of lstm_vae,"):
        load_config(
            None,
            tiny_overrides(tiny_corpus, **{"model.name": "cvrae", "model.classifier_weight": 1.0}),
        )
    cfg = load_config(
        None, tiny_overrides(tiny_corpus, **{"model.classifier_weight": 1.0, "train.max_steps": 2})
    )
    with pytest.raises(ValueError, match="needs labels"):
        train(cfg, tiny_corpus / "run")
