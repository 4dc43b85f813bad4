"""DELLA (Hu et al., NAACL 2022) at tiny size: the layer-wise latent distribution and its KL,
the reduction to a single latent, the value fusion (the paper's low-rank product is rank 1),
masked pooling, ancestral prior samples, step-wise decoding for every fusion, the conditional
model, the released code's layer mean flagged as not a bound, the ``from_pretrained`` path
against ``transformers``' GPT-2, presets and the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import textvae
from tests.conftest import TINY_GPT2, make_sentences, tiny_overrides
from textvae import cli
from textvae.config import ConfigError, KLConfig, load_config
from textvae.data import TextDataset, encode_texts, train_subword_tokenizer
from textvae.generate import decode, ids_to_text, respond, sample_prior
from textvae.metrics import aggregate_mi, distribution_mi, evaluate
from textvae.models import MODELS
from textvae.models.della import ValueFusion
from textvae.objectives import elbo, free_bits_kl, kl_estimate
from textvae.posteriors import LatentRecurrence, LayerwiseGaussian
from textvae.remedies import resolve_cycle

ROOT = Path(__file__).resolve().parent.parent
FUSIONS = ["della", "lmf", "embedding", "memory", "softmax"]


def _only(paths):
    """The one path of an iterator (the one evaluation a test wrote)."""
    (path,) = list(paths)
    return path


@pytest.fixture
def della(tokenizer):
    """della(name="della", n_layer=2, **model_overrides): a tiny DELLA in eval mode."""

    def make(name="della", n_layer=2, **extra):
        items = [
            "model.latent_dim=4",
            "model.hidden_dim=16",
            *TINY_GPT2,
            f"model.gpt2_n_layer={n_layer}",
            f"model.name={name}",
        ]
        cfg = load_config(None, items + [f"model.{k}={v}" for k, v in extra.items()])
        torch.manual_seed(0)
        return MODELS[name](cfg.model, tokenizer).eval()

    return make


def _randomise(model, std=0.3):
    """Move every latent-side parameter away from its initial value (the fusion starts at the
    identity, the prior at N(0, I)), so that the checks below see z act."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("transformer"):
                p.add_(std * torch.randn_like(p))
    return model


def _layerwise(batch=(5,), n_layers=3, d=4, seed=0):
    torch.manual_seed(seed)
    rec = LatentRecurrence(n_layers, d)
    q = LayerwiseGaussian(
        torch.randn(*batch, n_layers, 2 * d), rec, torch.randn(n_layers, 2 * d, d)
    )
    p = LayerwiseGaussian(
        0.5 * torch.randn(n_layers, 2 * d).expand(*batch, n_layers, 2 * d),
        rec,
        torch.randn(n_layers, 2 * d, d),
    )
    return q, p


# --- the layer-wise distribution ----------------------------------------------------------------


@torch.no_grad()
def test_layerwise_gaussian_samples_ancestrally_and_sums_layers():
    q, _ = _layerwise()
    torch.manual_seed(3)
    z, log_q = q.rsample_and_log_prob((2,))
    assert z.shape == (2, 5, 3, 4) and log_q.shape == (2, 5)
    assert torch.allclose(q.log_prob(z), log_q, atol=1e-5)
    # by hand: layer by layer, zbar from the layers below, the same random numbers
    torch.manual_seed(3)
    zbar, total = torch.zeros(2, 5, 4), torch.zeros(2, 5)
    for layer in range(3):
        if layer:
            zbar = torch.tanh(
                zbar @ q.recurrence.weight_hh[layer - 1].T
                + z[..., layer - 1, :] @ q.recurrence.weight_ih[layer - 1].T
            )
        mu, logvar = (q.offset[:, layer] + zbar @ q.weight[layer].T).chunk(2, -1)
        eps = torch.randn(2, 5, 4)
        assert torch.allclose(z[..., layer, :], mu + torch.exp(0.5 * logvar) * eps, atol=1e-5)
        total += Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[..., layer, :]).sum(-1)
    assert torch.allclose(log_q, total, atol=1e-4)
    # every sample under every sentence's distribution: (M, 1, L, D) -> (M, B)
    cross = q.log_prob(z[0].unsqueeze(1))
    assert cross.shape == (5, 5) and torch.allclose(cross.diagonal(), log_q[0], atol=1e-5)


