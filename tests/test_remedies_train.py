"""Training-schedule remedies: aggressive inference-network training (He et al. 2019) and
autoencoder pretraining with a decoder reset (Li et al. 2019), and their exact resume."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import textvae
from tests.conftest import make_sentences
from textvae import remedies
from textvae import train as train_module
from textvae.config import KLConfig, TrainConfig, section_class
from textvae.data import TextDataset
from textvae.models import MODELS, base
from textvae.objectives import ObjectiveSettings, elbo, kl_weight
from textvae.remedies import TrainerState, aggressive_inner_loop, phase_beta, update_aggressive
from textvae.train import train


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def _trainer_state(run_dir) -> dict:
    """The TrainerState of the last checkpoint (accelerate's first registered custom object)."""
    path = run_dir / "checkpoints" / "last" / "custom_checkpoint_0.pkl"
    return torch.load(path, weights_only=False)


def _final(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


# --- aggressive training: the inner loop --------------------------------------------------------


def _tiny_batches(tokenizer, n=6):
    ds = TextDataset(make_sentences(16 * n, seed=3), tokenizer)
    return [ds.collate(list(range(i, i + 16))) for i in range(0, 16 * n, 16)]


def test_inner_loop_is_bounded_and_updates_only_the_inference_network(tiny_model, tokenizer):
    model = tiny_model("lstm_vae", bow_weight=0.5, posterior_bn_gamma=0.5).train()
    enc_opt = torch.optim.Adam(model.inference_parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, drawn = _tiny_batches(tokenizer), []

    def draw(i):
        drawn.append(i)
        return batches[i % len(batches)]

    n = aggressive_inner_loop(
        model,
        enc_opt,
        draw,
        lambda b: elbo(model, b, ObjectiveSettings(beta=1.0))["loss"],
        max_inner=7,
        window=1000,
        grad_clip=5.0,
    )
    assert n == 7 and drawn == list(range(7))  # never more than max_inner steps
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(model.is_inference_key(k) for k in changed), changed
    assert "encoder.lstm.weight_ih_l0" in changed and "posterior_head.mu.weight" in changed
    for key in before:  # decoder and BoW head untouched by the inner steps
        if not model.is_inference_key(key):
            assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())  # no stale gradients left behind


@pytest.mark.parametrize(
    ("losses", "window", "expect"),
    [
        ([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2], 2, 9),  # always improving: max_inner
        ([1.0, 1.0, 2.0, 2.0, 0.0, 0.0], 2, 4),  # window 2 worse than window 1: stop after it
        ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3, 6),  # equal is not worse (He et al.: pre - cur < 0)
        ([3.0, 2.0, 2.5, 1.0, 9.0, 9.0, 1.0, 1.0, 1.0], 3, 6),
    ],
)
def test_inner_loop_stops_when_the_window_loss_stops_improving(
    tiny_model, tokenizer, losses, window, expect
):
    """The scripted losses are per sentence; every batch has the same token count, so the
    per-token window means compare like the scripted values."""
    model = tiny_model("lstm_vae").train()
    enc_opt = torch.optim.SGD(model.inference_parameters(), lr=0.0)
    batch = _tiny_batches(tokenizer, 1)[0]
    anchor = next(iter(model.inference_parameters()))
    calls = []

    def loss_of(b):
        calls.append(1)
        return anchor.sum() * 0 + losses[len(calls) - 1]

    n = aggressive_inner_loop(
        model,
        enc_opt,
        lambda i: batch,
        loss_of,
        max_inner=len(losses),
        window=window,
        grad_clip=0.0,
    )
    assert n == expect == len(calls)


def test_inner_loop_stops_on_the_loss_summed_over_processes(tiny_model, tokenizer):
    """With several processes the stop is decided on all their batches together: here the local
    loss improves, a simulated other process's gets worse by more, so all stop after 2 windows."""
    model = tiny_model("lstm_vae").train()
    enc_opt = torch.optim.SGD(model.inference_parameters(), lr=0.0)
    batch = _tiny_batches(tokenizer, 1)[0]
    anchor = next(iter(model.inference_parameters()))
    tokens = float(batch["attention_mask"].sum())
    local = iter([4.0, 3.0, 2.0, 1.0, 0.5, 0.4])
    remote = iter([0.0, 50.0, 100.0])  # the other process's window loss sums (per window)

    def all_sum(sums):
        return sums + torch.tensor([next(remote) * 16, tokens], dtype=torch.float64)

    n = aggressive_inner_loop(
        model,
        enc_opt,
        lambda i: batch,
        lambda b: anchor.sum() * 0 + next(local),
        max_inner=6,
        window=1,
        grad_clip=0.0,
        all_sum=all_sum,
    )
    assert n == 2
    assert (
        aggressive_inner_loop(
            model,
            enc_opt,
            lambda i: batch,
            lambda b: anchor.sum() * 0 + 1.0,
            max_inner=6,
            window=1,
            grad_clip=0.0,
        )
        == 6
    )


def test_aggressive_switch_off_rule():
    state = TrainerState(aggressive=True)
    assert not update_aggressive(state, -0.01)  # first validation: nothing to compare with
    assert not update_aggressive(state, 0.5) and state.aggressive
    assert not update_aggressive(state, 0.5) and state.aggressive  # equal is not a decrease
    assert update_aggressive(state, 0.49) and not state.aggressive
    assert not update_aggressive(state, 3.0) and not state.aggressive  # off for good
    assert state.last_mi == 0.49


def test_aggressive_run_switches_off_when_validation_mi_falls(tiny_config, tmp_path, monkeypatch):
    real_evaluate, script = train_module.evaluate, iter([0.5, 0.7, 0.6, 0.9])

    def scripted(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        out["mi"] = next(script)
        return out

    monkeypatch.setattr(train_module, "evaluate", scripted)
    cfg = tiny_config(
        **{
            "train.aggressive": "true",
            "train.aggressive_max_inner": 3,
            "train.aggressive_window": 1,
            "train.max_steps": 8,
            "train.eval_every": 2,
            "train.log_every": 1,
        }
    )
    run = train(cfg, tmp_path / "aggr")
    records = _records(run)
    assert all("phase" in r and "aggressive" in r for r in records)
    steps = {r["step"]: r for r in records if r["type"] == "train"}
    assert all(steps[s]["aggressive"] and 1 <= steps[s]["inner_steps"] <= 3 for s in range(1, 7))
    assert all(not steps[s]["aggressive"] and steps[s]["inner_steps"] == 0 for s in (7, 8))
    off = [r for r in records if r.get("event") == "aggressive off"]
    assert (
        len(off) == 1 and off[0]["step"] == 6 and off[0]["mi"] == 0.6 and off[0]["last_mi"] == 0.7
    )
    state = _trainer_state(run)
    assert state["aggressive"] is False and state["last_mi"] == 0.6
    # both optimizers are checkpointed (decoder side, inference network)
    assert {"optimizer.bin", "optimizer_1.bin"} <= {
        p.name for p in (run / "checkpoints" / "last").iterdir()
    }


def test_while_aggressive_the_outer_step_updates_the_decoder_side_only(
    tiny_config, tmp_path, monkeypatch
):
    """He et al. 2019, Algorithm 1: in aggressive mode the model update after the inner loop
    is theta (decoder) only. With the inner loop stubbed out the encoder must stay at its
    initialisation while the decoder trains."""
    monkeypatch.setattr(remedies, "aggressive_inner_loop", lambda *args, **kwargs: 1)
    cfg = tiny_config(**{"train.aggressive": "true", "train.max_steps": 4, "train.seed": 5})
    run = train(cfg, tmp_path / "outer")
    assert _trainer_state(run)["aggressive"] is True
    final = _final(run)
    _, tokenizer = textvae.load(run)
    torch.manual_seed(5)
    init = MODELS["lstm_vae"](cfg.model, tokenizer).state_dict()
    for key in final:
        same = torch.equal(final[key], init[key])
        assert same == key.startswith(("encoder.", "posterior_head.")), key


# --- autoencoder pretraining, then the VAE phase ------------------------------------------------


def test_phase_beta_counts_the_schedule_from_the_phase_start():
    kl = KLConfig(schedule="linear", beta_start=0.1, warmup_steps=10)
    assert phase_beta(TrainerState(step=7, phase="ae"), kl) == 0.0
    assert phase_beta(TrainerState(step=30, phase="vae", phase_start=30), kl) == kl_weight(0, kl)
    assert phase_beta(TrainerState(step=35, phase="vae", phase_start=30), kl) == kl_weight(5, kl)


def test_ae_pretraining_keeps_kl_weight_zero_then_resets_the_decoder(
    tiny_config, tmp_path, monkeypatch
):
    betas, snaps = [], {}
    real_elbo, real_reset = base.elbo, remedies.reset_generative

    def spy_elbo(model, batch, settings):
        betas.append(settings.beta)
        return real_elbo(model, batch, settings)

    def spy_reset(model, config, tokenizer):
        snaps["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        keys = real_reset(model, config, tokenizer)
        snaps["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        snaps["keys"], snaps["config"], snaps["tokenizer"] = keys, config, tokenizer
        return keys

    monkeypatch.setattr(base, "elbo", spy_elbo)
    monkeypatch.setattr(remedies, "reset_generative", spy_reset)
    cfg = tiny_config(
        **{
            "train.ae_pretrain_steps": 5,
            "train.max_steps": 8,
            "train.log_every": 1,
            "kl.beta_start": 0.1,
            "kl.warmup_steps": 20,
            "model.bow_weight": 0.3,
            "train.seed": 3,
        }
    )
    run = train(cfg, tmp_path / "ae")
    assert betas[:5] == [0.0] * 5  # the autoencoder phase never weighs the KL
    assert betas[5:] == [kl_weight(i, cfg.kl) for i in range(3)]  # the schedule restarts
    records = _records(run)
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["phase"] for r in train_recs] == ["ae"] * 5 + ["vae"] * 3
    assert all(r["beta"] == 0.0 for r in train_recs[:5]) and train_recs[5]["beta"] == 0.1
    assert all("phase" in r for r in records)
    event = next(r for r in records if r.get("event") == "phase")
    assert event["step"] == 5 and event["phase"] == "vae" and event["reset"] == len(snaps["keys"])
    # the hand-off re-draws the decoder side: equal to a fresh model under the seed ...
    torch.manual_seed(3)
    fresh = MODELS["lstm_vae"](snaps["config"].model, snaps["tokenizer"]).state_dict()
    before, after = snaps["before"], snaps["after"]
    generative = [k for k in after if not k.startswith(("encoder.", "posterior_head."))]
    assert sorted(generative) == snaps["keys"] and any(
        k.startswith("bow_head.") for k in generative
    )
    for key in generative:
        assert torch.equal(after[key], fresh[key]), key
    # ... so it differs from the trained phase-1 decoder, while the pretrained encoder is kept
    assert not torch.equal(before["decoder.lstm.weight_ih_l0"], after["decoder.lstm.weight_ih_l0"])
    assert not torch.equal(before["decoder.output.weight"], after["decoder.output.weight"])
    for key in after:
        if key not in generative:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(after["encoder.lstm.weight_ih_l0"], fresh["encoder.lstm.weight_ih_l0"])
    state = _trainer_state(run)
    assert state["phase"] == "vae" and state["phase_start"] == 5


def test_resume_across_the_phase_boundary_with_all_remedies_is_exact(tiny_config, tmp_path):
    """AE pretraining, aggressive training, BN-VAE, min rate and BoW composed; interrupted at
    the hand-off and after it, resumed, the run ends where the uninterrupted one does."""
    extra = {
        "train.eval_every": 3,
        "train.ae_pretrain_steps": 6,
        "train.aggressive": "true",
        "train.aggressive_max_inner": 3,
        "train.aggressive_window": 1,
        "model.word_dropout": 0.2,
        "model.posterior_bn_gamma": 0.5,
        "model.min_rate_delta": 0.05,
        "model.bow_weight": 0.5,
        "train.batch_size": 32,
    }
    whole = train(tiny_config(**extra, **{"train.max_steps": 12}), tmp_path / "whole")
    finals = {}
    for stop in (6, 9):  # at the boundary (checkpoint still in phase ae) and after it
        part = train(tiny_config(**extra, **{"train.max_steps": stop}), tmp_path / f"part{stop}")
        assert _trainer_state(part)["phase"] == ("ae" if stop == 6 else "vae")
        train(None, part, resume=True, overrides=["train.max_steps=12"])
        finals[stop] = part
    a = _final(whole)
    for stop, part in finals.items():
        b = _final(part)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stop, key)
        va = [r for r in _records(whole) if r["type"] == "valid"][-1]
        vb = [r for r in _records(part) if r["type"] == "valid"][-1]
        assert va["elbo"] == vb["elbo"] and vb["step"] == 12 and vb["phase"] == "vae"
        assert _trainer_state(part) == _trainer_state(whole)


# --- the remedies' pieces, one by one (textvae.remedies) -----------------------------------------


def test_a_new_run_starts_in_the_autoencoder_phase_only_when_asked():
    assert remedies.initial_state(TrainConfig()) == TrainerState(phase="vae", aggressive=False)
    assert remedies.initial_state(TrainConfig(aggressive=True)).aggressive
    ae = remedies.initial_state(TrainConfig(ae_pretrain_steps=5, aggressive=True))
    assert ae.phase == "ae" and not ae.aggressive  # aggressive starts with the VAE phase


def test_the_collapse_watch_warns_after_patience_validations_in_a_row():
    # the collapse watch declares its keys (train.collapse_*): the train section's class
    TrainConfig = section_class("train")  # noqa: N806
    t = TrainConfig(collapse_kl=0.5, collapse_z_gap=0.1, collapse_patience=2)
    state = TrainerState()
    assert not remedies.update_collapse(state, 0.1, 1.0, t)  # low KL: 1 in a row
    assert remedies.update_collapse(state, 2.0, 0.05, t)  # low gap: 2 in a row, warn
    assert remedies.update_collapse(state, 0.1, None, t) and state.collapsed_validations == 3
    assert not remedies.update_collapse(state, 2.0, None, t)  # a missing gap never counts
    assert state.collapsed_validations == 0
    off = TrainConfig(collapse_kl=0.5, collapse_patience=0)
    assert not remedies.update_collapse(TrainerState(), 0.0, 0.0, off)  # patience 0: no warning


def test_the_autoencoder_phase_keeps_its_best_rec_and_stops_early():
    state = TrainerState(phase="ae")
    assert remedies.ae_best_improved(state, 5.0, patience=0) and state.ae_best_rec == 5.0
    assert not remedies.ae_best_improved(state, 5.0, patience=0)  # equal is no improvement
    state = TrainerState(phase="ae")  # with early stopping update_ae_early_stop records the best
    assert remedies.ae_best_improved(state, 5.0, patience=2) and state.ae_best_rec == math.inf
    assert not remedies.update_ae_early_stop(state, 5.0, 2) and state.ae_best_rec == 5.0
    assert not remedies.update_ae_early_stop(state, 6.0, 2)
    assert remedies.update_ae_early_stop(state, 5.5, 2) and state.ae_stopped
    assert remedies.ae_phase_over(state, TrainConfig(ae_pretrain_steps=100))  # stopped early
    assert not remedies.ae_best_improved(TrainerState(phase="vae"), 1.0, patience=0)
    t = TrainConfig(ae_pretrain_steps=10)
    assert not remedies.ae_phase_over(TrainerState(phase="ae", step=9), t)
    assert remedies.ae_phase_over(TrainerState(phase="ae", step=10), t)
    assert not remedies.ae_phase_over(TrainerState(phase="vae", step=10), t)


def test_the_hand_off_resets_decoder_optimizers_schedules_and_state(tiny_config, tokenizer):
    config = tiny_config(
        **{"train.ae_pretrain_steps": 4, "train.aggressive": "true", "train.lr": 0.003}
    )
    torch.manual_seed(config.train.seed)
    model = MODELS["lstm_vae"](config.model, tokenizer)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    fresh_schedule = copy.deepcopy(sched.state_dict())
    batch = _tiny_batches(tokenizer, 1)[0]
    for loss in (1.0, 2.0, 3.0):  # trained a little; the plateau schedule halves the LR
        model(batch)["loss"].backward()
        opt.step()
        sched.step(loss)
    assert opt.state and opt.param_groups[0]["lr"] < 0.003
    state = TrainerState(step=4, phase="ae", best_valid=1.0, collapsed_validations=2, last_mi=0.3)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    reset = remedies.start_vae_phase(
        model, config, tokenizer, state, [opt], [sched], [fresh_schedule]
    )
    assert reset and not opt.state and opt.param_groups[0]["lr"] == 0.003
    assert sched.state_dict() == fresh_schedule
    assert state == TrainerState(step=4, phase="vae", phase_start=4, aggressive=True)
    for key, value in model.state_dict().items():  # the encoder kept, the rest as initialised
        expect = trained[key] if model.is_inference_key(key) else fresh[key]
        assert torch.equal(value, expect), key
    assert set(reset) == {k for k in fresh if not model.is_inference_key(k)}


def test_aggressive_picks_repeat_for_a_step_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    picks = remedies.aggressive_picks(seed=3, step=17, n_batches=5, max_inner=50)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert picks.shape == (50,) and 0 <= int(picks.min()) and int(picks.max()) < 5
    assert torch.equal(picks, remedies.aggressive_picks(3, 17, 5, 50))
    assert not torch.equal(picks, remedies.aggressive_picks(3, 18, 5, 50))
