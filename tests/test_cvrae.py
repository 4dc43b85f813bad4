"""The conditional VRAE: dialogue data, conditional batch shapes, response generation and the
respond CLI on a tiny dialogue corpus."""

import json

import pytest
import torch

import textvae
from tests.conftest import dialogue_overrides, make_dialogues, make_sentences, tiny_overrides
from textvae import cli
from textvae.config import ConfigError, DataConfig, load_config
from textvae.data import (
    DataError,
    TextDataset,
    context_string,
    dialogue_pairs,
    encode_contexts,
    load_split,
    split_utterances,
)
from textvae.generate import respond
from textvae.metrics import EVAL_KEYS, RESPONSE_KEYS, evaluate, response_metrics
from textvae.objectives import ObjectiveSettings
from textvae.train import train


def _only(paths):
    """The one path of an iterator (the one evaluation a test wrote)."""
    (path,) = list(paths)
    return path


def test_utterances_pairs_and_context_window():
    line = "Hi , Tom . __eou__ Hello ! __eou__  How are you ?  __eou__ Fine . __eou__\n"
    utterances = split_utterances(line)
    assert utterances == ["Hi , Tom .", "Hello !", "How are you ?", "Fine ."]
    contexts, responses = dialogue_pairs([utterances], window=2)
    assert responses == ["Hello !", "How are you ?", "Fine ."]
    assert contexts == ["Hi , Tom .", "Hi , Tom . __eou__ Hello !", "Hello ! __eou__ How are you ?"]
    assert context_string(utterances, 1) == "Fine ."


