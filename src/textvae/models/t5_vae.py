"""T5 VAE finetuned in two phases (Park & Lee 2021, "Finetuning Pretrained Transformers into
Variational Autoencoders", Insights @ EMNLP, arXiv 2108.02446).

The backbone is a Hugging Face ``transformers`` T5: ``model.pretrained`` (``t5-small``, a folder)
through ``from_pretrained`` with its tokenizer, or a ``T5Config`` built from the ``model.t5_*``
sizes with a subword tokenizer trained on the corpus (:meth:`T5VAE.make_tokenizer`).

- q(z|x): the T5 encoder, masked ``mean | max | attention`` (or ``last``) pooling of its last
  layer (:func:`textvae.encoders.masked_pool`: padding never contributes), bias-free linear
  heads to mu and log sigma^2. Training may delete a fraction of the encoder's input tokens
  (``model.encoder_token_drop``, :func:`textvae.encoders.delete_tokens`).
- p(x|z): the T5 decoder with its cross-attention removed; z enters by ``memory`` (a key and a
  value per decoder self-attention layer and head, projected from z by one bias-free linear
  map: an extra slot every position attends to, the Optimus scheme of Li et al. 2020) and/or
  ``embedding`` (W z added to every decoder input embedding). The memory slot is a one-position
  prefix of the decoder's self-attention cache (a ``transformers`` ``DynamicCache``): T5's
  relative position bias then sees it at position 0, before the decoder start token, the same
  in teacher forcing and in step-wise decoding. Optimus and Park & Lee use one projected vector
  as both key and value; here key and value have their own projections.
- p(z) = N(0, I).

The two phases (autoencoder with KL weight 0, then the VAE from the phase-1 weights) are the
training loop's (``train.ae_pretrain_steps``, ``train.ae_patience``, ``train.ae_freeze_decoder``,
``train.ae_reset_decoder=false``; see :mod:`textvae.train`).

Token ids: the decoder starts from T5's ``decoder_start_token_id``, the pad id (``bos_id`` is
set to it, so the shared generation code starts there); every sentence ends with EOS
(``</s>``), which is predicted and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from textvae.config import Config, ConfigError, check_at_least, check_choice
from textvae.data import train_subword_tokenizer as train_t5_tokenizer  # the shared trainer
from textvae.decoders import BagOfWordsHead, sequence_log_prob, shift_right
from textvae.encoders import AttentionPool, delete_tokens, masked_pool
from textvae.models.base import TextVAE, latent_text
from textvae.models.parts import (
    SUBWORD_TOKENIZERS,
    BowPart,
    LatentPart,
    PoolingPart,
    PosteriorHeadPart,
    TokenDropPart,
    TransformerPart,
)
from textvae.posteriors import GaussianHead, standard_normal
from textvae.registry import register_model

LATENT_INJECTIONS = ("memory", "embedding", "both")


@dataclass
class T5VAEConfig(
    TransformerPart, TokenDropPart, BowPart, PosteriorHeadPart, PoolingPart, LatentPart
):
    """``model.name=t5_vae`` (Park & Lee 2021): the shared pieces (:mod:`textvae.models.parts`:
    latent size, pooling, posterior head, bag-of-words, token deletion, ``pretrained``) and the
    T5's own keys.

    Attributes:
        bow_hidden: the bag-of-words MLP's hidden units (default 1024; this key was
            ``hidden_dim`` before per-model configs, and a run folder's ``hidden_dim`` is read
            as it).
        latent_injection: how z reaches the T5 decoder: ``memory`` (one extra key/value slot per
            decoder self-attention layer and head; cross-attention removed, so z is the only
            path from the encoder), ``embedding`` (W z added to every decoder input embedding)
            or ``both``.
        t5_d_model / t5_d_ff / t5_num_layers / t5_num_decoder_layers / t5_num_heads / t5_d_kv /
            t5_dropout: ``T5Config`` fields of a T5 built from scratch (t5-small's sizes by
            default); ``t5_dropout`` also overrides a pretrained model's ``dropout_rate``.
        t5_tokenizer / t5_vocab_size: the subword tokenizer trained on the corpus for a T5 from
            scratch: ``bpe`` or ``unigram`` (T5's kind; on PTB at 8,000 types HF's Unigram
            trainer stops at 5,612 types and 1.55 tokens per word, BPE gives 1.13), with this
            many types including the special tokens ``<pad> </s> <unk>``.
    """

    renamed_keys = {"hidden_dim": "bow_hidden"}

    name: str = "t5_vae"
    bow_hidden: int | None = 1024
    latent_injection: str = "memory"
    t5_d_model: int = 512
    t5_d_ff: int = 2048
    t5_num_layers: int = 6
    t5_num_decoder_layers: int = 6
    t5_num_heads: int = 8
    t5_d_kv: int = 64
    t5_dropout: float = 0.1
    t5_tokenizer: str = "bpe"
    t5_vocab_size: int = 8000

    def validate(self, config: Config) -> None:
        check_choice("model.latent_injection", self.latent_injection, LATENT_INJECTIONS)
        check_choice("model.t5_tokenizer", self.t5_tokenizer, SUBWORD_TOKENIZERS)
        sizes = ("t5_d_model", "t5_d_ff", "t5_num_layers", "t5_num_decoder_layers")
        check_at_least(self, "model", (*sizes, "t5_num_heads", "t5_d_kv", "t5_vocab_size"), 1)
        if not 0.0 <= self.t5_dropout < 1.0:
            raise ConfigError(f"model.t5_dropout={self.t5_dropout} must be in [0, 1)")
        super().validate(config)


def build_t5(cfg: T5VAEConfig, tokenizer):
    """The ``transformers`` ``T5ForConditionalGeneration`` of ``cfg``: ``from_pretrained`` when
    ``cfg.pretrained`` is set (its ``dropout_rate`` set to ``cfg.t5_dropout``), else a fresh one
    from a ``T5Config`` of the ``t5_*`` sizes whose vocabulary and special ids are the
    tokenizer's (pad = decoder start)."""
    from transformers import T5Config, T5ForConditionalGeneration

    if cfg.pretrained is not None:
        return T5ForConditionalGeneration.from_pretrained(
            cfg.pretrained, dropout_rate=cfg.t5_dropout
        )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.t5_d_model,
        d_ff=cfg.t5_d_ff,
        d_kv=cfg.t5_d_kv,
        num_layers=cfg.t5_num_layers,
        num_decoder_layers=cfg.t5_num_decoder_layers,
        num_heads=cfg.t5_num_heads,
        dropout_rate=cfg.t5_dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


