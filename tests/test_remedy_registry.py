"""The remedy registry: a remedy that changes the course of training is one class that declares
its own config keys and acts through the loop's hooks; the loop names no remedy.

The toy remedy below lives in this file only (nothing in src/ is edited): registering it adds
its keys to the ``train`` section, a preset and an override set them, and a tiny training shows
it acting (it holds beta, records every hook call in its checkpointed state, logs an event).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import textvae
from tests.conftest import tiny_overrides
from textvae import registry
from textvae.config import ConfigError, load_config, section_class
from textvae.remedies import Remedy, TrainerState
from textvae.rundir import checkpoint_dir, read_log
from textvae.train import train


@dataclass
class HoldBetaKeys:
    """The toy remedy's keys: ``train.hold_beta_steps`` (0 = off) and ``train.hold_beta``."""

    hold_beta_steps: int = 0
    hold_beta: float = 0.0


class HoldBeta(Remedy):
    """Holds the KL weight at ``train.hold_beta`` for the first ``train.hold_beta_steps`` steps
    and counts every hook call in its own state."""

    keys = HoldBetaKeys

    @classmethod
    def enabled(cls, config):
        return config.train.hold_beta_steps > 0

    @classmethod
    def validate(cls, config):
        if config.train.hold_beta < 0:
            raise ConfigError("train.hold_beta must be >= 0")

    def _count(self, hook: str) -> None:
        self.state[hook] = self.state.get(hook, 0) + 1

    def start(self):
        self._count("start")

    def begin_step(self):
        self._count("begin_step")

    def beta(self, beta):
        self._count("beta")
        return (
            self.run.config.train.hold_beta
            if self.run.state.step < self.run.config.train.hold_beta_steps
            else beta
        )

    def before_update(self, batch, batches, beta):
        self._count("before_update")
        return {"held": float(beta == self.run.config.train.hold_beta)}

    def after_backward(self):
        self._count("after_backward")

    def after_step(self, out):
        self._count("after_step")
        assert torch.isfinite(out["loss"])

    def validation(self, metrics):
        self._count("validation")
        self.run.write_log({"type": "event", "event": "hold beta", "step": self.run.state.step})


@pytest.fixture
def hold_beta():
    registry.register_remedy("hold_beta")(HoldBeta)
    yield HoldBeta
    registry.unregister_remedy("hold_beta")


def _preset(tmp_path: Path, tiny_corpus: Path) -> Path:
    items = tiny_overrides(
        tiny_corpus,
        **{"kl.schedule": "constant", "kl.beta_max": 1.0, "train.log_every": 1},
    )
    preset = tmp_path / "hold.yaml"
    preset.write_text("train:\n  hold_beta_steps: 4\n  hold_beta: 0.5\n")
    return preset, items


def test_a_remedy_from_a_test_file_declares_keys_and_acts_on_training(
    hold_beta, tiny_corpus, tmp_path
):
    preset, items = _preset(tmp_path, tiny_corpus)
    cfg = load_config(preset, [*items, "train.hold_beta=0.05", "train.max_steps=3"])
    assert (cfg.train.hold_beta_steps, cfg.train.hold_beta) == (4, 0.05)
    run = train(cfg, tmp_path / "run")
    assert "hold_beta_steps: 4" in (run / "config.yaml").read_text()
    # a resume continues the remedy's own state (checkpointed in TrainerState.remedies)
    train(None, run, resume=True, overrides=["train.max_steps=6"])
    groups = read_log(run)
    betas = {r["step"]: r["beta"] for r in groups["train"]}
    assert betas == {1: 0.05, 2: 0.05, 3: 0.05, 4: 0.05, 5: 1.0, 6: 1.0}
    assert [r["held"] for r in groups["train"]] == [1.0] * 4 + [0.0] * 2  # its train-record key
    assert [e["step"] for e in groups["event"] if e["event"] == "hold beta"] == [3, 6]
    state = torch.load(checkpoint_dir(run, "last") / "custom_checkpoint_0.pkl", weights_only=False)
    calls = state["remedies"]["hold_beta"]
    assert calls["start"] == 2  # once per training: the first and the resumed one
    for hook in ("begin_step", "before_update", "after_backward", "after_step"):
        assert calls[hook] == 6, hook
    assert calls["validation"] == 2 and calls["beta"] >= 6
    best = json.loads((checkpoint_dir(run, "best") / "trainer_state.json").read_text())
    assert best["remedies"]["hold_beta"]["validation"] >= 1
    model, _ = textvae.load(run)
    assert model.config.train.hold_beta == 0.05


def test_a_remedy_validates_its_keys_and_they_exist_only_while_registered(
    hold_beta, tiny_corpus, tmp_path
):
    preset, items = _preset(tmp_path, tiny_corpus)
    with pytest.raises(ConfigError, match="train.hold_beta must be >= 0"):
        load_config(preset, [*items, "train.hold_beta=-1"])
    assert "hold_beta_steps" in {f for f in section_class("train").__dataclass_fields__}
    registry.unregister_remedy("hold_beta")
    with pytest.raises(ConfigError, match="unknown config key 'train.hold_beta_steps'"):
        load_config(preset, items)


def test_a_key_declared_twice_is_an_error(hold_beta):
    @dataclass
    class Clash:
        lr: float = 0.1  # a key of TrainConfig already

    class Clashing(Remedy):
        keys = Clash

    registry.register_remedy("clashing")(Clashing)
    try:
        with pytest.raises(ConfigError, match="'lr' is declared by TrainConfig and Clash"):
            section_class("train")
    finally:
        registry.unregister_remedy("clashing")


def test_a_checkpoint_without_remedy_state_resumes(tiny_corpus, tmp_path):
    """Checkpoints written before TrainerState had ``remedies`` (main before the registry)."""
    cfg = load_config(None, tiny_overrides(tiny_corpus, **{"train.max_steps": 2}))
    run = train(cfg, tmp_path / "run")
    path = checkpoint_dir(run, "last") / "custom_checkpoint_0.pkl"
    saved = torch.load(path, weights_only=False)
    saved.pop("remedies")
    torch.save(saved, path)
    train(None, run, resume=True, overrides=["train.max_steps=4"])
    assert read_log(run)["valid"][-1]["step"] == 4
    state = TrainerState()
    state.load_state_dict(saved)
    assert state.remedies == {}


def test_the_loop_names_no_remedy():
    """train.py calls remedies only through the hooks: of textvae.remedies it uses the state,
    the schedule's beta and the hook base class, nothing remedy-specific."""
    source = (Path(textvae.__file__).parent / "train.py").read_text()
    used = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "remedies"
    }
    assert used <= {"phase_beta", "initial_state"}, used
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    for name in ("update_collapse", "update_aggressive", "ae_phase_over", "aggressive_inner_loop"):
        assert name not in names, name
    assert "collapse_kl" not in names and "ae_patience" not in names
