"""The models: one module per model, each holding its config dataclass and its model class,
registered by :func:`textvae.registry.register_model`.

``MODELS[name](model_config, tokenizer)`` builds a model; every module of this package is
imported here (``pkgutil``), so a new model is one new file in this folder and no list is
edited. :mod:`textvae.models.parts` holds the config pieces several models compose and
:mod:`textvae.models.base` what every model shares.
"""

from textvae.models.base import TextVAE
from textvae.registry import MODELS, discover

discover()

__all__ = ["MODELS", "TextVAE"]
