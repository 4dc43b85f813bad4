"""Model registry: ``MODELS[name](model_config, tokenizer)`` builds a model."""

from textvae.models.base import TextVAE
from textvae.models.cvrae import CVRAE
from textvae.models.della import DELLA, DELLACVAE
from textvae.models.lstm_lm import LSTMLM
from textvae.models.lstm_vae import LSTMVAE
from textvae.models.seq2seq import Seq2Seq
from textvae.models.t5_vae import T5VAE

MODELS: dict[str, type[TextVAE]] = {
    "lstm_vae": LSTMVAE,
    "lstm_lm": LSTMLM,
    "cvrae": CVRAE,
    "seq2seq": Seq2Seq,
    "t5_vae": T5VAE,
    "della": DELLA,
    "della_cvae": DELLACVAE,
}

__all__ = [
    "MODELS",
    "TextVAE",
    "LSTMVAE",
    "LSTMLM",
    "CVRAE",
    "Seq2Seq",
    "T5VAE",
    "DELLA",
    "DELLACVAE",
]
