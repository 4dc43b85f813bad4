"""The config keys of the training-schedule remedies, with their checks: a leaf module (it imports
only :mod:`textvae.registry`, itself a leaf), so that loading a config never imports the
training machinery (:mod:`textvae.remedies`, the models' training code, the objective).

Each remedy's keys are one dataclass subclassing :class:`RemedyKeys`, registered under the
remedy's name with :func:`textvae.registry.register_remedy_keys` (the remedy class in
:mod:`textvae.remedies` names the same dataclass as its ``keys``). :func:`textvae.config.section_class`
composes the registered dataclasses into their section (``train`` or ``kl``), so every key is
``train.<key>`` in presets, overrides and ``config.yaml``, and :func:`textvae.config.validate` calls
each one's :meth:`RemedyKeys.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from textvae.registry import MODELS, register_remedy_keys


@dataclass
class RemedyKeys:
    """Base of a remedy's keys dataclass: no keys of its own.

    Class attributes:
        section: the config section the keys join: ``train`` (default) or ``kl``.
    """

    section: ClassVar[str] = "train"

    @classmethod
    def validate(cls, config: Any) -> None:
        """Check the keys in ``config`` (a :class:`textvae.config.Config`), and how they combine
        with the other sections and the model class (``textvae.registry.MODELS``; read its
        attributes, never its name).

        Raises:
            ValueError: naming the key (:func:`textvae.config.validate` raises it as a
                ``ConfigError``).
        """


def _at_least(section: Any, keys: tuple[str, ...], low: int) -> None:
    for key in keys:
        if getattr(section, key) < low:
            raise ValueError(f"train.{key} must be >= {low}")


def _needs_latent(config: Any, key: str) -> None:
    name = config.model.name
    if not MODELS[name].has_latent:
        raise ValueError(
            f"model.name={name!r} has no latent variable, so {key} cannot be used; "
            "set it to 0/false"
        )


@register_remedy_keys("collapse_watch")
@dataclass
class CollapseWatchKeys(RemedyKeys):
    """The collapse watch's keys (``train.<key>``).

    Attributes:
        collapse_kl / collapse_z_gap: collapse thresholds in nats per sentence: a validation
            whose KL is below ``collapse_kl`` or whose z-usage gap is below ``collapse_z_gap``
            counts towards a posterior-collapse warning.
        collapse_patience: after this many such validations in a row, every further one
            writes a warning (progress output and ``log.jsonl``); 0 = never warn. Training
            is not stopped.
    """

    collapse_kl: float = 0.5
    collapse_z_gap: float = 0.5
    collapse_patience: int = 3


@register_remedy_keys("ae_pretraining")
@dataclass
class AEPretrainingKeys(RemedyKeys):
    """Autoencoder pretraining's keys (``train.<key>``; Li et al. 2019, Park & Lee 2021).

    Attributes:
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
        ae_start: the weights phase ``vae`` starts from: ``best`` (default; the phase-1
            weights of the best validation ``rec``, the argmin of the early-stopping criterion,
            kept in ``checkpoints/ae_best``; as Park & Lee 2021's early stopping; the last
            weights when no phase-1 validation happened) or ``last`` (the weights at the
            hand-off).
        ae_freeze_latent_projection: with ``ae_freeze_decoder``, also hold the latent-to-
            decoder projections (``t5_vae``: the memory and embedding maps of z) fixed in
            phase ``ae``, as Park & Lee 2021's released code does (it freezes every decoder-side
            parameter); the default lets them train (the paper's text freezes "the decoder").
    """

    ae_pretrain_steps: int = 0
    ae_reset_decoder: bool = True
    ae_patience: int = 0
    ae_freeze_decoder: bool = False
    ae_start: str = "best"
    ae_freeze_latent_projection: bool = False

    @classmethod
    def validate(cls, config: Any) -> None:
        t = config.train
        _at_least(t, ("ae_pretrain_steps", "ae_patience"), 0)
        if t.ae_start not in ("best", "last"):
            raise ValueError(f"train.ae_start={t.ae_start!r} is not one of best, last")
        if t.ae_patience > 0 and t.ae_pretrain_steps == 0:
            raise ValueError(
                "train.ae_patience needs an autoencoder phase: set "
                "train.ae_pretrain_steps > 0 (the phase's longest length)"
            )
        if t.ae_freeze_latent_projection and not t.ae_freeze_decoder:
            raise ValueError(
                "train.ae_freeze_latent_projection extends train.ae_freeze_decoder: set "
                "train.ae_freeze_decoder=true too"
            )
        if t.ae_freeze_decoder and t.ae_pretrain_steps == 0:
            raise ValueError(
                "train.ae_freeze_decoder needs an autoencoder phase: set train.ae_pretrain_steps > 0"
            )
        if t.ae_pretrain_steps > 0:
            _needs_latent(config, "train.ae_pretrain_steps")
        if t.ae_pretrain_steps > 0 and t.ae_reset_decoder:
            if not MODELS[config.model.name].ae_decoder_reset:
                raise ValueError(
                    f"train.ae_reset_decoder: model.name={config.model.name!r}'s VAE phase "
                    "starts from the autoencoder phase's weights (Park & Lee 2021; DELLA's "
                    "encoder is its decoder); set train.ae_reset_decoder=false"
                )
        if t.ae_freeze_decoder and not MODELS[config.model.name].decoder_modules:
            raise ValueError(
                f"train.ae_freeze_decoder: model.name={config.model.name!r} names no pretrained "
                "decoder to freeze (no decoder_modules); set it to false"
            )


@register_remedy_keys("aggressive")
@dataclass
class AggressiveTrainingKeys(RemedyKeys):
    """Aggressive inference-network training's keys (``train.<key>``; He et al. 2019).

    Attributes:
        aggressive: before each decoder update, encoder-only updates on random training batches
            (their own optimizer, same settings) until the encoder's loss stops improving;
            switched off for good at the first validation whose MI is lower than the previous
            one's.
        aggressive_max_inner: at most this many encoder-only steps per decoder step (He et al.:
            100).
        aggressive_window: the inner loop stops when the per-token loss of the last
            ``aggressive_window`` inner steps is higher than that of the window before (He et
            al.'s released code: 15).
    """

    aggressive: bool = False
    aggressive_max_inner: int = 100
    aggressive_window: int = 15

    @classmethod
    def validate(cls, config: Any) -> None:
        t = config.train
        _at_least(t, ("aggressive_max_inner", "aggressive_window"), 1)
        if t.aggressive:
            _needs_latent(config, "train.aggressive")
            if not MODELS[config.model.name].supports_aggressive:
                raise ValueError(
                    f"model.name={config.model.name!r} does not support train.aggressive (the "
                    "LSTM options have no Transformer counterpart here); set it to false"
                )
