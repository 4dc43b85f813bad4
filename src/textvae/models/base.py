"""What every model shares: the training forward (the objective) and ``encode(texts)``.

The model interface (checked by one contract test over ``MODELS``):

- ``has_latent`` (bool), ``latent_dim`` (D; 0 without latent), ``latent_shape`` (the event shape
  of q and p: (D,), or (L, D) for DELLA's layer-wise latents).
- ``posterior(batch) -> Distribution`` q(z|x): batch shape (B,), event shape ``latent_shape``.
- ``prior(batch=None) -> Distribution`` p(z): batch shape (B,) for a batch, () without.
- ``log_likelihood(batch, z) -> Tensor (S, B)``: log p(x|z) in nats per sentence (EOS
  counted, padding not), float32, for z of shape (S, B, *latent_shape) (``None`` without
  latent: S = 1).
- ``decode_step(z, input_ids, state) -> (logits (N, V), state)``: one generation step; z
  (N, *latent_shape) or None, input_ids (N,) the previous token, state None at the first step, else a tuple of
  batch-first tensors (so beam search can reorder rows).

Conditional models (``conditional = True``, e.g. ``cvrae``): the batch also carries the
context (``context_ids`` / ``context_mask``); ``posterior``, ``prior`` and ``log_likelihood``
condition on it, ``prior()`` without a batch raises ValueError, and generation starts from
``initial_state(z, batch)`` (the context is part of the state) instead of state None.

``posterior_and_prior(batch)`` returns both at once (the objective's entry point; by default the
two calls).

For the remedies that treat the two halves of a VAE differently (aggressive training, the
decoder reset after autoencoder pretraining) a model names its inference network:
``inference_modules`` (names of the submodules that compute q(z|x); empty without one);
everything else is the generative side. A model built on a pretrained decoder names it in
``decoder_modules`` (what ``train.ae_freeze_decoder`` holds fixed in the autoencoder phase;
empty when there is none). ``backbone`` names the network family (``lstm``, ``t5``), and
:meth:`TextVAE.make_tokenizer` builds the run's tokenizer. ``bow_head`` (a ``BagOfWordsHead`` or None) and
``bow_weight`` carry the optional bag-of-words loss, which :meth:`TextVAE.auxiliary_losses` hands
to the objective with any other model-side training term.

A model is registered with its config class by :func:`textvae.registry.register_model`
(``config_class``; ``model.name`` selects both); see ARCHITECTURE.md for adding one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from textvae.data import build_tokenizer, encode_texts
from textvae.objectives import ObjectiveSettings, elbo


class TextVAE(nn.Module):
    """Base of the models: holds the tokenizer's special ids and the generic entry points."""

    has_latent: bool = True
    conditional: bool = False
    inference_modules: tuple[str, ...] = ()
    decoder_modules: tuple[str, ...] = ()
    backbone: str = "lstm"
    layerwise_latent: bool = False  # one latent per layer (``kl.free_bits_mode=per_layer``)
    # what the training remedies may do with the model (checked by textvae.remedy_keys):
    supports_aggressive: bool = True  # He et al. 2019's encoder-only inner loop
    ae_decoder_reset: bool = True  # Li et al. 2019's decoder reset at the autoencoder hand-off
    config_class: type  # set by textvae.registry.register_model: the model's config dataclass

    @classmethod
    def make_tokenizer(cls, config, texts: list[str]):
        """The tokenizer of a new run of this model, built from the training ``texts``: by default
        the word-level tokenizer of :func:`textvae.data.build_tokenizer` (``data.min_frequency``,
        ``data.max_vocab`` of the :class:`textvae.config.Config` ``config``). A run saves it with
        ``save_pretrained``; :func:`textvae.data.load_tokenizer` reads it back.
        """
        return build_tokenizer(texts, config.data.min_frequency, config.data.max_vocab)

    def __init__(self, tokenizer):
        super().__init__()
        self.bow_head: nn.Module | None = None
        self.bow_weight = 0.0
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.unk_id = tokenizer.unk_token_id

    max_positions: int | None = None  # the longest sequence its networks take; None: no limit

    def positions_needed(self, n_tokens: int, n_context: int = 0) -> int:
        """Positions the networks use for a sentence of ``n_tokens`` token ids (EOS included)
        with a context of ``n_context`` ids (conditional models; 0 otherwise), compared with
        :attr:`max_positions` by the evaluation, which scores every sentence whole. By default
        the sentence's own length (models with a limit override it, e.g. DELLA's BOS)."""
        return n_tokens

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The event shape of q(z|x) and p(z): (D,) (DELLA overrides it with (L, D))."""
        return (self.latent_dim,)

    @classmethod
    def latent_shape_of(cls, config) -> tuple[int | None, ...]:
        """The event shape of z as the model ``config`` (its ``model`` section: the dataclass, or
        a run's ``config.yaml`` as read) gives it, without building the model: (D,) here, ()
        for a model without latent. DELLA answers (L, D), with L None where it is the layer
        count of a pretrained backbone. What a table of several runs needs
        (:func:`textvae.report.au_dimensions`); a built model's :attr:`latent_shape` is exact.
        """
        return (config.latent_dim,) if cls.has_latent else ()

    @classmethod
    def label_fraction(cls, config) -> float:
        """The fraction of the training sentences whose corpus label the model trains on, for
        the model ``config`` (its ``model`` section); 0.0: it trains on no labels (here).
        Training keeps the labels of that fraction (:func:`textvae.data.semi_supervised_labels`)
        and refuses a corpus without labels when it is > 0."""
        return 0.0

    @classmethod
    def trains_on_labels(cls, config) -> bool:
        """Whether the model of ``config`` (its ``model`` section) trains on corpus labels (a
        classifier on z): :meth:`label_fraction` > 0."""
        return cls.label_fraction(config) > 0

    def describe(self, config) -> str:
        """One line on the networks and the latent for ``report.md``'s setup, from the model
        ``config`` (its ``model`` section): here the LSTM models' embedding and hidden sizes,
        then :func:`latent_text`. A model on another backbone overrides it."""
        return f"embedding {config.embed_dim}, hidden {config.hidden_dim}" + latent_text(
            self, config
        )

    def forward(
        self, batch: dict[str, torch.Tensor], settings: ObjectiveSettings | None = None
    ) -> dict[str, torch.Tensor]:
        """The training objective (negative ELBO with beta, free bits and the optional KL target
        penalty of ``settings``, by default beta 1 and nothing else; plus :meth:`auxiliary_losses`),
        see :func:`textvae.objectives.elbo`."""
        return elbo(self, batch, settings)

    def auxiliary_losses(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor
    ) -> dict[str, tuple[float, torch.Tensor | None]]:
        """The model's training terms besides the ELBO, on the objective's sample z (B, *event):
        ``name -> (weight, value)``, which :func:`textvae.objectives.elbo` adds to the loss as
        ``weight * value.mean()`` and returns under ``name`` (None: nothing this batch). Not part
        of the ELBO; evaluation never includes them.

        Here the bag-of-words term (Zhao et al. 2017) when the model has a ``bow_head``:
        ``bow`` = -log p_bow(x | z), (B,) nats per sentence, weight ``bow_weight``. A model
        with another term overrides this and extends the dict (``lstm_vae``'s classifier).
        """
        if self.bow_head is None:
            return {}
        bow = -self.bow_head.log_prob(z, batch["input_ids"], batch["attention_mask"])  # (B,)
        return {"bow": (self.bow_weight, bow)}

    def encoder_summary(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The encoder's summary h (B, H) that the posterior heads read, before any head: what
        the encoder-feature dispersion of Long et al. 2019 measures
        (:func:`textvae.metrics.encoder_dispersion`). None here: a model without one single
        summary (DELLA reads per-layer features together with its latent recurrence; a model
        without latent); ``lstm_vae``, ``cvrae`` and ``t5_vae`` override it."""
        return None

    def classify_latent(self, z: torch.Tensor) -> torch.Tensor | None:
        """Logits (B, classes) of the model's classifier on z (B, *event) trained jointly with it
        (Chien & Luo 2022; ``model.classifier_weight`` of ``lstm_vae``), from which the
        evaluation reports ``classifier_accuracy``; None here: a model without one."""
        return None

    def posterior_and_prior(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[Distribution, Distribution]:
        """(q(z|x), p(z)) of a batch, p with batch shape (B,): what the training objective calls.
        A model whose two share computation overrides it (``della_cvae`` encodes the context
        once for both)."""
        return self.posterior(batch), self.prior(batch)

    def inference_parameters(self) -> list[nn.Parameter]:
        """Parameters of the inference network q(z|x) (``inference_modules``).

        Raises:
            ValueError: the model names no inference network (e.g. a language model).
        """
        if not self.inference_modules:
            raise ValueError(f"{type(self).__name__} has no separate inference network")
        return [p for name in self.inference_modules for p in getattr(self, name).parameters()]

    def is_inference_key(self, key: str) -> bool:
        """Whether a ``state_dict`` key belongs to the inference network."""
        return any(key == name or key.startswith(name + ".") for name in self.inference_modules)

    @torch.no_grad()
    def encode(self, texts: list[str], contexts: list[str] | None = None) -> Distribution:
        """Posterior q(z|x) (q(z|x, c) with ``contexts``) of raw sentences: ``.mean`` is (B, D)
        float32 (for a flow posterior a Monte Carlo estimate, see textvae.flows), ``.stddev``
        too for a Gaussian posterior.

        Raises:
            ValueError: the model has no latent variable, or is conditional and no contexts
                were given.
        """
        if not self.has_latent:
            raise ValueError(f"{type(self).__name__} has no latent variable to encode into")
        device = next(self.parameters()).device
        batch = encode_texts(self.tokenizer, texts, contexts)
        return self.posterior({k: v.to(device) for k, v in batch.items()})


def latent_text(model: TextVAE, config) -> str:
    """The end of :meth:`TextVAE.describe`: ", latent D, pooling `...`" (and the word dropout of
    a model that has one) for a model with a latent; "" without."""
    if not model.has_latent:
        return ""
    text = f", latent {config.latent_dim}, pooling `{config.pooling}`"
    return text + (
        f", word dropout {config.word_dropout}" if hasattr(config, "word_dropout") else ""
    )
