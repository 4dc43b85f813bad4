"""The two-phase T5 VAE (Park & Lee, Insights @ EMNLP 2021) at tiny size: masked pooling, the memory
slot's batch layout, likelihood units, denoising, the phase hand-off with early stopping and a
frozen decoder, resume across it, the ``from_pretrained`` path, evaluation and generation."""

import json

import pytest
import torch
from safetensors.torch import load_file

import textvae
from tests.conftest import TINY_T5, make_sentences
from textvae import cli
from textvae import train as train_module
from textvae.config import ConfigError, load_config
from textvae.data import TextDataset, encode_texts
from textvae.encoders import delete_tokens
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.models.t5_vae import train_t5_tokenizer
from textvae.train import train

T5 = {
    "model.name": "t5_vae",
    **dict(item.split("=") for item in TINY_T5),
    "model.pooling": "mean",
    "train.ae_reset_decoder": "false",
}


def _only(paths):
    """The one path of an iterator (the one evaluation a test wrote)."""
    (path,) = list(paths)
    return path


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def _final(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def _trainer_state(run_dir) -> dict:
    return torch.load(
        run_dir / "checkpoints" / "last" / "custom_checkpoint_0.pkl", weights_only=False
    )


@pytest.fixture
def t5_tokenizer():
    return train_t5_tokenizer(make_sentences(200), 60)


@pytest.fixture
def t5_model(t5_tokenizer):
    def make(**extra):
        overrides = {**T5, **{f"model.{k}": v for k, v in extra.items()}}
        cfg = load_config(
            None, [f"{k}={v}" for k, v in overrides.items() if k.startswith("model.")]
        )
        torch.manual_seed(0)
        return MODELS["t5_vae"](cfg.model, t5_tokenizer).eval()

    return make


def _batch(tokenizer, texts):
    return encode_texts(tokenizer, texts)


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "max", "attention", "last"])
@torch.no_grad()
def test_posterior_does_not_depend_on_padding(t5_model, t5_tokenizer, pooling):
    model = t5_model(pooling=pooling)
    short = "the cat sat"
    alone = model.posterior(_batch(t5_tokenizer, [short]))
    batch = _batch(t5_tokenizer, [short, "a big red dog ran under the small blue mat on a log"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].size(1)  # really padded
    padded = model.posterior(batch)
    assert torch.allclose(padded.mean[:1], alone.mean, atol=1e-5)
    assert torch.allclose(padded.stddev[:1], alone.stddev, atol=1e-5)
    # more padding columns change nothing either
    more = {
        k: torch.cat([v, torch.zeros_like(v)], 1) if v.dim() == 2 else v for k, v in batch.items()
    }
    more["input_ids"][:, batch["input_ids"].size(1) :] = model.pad_id
    assert torch.allclose(model.posterior(more).mean, padded.mean, atol=1e-5)


@torch.no_grad()
def test_log_likelihood_is_the_sum_over_real_tokens(t5_model, t5_tokenizer):
    """nats per sentence, EOS counted: the sum of per-token log-probs of the real positions
    (not their mean), the same alone or in a padded batch."""
    model = t5_model(latent_injection="both")
    texts = ["the cat", "a big red dog ran under the small blue mat"]
    batch = _batch(t5_tokenizer, texts)
    z = torch.randn(3, 2, model.latent_dim)
    ll = model.log_likelihood(batch, z)
    for i, text in enumerate(texts):
        alone = model.log_likelihood(_batch(t5_tokenizer, [text]), z[:, i : i + 1])
        assert torch.allclose(ll[:, i : i + 1], alone, atol=1e-5)
    # by hand: logits of every position, log-softmax, the real targets only, summed
    ids, mask = batch["input_ids"], batch["attention_mask"]
    start = torch.full_like(ids[:, :1], model.bos_id)
    hidden, _ = model._decode(torch.cat([start, ids[:, :-1]], 1), z[0], None)
    logp = torch.log_softmax(model.logits(hidden), -1).gather(2, ids.unsqueeze(2)).squeeze(2)
    expected = (logp * mask).sum(1)
    assert torch.allclose(ll[0], expected, atol=1e-4)
    n_real = mask.sum(1)
    assert n_real[0] != n_real[1] and ll.dtype == torch.float32


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
@torch.no_grad()
def test_every_injection_decodes_step_by_step_as_in_teacher_forcing(
    t5_model, t5_tokenizer, injection
):
    model = t5_model(latent_injection=injection)
    assert (model.memory is not None) == (injection != "embedding")
    assert (model.z_embed is not None) == (injection != "memory")
    batch = _batch(t5_tokenizer, ["the cat sat on the mat", "a dog"])
    z = torch.randn(2, model.latent_dim)
    ll = model.log_likelihood(batch, z.unsqueeze(0))[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    total, state, prev = torch.zeros(2), None, torch.full((2,), model.bos_id)
    for t in range(ids.size(1)):
        logits, state = model.decode_step(z, prev, state)
        total += torch.log_softmax(logits, -1).gather(1, ids[:, t : t + 1]).squeeze(1) * mask[:, t]
        prev = ids[:, t]
    assert torch.allclose(ll, total, atol=1e-4)
    assert not torch.allclose(ll, model.log_likelihood(batch, (z + 2).unsqueeze(0))[0])


@torch.no_grad()
def test_memory_slots_keep_batch_rows_apart(t5_model, t5_tokenizer):
    """Permuting the batch permutes the memory keys/values and the likelihoods; changing one
    sentence's z changes that sentence's likelihood only (a reshape without permute mixes rows)."""
    model = t5_model(latent_injection="memory")
    z = torch.randn(5, model.latent_dim)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for (k, v), (kp, vp) in zip(model.memory_slots(z), model.memory_slots(z[perm]), strict=True):
        assert k.shape == (5, model.n_heads, 1, model.d_kv)
        # allclose, not equal: a multi-threaded matmul may round a permuted batch differently
        # in the last bit; mixing rows gives differences of order 1
        assert torch.allclose(kp, k[perm], atol=1e-6) and torch.allclose(vp, v[perm], atol=1e-6)
    batch = _batch(t5_tokenizer, make_sentences(5, seed=9))
    ll = model.log_likelihood(batch, z.unsqueeze(0))[0]
    permuted = {key: value[perm] for key, value in batch.items()}
    assert torch.allclose(
        model.log_likelihood(permuted, z[perm].unsqueeze(0))[0], ll[perm], atol=1e-5
    )
    z2 = z.clone()
    z2[2] += 3.0
    changed = (model.log_likelihood(batch, z2.unsqueeze(0))[0] - ll).abs() > 1e-4
    assert changed.tolist() == [False, False, True, False, False]


def test_the_decoder_has_no_cross_attention(t5_model):
    from transformers.models.t5.modeling_t5 import T5LayerCrossAttention

    model = t5_model()
    assert not any(isinstance(m, T5LayerCrossAttention) for m in model.modules())
    assert not any("EncDecAttention" in key for key in model.state_dict())


# --- denoising ----------------------------------------------------------------------------------


def test_delete_tokens_edits_ids_and_mask_together():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor(
        [[5, 6, 7, 8, 9, 10, 11, 2], [12, 13, 14, 2, 0, 0, 0, 0], [15, 2, 0, 0, 0, 0, 0, 0]]
    )
    mask = (ids != 0).long()
    for _ in range(20):
        new_ids, new_mask = delete_tokens(ids, mask, 0.4, pad_id=0, generator=gen)
        assert new_ids.shape == new_mask.shape and new_ids.size(1) <= ids.size(1)
        for row in range(3):
            before = ids[row][mask[row].bool()].tolist()
            n_keep = int(new_mask[row].sum())
            assert new_mask[row].tolist() == [1] * n_keep + [0] * (
                new_mask.size(1) - n_keep
            )  # left-packed
            after = new_ids[row][:n_keep].tolist()
            assert (new_ids[row][n_keep:] == 0).all()  # freed positions hold padding
            assert len(before) - n_keep == round(0.4 * (len(before) - 1))
            assert after[-1] == 2  # EOS kept
            it = iter(before)
            assert all(tok in it for tok in after)  # a subsequence: order kept
    assert delete_tokens(ids, mask, 0.0, 0) == (ids, mask)
    with pytest.raises(ValueError, match="fraction"):
        delete_tokens(ids, mask, 1.0, 0)


def test_denoising_reaches_the_encoder_only_in_training(t5_model, t5_tokenizer, monkeypatch):
    model = t5_model(encoder_token_drop=0.5, t5_dropout=0.0)
    batch = _batch(
        t5_tokenizer, ["a big red dog ran under the small blue mat", "the cat sat on it"]
    )
    original = {k: v.clone() for k, v in batch.items()}
    seen = {}
    encoder_forward, decoder_forward = model.encoder.forward, model.decoder.forward

    def spy_encoder(*args, attention_mask=None, **kwargs):
        seen["encoder"] = attention_mask.sum(1).tolist()
        return encoder_forward(*args, attention_mask=attention_mask, **kwargs)

    def spy_decoder(*args, inputs_embeds=None, **kwargs):
        seen["decoder"] = inputs_embeds.shape[:2]
        return decoder_forward(*args, inputs_embeds=inputs_embeds, **kwargs)

    monkeypatch.setattr(model.encoder, "forward", spy_encoder)
    monkeypatch.setattr(model.decoder, "forward", spy_decoder)
    lengths = batch["attention_mask"].sum(1)
    model.train()
    model(batch)
    assert seen["encoder"] == (lengths - torch.round(0.5 * (lengths - 1).double()).long()).tolist()
    assert seen["decoder"] == batch["input_ids"].shape  # the target is the whole sentence
    assert all(torch.equal(batch[k], original[k]) for k in batch)
    model.eval()
    model.posterior(batch)
    assert seen["encoder"] == lengths.tolist()  # evaluation reads the sentence as it is


# --- training: phases, freezing, resume -----------------------------------------------------------


def _t5_config(tiny_config, **extra):
    return tiny_config(**{**T5, **extra})


def _with_model(cfg, **changes):
    """A copy of ``cfg.model`` with ``changes``."""
    import dataclasses

    return dataclasses.replace(cfg.model, **changes)


def test_phase_one_stops_early_then_phase_two_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """Phase ae (KL weight 0) stops when validation rec has not improved for ae_patience
    validations; phase vae continues from its weights (no reset), with the KL schedule, free bits
    and denoising. Interrupted before and after the hand-off, resumed, the run ends where the
    uninterrupted one does."""
    real, recs = train_module.evaluate, iter([])

    def scripted(*args, **kwargs):  # validation rec by the order of calls within one run
        out = real(*args, **kwargs)
        out["rec"] = next(recs)
        return out

    monkeypatch.setattr(train_module, "evaluate", scripted)
    extra = {
        "train.ae_pretrain_steps": 100,
        "train.ae_patience": 1,
        "train.eval_every": 2,
        "kl.free_bits": 0.1,
        "model.encoder_token_drop": 0.3,
        "kl.warmup_steps": 4,
        "train.batch_size": 32,
        "train.log_every": 1,
    }
    # validations at 2, 4, 6, 8: rec 5.0 (best), 6.0 (not better: phase ends), then anything
    script = [5.0, 6.0, 1.0, 1.0]
    recs = iter(script)
    whole = train(_t5_config(tiny_config, **extra, **{"train.max_steps": 8}), tmp_path / "whole")
    records = _records(whole)
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["phase"] for r in train_recs] == ["ae"] * 4 + ["vae"] * 4
    assert all(r["beta"] == 0.0 for r in train_recs[:4]) and train_recs[4]["beta"] > 0
    assert all("phase" in r for r in records)
    stop = next(r for r in records if r.get("event") == "ae early stop")
    assert stop["step"] == 4 and stop["best_rec"] == 5.0
    hand_off = next(r for r in records if r.get("event") == "phase")
    assert hand_off["step"] == 4 and hand_off["reason"] == "early stop" and hand_off["reset"] == 0
    state = _trainer_state(whole)
    ae = state["remedies"]["ae_pretraining"]  # the remedy's own state
    assert ae["phase"] == "vae" and ae["phase_start"] == 4 and ae["ae_stopped"]
    for stop_at, done in ((4, [5.0, 6.0]), (6, [5.0, 6.0, 1.0])):
        recs = iter(done)
        part = train(
            _t5_config(tiny_config, **extra, **{"train.max_steps": stop_at}),
            tmp_path / f"part{stop_at}",
        )
        phase = _trainer_state(part)["remedies"]["ae_pretraining"]["phase"]
        assert phase == ("ae" if stop_at == 4 else "vae")
        recs = iter(script[len(done) :])
        train(None, part, resume=True, overrides=["train.max_steps=8"])
        a, b = _final(whole), _final(part)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stop_at, key)
        assert _trainer_state(part) == state


