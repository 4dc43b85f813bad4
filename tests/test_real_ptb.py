"""Real-data smoke test: a few steps of the CPU preset on PTB, then the protocol."""

import json
from pathlib import Path

import pytest

from textvae import cli
from textvae.data import data_dir

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "lstm-vae-maxpool-cpu.yaml"


@pytest.fixture
def ptb_present():
    if not (data_dir() / "ptb" / "ptb.train.txt").is_file():
        pytest.skip("PTB not under TEXTVAE_DATA_DIR")


def test_ptb_cpu_preset_trains_and_evaluates(ptb_present, tmp_path, capsys):
    run = tmp_path / "ptb"
    assert cli.main(["train", str(PRESET), "data.train_limit=2000",
                     "train.max_steps=30", "train.valid_limit_eval=100", "train.progress=false",
                     "--run-dir", str(run)]) == 0
    assert json.loads((run / "data.json").read_text())["train"]["sentences"] == 2000
    assert cli.main(["evaluate", str(run), "--iw-samples", "10", "--max-sentences", "40",
                     "--precision", "bf16"]) == 0
    r = json.loads((run / "eval-test.json").read_text())
    assert r["n_sentences"] == 40 and r["n_tokens"] == r["n_words"]  # word-level: one token a word
    assert r["nll"] <= -r["elbo"] + 3 * r["nll_stderr"]
    assert 1 < r["ppl_word"] < 20000  # vocabulary is 10k
