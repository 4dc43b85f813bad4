"""Decoding strategies and latent-space operations."""

import pytest
import torch

from tests.conftest import make_sentences
from textvae.data import build_tokenizer, train_subword_tokenizer
from textvae.generate import (
    _filter_logits,
    decode,
    ids_to_text,
    interpolate,
    reconstruct,
    sample_prior,
    slerp,
)


def test_beam_of_one_and_top_k_of_one_equal_greedy(tiny_model):
    model = tiny_model()
    torch.manual_seed(0)
    z = torch.randn(5, 4) * 2
    greedy = decode(model, z, strategy="greedy", max_length=12)
    assert decode(model, z, strategy="beam", beam_size=1, max_length=12) == greedy
    assert decode(model, z, strategy="sample", top_k=1, max_length=12) == greedy


@torch.no_grad()
def test_beam_search_finds_at_least_the_greedy_score(tiny_model):
    """Batched beam search (width 4) never scores below greedy, sentence by sentence."""
    model = tiny_model()
    torch.manual_seed(1)
    z = torch.randn(6, 4) * 2

    def score(seqs):
        out = []
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq + [model.eos_id]])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            out.append(float(model.log_likelihood(batch, z[i : i + 1].unsqueeze(0))[0, 0]))
        return torch.tensor(out)

    greedy = decode(model, z, strategy="greedy", max_length=30)
    beam = decode(model, z, strategy="beam", beam_size=4, max_length=30)
    assert torch.all(score(beam) >= score(greedy) - 1e-4)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 0, 0.9))
    assert kept.tolist() == [[True, True, True, False]]


def test_slerp_ends_and_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.all(path.norm(dim=1) >= 1.0 - 1e-6)  # stays off the chord


def test_interpolation_ends_are_the_reconstructions(tiny_model):
    model = tiny_model()
    a, b = "the cat sat on the mat", "a dog ran"
    for method in ("linear", "spherical"):
        path = interpolate(model, a, b, steps=4, method=method)
        assert len(path) == 4 and [path[0], path[-1]] == reconstruct(model, [a, b])


def test_prior_samples_and_lm(tiny_model):
    assert len(sample_prior(tiny_model(), 3, strategy="sample", temperature=0.7)) == 3
    lm = tiny_model("lstm_lm")
    assert len(sample_prior(lm, 2)) == 2
    with pytest.raises(ValueError, match="no latent"):
        reconstruct(lm, ["the cat"])
    with pytest.raises(ValueError, match="unknown strategy"):
        decode(lm, None, n=1, strategy="nucleus")


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_generated_text_keeps_unk_and_drops_pad_bos_eos(kind):
    """PTB writes unknown words as <unk>; decoding with skip_special_tokens deleted them."""
    texts = [t + " <unk> ." for t in make_sentences(200)]
    tok = build_tokenizer(texts) if kind == "word" else train_subword_tokenizer(texts, 200)
    a, b, c = texts[0].split()[:3]  # words the tokenizer knows
    sentence = f"{a} <unk> {b} {c}"
    ids = tok(sentence)["input_ids"]
    assert ids.count(tok.unk_token_id) == 1
    specials = [i for i in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) if i is not None]
    assert ids_to_text(tok, [ids + specials]) == [sentence]
