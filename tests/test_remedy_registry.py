"""The remedy registry: a remedy that changes the course of training is one class that declares
its own config keys (a RemedyKeys dataclass with its checks) and acts through the loop's hooks;
the loop names no remedy.

The toy remedy below lives in this file only (nothing in src/ is edited): registering it adds
its keys to the ``train`` section, a preset and an override set them, and a tiny training shows
it acting (it holds beta, records every hook call in its checkpointed state, logs an event).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

import textvae
from tests.conftest import tiny_overrides
from textvae import registry, remedies
from textvae.config import ConfigError, load_config, section_class
from textvae.remedies import Remedy
from textvae.remedy_keys import RemedyKeys
from textvae.rundir import checkpoint_dir, read_log
from textvae.train import TrainerState, train


@dataclass
class HoldBetaKeys(RemedyKeys):
    """The toy remedy's keys: ``train.hold_beta_steps`` (0 = off) and ``train.hold_beta``."""

    hold_beta_steps: int = 0
    hold_beta: float = 0.0

    @classmethod
    def validate(cls, config):
        if config.train.hold_beta < 0:
            raise ConfigError("train.hold_beta must be >= 0")


class HoldBeta(Remedy):
    """Holds the KL weight at ``train.hold_beta`` for the first ``train.hold_beta_steps`` steps
    and counts every hook call in its own state."""

    keys = HoldBetaKeys

    @classmethod
    def enabled(cls, config):
        return config.train.hold_beta_steps > 0

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
    class Clash(RemedyKeys):
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


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, scopes)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def test_the_loop_names_no_remedy():
    """train.py calls remedies only through the interface: of textvae.remedies it imports the
    hook base class and the phase it asks the remedies for, and nothing else (no allow-list):
    no remedy class or function, no remedy's name, config key or state key, in code or in a
    string (docstrings aside)."""
    tree = ast.parse((Path(textvae.__file__).parent / "train.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "textvae.remedies"
        for alias in node.names
    }
    assert imported == {"Remedy", "Phase"}, imported
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert "remedies" not in modules and "textvae.remedies" not in modules, modules
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    docstrings = _docstrings(tree)
    strings = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }
    own = {
        name
        for name, value in vars(remedies).items()
        if getattr(value, "__module__", None) == "textvae.remedies"
    }
    assert own >= {"AEPretraining", "update_collapse", "aggressive_inner_loop", "reset_generative"}
    assert not (own - {"Remedy", "Phase"}) & names
    registry.discover_remedies()
    keys = {f.name for cls in registry.REMEDY_KEYS.values() for f in fields(cls)}
    assert {"ae_pretrain_steps", "aggressive", "collapse_kl"} <= keys
    state_keys = {k for cls in registry.REMEDIES.values() for k in cls.legacy_state}
    assert {"phase", "phase_start", "last_mi", "collapsed_validations"} <= state_keys
    assert not keys & names, keys & names
    assert not (keys | state_keys | set(registry.REMEDIES) | {"ae", "vae"}) & strings
