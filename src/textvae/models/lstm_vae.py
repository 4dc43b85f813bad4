"""LSTM sentence VAE (Bowman et al. 2016) with masked pooling encoders (Long et al. 2019).

He et al. 2019 configuration (``configs/ptb/lstm-vae.yaml``): 1-layer LSTM encoder and
decoder, embedding 512, hidden 1024, latent 32, decoder dropout 0.5 in and out, z as the
decoder's initial state and concatenated to every input embedding.

The flow-based VRAE (Chien & Luo, APSIPA ASC 2022; ``configs/ptb/flow-vrae*.yaml``) is this
model with options: ``posterior_flow`` (an amortised flow on q(z|x)), ``prior_flow`` (an
autoregressive flow prior), ``embed_noise`` (amortised regularisation), ``z_skip`` (z added
to every decoder input) and ``kl.target`` (KL target penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from textvae.decoders import BagOfWordsHead, LSTMDecoder, sequence_log_prob, shift_right
from textvae.encoders import LSTMEncoder, delete_tokens
from textvae.flows import AutoregressivePrior, PosteriorFlow
from textvae.models.base import TextVAE
from textvae.models.parts import (
    BowPart,
    ClassifierPart,
    FlowPart,
    InferenceEncoderPart,
    LatentDecoderPart,
    LatentPart,
    LSTMPart,
    PosteriorHeadPart,
    TokenDropPart,
)
from textvae.posteriors import GaussianHead, standard_normal
from textvae.registry import register_model


@dataclass
class LSTMVAEConfig(
    ClassifierPart,
    TokenDropPart,
    BowPart,
    FlowPart,
    PosteriorHeadPart,
    LatentDecoderPart,
    InferenceEncoderPart,
    LatentPart,
    LSTMPart,
):
    """``model.name=lstm_vae``: the pieces of :mod:`textvae.models.parts` it composes (LSTM
    sizes, encoder and pooling, latent size, posterior head, flows, bag-of-words, token
    deletion, the classifier on z); no key of its own."""

    name: str = "lstm_vae"


@register_model("lstm_vae", LSTMVAEConfig, default=True)
class LSTMVAE(TextVAE):
    """q(z|x) from a pooled LSTM encoder (optionally flowed); p(z) = N(0, I) (optionally
    flowed); p(x|z) an LSTM decoder.

    Remedies from the config: ``encoder_token_drop`` (denoising), ``posterior_bn_gamma`` and
    ``min_rate_delta`` in the posterior head (:class:`~textvae.posteriors.GaussianHead`; with a posterior flow they act on the base
    Gaussian q0), ``bow_weight`` adds a :class:`~textvae.decoders.BagOfWordsHead`,
    ``classifier_weight`` a linear classifier from z to the corpus label (``classifier``; the
    flow VRAE's sentiment task, Chien & Luo 2022, trained jointly, semi-supervised). The
    inference network is ``encoder``, ``posterior_head`` and ``posterior_flow``.
    """

    inference_modules = ("encoder", "posterior_head", "posterior_flow")

    @classmethod
    def label_fraction(cls, config) -> float:
        """``model.classifier_label_fraction`` when the classifier on z is on
        (``model.classifier_weight`` > 0), else 0.0 (:meth:`TextVAE.label_fraction`)."""
        return config.classifier_label_fraction if config.classifier_weight > 0 else 0.0

    def __init__(self, cfg: LSTMVAEConfig, tokenizer):
        super().__init__(tokenizer)
        self.latent_dim = cfg.latent_dim
        self.encoder_token_drop = cfg.encoder_token_drop
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
        self.posterior_head = GaussianHead(
            self.encoder.out_dim,
            cfg.latent_dim,
            bn_gamma=cfg.posterior_bn_gamma,
            bn_eps=cfg.posterior_bn_eps,
            min_rate_delta=cfg.min_rate_delta,
        )
        self.decoder = LSTMDecoder(
            self.vocab_size,
            cfg.embed_dim,
            cfg.hidden_dim,
            cfg.latent_dim,
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
            self.bow_head = BagOfWordsHead(cfg.latent_dim, cfg.bow_width(), self.vocab_size)
            self.bow_weight = cfg.bow_weight
        self.classifier = None  # Chien & Luo 2022's classifier on z: only when configured
        self.classifier_weight = cfg.classifier_weight
        if cfg.classifier_weight > 0:
            self.classifier = nn.Linear(cfg.latent_dim, cfg.classifier_classes)
        # no parameters (and no RNG draws) unless a flow is configured
        self.posterior_flow = PosteriorFlow(
            cfg.posterior_flow,
            cfg.latent_dim,
            self.encoder.out_dim,
            cfg.posterior_flow_steps,
            cfg.flow_hidden,
            cfg.flow_components,
        )
        self.prior_flow = None
        if cfg.prior_flow == "iaf":
            self.prior_flow = AutoregressivePrior(
                cfg.latent_dim, cfg.prior_flow_steps, cfg.flow_hidden
            )

    def posterior(self, batch: dict[str, torch.Tensor]) -> Distribution:
        """q(z|x): N(mu, diag sigma^2) from the pooled encoder, pushed through the amortised
        posterior flow when one is configured; batch (B,), event (D,), float32. In training
        with ``encoder_token_drop`` > 0 the encoder reads the sentence with tokens deleted
        (:func:`textvae.encoders.delete_tokens`)."""
        h = self.encoder_summary(batch)  # (B, H_out)
        return self.posterior_flow(self.posterior_head(h), h)

    def encoder_summary(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's pooled summary h (B, H_out) that the posterior heads (and the flow) read,
        before any head: what the encoder-feature dispersion of Long et al. 2019 measures
        (:func:`textvae.metrics.encoder_dispersion`). Token deletion applies in training."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.training and self.encoder_token_drop > 0:  # denoising, the decoder target stays
            ids, mask = delete_tokens(ids, mask, self.encoder_token_drop, self.pad_id)
        return self.encoder(ids, mask)

    def prior(self, batch: dict[str, torch.Tensor] | None = None) -> Distribution:
        """p(z) = N(0, I), pushed through the prior flow when one is configured: batch shape
        (B,) for a batch, () without; event (D,)."""
        shape = () if batch is None else (batch["input_ids"].size(0),)
        base = standard_normal(self.latent_dim, shape, self.decoder.output.weight.device)
        return base if self.prior_flow is None else self.prior_flow(base)

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for z (S, B, D): (S, B) float32, nats per sentence (EOS counted).

        The S samples of a sentence go through the decoder as one (S * B, T) batch.
        """
        s, b, d = z.shape
        targets = batch["input_ids"].repeat(s, 1)  # (S*B, T), sample-major
        mask = batch["attention_mask"].repeat(s, 1)
        inputs = shift_right(targets, self.bos_id)
        hidden, _ = self.decoder(inputs, z.reshape(s * b, d))  # (S*B, T, H)
        return sequence_log_prob(
            hidden, self.decoder.output, targets, mask, float32_softmax=not self.training
        ).view(s, b)

    def auxiliary_losses(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor
    ) -> dict[str, tuple[float, torch.Tensor | None]]:
        """The bag-of-words term (:meth:`TextVAE.auxiliary_losses`) and, with a classifier
        (Chien & Luo 2022) and a batch with ``labels``, ``cls``: the mean cross-entropy (nats per
        labelled sentence) of the classifier's prediction from z over the sentences with a
        label >= 0 (None when there is none), weight ``classifier_weight``."""
        terms = super().auxiliary_losses(batch, z)
        if self.classifier is not None and "labels" in batch:
            labelled = batch["labels"] >= 0  # -1: hidden from the semi-supervised classifier
            cls = None
            if bool(labelled.any()):
                logits = self.classifier(z[labelled].float())  # (B_labelled, classes)
                cls = F.cross_entropy(logits, batch["labels"][labelled])
            terms["cls"] = (self.classifier_weight, cls)
        return terms

    def classify_latent(self, z: torch.Tensor) -> torch.Tensor | None:
        """Logits (B, classes) float32 of the classifier on z (B, D)
        (:meth:`TextVAE.classify_latent`); None when ``classifier_weight`` is 0 (no classifier)."""
        return None if self.classifier is None else self.classifier(z.float())

    def decode_step(self, z, input_ids, state):
        """One step: z (N, D), previous tokens (N,), state or None -> logits (N, V), state."""
        hidden, state = self.decoder(input_ids.unsqueeze(1), z, state)  # (N, 1, H)
        return self.decoder.output(hidden[:, -1]), state
