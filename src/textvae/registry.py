"""The registries: ``model.name`` -> the model class and its config class; ``data.corpus`` -> the
corpus spec; a remedy's name -> its class and its config keys.

A leaf module (it imports nothing of textvae at import time), so that :mod:`textvae.config`
and every model module can use it without an import cycle. A model module registers itself
with the :func:`register_model` decorator::

    @register_model("lstm_vae", LSTMVAEConfig)
    class LSTMVAE(TextVAE): ...

and is found by :func:`discover`, which imports every module of the ``textvae.models``
package (``pkgutil``), so a new model is one new file in ``src/textvae/models/`` and no list
elsewhere is edited. The dependency runs one way: model modules import :mod:`textvae.config`
(its base :class:`~textvae.config.ModelConfig` and ``ConfigError``) and this module; the config
loader asks this module for a name's config class, and this module imports the model package
by name only when a lookup needs it (plugin discovery), never at import time.

A remedy registers its class (:func:`register_remedy`) and, apart from it, its config keys
(:func:`register_remedy_keys`; the built-in remedies' in the leaf module
:mod:`textvae.remedy_keys`): the config reads only :data:`REMEDY_KEYS`, and only training
imports the remedies themselves (:func:`discover_remedies`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

MODELS: dict[str, Any] = {}  # name -> model class (a textvae.models.base.TextVAE subclass)
MODEL_PACKAGE = "textvae.models"
_default: list[str] = []  # the name registered with default=True (at most one)


def register_model(name: str, config_class: type, default: bool = False) -> Callable[[type], type]:
    """Class decorator: make ``cls`` the model of ``model.name=name``, configured by
    ``config_class`` (a dataclass subclassing :class:`textvae.config.ModelConfig`).

    Sets ``cls.config_class``. ``default=True`` marks the model a config without
    ``model.name`` builds (one model only).

    Raises:
        ValueError: another class is already registered under ``name``, or a second default.
    """

    def add(cls: type) -> type:
        if MODELS.get(name, cls) is not cls:
            raise ValueError(f"model name {name!r} is registered twice ({MODELS[name]}, {cls})")
        if default and _default and _default[0] != name:
            raise ValueError(f"two default models: {_default[0]!r} and {name!r}")
        cls.config_class = config_class
        MODELS[name] = cls
        if default and not _default:
            _default.append(name)
        return cls

    return add


def unregister_model(name: str) -> None:
    """Remove ``name`` from the registry (for tests that register a model of their own)."""
    MODELS.pop(name, None)
    if _default and _default[0] == name:
        _default.clear()


def discover() -> dict[str, Any]:
    """Import every module of the ``textvae.models`` package (its ``__path__``, so a module
    added there is found) and return :data:`MODELS`."""
    package = importlib.import_module(MODEL_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{MODEL_PACKAGE}.{info.name}")
    return MODELS


def config_class(name: str) -> type | None:
    """The config class of ``model.name=name``, or None when no model has that name."""
    cls = discover().get(name)
    return None if cls is None else cls.config_class


def default_model() -> str:
    """The name a config without ``model.name`` uses (registered with ``default=True``).

    Raises:
        LookupError: no model was registered as the default.
    """
    discover()
    if not _default:
        raise LookupError("no model is registered with default=True; set model.name")
    return _default[0]


# --- corpora ---------------------------------------------------------------------------------

CORPORA: dict[str, Any] = {}  # data.corpus name -> textvae.data.CorpusSpec
CORPUS_MODULE = "textvae.corpora"


def register_corpus(spec: Any) -> Any:
    """Make ``spec`` (a :class:`textvae.data.CorpusSpec`) the corpus of ``data.corpus=spec.name``
    and return it (so a module may write ``PTB = register_corpus(CorpusSpec(...))``).

    Raises:
        ValueError: another spec is already registered under that name.
    """
    if CORPORA.get(spec.name, spec) is not spec:
        raise ValueError(f"corpus name {spec.name!r} is registered twice")
    CORPORA[spec.name] = spec
    return spec


def unregister_corpus(name: str) -> None:
    """Remove ``name`` from the corpus registry (for tests that register a corpus of their own)."""
    CORPORA.pop(name, None)


def discover_corpora() -> dict[str, Any]:
    """Import :data:`CORPUS_MODULE` (the named corpora shipped with textvae register themselves
    there) and return :data:`CORPORA`."""
    importlib.import_module(CORPUS_MODULE)
    return CORPORA


# --- training-schedule remedies --------------------------------------------------------------

REMEDIES: dict[str, Any] = {}  # name -> remedy class (a textvae.remedies.Remedy subclass)
REMEDY_MODULE = "textvae.remedies"
# name -> the remedy's keys dataclass (a textvae.remedy_keys.RemedyKeys subclass)
REMEDY_KEYS: dict[str, type] = {}


def register_remedy_keys(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` (a :class:`textvae.remedy_keys.RemedyKeys` dataclass) the
    config keys of the remedy ``name``. The built-in remedies' keys are registered in the leaf
    module :mod:`textvae.remedy_keys`, so that a config is loaded without the remedies
    themselves; :func:`register_remedy` registers a remedy's ``keys`` too.

    Raises:
        ValueError: other keys are already registered under ``name``.
    """

    def add(cls: type) -> type:
        if REMEDY_KEYS.get(name, cls) is not cls:
            raise ValueError(
                f"remedy {name!r} has two keys classes ({REMEDY_KEYS[name].__name__}, "
                f"{cls.__name__})"
            )
        REMEDY_KEYS[name] = cls
        return cls

    return add


def register_remedy(name: str) -> Callable[[type], type]:
    """Class decorator: register ``cls`` (a :class:`textvae.remedies.Remedy` subclass) as the
    remedy ``name``; sets ``cls.name``, and registers its ``keys`` (when not None) as
    :func:`register_remedy_keys` does. The training loop builds every registered remedy that
    is enabled by the config and calls its hooks in registration order.

    Raises:
        ValueError: another class is already registered under ``name``, or other keys.
    """

    def add(cls: type) -> type:
        if REMEDIES.get(name, cls) is not cls:
            raise ValueError(f"remedy name {name!r} is registered twice ({REMEDIES[name]}, {cls})")
        if cls.keys is not None:
            register_remedy_keys(name)(cls.keys)
        cls.name = name
        REMEDIES[name] = cls
        return cls

    return add


def unregister_remedy(name: str) -> None:
    """Remove ``name`` and its keys from the remedy registry (for tests that register a remedy
    of their own)."""
    REMEDIES.pop(name, None)
    REMEDY_KEYS.pop(name, None)


def discover_remedies() -> dict[str, Any]:
    """Import :data:`REMEDY_MODULE` (the built-in remedies register themselves there) and
    return :data:`REMEDIES`. Only training needs them; a config needs only :data:`REMEDY_KEYS`."""
    importlib.import_module(REMEDY_MODULE)
    return REMEDIES
