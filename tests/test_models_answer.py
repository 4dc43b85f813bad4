"""Models answer for themselves: what a module outside ``textvae/models/`` needs to know about a
model (its description, latent shape, the labels it trains on) comes from the model class or its
config, never from comparing with a model's name or reading a key only some models declare."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import textvae
from tests.conftest import TINY_GPT2, TINY_T5, for_model
from textvae.config import load_config
from textvae.models import MODELS

PACKAGE = Path(textvae.__file__).parent
# to be removed when sweep.py/train.py use the model API (describe, latent_shape_of,
# trains_on_labels / label_fraction): (file, line's offence) -> how many times it occurs
ALLOWED: dict[tuple[str, str], int] = {}  # every module outside models/ asks the model
# config.py defines ModelConfig.backbone (the key every model config has) and checks it
OWNERS = {("config.py", "attribute backbone"): 2}


def model_specific_keys() -> set[str]:
    """The config keys only some registered models declare, and ``backbone`` (a model family)."""
    keys = [{f.name for f in dataclasses.fields(c.config_class)} for c in MODELS.values()]
    return (set.union(*keys) - set.intersection(*keys)) | {"backbone"}


def _names(node: ast.AST) -> list[str]:
    """The string constants of an expression or of a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [v for e in node.elts for v in _names(e)]
    return []


def offences(source: str, models: set[str], keys: set[str]) -> list[str]:
    """What ``source`` does that only a model should: compares with a model name (``==``,
    ``in``, ``startswith``/``endswith`` of a prefix/suffix of one), reads a model-specific
    key as an attribute (not of ``self``), a ``getattr``/``hasattr`` string or a subscript."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                found += [f"model name {v!r}" for v in _names(part) if v in models]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and node.args:
                edge = str.startswith if node.func.attr == "startswith" else str.endswith
                found += [
                    f"model name {v!r}"
                    for v in _names(node.args[0])
                    if len(v) > 1 and any(edge(m, v) for m in models)
                ]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1:
                found += [f"getattr {v!r}" for v in _names(node.args[1]) if v in keys]
        elif isinstance(node, ast.Attribute) and node.attr in keys:
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"attribute {node.attr}")
        elif isinstance(node, ast.Subscript):
            found += [f"subscript {v!r}" for v in _names(node.slice) if v in keys]
    return found


def test_no_module_outside_models_names_a_model_or_reads_its_keys():
    models, keys = set(MODELS), model_specific_keys()
    assert {"t5_d_model", "gpt2_n_layer", "fusion", "kl_reduction", "classifier_weight"} <= keys
    counts: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "models" in path.relative_to(PACKAGE).parts:
            continue
        for offence in offences(path.read_text(), models, keys):
            where = (str(path.relative_to(PACKAGE)), offence)
            counts[where] = counts.get(where, 0) + 1
    allowed = {**ALLOWED, **OWNERS}
    unexpected = {w: n for w, n in counts.items() if n > allowed.get(w, 0)}
    assert not unexpected, (
        "ask the model class or its config instead (TextVAE.describe, latent_shape_of, "
        f"trains_on_labels, label_fraction): {unexpected}"
    )
    stale = {w: n for w, n in allowed.items() if counts.get(w, 0) < n}
    assert not stale, f"an allowed offence is gone: shrink ALLOWED/OWNERS {stale}"


@pytest.mark.parametrize(
    "code",
    [
        'if cfg.model.name == "della": pass',
        'x = name in ("t5_vae", "lstm_lm")',
        'x = str(name).startswith("della")',
        "x = cfg.model.t5_d_model",
        'x = getattr(cfg.model, "classifier_weight", 0.0)',
        'x = cfg["model"]["fusion"]',
        'x = model.backbone == "t5"',
    ],
)
def test_the_checker_catches_a_planted_offence(tmp_path, code):
    planted = tmp_path / "planted.py"
    planted.write_text(code + "\n")
    assert offences(planted.read_text(), set(MODELS), model_specific_keys())


def test_the_checker_leaves_a_models_own_attributes_and_other_strings_alone():
    code = 'self.pooling = 1\nok = url.startswith("sqlite") or name == "ptb"\n'
    assert not offences(code, set(MODELS), model_specific_keys())


def _tiny_config(name: str, **extra):
    sizes = ["model.embed_dim=16", "model.hidden_dim=16", "model.latent_dim=4"]
    sizes += ["model.bow_hidden=16", *TINY_T5, *TINY_GPT2]
    items = [f"model.name={name}", *for_model(name, sizes)]
    return load_config(None, items + [f"model.{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_models_config_gives_its_latent_shape_labels_and_description(name, tokenizer):
    config = _tiny_config(name).model
    cls = MODELS[name]
    model = cls(config, tokenizer)
    assert cls.latent_shape_of(config) == (tuple(model.latent_shape) if model.has_latent else ())
    assert cls.trains_on_labels(config) is False and cls.label_fraction(config) == 0.0
    assert model.describe(config)


def test_della_latent_shape_follows_its_latent_layers_and_fusion():
    della = MODELS["della"]
    assert della.latent_shape_of(_tiny_config("della", latent_layers="0..0").model) == (1, 4)
    assert della.latent_shape_of(_tiny_config("della", fusion="memory").model) == (1, 4)
    pretrained = dataclasses.replace(_tiny_config("della").model, pretrained="gpt2")
    assert della.latent_shape_of(pretrained) == (None, 4)  # its layers: the pretrained's


def test_a_classifier_on_z_trains_on_its_fraction_of_labels():
    config = _tiny_config("lstm_vae", classifier_weight=1.0, classifier_label_fraction=0.25).model
    assert MODELS["lstm_vae"].trains_on_labels(config)
    assert MODELS["lstm_vae"].label_fraction(config) == 0.25


def test_model_configs_check_no_training_keys():
    """What a remedy may do with a model is the model class's to say (``supports_aggressive``,
    ``ae_decoder_reset``) and the remedy's keys class's to check (textvae.remedy_keys): no
    model file reads the ``train`` section."""
    models = Path(textvae.__file__).parent / "models"
    readers = sorted(
        f"{p.name}:{node.lineno}"
        for p in models.glob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "train"
    )
    assert readers == []
