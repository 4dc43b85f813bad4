"""Run configuration: plain dataclasses, read from YAML and ``key=value`` overrides by OmegaConf.

A preset YAML may name another preset to start from with ``inherit: other.yaml`` (a path
relative to the preset's own folder); its keys are merged first. Unknown keys are an error
that lists the valid keys of the section; values are type-checked by OmegaConf and the
choice-valued fields below are checked by :func:`validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the file."""


@dataclass
class DataConfig:
    """Where the sentences come from and how they become token ids.

    Attributes:
        corpus: a corpus found by name under ``$TEXTVAE_DATA_DIR`` (``ptb``, ``yelp_sentiment``,
            ``dailydialog``), or null to use the explicit ``*_path`` files.
        train_split / valid_split / test_split: which split of a named corpus plays each role
            (Yelp sentiment has only ``dev`` and ``test``: train on ``test``, validate on ``dev``;
            DailyDialog has only ``validation`` and ``test``: train on ``test``, validate and
            evaluate on ``validation``).
        train_path / valid_path / test_path: explicit files (one sentence per line, ``.tsv`` or
            ``.jsonl``, or dialogues with ``format: dialogue``) used when ``corpus`` is null.
        format: ``auto`` (from the file extension), ``text``, ``tsv``, ``jsonl`` or ``dialogue``
            (one dialogue per line, every utterance ended by ``__eou__``, the DailyDialog
            format; always used for ``corpus: dailydialog``). A dialogue corpus yields
            (context, response) pairs: every utterance after the first is a response, its
            context the ``context_window`` utterances before it.
        context_window: dialogue corpora: how many previous utterances form a context (>= 1).
        text_field / label_field: column (TSV header name) or key (JSONL) of the text and of an
            optional label.
        train_limit / valid_limit: use only the first N sentences of that split (null = all).
        max_length: longest sentence in whitespace words (0 = no limit); longer ones are
            handled by ``long_policy`` (``truncate`` or ``drop``) and counted. A training
            setting: it applies to the splits training reads (train, and the validation set
            of training's logs), never to ``textvae evaluate``, which scores every sentence
            whole.
        min_frequency / max_vocab: word-level vocabulary options (types rarer than
            ``min_frequency`` in the training split become ``<unk>``; null = no cap).
    """

    corpus: str | None = "ptb"
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    train_path: str | None = None
    valid_path: str | None = None
    test_path: str | None = None
    format: str = "auto"
    text_field: str = "text"
    label_field: str | None = None
    train_limit: int | None = None
    valid_limit: int | None = None
    max_length: int = 0
    long_policy: str = "truncate"
    min_frequency: int = 1
    max_vocab: int | None = None
    context_window: int = 3


