"""Issue 15, items 1-2: per-sentence values in dataset order, paired by index; every sentence
scored whole (no data.max_length at evaluation; a position limit fails or is counted)."""

import json

import pytest
import torch

from tests.conftest import dialogue_overrides, make_sentences, tiny_overrides
from textvae import cli
from textvae.config import load_config
from textvae.data import TextDataset, load_split
from textvae.metrics import evaluate
from textvae.report import paired_differences, paired_nll
from textvae.train import train


def test_nll_per_sentence_is_in_dataset_order(tiny_model, tokenizer):
    """A model without latent gives the exact NLL, whatever the batching: the i-th value must be
    sentence i's own (evaluation sorts the batches by length; before the fix the values stayed
    in that sorted order)."""
    model = tiny_model("lstm_lm")
    texts = [
        "the cat sat on the mat under a big red log",
        "a dog",
        "the big dog ran on a mat",
        "red",
        "a small blue cat sat",
    ]
    r = evaluate(model, TextDataset(texts, tokenizer), iw_samples=3, batch_size=2)
    with torch.no_grad():
        alone = [
            -float(model.log_likelihood(TextDataset([t], tokenizer).collate([0]), None)[0, 0])
            for t in texts
        ]
    assert r["sentence_index"] == list(range(5))
    assert r["nll_per_sentence"] == pytest.approx(alone, rel=1e-5)
    assert r["n_words_per_sentence"] == [len(t.split()) + 1 for t in texts]


def _record(values, words, tokenizer="WordLevel (30 types)", index=None, **extra):
    n = len(values)
    return {
        "nll_per_sentence": values,
        "sentence_index": list(range(n)) if index is None else index,
        "n_words_per_sentence": words,
        "data": "test.txt",
        "split": "test",
        "n_sentences": n,
        "n_words": sum(words),
        "tokenizer": tokenizer,
        **extra,
    }


def test_pairing_is_by_sentence_index_and_refuses_other_sentences():
    words = [5, 2, 4, 3]
    ref = _record([10.0, 20.0, 30.0, 40.0], words)
    other = _record([11.0, 22.0, 33.0, 44.0], words, tokenizer="BPE (500 types)")
    assert paired_nll(ref, other).tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="different sentences"):
        paired_nll(ref, _record([1.0, 2.0, 3.0, 4.0], words, index=[0, 1, 2, 5]))
    with pytest.raises(ValueError, match="different sentences"):  # a shorter evaluation
        paired_nll(ref, _record([1.0, 2.0, 3.0], words[:3]))
    with pytest.raises(ValueError, match="sentence 2: 9 vs 4 words"):
        paired_nll(ref, _record([1.0, 2.0, 3.0, 4.0], [5, 2, 9, 3]))
    with pytest.raises(ValueError, match="different data"):
        paired_nll(ref, dict(other, data="valid.txt"))
    # an old word-level evaluation (no sentence_index): its values are in the batches' order,
    # sentences stably sorted by token count = words + 1, i.e. indices 1, 3, 2, 0
    old = {
        "nll_per_sentence": [22.0, 44.0, 33.0, 11.0],
        "data": "/abs/test.txt",
        "split": "test",
        "n_sentences": 4,
        "n_words": 14,
        "tokenizer": "WordLevel (30 types)",
    }
    assert paired_nll(ref, old).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert paired_nll(old, ref).tolist() == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="re-run textvae evaluate"):  # subword order: unknown
        paired_nll(ref, dict(old, tokenizer="BPE (500 types)"))
    lines = paired_differences(
        {"ref": ref, "bpe": other, "moved": _record([1.0] * 4, [5, 2, 9, 3])}
    )
    assert "- bpe - ref: +2.50 ± 0.65 (0 of 4 sentences lower)" in lines
    assert any(
        line.startswith("- moved: not paired (the same indices hold different") for line in lines
    )


def test_evaluation_scores_sentences_whole_despite_max_length(tiny_corpus, tmp_path, capsys):
    """data.max_length=2 truncates training sentences, never the evaluated ones."""
    cfg = load_config(
        None, tiny_overrides(tiny_corpus, **{"train.max_steps": 2, "data.max_length": 2})
    )
    run = train(cfg, tmp_path / "run")
    assert cli.main(["evaluate", str(run), "--iw-samples", "2"]) == 0
    capsys.readouterr()
    r = json.loads((run / "eval-test-full-K2-fp32.json").read_text())
    texts = (tiny_corpus / "test.txt").read_text().split("\n")
    texts = [t for t in texts if t.strip()]
    assert r["n_sentences"] == len(texts)
    assert r["n_words_per_sentence"] == [len(t.split()) + 1 for t in texts]
    assert load_split(cfg.data, "test").stats["truncated"] > 0  # training's reading truncates


def test_dialogue_responses_are_scored_whole(tiny_dialogues, monkeypatch):
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    cfg = load_config(
        None, dialogue_overrides("model.name=cvrae", "data.max_length=2", "data.long_policy=drop")
    )
    kept = load_split(cfg.data, "test")
    whole = load_split(cfg.data, "test", whole=True)
    assert kept.stats["dropped"] > 0 and whole.stats["dropped"] == whole.stats["truncated"] == 0
    assert max(len(t.split()) for t in whole.texts) > 2
    assert len(whole.texts) == len(whole.contexts) == len(kept.texts) + kept.stats["dropped"]


