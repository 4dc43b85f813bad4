"""Run configuration: plain dataclasses, read from YAML and ``key=value`` overrides by OmegaConf.

A preset YAML may name another preset to start from with ``inherit: other.yaml`` (a path
relative to the preset's own folder); its keys are merged first. Unknown keys are an error
that lists the valid keys of the section; values are type-checked by OmegaConf and the
choice-valued fields below are checked by :func:`validate`.

The ``model`` section belongs to the models: each model module declares its config dataclass
(a :class:`ModelConfig` subclass) and registers it with its model in :mod:`textvae.registry`;
``model.name`` selects it, and its ``validate`` checks the model's keys. This module names no
model and imports none (only the registry, a leaf module).

The ``train`` and ``kl`` sections also hold the keys the training-schedule remedies declare
(:func:`section_class`): the built-in ones' are dataclasses of the leaf module
:mod:`textvae.remedy_keys`, each with its checks, so loading a config imports neither the
remedies (:mod:`textvae.remedies`) nor the training loop.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from textvae import registry
from textvae.remedy_keys import RemedyKeys


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the file."""


@dataclass
class DataConfig:
    """Where the sentences come from and how they become token ids.

    Attributes:
        corpus: a corpus found by name: a name registered in ``textvae.registry.CORPORA``
            (shipped: ``ptb``, ``yelp_sentiment``, ``dailydialog``, see
            :mod:`textvae.corpora`; an unknown name is an error listing them when the data is
            read), or null to use the explicit ``*_path`` files. Where its files are read
            (:func:`textvae.data.corpus_folder`): ``$TEXTVAE_DATA_DIR/<name>`` when the
            variable is set (PTB's missing files are downloaded there first); else PTB's copy
            shipped inside the package (``src/textvae/corpora_data/ptb``, sha256-checked when
            read), and the other corpora under ``~/.cache/textvae/data/<name>``
            (``$XDG_CACHE_HOME/textvae/data`` when that is set).
        train_split / valid_split / test_split: which split of a named corpus plays each role
            (Yelp sentiment has only ``dev`` and ``test``: train on ``test``, validate on ``dev``;
            DailyDialog has only ``validation`` and ``test``: train on ``test``, validate and
            evaluate on ``validation``).
        train_path / valid_path / test_path: explicit files (one sentence per line, ``.tsv`` or
            ``.jsonl``, or dialogues with ``format: dialogue``) used when ``corpus`` is null.
        format: ``auto`` (from the file extension), ``text``, ``tsv``, ``jsonl`` or ``dialogue``
            (one dialogue per line, every utterance ended by ``__eou__``, the DailyDialog
            format; always used for a named dialogue corpus, ``corpus: dailydialog``). A
            dialogue corpus yields (context, response) pairs: every utterance after the first
            is a response, its context the ``context_window`` utterances before it.
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
    """Base of every model's config: the keys all models share.

    Each model declares its own config beside its code, a dataclass subclassing this one (and
    the shared pieces of :mod:`textvae.models.parts` it uses), registered with its model by
    :func:`textvae.registry.register_model`; ``model.name`` selects it when a config is loaded.
    The YAML ``model:`` section is flat: every field of the chosen class is a ``model.<key>``.

    Attributes:
        name: a registered model (``textvae.models.MODELS``; ``textvae train --help`` and
            ARCHITECTURE.md list them).
        backbone: the network family of the model (``lstm``, ``t5``, ``gpt2``): null = the
            model's own; a value that does not fit ``name`` is an error.

    Class attributes (not config keys):
        renamed_keys: old key -> new key of this model, applied when an existing run folder's
            ``config.yaml`` is read (:func:`config_from_dict`), never to presets or overrides.
    """

    renamed_keys: ClassVar[dict[str, str]] = {}

    name: str = ""
    backbone: str | None = None

    def validate(self, config: Config) -> None:
        """Check this model's keys (choices, ranges) and how they combine with the other
        sections of ``config``. A subclass or piece that adds keys extends it and calls
        ``super().validate(config)``.

        Raises:
            ConfigError: naming the offending key.
        """
        model = registry.MODELS[self.name]
        if self.backbone is not None and self.backbone != model.backbone:
            raise ConfigError(
                f"model.backbone={self.backbone!r} does not fit model.name={self.name!r} "
                f"(its backbone is {model.backbone!r}; or leave model.backbone null)"
            )


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """Raise ConfigError ``"<key>=<value> is not one of ..."`` when ``value`` is not allowed."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_at_least(section: Any, prefix: str, keys: tuple[str, ...], low: float) -> None:
    """Raise ConfigError ``"<prefix>.<key> must be >= low"`` for the first key below ``low``."""
    for key in keys:
        if getattr(section, key) < low:
            raise ConfigError(f"{prefix}.{key} must be >= {low:g}")


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
        lr_scheduler: ``constant``, ``plateau`` (multiply by ``lr_decay`` when the
            validation loss has not improved for ``lr_patience`` validations) or ``cosine``
            (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts: after each optimizer step
            the LR is ``lr_min + (lr - lr_min) * (1 + cos(pi * s / S)) / 2``, ``s`` the steps
            since the training phase began and ``S`` the phase's steps up to the budget; held at
            ``lr`` during an autoencoder phase, so the VAE phase decays over its own steps).
        lr_min: the lowest LR of ``plateau``; the LR that ``cosine`` ends at.
        num_samples: prior samples written to ``samples.txt`` at each validation.
        batch_size: the **global** batch: sentences per optimizer step over all processes.
            Under ``accelerate launch``/``torchrun`` with N processes each takes
            ``batch_size / N`` sentences of every batch (an error when N does not divide it), so
            a run means the same on 1 CPU or 8 GPUs (docs/scaling.md).
        log_with: live experiment tracking through ``accelerate``'s trackers besides
            ``log.jsonl`` (which stays the record): ``none``, ``tensorboard`` (event files in
            ``<run>/tensorboard/``), ``wandb`` or ``mlflow`` (``pip install textvae[wandb]`` /
            ``[mlflow]``; configured by their own environment variables).

    The ``train`` section also holds the keys that the registered remedies declare
    (:func:`section_class`; the dataclasses of :mod:`textvae.remedy_keys`): the collapse watch's
    ``collapse_*``, autoencoder pretraining's ``ae_*`` and aggressive training's
    ``aggressive*``.
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