def test_phase_two_starts_from_the_best_phase_one_weights(tiny_config, tmp_path, monkeypatch):
    """train.ae_start: best (default) loads the phase-1 weights of the best validation rec at
    the hand-off; last keeps the weights at the hand-off. With validation recs 5 (step 2) then
    6 (step 4) the two differ; with 6 then 5 the best is the last and they agree exactly."""
    real, recs = train_module.evaluate, iter([])

    def scripted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["rec"] = next(recs)
        return out

    monkeypatch.setattr(train_module, "evaluate", scripted)
    extra = {
        "train.ae_pretrain_steps": 4,
        "train.eval_every": 2,
        "train.max_steps": 6,
        "train.log_every": 1,
    }
    finals = {}
    for order in ("best_first", "best_last"):
        for start in ("best", "last"):
            recs = iter([5.0, 6.0, 1.0] if order == "best_first" else [6.0, 5.0, 1.0])
            run = train(
                _t5_config(tiny_config, **extra, **{"train.ae_start": start}),
                tmp_path / f"{order}-{start}",
            )
            hand_off = next(r for r in _records(run) if r.get("event") == "phase")
            finals[order, start] = _final(run)
            if start == "best":
                best_step = 2 if order == "best_first" else 4
                assert hand_off["start"] == "best" and hand_off["from_step"] == best_step
                assert hand_off["best_rec"] == 5.0
                info = json.loads((run / "checkpoints" / "ae_best" / "info.json").read_text())
                assert info == {"step": best_step, "rec": 5.0}
            else:
                assert hand_off["start"] == "last" and hand_off["from_step"] == 4
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(finals["best_first", "best"][key], finals["best_first", "last"][key])
    for k, v in finals["best_last", "best"].items():
        assert torch.equal(v, finals["best_last", "last"][k]), k


