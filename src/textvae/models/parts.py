"""Config pieces that several models compose: small dataclasses, each with its own keys and checks.

A model's config (beside its model, e.g. :class:`textvae.models.lstm_vae.LSTMVAEConfig`) inherits
the pieces it reads and :class:`textvae.config.ModelConfig`, so the YAML ``model:`` section stays
flat (``model.pooling``, ``model.bow_weight``, ...). Every piece's :meth:`validate` checks its own
keys and calls ``super().validate(config)``, so a composed config checks all of its pieces. A
model that does not read a key does not declare it: setting it is an error naming the models
that have it.
"""

from __future__ import annotations

from dataclasses import dataclass

from textvae.config import Config, ConfigError, ModelConfig, check_at_least, check_choice

POOLINGS = ("last", "first", "mean", "max", "attention")
POSTERIOR_FLOWS = ("none", "planar", "radial", "iaf", "cclin_iaf", "sylvester")
PRIOR_FLOWS = ("none", "iaf")
SUBWORD_TOKENIZERS = ("unigram", "bpe")


@dataclass
class LatentPart(ModelConfig):
    """Attributes:
    latent_dim: D, dimensions of z (of each layer's z_l for DELLA); >= 1.
    """

    latent_dim: int = 32

    def validate(self, config: Config) -> None:
        check_at_least(self, "model", ("latent_dim",), 1)
        super().validate(config)


@dataclass
class PoolingPart(ModelConfig):
    """Attributes:
    pooling: how the encoder summarises its states for q(z|x) (or the context, for the
        conditional models): ``last`` (h_T), ``first`` (the first position: DELLA's encoder
        input starts with BOS, the paper's special token), ``mean``, ``max`` or ``attention``;
        always masked (Long et al. 2019).
    """

    pooling: str = "last"

    def validate(self, config: Config) -> None:
        check_choice("model.pooling", self.pooling, POOLINGS)
        super().validate(config)


@dataclass
class LSTMPart(ModelConfig):
    """The LSTM decoder's sizes (He et al. 2019: embedding 512, hidden 1024).

    Attributes:
        embed_dim: token embedding size of the LSTM encoder(s) and decoder.
        hidden_dim: hidden size of the LSTM encoder(s) and decoder (and of ``cvrae``'s prior
            network); >= 1.
        dec_dropout_in / dec_dropout_out: dropout on decoder input embeddings / LSTM outputs.
        word_dropout: probability of replacing a decoder input token by ``<unk>`` (Bowman et
            al. 2016).
    """

    embed_dim: int = 512
    hidden_dim: int = 1024
    dec_dropout_in: float = 0.5
    dec_dropout_out: float = 0.5
    word_dropout: float = 0.0

    def validate(self, config: Config) -> None:
        check_at_least(self, "model", ("hidden_dim",), 1)
        super().validate(config)


@dataclass
class LSTMEncoderPart(PoolingPart):
    """Attributes:
    bidirectional: the LSTM encoder(s) read both directions (the summary is then 2H wide).
    """

    bidirectional: bool = False


@dataclass
class InferenceEncoderPart(LSTMEncoderPart):
    """The inference (response) encoder's regularisers.

    Attributes:
        enc_dropout_in: dropout on the inference encoder's input embeddings.
        embed_noise: amortised regularisation (Shu et al. 2018): Gaussian noise of this
            standard deviation added to the inference encoder's input embeddings, in training
            only; >= 0.
    """

    enc_dropout_in: float = 0.0
    embed_noise: float = 0.0

    def validate(self, config: Config) -> None:
        check_at_least(self, "model", ("embed_noise",), 0)
        super().validate(config)


@dataclass
class DecoderCodePart(ModelConfig):
    """How a code (z, or the context summary) drives the LSTM decoder.

    Attributes:
        z_init_state: the code sets the decoder's initial state (c_0 = W u, h_0 = tanh c_0).
        z_every_step: the code is concatenated to every decoder input embedding.
    """

    z_init_state: bool = True
    z_every_step: bool = True