def test_dailydialog_by_name_and_explicit_dialogue_files(tiny_dialogues, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    cfg = DataConfig(
        corpus="dailydialog",
        train_split="test",
        valid_split="validation",
        context_window=2,
        max_length=3,
        long_policy="drop",
        valid_limit=5,
    )
    train_split = load_split(cfg, "train")
    lines = make_dialogues(60, 0)
    n_pairs = sum(len(split_utterances(line)) - 1 for line in lines)
    assert train_split.stats["dialogues"] == 60
    assert len(train_split.texts) + train_split.stats["dropped"] == n_pairs
    assert all(len(t.split()) <= 3 for t in train_split.texts)
    assert len(train_split.contexts) == len(train_split.texts)
    assert all(c.count("__eou__") <= 1 for c in train_split.contexts)  # window 2: one separator
    assert len(load_split(cfg, "valid").texts) == 5
    with pytest.raises(DataError, match="train not shipped|not found"):
        load_split(DataConfig(corpus="dailydialog"), "train")
    explicit = DataConfig(
        corpus=None,
        train_path=str(tiny_dialogues / "dailydialog" / "test" / "dialogues_test.txt"),
        format="dialogue",
    )
    assert load_split(explicit, "train").stats["dialogues"] == 60


def test_conditional_batch_shapes(tiny_model, tiny_batch, tokenizer):
    model = tiny_model("cvrae")
    b, t = tiny_batch["input_ids"].shape
    assert (
        tiny_batch["context_ids"].shape[0] == b
        and tiny_batch["context_mask"].shape == tiny_batch["context_ids"].shape
    )
    q, p = model.posterior(tiny_batch), model.prior(tiny_batch)
    assert q.batch_shape == p.batch_shape == (b,) and q.event_shape == p.event_shape == (4,)
    z = q.sample((3,))
    assert model.log_likelihood(tiny_batch, z).shape == (3, b)
    # the decoder sees the context: the same z with another context gives other likelihoods
    swapped = dict(
        tiny_batch,
        context_ids=tiny_batch["context_ids"].roll(1, 0),
        context_mask=tiny_batch["context_mask"].roll(1, 0),
    )
    assert not torch.allclose(model.log_likelihood(swapped, z), model.log_likelihood(tiny_batch, z))
    with pytest.raises(ValueError, match="context_ids"):
        model.posterior({k: v for k, v in tiny_batch.items() if not k.startswith("context")})
    contexts = encode_contexts(tokenizer, ["the cat __eou__ a dog", "red"])
    assert contexts["context_ids"].shape[0] == 2 and set(contexts) == {
        "context_ids",
        "context_mask",
    }


@pytest.mark.parametrize(
    "flows",
    [
        {},
        {"posterior_flow": "iaf", "prior_flow": "iaf"},
        {"posterior_flow": "planar", "z_skip": True},
    ],
)
def test_conditional_model_with_flows_trains_and_evaluates(
    flows, tiny_model, tiny_batch, tokenizer
):
    model = tiny_model("cvrae", flow_hidden=8, posterior_flow_steps=2, prior_flow_steps=1, **flows)
    model.train()
    model(tiny_batch, ObjectiveSettings(beta=1.0))["loss"].backward()
    model.eval()
    ds = TextDataset(make_sentences(6, seed=5), tokenizer, contexts=make_sentences(6, seed=8))
    r = evaluate(model, ds, iw_samples=6, batch_size=3)
    assert tuple(r) == EVAL_KEYS and r["nll"] <= -r["elbo"] + 3 * r["nll_stderr"] + 1e-6
    expected = None if not flows else 6
    assert r["kl_samples"] == expected  # closed form only with two Gaussians
    groups = respond(model, ["the cat __eou__ a dog", "big red mat"], 3, strategy="sample")
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    assert len(respond(model, ["a dog"], 2, strategy="beam", beam_size=2)[0]) == 2


def test_response_metrics_fields(tiny_model):
    model = tiny_model("cvrae")
    out = response_metrics(model, ["the cat", "a dog ran"], ["the mat", "a log"], n_responses=2)
    assert tuple(out) == RESPONSE_KEYS and 0 <= out["response_bleu"] <= 100
    assert out["generation"]["responses_per_context"] == 2
    with pytest.raises(ValueError, match="not a conditional"):
        response_metrics(tiny_model("lstm_vae"), ["a"], ["b"])


def test_cvrae_needs_a_dialogue_corpus(tiny_corpus, tmp_path):
    config = load_config(None, tiny_overrides(tiny_corpus, **{"model.name": "cvrae"}))
    with pytest.raises(ConfigError, match="dialogue corpus"):
        train(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="model.min_rate_delta"):
        load_config(None, ["model.name=cvrae", "model.min_rate_delta=0.1"])


def test_respond_cli_on_a_tiny_dialogue_corpus(tiny_dialogues, tmp_path, monkeypatch, capsys):
    """Train a tiny cvrae on the 'test' split, evaluate on 'validation' with response metrics,
    and answer a context file with N responses per context."""
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    overrides = dialogue_overrides(
        "model.name=cvrae",
        "model.posterior_flow=iaf",
        "model.posterior_flow_steps=2",
        "model.prior_flow=iaf",
        "model.prior_flow_steps=1",
        "model.flow_hidden=8",
        "model.z_skip=true",
        "model.embed_noise=0.5",
        "train.max_steps=6",
        "train.eval_every=3",
    )
    run = tmp_path / "run"
    preset = tmp_path / "cvrae.yaml"
    preset.write_text("model:\n  name: cvrae\n")
    assert cli.main(["train", str(preset), *overrides, "--run-dir", str(run)]) == 0
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    samples = (run / "samples.txt").read_text()
    assert "responses (context => response)" in samples and " => " in samples
    capsys.readouterr()
    assert (
        cli.main(
            [
                "evaluate",
                str(run),
                "--split",
                "test",
                "--iw-samples",
                "4",
                "--max-sentences",
                "8",
                "--generation",
                "--gen-sentences",
                "4",
                "--gen-responses",
                "3",
            ]
        )
        == 0
    )
    result = json.loads(_only(run.glob("eval-test-*.json")).read_text())
    assert result["n_sentences"] == 8 and result["kl_samples"] == 4
    assert result["generation"]["contexts"] == 4 and 0 <= result["response_bleu"] <= 100
    assert "validation" in result["data"]  # the test role is played by the validation split
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("the cat sat __eou__ a dog ran __eou__\nbig red mat\n")
    capsys.readouterr()
    assert (
        cli.main(["generate", str(run), "--mode", "respond", "--input", str(contexts), "-n", "3"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 * (1 + 3)
    assert (
        out[0] == "# context: the cat sat __eou__ a dog ran" and out[4] == "# context: big red mat"
    )
    model, _ = textvae.load(run)
    assert model.conditional and model.config.data.corpus == "dailydialog"
    with pytest.raises(SystemExit):
        cli.main(["generate", str(run), "--mode", "sample"])


def test_report_of_a_conditional_run(tiny_dialogues, tmp_path, monkeypatch):
    from textvae.report import write_report

    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    overrides = dialogue_overrides("model.name=cvrae", "train.max_steps=4")
    run = train(load_config(None, overrides), tmp_path / "run")
    folder = write_report(run, max_sentences=20, n_examples=2)
    md = (folder / "report.md").read_text()
    assert "| context | reference | responses |" in md
    assert (folder / "kl_per_dim.png").read_bytes()[:4] == b"\x89PNG"


def test_seq2seq_baseline_is_exact_and_conditional(tiny_model, tiny_batch, tokenizer):
    """The baseline without latent: p(x|c) depends on c, its NLL is exact (rec = nll, no KL),
    greedy responses are one response repeated, sampled ones differ."""
    model = tiny_model("seq2seq")
    ll = model.log_likelihood(tiny_batch, None)
    swapped = dict(
        tiny_batch,
        context_ids=tiny_batch["context_ids"].roll(1, 0),
        context_mask=tiny_batch["context_mask"].roll(1, 0),
    )
    assert not torch.allclose(model.log_likelihood(swapped, None), ll)
    with pytest.raises(ValueError, match="context_ids"):
        model.log_likelihood({k: v for k, v in tiny_batch.items() if not k.startswith("context")})
    ds = TextDataset(make_sentences(6, seed=5), tokenizer, contexts=make_sentences(6, seed=8))
    r = evaluate(model, ds, iw_samples=6, batch_size=3)
    assert r["kl"] is None and r["iw_samples"] is None
    assert r["nll"] == pytest.approx(r["rec"]) and r["nll"] > 0
    greedy = respond(model, ["the cat __eou__ a dog"], 4, strategy="greedy")[0]
    assert len(greedy) == 4 and len(set(greedy)) == 1
    torch.manual_seed(0)
    sampled = respond(model, ["the cat __eou__ a dog"], 6, strategy="sample")[0]
    assert len(set(sampled)) > 1
    out = response_metrics(model, ["the cat", "a dog ran"], ["the mat", "a log"], n_responses=2)
    assert out["generation"]["latent"] == "none" and 0 <= out["response_bleu"] <= 100


def test_seq2seq_trains_evaluates_and_responds_from_the_cli(
    tiny_dialogues, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tiny_dialogues))
    overrides = dialogue_overrides("train.max_steps=4", "train.eval_every=2")
    preset = tmp_path / "seq2seq.yaml"
    preset.write_text("model:\n  name: seq2seq\n")
    run = tmp_path / "run"
    assert cli.main(["train", str(preset), *overrides, "--run-dir", str(run)]) == 0
    assert " => " in (run / "samples.txt").read_text()
    assert (
        cli.main(
            [
                "evaluate",
                str(run),
                "--split",
                "test",
                "--max-sentences",
                "8",
                "--generation",
                "--gen-sentences",
                "4",
                "--gen-responses",
                "2",
                "--gen-strategy",
                "sample",
            ]
        )
        == 0
    )
    result = json.loads(_only(run.glob("eval-test-*.json")).read_text())
    assert result["n_sentences"] == 8 and result["kl"] is None
    assert result["generation"]["latent"] == "none" and result["generation"]["contexts"] == 4
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
                "--strategy",
                "sample",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2
    from textvae.report import write_report

    md = (write_report(run, max_sentences=10, n_examples=2) / "report.md").read_text()
    assert "no latent: three samples each" in md
    with pytest.raises(ConfigError, match="model.z_skip"):
        load_config(preset, ["model.z_skip=true"])