def test_frozen_decoder_phase_can_freeze_the_latent_projection(tiny_config, tmp_path):
    cfg = _t5_config(
        tiny_config,
        **{
            "train.ae_pretrain_steps": 3,
            "train.ae_freeze_decoder": "true",
            "train.ae_freeze_latent_projection": "true",
            "train.max_steps": 3,
            "train.seed": 4,
            "model.latent_injection": "both",
        },
    )
    run = train(cfg, tmp_path / "frozen")
    _, tokenizer = textvae.load(run)
    torch.manual_seed(4)
    init = MODELS["t5_vae"](cfg.model, tokenizer).state_dict()
    after = _final(run)
    for prefix in ("memory.", "z_embed.", "decoder.", "shared."):  # held, as the released code
        assert all(torch.equal(after[k], init[k]) for k in after if k.startswith(prefix)), prefix
    assert any(not torch.equal(after[k], init[k]) for k in after if k.startswith("encoder."))
    with pytest.raises(ConfigError, match="ae_freeze_latent_projection"):
        _t5_config(tiny_config, **{"train.ae_freeze_latent_projection": "true"})


def test_frozen_decoder_phase_leaves_the_decoder_unchanged(tiny_config, tmp_path):
    cfg = _t5_config(
        tiny_config,
        **{
            "train.ae_pretrain_steps": 3,
            "train.ae_freeze_decoder": "true",
            "train.max_steps": 3,
            "train.seed": 4,
            "model.latent_injection": "both",
        },
    )
    run = train(cfg, tmp_path / "frozen")
    _, tokenizer = textvae.load(run)
    torch.manual_seed(4)
    init = MODELS["t5_vae"](cfg.model, tokenizer).state_dict()
    after = _final(run)
    frozen = [k for k in after if k.startswith(("shared.", "decoder.", "lm_head."))]
    assert frozen and all(torch.equal(after[k], init[k]) for k in frozen)
    for prefix in ("encoder.", "posterior_head.", "memory.", "z_embed."):  # these trained
        assert any(not torch.equal(after[k], init[k]) for k in after if k.startswith(prefix)), (
            prefix
        )
    train(None, run, resume=True, overrides=["train.max_steps=5"])  # phase vae: all train
    later = _final(run)
    assert not torch.equal(
        later["decoder.block.0.layer.0.SelfAttention.q.weight"],
        init["decoder.block.0.layer.0.SelfAttention.q.weight"],
    )
    assert not torch.equal(later["shared.weight"], init["shared.weight"])


