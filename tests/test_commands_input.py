"""Every command as careful as ``train``: a mistyped, undecodable or empty input file, a run
folder missing its tokenizer, a zero count or limit each give one line naming the file, line or
key (exit 1, nothing written); generate labels what it prints (input beside reconstruction,
weight beside interpolation)."""

from __future__ import annotations

import shutil

import pytest

import textvae
from tests.conftest import make_sentences, tiny_overrides
from textvae import cli
from textvae.config import load_config
from textvae.data import DataError, load_split
from textvae.rundir import RunDirError
from textvae.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained run (2 steps) shared by the tests of this file; they only read it."""
    root = tmp_path_factory.mktemp("commands")
    for name, n, seed in (("train", 60, 0), ("valid", 20, 1), ("test", 20, 2)):
        (root / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    config = load_config(None, tiny_overrides(root, **{"train.max_steps": 2}))
    return train(config, root / "run")


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- a run folder missing a part ----------------------------------------------------------------


@pytest.fixture
def run_without_tokenizer(run, tmp_path):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tokenizer"))
    return copy


def test_load_names_the_missing_tokenizer_folder(run_without_tokenizer):
    with pytest.raises(RunDirError, match="no tokenizer") as info:
        textvae.load(run_without_tokenizer)
    assert str(run_without_tokenizer / "tokenizer") in str(info.value)


def test_load_names_an_empty_tokenizer_folder_and_missing_weights(run, tmp_path):
    copy = tmp_path / "parts"
    shutil.copytree(run, copy)
    for name in (copy / "tokenizer").iterdir():
        name.unlink()
    with pytest.raises(RunDirError, match="not a saved tokenizer"):
        textvae.load(copy)
    shutil.rmtree(copy / "tokenizer")
    shutil.copytree(run / "tokenizer", copy / "tokenizer")
    (copy / "checkpoints" / "best" / "model.safetensors").unlink()
    with pytest.raises(RunDirError, match="no weights in the 'best' checkpoint"):
        textvae.load(copy)


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--iw-samples", "2"],
        ["generate"],
        ["report", "--max-sentences", "5"],
        ["probe", "--fit", "x.tsv"],
    ],
)
def test_every_command_names_the_missing_tokenizer_folder(run_without_tokenizer, command, capsys):
    name, *options = command
    assert cli.main([name, str(run_without_tokenizer), *options]) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert str(run_without_tokenizer / "tokenizer") in line
    assert not list(run_without_tokenizer.glob("eval-*.json"))
    assert not (run_without_tokenizer / "report").exists()


# --- counts and limits --------------------------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-3"])
def test_report_max_sentences_below_one_is_one_line(run, n, capsys):
    assert cli.main(["report", str(run), "--max-sentences", n]) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert f"--max-sentences must be at least 1, got {n}" in line
    assert not (run / "report").exists()


@pytest.mark.parametrize("k", ["0", "-1"])
def test_evaluate_iw_samples_below_one_is_refused(run, k, capsys):
    """K is the number of importance samples of a bound (K=1 is the ELBO): 0 has no meaning."""
    assert cli.main(["evaluate", str(run), "--iw-samples", k]) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert f"--iw-samples must be at least 1, got {k}" in line
    assert not list(run.glob("eval-*.json"))


def test_evaluate_help_says_what_k_is(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "K >= 1" in help_text and "K=1 is the ELBO" in help_text


@pytest.mark.parametrize(("key", "role"), [("train_limit", "train"), ("valid_limit", "valid")])
@pytest.mark.parametrize("value", [0, -5])
def test_a_limit_below_one_names_its_key_not_the_corpus(run, key, role, value):
    config = load_config(run / "config.yaml", [f"data.{key}={value}"])
    with pytest.raises(DataError, match=f"data.{key} must be at least 1") as info:
        load_split(config.data, role)
    assert f"got {value}" in str(info.value) and "no sentences" not in str(info.value)


# --- generate --input: files and sentences ------------------------------------------------------


@pytest.mark.parametrize("value", ["recin.tx", "inputs/recin", "recin.jsonl"])
def test_generate_input_that_names_a_missing_file_is_an_error(run, value, tmp_path, capsys):
    """A value without spaces that has a file extension or a '/' is a file name: when there is no
    such file, generate says so instead of encoding it as a sentence of <unk>."""
    code = cli.main(["generate", str(run), "--mode", "reconstruct", "--input", value])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    [line] = _error_lines(captured.err)
    assert f"--input {value}: no such file" in line


def test_generate_input_of_a_file_and_sentences_together_is_an_error(run, tmp_path, capsys):
    path = tmp_path / "a.txt"
    path.write_text("the cat sat\n")
    code = cli.main(["generate", str(run), "--mode", "interpolate", "--input", str(path), "a dog"])
    assert code == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert str(path) in line and "one file or sentences" in line


def test_generate_input_sentences_and_files_are_still_read(run, tmp_path, capsys):
    """Backward compatible: sentences (also one-word ones, and with dots) and an existing file."""
    path = tmp_path / "in.txt"
    path.write_text("the cat sat\n\na dog ran\n")
    assert cli.main(["generate", str(run), "--mode", "reconstruct", "--input", str(path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    args = [
        "--mode",
        "reconstruct",
        "--input",
        "the cat sat on the mat .",
        "cat",
        "u.s.",
    ]
    assert cli.main(["generate", str(run), *args]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_generate_input_file_not_utf8_names_the_file_and_line(run, tmp_path, capsys):
    path = tmp_path / "recin.txt"
    path.write_bytes(b"the cat sat\na dog \xff ran\n")
    assert cli.main(["generate", str(run), "--mode", "reconstruct", "--input", str(path)]) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert f"{path}, line 2: invalid UTF-8" in line


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_generate_input_file_that_is_empty_says_so(run, tmp_path, text, capsys):
    path = tmp_path / "recin.txt"
    path.write_text(text)
    for mode in ("reconstruct", "interpolate"):
        assert cli.main(["generate", str(run), "--mode", mode, "--input", str(path)]) == 1
        [line] = _error_lines(capsys.readouterr().err)
        assert f"{path}: empty file" in line


# --- generate labels what it prints -------------------------------------------------------------


def test_reconstruct_prints_each_input_beside_its_reconstruction(run, capsys):
    texts = ["the cat sat", "a dog ran under the log"]
    model, _ = textvae.load(run)
    from textvae.generate import reconstruct

    expected = reconstruct(model, texts)
    assert cli.main(["generate", str(run), "--mode", "reconstruct", "--input", *texts]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{text}\t{rec}" for text, rec in zip(texts, expected, strict=True)]


def test_interpolate_prints_the_weight_beside_each_sentence(run, capsys):
    args = ["--mode", "interpolate", "-n", "6", "--input", "the cat sat", "a dog ran"]
    assert cli.main(["generate", str(run), *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == [
        "t=0.00",
        "t=0.20",
        "t=0.40",
        "t=0.60",
        "t=0.80",
        "t=1.00",
    ]


def test_generate_help_says_what_is_read_and_printed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "file extension" in help_text and "INPUT<tab>RECONSTRUCTION" in help_text
    assert "t=0.00" in help_text