@pytest.mark.parametrize("name", ["della", "della_cvae"])
def test_position_limit_fails_or_counts_the_skipped(tiny_model, tokenizer, name):
    model = tiny_model(name, gpt2_n_positions=9)
    texts = make_sentences(5, seed=4) + ["the cat sat on the mat under a big red log"]  # 12 ids
    contexts = ["a dog"] * 6 if name == "della_cvae" else None
    ds = TextDataset(texts, tokenizer, contexts=contexts)
    with pytest.raises(ValueError, match="longer than the model's 9 positions"):
        evaluate(model, ds, iw_samples=2, batch_size=3)
    r = evaluate(model, ds, iw_samples=2, batch_size=3, skip_too_long=True)
    long = [
        i
        for i, t in enumerate(texts)
        if model.positions_needed(len(t.split()) + 1, 3 if contexts else 0) > 9
    ]
    assert r["n_skipped"] == len(long) >= 1
    assert r["sentence_index"] == [i for i in range(6) if i not in long]
    assert r["n_words"] == sum(len(texts[i].split()) + 1 for i in r["sentence_index"])
    assert torch.isfinite(torch.tensor(r["nll_per_sentence"])).all()


@pytest.mark.parametrize("name", ["lstm_vae", "lstm_lm", "cvrae", "seq2seq", "t5_vae"])
def test_models_without_position_limit_take_any_length(tiny_model, tokenizer, name):
    texts = ["the cat sat on the mat " * 12, "a dog"]  # 73 ids
    ds = TextDataset(texts, tokenizer, contexts=["a mat"] * 2)
    r = evaluate(tiny_model(name), ds, iw_samples=2)
    assert r["n_skipped"] == 0 and r["sentence_index"] == [0, 1]
    assert r["n_words_per_sentence"] == [73, 3]


# --- issue 15, item 5: Long et al. 2019's encoder feature dispersion ----------------------------


def test_encoder_dispersion_is_that_of_the_summaries_and_tells_pooling_apart(tokenizer):
    """The field is computed from the summaries the heads read (checked against a direct
    computation), and it shows Long et al.'s point in miniature: sentences that differ in their
    first words and share a long ending get nearly the same last LSTM state (a randomly
    initialised LSTM forgets), while mean and max pooling keep the early states' differences."""
    from textvae.metrics import DispersionSums, encoder_dispersion
    from textvae.models import MODELS

    texts = [
        " ".join(s.split()[:3]) + " the cat sat on the mat under the big red log"
        for s in make_sentences(30, seed=2)
    ]
    ds = TextDataset(texts, tokenizer)
    out = {}
    for pooling in ("last", "mean", "max"):
        cfg = load_config(
            None,
            [
                "model.embed_dim=16",
                "model.hidden_dim=16",
                "model.latent_dim=4",
                f"model.pooling={pooling}",
            ],
        )
        torch.manual_seed(0)
        model = MODELS["lstm_vae"](cfg.model, tokenizer).eval()
        r = evaluate(model, ds, iw_samples=0, batch_size=7)
        with torch.no_grad():
            h = model.encoder_summary(ds.collate(list(range(30)))).double()  # (N, H)
        d = r["encoder_dispersion"]
        assert d["n"] == 30 and d["dim"] == h.size(1)
        assert d["total_variance"] == pytest.approx(float(h.var(0, unbiased=False).sum()), rel=1e-4)
        unit = h / h.norm(dim=-1, keepdim=True)
        cos = unit @ unit.T
        assert d["mean_cosine_distance"] == pytest.approx(
            1 - float((cos.sum() - 30) / (30 * 29)), rel=1e-3, abs=1e-9
        )
        sums = DispersionSums()
        sums.add(h)
        assert encoder_dispersion(sums)["relative_variance"] == pytest.approx(
            d["relative_variance"], rel=1e-4, abs=1e-12
        )
        out[pooling] = d
    for pooled in ("mean", "max"):  # measured: last 5e-8, mean 4e-4, max 2e-3
        assert out["last"]["mean_cosine_distance"] < out[pooled]["mean_cosine_distance"] / 100
        assert out["last"]["relative_variance"] < out[pooled]["relative_variance"] / 100


@pytest.mark.parametrize("name", ["cvrae", "t5_vae", "della", "lstm_lm"])
def test_encoder_dispersion_elsewhere(tiny_model, tokenizer, name):
    ds = TextDataset(make_sentences(6, seed=5), tokenizer, contexts=make_sentences(6, seed=8))
    d = evaluate(tiny_model(name), ds, iw_samples=0)["encoder_dispersion"]
    if name == "lstm_lm":
        assert d is None
    elif name == "della":
        assert d["total_variance"] is None and "encoder_summary" in d["reason"]
    else:
        assert d["total_variance"] > 0 and d["n"] == 6
