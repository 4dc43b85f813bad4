"""DELLA (Hu, Yi, Li, Sun & Xie, "Fuse It More Deeply! A Variational Transformer with Layer-Wise
Latent Variable Inference for Text Generation", NAACL 2022, arXiv 2207.06130) on the
Hugging Face ``transformers`` GPT-2, with the single-latent baselines of the paper on the same
backbone, and conditional DELLA (``della_cvae``).

Shapes: B sentences, T tokens, H the GPT-2 width, D latent dimensions per layer, L latent layers
(one per GPT-2 layer in ``model.latent_layers``), S samples, N = S * B flattened rows.
Log-likelihoods are nats per sentence, EOS counted, padding never.

- **Backbone**: ``model.pretrained`` (``gpt2``, a folder) through ``GPT2LMHeadModel.from_pretrained``
  with its tokenizer (pad set to its EOS, ``<|endoftext|>``, if it has none), or a ``GPT2Config``
  of the ``model.gpt2_*`` sizes with a subword tokenizer trained on the corpus
  (:func:`textvae.data.train_subword_tokenizer`). Encoder and decoder are the same GPT-2 blocks
  (shared weights); the encoder pass runs them without the causal mask (every real token sees
  every real token; padding is masked out as a key and never pooled). The encoder reads
  ``[BOS] + x`` (BOS = the tokenizer's BOS, else its EOS, as GPT-2), so ``first`` pooling reads
  the special first token as in the paper.
- **Layer-wise latents**: x_l = masked pooling of encoder layer l (``model.pooling``: ``first``,
  ``mean``, ``attention`` (the released code's), ``max`` or ``last``), then a LayerNorm per
  latent layer (this library's choice: the heads see features of unit scale whatever the
  magnitude of the residual stream; the released code feeds the raw states);
  zbar_l = tanh(W_hh zbar_{l-1} + W_ih z_{l-1}), zbar_1 = 0
  (:class:`textvae.posteriors.LatentRecurrence`); p(z_l | z_<l) and q(z_l | z_<l, x) diagonal
  Gaussians from linear maps of zbar_l and of [zbar_l ; x_l]: one
  :class:`textvae.posteriors.LayerwiseGaussian` each, event shape (L, D). ``first_prior``:
  p(z_1) = N(0, I) (``standard``) or N(b_mu, exp(b_logvar)) (``learned``).
- **Fusion** (``model.fusion``) into the attention values of decoder layer l by
  :class:`ValueFusion`: ``della`` (the paper's low-rank tensor product) or ``lmf``. The fused
  values are what the key/value cache holds, so step-wise decoding equals teacher forcing.
- **Baselines** (one latent z from the last encoder layer; event shape (1, D)): ``embedding``
  (W z added to every input embedding), ``memory`` (W z gives every layer one extra key and value
  per head, a one-position prefix of the cache; Optimus), ``softmax`` (W z added to the last
  hidden state before the output layer).
- **Objective**: the shared ELBO (:func:`textvae.objectives.elbo`): reconstruction + beta *
  sum over layers of KL(q(z_l|z_<l,x) || p(z_l|z_<l)), closed form per layer at one ancestral
  sample of z_<l (:func:`textvae.objectives.kl_estimate`). ``model.kl_reduction: mean``
  averages over layers instead (the released code; not a bound, see below).
- **Conditional** (``della_cvae``): the context c (``context_ids``) is encoded by the same
  encoder into c_l; p(z_l | z_<l, c) from [zbar_l ; c_l], q(z_l | z_<l, x, c) from
  [zbar_l ; x_l ; c_l]; the decoder reads the context as a prefix (positions 0..|c|-1, padding
  masked; the response follows from position |c|), so p(x | z, c) is a GPT-2 continuation of c.
  The prefix is read without z (z is fused into the response positions' values only), so its
  keys and values are computed once per batch and shared by all S samples; the released code's
  story CVAE fuses z into the prompt's values too. The context is encoded once per batch for
  prior and posterior (:meth:`DELLA.posterior_and_prior`).

Where this departs from the released code (github.com/OpenVLG/DELLA, ``model.py``,
``train_utils.py``, ``dist.py``), each a trap for a reproduction:

- It averages the per-layer KL terms and the per-layer log p(z) and log q(z) over layers
  (``torch.stack(all_kl_loss).mean(0)``), which under-charges the latent cost L-fold: its ELBO
  and IW-PPL are not bounds (a pitfall of public code listed in README). Here the sum; ``kl_reduction: mean`` reproduces it and
  evaluation then reports ``bound_valid: false``.
- Its attention pooling (``AverageSelfAttention``) is called without the attention mask, so
  padding enters x_l and a sentence's posterior depends on its batch (a pitfall of public code listed in README); here masked.
- ``get_prior`` (generation from the prior) indexes the prior networks, recurrent cells and
  condition states by ``layer - begin_layer`` while training indexes them by ``layer``: with
  ``begin_layer > 0`` prior samples go through other networks than the ones trained. Here one
  indexing (tested: prior samples follow p's own ``rsample``).
- Its IW perplexity divides by ``attention_mask.sum()`` over ``[BOS] x [EOS]``, which counts the
  never-predicted BOS: one token per sentence too many. Its ``nll`` is the reconstruction term
  only. Its AU reads mu_l at one fresh sample of z_<l per pass (two passes, two samples), so
  sampling noise counts as activity; here E_q[z|x] by 256 common-random-number draws.
- Its decoder's output layer (``lm_head``) is created after ``init_weights`` and is neither tied
  to nor loaded from GPT-2's embedding (``init_para_frompretrained`` in ``main.py`` copies
  ``wte``, ``wpe``, the blocks and ``ln_f``), so a "pretrained" decoder starts with a random
  output layer; here it is GPT-2's, tied to ``wte`` (tested against ``transformers``' logits).
- Its LMF factors start from GPT-2's generic initialisation (normal 0.02), so at step 0 the
  fused values are products of two small random projections: a pretrained GPT-2's attention
  values are replaced from the start. Here the factors start at v~ = v o (1 + W z) with W small
  (the pretrained network is unchanged at step 0).
- Its posterior does not see the condition (``recog_network`` reads [x_l ; zbar_l]); here
  [zbar_l ; x_l ; c_l] as the paper's CVAE states it. Its recurrent cells and heads have biases (so its
  zbar_1 = tanh(b) is learned); here bias-free cells as the paper writes them. It clamps mu and
  log sigma^2 to [-5, 5]; here log sigma^2 is clamped to [-20, 10] as every model of the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from textvae.config import Config, ConfigError, check_at_least, check_choice
from textvae.data import train_subword_tokenizer
from textvae.decoders import BagOfWordsHead, sequence_log_prob, shift_right
from textvae.encoders import AttentionPool, delete_tokens, masked_pool
from textvae.models.base import TextVAE, latent_text
from textvae.models.parts import (
    SUBWORD_TOKENIZERS,
    BowPart,
    LatentPart,
    PoolingPart,
    TokenDropPart,
    TransformerPart,
)
from textvae.posteriors import LatentRecurrence, LayerwiseGaussian
from textvae.registry import register_model

LAYERWISE_FUSIONS = ("della", "lmf")
FUSIONS = (*LAYERWISE_FUSIONS, "embedding", "memory", "softmax")


def parse_latent_layers(spec: str, n_layers: int | None = None) -> tuple[int, int]:
    """``"begin..end"`` (0-based, inclusive) -> (begin, end).

    Raises:
        ConfigError: not of that form, begin > end, or (with ``n_layers``) end past the last
            layer; the message names ``model.latent_layers``.
    """
    parts = spec.split("..")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(
            f"model.latent_layers={spec!r} is not of the form 'begin..end' "
            "(0-based layer indices, inclusive, e.g. '0..11'), or null for all layers"
        )
    begin, end = int(parts[0]), int(parts[1])
    if begin > end:
        raise ConfigError(f"model.latent_layers={spec!r}: begin {begin} is after end {end}")
    if n_layers is not None and end >= n_layers:
        raise ConfigError(
            f"model.latent_layers={spec!r}: the backbone has {n_layers} layers (0..{n_layers - 1})"
        )
    return begin, end


@dataclass
class DELLAConfig(TransformerPart, TokenDropPart, BowPart, PoolingPart, LatentPart):
    """``model.name=della`` (Hu et al. 2022): the shared pieces (:mod:`textvae.models.parts`:
    latent size per layer, pooling, bag-of-words, token deletion, ``pretrained``) and DELLA's
    own keys.

    Attributes:
        bow_hidden: the bag-of-words MLP's hidden units (default 1024; this key was
            ``hidden_dim`` before per-model configs, and a run folder's ``hidden_dim`` is read
            as it).
        gpt2_n_embd / gpt2_n_layer / gpt2_n_head / gpt2_n_positions / gpt2_dropout: ``GPT2Config``
            fields (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``; ``gpt2_dropout`` sets
            ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop``) of a GPT-2 built from scratch
            (GPT-2 small's sizes by default); ``gpt2_dropout`` also overrides a pretrained
            model's dropout.
        gpt2_tokenizer / gpt2_vocab_size: the subword tokenizer trained on the corpus for a GPT-2
            from scratch (``bpe`` or ``unigram``, this many types including ``<pad> </s> <unk>``).
        fusion: how z reaches the decoder: ``della`` (the paper's low-rank tensor product into
            each latent layer's attention values, which as written equals rank 1:
            :class:`ValueFusion`), ``lmf`` (true low-rank multimodal fusion, a sum over the rank
            of element-wise products), or the single-latent baselines of the paper on the same
            backbone: ``embedding`` (W z added to every input embedding), ``memory`` (a
            key/value slot per layer, Optimus) and ``softmax`` (W z added to the last hidden
            state before the output layer).
        fusion_rank: r of ``della`` / ``lmf`` fusion (the paper: 4).
        latent_layers: ``"begin..end"``, 0-based and inclusive: the GPT-2 layers that carry a
            latent (z_1 from encoder layer ``begin`` into decoder layer ``begin``, ...); null =
            all layers. ``della`` / ``lmf`` fusion only (the baselines have one latent, from the
            last encoder layer).
        first_prior: p(z_1): ``learned`` (N(mu, sigma^2) from a learned bias, since zbar_1 = 0:
            the released code's) or ``standard`` (N(0, I)). Not for ``della_cvae`` (its p(z_1|c)
            depends on the context).
        feature_norm: a LayerNorm on each pooled x_l (the released code's; the paper, sec. 4.1
            and A.1, has none). Default true so that earlier run folders load; the presets set
            false.
        head_bias: biases b_l in the prior and posterior heads (the released code's; eq. 8 of
            the paper has none; p(z_1)'s bias follows ``first_prior``). Default true for
            earlier run folders; the presets set false.
        kl_reduction: ``sum`` over layers (a valid ELBO) or ``mean`` (the released DELLA code's
            layer average; a reproduction switch: evaluation reports ``bound_valid: false``).
    """

    renamed_keys = {"hidden_dim": "bow_hidden"}

    name: str = "della"
    bow_hidden: int | None = 1024
    gpt2_n_embd: int = 768
    gpt2_n_layer: int = 12
    gpt2_n_head: int = 12
    gpt2_n_positions: int = 1024
    gpt2_dropout: float = 0.1
    gpt2_tokenizer: str = "bpe"
    gpt2_vocab_size: int = 8000
    fusion: str = "della"
    fusion_rank: int = 4
    latent_layers: str | None = None
    first_prior: str = "learned"
    feature_norm: bool = True
    head_bias: bool = True
    kl_reduction: str = "sum"

    def validate(self, config: Config) -> None:
        check_choice("model.gpt2_tokenizer", self.gpt2_tokenizer, SUBWORD_TOKENIZERS)
        check_choice("model.fusion", self.fusion, FUSIONS)
        check_choice("model.first_prior", self.first_prior, ("standard", "learned"))
        check_choice("model.kl_reduction", self.kl_reduction, ("sum", "mean"))
        sizes = ("gpt2_n_embd", "gpt2_n_layer", "gpt2_n_head", "gpt2_n_positions")
        check_at_least(self, "model", (*sizes, "gpt2_vocab_size", "fusion_rank"), 1)
        if not 0.0 <= self.gpt2_dropout < 1.0:
            raise ConfigError(f"model.gpt2_dropout={self.gpt2_dropout} must be in [0, 1)")
        if self.gpt2_n_embd % self.gpt2_n_head:
            raise ConfigError(
                f"model.gpt2_n_embd={self.gpt2_n_embd} must be a multiple of "
                f"model.gpt2_n_head={self.gpt2_n_head}"
            )
        if self.latent_layers is not None:
            parse_latent_layers(self.latent_layers)
            if self.fusion not in LAYERWISE_FUSIONS:
                raise ConfigError(
                    f"model.latent_layers: model.fusion={self.fusion!r} is a single-latent "
                    "baseline (one z from the last encoder layer); set latent_layers=null "
                    "or fusion=della/lmf"
                )
        super().validate(config)


@dataclass
class DELLACVAEConfig(DELLAConfig):
    """``model.name=della_cvae``: DELLA's keys; ``first_prior`` must be ``learned`` (p(z_1|c)
    is computed from the context)."""

    name: str = "della_cvae"

    def validate(self, config: Config) -> None:
        if self.first_prior == "standard":
            raise ConfigError(
                "model.first_prior=standard: della_cvae's p(z_1|c) is computed from "
                "the context; use first_prior=learned"
            )
        super().validate(config)


def build_gpt2(cfg: DELLAConfig, tokenizer):
    """The ``transformers`` ``GPT2LMHeadModel`` of ``cfg``: ``from_pretrained(cfg.pretrained)`` with
    its dropout probabilities set to ``cfg.gpt2_dropout``, else a fresh one from a ``GPT2Config``
    of the ``gpt2_*`` sizes whose vocabulary and special ids are the tokenizer's.

    Raises:
        OSError: ``cfg.pretrained`` cannot be loaded (from ``transformers``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    p = cfg.gpt2_dropout
    if cfg.pretrained is not None:
        return GPT2LMHeadModel.from_pretrained(
            cfg.pretrained, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p
        )
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.gpt2_n_positions,
        n_embd=cfg.gpt2_n_embd,
        n_layer=cfg.gpt2_n_layer,
        n_head=cfg.gpt2_n_head,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


class ValueFusion(nn.Module):
    """z_l into the attention values of one decoder layer: v (N, T, H), z (N, D) -> v~ (N, T, H).

    Both kinds hold r factor pairs W_v^(j) ((H + 1) x H, the last row the weight of the appended 1)
    and W_z^(j) ((D + 1) x H):

    - ``della``, as the paper writes it (Hu et al. 2022): v~ = (sum_j [v ; 1] W_v^(j)) o
      (sum_j [z ; 1] W_z^(j)). A sum of linear maps is one linear map, so this is exactly the
      rank-1 fusion with the merged weights W_v = sum_j W_v^(j), W_z = sum_j W_z^(j), whatever r
      is (tested): r only changes the parameterisation (the merged weight moves r times as fast
      under SGD, since each of the r copies receives the same gradient). The released code's
      ``LMFLayer`` computes exactly this product of two sums.
    - ``lmf``, the low-rank multimodal fusion of Liu et al. 2018 (a rank-r factorisation of the
      full tensor product): v~ = sum_j ([v ; 1] W_v^(j)) o ([z ; 1] W_z^(j)), which is not rank 1
      for r > 1.

    Initialisation: W_v^(j) = [I / r ; 0] (``della``) or [I ; 0] (``lmf``), W_z^(j) = [N(0, 0.02^2)
    ; 1 / r], so v~ = v o (1 + small W z): the backbone's values are unchanged at step 0 (for a
    pretrained GPT-2 this keeps its attention intact; the released code starts from a random
    product instead).

    Raises:
        ValueError: unknown kind or rank < 1.
    """

    def __init__(self, kind: str, rank: int, hidden: int, latent_dim: int):
        super().__init__()
        if kind not in LAYERWISE_FUSIONS or rank < 1:
            raise ValueError(f"fusion kind {kind!r} (della or lmf) with rank {rank} (>= 1)")
        self.kind, self.rank = kind, rank
        scale = 1.0 / rank if kind == "della" else 1.0
        value = torch.zeros(rank, hidden + 1, hidden)
        value[:, :hidden] = scale * torch.eye(hidden)
        latent = torch.zeros(rank, latent_dim + 1, hidden)
        latent[:, :latent_dim].normal_(0.0, 0.02)
        latent[:, latent_dim] = 1.0 / rank
        self.value_factors = nn.Parameter(value)  # (r, H + 1, H)
        self.latent_factors = nn.Parameter(latent)  # (r, D + 1, H)

    @staticmethod
    def _affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[x ; 1] w for x (..., K) and w (K + 1, H)."""
        return x @ w[:-1].to(x.dtype) + w[-1].to(x.dtype)

    def forward(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z = z.to(v.dtype)
        if self.kind == "della":
            a = self._affine(v, self.value_factors.sum(0))  # (N, T, H)
            b = self._affine(z, self.latent_factors.sum(0))  # (N, H)
            return a * b.unsqueeze(1)
        out = 0.0
        for j in range(self.rank):
            a = self._affine(v, self.value_factors[j])
            out = out + a * self._affine(z, self.latent_factors[j]).unsqueeze(1)
        return out


class LayerwiseHead(nn.Module):
    """The linear heads of one layer-wise Gaussian: for every latent layer l,
    [mu_l ; log sigma_l^2] = A_l zbar_l + sum_f W_{f,l} feature_{f,l} + b_l.

    ``forward(recurrence, *features, reduction)`` with each feature (B, L, H_f) (none for an
    unconditional prior: batch shape ()) returns a :class:`LayerwiseGaussian`. ``first_bias`` False
    fixes b_1 = 0 (with zbar_1 = 0 and no feature: p(z_1) = N(0, I) exactly); ``bias`` False
    fixes b_l = 0 for l >= 2 (Hu et al. 2022, eq. 8, has no bias; the released code has). Weights
    start as ``nn.Linear``'s (uniform, +- 1/sqrt(fan-in)), biases at 0 (a fixed bias stays a
    masked parameter, so every variant has the same state-dict keys).
    """

    def __init__(
        self,
        n_layers: int,
        latent_dim: int,
        feature_dims: tuple[int, ...] = (),
        first_bias: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        two_d = 2 * latent_dim
        self.zbar_weight = nn.Parameter(
            torch.empty(n_layers, two_d, latent_dim).uniform_(-(latent_dim**-0.5), latent_dim**-0.5)
        )
        self.feature_weights = nn.ParameterList(
            [
                nn.Parameter(torch.empty(n_layers, two_d, h).uniform_(-(h**-0.5), h**-0.5))
                for h in feature_dims
            ]
        )
        self.bias = nn.Parameter(torch.zeros(n_layers, two_d))
        mask = torch.full((n_layers, 1), 1.0 if bias else 0.0)
        mask[0] = 1.0 if first_bias else 0.0
        self.register_buffer("bias_mask", mask, persistent=False)

    def forward(
        self, recurrence: LatentRecurrence, *features: torch.Tensor, reduction: str = "sum"
    ) -> LayerwiseGaussian:
        offset = self.bias * self.bias_mask  # (L, 2D)
        for w, x in zip(self.feature_weights, features, strict=True):
            offset = offset + torch.einsum("blh,lmh->blm", x.float(), w)  # (B, L, 2D)
        return LayerwiseGaussian(offset, recurrence, self.zbar_weight, reduction)


@register_model("della", DELLAConfig)
class DELLA(TextVAE):
    """DELLA on GPT-2 (module docstring): q(z|x) and p(z) over layer-wise latents of event shape
    (L, D) (``latent_shape``), p(x|z) the same GPT-2 with z fused into its attention values (or a
    single-latent baseline injection).

    Submodules: ``transformer`` (the ``transformers`` ``GPT2Model``: ``wte``, ``wpe``, ``drop``,
    ``h``, ``ln_f``; encoder and decoder), ``lm_head`` (None when tied to ``wte``, as GPT-2 is),
    ``pool_attention`` (attention pooling only), ``pool_norm``, ``posterior_head``, ``prior_head``,
    ``recurrence``, and the injection: ``fusion`` (one :class:`ValueFusion` per latent layer),
    ``memory``, ``z_embed`` or ``z_softmax``. The GPT-2 blocks are run by this class's own copy
    of their forward pass (:meth:`_block`, adapted from ``transformers``' ``GPT2Block`` /
    ``GPT2Attention``: pre-LN attention and MLP with residuals, scaled dot-product attention with
    the block's own scaling) so that values can be fused with z and the causal mask switched off;
    ``transformers`` itself is not patched. The inference network (``inference_modules``) is the
    pooling and the posterior head; the GPT-2 blocks are shared with the decoder.

    Remedies from the config: ``bow_weight`` (the bag-of-words head reads all L x D latents),
    ``encoder_token_drop``, free bits (``per_dim``, ``per_layer``, ``total``).

    Raises:
        ConfigError: ``model.latent_layers`` outside the backbone's layers.
        OSError: ``cfg.pretrained`` cannot be loaded (from ``transformers``).
        ValueError: the tokenizer has more types than the GPT-2's vocabulary, or no EOS.
    """

    # a Transformer backbone: no LSTM-style aggressive loop; the VAE phase starts from the
    # autoencoder phase's weights (Park & Lee 2021; DELLA's encoder is its decoder)
    supports_aggressive = False
    ae_decoder_reset = False

    inference_modules = ("pool_attention", "pool_norm", "posterior_head")
    backbone = "gpt2"
    layerwise_latent = True  # kl.free_bits_mode=per_layer applies

    @classmethod
    def make_tokenizer(cls, config, texts: list[str]):
        """``model.pretrained``'s own tokenizer (``AutoTokenizer.from_pretrained``; pad set to EOS
        when it has none, as GPT-2's), else a :func:`textvae.data.train_subword_tokenizer` of
        ``model.gpt2_tokenizer`` / ``model.gpt2_vocab_size`` trained on ``texts``.

        Raises:
            ValueError: the pretrained tokenizer has no EOS token.
        """
        m = config.model
        if m.pretrained is None:
            return train_subword_tokenizer(texts, m.gpt2_vocab_size, m.gpt2_tokenizer)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(m.pretrained)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model.pretrained={m.pretrained!r}: its tokenizer has no EOS token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere
        return tokenizer

    @classmethod
    def latent_shape_of(cls, config) -> tuple[int | None, int]:
        """(L, D) from the model ``config`` (:meth:`TextVAE.latent_shape_of`): L the layers of
        ``model.latent_layers`` (all ``gpt2_n_layer`` when null; None when they are those of
        ``model.pretrained``), 1 for a single-latent fusion."""
        d = config.latent_dim
        if config.fusion not in LAYERWISE_FUSIONS:
            return (1, d)
        if config.latent_layers is not None:
            begin, end = parse_latent_layers(config.latent_layers)
            return (end - begin + 1, d)
        return (None if config.pretrained else config.gpt2_n_layer, d)

    def describe(self, config: DELLAConfig) -> str:
        """The GPT-2 (``model.pretrained``, or its sizes from scratch), the latent layers, the
        fusion and the KL's reduction over layers, then the latent (:meth:`TextVAE.describe`)."""
        m = config
        sizes = (
            f"`{m.pretrained}`"
            if m.pretrained
            else f"from scratch (n_embd {m.gpt2_n_embd}, {m.gpt2_n_layer} layers, "
            f"{m.gpt2_n_head} heads)"
        )
        arch = (
            f"GPT-2 {sizes}, {self.n_latent_layers} latent layers x {m.latent_dim}, fusion "
            f"`{m.fusion}`, KL over layers: {m.kl_reduction}"
        )
        return arch + latent_text(self, m)

    def __init__(self, cfg: DELLAConfig, tokenizer):
        super().__init__(tokenizer)
        if self.eos_id is None:
            raise ValueError("della needs a tokenizer with an EOS token")
        if self.bos_id is None:
            self.bos_id = self.eos_id  # GPT-2's convention: one special token starts and ends
        gpt2 = build_gpt2(cfg, tokenizer)
        c = gpt2.config
        if len(tokenizer) > c.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} types, the GPT-2 only {c.vocab_size}"
            )
        self.transformer = gpt2.transformer
        self.lm_head = None if gpt2.lm_head.weight is self.transformer.wte.weight else gpt2.lm_head
        self.n_layer, self.n_head, self.hidden = c.n_layer, c.n_head, c.n_embd
        self.head_dim = c.n_embd // c.n_head
        self.n_positions = self.max_positions = c.n_positions
        self.scale_attn_weights = c.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = c.scale_attn_by_inverse_layer_idx
        self.fusion_kind = cfg.fusion
        if cfg.fusion in LAYERWISE_FUSIONS:
            begin, end = (
                parse_latent_layers(cfg.latent_layers, c.n_layer)
                if cfg.latent_layers is not None
                else (0, c.n_layer - 1)
            )
            self.latent_layers = list(range(begin, end + 1))
        elif cfg.latent_layers is not None:
            raise ConfigError(f"model.latent_layers: model.fusion={cfg.fusion!r} has one latent")
        else:
            self.latent_layers = [c.n_layer - 1]  # the baselines' one z reads the last layer
        n_lat, d, h = len(self.latent_layers), cfg.latent_dim, c.n_embd
        self.latent_dim, self.n_latent_layers = d, n_lat
        self.pooling = cfg.pooling
        self.encoder_token_drop = cfg.encoder_token_drop
        self.kl_reduction = cfg.kl_reduction
        self.pool_attention = (
            nn.ModuleList(AttentionPool(h) for _ in range(n_lat))
            if cfg.pooling == "attention"
            else None
        )
        # the released code's LayerNorm on x_l (model.feature_norm); the paper has none
        self.pool_norm = (
            nn.ModuleList(nn.LayerNorm(h) for _ in range(n_lat)) if cfg.feature_norm else None
        )
        features = (h, h) if self.conditional else (h,)
        self.posterior_head = LayerwiseHead(
            n_lat, d, features, first_bias=cfg.head_bias, bias=cfg.head_bias
        )
        self.prior_head = LayerwiseHead(
            n_lat,
            d,
            (h,) if self.conditional else (),
            first_bias=cfg.first_prior == "learned",
            bias=cfg.head_bias,
        )
        self.recurrence = LatentRecurrence(n_lat, d)
        self.fusion = self.memory = self.z_embed = self.z_softmax = None
        if cfg.fusion in LAYERWISE_FUSIONS:
            self.fusion = nn.ModuleList(
                ValueFusion(cfg.fusion, cfg.fusion_rank, h, d) for _ in range(n_lat)
            )
        elif cfg.fusion == "memory":
            self.memory = nn.Linear(d, c.n_layer * 2 * h, bias=False)
        elif cfg.fusion == "embedding":
            self.z_embed = nn.Linear(d, h, bias=False)
        else:
            self.z_softmax = nn.Linear(d, h, bias=False)
        if cfg.bow_weight > 0:
            self.bow_head = BagOfWordsHead(n_lat * d, cfg.bow_width(), self.vocab_size)
            self.bow_weight = cfg.bow_weight

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(L, D): the event shape of q(z|x) and p(z)."""
        return (self.n_latent_layers, self.latent_dim)

    # --- the GPT-2 blocks ------------------------------------------------------------------------

    def _scaling(self, layer: int) -> float:
        """GPT-2's attention scaling (``GPT2Attention``): head_dim^-0.5 if ``scale_attn_weights``,
        divided by (layer + 1) if ``scale_attn_by_inverse_layer_idx``."""
        s = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        return s / (layer + 1) if self.scale_attn_by_inverse_layer_idx else s

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings with GPT-2's embedding dropout: (N, T) -> (N, T, H).

        Raises:
            ValueError: a position past the GPT-2's ``n_positions``.
        """
        if int(positions.max()) >= self.n_positions:
            raise ValueError(
                f"a sequence reaches position {int(positions.max())}, past the GPT-2's "
                f"{self.n_positions} positions (model.gpt2_n_positions; for della_cvae "
                "the context counts too): shorten data.max_length or the context"
            )
        t = self.transformer
        return t.drop(t.wte(input_ids) + t.wpe(positions))

    def _block(
        self,
        layer: int,
        hidden: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        z: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPT-2 block ``layer`` (adapted from ``transformers``' ``GPT2Block.forward``).

        Args:
            hidden: (N, T, H) input states.
            past: keys and values of earlier positions, each (N, n_head, P, head_dim), or None.
            mask: bool, broadcastable to (N, 1, T, P + T): True where a query may attend a key
                (the caller builds causal or bidirectional masks with padding masked out).
            z: (N, D) the latent fused into this layer's values (:class:`ValueFusion`), or None.

        Returns:
            (hidden (N, T, H), keys, values (N, n_head, P + T, head_dim)): the values as fused,
            so the cache holds exactly what teacher forcing attends to.
        """
        block = self.transformer.h[layer]
        attn = block.attn
        n, t, _ = hidden.shape
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(self.hidden, dim=2)  # 3 x (N, T, H)
        if z is not None:
            v = self.fusion[self.latent_layers.index(layer)](v, z)
        q, k, v = (x.view(n, t, self.n_head, self.head_dim).transpose(1, 2) for x in (q, k, v))
        if past is not None:
            k, v = (
                torch.cat([past[0].to(k.dtype), k], dim=2),
                torch.cat([past[1].to(v.dtype), v], dim=2),
            )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            scale=self._scaling(layer),
            dropout_p=attn.attn_dropout.p if self.training else 0.0,
        )  # (N, n_head, T, head_dim)
        out = out.transpose(1, 2).reshape(n, t, self.hidden)
        hidden = hidden + attn.resid_dropout(attn.c_proj(out))
        hidden = hidden + block.mlp(block.ln_2(hidden))
        return hidden, k, v

    def positions_needed(self, n_tokens: int, n_context: int = 0) -> int:
        """Positions a sentence of ``n_tokens`` ids (EOS included) uses: the encoder reads
        ``[BOS] + x`` (1 + n_tokens), ``della_cvae``'s context encoder ``[BOS] + c``
        (1 + n_context) and its decoder the response after the context's n_context positions."""
        return max(1 + n_tokens, 1 + n_context, n_context + n_tokens)

    # --- q(z|x) and p(z) -------------------------------------------------------------------------

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """x_l of every latent layer: the encoder pass (bidirectional, over ``[BOS] + x``) up to
        the last layer that carries a latent, masked pooling of each latent layer's output and
        its LayerNorm. (B, T) ids and mask -> (B, L, H)."""
        b = input_ids.size(0)
        bos = torch.full((b, 1), self.bos_id, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([bos, input_ids], dim=1)  # (B, 1 + T)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
        positions = torch.arange(ids.size(1), device=ids.device).expand(b, -1)
        hidden = self._embed(ids, positions)
        keys = mask.bool()[:, None, None, :]  # (B, 1, 1, 1 + T): padding is never a key
        pooled = []
        for layer in range(self.latent_layers[-1] + 1):
            hidden, _, _ = self._block(layer, hidden, None, keys, None)
            if layer in self.latent_layers:
                k = self.latent_layers.index(layer)
                attention = self.pool_attention[k] if self.pool_attention is not None else None
                feature = masked_pool(hidden, mask, self.pooling, attention)
                pooled.append(self.pool_norm[k](feature) if self.pool_norm is not None else feature)
        return torch.stack(pooled, dim=1)

    def _context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """c_l of every latent layer (B, L, H) (conditional model).

        Raises:
            ValueError: the batch has no ``context_ids`` / ``context_mask``.
        """
        if "context_ids" not in batch or "context_mask" not in batch:
            raise ValueError(
                f"{type(self).__name__} needs context_ids/context_mask in the batch: "
                "train and evaluate it on a dialogue corpus (data.corpus=dailydialog "
                "or data.format=dialogue)"
            )
        return self._pooled(batch["context_ids"], batch["context_mask"])

    def posterior(
        self, batch: dict[str, torch.Tensor], context: torch.Tensor | None = None
    ) -> Distribution:
        """q(z|x) (q(z|x, c) for ``della_cvae``): a :class:`LayerwiseGaussian`, batch (B,), event
        (L, D), float32. In training with ``encoder_token_drop`` > 0 the encoder reads the
        sentence with tokens deleted. ``context``: c_l (B, L, H) when already computed."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.training and self.encoder_token_drop > 0:
            ids, mask = delete_tokens(ids, mask, self.encoder_token_drop, self.pad_id)
        features = [self._pooled(ids, mask)]
        if self.conditional:
            features.append(self._context(batch) if context is None else context)
        return self.posterior_head(self.recurrence, *features, reduction=self.kl_reduction)

    def prior(
        self, batch: dict[str, torch.Tensor] | None = None, context: torch.Tensor | None = None
    ) -> Distribution:
        """p(z) = prod_l p(z_l | z_<l) (for ``della_cvae`` p(z | c), which needs the batch): a
        :class:`LayerwiseGaussian` of event (L, D), batch shape (B,) for a batch, () without.
        ``context``: c_l (B, L, H) when already computed.

        Raises:
            ValueError: ``della_cvae`` without a batch carrying the context.
        """
        if self.conditional:
            if batch is None and context is None:
                raise ValueError(
                    "della_cvae's prior p(z|c) depends on the context: pass a batch "
                    "with context_ids/context_mask (textvae generate --mode respond)"
                )
            context = self._context(batch) if context is None else context
            return self.prior_head(self.recurrence, context, reduction=self.kl_reduction)
        p = self.prior_head(self.recurrence, reduction=self.kl_reduction)
        if batch is None:
            return p
        offset = p.offset.expand(batch["input_ids"].size(0), *p.offset.shape)
        return LayerwiseGaussian(offset, self.recurrence, p.weight, self.kl_reduction)

    def posterior_and_prior(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[Distribution, Distribution]:
        """q and p of a batch in one call, the context (``della_cvae``) encoded once for both."""
        context = self._context(batch) if self.conditional else None
        return self.posterior(batch, context), self.prior(batch, context)

    # --- p(x|z) ----------------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer (GPT-2's, tied to ``wte``): (..., H) -> (..., V), V = len(tokenizer)."""
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight[: self.vocab_size])

    def _empty_state(self, n: int, device: torch.device) -> tuple:
        """The decoder state before any token: per layer empty keys and values (N, n_head, 0,
        head_dim), the key mask (N, 0) bool and the next position (N,) int64 zeros."""
        empty = torch.zeros(
            n, self.n_head, 0, self.head_dim, dtype=self.transformer.wte.weight.dtype, device=device
        )
        return (
            *[empty] * (2 * self.n_layer),
            torch.zeros(n, 0, dtype=torch.bool, device=device),
            torch.zeros(n, dtype=torch.long, device=device),
        )

    def _with_memory(self, state: tuple, z: torch.Tensor) -> tuple:
        """The ``memory`` baseline's slot appended to the cache: z (N, L=1, D) -> one key and one
        value per layer and head (the map's output viewed batch first as (N, n_layer, 2, n_head, 1,
        head_dim) and indexed, never reshaped across rows), visible to every later query; the
        slot has no position."""
        *kv, keep, next_pos = state
        n = z.size(0)
        m = self.memory(z[:, 0]).view(n, self.n_layer, 2, self.n_head, 1, self.head_dim)
        kv = [
            torch.cat([kv[2 * layer + i], m[:, layer, i].to(kv[0].dtype)], dim=2)
            for layer in range(self.n_layer)
            for i in (0, 1)
        ]
        keep = torch.cat([keep, torch.ones(n, 1, dtype=torch.bool, device=z.device)], dim=1)
        return (*kv, keep, next_pos)

    def _decode(
        self,
        input_ids: torch.Tensor,
        z: torch.Tensor | None,
        state: tuple,
        input_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        """Decoder states of ``input_ids`` (N, T) given z (N, L, D) (None: the plain GPT-2, as for
        a context prefix) and the state of earlier positions (:meth:`_start_state` or a previous
        call): causal attention over the cache and the new tokens (keys where ``input_mask``
        (N, T) is 0 are masked for later queries too; default all 1). Returns (hidden (N, T, H)
        after ``ln_f`` (and the ``softmax`` baseline's W z), the new state)."""
        *kv, keep, next_pos = state
        n, t = input_ids.shape
        positions = next_pos.unsqueeze(1) + torch.arange(t, device=input_ids.device)  # (N, T)
        hidden = self._embed(input_ids, positions)
        if self.z_embed is not None and z is not None:
            hidden = hidden + self.z_embed(z[:, 0]).unsqueeze(1).to(hidden.dtype)
        new_keep = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if input_mask is None
            else input_mask.bool()
        )
        keep = torch.cat([keep, new_keep], dim=1)  # (N, P + T)
        p = keep.size(1) - t
        key_pos = torch.arange(p + t, device=input_ids.device)
        causal = key_pos.unsqueeze(0) <= (p + torch.arange(t, device=input_ids.device)).unsqueeze(1)
        mask = keep[:, None, None, :] & causal[None, None]  # (N, 1, T, P + T)
        new_kv = []
        for layer in range(self.n_layer):
            z_layer = None
            if self.fusion is not None and z is not None and layer in self.latent_layers:
                z_layer = z[:, self.latent_layers.index(layer)]
            hidden, k, v = self._block(
                layer, hidden, (kv[2 * layer], kv[2 * layer + 1]), mask, z_layer
            )
            new_kv += [k, v]
        hidden = self.transformer.ln_f(hidden)
        if self.z_softmax is not None and z is not None:
            hidden = hidden + self.z_softmax(z[:, 0]).unsqueeze(1).to(hidden.dtype)
        return hidden, (*new_kv, keep, next_pos + t)

    def _start_state(
        self, z: torch.Tensor, batch: dict[str, torch.Tensor] | None, repeats: int = 1
    ) -> tuple:
        """The state before the first response token of z (N, L, D): empty, and for
        ``della_cvae`` the context read by the plain decoder (without z: its keys and values do not
        depend on z, so they are computed once for the batch's B contexts and repeated
        ``repeats`` times, sample-major, N = repeats * B), its padding masked, the response's
        positions continuing after the context's real tokens; then the ``memory`` baseline's
        slot.

        Raises:
            ValueError: ``della_cvae`` without the batch's context.
        """
        if self.conditional:
            if batch is None or "context_ids" not in batch:
                raise ValueError(
                    f"{type(self).__name__} decodes a response after its context: "
                    "pass a batch with context_ids/context_mask"
                )
            ctx, ctx_mask = batch["context_ids"], batch["context_mask"]
            _, state = self._decode(
                ctx, None, self._empty_state(ctx.size(0), ctx.device), input_mask=ctx_mask
            )
            state = (*state[:-1], ctx_mask.sum(1))  # the response starts after the real tokens
            if repeats > 1:
                state = tuple(x.repeat(repeats, *[1] * (x.dim() - 1)) for x in state)
        else:
            state = self._empty_state(z.size(0), z.device)
        return self._with_memory(state, z) if self.memory is not None else state

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) (``della_cvae``: log p(x|z, c)) for z (S, B, L, D): (S, B) float32, nats per
        sentence: the sum of log p(x_t | x_<t, z) over the real tokens, EOS counted, padding never
        (:func:`textvae.decoders.sequence_log_prob`); the decoder reads ``[BOS] + x`` shifted.
        The S samples go through the decoder as one (S * B, T) batch, sample-major (a context
        prefix once per batch)."""
        s, b = z.shape[:2]
        zz = z.reshape(s * b, *z.shape[2:])
        targets = batch["input_ids"].repeat(s, 1)  # (S*B, T)
        mask = batch["attention_mask"].repeat(s, 1)
        state = self._start_state(zz, batch, repeats=s)
        hidden, _ = self._decode(shift_right(targets, self.bos_id), zz, state)
        return sequence_log_prob(
            hidden, self.logits, targets, mask, float32_softmax=not self.training
        ).view(s, b)

    def initial_state(self, z: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
        """Generation state before the first step of ``della_cvae``: z (N, L, D) and a batch of N
        contexts -> the cache after the context (see :meth:`decode_step`)."""
        return self._start_state(z, batch)

    def decode_step(self, z, input_ids, state):
        """One step: z (N, L, D), previous tokens (N,) (the first is ``bos_id``), state None
        (``della``; ``della_cvae`` starts from :meth:`initial_state`) or the tuple (k_0, v_0, ...,
        k_{n_layer-1}, v_{n_layer-1} (N, n_head, t, head_dim), key mask (N, t) bool, next
        position (N,) int64), batch first -> logits (N, V), the state grown by one position.

        Raises:
            ValueError: ``della_cvae`` with state None (the context comes through
                ``initial_state``).
        """
        if state is None:
            if self.conditional:
                raise ValueError(
                    "della_cvae generation starts from model.initial_state(z, batch), "
                    "which reads the context; state None has no context"
                )
            state = self._start_state(z, None)
        hidden, state = self._decode(input_ids.unsqueeze(1), z, state)  # (N, 1, H)
        return self.logits(hidden[:, -1]), state


@register_model("della_cvae", DELLACVAEConfig)
class DELLACVAE(DELLA):
    """Conditional DELLA (Hu et al., NAACL 2022's CVAE for stories and dialogue): p(z|c),
    q(z|x, c), p(x|z, c) with the context encoded by the shared GPT-2 (module docstring). The
    batch carries ``context_ids`` / ``context_mask`` (a dialogue corpus); generation starts from
    :meth:`initial_state` (``textvae generate --mode respond``).

    Raises:
        ValueError: (at use) a batch without the context; ``prior()`` without a batch.
    """

    conditional = True
