"""Live tracking (``train.log_with``) through accelerate's trackers; TensorBoard offline."""

from __future__ import annotations

import json

import pytest

from textvae.config import ConfigError, load_config
from textvae.train import train


def test_tensorboard_event_files_hold_the_log_scalars(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(
        tiny_config(
            **{
                "train.log_with": "tensorboard",
                "train.max_steps": 10,
                "train.eval_every": 5,
                "train.num_samples": 0,
            }
        ),
        tmp_path / "run",
    )
    events = EventAccumulator(str(run / "tensorboard" / "textvae"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    checked = 0
    for record in log:
        if record["type"] not in ("train", "valid"):
            continue
        keys = (
            ("loss", "rec", "kl", "beta", "lr")
            if record["type"] == "train"
            else ("elbo", "kl", "mi", "au", "z_gap")
        )
        for key in keys:
            tag = f"{record['type']}/{key}"
            assert tag in tags, tag
            values = {e.step: e.value for e in events.Scalars(tag)}
            # TensorBoard keeps float32; log.jsonl (the record) keeps the float64
            assert values[record["step"]] == pytest.approx(record[key], rel=1e-6, abs=1e-6), tag
            checked += 1
    assert checked == 2 * 5 + 2 * 5  # steps 5 and 10: a train and a valid record each


def test_no_tracker_by_default_and_unknown_ones_refused(tiny_config, tmp_path, monkeypatch):
    run = train(tiny_config(**{"train.max_steps": 2, "train.num_samples": 0}), tmp_path / "run")
    assert not (run / "tensorboard").exists()
    with pytest.raises(ConfigError, match="train.log_with"):
        load_config(None, ["train.log_with=neptune"])
    # a tracker whose package is missing is an error, not accelerate's warning and no tracking
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"textvae\[wandb\]"):
        train(tiny_config(**{"train.log_with": "wandb"}), tmp_path / "wandb")
    assert not (tmp_path / "wandb").exists()