# --- from_pretrained, evaluation, generation ------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["t5", "t5-v1.1-scaling"])
def tiny_pretrained(request, tmp_path, tiny_corpus):
    """A tiny T5 with its tokenizer, saved like a hub model; its cross-attention outputs are
    zero, so its decoder is what the VAE's decoder is without z. ``tie_word_embeddings=False``
    (T5 v1.1's config) turns off the output scaling."""
    from transformers import T5Config, T5ForConditionalGeneration

    texts = (tiny_corpus / "train.txt").read_text().splitlines()
    tokenizer = train_t5_tokenizer(texts, 60)
    config = T5Config(
        vocab_size=len(tokenizer) + 8,
        d_model=16,  # padded, as t5-small's d_ff=32, d_kv=8, num_layers=1,
        num_decoder_layers=2,
        num_heads=2,
        tie_word_embeddings=request.param,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(11)
    t5 = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in t5.decoder.block:
            block.layer[1].EncDecAttention.o.weight.zero_()
    folder = tmp_path / "tiny-t5"
    t5.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, t5


def test_from_pretrained_round_trip(tiny_config, tmp_path, tiny_pretrained):
    folder, t5 = tiny_pretrained
    saved = t5.state_dict()
    cfg = _t5_config(
        tiny_config,
        **{
            "model.pretrained": str(folder),
            "model.t5_d_model": 64,
            "train.max_steps": 2,
            "train.eval_every": 2,
        },
    )
    tokenizer = MODELS["t5_vae"].make_tokenizer(cfg, [])
    model = MODELS["t5_vae"](cfg.model, tokenizer).eval()
    own = model.state_dict()
    assert model.shared.weight.shape == (len(tokenizer) + 8, 16)  # the checkpoint's sizes, not t5_*
    for key in (
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "decoder.block.1.layer.2.DenseReluDense.wi.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ):
        assert torch.equal(own[key], saved[key]), key
    # with z's contribution removed, the VAE decoder is the pretrained T5 decoder, logits and all
    embedding = MODELS["t5_vae"](_with_model(cfg, latent_injection="embedding"), tokenizer).eval()
    with torch.no_grad():
        embedding.z_embed.weight.zero_()
        ids = _batch(tokenizer, ["the cat sat on the mat"])["input_ids"]
        start = torch.zeros_like(ids[:, :1])
        decoder_ids = torch.cat([start, ids[:, :-1]], 1)
        hidden, _ = embedding._decode(decoder_ids, torch.zeros(1, 4), None)
        ours = embedding.logits(hidden)
        theirs = t5(input_ids=ids, decoder_input_ids=decoder_ids).logits
    assert ours.size(-1) == len(tokenizer) == embedding.vocab_size < t5.config.vocab_size
    assert torch.allclose(ours, theirs[..., : len(tokenizer)], atol=1e-5)
    run = train(cfg, tmp_path / "run")
    loaded, loaded_tok = textvae.load(run, "last")
    text = ["the cat sat on the mat"]
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.bos_id == 0 and loaded.eos_id == 1 and loaded.pad_id == 0
    weights = _final(run)
    assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
    assert not torch.equal(weights["shared.weight"], saved["shared.weight"])  # it trained


def test_evaluation_and_generation_through_the_shared_code(tiny_config, tmp_path, capsys):
    cfg = _t5_config(
        tiny_config,
        **{"train.max_steps": 4, "model.latent_injection": "both", "train.ae_pretrain_steps": 2},
    )
    run = train(cfg, tmp_path / "run")
    model, tokenizer = textvae.load(run)
    texts = make_sentences(12, seed=8) + ["the zebra sat"]  # a word the tokenizer splits
    ds = TextDataset(texts, tokenizer)
    r = evaluate(model, ds, iw_samples=5)
    assert r["n_words"] == sum(len(t.split()) + 1 for t in texts)  # words from the text
    assert r["n_tokens"] == ds.n_tokens != r["n_words"]  # subword tokens, EOS counted
    n = r["n_sentences"]
    assert r["ppl_token"] == pytest.approx(torch.tensor(r["nll"] * n / r["n_tokens"]).exp().item())
    assert r["ppl_word"] == pytest.approx(torch.tensor(r["nll"] * n / r["n_words"]).exp().item())
    assert r["ppl_elbo_token"] == pytest.approx(
        torch.tensor(-r["elbo"] * n / r["n_tokens"]).exp().item()
    )
    assert "WordLevel" not in r["tokenizer"]
    capsys.readouterr()
    for args in (
        ["--mode", "sample", "-n", "3"],
        ["--mode", "reconstruct", "--input", "the cat sat", "a dog ran", "--strategy", "beam"],
        ["--mode", "interpolate", "-n", "4", "--input", "the cat sat", "a dog ran"],
    ):
        assert cli.main(["generate", str(run), *args, "--max-length", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 2 + 4


def test_cpu_preset_through_the_cli_at_tiny_size(tiny_corpus, tmp_path):
    """configs/ptb/t5-vae-cpu.yaml with tiny sizes and budget: train (both phases), evaluate
    (the protocol's fields plus the ELBO perplexity), report."""
    from pathlib import Path

    from tests.conftest import tiny_overrides

    preset = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "t5-vae-cpu.yaml"
    overrides = [
        *tiny_overrides(tiny_corpus, **{"model.name": "t5_vae"}),
        *TINY_T5,
        "train.max_steps=6",
        "train.ae_pretrain_steps=3",
        "train.eval_every=3",
        "train.valid_limit_eval=20",
        "kl.warmup_steps=2",
        "eval.batch_size=16",
        "train.log_every=1",
    ]
    run = tmp_path / "cpu"
    assert cli.main(["train", str(preset), *overrides, "--run-dir", str(run)]) == 0
    phases = [r["phase"] for r in _records(run) if r["type"] == "train"]
    assert "ae" in phases and phases[-1] == "vae"
    assert cli.main(["evaluate", str(run), "--iw-samples", "4", "--max-sentences", "10"]) == 0
    result = json.loads(_only(run.glob("eval-test-*.json")).read_text())
    assert (
        result["ppl_elbo_token"] >= 1 and result["nll"] is not None and result["au_delta"] == 0.01
    )
    assert cli.main(["report", str(run)]) == 0
    assert "T5 from scratch" in (run / "report" / "report.md").read_text()


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.name=t5_vae", "train.ae_pretrain_steps=5"], "train.ae_reset_decoder"),
        (["model.name=t5_vae", "model.backbone=lstm"], "model.backbone"),
        (["model.name=t5_vae", "train.aggressive=true"], "train.aggressive"),
        (["model.name=t5_vae", "model.posterior_flow=planar"], "model.posterior_flow"),
        (["model.name=t5_vae", "model.latent_injection=prefix"], "model.latent_injection"),
        (["model.name=lstm_vae", "model.pretrained=t5-small"], "model.pretrained"),
        (
            ["model.name=lstm_vae", "train.ae_pretrain_steps=5", "train.ae_freeze_decoder=true"],
            "train.ae_freeze_decoder",
        ),
        (["model.name=t5_vae", "train.ae_patience=2"], "train.ae_patience"),
        (["model.name=t5_vae", "model.encoder_token_drop=1.0"], "model.encoder_token_drop"),
        (["model.name=cvrae", "model.encoder_token_drop=0.1"], "model.encoder_token_drop"),
        (["model.name=t5_vae", "model.t5_num_heads=0"], "model.t5_num_heads"),
    ],
)
def test_bad_t5_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)