@torch.no_grad()
def test_sum_of_layer_kls_estimates_the_joint_kl():
    """E_q[sum_l KL(q_l || p_l)] (closed form per layer at z_<l ~ q) and E_q[log q - log p] are the
    same KL (the chain rule); the two Monte Carlo estimates agree within their standard errors,
    and the per-layer terms are not all alike (the test would miss a wrong layer otherwise)."""
    q, p = _layerwise(batch=(2,))
    torch.manual_seed(0)
    z = q.sample((20000,))  # (S, B, L, D)
    layer_kl = kl_estimate(q, p, z).per_dim.sum(-1)  # (S, B, L)
    rb = layer_kl.sum(-1)  # (S, B)
    mc = q.log_prob(z) - p.log_prob(z)
    se = (rb.var(0) / z.size(0)).sqrt() + (mc.var(0) / z.size(0)).sqrt()
    assert torch.all((rb.mean(0) - mc.mean(0)).abs() < 4 * se)
    assert layer_kl.mean(0).std(-1).min() > 0.1
    # the first layer's KL needs no sample: both conditionals are fixed Gaussians
    assert torch.allclose(layer_kl[:, :, 0].std(0), torch.zeros(2), atol=1e-5)


def test_free_bits_per_layer_floors_each_layers_batch_mean():
    kl = torch.tensor([[[0.1, 0.1], [2.0, 1.0]], [[0.3, 0.1], [1.0, 0.0]]])  # (B=2, L=2, D=2)
    # layer means: 0.3 and 2.0 -> max(0.3, 1) + max(2.0, 1)
    assert float(free_bits_kl(kl, 1.0, "per_layer")) == pytest.approx(3.0)
    assert float(free_bits_kl(kl, 0.0, "per_layer")) == pytest.approx(2.3)
    with pytest.raises(ValueError, match="per_layer"):
        free_bits_kl(kl[:, 0], 1.0, "per_layer")


def test_distribution_mi_equals_the_gaussian_estimator():
    torch.manual_seed(0)
    mu, logvar = torch.randn(30, 3), 0.3 * torch.randn(30, 3)
    qs = [
        Independent(Normal(mu[i : i + 7], torch.exp(0.5 * logvar[i : i + 7])), 1)
        for i in range(0, 30, 7)
    ]
    z = torch.cat([q.sample() for q in qs])
    general = distribution_mi(qs, list(z.split([q.batch_shape[0] for q in qs])), chunk=4)
    assert general == pytest.approx(aggregate_mi(mu, logvar, z), abs=1e-6)


# --- the model ----------------------------------------------------------------------------------


@torch.no_grad()
def test_one_latent_layer_is_a_single_latent_vae(della, tiny_batch):
    """latent_layers 'k..k' with the standard first prior: q(z|x) is one diagonal Gaussian (its
    mean exact), p(z) = N(0, I), and the ELBO's KL is the closed form of a plain VAE."""
    model = della(n_layer=3, latent_layers="1..1", first_prior="standard")
    assert model.latent_shape == (1, 4) and model.latent_layers == [1]
    model.prior_head.bias.fill_(0.7)  # the standard first prior ignores the bias
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    z = q.sample((3,))
    gauss = q.conditionals(z)  # does not depend on z for one layer
    plain_q = Independent(Normal(gauss.loc[0], gauss.scale[0]), 2)
    assert torch.allclose(q.log_prob(z), plain_q.log_prob(z), atol=1e-5)
    assert torch.allclose(
        p.log_prob(z), Independent(Normal(torch.zeros(4), 1.0), 1).log_prob(z[..., 0, :]), atol=1e-5
    )
    assert torch.allclose(q.mean, gauss.loc[0], atol=1e-6)
    out = elbo(model, tiny_batch)
    closed = kl_divergence(Normal(gauss.loc[0], gauss.scale[0]), Normal(0.0, 1.0)).sum((-2, -1))
    assert torch.allclose(out["kl"], closed, atol=1e-5)
    # with more layers the first is still N(0, I) but the others are not
    p3 = della(n_layer=3, first_prior="standard").prior()
    z3 = p3.sample((2000,))
    assert z3[:, 0].std(0).sub(1).abs().max() < 0.1 and z3[:, 0].mean(0).abs().max() < 0.1
    learned = della(n_layer=3, first_prior="learned")
    assert {n for n, _ in learned.prior_head.named_parameters()} == {
        n for n, _ in model.prior_head.named_parameters()
    }
    with torch.no_grad():
        learned.prior_head.bias.fill_(0.7)
    assert torch.allclose(learned.prior().mean[0], torch.full((4,), 0.7))


