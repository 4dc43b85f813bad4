"""The run folder (textvae/rundir.py, textvae/atomic.py): what training writes is read back by
the folder's own readers; checkpoints are committed atomically; readers never import the loop."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import textvae
from textvae import atomic, rundir
from textvae.rundir import RunDirError
from textvae.train import train

SRC = Path(__file__).resolve().parent.parent / "src" / "textvae"


@pytest.fixture
def run(tiny_config, tmp_path):
    config = tiny_config(**{"train.max_steps": 6, "train.eval_every": 3})
    return train(config, tmp_path / "run"), config


def test_a_trained_folder_is_read_back_by_the_run_folder_module(run):
    run_dir, config = run
    groups = rundir.read_log(run_dir)
    assert [r["step"] for r in groups["valid"]] == [3, 6]
    assert [r["step"] for r in groups["train"]] == [5]  # train.log_every = 5
    assert groups["event"][-1] == {**groups["event"][-1], "event": rundir.FINISHED, "step": 6}
    assert rundir.is_finished(run_dir)
    assert rundir.read_config(run_dir) == config
    for which in ("best", "last"):
        folder = rundir.checkpoint_dir(run_dir, which)
        assert folder == rundir.checkpoint_path(run_dir, which) == run_dir / "checkpoints" / which
        assert (folder / rundir.WEIGHTS).is_file()
    assert json.loads((rundir.checkpoint_dir(run_dir, "best") / "trainer_state.json").read_text())[
        "step"
    ] in (3, 6)
    assert (run_dir / rundir.DATA).is_file() and (run_dir / rundir.TOKENIZER).is_dir()
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.old"))
    with pytest.raises(RunDirError, match="no 'ae_best' checkpoint"):
        rundir.checkpoint_dir(run_dir, "ae_best")


def test_finished_marker_is_the_last_event_only(tmp_path):
    assert not rundir.is_finished(tmp_path)  # no log at all
    with rundir.RunLog(tmp_path) as log:
        log.write({"type": "event", "event": rundir.FINISHED, "step": 4})
    assert rundir.is_finished(tmp_path)
    with rundir.RunLog(tmp_path) as log:  # resumed with a larger budget: appended, unfinished
        log.write({"type": "event", "event": "resume", "step": 4})
        log.write({"type": "train", "step": 5, "loss": 1.0})
    assert not rundir.is_finished(tmp_path)
    assert [r["event"] for r in rundir.read_log(tmp_path)["event"]] == ["finished", "resume"]
    (tmp_path / rundir.LOG).write_text('{"type": "train"}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON record"):
        rundir.read_log(tmp_path)


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    rundir.write_weights(tmp_path, "best", _weights(1.0), {"trainer_state.json": {"step": 1}})

    def killed(tensors, filename, *args, **kwargs):  # half a file, then the process dies
        Path(filename).write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_weights(tmp_path, "best", _weights(2.0), {"trainer_state.json": {"step": 2}})
    monkeypatch.undo()
    best = rundir.checkpoint_dir(tmp_path, "best")
    assert torch.equal(load_file(str(best / rundir.WEIGHTS))["w"], torch.full((3,), 1.0))
    assert json.loads((best / "trainer_state.json").read_text()) == {"step": 1}
    # the next write clears the half-written twin and commits
    rundir.write_weights(tmp_path, "best", _weights(3.0), {})
    assert torch.equal(load_file(str(best / rundir.WEIGHTS))["w"], torch.full((3,), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best"]


def test_a_commit_interrupted_between_its_renames_is_read_and_finished(tmp_path):
    """commit_dir renames best -> best.old, then best.tmp -> best, then removes best.old; a
    stop between any two steps leaves one complete checkpoint that readers find."""
    rundir.write_weights(tmp_path, "best", _weights(1.0), {})
    best = rundir.checkpoint_path(tmp_path, "best")
    # stopped after the first rename: only best.old exists (and a complete best.tmp)
    best.rename(best.with_name("best.old"))
    found = rundir.checkpoint_dir(tmp_path, "best")
    assert found.name == "best.old"
    assert torch.equal(load_file(str(found / rundir.WEIGHTS))["w"], torch.full((3,), 1.0))
    rundir.write_weights(tmp_path, "best", _weights(2.0), {})
    assert rundir.checkpoint_dir(tmp_path, "best") == best
    assert not best.with_name("best.old").exists()
    # stopped before the clean-up: best and a stale best.old side by side; the next commit works
    # (it used to fail renaming best onto the non-empty best.old)
    (best.with_name("best.old")).mkdir()
    (best.with_name("best.old") / "stale").write_text("x")
    rundir.write_weights(tmp_path, "best", _weights(3.0), {})
    assert torch.equal(load_file(str(best / rundir.WEIGHTS))["w"], torch.full((3,), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best"]


def test_load_reads_a_checkpoint_left_as_old_by_an_interruption(run):
    run_dir, _ = run
    model, _ = textvae.load(run_dir)
    best = rundir.checkpoint_path(run_dir, "best")
    best.rename(best.with_name("best.old"))
    again, _ = textvae.load(run_dir)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_an_atomic_file_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "config.yaml", "old\n")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and not tmp.exists()


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports (``from textvae import train`` counts as textvae.train)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_only_the_cli_imports_the_training_loop():
    importers = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p.name != "train.py" and "textvae.train" in _imports(p)
    )
    assert importers == ["cli.py"]


def test_every_atomic_write_goes_through_the_one_helper():
    """No module but atomic.py renames a temporary into place itself."""
    renamers = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "os.replace(" in p.read_text() and p.name != "atomic.py"
    )
    assert renamers == []
