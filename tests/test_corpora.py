"""The corpus registry: a name selects a CorpusSpec; a new named corpus is one spec.

The toy corpus below is registered from this file (nothing in src/ is edited) and is then
trained on, loaded and probed through the ordinary paths (``data.corpus=toy_topics``).
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

import textvae
import textvae.train
from tests.conftest import WORDS, tiny_overrides
from textvae import registry
from textvae.config import DataConfig, load_config
from textvae.data import CorpusSpec, DataError, label_names, load_split, named_corpus

TOY = "toy_topics"


def _toy_files(folder: Path, split: str) -> list[tuple[Path, int | None]]:
    return [(folder / f"{split}.{topic}.txt", label) for label, topic in enumerate(("a", "b"))]


@pytest.fixture
def toy_corpus(tmp_path, monkeypatch):
    """A two-label corpus by name under a temporary TEXTVAE_DATA_DIR, registered for the test."""
    root = tmp_path / "data"
    folder = root / TOY
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("fit", 60), ("held", 20)):
        for topic in ("a", "b"):
            lines = [
                " ".join([topic * 3] + [rng.choice(WORDS) for _ in range(rng.randint(1, 6))])
                for _ in range(n)
            ]
            (folder / f"{split}.{topic}.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(root))
    spec = registry.register_corpus(
        CorpusSpec(
            name=TOY,
            splits=("fit", "held"),
            files=_toy_files,
            source="written by tests/test_corpora.py",
            missing="Write the toy files into {folder}.",
            label_names={0: "topic a", 1: "topic b"},
            probe_splits=("fit", "held"),
        )
    )
    yield spec
    registry.unregister_corpus(TOY)


def _toy_config(tmp_path, *extra: str):
    base = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.")]
    return load_config(
        None,
        [
            *base,
            f"data.corpus={TOY}",
            "data.train_split=fit",
            "data.valid_split=held",
            "data.test_split=held",
            *extra,
        ],
    )


def test_a_corpus_registered_from_a_test_file_trains_loads_and_evaluates(toy_corpus, tmp_path):
    assert named_corpus(TOY) is toy_corpus
    fit = load_split(DataConfig(corpus=TOY, train_split="fit"), "train")
    # two label files, interleaved by the fixed permutation: both labels in the first 20
    assert len(fit.texts) == 120 and set(fit.labels[:20]) == {0, 1}
    assert all(
        t.startswith("aaa" if y == 0 else "bbb") for t, y in zip(fit.texts, fit.labels, strict=True)
    )
    assert label_names(TOY) == {0: "topic a", 1: "topic b"}

    cfg = _toy_config(tmp_path, "train.max_steps=4", "train.eval_every=2")
    run = textvae.train.train(cfg, tmp_path / "run")
    model, _ = textvae.load(run)
    assert model.config.data.corpus == TOY
    test = load_split(model.config.data, "test", whole=True)
    assert len(test.texts) == 40 and sorted(set(test.labels)) == [0, 1]
    assert (run / "data.json").read_text().count(str(tmp_path / "data" / TOY)) >= 2


def test_the_probe_uses_the_corpus_default_splits(toy_corpus, tmp_path):
    from textvae.cli import main

    run = textvae.train.train(_toy_config(tmp_path, "train.max_steps=2"), tmp_path / "run")
    out = tmp_path / "probe.json"
    args = ["probe", str(run), "--data", TOY, "--labels", "all", "--repeats", "1"]
    assert main([*args, "--output", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "fit.a.txt" in text and "held.a.txt" in text  # fit on 'fit', scored on 'held'


def test_split_and_missing_file_messages_come_from_the_spec(toy_corpus, tmp_path):
    with pytest.raises(
        DataError, match=r"data.valid_split='dev': toy_topics has splits fit, held$"
    ):
        load_split(DataConfig(corpus=TOY, valid_split="dev"), "valid")
    (tmp_path / "data" / TOY / "held.b.txt").unlink()
    with pytest.raises(DataError, match=r"held.b.txt. Write the toy files into .*toy_topics"):
        load_split(DataConfig(corpus=TOY, valid_split="held"), "valid")


def test_an_unknown_corpus_lists_the_registered_names(toy_corpus):
    with pytest.raises(DataError) as err:
        load_split(DataConfig(corpus="nope"), "train")
    message = str(err.value)
    assert "data.corpus='nope' is not a known corpus" in message
    assert f"(ptb, yelp_sentiment, dailydialog, {TOY})" in message
    registry.unregister_corpus(TOY)
    with pytest.raises(DataError, match=r"\(ptb, yelp_sentiment, dailydialog\); set data.corpus"):
        load_split(DataConfig(corpus=TOY), "train")


def test_no_module_names_a_shipped_corpus_in_code():
    """Outside corpora.py, no branch of src/ compares a name with a shipped corpus: the
    registry selects the code (docstrings, messages and help texts may name them)."""
    src = Path(textvae.__file__).parent
    names = {"ptb", "yelp_sentiment", "dailydialog"}
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "corpora.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for part in [node.left, *node.comparators]:
                    if isinstance(part, ast.Constant) and part.value in names:
                        offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