def test_della_fusion_is_rank_one_with_merged_weights():
    """The paper's v~ = (sum_j W_v^j [v;1]) o (sum_j W_z^j [z;1]) equals rank 1 with W = sum_j W^j;
    true LMF (sum_j of products) does not."""
    torch.manual_seed(0)
    v, z = torch.randn(3, 5, 8), torch.randn(3, 4)
    outs = {}
    for kind in ("della", "lmf"):
        fusion = ValueFusion(kind, 4, 8, 4)
        with torch.no_grad():
            fusion.value_factors.normal_()
            fusion.latent_factors.normal_()
        merged = ValueFusion("della", 1, 8, 4)
        with torch.no_grad():
            merged.value_factors.copy_(fusion.value_factors.sum(0, keepdim=True))
            merged.latent_factors.copy_(fusion.latent_factors.sum(0, keepdim=True))
        outs[kind] = (fusion(v, z), merged(v, z))
    assert torch.allclose(*outs["della"], atol=1e-4)
    assert not torch.allclose(*outs["lmf"], atol=1e-1)
    # both start as the identity on v up to a small z term
    for kind in ("della", "lmf"):
        fresh = ValueFusion(kind, 4, 8, 4)
        assert torch.allclose(fresh(v, torch.zeros(3, 4)), v, atol=1e-6)


