"""Tiny corpora, configs and models for the fast suite (vocab ~20, hidden 16, latent 4)."""

from __future__ import annotations

import random

import pytest
import torch

from textvae.config import load_config
from textvae.data import TextDataset, build_tokenizer
from textvae.models import MODELS

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


def tiny_overrides(corpus, **extra) -> list[str]:
    items = {
        "data.corpus": "null",
        "data.train_path": str(corpus / "train.txt"),
        "data.valid_path": str(corpus / "valid.txt"),
        "data.test_path": str(corpus / "test.txt"),
        "model.embed_dim": 16, "model.hidden_dim": 16, "model.latent_dim": 4,
        "train.batch_size": 16, "train.optimizer": "adam", "train.lr": 0.01,
        "train.lr_scheduler": "constant", "train.log_every": 5, "train.progress": "false",
        "train.num_samples": 2, "kl.warmup_steps": 20, "eval.iw_samples": 10,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def tiny_config(tiny_corpus):
    def make(**extra):
        return load_config(None, tiny_overrides(tiny_corpus, **extra))

    return make


@pytest.fixture
def tokenizer():
    return build_tokenizer(make_sentences(200))


@pytest.fixture
def tiny_model(tokenizer):
    """Build any registered model at tiny size: tiny_model(name, **model_overrides)."""

    def make(name="lstm_vae", **extra):
        cfg = load_config(None, [f"model.name={name}", "model.embed_dim=16", "model.hidden_dim=16",
                                 "model.latent_dim=4"] + [f"model.{k}={v}" for k, v in extra.items()])
        torch.manual_seed(0)
        return MODELS[name](cfg.model, tokenizer).eval()

    return make


@pytest.fixture
def tiny_batch(tokenizer):
    ds = TextDataset(make_sentences(6, seed=5), tokenizer)
    return ds.collate(list(range(len(ds))))
