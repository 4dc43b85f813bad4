"""Per-model configs: each model declares its own config beside its code, ``model.name`` selects
it through the registry, config.py knows no model, and a new model is one file."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import textvae
import textvae.data
import textvae.models
from tests.conftest import tiny_overrides
from textvae import registry
from textvae.config import (
    LEGACY_MODEL_KEYS,
    ConfigError,
    config_from_dict,
    load_config,
    model_keys,
    save_config,
)
from textvae.models import MODELS

SRC = Path(textvae.__file__).parent


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_name_selects_the_models_own_config_class(name, tmp_path):
    cfg = load_config(None, [f"model.name={name}"])
    assert type(cfg.model) is MODELS[name].config_class
    assert cfg.model.name == name
    # the config class lives beside its model, in the model's module
    assert MODELS[name].config_class.__module__ == MODELS[name].__module__
    # its keys round-trip through a run folder's config.yaml
    save_config(cfg, tmp_path / "config.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    assert list(saved["model"]) == model_keys(type(cfg.model))
    assert config_from_dict(saved) == cfg


def test_each_model_declares_only_the_keys_it_reads():
    keys = {name: set(model_keys(cls.config_class)) for name, cls in MODELS.items()}
    assert keys["lstm_lm"] == {
        "name",
        "backbone",
        "embed_dim",
        "hidden_dim",
        "dec_dropout_in",
        "dec_dropout_out",
        "word_dropout",
    }
    assert "latent_dim" not in keys["seq2seq"] and "z_skip" not in keys["seq2seq"]
    assert "classifier_weight" in keys["lstm_vae"] and "classifier_weight" not in keys["cvrae"]
    assert "fusion" in keys["della"] and "fusion" not in keys["t5_vae"]
    # hidden_dim meant the LSTM's hidden size and, for the Transformer models, the bag-of-words
    # MLP's width: the latter is now bow_hidden, and hidden_dim belongs to the LSTM models only
    assert {n for n, k in keys.items() if "hidden_dim" in k} == {
        "lstm_vae",
        "lstm_lm",
        "cvrae",
        "seq2seq",
    }
    assert {n for n, k in keys.items() if "bow_hidden" in k} == {
        "lstm_vae",
        "cvrae",
        "t5_vae",
        "della",
        "della_cvae",
    }
    assert set().union(*keys.values()) - {"bow_hidden"} == LEGACY_MODEL_KEYS


def test_unknown_key_names_the_file_and_the_chosen_models_valid_keys(tmp_path):
    preset = tmp_path / "d.yaml"
    preset.write_text("model:\n  name: della\n  fusoin: lmf\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    message = str(err.value)
    assert str(preset) in message and "unknown config key 'model.fusoin'" in message
    valid = message.split("Valid keys of 'della': ")[1].split(", ")
    assert valid == [f"model.{k}" for k in model_keys(MODELS["della"].config_class)]
    assert "model.fusion" in valid and "model.hidden_dim" not in valid  # della's keys only


def test_a_key_of_another_model_is_an_error_naming_it():
    # silently ignored before per-model configs: della never read the LSTM's embed_dim
    with pytest.raises(ConfigError, match=r"'model.embed_dim' for model.name='della' \(a key of "):
        load_config(None, ["model.name=della", "model.embed_dim=16"])
    with pytest.raises(ConfigError, match=r"'model.fusion'.*a key of della, della_cvae"):
        load_config(None, ["model.name=lstm_vae", "model.fusion=lmf"])
    with pytest.raises(ConfigError, match=r"'model.hidden_dim'.*renamed: use model.bow_hidden"):
        load_config(None, ["model.name=t5_vae", "model.hidden_dim=16"])
    assert load_config(None, ["model.name=t5_vae", "model.bow_hidden=16"]).model.bow_hidden == 16


def test_a_preset_may_switch_model_but_overrides_are_strict(tmp_path):
    """lstm-lm.yaml inherits lstm-vae.yaml: the VAE preset's latent keys are dropped when a later
    layer switches to the LM; the same key given after the switch is an error."""
    (tmp_path / "vae.yaml").write_text(
        "model:\n  name: lstm_vae\n  latent_dim: 8\n  pooling: max\n  hidden_dim: 64\n"
    )
    (tmp_path / "lm.yaml").write_text("inherit: vae.yaml\nmodel:\n  name: lstm_lm\n")
    cfg = load_config(tmp_path / "lm.yaml")
    assert cfg.model.name == "lstm_lm" and cfg.model.hidden_dim == 64  # shared key kept
    assert not hasattr(cfg.model, "pooling")
    # a sweep entry switching the model on top of a VAE preset
    assert load_config(tmp_path / "vae.yaml", ["model.name=lstm_lm"]).model.hidden_dim == 64
    with pytest.raises(ConfigError, match="'model.pooling' for model.name='lstm_lm'"):
        load_config(tmp_path / "lm.yaml", ["model.pooling=max"])
    (tmp_path / "bad.yaml").write_text(
        "inherit: vae.yaml\nmodel:\n  name: lstm_lm\n  pooling: max\n"
    )
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'model.pooling'"):
        load_config(tmp_path / "bad.yaml")


def test_a_run_folder_written_with_the_flat_model_config_still_loads():
    """Before per-model configs every config.yaml held all 48 model keys; the keys the chosen
    model does not declare are dropped, and della's/t5_vae's hidden_dim is their bow_hidden."""
    flat = {
        "name": "della",
        "embed_dim": 512,
        "hidden_dim": 16,
        "latent_dim": 4,
        "pooling": "first",
        "posterior_flow": "none",
        "t5_d_model": 512,
        "latent_injection": "memory",
        "classifier_weight": 0.0,
        "gpt2_n_embd": 16,
        "gpt2_n_head": 2,
        "fusion": "lmf",
    }
    cfg = config_from_dict({"model": flat})
    assert type(cfg.model) is MODELS["della"].config_class
    assert cfg.model.bow_hidden == 16 and cfg.model.fusion == "lmf" and cfg.model.latent_dim == 4
    lm = config_from_dict({"model": {**flat, "name": "lstm_lm", "hidden_dim": 32}})
    assert lm.model.hidden_dim == 32 and not hasattr(lm.model, "latent_dim")
    # a key that was never a model key is still an error
    with pytest.raises(ConfigError, match="'model.colour'"):
        config_from_dict({"model": {**flat, "colour": "red"}})


def _string_constants(tree: ast.AST) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_config_module_knows_no_model_and_imports_none():
    tree = ast.parse((SRC / "config.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(m.startswith("textvae.models") for m in imported), imported
    names = re.compile(r"\b(" + "|".join(sorted(MODELS)) + r")\b")
    named = [s for s in _string_constants(tree) if names.search(s)]
    assert not named, named
    # the registry is a leaf: it imports nothing of textvae at import time
    tree = ast.parse((SRC / "registry.py").read_text())
    assert not any(
        isinstance(node, ast.ImportFrom) and (node.module or "").startswith("textvae")
        for node in ast.walk(tree)
    )


TOY_MODEL = '''
"""A toy bigram language model: one new file, registered by its own decorator."""

from dataclasses import dataclass

import torch
from torch import nn

from textvae.config import Config, ConfigError, ModelConfig
from textvae.decoders import sequence_log_prob
from textvae.models.base import TextVAE
from textvae.registry import register_model


@dataclass
class ToyConfig(ModelConfig):
    name: str = "toy_bigram"
    width: int = 8

    def validate(self, config: Config) -> None:
        if self.width < 1:
            raise ConfigError("model.width must be >= 1")
        super().validate(config)


@register_model("toy_bigram", ToyConfig)
class ToyBigram(TextVAE):
    has_latent = False

    def __init__(self, cfg: ToyConfig, tokenizer):
        super().__init__(tokenizer)
        self.latent_dim = 0
        self.embed = nn.Embedding(self.vocab_size, cfg.width)
        self.output = nn.Linear(cfg.width, self.vocab_size)

    def posterior(self, batch):
        raise ValueError("toy_bigram has no latent variable")

    def prior(self, batch=None):
        raise ValueError("toy_bigram has no latent variable")

    def log_likelihood(self, batch, z=None):
        targets, mask = batch["input_ids"], batch["attention_mask"]
        inputs = torch.cat([torch.full_like(targets[:, :1], self.bos_id), targets[:, :-1]], 1)
        return sequence_log_prob(self.embed(inputs), self.output, targets, mask).unsqueeze(0)

    def decode_step(self, z, input_ids, state):
        return self.output(self.embed(input_ids)), (input_ids.unsqueeze(1),)
'''


@pytest.fixture
def toy_model_file(tmp_path, monkeypatch):
    """A model module in a folder on ``textvae.models.__path__``: what adding a file to
    ``src/textvae/models/`` does, without writing into the source tree."""
    folder = tmp_path / "more_models"
    folder.mkdir()
    (folder / "toy_bigram.py").write_text(textwrap.dedent(TOY_MODEL))
    monkeypatch.setattr(textvae.models, "__path__", [*textvae.models.__path__, str(folder)])
    yield
    registry.unregister_model("toy_bigram")
    sys.modules.pop("textvae.models.toy_bigram", None)


def test_a_new_model_is_one_file_found_by_discovery(toy_model_file, tiny_corpus, tmp_path):
    assert "toy_bigram" not in MODELS
    cfg = load_config(None, tiny_overrides(tiny_corpus, **{"model.name": "toy_bigram"}))
    assert "toy_bigram" in MODELS and type(cfg.model).__name__ == "ToyConfig"
    assert cfg.model.width == 8  # its own default; the LSTM sizes were not its keys
    with pytest.raises(ConfigError, match=r"Valid keys of 'toy_bigram': model.name, .*model.width"):
        load_config(None, ["model.name=toy_bigram", "model.widht=3"])
    with pytest.raises(ConfigError, match="model.width must be >= 1"):
        load_config(None, ["model.name=toy_bigram", "model.width=0"])
    # it trains, is saved and loads back through the same registry
    from textvae.train import train

    run = train(
        load_config(
            None,
            tiny_overrides(tiny_corpus, **{"model.name": "toy_bigram", "train.max_steps": 2}),
        ),
        tmp_path / "run",
    )
    model, tokenizer = textvae.load(run)
    assert type(model).__name__ == "ToyBigram" and model.embed.weight.shape[1] == 8
    batch = textvae.data.encode_texts(tokenizer, ["the cat sat", "a dog"])
    assert model.log_likelihood(batch).shape == (1, 2)