@pytest.mark.parametrize("pooling", ["first", "mean", "attention", "max", "last"])
@torch.no_grad()
def test_posterior_does_not_depend_on_padding(della, tokenizer, pooling):
    model = della(pooling=pooling)
    short = "the cat sat"
    alone = model.posterior(encode_texts(tokenizer, [short]))
    batch = encode_texts(tokenizer, [short, "a big red dog ran under the small blue mat on a log"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].size(1)  # really padded
    padded = model.posterior(batch)
    assert torch.allclose(padded.offset[:1], alone.offset, atol=1e-5)
    more = {
        k: torch.cat([v, torch.zeros_like(v)], 1) if v.dim() == 2 else v for k, v in batch.items()
    }
    more["input_ids"][:, batch["input_ids"].size(1) :] = model.pad_id
    assert torch.allclose(model.posterior(more).offset, padded.offset, atol=1e-5)


@torch.no_grad()
def test_encoder_is_bidirectional_and_decoder_causal(della, tokenizer):
    model = _randomise(della(pooling="first"))
    a = model.posterior(encode_texts(tokenizer, ["the cat sat on the mat"]))
    b = model.posterior(encode_texts(tokenizer, ["the cat sat on the log"]))
    assert not torch.allclose(a.offset, b.offset)  # the first position sees the last word
    z = torch.randn(1, *model.latent_shape)
    ids = encode_texts(tokenizer, ["the cat sat on the mat"])["input_ids"]
    other = ids.clone()
    other[0, -2] = tokenizer.convert_tokens_to_ids("log")
    h1, _ = model._decode(ids, z, model._start_state(z, None))
    h2, _ = model._decode(other, z, model._start_state(z, None))
    assert torch.allclose(h1[:, :-2], h2[:, :-2], atol=1e-6)  # earlier positions unchanged
    assert not torch.allclose(h1[:, -2:], h2[:, -2:])


@pytest.mark.parametrize("fusion", FUSIONS)
@torch.no_grad()
def test_step_wise_decoding_equals_teacher_forcing(della, tiny_batch, fusion):
    """For every injection, summing decode_step log-probs gives log_likelihood (the cache holds
    the fused values), z reaches the decoder, and the batch layout is kept (a permuted batch
    gives the permuted likelihoods: no row mixing in the memory slot)."""
    model = _randomise(della(fusion=fusion, n_layer=3))
    b = tiny_batch["input_ids"].size(0)
    z = model.posterior(tiny_batch).sample((2,))
    ll = model.log_likelihood(tiny_batch, z)
    assert ll.shape == (2, b) and ll.dtype == torch.float32
    assert not torch.allclose(ll, model.log_likelihood(tiny_batch, z.roll(1, 1)))
    perm = torch.randperm(b)
    permuted = {k: v[perm] for k, v in tiny_batch.items()}
    assert torch.allclose(model.log_likelihood(permuted, z[:, perm]), ll[:, perm], atol=1e-5)
    n = int(tiny_batch["attention_mask"][0].sum())
    ids, state, total = tiny_batch["input_ids"][:1], None, 0.0
    prev = torch.tensor([model.bos_id])
    for t in range(n):
        logits, state = model.decode_step(z[0, :1], prev, state)
        total += float(torch.log_softmax(logits, -1)[0, ids[0, t]])
        prev = ids[:, t]
    assert float(ll[0, 0]) == pytest.approx(total, abs=1e-4)


@torch.no_grad()
def test_prior_samples_are_ancestral_and_generation_uses_them(della):
    """p.sample draws z_1, then zbar_2 and z_2 from it, ...: every layer's sample is mu_l + sigma_l
    eps with (mu_l, sigma_l) the very conditionals the KL trains (so the networks used at
    generation are the trained ones, also when latent_layers starts above 0, where the released
    code indexes them differently); sample_prior decodes exactly these z."""
    model = _randomise(della(n_layer=3, latent_layers="1..2"))
    p = model.prior()
    torch.manual_seed(5)
    z = p.sample((6,))
    torch.manual_seed(5)
    eps = torch.stack([torch.randn(6, 4) for _ in range(2)], dim=1)  # one draw per layer, in order
    cond = p.conditionals(z)
    assert torch.allclose((z - cond.loc) / cond.scale, eps, atol=1e-4)
    assert cond.loc[:, 1].std(0).min() > 1e-3  # layer 2's prior depends on the sampled z_1
    torch.manual_seed(7)
    texts = sample_prior(model, 3, max_length=6)
    torch.manual_seed(7)
    again = decode(model, model.prior().sample((3,)), max_length=6)
    assert texts == ids_to_text(model.tokenizer, again)


@torch.no_grad()
def test_kl_reduction_mean_is_flagged_as_not_a_bound(della, tokenizer):
    ds = TextDataset(make_sentences(12, seed=3), tokenizer)
    out = {}
    for reduction in ("sum", "mean"):
        model = _randomise(della(n_layer=3, kl_reduction=reduction))
        out[reduction] = evaluate(model, ds, iw_samples=4, batch_size=5)
    total, mean = out["sum"], out["mean"]
    for reduction, weight in (("sum", 1.0), ("mean", 1 / 3)):  # the training objective too
        model = _randomise(della(n_layer=3, kl_reduction=reduction))
        loss = elbo(model, ds.collate(list(range(5))))
        assert loss["kl_per_dim"].shape == (5, 3, 4)
        assert torch.allclose(loss["kl"], weight * loss["kl_per_dim"].sum((1, 2)), atol=1e-5)
    assert total["bound_valid"] is True and mean["bound_valid"] is False
    assert total["kl_per_layer"] == pytest.approx(mean["kl_per_layer"])
    assert total["kl"] == pytest.approx(sum(total["kl_per_layer"]), rel=1e-6)
    assert mean["kl"] == pytest.approx(sum(mean["kl_per_layer"]) / 3, rel=1e-6)
    assert mean["nll"] < total["nll"]  # the layer mean under-charges the latent
    for r in out.values():
        assert len(r["kl_per_dim"]) == 3 and len(r["kl_per_dim"][0]) == 4
        assert set(r["au_by_delta"]) == {"0.01", "0.2"} and r["kl_samples"] == 4
        assert len(r["au_per_layer"]["0.2"]) == 3
        assert sum(r["au_per_layer"]["0.01"]) == r["au"] == r["au_by_delta"]["0.01"]
        # DELLA's own AU (A.3): the mean over the 3 layers of the per-layer count at 0.2
        assert r["au_layer_mean"] == pytest.approx(sum(r["au_per_layer"]["0.2"]) / 3)
    with pytest.raises(ConfigError, match="model.kl_reduction"):
        load_config(None, ["model.kl_reduction=max"])


# --- conditional DELLA --------------------------------------------------------------------------


@torch.no_grad()
def test_conditional_della_reads_the_context_everywhere(della, tiny_batch, tokenizer):
    model = _randomise(della("della_cvae"))
    assert model.conditional
    swapped = dict(
        tiny_batch,
        context_ids=tiny_batch["context_ids"].roll(1, 0),
        context_mask=tiny_batch["context_mask"].roll(1, 0),
    )
    assert not torch.allclose(model.prior(swapped).offset, model.prior(tiny_batch).offset)
    assert not torch.allclose(model.posterior(swapped).offset, model.posterior(tiny_batch).offset)
    z = model.posterior(tiny_batch).sample((1,))
    assert not torch.allclose(model.log_likelihood(swapped, z), model.log_likelihood(tiny_batch, z))
    with pytest.raises(ValueError, match="context"):
        model.prior()
    with pytest.raises(ValueError, match="initial_state"):
        model.decode_step(z[0], torch.full((6,), model.bos_id), None)
    # a response's likelihood does not depend on how far its context is padded
    one = encode_texts(tokenizer, ["the cat sat"], contexts=["a dog"])
    two = encode_texts(
        tokenizer, ["the cat sat", "a mat"], contexts=["a dog", "the big red dog ran on a log"]
    )
    zz = torch.randn(1, 2, *model.latent_shape)
    assert torch.allclose(
        model.log_likelihood(one, zz[:, :1]), model.log_likelihood(two, zz)[:, :1], atol=1e-5
    )
    with pytest.raises(ConfigError, match="model.first_prior"):
        load_config(None, ["model.name=della_cvae", "model.first_prior=standard"])
    groups = respond(model, ["the cat __eou__ a dog", "a mat"], 2, max_length=5)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)


