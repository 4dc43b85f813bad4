"""LSTM language model: the LSTM VAE's decoder with no latent variable.

The baseline a VAE's IW-NLL must be compared against: its NLL is exact.
"""

from __future__ import annotations

import torch

from textvae.config import ModelConfig
from textvae.decoders import LSTMDecoder, sequence_log_prob, shift_right
from textvae.models.base import TextVAE


class LSTMLM(TextVAE):
    """p(x) = prod_t p(x_t | x_<t); ``posterior`` and ``prior`` raise, ``log_likelihood`` ignores z."""

    has_latent = False

    def __init__(self, cfg: ModelConfig, tokenizer):
        super().__init__(tokenizer)
        self.latent_dim = 0
        self.decoder = LSTMDecoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            0,
            cfg.dec_dropout_in,
            cfg.dec_dropout_out,
            cfg.word_dropout,
            False,
            False,
            self.pad_id,
            self.unk_id,
        )

    def posterior(self, batch):
        raise ValueError("lstm_lm has no latent variable")

    def prior(self, batch=None):
        raise ValueError("lstm_lm has no latent variable")

    def log_likelihood(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x), (1, B), nats per sentence; z is ignored."""
        targets, mask = batch["input_ids"], batch["attention_mask"]
        hidden, _ = self.decoder(shift_right(targets, self.bos_id), None)  # (B, T, H)
        return sequence_log_prob(
            hidden, self.decoder.output, targets, mask, float32_softmax=not self.training
        ).unsqueeze(0)

    def decode_step(self, z, input_ids, state):
        """One step: previous tokens (N,), state or None -> logits (N, V), state; z ignored."""
        hidden, state = self.decoder(input_ids.unsqueeze(1), None, state)  # (N, 1, H)
        return self.decoder.output(hidden[:, -1]), state