@dataclass
class ModelConfig:
    """Architecture. Sizes of He et al. 2019 (``lstm-vae.yaml``): embed 512, hidden 1024, latent 32.

    Attributes:
        name: a key of ``textvae.models.MODELS`` (``lstm_vae``, ``lstm_lm``, ``cvrae``: the
            conditional VRAE for dialogue, ``seq2seq``: its encoder-decoder baseline without
            latent; both need a dialogue corpus; ``t5_vae``: the two-phase T5 VAE of Park & Lee
            2021; ``della``: DELLA's layer-wise latents on GPT-2, Hu et al. 2022, and its single-latent
            baselines; ``della_cvae``: conditional DELLA, needs a dialogue corpus).
        pooling: how the encoder summarises its states for q(z|x): ``last`` (h_T), ``first``
            (the first position: DELLA's encoder input starts with BOS, the paper's special
            token), ``mean``, ``max`` or ``attention``; always masked (Long et al. 2019).
        word_dropout: probability of replacing a decoder input token by ``<unk>`` (Bowman 2016).
        dec_dropout_in / dec_dropout_out: dropout on decoder input embeddings / LSTM outputs.
        enc_dropout_in: dropout on encoder input embeddings.
        z_init_state: z sets the decoder's initial state (c_0 = W z, h_0 = tanh c_0).
        z_every_step: z is concatenated to every decoder input embedding.
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
        bow_weight: weight of the bag-of-words auxiliary loss (Zhao et al. 2017), an MLP
            z -> vocabulary (hidden size ``hidden_dim``); 0 = off and no parameters created.
            Not part of the ELBO: reported as ``bow``, never in evaluation.
        classifier_weight: weight of a jointly trained classifier from z to the corpus label
            (Chien & Luo 2022's sentiment task; lstm_vae only): a linear map z -> classes (z_K
            with a flow), loss ``classifier_weight`` x the mean cross-entropy over the batch's
            labelled sentences (``cls`` in the training log); 0 = off, no parameters. Not part
            of the ELBO; ``evaluate`` reports ``classifier_accuracy`` from E_q[z|x] on labelled
            data. Needs a labelled training corpus (e.g. ``yelp_sentiment``).
        classifier_classes: number of label values (labels are 0..classes-1).
        classifier_label_fraction: semi-supervised training: the fraction of training sentences
            whose label the classifier sees, in (0, 1]; which ones is fixed by a seeded
            permutation of the sentence indices (seed 0), the same in every run and on resume
            (:func:`textvae.data.semi_supervised_labels`).
        posterior_flow: normalising flow on the posterior (the issue's ``posterior.flow``;
            Chien & Luo 2022, SPEC 1.2): ``none`` | ``planar`` | ``radial`` (Rezende & Mohamed
            2015) | ``iaf`` (Kingma et al. 2016) | ``cclin_iaf`` (volume preserving, Tomczak &
            Welling 2017) | ``sylvester`` (triangular, van den Berg et al. 2018). Amortised: the
            flow parameters are computed from the encoder summary. See :mod:`textvae.flows`.
        posterior_flow_steps: K, the number of flow steps z_K = f_K(...f_1(z_0)); 0 gives a
            flow distribution with no step (its KL is then estimated by Monte Carlo).
        flow_hidden: hidden units of each MADE (``iaf`` posterior steps and the ``iaf`` prior).
        flow_components: ``cclin_iaf``: lower-triangular matrices in each step's convex
            combination (Tomczak & Welling's ``number_combination``).
        prior_flow: ``none`` (p(z) = N(0, I), or the conditional Gaussian of ``cvrae``) or
            ``iaf``: the prior pushed through ``prior_flow_steps`` autoregressive affine steps
            (:class:`textvae.flows.AutoregressivePrior`; density in one pass, sampling in D).
        embed_noise: amortised regularisation (Shu et al. 2018): Gaussian noise of this standard
            deviation added to the inference encoder's input embeddings, in training only.
        z_skip: skip connection: z (for ``cvrae`` the decoder code [z; c]) is projected to the
            embedding size and added to every decoder input embedding, in addition to
            ``z_init_state`` / ``z_every_step``.
        encoder_token_drop: denoising (Park & Lee 2021; SPEC 2 "token deletion on encoder
            inputs"): in training, delete this fraction of each sentence's encoder input tokens
            (EOS kept) before q(z|x) is computed; the decoder target is untouched. ``lstm_vae``
            and ``t5_vae``; 0 = off. See :func:`textvae.encoders.delete_tokens`.
        backbone: the network family of the model: null = the model's own (``lstm`` for the
            LSTM models, ``t5`` for ``t5_vae``, ``gpt2`` for ``della``/``della_cvae``); a value
            that does not fit ``name`` is an error.
        pretrained: ``t5_vae`` (Park & Lee 2021, SPEC 1.3; :mod:`textvae.models.t5_vae`) and
            ``della``/``della_cvae`` (:mod:`textvae.models.della`): a Hugging Face model name or
            folder (``t5-small``, ``gpt2``) loaded with ``from_pretrained``, with its tokenizer;
            null builds the backbone from scratch with the ``t5_*`` / ``gpt2_*`` sizes and trains
            a subword tokenizer on the training split.
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
        gpt2_n_embd / gpt2_n_layer / gpt2_n_head / gpt2_n_positions / gpt2_dropout: ``GPT2Config``
            fields (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``; ``gpt2_dropout`` sets
            ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop``) of a GPT-2 built from scratch for
            ``della`` (GPT-2 small's sizes by default); ``gpt2_dropout`` also overrides a
            pretrained model's dropout.
        gpt2_tokenizer / gpt2_vocab_size: the subword tokenizer trained on the corpus for a GPT-2
            from scratch (``bpe`` or ``unigram``, this many types including ``<pad> </s> <unk>``).
        fusion: how ``della`` feeds z to the decoder: ``della`` (the paper's low-rank tensor
            product into each latent layer's attention values, which as written equals rank 1:
            :class:`textvae.models.della.ValueFusion`), ``lmf`` (true low-rank multimodal
            fusion, a sum over the rank of element-wise products), or the single-latent baselines
            of the paper on the same backbone: ``embedding`` (W z added to every input
            embedding), ``memory`` (a key/value slot per layer, Optimus) and ``softmax`` (W z
            added to the last hidden state before the output layer).
        fusion_rank: r of ``della`` / ``lmf`` fusion (the paper: 4).
        latent_layers: ``"begin..end"``, 0-based and inclusive: the GPT-2 layers that carry a
            latent (z_1 from encoder layer ``begin`` into decoder layer ``begin``, ...); null =
            all layers. ``della`` / ``lmf`` fusion only (the baselines have one latent, from the
            last encoder layer).
        first_prior: p(z_1): ``learned`` (N(mu, sigma^2) from a learned bias, since zbar_1 = 0:
            the released code's) or ``standard`` (N(0, I)). Not for ``della_cvae`` (its p(z_1|c)
            depends on the context).
        kl_reduction: ``sum`` over layers (a valid ELBO) or ``mean`` (the released DELLA code's
            layer average; a reproduction switch: evaluation reports ``bound_valid: false``).
        feature_norm: ``della``: a LayerNorm on each pooled x_l (the released code's; the paper,
            sec. 4.1 and A.1, has none). Default true so that earlier run folders load; the
            presets set false.
        head_bias: ``della``: biases b_l in the prior and posterior heads (the released code's;
            eq. 8 of the paper has none; p(z_1)'s bias follows ``first_prior``). Default true for
            earlier run folders; the presets set false.
    """

    name: str = "lstm_vae"
    embed_dim: int = 512
    hidden_dim: int = 1024
    latent_dim: int = 32
    pooling: str = "last"
    bidirectional: bool = False
    enc_dropout_in: float = 0.0
    dec_dropout_in: float = 0.5
    dec_dropout_out: float = 0.5
    word_dropout: float = 0.0
    z_init_state: bool = True
    z_every_step: bool = True
    posterior_bn_gamma: float = 0.0
    posterior_bn_eps: float = 1e-5
    min_rate_delta: float = 0.0
    bow_weight: float = 0.0
    classifier_weight: float = 0.0
    classifier_classes: int = 2
    classifier_label_fraction: float = 1.0
    posterior_flow: str = "none"
    posterior_flow_steps: int = 4
    flow_hidden: int = 256
    flow_components: int = 3
    prior_flow: str = "none"
    prior_flow_steps: int = 2
    embed_noise: float = 0.0
    z_skip: bool = False
    encoder_token_drop: float = 0.0
    backbone: str | None = None
    pretrained: str | None = None
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