def default_model_config() -> ModelConfig:
    """The config of the registry's default model, at its defaults."""
    return registry.config_class(registry.default_model())()


SECTIONS = {"train": TrainConfig, "kl": KLConfig}  # the sections a remedy may add keys to


def section_class(section: str) -> type:
    """The dataclass of the ``train`` or ``kl`` section: :class:`TrainConfig` / :class:`KLConfig`
    plus the keys every registered remedy declares for it (its
    :class:`~textvae.remedy_keys.RemedyKeys` dataclass and ``section``, registered with
    :func:`textvae.registry.register_remedy_keys`: the built-in ones in
    :mod:`textvae.remedy_keys`), so that a remedy's keys are ``<section>.<key>`` like every
    other and a new remedy edits no config class. The base class itself when no remedy adds
    keys to the section.

    Raises:
        ConfigError: two remedies, or a remedy and the base class, declare the same key; a
            remedy's keys are not a RemedyKeys dataclass.
    """
    base = SECTIONS[section]
    for name, keys in registry.REMEDY_KEYS.items():
        if not issubclass(keys, RemedyKeys):
            raise ConfigError(
                f"remedy {name!r}: its keys {keys.__name__} must subclass "
                "textvae.remedy_keys.RemedyKeys"
            )
    parts = tuple(k for k in registry.REMEDY_KEYS.values() if k.section == section)
    return _composed_section(base, parts)


@functools.cache
def _composed_section(base: type, parts: tuple[type, ...]) -> type:
    if not parts:
        return base
    owner = {f.name: base.__name__ for f in dataclasses.fields(base)}
    for part in parts:
        for f in dataclasses.fields(part):
            if f.name in owner:
                raise ConfigError(
                    f"config key {f.name!r} is declared by {owner[f.name]} and {part.__name__}"
                )
            owner[f.name] = part.__name__
    # the base's fields first, then each part's in registration order (reversed MRO)
    cls = dataclasses.make_dataclass(base.__name__, [], bases=(*reversed(parts), base))
    cls.__module__, cls.__doc__ = __name__, base.__doc__
    return cls


