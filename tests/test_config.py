"""Config loading: presets, inheritance, overrides and clear errors."""

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