@dataclass
class KLConfig:
    """KL weight (beta) schedule and free bits; see :mod:`textvae.objectives`.

    Attributes:
        schedule: ``constant`` | ``linear`` (Bowman 2016; from ``beta_start`` to ``beta_max``
            over ``warmup_steps``) | ``logistic`` (``beta_max / (1 + exp(-k (step - x0)))``) |
            ``cyclical`` (Fu et al. 2019: period ``cycle_steps``; first ``ratio_zero`` of a
            period at 0, then linear to ``beta_max`` over ``ratio_increase``, then held).
        cycle_epochs: when > 0 (``cyclical`` only), the period is this many epochs of the
            training split instead of ``cycle_steps`` (resolved at the start of training from
            the number of batches per epoch; DELLA: 2).
        free_bits: lambda in nats (0 = off). ``free_bits_mode`` ``per_dim``: each dimension's
            batch-mean KL is clamped below at lambda; ``per_layer`` (layer-wise latents,
            ``della``): each layer's batch-mean KL is; ``total``: the batch-mean total KL is;
            ``per_sentence_dim``: each sentence's KL in each dimension is, before the batch mean
            (Park & Lee 2021's released code).
        target: KL target constraint (nats per sentence; 0 = off): the training loss gains
            ``target_weight * |mean_B KL - target|`` (Burgess et al. 2018's capacity term, eq. 8,
            which is the case beta = 0 of this); the KL is held near the target when
            ``target_weight`` > beta. Not part of the ELBO; evaluation never includes it.
    """

    schedule: str = "linear"
    beta_max: float = 1.0
    beta_start: float = 0.1
    warmup_steps: int = 10000
    logistic_k: float = 0.0025
    logistic_x0: int = 2500
    cycle_steps: int = 10000
    cycle_epochs: float = 0.0
    ratio_increase: float = 0.5
    ratio_zero: float = 0.25
    free_bits: float = 0.0
    free_bits_mode: str = "per_dim"
    target: float = 0.0
    target_weight: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation. He et al. 2019: SGD lr 1.0, clip 5, halve the lr on a validation plateau.

    Attributes:
        max_steps: stop after this many optimizer steps (null = run ``max_epochs``).
        eval_every: validate (and checkpoint) every N steps; 0 = once per epoch.
        valid_limit_eval: sentences of the validation split used at each validation (null = all).
        precision: ``fp32`` or ``bf16`` autocast, passed to ``accelerate`` (``no``, accelerate's
            name for fp32, is accepted; YAML reads a bare ``no`` as false, which is accepted too).
        lr_scheduler: ``constant`` or ``plateau`` (multiply by ``lr_decay`` when the
            validation loss has not improved for ``lr_patience`` validations).
        num_samples: prior samples written to ``samples.txt`` at each validation.
        collapse_kl / collapse_z_gap: collapse thresholds in nats per sentence: a validation
            whose KL is below ``collapse_kl`` or whose z-usage gap is below ``collapse_z_gap``
            counts towards a posterior-collapse warning.
        collapse_patience: after this many such validations in a row, every further one
            writes a warning (progress output and ``log.jsonl``); 0 = never warn. Training
            is not stopped.
        aggressive: aggressive inference-network training (He et al. 2019): before each
            decoder update, encoder-only updates on random training batches (their own
            optimizer, same settings) until the encoder's loss stops improving; switched off
            for good at the first validation whose MI is lower than the previous one's.
        aggressive_max_inner: at most this many encoder-only steps per decoder step (He et al.:
            100).
        aggressive_window: the inner loop stops when the per-token loss of the last
            ``aggressive_window`` inner steps is higher than that of the window before (He et
            al.'s released code: 15).
        ae_pretrain_steps: Li et al. 2019: the first N optimizer steps train an autoencoder
            (phase ``ae``, KL weight 0), then phase ``vae`` starts: the decoder is re-initialised
            (``ae_reset_decoder``), the optimizer state is reset and the KL schedule counts from
            the phase start. The N steps count towards ``max_steps``/``max_epochs``; 0 = off.
        ae_reset_decoder: re-initialise every parameter outside the inference network at the
            phase hand-off (Li et al. 2019); false keeps the phase-1 decoder (Park & Lee 2021:
            phase 2 starts from the phase-1 weights; ``t5_vae`` needs false).
        ae_patience: early stopping of phase ``ae`` on the validation reconstruction (Park & Lee
            2021): the VAE phase starts after this many validations in a row whose ``rec``
            (nats per sentence) is not below the best of the phase, or at ``ae_pretrain_steps``,
            whichever comes first; 0 = off (the phase lasts ``ae_pretrain_steps``).
        ae_freeze_decoder: in phase ``ae``, hold the model's pretrained decoder
            (``decoder_modules``, for ``t5_vae`` the token embedding, the decoder stack and the
            output layer) fixed: their gradients are dropped before each update (Park & Lee
            2021's phase 1); the latent-to-decoder projections still train unless
            ``ae_freeze_latent_projection``.
        ae_freeze_latent_projection: with ``ae_freeze_decoder``, also hold the latent-to-
            decoder projections (``t5_vae``: the memory and embedding maps of z) fixed in
            phase ``ae``, as Park & Lee 2021's released code does (it freezes every decoder-side
            parameter); the default lets them train (the paper's text freezes "the decoder").
        ae_start: the weights phase ``vae`` starts from: ``best`` (default; the phase-1
            weights of the best validation ``rec``, the argmin of the early-stopping criterion,
            kept in ``checkpoints/ae_best``; as Park & Lee 2021's early stopping; the last
            weights when no phase-1 validation happened) or ``last`` (the weights at the
            hand-off).
        batch_size: the **global** batch: sentences per optimizer step over all processes.
            Under ``accelerate launch``/``torchrun`` with N processes each takes
            ``batch_size / N`` sentences of every batch (an error when N does not divide it), so
            a run means the same on 1 CPU or 8 GPUs (docs/scaling.md).
        log_with: live experiment tracking through ``accelerate``'s trackers besides
            ``log.jsonl`` (which stays the record): ``none``, ``tensorboard`` (event files in
            ``<run>/tensorboard/``), ``wandb`` or ``mlflow`` (``pip install textvae[wandb]`` /
            ``[mlflow]``; configured by their own environment variables).
    """

    seed: int = 0
    batch_size: int = 32
    max_steps: int | None = None
    max_epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    lr_scheduler: str = "plateau"
    lr_decay: float = 0.5
    lr_patience: int = 2
    lr_min: float = 1e-4
    eval_every: int = 0
    valid_limit_eval: int | None = None
    log_every: int = 50
    precision: str = "fp32"
    num_samples: int = 5
    progress: bool = True
    collapse_kl: float = 0.5
    collapse_z_gap: float = 0.5
    collapse_patience: int = 3
    aggressive: bool = False
    aggressive_max_inner: int = 100
    aggressive_window: int = 15
    ae_pretrain_steps: int = 0
    ae_reset_decoder: bool = True
    ae_patience: int = 0
    ae_freeze_decoder: bool = False
    ae_start: str = "best"
    ae_freeze_latent_projection: bool = False
    log_with: str = "none"


@dataclass
class EvalConfig:
    """Defaults of ``textvae evaluate`` (command-line flags override them).

    Attributes:
        iw_samples: K of the importance-weighted NLL (Burda et al. 2016).
        au_delta: active-unit threshold on Cov_x(E_q[z|x]).
        batch_size: sentences per encoder pass.
        chunk_tokens: at most this many (sample x sentence x position) tokens go through the
            decoder at once; bounds memory.
        precision: ``fp32`` or ``bf16`` (matmuls in bfloat16, log-sum-exp and sums in float32).
    """

    iw_samples: int = 500
    au_delta: float = 0.01
    batch_size: int = 64
    chunk_tokens: int = 16384
    precision: str = "fp32"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "text", "tsv", "jsonl", "dialogue"),
    "data.long_policy": ("truncate", "drop"),
    "model.pooling": ("last", "first", "mean", "max", "attention"),
    "model.posterior_flow": ("none", "planar", "radial", "iaf", "cclin_iaf", "sylvester"),
    "model.prior_flow": ("none", "iaf"),
    "model.latent_injection": ("memory", "embedding", "both"),
    "model.t5_tokenizer": ("unigram", "bpe"),
    "model.gpt2_tokenizer": ("unigram", "bpe"),
    "model.fusion": ("della", "lmf", "embedding", "memory", "softmax"),
    "model.first_prior": ("standard", "learned"),
    "model.kl_reduction": ("sum", "mean"),
    "kl.schedule": ("constant", "linear", "logistic", "cyclical"),
    "kl.free_bits_mode": ("per_dim", "per_layer", "total", "per_sentence_dim"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.ae_start": ("best", "last"),
    "train.lr_scheduler": ("constant", "plateau"),
    "train.precision": ("fp32", "bf16"),
    "train.log_with": ("none", "tensorboard", "wandb", "mlflow"),
    "eval.precision": ("fp32", "bf16"),
}


def _valid_keys(section: str | None) -> list[str]:
    classes = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    if section in classes:
        return [f"{section}.{f.name}" for f in dataclasses.fields(classes[section]())]
    return [f"{s}.{f.name}" for s, c in classes.items() for f in dataclasses.fields(c())]


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err)
        section = key.split(".")[0] if key else None
        raise ConfigError(
            f"{source}: unknown config key '{key}'. Valid keys: {', '.join(_valid_keys(section))}"
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid value for '{err.full_key}': {err.msg}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Any, str]]:
    """The chain of YAML layers of a preset, oldest ancestor first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends carry line numbers in their text
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    layers: list[tuple[Any, str]] = []
    if "inherit" in raw:
        parent = path.parent / str(raw.pop("inherit"))
        layers = _read_yaml(parent, seen + (path,))
    layers.append((raw, str(path)))
    return layers


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, a preset YAML and dotted ``key=value`` overrides.

    Raises:
        ConfigError: file missing or unparsable, unknown key (the message lists the valid keys),
            wrong type, or a value outside the allowed choices.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for layer, source in _read_yaml(Path(path)):
            cfg = _merge(cfg, layer, source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check choice-valued fields and simple ranges. Raises ConfigError naming the key."""
    for section in (config.train, config.eval):
        if section.precision in ("no", "False", "false"):  # accelerate's "no"; YAML's `no` is false
            section.precision = "fp32"
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    from textvae.models import MODELS  # late import: models import this module

    if config.model.name not in MODELS:
        raise ConfigError(f"model.name={config.model.name!r} is not one of {', '.join(MODELS)}")
    if config.data.corpus is None and config.data.train_path is None:
        raise ConfigError("data.corpus is null, so data.train_path must be set")
    for key in (
        "train.batch_size",
        "model.latent_dim",
        "model.hidden_dim",
        "eval.iw_samples",
        "train.aggressive_max_inner",
        "train.aggressive_window",
        "model.flow_hidden",
        "model.flow_components",
        "data.context_window",
    ):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1")
    m, t = config.model, config.train
    if not 0.0 < m.classifier_label_fraction <= 1.0:
        raise ConfigError(
            f"model.classifier_label_fraction={m.classifier_label_fraction} must be in (0, 1]"
        )
    if m.classifier_classes < 2:
        raise ConfigError("model.classifier_classes must be >= 2")
    if m.classifier_weight > 0 and m.name != "lstm_vae":
        raise ConfigError(
            f"model.classifier_weight: model.name={m.name!r} has no classifier on z "
            "(lstm_vae, with or without flows, has); set it to 0"
        )
    for key in (
        "model.posterior_bn_gamma",
        "model.min_rate_delta",
        "model.bow_weight",
        "model.classifier_weight",
        "train.ae_pretrain_steps",
        "model.posterior_flow_steps",
        "model.prior_flow_steps",
        "model.embed_noise",
        "kl.target",
        "kl.target_weight",
    ):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            raise ConfigError(f"{key} must be >= 0")
    for key in (
        "model.t5_d_model",
        "model.t5_d_ff",
        "model.t5_num_layers",
        "model.t5_num_decoder_layers",
        "model.t5_num_heads",
        "model.t5_d_kv",
        "model.t5_vocab_size",
        "model.gpt2_n_embd",
        "model.gpt2_n_layer",
        "model.gpt2_n_head",
        "model.gpt2_n_positions",
        "model.gpt2_vocab_size",
        "model.fusion_rank",
    ):
        if getattr(m, key.split(".")[1]) < 1:
            raise ConfigError(f"{key} must be >= 1")
    if t.ae_patience < 0:
        raise ConfigError("train.ae_patience must be >= 0")
    if not m.posterior_bn_eps > 0:
        raise ConfigError(
            f"model.posterior_bn_eps={m.posterior_bn_eps} must be > 0 (BatchNorm "
            "divides by sqrt(batch variance + eps))"
        )
    if not 0.0 <= m.encoder_token_drop < 1.0:
        raise ConfigError(f"model.encoder_token_drop={m.encoder_token_drop} must be in [0, 1)")
    if not 0.0 <= m.t5_dropout < 1.0:
        raise ConfigError(f"model.t5_dropout={m.t5_dropout} must be in [0, 1)")
    if not 0.0 <= m.gpt2_dropout < 1.0:
        raise ConfigError(f"model.gpt2_dropout={m.gpt2_dropout} must be in [0, 1)")
    if m.gpt2_n_embd % m.gpt2_n_head:
        raise ConfigError(
            f"model.gpt2_n_embd={m.gpt2_n_embd} must be a multiple of "
            f"model.gpt2_n_head={m.gpt2_n_head}"
        )
    k = config.kl
    if k.cycle_epochs < 0:
        raise ConfigError("kl.cycle_epochs must be >= 0")
    if k.cycle_epochs > 0 and k.schedule != "cyclical":
        raise ConfigError(
            f"kl.cycle_epochs sets the period of the cyclical schedule, but "
            f"kl.schedule={k.schedule!r}; set kl.schedule=cyclical or cycle_epochs=0"
        )
    if m.latent_layers is not None:
        parse_latent_layers(m.latent_layers)
    _validate_model_keys(config)
    if m.min_rate_delta > 9:
        raise ConfigError(
            "model.min_rate_delta must be at most 9 nats per dimension (the "
            "posterior log-variance is clamped at -20)"
        )
    if not MODELS[m.name].has_latent:
        used = [
            key
            for key, on in (
                ("model.posterior_bn_gamma", m.posterior_bn_gamma > 0),
                ("model.min_rate_delta", m.min_rate_delta > 0),
                ("model.bow_weight", m.bow_weight > 0),
                ("train.aggressive", t.aggressive),
                ("train.ae_pretrain_steps", t.ae_pretrain_steps > 0),
                ("model.posterior_flow", m.posterior_flow != "none"),
                ("model.prior_flow", m.prior_flow != "none"),
                ("model.embed_noise", m.embed_noise > 0),
                ("model.z_skip", m.z_skip),
                ("kl.target", config.kl.target > 0),
            )
            if on
        ]
        if used:
            raise ConfigError(
                f"model.name={m.name!r} has no latent variable, so "
                f"{', '.join(used)} cannot be used; set them to 0/false/none"
            )
    if MODELS[m.name].conditional:
        used = [
            key
            for key, on in (
                ("model.posterior_bn_gamma", m.posterior_bn_gamma > 0),
                ("model.min_rate_delta", m.min_rate_delta > 0),
            )
            if on
        ]
        if used:
            raise ConfigError(
                f"model.name={m.name!r} has a learned prior p(z|c), but "
                f"{', '.join(used)} bound the KL to N(0, I) only; set them to 0"
            )


def _validate_model_keys(config: Config) -> None:
    """Keys that only some models read: the T5 backbone's, encoder token deletion, and the
    autoencoder-phase options. Raises ConfigError naming the key."""
    from textvae.models import MODELS

    m, t = config.model, config.train
    cls = MODELS[m.name]
    if m.backbone is not None and m.backbone != cls.backbone:
        raise ConfigError(
            f"model.backbone={m.backbone!r} does not fit model.name={m.name!r} "
            f"(its backbone is {cls.backbone!r}; or leave model.backbone null)"
        )
    if m.encoder_token_drop > 0 and m.name not in ("lstm_vae", "t5_vae", "della", "della_cvae"):
        raise ConfigError(
            f"model.encoder_token_drop: model.name={m.name!r} does not delete encoder "
            "tokens (lstm_vae, t5_vae and della do); set it to 0"
        )
    if config.kl.free_bits_mode == "per_layer" and cls.backbone != "gpt2":
        raise ConfigError(
            f"kl.free_bits_mode=per_layer: model.name={m.name!r} has one latent "
            "layer; per_layer is for della's layer-wise latents (use per_dim or total)"
        )
    if t.ae_patience > 0 and t.ae_pretrain_steps == 0:
        raise ConfigError(
            "train.ae_patience needs an autoencoder phase: set "
            "train.ae_pretrain_steps > 0 (the phase's longest length)"
        )
    if t.ae_freeze_latent_projection and not t.ae_freeze_decoder:
        raise ConfigError(
            "train.ae_freeze_latent_projection extends train.ae_freeze_decoder: set "
            "train.ae_freeze_decoder=true too"
        )
    if t.ae_freeze_decoder:
        if t.ae_pretrain_steps == 0:
            raise ConfigError(
                "train.ae_freeze_decoder needs an autoencoder phase: set "
                "train.ae_pretrain_steps > 0"
            )
        if not cls.decoder_modules:
            raise ConfigError(
                f"train.ae_freeze_decoder: model.name={m.name!r} names no pretrained "
                "decoder to freeze (t5_vae does); set it to false"
            )
    defaults = ModelConfig()
    della_keys = (
        "fusion",
        "fusion_rank",
        "latent_layers",
        "first_prior",
        "kl_reduction",
        "feature_norm",
        "head_bias",
    )
    if cls.backbone != "gpt2":
        used = [f"model.{key}" for key in della_keys if getattr(m, key) != getattr(defaults, key)]
        if used:
            raise ConfigError(
                f"{', '.join(used)}: only the GPT-2 backbone (model.name=della or "
                f"della_cvae) reads this; model.name={m.name!r}"
            )
    if cls.backbone in ("t5", "gpt2"):
        used = [
            key
            for key, on in (
                ("model.posterior_flow", m.posterior_flow != "none"),
                ("model.prior_flow", m.prior_flow != "none"),
                ("model.embed_noise", m.embed_noise > 0),
                ("model.z_skip", m.z_skip),
                ("model.word_dropout", m.word_dropout > 0),
                ("model.bidirectional", m.bidirectional),
                ("train.aggressive", t.aggressive),
            )
            if on
        ]
        if used:
            raise ConfigError(
                f"model.name={m.name!r} does not support {', '.join(used)} (the "
                f"{cls.backbone} encoder and decoder share their token embedding, and "
                "the LSTM options have no Transformer counterpart here); set them to "
                "0/false/none"
            )
        if t.ae_pretrain_steps > 0 and t.ae_reset_decoder:
            raise ConfigError(
                f"train.ae_reset_decoder: the {cls.backbone} model's VAE phase starts "
                "from the autoencoder phase's weights (Park & Lee 2021; DELLA's encoder "
                "is its decoder); set train.ae_reset_decoder=false"
            )
    else:
        used = [key for key, on in (("model.pretrained", m.pretrained is not None),) if on]
        if used:
            raise ConfigError(
                f"{', '.join(used)}: only the Transformer backbones (model.name=t5_vae, "
                f"della, della_cvae) read this; model.name={m.name!r}"
            )
    if cls.backbone != "t5" and m.latent_injection != "memory":
        raise ConfigError(
            f"model.latent_injection: only the T5 backbone (model.name=t5_vae) reads "
            f"this (della: model.fusion); model.name={m.name!r}"
        )
    if cls.backbone == "gpt2":
        used = [
            key
            for key, on in (
                ("model.posterior_bn_gamma", m.posterior_bn_gamma > 0),
                ("model.min_rate_delta", m.min_rate_delta > 0),
            )
            if on
        ]
        if used:
            raise ConfigError(
                f"{', '.join(used)}: della's posterior is layer-wise (its p(z_l|z_<l) "
                "is learned), these bound the KL to N(0, I) only; set them to 0"
            )
        if m.latent_layers is not None and m.fusion not in ("della", "lmf"):
            raise ConfigError(
                f"model.latent_layers: model.fusion={m.fusion!r} is a single-latent "
                "baseline (one z from the last encoder layer); set latent_layers=null "
                "or fusion=della/lmf"
            )
        if cls.conditional and m.first_prior == "standard":
            raise ConfigError(
                "model.first_prior=standard: della_cvae's p(z_1|c) is computed from "
                "the context; use first_prior=learned"
            )


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


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    OmegaConf.save(OmegaConf.structured(config), str(path))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a dict (e.g. a run folder's config.yaml), checking keys."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "config")
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config