@dataclass
class Config:
    """The whole run: ``model`` is the config class of the chosen ``model.name``; ``kl`` and
    ``train`` are the classes of :func:`section_class` (with the remedies' keys)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=default_model_config)
    kl: KLConfig = field(default_factory=lambda: section_class("kl")())
    train: TrainConfig = field(default_factory=lambda: section_class("train")())
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {  # the model's own choices are checked by its config
    "data.format": ("auto", "text", "tsv", "jsonl", "dialogue"),
    "data.long_policy": ("truncate", "drop"),
    "kl.schedule": ("constant", "linear", "logistic", "cyclical"),
    "kl.free_bits_mode": ("per_dim", "per_layer", "total", "per_sentence_dim"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.lr_scheduler": ("constant", "plateau", "cosine"),
    "train.precision": ("fp32", "bf16"),
    "train.log_with": ("none", "tensorboard", "wandb", "mlflow"),
    "eval.precision": ("fp32", "bf16"),
}

# The keys of the one flat model section that run folders written before per-model configs
# hold (every model's config.yaml had all of them). Reading such a folder drops those the
# chosen model does not declare: that model never read them (config_from_dict).
LEGACY_MODEL_KEYS = frozenset(
    "name embed_dim hidden_dim latent_dim pooling bidirectional enc_dropout_in dec_dropout_in "
    "dec_dropout_out word_dropout z_init_state z_every_step posterior_bn_gamma posterior_bn_eps "
    "min_rate_delta bow_weight classifier_weight classifier_classes classifier_label_fraction "
    "posterior_flow posterior_flow_steps flow_hidden flow_components prior_flow prior_flow_steps "
    "embed_noise z_skip encoder_token_drop backbone pretrained latent_injection t5_d_model "
    "t5_d_ff t5_num_layers t5_num_decoder_layers t5_num_heads t5_d_kv t5_dropout t5_tokenizer "
    "t5_vocab_size gpt2_n_embd gpt2_n_layer gpt2_n_head gpt2_n_positions gpt2_dropout "
    "gpt2_tokenizer gpt2_vocab_size fusion fusion_rank latent_layers first_prior feature_norm "
    "head_bias kl_reduction".split()
)


def model_keys(config_class: type) -> list[str]:
    """The ``model.<key>`` names a model config class declares, in field order."""
    return [f.name for f in dataclasses.fields(config_class)]


def _config_class(name: Any, source: str) -> type:
    cls = registry.config_class(str(name))
    if cls is None:
        raise ConfigError(
            f"{source}: model.name={name!r} is not one of {', '.join(sorted(registry.MODELS))}"
        )
    return cls


def _schema(name: str, source: str) -> DictConfig:
    """The structured defaults of a config whose model is ``name``."""
    return OmegaConf.structured(Config(model=_config_class(name, source)(name=name)))


def _valid_keys(section: str | None, name: str) -> list[str]:
    classes = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "model"}
    classes.update({s: section_class(s) for s in SECTIONS})
    classes["model"] = registry.config_class(name)
    if section in classes:
        return [f"{section}.{key}" for key in model_keys(classes[section])]
    return [f"{s}.{key}" for s, c in classes.items() for key in model_keys(c)]


def _unknown_key_message(key: str, name: str, source: str) -> str:
    section, _, leaf = key.partition(".")
    valid = ", ".join(_valid_keys(section, name))
    if section != "model":
        return f"{source}: unknown config key '{key}'. Valid keys: {valid}"
    cls = registry.config_class(name)
    owners = sorted(
        other for other, model in registry.MODELS.items() if leaf in model_keys(model.config_class)
    )
    if leaf in cls.renamed_keys:
        hint = f" (renamed: use model.{cls.renamed_keys[leaf]})"
    elif owners:
        no_latent = "" if registry.MODELS[name].has_latent else "; it has no latent variable"
        hint = f" (a key of {', '.join(owners)}, not of this model{no_latent})"
    else:
        hint = ""
    return (
        f"{source}: unknown config key '{key}' for model.name={name!r}{hint}. "
        f"Valid keys of {name!r}: {valid}"
    )


def _merge(base: DictConfig, other: Any, source: str, name: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(_unknown_key_message(key, name, source)) from None
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


def _layer_model_name(layer: Any) -> Any:
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    return model.get("name") if isinstance(model, DictConfig) else None


def _resolve_model(layers: list[tuple[Any, str]]) -> tuple[str, str]:
    """The model the layers end with, and the source that chose it.

    A preset may start from another model's preset (``lstm-lm.yaml`` inherits ``lstm-vae.yaml``
    and sets ``name: lstm_lm``; a sweep entry ``model.name=lstm_lm`` on an LSTM VAE preset):
    the keys a YAML layer set for the model it was written for (the last name set up to that
    layer) that the final model does not declare are removed from that layer (in place). Keys
    of the layer that chooses the final model, of the layers after it, and every ``key=value``
    override are checked strictly.
    """
    try:
        default = registry.default_model()
    except LookupError:
        default = None
    name, source = default, "defaults"
    for layer, where in layers:
        if _layer_model_name(layer) is not None:
            name, source = _layer_model_name(layer), where
    if name is None:
        raise ConfigError("no model is registered as the default: set model.name")
    final = set(model_keys(_config_class(name, source)))
    current = default
    for layer, where in layers:
        current = _layer_model_name(layer) or current
        is_override = where.startswith("override '")
        if current in (None, name) or is_override or not isinstance(layer.get("model"), DictConfig):
            continue
        written_for = registry.config_class(str(current))
        if written_for is None:
            continue  # reported when the layer is merged
        for key in [k for k in layer.model if k not in final]:
            if key in model_keys(written_for):
                del layer.model[key]
    return str(name), source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, a preset YAML and dotted ``key=value`` overrides.

    ``model.name`` (the last layer that sets it; else the registry's default model) selects
    the model's config class, whose fields are the valid ``model.<key>`` names.

    Raises:
        ConfigError: file missing or unparsable, unknown key (the message lists the valid keys
            of the section, of the chosen model for ``model.*``, and names the models a
            foreign model key belongs to), wrong type, or a value outside the allowed choices.
    """
    layers = _read_yaml(Path(path)) if path is not None else []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        layers.append((OmegaConf.from_dotlist([item]), f"override '{item}'"))
    name, source = _resolve_model(layers)
    cfg = _schema(name, source)
    for layer, where in layers:
        cfg = _merge(cfg, layer, where, name)
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check choice-valued fields and ranges of every section; the model's own keys by its
    config's :meth:`ModelConfig.validate`. Raises ConfigError naming the key."""
    for section in (config.train, config.eval):
        if section.precision in ("no", "False", "false"):  # accelerate's "no"; YAML's `no` is false
            section.precision = "fp32"
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        check_choice(key, getattr(getattr(config, section), name), allowed)
    if config.data.corpus is None and config.data.train_path is None:
        raise ConfigError("data.corpus is null, so data.train_path must be set")
    check_at_least(config.train, "train", ("batch_size",), 1)
    check_at_least(config.eval, "eval", ("iw_samples",), 1)
    check_at_least(config.data, "data", ("context_window",), 1)
    check_at_least(config.kl, "kl", ("target", "target_weight", "cycle_epochs"), 0)
    k = config.kl
    if k.cycle_epochs > 0 and k.schedule != "cyclical":
        raise ConfigError(
            f"kl.cycle_epochs sets the period of the cyclical schedule, but "
            f"kl.schedule={k.schedule!r}; set kl.schedule=cyclical or cycle_epochs=0"
        )
    for keys in registry.REMEDY_KEYS.values():  # each remedy checks its own keys
        try:
            keys.validate(config)
        except ValueError as err:  # textvae.remedy_keys is a leaf: it raises ValueError
            raise ConfigError(str(err)) from None
    _validate_against_model(config)
    config.model.validate(config)


