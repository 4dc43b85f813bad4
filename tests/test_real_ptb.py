"""Real-data smoke tests: a few steps of the CPU presets on PTB and Yelp, then the protocol,
the probe and the report."""

import json
from pathlib import Path

import pytest

from textvae import cli
from textvae.data import data_dir

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "lstm-vae-maxpool-cpu.yaml"


def _only(paths):
    """The one path of an iterator (the one evaluation a test wrote)."""
    (path,) = list(paths)
    return path


@pytest.fixture
def ptb_present():
    if not (data_dir() / "ptb" / "ptb.train.txt").is_file():
        pytest.skip("PTB not under TEXTVAE_DATA_DIR")


def test_ptb_cpu_preset_trains_and_evaluates(ptb_present, tmp_path, capsys):
    run = tmp_path / "ptb"
    assert (
        cli.main(
            [
                "train",
                str(PRESET),
                "data.train_limit=2000",
                "train.max_steps=30",
                "train.valid_limit_eval=100",
                "train.progress=false",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    assert json.loads((run / "data.json").read_text())["train"]["sentences"] == 2000
    assert (
        cli.main(
            [
                "evaluate",
                str(run),
                "--iw-samples",
                "10",
                "--max-sentences",
                "40",
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    r = json.loads(_only(run.glob("eval-test-*.json")).read_text())
    assert r["n_sentences"] == 40 and r["n_tokens"] == r["n_words"]  # word-level: one token a word
    assert r["nll"] <= -r["elbo"] + 3 * r["nll_stderr"]
    assert 1 < r["ppl_word"] < 20000  # vocabulary is 10k


def test_yelp_preset_trains_probes_and_reports(tmp_path, capsys):
    if not (data_dir() / "yelp_sentiment" / "sentiment.test.0").is_file():
        pytest.skip("Yelp sentiment not under TEXTVAE_DATA_DIR")
    run = tmp_path / "yelp"
    preset = PRESET.parent.parent / "yelp" / "lstm-vae-cpu.yaml"
    assert (
        cli.main(
            [
                "train",
                str(preset),
                "data.train_limit=3000",
                "train.max_steps=40",
                "train.eval_every=20",
                "train.valid_limit_eval=200",
                "train.progress=false",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    data = json.loads((run / "data.json").read_text())
    assert (
        "sentiment.test.0" in data["train"]["source"]
        and "sentiment.dev.1" in data["valid"]["source"]
    )
    capsys.readouterr()
    assert (
        cli.main(
            [
                "probe",
                str(run),
                "--data",
                "yelp_sentiment",
                "--labels",
                "100,all",
                "--max-sentences",
                "1500",
                "--repeats",
                "2",
            ]
        )
        == 0
    )
    record = json.loads((run / "probe-yelp_sentiment.json").read_text())
    assert "sentiment.test" in record["fit"] and "sentiment.dev" in record["score"]
    assert [r["n"] for r in record["results"]] == [100, 1500]
    assert 0.3 < record["results"][-1]["majority"] < 0.7  # interleaved: both classes present
    assert cli.main(["report", str(run), "--max-sentences", "300"]) == 0
    assert "first 300 sentences of the valid split" in (run / "report" / "report.md").read_text()
    assert (run / "report" / "latent_pca.png").is_file()