@dataclass
class LatentDecoderPart(DecoderCodePart):
    """Attributes:
    z_skip: skip connection: z (for ``cvrae`` the decoder code [z; c]) is projected to the
        embedding size and added to every decoder input embedding, in addition to
        ``z_init_state`` / ``z_every_step``.
    """

    z_skip: bool = False


@dataclass
class PosteriorHeadPart(ModelConfig):
    """Remedies in the Gaussian posterior head (:class:`textvae.posteriors.GaussianHead`).

    Attributes:
        posterior_bn_gamma: BN-VAE (Zhu et al. 2020): batch-normalise the posterior means with
            this fixed scale gamma and a learnable shift; 0 = off. A training batch's mean KL is
            then at least about ``latent_dim * gamma^2 / 2`` nats per sentence once the means
            vary across the batch by much more than BatchNorm's eps (exact bound in
            :class:`textvae.posteriors.GaussianHead`, docs/remedies.md).
        posterior_bn_eps: BN-VAE: BatchNorm's eps in that normalisation (> 0; default 1e-5, as
            ``nn.BatchNorm1d`` and Zhu et al.'s code). The encoder escapes the KL floor by making
            its means vary across a batch by much less than eps (measured on PTB: v_d ~ 1e-8);
            a smaller eps (1e-12) keeps the floor at such variances.
        min_rate_delta: delta-VAE style committed rate (Razavi et al. 2019), nats per latent
            dimension: the posterior variance is bounded so that every dimension's
            KL(q || N(0, 1)) is at least delta for every input; 0 = off; at most 9.
    """

    posterior_bn_gamma: float = 0.0
    posterior_bn_eps: float = 1e-5
    min_rate_delta: float = 0.0

    def validate(self, config: Config) -> None:
        check_at_least(self, "model", ("posterior_bn_gamma", "min_rate_delta"), 0)
        if not self.posterior_bn_eps > 0:
            raise ConfigError(
                f"model.posterior_bn_eps={self.posterior_bn_eps} must be > 0 (BatchNorm "
                "divides by sqrt(batch variance + eps))"
            )
        if self.min_rate_delta > 9:
            raise ConfigError(
                "model.min_rate_delta must be at most 9 nats per dimension (the "
                "posterior log-variance is clamped at -20)"
            )
        super().validate(config)


@dataclass
class FlowPart(ModelConfig):
    """Normalising flows on q(z|x) and p(z) (:mod:`textvae.flows`).

    Attributes:
        posterior_flow: normalising flow on the posterior (Chien & Luo, APSIPA ASC 2022):
            ``none`` | ``planar`` | ``radial`` (Rezende & Mohamed 2015) | ``iaf`` (Kingma et al.
            2016) | ``cclin_iaf`` (volume preserving, Tomczak & Welling 2017) | ``sylvester``
            (triangular, van den Berg et al. 2018). Amortised: the flow parameters are computed
            from the encoder summary.
        posterior_flow_steps: K, the number of flow steps z_K = f_K(...f_1(z_0)); 0 gives a
            flow distribution with no step (its KL is then estimated by Monte Carlo).
        flow_hidden: hidden units of each MADE (``iaf`` posterior steps and the ``iaf`` prior).
        flow_components: ``cclin_iaf``: lower-triangular matrices in each step's convex
            combination (Tomczak & Welling's ``number_combination``).
        prior_flow: ``none`` (p(z) = N(0, I), or the conditional Gaussian of ``cvrae``) or
            ``iaf``: the prior pushed through ``prior_flow_steps`` autoregressive affine steps
            (:class:`textvae.flows.AutoregressivePrior`; density in one pass, sampling in D).
    """

    posterior_flow: str = "none"
    posterior_flow_steps: int = 4
    flow_hidden: int = 256
    flow_components: int = 3
    prior_flow: str = "none"
    prior_flow_steps: int = 2

    def validate(self, config: Config) -> None:
        check_choice("model.posterior_flow", self.posterior_flow, POSTERIOR_FLOWS)
        check_choice("model.prior_flow", self.prior_flow, PRIOR_FLOWS)
        check_at_least(self, "model", ("flow_hidden", "flow_components"), 1)
        check_at_least(self, "model", ("posterior_flow_steps", "prior_flow_steps"), 0)
        super().validate(config)