def _validate_against_model(config: Config) -> None:
    """The KL options that need something of the model class (a latent variable, layer-wise
    latents): read from its attributes, never its name. (The remedies' keys are checked by
    their own ``validate``, :mod:`textvae.remedy_keys`.)"""
    m, k = config.model, config.kl
    model = registry.MODELS[m.name]
    if not model.has_latent and k.target > 0:
        raise ConfigError(
            f"model.name={m.name!r} has no latent variable, so kl.target cannot be used; "
            "set it to 0"
        )
    if k.free_bits_mode == "per_layer" and not getattr(model, "layerwise_latent", False):
        raise ConfigError(
            f"kl.free_bits_mode=per_layer: model.name={m.name!r} has one latent "
            "layer; per_layer is for layer-wise latents (use per_dim or total)"
        )


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the ``model`` section: the chosen model's keys)."""
    OmegaConf.save(OmegaConf.structured(config), str(path))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a dict (a run folder's ``config.yaml``), checking keys.

    Run folders written before per-model configs keep loading: their ``model`` section held
    every model's keys, so keys of :data:`LEGACY_MODEL_KEYS` that the chosen model does not
    declare are dropped (that model never read them), and the model's ``renamed_keys`` are
    applied (e.g. ``hidden_dim`` -> ``bow_hidden`` for ``t5_vae`` and ``della``, where it only
    ever meant the bag-of-words head's width).

    Raises:
        ConfigError: an unknown key or value, as :func:`load_config`.
    """
    data = copy.deepcopy(data)
    model = data.get("model") or {}
    name = model.get("name")
    if name is None:
        try:
            name = registry.default_model()
        except LookupError as err:
            raise ConfigError(str(err)) from None
    cls = _config_class(name, "config")
    declared = set(model_keys(cls))
    for old, new in cls.renamed_keys.items():
        if old in model and new not in model:
            model[new] = model.pop(old)
    for key in [k for k in model if k not in declared and k in LEGACY_MODEL_KEYS]:
        del model[key]
    cfg = _merge(_schema(name, "config"), OmegaConf.create(data), "config", name)
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config