@pytest.mark.parametrize("fusion", ["della", "memory", "embedding"])
@torch.no_grad()
def test_conditional_samples_share_one_context_prefix(della, tiny_batch, fusion):
    """The context prefix is read once per batch and repeated sample-major: S samples at once give
    what each sample gives alone, and step-wise decoding from initial_state agrees; q and p from
    posterior_and_prior (one context encoding) are those of the separate calls."""
    model = _randomise(della("della_cvae", fusion=fusion))
    q, p = model.posterior_and_prior(tiny_batch)
    assert torch.allclose(q.offset, model.posterior(tiny_batch).offset)
    assert torch.allclose(p.offset, model.prior(tiny_batch).offset)
    z = q.sample((3,))
    together = model.log_likelihood(tiny_batch, z)
    alone = torch.cat([model.log_likelihood(tiny_batch, z[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    row = {k: v[2:3] for k, v in tiny_batch.items()}
    n = int(row["attention_mask"].sum())
    state, prev, total = model.initial_state(z[1, 2:3], row), torch.tensor([model.bos_id]), 0.0
    for t in range(n):
        logits, state = model.decode_step(z[1, 2:3], prev, state)
        total += float(torch.log_softmax(logits, -1)[0, row["input_ids"][0, t]])
        prev = row["input_ids"][:, t]
    assert float(together[1, 2]) == pytest.approx(total, abs=1e-4)


# --- from_pretrained ----------------------------------------------------------------------------


@pytest.fixture
def tiny_gpt2(tmp_path, tiny_corpus):
    """A tiny GPT-2 and a GPT-2-like tokenizer (byte-level BPE, one special token
    ``<|endoftext|>`` for BOS and EOS, no pad), saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = (tiny_corpus / "train.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(11)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=16,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    folder = tmp_path / "tiny-gpt2"
    gpt2.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, gpt2


def test_from_pretrained_round_trip(tiny_config, tmp_path, tiny_gpt2):
    folder, gpt2 = tiny_gpt2
    cfg = tiny_config(
        **{
            "model.name": "della",
            "model.pretrained": str(folder),
            "model.gpt2_n_embd": 48,
            "model.fusion": "embedding",
            "model.pooling": "mean",
            "model.gpt2_dropout": 0.0,
            "train.ae_reset_decoder": "false",
            "train.max_steps": 2,
            "train.eval_every": 2,
            "eval.iw_samples": 2,
        }
    )
    tokenizer = MODELS["della"].make_tokenizer(cfg, [])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    model = MODELS["della"](cfg.model, tokenizer).eval()
    assert model.hidden == 16  # the checkpoint's sizes, not gpt2_*
    saved, own = gpt2.state_dict(), model.state_dict()
    for key in (
        "transformer.wte.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.bias",
    ):
        assert torch.equal(own[key], saved[key]), key
    # with z's contribution removed, the VAE's decoder is the pretrained GPT-2: the adapted blocks
    # compute what transformers' GPT-2 computes
    with torch.no_grad():
        model.z_embed.weight.zero_()
        batch = encode_texts(tokenizer, ["the cat sat on the mat", "a dog"])
        ll = model.log_likelihood(batch, torch.randn(1, 2, 1, 4))[0]
        ids = torch.cat([torch.zeros_like(batch["input_ids"][:, :1]), batch["input_ids"]], 1)
        logp = torch.log_softmax(gpt2(input_ids=ids).logits[:, :-1], -1)
        ref = (logp.gather(-1, ids[:, 1:, None])[..., 0] * batch["attention_mask"]).sum(1)
    assert torch.allclose(ll, ref, atol=1e-4)
    from textvae.generate import _forbidden_ids

    assert _forbidden_ids(model) == []  # <|endoftext|> is BOS, pad and EOS: it must stay emittable
    run = textvae.train.train(cfg, tmp_path / "run")
    loaded, _ = textvae.load(run, "last")
    final = loaded.state_dict()
    assert set(final) == set(model.state_dict())
    torch.manual_seed(0)
    assert sample_prior(loaded, 2, max_length=5)


# --- config, presets, CLI -----------------------------------------------------------------------


def test_config_errors_name_the_key(tiny_config, della):
    for overrides, key in (
        (["model.name=della", "model.latent_layers=3-5"], "model.latent_layers"),
        (["model.name=della", "model.latent_layers=2..1"], "model.latent_layers"),
        (
            ["model.name=della", "model.fusion=memory", "model.latent_layers=0..1"],
            "model.latent_layers",
        ),
        (["model.name=lstm_vae", "model.fusion=lmf"], "model.fusion"),
        (["model.name=lstm_vae", "kl.free_bits_mode=per_layer"], "kl.free_bits_mode"),
        (["model.name=della", "model.fusion=tensor"], "model.fusion"),
        (["model.name=della", "model.word_dropout=0.2"], "model.word_dropout"),
        (["model.name=della", "kl.cycle_epochs=2"], "kl.cycle_epochs"),
        (["model.name=della", "model.gpt2_n_embd=10", "model.gpt2_n_head=4"], "model.gpt2_n_embd"),
        (["model.name=della", "model.fusion_rank=0"], "model.fusion_rank"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match="model.latent_layers"):
        della(latent_layers="1..2")  # the tiny GPT-2 has layers 0..1
    kl = KLConfig(schedule="cyclical", cycle_epochs=2.0)
    assert resolve_cycle(kl, 13).cycle_steps == 26
    assert resolve_cycle(KLConfig(schedule="cyclical"), 13).cycle_steps == KLConfig().cycle_steps


@pytest.mark.parametrize(
    "preset",
    [
        "ptb/della-cpu.yaml",
        "ptb/della-gpt2.yaml",
        "ptb/della-embedding-cpu.yaml",
        "ptb/della-memory-cpu.yaml",
        "dailydialog/della-cvae-cpu.yaml",
    ],
)
def test_presets_load(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.model.name in ("della", "della_cvae")
    assert cfg.kl.schedule == "cyclical" and cfg.kl.cycle_epochs == 2
    # the paper's configuration (issue 15): x_l = the BOS state without LayerNorm, bias-free
    # heads, p(z_1) = N(0, I) (della_cvae's p(z_1|c) keeps its learned bias)
    m = cfg.model
    assert m.pooling == "first" and not m.feature_norm and not m.head_bias
    assert m.first_prior == ("learned" if m.name == "della_cvae" else "standard")


@torch.no_grad()
def test_paper_configuration_has_no_feature_norm_and_bias_free_heads(della, tokenizer):
    """feature_norm false: x_l is the pooled state itself; head_bias false: the heads' offsets
    come from zbar and the features only (p(z_1) = N(0, I) with first_prior standard); the
    released code's variants keep their LayerNorm and biases, with the same state-dict keys."""
    paper = della(
        n_layer=2, pooling="first", feature_norm=False, head_bias=False, first_prior="standard"
    )
    released = della(n_layer=2, feature_norm=True, head_bias=True)
    assert paper.pool_norm is None and released.pool_norm is not None
    keys, released_keys = set(paper.state_dict()), set(released.state_dict())
    assert keys <= released_keys
    assert released_keys - keys == {k for k in released_keys if k.startswith("pool_norm.")}
    for head in (paper.posterior_head, paper.prior_head):
        head.bias.data.fill_(5.0)  # a masked bias changes nothing
    assert paper.posterior_head.bias_mask.sum() == 0 and paper.prior_head.bias_mask.sum() == 0
    p = paper.prior()
    first = p.conditionals(p.sample((3,)))  # layer 1 of (3, L, D): N(0, I)
    assert torch.allclose(first.mean[..., 0, :], torch.zeros(3, 4))
    assert torch.allclose(first.stddev[..., 0, :], torch.ones(3, 4))
    ds = TextDataset(make_sentences(4, seed=2), tokenizer)
    batch = ds.collate([0, 1, 2, 3])
    zero = torch.zeros(1, 4, 2, 4)
    q_before = paper.posterior(batch).conditionals(zero).mean
    paper.posterior_head.bias.data.zero_()
    assert torch.equal(paper.posterior(batch).conditionals(zero).mean, q_before)
    released.posterior_head.bias.data.fill_(5.0)  # the released variant's biases act
    assert not torch.equal(
        released.posterior(batch).conditionals(zero).mean,
        della(n_layer=2).posterior(batch).conditionals(zero).mean,
    )


def test_cli_trains_evaluates_and_generates(tiny_corpus, tmp_path, capsys):
    """The CPU preset at tiny size: tokenizer trained on the corpus, a few steps, IW evaluation
    with per-layer fields, prior samples and reconstructions from the saved run."""
    run = tmp_path / "run"
    overrides = (
        tiny_overrides(
            tiny_corpus, **{"train.max_steps": 4, "train.eval_every": 2, "eval.iw_samples": 3}
        )
        + TINY_GPT2
    )
    assert (
        cli.main(
            [
                "train",
                str(ROOT / "configs" / "ptb" / "della-cpu.yaml"),
                *overrides,
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    events = [json.loads(line) for line in open(run / "log.jsonl")]
    assert any(e.get("event") == "kl cycle" for e in events)
    assert cli.main(["evaluate", str(run), "--split", "test", "--max-sentences", "6"]) == 0
    result = json.loads(_only(run.glob("eval-test-*.json")).read_text())
    assert result["bound_valid"] is True and len(result["kl_per_layer"]) == 2
    capsys.readouterr()
    assert cli.main(["generate", str(run), "--mode", "sample", "-n", "2", "--max-length", "5"]) == 0
    assert (
        cli.main(
            [
                "generate",
                str(run),
                "--mode",
                "interpolate",
                "-n",
                "3",
                "--max-length",
                "4",
                "--input",
                "the cat",
                "a dog",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2 + 3
    from textvae.report import write_report

    md = (write_report(run, max_sentences=10, n_examples=2) / "report.md").read_text()
    assert "GPT-2 from scratch" in md and "2 latent layers x 4" in md


def test_cli_conditional_della_responds(tiny_dialogues, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    overrides = [o for o in tiny_overrides(tiny_dialogues) if not o.startswith("data.")] + [
        "train.max_steps=3",
        "train.eval_every=3",
        "eval.iw_samples=2",
        *TINY_GPT2,
    ]
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                str(ROOT / "configs" / "dailydialog" / "della-cvae-cpu.yaml"),
                *overrides,
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    assert " => " in (run / "samples.txt").read_text()
    assert cli.main(["evaluate", str(run), "--split", "test", "--max-sentences", "5"]) == 0
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("the cat sat __eou__ a dog ran __eou__\n")
    capsys.readouterr()
    assert (
        cli.main(
            [
                "generate",
                str(run),
                "--mode",
                "respond",
                "--input",
                str(contexts),
                "-n",
                "2",
                "--max-length",
                "5",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2


def test_subword_tokenizer_of_a_from_scratch_gpt2(tiny_config):
    cfg = tiny_config(**{"model.name": "della", "model.gpt2_vocab_size": 60})
    tokenizer = MODELS["della"].make_tokenizer(cfg, make_sentences(200))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    model = MODELS["della"](cfg.model, tokenizer)
    assert model.bos_id == model.eos_id == 1  # GPT-2's convention: EOS starts a sentence too
    assert (
        model.vocab_size == len(tokenizer) == len(train_subword_tokenizer(make_sentences(200), 60))
    )