@dataclass
class BowPart(ModelConfig):
    """The bag-of-words auxiliary loss (Zhao, Zhao & Eskenazi 2017).

    Attributes:
        bow_weight: weight of the loss of an MLP z -> vocabulary; 0 = off and no parameters
            created. Not part of the ELBO: reported as ``bow``, never in evaluation.
        bow_hidden: hidden units of that MLP; null = the model's LSTM ``hidden_dim`` (the LSTM
            models; the Transformer models default to 1024). Before per-model configs the key
            was ``hidden_dim`` for every model.
    """

    bow_weight: float = 0.0
    bow_hidden: int | None = None

    def validate(self, config: Config) -> None:
        check_at_least(self, "model", ("bow_weight",), 0)
        if self.bow_hidden is not None:
            check_at_least(self, "model", ("bow_hidden",), 1)
        super().validate(config)

    def bow_width(self) -> int:
        """The MLP's hidden units: ``bow_hidden``, else the LSTM's ``hidden_dim``."""
        return self.bow_hidden if self.bow_hidden is not None else self.hidden_dim  # type: ignore[attr-defined]


@dataclass
class ClassifierPart(ModelConfig):
    """A classifier on z trained jointly (Chien & Luo 2022's sentiment task).

    Attributes:
        classifier_weight: weight of the classifier's loss: a linear map z -> classes (z_K with
            a flow), loss ``classifier_weight`` x the mean cross-entropy over the batch's
            labelled sentences (``cls`` in the training log); 0 = off, no parameters. Not part
            of the ELBO; ``evaluate`` reports ``classifier_accuracy`` from E_q[z|x] on labelled
            data. Needs a labelled training corpus (e.g. ``yelp_sentiment``).
        classifier_classes: number of label values (labels are 0..classes-1); >= 2.
        classifier_label_fraction: semi-supervised training: the fraction of training sentences
            whose label the classifier sees, in (0, 1]; which ones is fixed by a seeded
            permutation of the sentence indices (seed 0), the same in every run and on resume
            (:func:`textvae.data.semi_supervised_labels`).
    """

    classifier_weight: float = 0.0
    classifier_classes: int = 2
    classifier_label_fraction: float = 1.0

    def validate(self, config: Config) -> None:
        if not 0.0 < self.classifier_label_fraction <= 1.0:
            raise ConfigError(
                f"model.classifier_label_fraction={self.classifier_label_fraction} "
                "must be in (0, 1]"
            )
        if self.classifier_classes < 2:
            raise ConfigError("model.classifier_classes must be >= 2")
        check_at_least(self, "model", ("classifier_weight",), 0)
        super().validate(config)


@dataclass
class TokenDropPart(ModelConfig):
    """Attributes:
    encoder_token_drop: denoising (Park & Lee 2021, arXiv 2108.02446: "token deletion on
        encoder inputs"): in training, delete this fraction of each sentence's encoder input tokens
        (EOS kept) before q(z|x) is computed; the decoder target is untouched. 0 = off; in
        [0, 1). See :func:`textvae.encoders.delete_tokens`.
    """

    encoder_token_drop: float = 0.0

    def validate(self, config: Config) -> None:
        if not 0.0 <= self.encoder_token_drop < 1.0:
            raise ConfigError(
                f"model.encoder_token_drop={self.encoder_token_drop} must be in [0, 1)"
            )
        super().validate(config)


@dataclass
class TransformerPart(ModelConfig):
    """A Hugging Face backbone whose encoder and decoder share the token embedding.

    Attributes:
        pretrained: a Hugging Face model name or folder (``t5-small``, ``gpt2``) loaded with
            ``from_pretrained``, with its tokenizer; null builds the backbone from scratch with
            the model's size keys and trains a subword tokenizer on the training split.
    """

    pretrained: str | None = None