@register_model("t5_vae", T5VAEConfig)
class T5VAE(TextVAE):
    """q(z|x) from the pooled T5 encoder; p(z) = N(0, I); p(x|z) the T5 decoder fed z by memory
    and/or embedding (module docstring).

    Submodules: ``shared`` (the token embedding of encoder and decoder, and the output layer
    when T5 ties them), ``encoder`` and ``decoder`` (``transformers`` ``T5Stack``; the decoder's
    cross-attention layers are replaced by ``nn.Identity`` and never run), ``lm_head`` (None when
    tied to ``shared``, as transformers 5 always ties T5), ``pool_attention`` (attention pooling
    only), ``posterior_head``, ``memory`` (z -> L x 2 x H x d_kv, or None) and ``z_embed``
    (z -> d_model, or None). The inference network is
    ``encoder``, ``pool_attention`` and ``posterior_head``; ``train.ae_freeze_decoder`` holds
    ``shared``, ``decoder`` and ``lm_head`` fixed (with ``shared`` also the encoder's input
    embedding: T5 ties them).

    Remedies from the config: ``posterior_bn_gamma`` / ``min_rate_delta`` in the posterior head,
    ``bow_weight``, ``encoder_token_drop``.

    Raises:
        OSError: ``cfg.pretrained`` cannot be loaded (from ``transformers``).
        ValueError: the tokenizer has more types than the T5's vocabulary.
    """

    # a Transformer backbone: no LSTM-style aggressive loop; the VAE phase starts from the
    # autoencoder phase's weights (Park & Lee 2021; DELLA's encoder is its decoder)
    supports_aggressive = False
    ae_decoder_reset = False

    inference_modules = ("encoder", "pool_attention", "posterior_head")
    decoder_modules = ("shared", "decoder", "lm_head")
    latent_projection_modules = (
        "memory",
        "z_embed",
    )  # z -> decoder (train.ae_freeze_latent_projection)
    backbone = "t5"

    @classmethod
    def make_tokenizer(cls, config, texts: list[str]):
        """``model.pretrained``'s own tokenizer (``AutoTokenizer.from_pretrained``), else a
        :func:`textvae.data.train_subword_tokenizer` of ``model.t5_tokenizer`` / ``model.t5_vocab_size`` trained
        on ``texts``.

        Raises:
            ValueError: the pretrained tokenizer has no pad or EOS token.
        """
        m = config.model
        if m.pretrained is None:
            return train_t5_tokenizer(texts, m.t5_vocab_size, m.t5_tokenizer)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(m.pretrained)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                f"model.pretrained={m.pretrained!r}: its tokenizer has no pad or EOS token"
            )
        return tokenizer

    def describe(self, config: T5VAEConfig) -> str:
        """The T5 (``model.pretrained``, or its sizes from scratch), how z reaches the decoder,
        the encoder's token deletion and the latent (:meth:`TextVAE.describe`)."""
        m = config
        sizes = (
            f"`{m.pretrained}`"
            if m.pretrained
            else f"from scratch (d_model {m.t5_d_model}, {m.t5_num_layers} + "
            f"{m.t5_num_decoder_layers} layers, {m.t5_num_heads} heads, d_ff {m.t5_d_ff})"
        )
        arch = (
            f"T5 {sizes}, z by {m.latent_injection}, encoder token deletion {m.encoder_token_drop}"
        )
        return arch + latent_text(self, m)

    def __init__(self, cfg: T5VAEConfig, tokenizer):
        super().__init__(tokenizer)
        t5 = build_t5(cfg, tokenizer)
        c = t5.config
        if len(tokenizer) > c.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} types, the T5 only {c.vocab_size}"
            )
        self.latent_dim = cfg.latent_dim
        self.bos_id = c.decoder_start_token_id
        self.pooling = cfg.pooling
        self.encoder_token_drop = cfg.encoder_token_drop
        self.n_layers, self.n_heads, self.d_kv = c.num_decoder_layers, c.num_heads, c.d_kv
        # one copy of each tensor: the stacks read the shared embedding through inputs_embeds
        self.shared = t5.shared
        self.encoder = t5.encoder
        self.encoder.embed_tokens = None
        self.decoder = t5.decoder
        self.decoder.embed_tokens = None
        for block in self.decoder.block:  # z is the decoder's only path to the encoder
            block.layer[1] = nn.Identity()
        # transformers 5 ties T5's output layer to the embedding and scales the decoder output
        # by d_model^-0.5 unless the checkpoint says tie_word_embeddings=false (T5 v1.1)
        self.lm_head = None if t5.lm_head.weight is t5.shared.weight else t5.lm_head
        scale = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
        self.output_scale = c.d_model**-0.5 if scale else 1.0
        self.pool_attention = AttentionPool(c.d_model) if cfg.pooling == "attention" else None
        self.posterior_head = GaussianHead(
            c.d_model,
            cfg.latent_dim,
            bias=False,
            bn_gamma=cfg.posterior_bn_gamma,
            bn_eps=cfg.posterior_bn_eps,
            min_rate_delta=cfg.min_rate_delta,
        )
        use_memory = cfg.latent_injection in ("memory", "both")
        use_embedding = cfg.latent_injection in ("embedding", "both")
        self.memory = (
            nn.Linear(cfg.latent_dim, self.n_layers * 2 * self.n_heads * self.d_kv, bias=False)
            if use_memory
            else None
        )
        self.z_embed = nn.Linear(cfg.latent_dim, c.d_model, bias=False) if use_embedding else None
        if cfg.bow_weight > 0:
            self.bow_head = BagOfWordsHead(cfg.latent_dim, cfg.bow_width(), self.vocab_size)
            self.bow_weight = cfg.bow_weight

    def posterior(self, batch: dict[str, torch.Tensor]) -> Distribution:
        """q(z|x) = N(mu, diag sigma^2): batch (B,), event (D,), float32. In training with
        ``encoder_token_drop`` > 0 the encoder reads the sentence with tokens deleted."""
        return self.posterior_head(self.encoder_summary(batch))

    def encoder_summary(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The masked pooling of the T5 encoder's last layer (B, d_model), what the bias-free
        heads read (:func:`textvae.metrics.encoder_dispersion`)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.training and self.encoder_token_drop > 0:
            ids, mask = delete_tokens(ids, mask, self.encoder_token_drop, self.pad_id)
        states = self.encoder(inputs_embeds=self.shared(ids), attention_mask=mask).last_hidden_state
        return masked_pool(states, mask, self.pooling, self.pool_attention)

    def prior(self, batch: dict[str, torch.Tensor] | None = None) -> Distribution:
        """p(z) = N(0, I): batch shape (B,) for a batch, () without; event (D,)."""
        shape = () if batch is None else (batch["input_ids"].size(0),)
        return standard_normal(self.latent_dim, shape, self.shared.weight.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer, as ``T5ForConditionalGeneration``'s: decoder states (..., d_model)
        -> logits (..., V); the states scaled by ``output_scale`` (d_model^-0.5, or 1 for a T5
        v1.1 checkpoint), then the token embedding (tied) or ``lm_head``. V = len(tokenizer):
        the rows a checkpoint pads its vocabulary with (t5-small: 32,128 for 32,100 types) are
        left out, so p(x|z) puts no mass on ids no text can contain."""
        weight = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden * self.output_scale, weight[: self.vocab_size])

    def memory_slots(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The memory key and value of every decoder layer: z (N, D) -> L pairs of (N, H, 1, d_kv).

        One projection gives (N, L * 2 * H * d_kv); it is viewed batch first as
        (N, L, 2, H, 1, d_kv) and indexed, never reshaped across the batch dimension (the
        Optimus/T5-VAE reshape without permute mixes rows, a pitfall of public code listed in README).
        """
        n = z.size(0)
        m = self.memory(z).view(n, self.n_layers, 2, self.n_heads, 1, self.d_kv)
        return [(m[:, layer, 0], m[:, layer, 1]) for layer in range(self.n_layers)]

    def _decode(self, input_ids: torch.Tensor, z: torch.Tensor, state: tuple | None):
        """Decoder states for ``input_ids`` (N, T) given z (N, D) and the self-attention cache
        ``state`` of earlier steps (None: only the memory slot, if any). Returns (hidden
        (N, T, d_model), the cache as a tuple (k_0, v_0, k_1, v_1, ...) of (N, H, t, d_kv))."""
        from transformers import DynamicCache

        emb = self.shared(input_ids)  # (N, T, d_model)
        if self.z_embed is not None:
            emb = emb + self.z_embed(z).unsqueeze(1).to(emb.dtype)
        if state is not None:
            cache = DynamicCache([(state[2 * i], state[2 * i + 1]) for i in range(len(state) // 2)])
        elif self.memory is not None:
            cache = DynamicCache(self.memory_slots(z))
        else:
            cache = DynamicCache()
        out = self.decoder(inputs_embeds=emb, past_key_values=cache, use_cache=True)
        new_state = tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
        return out.last_hidden_state, new_state

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for z (S, B, D): (S, B) float32, nats per sentence.

        The sum of log p(x_t | x_<t, z) over the sentence's real tokens, EOS counted, padding
        never (:func:`textvae.decoders.sequence_log_prob`), so a sentence's value does not
        depend on its batch's padding. Park & Lee's released code instead averages the token
        losses over all B x T positions of the padded batch (padding counted as zero loss) and
        adds the mean per-sentence KL to that per-token average, which re-weights the KL by
        about 1/T and makes the weight depend on the batch's padding (a pitfall of public code listed in README). The S samples of
        a sentence go through the decoder as one (S * B, T) batch, sample-major.
        """
        s, b, d = z.shape
        targets = batch["input_ids"].repeat(s, 1)  # (S*B, T)
        mask = batch["attention_mask"].repeat(s, 1)
        hidden, _ = self._decode(shift_right(targets, self.bos_id), z.reshape(s * b, d), None)
        return sequence_log_prob(
            hidden, self.logits, targets, mask, float32_softmax=not self.training
        ).view(s, b)

    def decode_step(self, z, input_ids, state):
        """One step: z (N, D), previous tokens (N,) (the first is ``bos_id``, T5's decoder start),
        state None or the cache tuple (k_0, v_0, ..., k_{L-1}, v_{L-1}), each (N, H, t, d_kv),
        batch first -> logits (N, V), the state grown by one position."""
        hidden, state = self._decode(input_ids.unsqueeze(1), z, state)  # (N, 1, d_model)
        return self.logits(hidden[:, -1]), state
