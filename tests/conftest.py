"""Tiny corpora, configs and models for the fast suite (vocab ~20, hidden 16, latent 4)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from textvae.config import load_config, model_keys
from textvae.data import TextDataset, build_tokenizer
from textvae.models import MODELS
from textvae.registry import config_class

WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


@pytest.fixture
def tiny_corpus(tmp_path):
    """A folder with train/valid/test text files of random sentences."""
    for name, n, seed in (("train", 200, 0), ("valid", 40, 1), ("test", 40, 2)):
        (tmp_path / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    return tmp_path


def for_model(name: str, items: list[str]) -> list[str]:
    """The ``model.<key>=value`` items of ``items`` that model ``name`` declares (the tiny sizes
    are listed for every model; each model's config has only its own keys), other items kept."""
    keys = set(model_keys(config_class(name)))  # config_class: discovers new model files
    return [i for i in items if not i.startswith("model.") or i[6:].split("=")[0] in keys]


def tiny_overrides(corpus, **extra) -> list[str]:
    items = {
        "data.corpus": "null",
        "data.train_path": str(corpus / "train.txt"),
        "data.valid_path": str(corpus / "valid.txt"),
        "data.test_path": str(corpus / "test.txt"),
        "model.embed_dim": 16,
        "model.hidden_dim": 16,
        "model.latent_dim": 4,
        "train.batch_size": 16,
        "train.optimizer": "adam",
        "train.lr": 0.01,
        "train.lr_scheduler": "constant",
        "train.log_every": 5,
        "train.progress": "false",
        "train.num_samples": 2,
        "kl.warmup_steps": 20,
        "eval.iw_samples": 10,
    }
    name = str(extra.get("model.name", "lstm_vae"))
    base = for_model(name, [f"{k}={v}" for k, v in items.items() if k not in extra])
    return base + [f"{k}={v}" for k, v in extra.items()]


def dialogue_overrides(*extra: str) -> list[str]:
    """tiny_overrides' sizes and training settings on DailyDialog by name (the tiny_dialogues
    fixture under $TEXTVAE_DATA_DIR): trains on 'test', validates and tests on 'validation'."""
    name = next((e.split("=", 1)[1] for e in extra if e.startswith("model.name=")), "lstm_vae")
    base = [o for o in tiny_overrides(Path(".")) if not o.startswith("data.")]
    return for_model(name, base) + [
        "data.corpus=dailydialog",
        "data.train_split=test",
        "data.valid_split=validation",
        "data.test_split=validation",
        *extra,
    ]


@pytest.fixture
def tiny_config(tiny_corpus):
    def make(**extra):
        return load_config(None, tiny_overrides(tiny_corpus, **extra))

    return make


@pytest.fixture
def tokenizer():
    return build_tokenizer(make_sentences(200))


# the T5 backbone at tiny size (read by t5_vae only)
TINY_T5 = [
    "model.t5_d_model=16",
    "model.t5_d_ff=32",
    "model.t5_num_layers=1",
    "model.t5_num_decoder_layers=2",
    "model.t5_num_heads=2",
    "model.t5_d_kv=8",
    "model.t5_vocab_size=60",
]
# the GPT-2 backbone at tiny size (read by della / della_cvae only)
TINY_GPT2 = [
    "model.gpt2_n_embd=16",
    "model.gpt2_n_layer=2",
    "model.gpt2_n_head=2",
    "model.gpt2_n_positions=128",
    "model.gpt2_vocab_size=60",
]


@pytest.fixture
def tiny_model(tokenizer):
    """Build any registered model at tiny size: tiny_model(name, **model_overrides)."""

    def make(name="lstm_vae", **extra):
        sizes = ["model.embed_dim=16", "model.hidden_dim=16", "model.latent_dim=4"]
        sizes += ["model.bow_hidden=16", *TINY_T5, *TINY_GPT2]
        sizes = [s for s in sizes if s.split("=")[0][6:] not in extra]
        cfg = load_config(
            None,
            [f"model.name={name}", *for_model(name, sizes)]
            + [f"model.{k}={v}" for k, v in extra.items()],
        )
        torch.manual_seed(0)
        return MODELS[name](cfg.model, tokenizer).eval()

    return make


@pytest.fixture
def tiny_batch(tokenizer):
    """Six sentences; with contexts (``context_ids``/``context_mask``) for conditional models
    (the other models ignore them)."""
    contexts = [
        " __eou__ ".join(pair)
        for pair in zip(make_sentences(6, seed=6), make_sentences(6, seed=7), strict=True)
    ]
    ds = TextDataset(make_sentences(6, seed=5), tokenizer, contexts=contexts)
    return ds.collate(list(range(len(ds))))


def make_dialogues(n: int, seed: int = 0) -> list[str]:
    """DailyDialog-format lines: 2-5 utterances, each ended by `` __eou__``."""
    rng = random.Random(seed)
    return [
        " ".join(s + " __eou__" for s in make_sentences(rng.randint(2, 5), seed * 1000 + i))
        for i in range(n)
    ]


@pytest.fixture
def tiny_dialogues(tmp_path):
    """A TEXTVAE_DATA_DIR-style folder with dailydialog/{test,validation}/dialogues_*.txt."""
    root = tmp_path / "data"
    for split, n, seed in (("test", 60, 0), ("validation", 15, 1)):
        folder = root / "dailydialog" / split
        folder.mkdir(parents=True)
        (folder / f"dialogues_{split}.txt").write_text("\n".join(make_dialogues(n, seed)) + "\n")
    return root
