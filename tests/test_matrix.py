"""bench/matrix.py: the remedy matrix end to end on the tiny corpus, and its presets."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from textvae.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _load_matrix():
    spec = importlib.util.spec_from_file_location("bench_matrix", ROOT / "bench" / "matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_matrix"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix()


@pytest.mark.parametrize("name", [n for n, e in matrix.ENTRIES.items() if e.preset])
def test_matrix_entries_equal_their_preset_yamls(name):
    entry = matrix.ENTRIES[name]
    from_preset = load_config(ROOT / "configs" / "ptb" / entry.preset)
    from_entry = load_config(matrix.DEFAULT_BASE, entry.overrides)
    assert dataclasses.asdict(from_preset) == dataclasses.asdict(from_entry)


def test_matrix_trains_evaluates_and_writes_one_table(tiny_corpus, tmp_path, capsys):
    common = [o for o in tiny_overrides(tiny_corpus) if not o.startswith("data.")]
    out = tmp_path / "matrix"
    argv = ["--entries", "lm,vae,bn,flow", "--corpus", str(tiny_corpus), "--max-steps", "4",
            "--iw-samples", "3", "--eval-sentences", "10", "--out-dir", str(out)]
    for item in common:
        argv += ["--set", item]
    assert matrix.main(argv) == 0
    table = (out / "matrix.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| entry | settings | rec | kl | nll ± stderr | ppl_word | mi")
    body = {row.split(" | ")[0][2:]: row for row in rows[1:]}
    assert list(body) == ["lm", "vae", "bn", "flow"]
    for name in ("lm", "vae", "bn", "flow"):
        result = json.loads((out / name / "eval-test.json").read_text())
        record = json.loads((out / name / "matrix.json").read_text())
        assert result["n_sentences"] == 10
        cells = body[name].strip("| ").split(" | ")
        assert cells[2] == f"{result['rec']:.2f}"  # the table shows the run's own evaluation
        assert cells[4] == f"{result['nll']:.2f} ± {result['nll_stderr']:.2f}"
        assert float(cells[-2]) == pytest.approx(record["train_s"], abs=0.5)
        assert record["eval"] == result
        steps = [json.loads(line)["step"] for line in open(out / name / "log.jsonl")]
        assert max(steps) == 4
    assert result["iw_samples"] == 3 and cells[9] == "3"
    assert "exact" in body["lm"] and "–" in body["lm"].split(" | ")[3]  # LM: exact NLL, no KL
    bn_config = (out / "bn" / "config.yaml").read_text()
    assert "posterior_bn_gamma: 0.6" in bn_config and "max_steps: 4" in bn_config
    assert "name: lstm_lm" in (out / "lm" / "config.yaml").read_text()

    # a second invocation reuses finished entries: nothing is retrained or overwritten
    weights = out / "bn" / "checkpoints" / "last" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert matrix.main(argv) == 0
    assert weights.stat().st_mtime_ns == stamp
    assert (out / "matrix.md").read_text() == table
    assert "reusing" in capsys.readouterr().out

    # an existing run folder without a finished record is never touched
    (out / "cyclical").mkdir()
    (out / "cyclical" / "precious.txt").write_text("keep")
    assert matrix.main(argv[:1] + ["lm,cyclical"] + argv[2:]) == 1
    assert "left untouched" in capsys.readouterr().err
    assert [p.name for p in (out / "cyclical").iterdir()] == ["precious.txt"]


def test_matrix_scales_ae_pretraining_to_the_step_budget():
    args = matrix.build_parser().parse_args(["--max-steps", "100"])
    settings = matrix.entry_settings("aepretrain", args)
    assert "train.ae_pretrain_steps=20" in settings and "train.ae_pretrain_steps=1315" not in settings
    assert matrix.entry_settings("bn", args) == ["model.posterior_bn_gamma=0.6"]
    full = matrix.entry_overrides("bn", matrix.build_parser().parse_args(
        ["--corpus", "ptb", "--max-epochs", "2", "--set", "train.seed=3"]))
    assert full == ["data.corpus=ptb", "model.posterior_bn_gamma=0.6", "train.max_epochs=2",
                    "train.seed=3"]


def test_settings_column_shows_the_values_the_run_used():
    """A common --set of an entry's own key wins at training time, so the table must show it."""
    record = {"entry": "aggressive",
              "settings": ["train.aggressive=true", "train.aggressive_max_inner=100"],
              "overrides": ["train.aggressive=true", "train.aggressive_max_inner=100",
                            "train.max_steps=20", "train.aggressive_max_inner=10"]}
    assert matrix.effective_settings(record) == ["train.aggressive=true",
                                                 "train.aggressive_max_inner=10"]
    assert matrix.effective_settings({"settings": ["kl.free_bits=0.1"]}) == ["kl.free_bits=0.1"]

