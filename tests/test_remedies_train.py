"""Training-schedule remedies: aggressive inference-network training (He et al. 2019) and
autoencoder pretraining with a decoder reset (Li et al. 2019), their state, optimizers and
phases through the remedy interface, and their exact resume (also from checkpoints of the
layout before the remedies kept their own state)."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import textvae
from tests.conftest import make_sentences
from textvae import remedies
from textvae import train as train_module
from textvae.config import KLConfig
from textvae.data import TextDataset
from textvae.models import MODELS, base
from textvae.objectives import ObjectiveSettings, elbo, kl_weight
from textvae.remedies import Phase, aggressive_inner_loop, update_aggressive
from textvae.remedy_keys import AEPretrainingKeys, CollapseWatchKeys
from textvae.train import TrainerState, train


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def _trainer_state(run_dir) -> dict:
    """The TrainerState of the last checkpoint (accelerate's first registered custom object)."""
    path = run_dir / "checkpoints" / "last" / "custom_checkpoint_0.pkl"
    return torch.load(path, weights_only=False)


def _remedy_state(run_dir, name: str) -> dict:
    """The state of remedy ``name`` in the last checkpoint."""
    return _trainer_state(run_dir)["remedies"][name]


def _run_of(config, **fields) -> train_module._Run:
    """The loop's run of ``config`` as a new run starts (remedies enabled, their state), without
    data, model or accelerator unless given in ``fields``."""
    given = {
        "run_dir": None,
        "accelerator": None,
        "model": None,
        "raw": None,
        "tokenizer": None,
        "train_ds": None,
        "valid_ds": None,
        "objective": None,
        "on_validation": None,
        "steps_per_epoch": 0,
        "total": 0,
        **fields,
    }
    run = train_module._Run(config=config, state=TrainerState(), **given)
    train_module._enable_remedies(run)
    return run


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
    state = {"aggressive": True, "last_mi": None}
    assert not update_aggressive(state, -0.01)  # first validation: nothing to compare with
    assert not update_aggressive(state, 0.5) and state["aggressive"]
    assert not update_aggressive(state, 0.5) and state["aggressive"]  # equal is not a decrease
    assert update_aggressive(state, 0.49) and not state["aggressive"]
    assert not update_aggressive(state, 3.0) and not state["aggressive"]  # off for good
    assert state["last_mi"] == 0.49


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
    assert _remedy_state(run, "aggressive") == {"aggressive": False, "last_mi": 0.6}
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
    assert _remedy_state(run, "aggressive")["aggressive"] is True
    final = _final(run)
    _, tokenizer = textvae.load(run)
    torch.manual_seed(5)
    init = MODELS["lstm_vae"](cfg.model, tokenizer).state_dict()
    for key in final:
        same = torch.equal(final[key], init[key])
        assert same == key.startswith(("encoder.", "posterior_head.")), key


# --- autoencoder pretraining, then the VAE phase ------------------------------------------------


def test_the_kl_schedule_counts_from_the_phase_start():
    kl = KLConfig(schedule="linear", beta_start=0.1, warmup_steps=10)

    def beta(step: int, phase: Phase) -> float:  # the loop's beta, with no remedy's own
        run = SimpleNamespace(
            phase=phase, state=TrainerState(step=step), config=SimpleNamespace(kl=kl), remedies=[]
        )
        return train_module._Run.beta(run)

    assert beta(7, Phase(autoencoder=True)) == 0.0
    assert beta(30, Phase(start=30)) == kl_weight(0, kl)
    assert beta(35, Phase(start=30)) == kl_weight(5, kl)
    assert beta(35, Phase()) == kl_weight(35, kl)
    # autoencoder pretraining reports its phase from its own state
    state = TrainerState(remedies={"ae_pretraining": {"phase": "vae", "phase_start": 30}})
    assert remedies.AEPretraining(SimpleNamespace(state=state)).phase() == Phase(start=30)


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
    state = _remedy_state(run, "ae_pretraining")
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
        assert _remedy_state(part, "ae_pretraining")["phase"] == ("ae" if stop == 6 else "vae")
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


def test_a_new_run_starts_in_the_autoencoder_phase_only_when_asked(tiny_config):
    plain = _run_of(tiny_config())
    assert plain.phase == Phase() and [r.name for r in plain.remedies] == ["collapse_watch"]
    assert plain.log_fields() == {"phase": "vae", "aggressive": False}  # off: the defaults
    assert plain.state.remedies == {"collapse_watch": {"collapsed_validations": 0}}
    aggressive = _run_of(tiny_config(**{"train.aggressive": "true"}))
    assert aggressive.state.remedies["aggressive"] == {"aggressive": True, "last_mi": None}
    assert aggressive.log_fields() == {"phase": "vae", "aggressive": True}
    ae = _run_of(tiny_config(**{"train.ae_pretrain_steps": 5, "train.aggressive": "true"}))
    assert ae.phase == Phase(start=0, autoencoder=True)
    assert ae.log_fields() == {"phase": "ae", "aggressive": False}  # on with the VAE phase
    assert ae.state.remedies["ae_pretraining"] == {
        "phase": "ae",
        "phase_start": 0,
        "ae_best_rec": math.inf,
        "ae_bad_validations": 0,
        "ae_stopped": False,
    }


def test_aggressive_training_has_its_own_optimizer_for_the_inference_network(
    tiny_config, tiny_model
):
    model = tiny_model("lstm_vae", bow_weight=0.5)
    run = _run_of(tiny_config(**{"train.aggressive": "true"}), raw=model)
    main, own = train_module._parameter_groups(run)
    inference = model.inference_parameters()
    assert [name for name, _ in own] == ["aggressive"]
    assert [id(p) for p in own[0][1]] == [id(p) for p in inference]
    assert {id(p) for p in main} == {id(p) for p in model.parameters()} - {id(p) for p in inference}
    assert train_module._parameter_groups(_run_of(tiny_config(), raw=model))[1] == []


def test_the_collapse_watch_warns_after_patience_validations_in_a_row():
    t = CollapseWatchKeys(collapse_kl=0.5, collapse_z_gap=0.1, collapse_patience=2)
    state = {"collapsed_validations": 0}
    assert not remedies.update_collapse(state, 0.1, 1.0, t)  # low KL: 1 in a row
    assert remedies.update_collapse(state, 2.0, 0.05, t)  # low gap: 2 in a row, warn
    assert remedies.update_collapse(state, 0.1, None, t) and state["collapsed_validations"] == 3
    assert not remedies.update_collapse(state, 2.0, None, t)  # a missing gap never counts
    assert state["collapsed_validations"] == 0
    off = CollapseWatchKeys(collapse_kl=0.5, collapse_patience=0)
    assert not remedies.update_collapse({"collapsed_validations": 0}, 0.0, 0.0, off)


def _ae_state(phase: str = "ae") -> dict:
    state = {"phase": phase, "phase_start": 0, "ae_best_rec": math.inf}
    return {**state, "ae_bad_validations": 0, "ae_stopped": False}


def test_the_autoencoder_phase_keeps_its_best_rec_and_stops_early():
    state = _ae_state()
    assert remedies.ae_best_improved(state, 5.0, patience=0) and state["ae_best_rec"] == 5.0
    assert not remedies.ae_best_improved(state, 5.0, patience=0)  # equal is no improvement
    state = _ae_state()  # with early stopping update_ae_early_stop records the best
    assert remedies.ae_best_improved(state, 5.0, patience=2) and state["ae_best_rec"] == math.inf
    assert not remedies.update_ae_early_stop(state, 5.0, 2) and state["ae_best_rec"] == 5.0
    assert not remedies.update_ae_early_stop(state, 6.0, 2)
    assert remedies.update_ae_early_stop(state, 5.5, 2) and state["ae_stopped"]
    assert remedies.ae_phase_over(state, 0, AEPretrainingKeys(ae_pretrain_steps=100))
    assert not remedies.ae_best_improved(_ae_state("vae"), 1.0, patience=0)
    t = AEPretrainingKeys(ae_pretrain_steps=10)
    assert not remedies.ae_phase_over(_ae_state(), 9, t)
    assert remedies.ae_phase_over(_ae_state(), 10, t)
    assert not remedies.ae_phase_over(_ae_state("vae"), 10, t)


def test_the_hand_off_resets_decoder_optimizers_schedules_and_state(
    tiny_config, tokenizer, tmp_path
):
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
    run = _run_of(
        config,
        raw=model,
        tokenizer=tokenizer,
        run_dir=tmp_path,
        accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
    )
    run.optimizer, run.schedulers, run.fresh_schedules = opt, [sched], [fresh_schedule]
    run.state.step, run.state.best_valid = 4, 1.0
    run.state.remedies["collapse_watch"]["collapsed_validations"] = 2
    run.state.remedies["aggressive"]["last_mi"] = 0.3
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    next(r for r in run.remedies if r.name == "ae_pretraining").hand_off()
    assert not opt.state and opt.param_groups[0]["lr"] == 0.003
    assert sched.state_dict() == fresh_schedule
    assert run.state.best_valid == math.inf and run.phase == Phase(start=4)
    assert run.state.remedies == {
        "collapse_watch": {"collapsed_validations": 0},
        "ae_pretraining": {**_ae_state("vae"), "phase_start": 4},
        "aggressive": {"aggressive": True, "last_mi": None},
    }
    for key, value in model.state_dict().items():  # the encoder kept, the rest as initialised
        expect = trained[key] if model.is_inference_key(key) else fresh[key]
        assert torch.equal(value, expect), key


def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(tiny_config, tmp_path):
    """Checkpoints written before the remedies kept their own state (e.g. by a training started
    from an older checkout) hold ``phase``, ``aggressive``, ``collapsed_validations``, ... at
    the top level of the trainer state and an empty ``remedies``: a resume gives each remedy its
    keys and continues exactly as from the current layout."""
    extra = {
        "train.eval_every": 3,
        "train.ae_pretrain_steps": 6,
        "train.aggressive": "true",
        "train.aggressive_max_inner": 3,
        "train.aggressive_window": 1,
        "train.batch_size": 32,
    }
    whole = train(tiny_config(**extra, **{"train.max_steps": 12}), tmp_path / "whole")
    part = train(tiny_config(**extra, **{"train.max_steps": 9}), tmp_path / "part")
    path = part / "checkpoints" / "last" / "custom_checkpoint_0.pkl"
    saved = torch.load(path, weights_only=False)
    old = {k: v for k, v in saved.items() if k != "remedies"}
    for state in saved["remedies"].values():
        old.update(state)
    old["remedies"] = {}
    assert old["phase"] == "vae" and old["phase_start"] == 6 and "last_mi" in old
    state = TrainerState()
    state.load_state_dict(old)
    assert state.remedies == {} and state.step == 9 and state.legacy["phase"] == "vae"
    assert "legacy" not in state.state_dict()
    torch.save(old, path)
    train(None, part, resume=True, overrides=["train.max_steps=12"])
    a, b = _final(whole), _final(part)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _trainer_state(part) == _trainer_state(whole)  # saved again in the current layout


def test_aggressive_picks_repeat_for_a_step_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    picks = remedies.aggressive_picks(seed=3, step=17, n_batches=5, max_inner=50)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert picks.shape == (50,) and 0 <= int(picks.min()) and int(picks.max()) < 5
    assert torch.equal(picks, remedies.aggressive_picks(3, 17, 5, 50))
    assert not torch.equal(picks, remedies.aggressive_picks(3, 18, 5, 50))
