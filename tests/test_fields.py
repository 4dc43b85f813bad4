"""One table of evaluation fields (textvae/fields.py): every evaluation table is rendered from it,
so a field given a column there appears in report.md, compare.md and sweep.md at once."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import tiny_overrides
from textvae import fields
from textvae.cli import main
from textvae.config import load_config
from textvae.report import compare_runs, evaluation_table, write_report
from textvae.sweep import SweepError, load_sweep, run_sweep
from textvae.train import train

HEADER = "PPL per token (test column)"


def _add_column(monkeypatch) -> None:
    """Give ``ppl_token`` (in every evaluation JSON, in no table today) a column."""
    patched = tuple(
        f._replace(column=HEADER, format="{:.4f}") if f.name == "ppl_token" else f
        for f in fields.EVAL_FIELDS
    )
    monkeypatch.setattr(fields, "EVAL_FIELDS", patched)
    monkeypatch.setattr(fields, "TABLE_COLUMNS", (*fields.TABLE_COLUMNS, "ppl_token"))


def test_table_columns_are_fields_with_headers():
    columns = fields.table_fields()
    assert [f.name for f in columns] == list(fields.TABLE_COLUMNS)
    assert all(f.column for f in columns)
    assert fields.field("nll").column == "IW-NLL (nats/sent)"
    assert fields.UNITS["rec"] == "nats/sentence"


def test_a_field_given_a_column_appears_in_every_table(tiny_corpus, tmp_path, monkeypatch, capsys):
    overrides = tiny_overrides(tiny_corpus, **{"train.max_steps": 3, "train.num_samples": 0})
    run = train(load_config(None, overrides), tmp_path / "run")
    assert main(["evaluate", str(run), "--split", "test", "--max-sentences", "8"]) == 0
    capsys.readouterr()
    preset = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(overrides), preset)
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(
        "base: tiny.yaml\nentries:\n  vae: []\nbudget: {max_steps: 2}\n"
        "evaluation: {max_sentences: 8, iw_samples: 2}\nobjectives: {nll: minimize}\n"
        "study: {heartbeat_seconds: 1}\n"
    )
    rows = {"a": {"rec": 1.0, "ppl_token": 12.34567}}
    assert HEADER not in evaluation_table(rows)  # not a column yet

    _add_column(monkeypatch)
    assert HEADER in evaluation_table(rows) and "12.3457" in evaluation_table(rows)
    compare, _ = compare_runs([run], tmp_path / "cmp")
    assert HEADER in compare
    report = (write_report(run, max_sentences=8) / "report.md").read_text()
    assert HEADER in report
    out, _ = run_sweep(sweep_file, tmp_path / "sweep", train=train)
    assert HEADER in (out / "sweep.md").read_text()


def test_a_field_marked_objective_may_score_a_sweep(tiny_corpus, monkeypatch):
    preset = tiny_corpus / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(tiny_overrides(tiny_corpus)), preset)
    path = tiny_corpus / "s.yaml"
    path.write_text("base: tiny.yaml\nobjectives: {nll_stderr: minimize}\n")
    with pytest.raises(SweepError, match="objectives.nll_stderr"):
        load_sweep(path)
    patched = tuple(
        f._replace(objective=True) if f.name == "nll_stderr" else f for f in fields.EVAL_FIELDS
    )
    monkeypatch.setattr(fields, "EVAL_FIELDS", patched)
    assert load_sweep(path).objectives == {"nll_stderr": "minimize"}
