"""Training loop, run folders, resume, divergence, save/load and the CLI end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file

import textvae
from tests.conftest import tiny_overrides
from textvae import cli
from textvae.config import ConfigError
from textvae.data import TextDataset
from textvae.metrics import evaluate
from textvae.rundir import RunDirError
from textvae.train import TrainingDiverged, train


def _final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_config, tmp_path):
    # word dropout and decoder dropout make the run depend on the RNG state too
    extra = dict(**{"train.eval_every": 5, "model.word_dropout": 0.2, "train.batch_size": 32})
    whole = train(tiny_config(**extra, **{"train.max_steps": 16}), tmp_path / "whole")
    part = train(
        tiny_config(**extra, **{"train.max_steps": 10}), tmp_path / "part"
    )  # "interrupted"
    train(None, part, resume=True, overrides=["train.max_steps=16"])
    a, b = _final_weights(whole), _final_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    va = [r for r in map(json.loads, open(whole / "log.jsonl")) if r["type"] == "valid"][-1]
    vb = [r for r in map(json.loads, open(part / "log.jsonl")) if r["type"] == "valid"][-1]
    assert va["elbo"] == vb["elbo"] and va["step"] == vb["step"] == 16


def test_resume_refuses_to_change_the_maths(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 3}), tmp_path / "r")
    with pytest.raises(ConfigError, match="model.latent_dim"):
        train(None, run, resume=True, overrides=["model.latent_dim=8"])
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(None, tmp_path / "empty", resume=True)


def test_existing_run_folder_is_never_overwritten(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not empty"):
        train(tiny_config(**{"train.max_steps": 2}), run)
    assert (run / "precious.txt").read_text() == "keep me" and len(list(run.iterdir())) == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    from textvae.models import base

    run = train(tiny_config(**{"train.max_steps": 4, "train.eval_every": 2}), tmp_path / "nan")
    before = _final_weights(run)
    real_elbo, calls = base.elbo, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_elbo(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(base, "elbo", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5"):
        train(None, run, resume=True, overrides=["train.max_steps=10"])
    after = _final_weights(run)  # the last good checkpoint (step 4) is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    events = [json.loads(line) for line in open(run / "log.jsonl")]
    assert events[-1]["event"] == "non-finite loss"


def test_load_round_trip_gives_identical_outputs(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 5}), tmp_path / "run")
    model, tok = textvae.load(run)
    again, _ = textvae.load(run)
    texts = ["the cat sat on the mat", "a dog ran"]
    q1, q2 = model.encode(texts), again.encode(texts)
    assert torch.equal(q1.mean, q2.mean) and torch.equal(q1.stddev, q2.stddev)
    assert q1.mean.shape == (2, 4)
    ds = TextDataset(texts, tok)
    r1, r2 = evaluate(model, ds, iw_samples=5), evaluate(again, ds, iw_samples=5)
    assert r1 == r2


def test_overfit_a_few_sentences(tiny_config, tmp_path):
    (tmp_path / "few.txt").write_text(
        "the cat sat on the mat\na dog ran under the log\nbig red cat\n"
    )
    cfg = tiny_config(
        **{
            "data.train_path": str(tmp_path / "few.txt"),
            "data.valid_path": str(tmp_path / "few.txt"),
            "model.dec_dropout_in": 0.0,
            "model.dec_dropout_out": 0.0,
            "model.hidden_dim": 32,
            "train.max_steps": 300,
            "train.batch_size": 3,
            "train.eval_every": 300,
            "kl.schedule": "constant",
            "kl.beta_max": 0.1,
        }
    )
    run = train(cfg, tmp_path / "overfit")
    model, tok = textvae.load(run, which="last")
    from textvae.generate import reconstruct

    texts = ["the cat sat on the mat", "a dog ran under the log", "big red cat"]
    assert reconstruct(model, texts) == texts
    valid = [json.loads(line) for line in open(run / "log.jsonl") if '"valid"' in line][-1]
    assert valid["rec"] < 1.0  # nats per sentence, from ~15 at the start


def test_cli_end_to_end(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "cli-run"
    overrides = tiny_overrides(tiny_corpus, **{"train.max_steps": 12, "train.eval_every": 6})
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  name: lstm_vae\n  pooling: max\n")
    assert cli.main(["train", str(preset), *overrides, "--run-dir", str(run)]) == 0
    for name in (
        "config.yaml",
        "log.jsonl",
        "samples.txt",
        "data.json",
        "tokenizer/tokenizer.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/last/model.safetensors",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    train_rec = next(r for r in records if r["type"] == "train")
    assert {"step", "loss", "rec", "kl", "beta", "lr"} <= set(train_rec)
    valid = [r for r in records if r["type"] == "valid"]
    assert [r["step"] for r in valid] == [6, 12] and {"elbo", "kl", "mi", "au"} <= set(valid[0])
    # a second train into the same folder is refused, with a non-zero exit
    assert cli.main(["train", str(preset), *overrides, "--run-dir", str(run)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["evaluate", str(run), "--iw-samples", "7", "--max-sentences", "10"]) == 0
    result = json.loads((run / "eval-test-10-K7-fp32.json").read_text())  # named by what it is
    assert result["iw_samples"] == 7 and result["n_sentences"] == 10
    assert "nats/sentence" in capsys.readouterr().out
    sentence_file = tmp_path / "in.txt"
    sentence_file.write_text("the cat sat\na dog ran\n")
    for args, n_lines in (
        (["--mode", "sample", "-n", "3", "--strategy", "sample", "--top-p", "0.9"], 3),
        (["--mode", "reconstruct", "--input", str(sentence_file), "--strategy", "beam"], 2),
        (
            [
                "--mode",
                "interpolate",
                "--input",
                "the cat sat",
                "a dog ran",
                "-n",
                "4",
                "--interpolation",
                "spherical",
            ],
            4,
        ),
    ):
        assert cli.main(["generate", str(run), *args]) == 0
        assert len(capsys.readouterr().out.splitlines()) == n_lines, args
    assert cli.main(["train", "--resume", "--run-dir", str(run), "train.max_steps=14"]) == 0
    assert json.loads(open(run / "log.jsonl").readlines()[-1])["step"] == 14


def test_two_runs_with_different_precision_in_one_process(tiny_config, tmp_path):
    """accelerate's state is a singleton that refuses a second mixed-precision setting."""
    train(tiny_config(**{"train.max_steps": 2, "train.precision": "bf16"}), tmp_path / "a")
    run = train(tiny_config(**{"train.max_steps": 2, "train.precision": "no"}), tmp_path / "b")
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()


