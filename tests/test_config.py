"""Config loading: presets, inheritance, overrides and clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from textvae.config import ConfigError, load_config

PRESETS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.model.name in (
        "lstm_vae",
        "lstm_lm",
        "cvrae",
        "seq2seq",
        "t5_vae",
        "della",
        "della_cvae",
    )


def test_cpu_preset_inherits_and_overrides_win():
    cfg = load_config(
        Path(__file__).parent.parent / "configs/ptb/lstm-vae-maxpool-cpu.yaml",
        ["train.max_steps=7", "kl.free_bits=0.5"],
    )
    assert cfg.model.pooling == "max" and cfg.model.hidden_dim == 256  # from the chain
    assert cfg.train.max_steps == 7 and cfg.kl.free_bits == 0.5


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.hiden_dim'.*model.hidden_dim"
    ):
        load_config(None, ["model.hiden_dim=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'train.max_step'.*train.max_steps"
    ):
        load_config(bad)


def test_precision_no_is_fp32_even_when_yaml_reads_it_as_false(tmp_path):
    assert load_config(None, ["train.precision=no"]).train.precision == "fp32"
    preset = tmp_path / "p.yaml"
    preset.write_text("eval:\n  precision: no\n")
    assert load_config(preset).eval.precision == "fp32"


def test_type_and_choice_errors():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="model.pooling='median'"):
        load_config(None, ["model.pooling=median"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.pooling"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/preset.yaml")


def test_loading_a_config_imports_no_training_machinery():
    """A config loads without the training loop or the remedies module: the remedies' keys and
    their checks come from the leaf textvae.remedy_keys. (The models, and through them the
    objective, are imported by the model registry: each model's config class lives beside it.)"""
    code = (
        "import sys\n"
        "from textvae.config import load_config\n"
        "config = load_config(None, ['train.ae_pretrain_steps=5', 'train.aggressive=true'])\n"
        "assert config.train.ae_pretrain_steps == 5 and config.train.aggressive\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('textvae'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "textvae.config" in out and "textvae.remedy_keys" in out
    for module in ("textvae.train", "textvae.remedies", "textvae.metrics", "textvae.rundir"):
        assert module not in out, (module, out)


def test_the_remedies_keys_are_checked_by_their_own_classes():
    for overrides, key in (
        (["train.ae_start=first"], "train.ae_start='first' is not one of best, last"),
        (["train.ae_patience=2"], "train.ae_patience needs an autoencoder phase"),
        (["train.ae_pretrain_steps=-1"], "train.ae_pretrain_steps must be >= 0"),
        (["train.aggressive_window=0"], "train.aggressive_window must be >= 1"),
        (["model.name=lstm_lm", "train.ae_pretrain_steps=3"], "no latent variable"),
        (["model.name=lstm_lm", "kl.target=3"], "so kl.target cannot be used"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, overrides)
