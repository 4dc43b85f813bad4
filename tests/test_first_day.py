"""A newcomer's first day (issue 14): nothing lost, nothing stuck, nothing slowed to a crawl.

Interrupts stop training cleanly and resume; evaluations are named by what they are and never
overwritten; long work shows progress; a language model is shown with only what it has; the
CLI's version, defaults, thread control; docs/evaluation.md's key list comes from the one field table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import textvae
import textvae.report
from tests.conftest import tiny_overrides
from textvae import cli
from textvae.data import TextDataset
from textvae.fields import EVAL_FIELDS, fields_markdown
from textvae.metrics import evaluate
from textvae.train import train

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(textvae.__file__).resolve().parents[1]


def _preset(tmp_path: Path) -> Path:
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  name: lstm_vae\n  pooling: max\n")
    return preset


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]


def _start_training(tmp_path: Path, corpus: Path, run: Path, *extra: str) -> subprocess.Popen:
    """A real `textvae train` process on the tiny corpus with a budget it will not reach."""
    overrides = tiny_overrides(corpus, **{"train.max_steps": 100000, "train.log_every": 1})
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "textvae.cli",
        "train",
        str(_preset(tmp_path)),
        *overrides,
        *extra,
        "--run-dir",
        str(run),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    """Until the first training record is in log.jsonl (the loop is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "log.jsonl").is_file() and any(r["type"] == "train" for r in _log(run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no training record within the timeout")


# --- interrupts and resume ----------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_resume_continues(
    sig, code, tiny_corpus, tmp_path
):
    run = tmp_path / "run"
    proc = _start_training(tmp_path, tiny_corpus, run, "train.eval_every=0")
    _wait_for_training(proc, run)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"textvae train --resume --run-dir {run}" in err  # the exact command to continue
    assert "Traceback" not in err
    stopped = [r for r in _log(run) if r.get("event") == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == sig.name
    step = stopped[0]["step"]
    assert step >= 1 and (run / "checkpoints" / "last" / "model.safetensors").is_file()
    assert not (run / "checkpoints" / "last.tmp").exists()
    # the printed command continues from exactly that step
    assert (
        cli.main(["train", "--resume", "--run-dir", str(run), f"train.max_steps={step + 3}"]) == 0
    )
    records = _log(run)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [step]
    assert records[-1] == {**records[-1], "event": "finished", "step": step + 3}


def test_a_run_killed_before_its_first_checkpoint_resumes_as_a_fresh_start(tiny_corpus, tmp_path):
    run = tmp_path / "killed"
    proc = _start_training(tmp_path, tiny_corpus, run, "train.eval_every=100000")
    _wait_for_training(proc, run)
    proc.kill()  # no chance to write a checkpoint
    proc.communicate(timeout=60)
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    assert cli.main(["train", "--resume", "--run-dir", str(run), "train.max_steps=4"]) == 0
    assert (run / "log.aborted-1.jsonl").is_file()  # the aborted attempt's log is kept
    # the same weights as an uninterrupted run of the same config
    whole = train(
        textvae.config.load_config(
            _preset(tmp_path),
            tiny_overrides(
                tiny_corpus,
                **{"train.max_steps": 4, "train.log_every": 1, "train.eval_every": 100000},
            ),
        ),
        tmp_path / "whole",
    )
    a = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(whole / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_starting_command_with_resume_added_continues_the_run(tiny_corpus, tmp_path, capsys):
    """Issue 13, item 9: only the budget changed, so --resume continues (it used to refuse
    "'data.train_limit' cannot change")."""
    run, preset = tmp_path / "run", _preset(tmp_path)
    overrides = tiny_overrides(tiny_corpus, **{"train.eval_every": 3, "data.train_limit": 150})
    assert (
        cli.main(["train", str(preset), *overrides, "train.max_steps=6", "--run-dir", str(run)])
        == 0
    )
    assert (
        cli.main(
            [
                "train",
                str(preset),
                *overrides,
                "train.max_steps=9",
                "--resume",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert [r["step"] for r in _log(run) if r["type"] == "valid"] == [3, 6, 9]
    # the same command without the new budget continues too (it has nothing to do)
    assert (
        cli.main(
            [
                "train",
                str(preset),
                *overrides,
                "train.max_steps=9",
                "--resume",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    # a real change is still refused, naming the key and both values
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                str(preset),
                *overrides,
                "model.latent_dim=8",
                "--resume",
                "--run-dir",
                str(run),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "model.latent_dim" in err and "4" in err and "8" in err
    assert cli.main(["train", "--resume", "--run-dir", str(run), "data.train_limit=100"]) == 1
    assert "'data.train_limit' cannot change" in capsys.readouterr().err


# --- evaluations are results --------------------------------------------------------------------


@pytest.fixture
def tiny_run(tiny_config, tmp_path):
    return train(tiny_config(**{"train.max_steps": 4}), tmp_path / "r")


def test_evaluations_are_named_by_what_they_are_and_never_overwritten(tiny_run, capsys):
    run = tiny_run
    assert cli.main(["evaluate", str(run), "--iw-samples", "3"]) == 0
    full = run / "eval-test-full-K3-fp32.json"
    first = full.read_text()
    assert cli.main(["evaluate", str(run), "--iw-samples", "5", "--max-sentences", "7"]) == 0
    assert cli.main(["evaluate", str(run), "--iw-samples", "3"]) == 0  # the same again: kept apart
    assert sorted(p.name for p in run.glob("eval-*.json")) == [
        "eval-test-7-K5-fp32.json",
        "eval-test-full-K3-fp32-2.json",
        "eval-test-full-K3-fp32.json",
    ]
    assert full.read_text() == first
    record = json.loads((run / "eval-test-7-K5-fp32.json").read_text())
    assert record["max_sentences"] == 7 and record["n_sentences"] == 7
    assert json.loads(first)["max_sentences"] is None
    # an explicit --output onto an existing file is refused before any work, unless --overwrite
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--iw-samples", "2", "--output", str(full)]) == 1
    assert "--overwrite" in capsys.readouterr().err and full.read_text() == first
    assert (
        cli.main(["evaluate", str(run), "--iw-samples", "2", "--output", str(full), "--overwrite"])
        == 0
    )
    assert json.loads(full.read_text())["iw_samples"] == 2


def test_report_and_compare_name_their_evaluation_and_prefer_the_most_complete(
    tiny_config, tmp_path, capsys
):
    a = train(tiny_config(**{"train.max_steps": 4}), tmp_path / "a")
    b = train(tiny_config(**{"train.max_steps": 4, "model.pooling": "mean"}), tmp_path / "b")
    for run in (a, b):
        assert cli.main(["evaluate", str(run), "--iw-samples", "2"]) == 0  # full, K=2
        assert cli.main(["evaluate", str(run), "--iw-samples", "9", "--max-sentences", "5"]) == 0
    # an old-named evaluation is still read (here: of the valid split)
    old = json.loads((a / "eval-test-full-K2-fp32.json").read_text())
    (a / "eval-valid.json").write_text(json.dumps({**old, "split": "valid", "iw_samples": 50}))
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "a: `eval-test-full-K2-fp32.json`; b: `eval-test-full-K2-fp32.json`" in out
    assert "| 40 |" in out and "| 5 |" not in out  # the full test set, not the 5 sentences
    assert cli.main(["compare", str(a), "--eval", "valid", "--output", str(tmp_path / "v")]) == 0
    assert "a: `eval-valid.json`" in capsys.readouterr().out
    # a larger K on the same sentences wins
    assert cli.main(["evaluate", str(a), "--iw-samples", "4"]) == 0
    from textvae.rundir import best_evaluation

    assert best_evaluation(a, "test")[0] == "eval-test-full-K4-fp32.json"
    md = (textvae.report.write_report(a, max_sentences=10, n_examples=1) / "report.md").read_text()
    assert "`eval-test-full-K4-fp32.json` (most complete)" in md
    assert "`eval-test-5-K9-fp32.json`" in md and "`eval-valid.json`" in md
    # a run evaluated on the first 5 sentences only: compare takes a's evaluation of those 5
    # (not its full one), so the two rows are of the same sentences and are paired
    c = train(tiny_config(**{"train.max_steps": 2}), tmp_path / "c")
    assert cli.main(["evaluate", str(c), "--iw-samples", "3", "--max-sentences", "5"]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(c), "--output", str(tmp_path / "ac")]) == 0
    out = capsys.readouterr().out
    assert "a: `eval-test-5-K9-fp32.json`; c: `eval-test-5-K3-fp32.json`" in out
    assert "- c - a: " in out and "of 5 sentences lower" in out


def test_compare_writes_beside_the_first_run_not_into_the_working_directory(
    tiny_config, tmp_path, monkeypatch
):
    runs = tmp_path / "runs"
    a = train(tiny_config(**{"train.max_steps": 2}), runs / "a")
    b = train(tiny_config(**{"train.max_steps": 2}), runs / "b")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli.main(["compare", str(a), str(b)]) == 0
    assert list(cwd.iterdir()) == []
    assert (runs / "compare-a-b" / "compare.md").is_file()


def test_evaluate_max_sentences_zero_is_a_clear_error(tiny_run, capsys):
    assert cli.main(["evaluate", str(tiny_run), "--max-sentences", "0"]) == 1
    assert "--max-sentences must be at least 1" in capsys.readouterr().err
    assert not list(tiny_run.glob("eval-*.json"))


# --- progress -----------------------------------------------------------------------------------


def test_evaluation_shows_progress_when_asked_and_not_when_piped(tiny_run, capsys):
    model, tokenizer = textvae.load(tiny_run)
    texts = (tiny_run.parent / "test.txt").read_text().splitlines()
    evaluate(model, TextDataset(texts, tokenizer), iw_samples=2, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "evaluate" in err and f"/{len(texts)} [" in err and "sent/s" in err  # done / all
    # the CLI: stderr is not a terminal under pytest, so no bar (and --no-progress exists)
    assert cli.main(["evaluate", str(tiny_run), "--iw-samples", "2"]) == 0
    assert "sent/s" not in capsys.readouterr().err
    assert cli.main(["evaluate", str(tiny_run), "--iw-samples", "2", "--no-progress"]) == 0


# --- a language model is shown with what it has -------------------------------------------------


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_a_language_model_is_printed_and_drawn_with_only_what_it_has(tiny_config, tmp_path, capsys):
    run = train(tiny_config(**{"model.name": "lstm_lm", "train.max_steps": 4}), tmp_path / "lm")
    assert cli.main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "K=" not in header and "exact likelihood" in header
    assert not re.search(r"^\s+(kl|mi|au|z_gap)\s", out, re.M)
    assert (run / "eval-test-full-fp32.json").is_file()  # no K in the name either
    folder = textvae.report.write_report(run, max_sentences=10, n_examples=1)
    md = (folder / "report.md").read_text()
    assert "beta" not in md and "KL: schedule" not in md
    vae = train(tiny_config(**{"train.max_steps": 4}), tmp_path / "vae")
    vae_folder = textvae.report.write_report(vae, max_sentences=10, n_examples=1)
    # one panel (-log p(x)) instead of six, four of them empty
    assert _png_width(folder / "curves.png") < _png_width(vae_folder / "curves.png") / 1.5


# --- the command line -----------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert (
        stop.value.code == 0 and capsys.readouterr().out.strip() == f"textvae {textvae.__version__}"
    )


def test_help_shows_every_options_default():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"textvae {name} {action.option_strings[0]}: {text!r}"


def test_every_heavy_command_takes_threads():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for name in ("train", "evaluate", "probe", "report", "generate"):
        assert "--threads" in commands[name].format_help(), name
    for name in ("evaluate", "probe", "report"):
        assert "--no-progress" in commands[name].format_help(), name


def test_threads_are_set_from_the_option_the_environment_or_the_free_cores(monkeypatch):
    from textvae.threads import available_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == (1, "as asked") and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == (1, "from OMP_NUM_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "two")
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            set_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        n, reason = set_threads()
        assert 1 <= n <= available_cores() and "cores free" in reason
        with pytest.raises(ValueError, match="--threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_importing_textvae_first_bounds_the_openmp_spin():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(SRC)
    code = (
        "import os, textvae, torch; print(os.environ.get('GOMP_SPINCOUNT'), "
        "os.environ.get('OMP_WAIT_POLICY'), textvae.threads.WAIT_POLICY_APPLIED)"
    )

    def run(extra: dict, source: str = code) -> str:
        return subprocess.run(
            [sys.executable, "-c", source],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    from textvae.threads import SPIN_COUNT

    assert run({}) == f"{SPIN_COUNT} None True"
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == "None ACTIVE True"  # a user's own choice is kept
    assert run({"GOMP_SPINCOUNT": "5"}) == "5 None True"
    late = code.replace("import os, textvae, torch", "import os, torch, textvae")
    assert run({}, late) == f"{SPIN_COUNT} None False"  # too late for libgomp: said so


# --- files and packaging ------------------------------------------------------------------------


def test_checkpoint_weights_get_the_usual_file_mode(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for which in ("best", "last"):
        path = tiny_run / "checkpoints" / which / "model.safetensors"
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (which, oct(path.stat().st_mode))


def test_the_documented_key_list_is_the_field_table():
    readme = (ROOT / "docs" / "evaluation.md").read_text()
    for tag, groups in (
        ("evaluation", ("protocol", "record")),
        ("generation", ("generation", "response")),
    ):
        start, end = f"<!-- {tag} fields: start -->", f"<!-- {tag} fields: end -->"
        assert start in readme and end in readme, tag
        listed = readme.split(start)[1].split(end)[0].strip()
        assert listed == fields_markdown(groups), (
            f"docs/evaluation.md's {tag} fields: re-render them"
        )
    assert len({f.name for f in EVAL_FIELDS}) == len(EVAL_FIELDS)


def test_transformers_is_pinned_below_the_release_that_removes_what_the_t5_vae_uses():
    """transformers 5.24 warns that T5Stack.forward's ``past_key_values`` goes in 5.40."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    (line,) = re.findall(r'^\s*"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    spec = Requirement(line).specifier
    assert Version("5.40.0") not in spec and Version("5.24.0") in spec
