"""Conditional variational recurrent autoencoder for dialogue (Chien & Luo, APSIPA ASC 2022's
conditional VRAE; the CVAE of Zhao, Zhao & Eskenazi 2017 with LSTM encoders).

Given a context c (the previous utterances) and a response x:

- context encoder: h_c = LSTM encoder over the context tokens (masked pooling), (B, H_c);
- posterior q(z|x, c): a diagonal Gaussian from [h_x ; h_c] (h_x the response encoder's
  summary), optionally pushed through an amortised flow conditioned on [h_x ; h_c];
- prior p(z|c): a diagonal Gaussian from an MLP of h_c (Linear, tanh, then linear heads, as
  Zhao et al.'s prior network), optionally pushed through an autoregressive flow conditioned
  on h_c (``prior_flow: iaf``);
- decoder p(x|z, c): the LSTM decoder driven by the code u = [z ; h_c] (initial state,
  concatenation at every step, and the optional skip connection all use u).

The ELBO is log p(x|c) >= E_q[log p(x|z, c)] - KL(q(z|x, c) || p(z|c)); the evaluation protocol
applies unchanged (IW-NLL is a bound on -log p(x|c)); see docs/flows.md for what MI and AU
measure here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from textvae.config import ModelConfig
from textvae.decoders import BagOfWordsHead, LSTMDecoder, sequence_log_prob, shift_right
from textvae.encoders import LSTMEncoder, encode_context
from textvae.flows import AutoregressivePrior, PosteriorFlow
from textvae.models.base import TextVAE
from textvae.posteriors import GaussianHead


class CVRAE(TextVAE):
    """q(z|x, c), p(z|c), p(x|z, c) with LSTM encoders and decoder (shapes in the module doc).

    The batch must carry ``context_ids`` / ``context_mask`` (B, T_c) besides ``input_ids`` /
    ``attention_mask`` (a dialogue corpus: ``data.corpus=dailydialog`` or
    ``data.format=dialogue``). The inference network is ``encoder`` (response encoder),
    ``posterior_head`` and ``posterior_flow``; the context encoder is shared by posterior,
    prior and decoder and counts as the generative side (aggressive training does not update
    it in its inner loop; the AE-pretraining reset re-initialises it). ``embed_noise`` applies
    to the response encoder only. Generation: ``initial_state(z, batch)`` then
    ``decode_step``; the context summary rides in the state.

    Raises:
        ValueError: (at use) a batch without ``context_ids``; ``prior()`` without a batch.
    """

    conditional = True
    inference_modules = ("encoder", "posterior_head", "posterior_flow")

    def __init__(self, cfg: ModelConfig, tokenizer):
        super().__init__(tokenizer)
        self.latent_dim = cfg.latent_dim
        self.context_encoder = LSTMEncoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            cfg.pooling,
            cfg.bidirectional,
            0.0,
            self.pad_id,
        )
        context_dim = self.context_encoder.out_dim
        self.encoder = LSTMEncoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            cfg.pooling,
            cfg.bidirectional,
            cfg.enc_dropout_in,
            self.pad_id,
            noise_std=cfg.embed_noise,
        )
        joint_dim = self.encoder.out_dim + context_dim
        self.posterior_head = GaussianHead(joint_dim, cfg.latent_dim)
        self.prior_net = nn.Sequential(nn.Linear(context_dim, cfg.hidden_dim), nn.Tanh())
        self.prior_head = GaussianHead(cfg.hidden_dim, cfg.latent_dim)
        self.decoder = LSTMDecoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            cfg.latent_dim + context_dim,
            cfg.dec_dropout_in,
            cfg.dec_dropout_out,
            cfg.word_dropout,
            cfg.z_init_state,
            cfg.z_every_step,
            self.pad_id,
            self.unk_id,
            z_skip=cfg.z_skip,
        )
        if cfg.bow_weight > 0:
            self.bow_head = BagOfWordsHead(cfg.latent_dim, cfg.hidden_dim, self.vocab_size)
            self.bow_weight = cfg.bow_weight
        self.posterior_flow = PosteriorFlow(
            cfg.posterior_flow,
            cfg.latent_dim,
            joint_dim,
            cfg.posterior_flow_steps,
            cfg.flow_hidden,
            cfg.flow_components,
        )
        self.prior_flow = None
        if cfg.prior_flow == "iaf":
            self.prior_flow = AutoregressivePrior(
                cfg.latent_dim, cfg.prior_flow_steps, cfg.flow_hidden, context_dim
            )

    def context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h_c (B, H_c): the context encoder's summary.

        Raises:
            ValueError: the batch has no ``context_ids`` / ``context_mask``.
        """
        return encode_context(self.context_encoder, batch, "cvrae")

    def posterior(self, batch: dict[str, torch.Tensor]) -> Distribution:
        """q(z|x, c): batch (B,), event (D,), float32 (a flow distribution with a flow)."""
        h = self.encoder_summary(batch)  # (B, H_x + H_c)
        return self.posterior_flow(self.posterior_head(h), h)

    def encoder_summary(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[h_x ; h_c] (B, H_x + H_c): the response's pooled summary and the context's, what the
        posterior head reads (:func:`textvae.metrics.encoder_dispersion`)."""
        return torch.cat(
            [self.encoder(batch["input_ids"], batch["attention_mask"]), self.context(batch)], dim=-1
        )

    def prior(self, batch: dict[str, torch.Tensor] | None = None) -> Distribution:
        """p(z|c): batch (B,), event (D,), float32; needs a batch with the context."""
        if batch is None:
            raise ValueError(
                "cvrae's prior p(z|c) depends on the context: pass a batch with "
                "context_ids/context_mask (textvae generate --mode respond)"
            )
        h_c = self.context(batch)
        base = self.prior_head(self.prior_net(h_c))
        return base if self.prior_flow is None else self.prior_flow(base, h_c)

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log p(x|z, c) for z (S, B, D): (S, B) float32, nats per sentence (EOS counted)."""
        s, b, d = z.shape
        h_c = self.context(batch)  # (B, H_c)
        code = torch.cat([z.reshape(s * b, d), h_c.repeat(s, 1).to(z.dtype)], dim=-1)
        targets = batch["input_ids"].repeat(s, 1)  # (S*B, T), sample-major
        mask = batch["attention_mask"].repeat(s, 1)
        hidden, _ = self.decoder(shift_right(targets, self.bos_id), code)  # (S*B, T, H)
        return sequence_log_prob(
            hidden, self.decoder.output, targets, mask, float32_softmax=not self.training
        ).view(s, b)

    def initial_state(self, z: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
        """Generation state before the first step: (h_0 (N, H), c_0 (N, H), h_c (N, H_c)) for
        z (N, D) and a batch of N contexts."""
        h_c = self.context(batch)
        h0, c0 = self.decoder.initial_state(torch.cat([z, h_c.to(z.dtype)], dim=-1), z.size(0))
        return h0, c0, h_c

    def decode_step(self, z, input_ids, state):
        """One step: z (N, D), previous tokens (N,), state from :meth:`initial_state` ->
        logits (N, V), state.

        Raises:
            ValueError: state is None (the context must come through ``initial_state``).
        """
        if state is None:
            raise ValueError(
                "cvrae generation starts from model.initial_state(z, batch), which "
                "carries the context; state None has no context"
            )
        h, c, h_c = state
        code = torch.cat([z, h_c.to(z.dtype)], dim=-1)
        hidden, (h, c) = self.decoder(input_ids.unsqueeze(1), code, (h, c))  # (N, 1, H)
        return self.decoder.output(hidden[:, -1]), (h, c, h_c)
