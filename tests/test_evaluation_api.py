"""One evaluation API: ``evaluation.evaluate_run`` and ``evaluation.probe`` give what ``textvae
evaluate`` and ``textvae probe`` write today on the same run folder, follow the run folder's
naming, record ``max_sentences`` and never replace a file silently."""

import json
import random
import re

import pytest

from tests.conftest import make_sentences, tiny_overrides
from textvae import cli
from textvae.config import load_config
from textvae.evaluation import (
    EvaluationRequest,
    ProbeRequest,
    evaluate_run,
    parse_probe_sizes,
    probe,
)
from textvae.fields import EVAL_FIELDS
from textvae.train import train

TIMING = ("seconds",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VAE and a tiny language model, trained once for the module."""
    root = tmp_path_factory.mktemp("evaluation-api")
    for name, n, seed in (("train", 200, 0), ("valid", 40, 1), ("test", 40, 2)):
        (root / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    out = {}
    for name in ("lstm_vae", "lstm_lm"):
        cfg = load_config(None, tiny_overrides(root, **{"model.name": name, "train.max_steps": 4}))
        out[name] = train(cfg, root / name)
    return out


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _cli(run, *args) -> list[str]:
    argv = ["evaluate", str(run), "--threads", "1", "--no-progress", *args]
    assert cli.main(argv) == 0
    return argv


@pytest.mark.parametrize("name", ["lstm_vae", "lstm_lm"])
def test_evaluate_run_writes_what_the_cli_writes(runs, name, tmp_path, capsys):
    """Same options, same JSON (every number, key and order), timing aside; the default file
    name is the run folder's (rundir.evaluation_name), numbered when the CLI's file is there."""
    run = runs[name]
    _cli(run, "--max-sentences", "15", "--iw-samples", "5", "--seed", "2")
    capsys.readouterr()
    k = "-K5" if name == "lstm_vae" else ""
    cli_path = run / f"eval-test-15{k}-fp32.json"
    by_cli = json.loads(cli_path.read_text())
    record, path = evaluate_run(run, EvaluationRequest(max_sentences=15, iw_samples=5, seed=2))
    assert path == run / f"eval-test-15{k}-fp32-2.json"  # the CLI's is never replaced
    written = json.loads(path.read_text())
    assert list(written) == list(by_cli) == list(record)
    assert _without_timing(written) == _without_timing(by_cli) == _without_timing(record)
    assert written["max_sentences"] == 15 and written["split"] == "test"
    protocol_and_record = [f.name for f in EVAL_FIELDS if f.group in ("protocol", "record")]
    assert list(written) == protocol_and_record
    cli_path.unlink()
    path.unlink()


def test_evaluate_run_with_generation_matches_the_cli(runs, tmp_path, capsys):
    run = runs["lstm_vae"]
    gen = ["--generation", "--gen-sentences", "4", "--gen-samples", "3", "--max-length", "8"]
    _cli(run, "--split", "valid", "--iw-samples", "2", *gen, "--output", str(tmp_path / "a.json"))
    capsys.readouterr()
    request = EvaluationRequest(
        split="valid",
        iw_samples=2,
        generation=True,
        gen_sentences=4,
        gen_samples=3,
        max_length=8,
        output=tmp_path / "b.json",
    )
    record, path = evaluate_run(run, request)
    a = json.loads((tmp_path / "a.json").read_text())
    assert path == tmp_path / "b.json"
    assert _without_timing(json.loads(path.read_text())) == _without_timing(a)
    assert a["max_sentences"] is None and a["generation"]["prior_samples"] == 3
    assert "rec_bleu" in record and "self_bleu" in record


def test_a_file_is_named_by_its_stem_and_recorded_without_split(runs, tmp_path):
    data = tmp_path / "held-out.txt"
    data.write_text("\n".join(make_sentences(9, seed=11)) + "\n")
    run = runs["lstm_vae"]
    record, path = evaluate_run(run, EvaluationRequest(data=str(data), iw_samples=2))
    assert path.name == "eval-held-out-full-K2-fp32.json"
    assert record["split"] is None and record["n_sentences"] == 9 and str(data) in record["data"]
    path.unlink()


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(
    runs, tmp_path, monkeypatch
):
    out = tmp_path / "eval.json"
    out.write_text("{}")

    def no_load(*args, **kwargs):
        raise AssertionError("the run was loaded before the refusal")

    monkeypatch.setattr("textvae.load", no_load)
    request = EvaluationRequest(iw_samples=2, max_sentences=3, output=out)
    with pytest.raises(FileExistsError, match="never replaced silently"):
        evaluate_run(runs["lstm_vae"], request)
    assert out.read_text() == "{}"
    monkeypatch.undo()
    record, path = evaluate_run(
        runs["lstm_vae"],
        EvaluationRequest(iw_samples=2, max_sentences=3, output=out, overwrite=True),
    )
    assert path == out and json.loads(out.read_text())["n_sentences"] == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_sentences", 0, "max_sentences must be at least 1, got 0"),
        ("iw_samples", 0, "iw_samples must be at least 1, got 0"),
        ("split", "dev", "split 'dev' is not one of train, valid, test"),
        ("checkpoint", "first", "checkpoint 'first' is not best or last"),
        ("precision", "fp16", "precision 'fp16' is not fp32 or bf16"),
    ],
)
def test_a_request_outside_its_ranges_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvaluationRequest(**{field: value})


def test_the_last_checkpoint_can_be_evaluated(runs):
    run = runs["lstm_vae"]
    best, path_best = evaluate_run(run, EvaluationRequest(iw_samples=2, max_sentences=5))
    last, path_last = evaluate_run(
        run, EvaluationRequest(iw_samples=2, max_sentences=5, checkpoint="last")
    )
    assert path_last.name == "eval-test-5-K2-fp32-2.json"  # the name says what, not which weights
    assert best["n_sentences"] == last["n_sentences"] == 5
    path_best.unlink()
    path_last.unlink()


# --- the probe ----------------------------------------------------------------------------------


def _labelled(tmp_path):
    rng = random.Random(0)
    for name, n in (("fit", 40), ("score", 20)):
        rows = ["text\tlabel"]
        for i in range(n):
            sentence = make_sentences(1, seed=i + 100 * n)[0]
            rows.append(f"{sentence}\t{['neg', 'pos'][rng.randint(0, 1)]}")
        (tmp_path / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "fit.tsv", tmp_path / "score.tsv"


def test_probe_writes_what_the_cli_writes(runs, tmp_path, capsys):
    fit, score = _labelled(tmp_path)
    run = runs["lstm_vae"]
    args = ["probe", str(run), "--fit", str(fit), "--score", str(score), "--labels", "6,all"]
    args += ["--repeats", "2", "--threads", "1", "--no-progress", "--seed", "1"]
    assert cli.main([*args, "--output", str(tmp_path / "cli.json")]) == 0
    capsys.readouterr()
    request = ProbeRequest(
        fit=str(fit), score=str(score), sizes=parse_probe_sizes("6,all"), repeats=2, seed=1
    )
    record, path = probe(run, request)
    assert path == run / "probe-fit.json"
    assert json.loads(path.read_text()) == json.loads((tmp_path / "cli.json").read_text()) == record
    assert [r["n"] for r in record["results"]] == [6, 40] and record["score_sentences"] == 20
    again, path2 = probe(run, request)
    assert path2 == run / "probe-fit-2.json" and again == record  # never replaced
    with pytest.raises(FileExistsError):
        probe(run, ProbeRequest(fit=str(fit), score=str(score), output=path))
    path.unlink()
    path2.unlink()


def test_probe_sizes_and_a_model_without_latent(runs):
    assert parse_probe_sizes("100, 1000,all") == (100, 1000, None)
    with pytest.raises(ValueError, match="'ten' is not a count or 'all'"):
        parse_probe_sizes("ten")
    with pytest.raises(ValueError, match="no latent variable to probe"):
        probe(runs["lstm_lm"])


SHARDED = """
import json, sys
from textvae.evaluation import EvaluationRequest, evaluate_run
record, path = evaluate_run(sys.argv[1], EvaluationRequest(iw_samples=4, batch_size=8, output=sys.argv[2]))
print(json.dumps({"path": None if path is None else str(path)}))
"""


def test_evaluate_run_on_two_processes_writes_the_one_process_json(runs, tmp_path):
    """Under torchrun each process scores its share of the batches; the main one writes the
    one-process record (the other returns no path)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    run = runs["lstm_vae"]
    one, _ = evaluate_run(
        run, EvaluationRequest(iw_samples=4, batch_size=8, output=tmp_path / "1.json")
    )
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(run)]
    done = subprocess.run(
        [*cmd, str(tmp_path / "2.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # each process prints one {"path": ...} object; the two may share a line of stdout (their
    # writes interleave when the output is unbuffered), so read the objects, not the lines
    found = re.findall(r'\{"path": (?:null|"[^"]*")\}', done.stdout)
    paths = sorted(json.loads(obj)["path"] or "" for obj in found)
    assert paths == ["", str(tmp_path / "2.json")]  # only the main process wrote
    two = _without_timing(json.loads((tmp_path / "2.json").read_text()))
    one = _without_timing(one)
    assert list(two) == list(one)
    for key, value in one.items():  # floats to 1e-6: see tests/test_distributed.py
        if isinstance(value, float) or (
            isinstance(value, list) and value and isinstance(value[0], float)
        ):
            assert two[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
        else:
            assert two[key] == value, key