def test_language_model_trains_and_evaluates_exactly(tiny_config, tmp_path):
    run = train(tiny_config(**{"model.name": "lstm_lm", "train.max_steps": 4}), tmp_path / "lm")
    model, tok = textvae.load(run)
    assert not model.has_latent
    r = evaluate(model, TextDataset(["the cat sat"], tok), iw_samples=500)
    assert r["iw_samples"] is None and r["nll"] == pytest.approx(r["rec"])


class _Stop(Exception):
    pass


def _lrs(run_dir) -> dict[int, float]:
    return {
        r["step"]: r["lr"]
        for r in map(json.loads, open(run_dir / "log.jsonl"))
        if r["type"] == "train"
    }


def test_cosine_lr_follows_sgdr_over_the_vae_phase_and_resumes_exactly(tiny_config, tmp_path):
    """train.lr_scheduler=cosine: held at lr in the autoencoder phase, then lr_min + (lr -
    lr_min)(1 + cos(pi s / S)) / 2 over the VAE phase's S steps; an interrupted run resumed with
    the same budget ends bit-identical to the uninterrupted one."""
    import math

    extra = {
        "train.lr_scheduler": "cosine",
        "train.lr": 0.01,
        "train.lr_min": 0.001,
        "train.max_steps": 30,
        "train.ae_pretrain_steps": 10,
        "train.eval_every": 5,
        "train.log_every": 1,
        "model.word_dropout": 0.2,
    }
    whole = train(tiny_config(**extra), tmp_path / "whole")
    lrs = _lrs(whole)
    # the logged lr is the one after the step's scheduler update, i.e. the next step's
    for step in range(1, 10):
        assert lrs[step] == pytest.approx(0.01)
    for step in range(10, 31):
        s = step - 10
        want = 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * s / 20))
        assert lrs[step] == pytest.approx(want, rel=1e-6), step
    assert lrs[30] == pytest.approx(0.001)

    def stop_at_15(record):
        if record["step"] == 15:
            raise _Stop

    with pytest.raises(_Stop):
        train(tiny_config(**extra), tmp_path / "part", on_validation=stop_at_15)
    train(None, tmp_path / "part", resume=True)
    a, b = _final_weights(whole), _final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _lrs(tmp_path / "part") == lrs


def test_training_output_off_a_terminal_and_on_resume_of_a_finished_run(
    tiny_config, tmp_path, capsys, caplog
):
    """No progress bar when stderr is not a terminal; an LM logs its validation NLL and no KL or
    KL weight (it has neither); resuming a finished run says so and changes nothing."""
    caplog.set_level("INFO", logger="textvae.train")
    run = train(
        tiny_config(
            **{"model.name": "lstm_lm", "train.max_steps": 6, "train.eval_every": 3},
            **{"train.progress": "true"},
        ),
        tmp_path / "lm",
    )
    err = capsys.readouterr().err
    assert "\r" not in err and "train:" not in err  # pytest's stderr is not a terminal
    assert any(m.startswith("step 3: valid nll") for m in caplog.messages)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] in ("train", "valid")]
    assert {r["type"] for r in logged} == {"train", "valid"}
    assert not any("beta" in r or ("kl" in r and r["type"] == "train") for r in logged)
    log_before = (run / "log.jsonl").read_text()
    caplog.clear()
    train(None, run, resume=True)
    assert any("finished at step 6" in m for m in caplog.messages)
    assert (run / "log.jsonl").read_text() == log_before
