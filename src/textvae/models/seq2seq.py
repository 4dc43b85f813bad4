"""Conditional LSTM language model (encoder-decoder, no latent): the baseline of the conditional
VRAE, as the LSTM LM is the baseline of the LSTM VAE.

p(x|c) = prod_t p(x_t | x_<t, c): the context encoder of :class:`textvae.models.CVRAE` gives
h_c (B, H_c); the LSTM decoder is driven by u = h_c exactly as the CVRAE's decoder is driven by
[z ; h_c] (initial state, concatenation at every step, optional skip connection). It is the CVRAE
with z removed (Zhao, Zhao & Eskenazi 2017's "baseline" encoder-decoder), so the two compare at
equal sizes: its NLL of the response given c is exact, and the spread of its responses comes
from the decoding strategy alone (greedy decoding gives one response per context however many
are asked for).
"""

from __future__ import annotations

import torch

from textvae.config import ModelConfig
from textvae.decoders import LSTMDecoder, sequence_log_prob, shift_right
from textvae.encoders import LSTMEncoder, encode_context
from textvae.models.base import TextVAE


class Seq2Seq(TextVAE):
    """p(x|c) with an LSTM context encoder and an LSTM decoder; no latent variable.

    The batch must carry ``context_ids`` / ``context_mask`` (B, T_c) besides ``input_ids`` /
    ``attention_mask`` (B, T). ``posterior`` and ``prior`` raise; ``log_likelihood(batch, None)``
    is exact. Generation: ``initial_state(None, batch)`` then ``decode_step`` (z ignored).

    Raises:
        ValueError: (at use) a batch without ``context_ids``; ``posterior``/``prior`` (no latent).
    """

    has_latent = False
    conditional = True

    def __init__(self, cfg: ModelConfig, tokenizer):
        super().__init__(tokenizer)
        self.latent_dim = 0
        self.context_encoder = LSTMEncoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            cfg.pooling,
            cfg.bidirectional,
            0.0,
            self.pad_id,
        )
        self.decoder = LSTMDecoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            self.context_encoder.out_dim,
            cfg.dec_dropout_in,
            cfg.dec_dropout_out,
            cfg.word_dropout,
            cfg.z_init_state,
            cfg.z_every_step,
            self.pad_id,
            self.unk_id,
            z_skip=cfg.z_skip,
        )

    def context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h_c (B, H_c), float32 or the autocast dtype.

        Raises:
            ValueError: the batch has no ``context_ids`` / ``context_mask``.
        """
        return encode_context(self.context_encoder, batch, "seq2seq")

    def posterior(self, batch):
        raise ValueError("seq2seq has no latent variable")

    def prior(self, batch=None):
        raise ValueError("seq2seq has no latent variable")

    def log_likelihood(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x|c), (1, B) float32, nats per response (EOS counted); z is ignored."""
        targets, mask = batch["input_ids"], batch["attention_mask"]
        hidden, _ = self.decoder(
            shift_right(targets, self.bos_id), self.context(batch)
        )  # (B, T, H)
        return sequence_log_prob(
            hidden, self.decoder.output, targets, mask, float32_softmax=not self.training
        ).unsqueeze(0)

    def initial_state(self, z: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> tuple:
        """(h_0 (N, H), c_0 (N, H), h_c (N, H_c)) for a batch of N contexts; z is ignored."""
        h_c = self.context(batch)
        h0, c0 = self.decoder.initial_state(h_c, h_c.size(0))
        return h0, c0, h_c

    def decode_step(self, z, input_ids, state):
        """One step: previous tokens (N,), state from :meth:`initial_state` -> logits (N, V),
        state; z is ignored.

        Raises:
            ValueError: state is None (the context must come through ``initial_state``).
        """
        if state is None:
            raise ValueError(
                "seq2seq generation starts from model.initial_state(None, batch), "
                "which carries the context; state None has no context"
            )
        h, c, h_c = state
        hidden, (h, c) = self.decoder(input_ids.unsqueeze(1), h_c, (h, c))  # (N, 1, H)
        return self.decoder.output(hidden[:, -1]), (h, c, h_c)
