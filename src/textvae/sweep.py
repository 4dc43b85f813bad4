"""Sweeps: many runs from one YAML file, searched or gridded by Optuna (``textvae sweep``).

A sweep file names a base preset, optional named **entries** (each a preset and/or a list of
overrides: the rows of a fixed table), a search **space** over any config keys, the **budget**
of each trial, the **evaluation** that scores a trial and one or more **objectives** read from
the evaluation JSON. Every trial is an ordinary run folder, ``OUT/trial-NNNN[-entry]`` or, for a
table of entries without a space, ``OUT/<entry>`` (``textvae train --resume``, ``evaluate``,
``report`` and ``compare`` work on it) holding the evaluation
``<evaluation.output>.json`` and ``trial.json`` (its overrides and wall times). The study lives
in an Optuna RDB storage, by default ``sqlite:///OUT/study.db``, so running the same command
again continues it: finished trials are kept, a trial cut off mid-training resumes its run
folder (Optuna's heartbeat marks it stale after ``study.heartbeat_seconds`` x 2 and
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback` queues it again with the same
parameters; the retry keeps the original trial's number and therefore its folder). ``OUT/sweep.md``
lists every trial (settings, evaluation fields with units, wall times; the Pareto front marked)
and ``OUT/rate_distortion.png`` draws them on the rate-distortion plane
(:func:`textvae.report.plot_rate_distortion`).

The file, every key optional except ``base`` or ``entries``::

    name: remedy-search            # study name (default: the file's stem)
    out_dir: runs/remedy-search    # default sweep folder (relative to the working directory)
    base: ../configs/ptb/lstm-vae-cpu.yaml   # relative to the sweep file
    overrides: [train.progress=false]        # for every trial, after the preset
    entries:                       # named rows: a categorical parameter ``entry``
      lm: [model.name=lstm_lm]     # overrides on ``base``
      bn: {preset: ../configs/ptb/lstm-vae-bn-cpu.yaml, overrides: [...]}
    space:                         # parameters, applied after the entry's overrides
      kl.free_bits: {low: 0.0, high: 0.5}             # float
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      model.latent_dim: {type: int, low: 8, high: 64, step: 8}
      model.pooling: {choices: [last, mean, max]}     # categorical
      # model.word_dropout: {grid: [0.0, 0.2, 0.4]}   # a grid: then every parameter is one
    budget: {trials: 20, max_steps: 2000, minutes: 600}
    evaluation: {split: valid, max_sentences: 1000, iw_samples: 100, precision: bf16}
    objectives: {nll: minimize, mi: maximize}
    study: {sampler: auto, seed: 0, heartbeat_seconds: 30, pruner: none}

A sweep whose parameters are all grids (entries are always a grid) runs every combination once
with Optuna's ``GridSampler`` (trial i is grid point i); otherwise ``TPESampler`` (one objective)
or ``NSGAIISampler`` (several; generations of ``study.population_size``, by default a
quarter of ``budget.trials`` between 4 and 50: :func:`nsga2_population`) samples
``budget.trials`` trials. ``budget.minutes`` stops
starting new trials after that many minutes of this invocation. A null objective field (the
``mi`` of a language model, which has no latent) counts as the worst value (+inf for minimize,
-inf for maximize). ``study.pruner: median`` (one minimized objective) stops a trial whose
validation -ELBO at a validation is worse than the median of earlier trials' at the same step
(Optuna's ``MedianPruner`` after ``study.pruner_startup_trials``, default 5, finished trials).

SIGINT (Ctrl-C) or SIGTERM (``kill PID``, a scheduler) stops the trials in training after a
finished step, as ``textvae train`` does, worker processes included (:class:`_Relay`); the same
command resumes them.

Trials are scored on the validation split by default: select recipes on ``valid``, and use the
test split only for the final evaluation of the chosen ones (selecting on test overstates them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from textvae import fields
from textvae.config import Config, ConfigError, load_config
from textvae.rundir import CONFIG, checkpoint_path

log = logging.getLogger(__name__)

# What trains one trial: ``train(config, run_dir, resume=False, on_validation=None) -> run_dir``
# with the signature of :func:`textvae.train.train`, which the CLI passes in. The sweep never
# imports the training loop (it reads run folders, and the TrainingInterrupted that stops a
# worker a signal stopped, through :mod:`textvae.rundir`).
Trainer = Callable[..., Path]

SAMPLERS = ("auto", "grid", "tpe", "random", "nsga2")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # stop training after a finished step


class SweepError(ValueError):
    """A sweep file is invalid (the message names the file and the key), or a sweep folder
    belongs to another sweep."""


# The sweep file as written: dataclasses read by OmegaConf (OmegaConf.structured + merge, as
# textvae.config reads a run's config), so unknown keys and ill-typed values are rejected with
# the key's name; load_sweep checks what types cannot say and resolves them into a Sweep.


@dataclass
class ParamSpec:
    """One parameter of ``space`` as written: ``{low, high[, log, step, type: int]}`` (a float,
    or with ``type: int`` an int, range), ``{choices: [...]}`` (categorical) or ``{grid: [...]}``
    (every value tried). ``choices`` and ``grid`` are lists of any values (checked by
    :func:`_param`)."""

    type: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: Any = None
    grid: Any = None


@dataclass
class EntrySpec:
    """A named entry written as a mapping (an entry may also be a bare list of overrides):
    ``preset`` (relative to the sweep file; default the sweep's ``base``) and ``overrides`` (a
    list of ``config.key=value`` strings or a mapping ``config.key: value``)."""

    preset: str | None = None
    overrides: Any = None


@dataclass
class Budget:
    """``budget``: ``trials`` (a grid: its number of points, the default), ``max_steps`` or
    ``max_epochs`` per trial (else the preset's) and ``minutes`` (no trial starts after that
    many minutes of this invocation)."""

    trials: int | None = None
    max_steps: int | None = None
    max_epochs: int | None = None
    minutes: float | None = None


@dataclass
class Evaluation:
    """``evaluation``: how a trial is scored, as ``textvae evaluate``'s flags (null: the run
    config's ``eval`` setting, or all sentences); ``output`` is the JSON's stem, by default
    ``eval-<split>`` (filled in by :func:`load_sweep`)."""

    split: str = "valid"
    max_sentences: int | None = None
    iw_samples: int | None = None
    precision: str | None = None
    au_delta: float | None = None
    batch_size: int | None = None
    seed: int | None = 0
    checkpoint: str = "best"
    output: str | None = None
    generation: bool = False
    gen_sentences: int = 1000
    gen_samples: int = 500
    gen_responses: int = 5
    skip_too_long: bool = False
    flow_mi_sentences: int | None = None


@dataclass
class Study:
    """``study``: the Optuna sampler (``auto``: grid, TPE or NSGA-II), its seed, the heartbeat
    that finds dead trials, the pruner (``none`` or ``median``) and NSGA-II's generation size
    (default :func:`nsga2_population`)."""

    sampler: str = "auto"
    seed: int = 0
    heartbeat_seconds: int = 30
    pruner: str = "none"
    pruner_startup_trials: int = 5
    population_size: int | None = None


@dataclass
class SweepFile:
    """A sweep file's keys (the module docstring shows one). A section given as null is absent.
    ``entries`` maps a name to a list of overrides or an :class:`EntrySpec` mapping; an empty
    ``objectives`` means ``{nll: minimize}``."""

    name: str | None = None
    out_dir: str | None = None
    base: str | None = None
    overrides: Any = None
    entries: dict[Any, Any] = field(default_factory=dict)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    evaluation: Evaluation = field(default_factory=Evaluation)
    objectives: dict[str, str] = field(default_factory=dict)
    study: Study = field(default_factory=Study)


MAPPINGS = {  # what a section that is not a mapping should have been
    "entries": "of entry names to override lists or {preset, overrides}",
    "space": "of config keys to parameter specs",
    "objectives": "field: minimize|maximize",
    "budget": "with keys " + ", ".join(f.name for f in dataclasses.fields(Budget)),
    "evaluation": "with keys " + ", ".join(f.name for f in dataclasses.fields(Evaluation)),
    "study": "with keys " + ", ".join(f.name for f in dataclasses.fields(Study)),
}
PARAM_SHAPES = "{low, high[, log, step, type: int]}, {choices: [...]} or {grid: [...]}"
CHOICES = {  # the choice-valued keys of a sweep file (None: the key may be null)
    "evaluation.split": ("train", "valid", "test"),
    "evaluation.checkpoint": ("best", "last"),
    "evaluation.precision": (None, "fp32", "bf16"),
    "study.sampler": SAMPLERS,
    "study.pruner": ("none", "median"),
}
AT_LEAST = {  # the integer keys with a lower bound (null passes)
    "study.heartbeat_seconds": 1,
    "study.pruner_startup_trials": 0,
    "study.population_size": 2,
}


@dataclass
class Param:
    """One searched config key: ``kind`` is ``float``, ``int``, ``categorical`` or ``grid``."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)


@dataclass
class Sweep:
    """A parsed, validated sweep file (:func:`load_sweep`): the :class:`SweepFile` resolved
    (presets as paths, the sampler and the number of trials chosen, the budget as overrides)."""

    path: Path
    name: str
    out_dir: Path | None
    base: Path | None
    overrides: list[str]
    entries: dict[str, tuple[Path | None, list[str]]]
    space: list[Param]
    trials: int
    budget: list[str]
    minutes: float | None
    evaluation: Evaluation
    objectives: dict[str, str]
    sampler: str
    seed: int
    heartbeat_seconds: int
    pruner: str
    pruner_startup_trials: int
    raw: dict
    population_size: int | None = None

    @property
    def is_grid(self) -> bool:
        return all(p.kind == "grid" for p in self.space)

    def grid(self) -> dict[str, list]:
        """Optuna's GridSampler search space: parameter name -> values (``entry`` first)."""
        out = {"entry": list(self.entries)} if self.entries else {}
        out.update({p.key: list(p.choices) for p in self.space})
        return out


def _err(path: Path, key: str, message: str) -> SweepError:
    return SweepError(f"{path}: '{key}': {message}")


def _structured(path: Path, schema: type, data: Any, prefix: str = "") -> Any:
    """``data`` merged into the dataclass ``schema`` by OmegaConf, as an instance of it.

    Raises:
        SweepError: an unknown key (the valid ones listed) or a value of the wrong type, named
            as ``prefix`` + its key.
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except (ConfigKeyError, ConfigAttributeError) as err:
        owner = err.object_type if dataclasses.is_dataclass(err.object_type) else schema
        valid = ", ".join(f.name for f in dataclasses.fields(owner))
        raise _err(path, prefix + str(err.full_key), f"unknown key; valid keys: {valid}") from None
    except OmegaConfBaseException as err:
        message = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
        raise _err(path, prefix + str(err.full_key), f"invalid value: {message}") from None


def _read(path: Path) -> tuple[DictConfig, SweepFile]:
    """The sweep file as OmegaConf read it, and as a :class:`SweepFile`.

    Raises:
        SweepError: a missing or unparsable file, a section of the wrong shape, an unknown
            key or an ill-typed value.
    """
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number in their text
        raise SweepError(f"{path}: cannot parse YAML: {err}") from None
    top = ", ".join(f.name for f in dataclasses.fields(SweepFile))
    if not isinstance(raw, DictConfig):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {top}")
    given = {key: value for key, value in raw.items() if value is not None}
    # OmegaConf's merge names no key when a list meets a mapping: those shapes are checked here
    for key, shape in MAPPINGS.items():
        if key in given and not isinstance(given[key], DictConfig):
            raise _err(path, key, f"expected a mapping {shape}")
    for key, spec in given.get("space", {}).items():
        if not isinstance(spec, DictConfig):
            raise _err(path, f"space.{key}", f"expected a mapping: {PARAM_SHAPES}")
    return raw, _structured(path, SweepFile, given)


def _overrides(path: Path, key: str, value: Any) -> list[str]:
    """A list of ``key=value`` strings, or a mapping ``{key: value}`` turned into one."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={_yaml_value(v)}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise _err(
            path,
            key,
            "expected a list of 'config.key=value' strings (or a mapping config.key: value)",
        )
    return list(value)


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _preset(path: Path, value: str, key: str) -> Path:
    """A preset named in the sweep file: ``value`` relative to the file's folder."""
    file = (path.resolve().parent / value).resolve()
    if not file.is_file():
        raise _err(path, key, f"preset not found: {file}")
    return file


def _entries(
    path: Path, specs: dict, base: Path | None
) -> dict[str, tuple[Path | None, list[str]]]:
    """The named entries: name -> (its preset or None for ``base``, its overrides)."""
    entries: dict[str, tuple[Path | None, list[str]]] = {}
    for name, spec in specs.items():
        key = f"entries.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
            raise _err(
                path, key, "an entry name is also a folder name: letters, digits, '.', '_', '-'"
            )
        if isinstance(spec, dict):
            entry: EntrySpec = _structured(path, EntrySpec, spec, f"{key}.")
            preset = _preset(path, entry.preset, f"{key}.preset") if entry.preset else None
            entries[str(name)] = (preset, _overrides(path, f"{key}.overrides", entry.overrides))
        else:
            entries[str(name)] = (None, _overrides(path, key, spec))
        if entries[str(name)][0] is None and base is None:
            raise _err(path, key, "no preset: give the sweep a 'base' or the entry a 'preset'")
    if base is None and not entries:
        raise _err(path, "base", "a sweep needs a base preset (or entries that name presets)")
    return entries


def _param(path: Path, key: str, spec: ParamSpec) -> Param:
    """One parameter of ``space``, its kind read from which fields ``spec`` has."""
    where = f"space.{key}"
    if spec.grid is not None or spec.type == "grid":
        if not isinstance(spec.grid, list) or not spec.grid:
            raise _err(path, where, "'grid' needs a non-empty list of values")
        return Param(key, "grid", choices=spec.grid)
    if spec.choices is not None or spec.type == "categorical":
        if not isinstance(spec.choices, list) or not spec.choices:
            raise _err(path, where, "'choices' needs a non-empty list of values")
        return Param(key, "categorical", choices=spec.choices)
    kind = spec.type or "float"
    if kind not in ("float", "int"):
        raise _err(path, where, f"type '{kind}' is not one of float, int, categorical, grid")
    low, high = spec.low, spec.high
    if low is None or high is None:
        raise _err(path, where, "a float or int parameter needs 'low' and 'high'")
    if low > high:
        raise _err(path, where, f"low ({low:g}) is above high ({high:g})")
    if spec.log and low <= 0:
        raise _err(path, where, f"a log-scale parameter needs low > 0 (got {low:g})")
    if spec.log and spec.step is not None:
        raise _err(path, where, "'step' and 'log' cannot be combined (Optuna)")
    return Param(key, kind, low=low, high=high, log=spec.log, step=spec.step)


def _space(path: Path, specs: dict[str, ParamSpec]) -> list[Param]:
    """The parameters, in the file's order; either all grids or none."""
    space = [_param(path, key, spec) for key, spec in specs.items()]
    if len({p.kind == "grid" for p in space}) > 1:
        raise _err(
            path,
            "space",
            "mixes grid and sampled parameters; Optuna's GridSampler needs "
            "every parameter on the grid (give each one 'grid: [...]', or none)",
        )
    return space


def _objectives(path: Path, written: dict[str, str]) -> dict[str, str]:
    """Evaluation field -> ``minimize`` | ``maximize`` (default ``{nll: minimize}``)."""
    objectives = written or {"nll": "minimize"}
    for key, direction in objectives.items():
        if key not in fields.objective_fields():
            raise _err(
                path,
                f"objectives.{key}",
                f"not an evaluation field; choose from {', '.join(fields.objective_fields())}",
            )
        if direction not in ("minimize", "maximize"):
            raise _err(path, f"objectives.{key}", f"'{direction}' is not minimize or maximize")
    return dict(objectives)


def _check_values(path: Path, spec: SweepFile) -> None:
    """The choice-valued keys (:data:`CHOICES`), the bounded ones (:data:`AT_LEAST`) and
    ``budget.minutes``."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(spec, section), name)
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise _err(path, key, f"'{value}' is not one of {names}")
    for key, low in AT_LEAST.items():
        section, name = key.split(".")
        value = getattr(getattr(spec, section), name)
        if value is not None and value < low:
            raise _err(path, key, f"must be an integer >= {low} (got {value})")
    minutes = spec.budget.minutes
    if minutes is not None and minutes <= 0:
        raise _err(
            path, "budget.minutes", f"must be a positive number of minutes (got {minutes:g})"
        )


def _budget(budget: Budget) -> list[str]:
    """The budget's overrides of each trial's config: ``train.max_steps`` / ``max_epochs``."""
    steps = {"max_steps": budget.max_steps, "max_epochs": budget.max_epochs}
    return [f"train.{key}={value}" for key, value in steps.items() if value is not None]


def _sampler_and_trials(
    path: Path, spec: SweepFile, n_grid: int, space: list[Param], objectives: dict[str, str]
) -> tuple[str, int]:
    """The sampler (``auto`` resolved) and the number of trials (a grid: its points)."""
    is_grid = all(p.kind == "grid" for p in space)
    sampler = spec.study.sampler
    if sampler == "auto":
        sampler = "grid" if is_grid else ("tpe" if len(objectives) == 1 else "nsga2")
    if sampler == "grid" and not is_grid:
        raise _err(path, "study.sampler", "grid needs every space parameter to be a 'grid'")
    if sampler != "grid" and space and is_grid:
        raise _err(
            path,
            "study.sampler",
            f"'{sampler}' cannot sample 'grid' parameters; use 'choices' for a sampled categorical",
        )
    trials = spec.budget.trials
    if sampler != "grid":
        if trials is None or trials < 1:
            raise _err(path, "budget.trials", "a sampled sweep needs a positive number of trials")
        return sampler, trials
    if trials is not None and trials != n_grid:
        raise _err(
            path,
            "budget.trials",
            f"the grid has {n_grid} points; leave 'trials' out or set it to {n_grid}",
        )
    return sampler, n_grid


def _check_pruner(path: Path, pruner: str, objectives: dict[str, str]) -> None:
    if pruner == "median" and list(objectives.values()) != ["minimize"]:
        raise _err(
            path,
            "study.pruner",
            "pruning compares the validation loss (-ELBO) of "
            "trials, so it needs exactly one objective, minimized (Optuna cannot prune "
            "multi-objective studies)",
        )


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every trial's config keys are checked against the
    config schema before anything runs (a grid: every trial's full config).

    The file is merged into :class:`SweepFile` by OmegaConf (unknown keys and types); then the
    presets must exist, the values lie in their ranges and choices, and the sampler and the
    number of trials are resolved.

    Raises:
        SweepError: unparsable YAML, an unknown or ill-typed key, an unknown config key in
            ``overrides``/``entries``/``space`` (the message names the file and the key).
    """
    path = Path(path)
    raw, spec = _read(path)
    base = _preset(path, spec.base, "base") if spec.base is not None else None
    entries = _entries(path, spec.entries, base)
    space = _space(path, spec.space)
    _check_values(path, spec)
    objectives = _objectives(path, spec.objectives)
    n_grid = math.prod(len(v) for v in [list(entries) or [None]] + [p.choices for p in space])
    sampler, trials = _sampler_and_trials(path, spec, n_grid, space, objectives)
    _check_pruner(path, spec.study.pruner, objectives)
    study, evaluation = spec.study, spec.evaluation
    evaluation.output = evaluation.output or f"eval-{evaluation.split}"
    population = study.population_size
    if population is None and sampler == "nsga2":
        population = nsga2_population(trials)
    sweep = Sweep(
        path=path,
        name=str(spec.name or path.stem),
        out_dir=Path(spec.out_dir) if spec.out_dir else None,
        base=base,
        overrides=_overrides(path, "overrides", spec.overrides),
        entries=entries,
        space=space,
        trials=trials,
        budget=_budget(spec.budget),
        minutes=spec.budget.minutes,
        evaluation=evaluation,
        objectives=objectives,
        sampler=sampler,
        seed=study.seed,
        heartbeat_seconds=study.heartbeat_seconds,
        pruner=study.pruner,
        pruner_startup_trials=study.pruner_startup_trials,
        raw=OmegaConf.to_container(raw),
        population_size=population,
    )
    _check_configs(sweep)
    return sweep


def _check_configs(sweep: Sweep) -> None:
    """Load the config of every entry with each parameter at its ends (every trial of a grid)."""
    import itertools

    names = list(sweep.entries) or [None]
    if sweep.is_grid:
        combos = [
            ("space", dict(zip([p.key for p in sweep.space], values, strict=True)))
            for values in itertools.product(*[p.choices for p in sweep.space])
        ]
    else:
        combos = []
        for p in sweep.space:
            ends = p.choices if p.kind == "categorical" else [p.low, p.high]
            combos += [(f"space.{p.key}", {p.key: _typed(p, v)}) for v in ends]
    combos = [("overrides", {})] + combos  # the preset and the fixed overrides first
    for name in names:
        for where, params in combos:
            preset, overrides = trial_overrides(sweep, name, params)
            try:
                load_config(preset, overrides)
            except ConfigError as err:
                if name is not None:
                    where = f"entries.{name}' with '{where}"
                raise SweepError(f"{sweep.path}: '{where}' (parameters {params}): {err}") from None


def _typed(p: Param, value):
    return int(value) if p.kind == "int" else value


def trial_overrides(sweep: Sweep, entry: str | None, params: dict) -> tuple[Path, list[str]]:
    """(preset, overrides) of one trial: the entry's preset (or the base), then the sweep's
    ``overrides``, the entry's overrides, the parameters and the budget, later ones winning."""
    preset, own = sweep.entries[entry] if entry is not None else (None, [])
    items = list(sweep.overrides) + list(own)
    items += [f"{k}={_yaml_value(v)}" for k, v in params.items() if k != "entry"]
    return preset or sweep.base, items + list(sweep.budget)


def trial_dir(sweep: Sweep, out_dir: Path, number: int, entry: str | None) -> Path:
    """The run folder of a trial: ``OUT/<entry>`` when the sweep is a table of entries alone
    (no space), else ``OUT/trial-NNNN[-entry]`` (a retried trial keeps its original number)."""
    if entry is not None and not sweep.space:
        return out_dir / entry
    return out_dir / (f"trial-{number:04d}" + (f"-{entry}" if entry else ""))


def _json(path: Path, record: dict) -> None:
    from textvae.atomic import write_json

    write_json(path, record)


def evaluate_run(run_dir: Path, evaluation: Evaluation) -> dict:
    """Evaluate a trial's run folder with the sweep's ``evaluation`` settings through the one
    evaluation API (:func:`textvae.evaluation.evaluate_run`, as ``textvae evaluate``); the JSON
    is ``RUN_DIR/<output>.json`` (the sweep reads it back by that name). Returns the record.

    Raises:
        FileExistsError: that JSON exists already (:func:`run_trial` reads it instead).
    """
    import dataclasses

    from textvae.evaluation import EvaluationRequest
    from textvae.evaluation import evaluate_run as evaluate_folder

    settings = dataclasses.asdict(evaluation)
    output = settings.pop("output")
    request = EvaluationRequest(**settings, output=Path(run_dir) / f"{output}.json")
    record, _ = evaluate_folder(run_dir, request)
    return record


def usable_dir(run_dir: Path) -> Path:
    """``run_dir`` if it is missing, empty, finished or resumable; otherwise the first of
    ``run_dir.2``, ``run_dir.3``, ... that is (a folder cut off before its first checkpoint
    cannot be resumed and is never overwritten)."""
    candidate, n = run_dir, 1
    while (
        candidate.is_dir()
        and any(candidate.iterdir())
        and not (candidate / "trial.json").is_file()
        and not checkpoint_path(candidate, "last").is_dir()
    ):
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}.{n}")
    return candidate


def run_trial(
    sweep: Sweep,
    run_dir: Path,
    entry: str | None,
    params: dict,
    on_validation: Callable[[dict], None] | None = None,
    *,
    train: Trainer,
) -> dict:
    """Train (or resume) and evaluate one trial's run folder; returns ``trial.json``'s record
    plus ``eval`` (the evaluation dict).

    A folder with ``trial.json`` and the evaluation file is reused as it is; one with a
    ``checkpoints/last`` but no ``trial.json`` is resumed (``train(resume=True)``); an empty or
    missing one is trained from scratch (call :func:`usable_dir` first) by ``train``
    (:data:`Trainer`), which gets ``on_validation`` (pruning).

    Raises:
        whatever training and evaluation raise (``TrainingDiverged``, ``DataError``, ...).
    """
    import json

    record_path = run_dir / "trial.json"
    eval_path = run_dir / f"{sweep.evaluation.output}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is None:
        preset, overrides = trial_overrides(sweep, entry, params)
        resumed = checkpoint_path(run_dir, "last").is_dir()
        start = time.perf_counter()
        if resumed:
            log.info("trial folder %s: resuming its training", run_dir)
            train(None, run_dir, resume=True, on_validation=on_validation)
        else:
            train(load_config(preset, overrides), run_dir, on_validation=on_validation)
        record = {
            "entry": entry,
            "params": params,
            "preset": str(preset),
            "overrides": overrides,
            "train_s": time.perf_counter() - start,
            "resumed": resumed,
        }
        _json(record_path, record)
    if eval_path.is_file():
        result = json.loads(eval_path.read_text())
    else:
        result = evaluate_run(run_dir, sweep.evaluation)
    record["eval_s"] = result.get("seconds")
    return record | {"eval": result}


def storage_url(sweep: Sweep, out_dir: Path, storage: str | None) -> str:
    """The Optuna RDB URL of the study: ``storage`` when given (``--storage``, e.g.
    ``postgresql://user:password@host/db``), else the SQLite file ``OUT/study.db`` (absolute, so
    worker processes started elsewhere open the same file)."""
    return storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def _storage(sweep: Sweep, url: str):
    import optuna
    from optuna.storages import RDBStorage

    # optuna >= 4.9 names the stale-trial callback RetryHeartbeatStaleTrialCallback (passed as
    # heartbeat_stale_trial_callback); earlier 4.x: RetryFailedTrialCallback, failed_trial_callback
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    keyword = "heartbeat_stale_trial_callback"
    if retry is None:
        retry, keyword = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    with warnings.catch_warnings():  # the heartbeat API is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=sweep.heartbeat_seconds,
            grace_period=2 * sweep.heartbeat_seconds,
            **{keyword: retry(max_retry=None)},
            engine_kwargs={"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None,
        )


def nsga2_population(trials: int) -> int:
    """NSGA-II's generation size for a budget of ``trials``: a quarter of the budget, between 4
    and Optuna's default of 50. Optuna's default alone draws its first generation of 50 at
    random, so a sweep of fewer than 50 trials would be a random search that never selects
    (the 16-trial remedy search of docs/results/recipes.md ran that way); with a quarter, a
    16-trial sweep has four generations of four."""
    return max(4, min(50, trials // 4))


def _population(sweep: Sweep) -> str:
    """`` (population N)`` for an NSGA-II sweep's summary line, else nothing."""
    return f" (population {sweep.population_size})" if sweep.sampler == "nsga2" else ""


def _sampler(sweep: Sweep, seed: int):
    import optuna

    if sweep.sampler == "grid":
        # GridSampler shuffles its grid with the seed and gives trial i grid point i: every
        # worker and invocation must use the same seed, or points would repeat
        return optuna.samplers.GridSampler(sweep.grid(), seed=sweep.seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=sweep.population_size)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(sweep: Sweep, url: str, seed: int | None = None):
    """Create the sweep's Optuna study in ``url``, or load it (``load_if_exists``)."""
    import optuna

    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials)
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    from sqlalchemy.exc import SQLAlchemyError

    # Workers started at the same moment on a fresh database (two machines, one --storage URL)
    # race to create its tables and the study: the loser gets an IntegrityError or a locked
    # database; by its next attempt the winner has made them, and it loads them.
    for attempt in range(8):
        try:
            return optuna.create_study(
                storage=_storage(sweep, url),
                study_name=sweep.name,
                load_if_exists=True,
                directions=list(sweep.objectives.values()),
                pruner=pruner,
                sampler=_sampler(sweep, sweep.seed if seed is None else seed),
            )
        except (SQLAlchemyError, optuna.exceptions.DuplicatedStudyError):
            if attempt == 7:
                raise
            time.sleep(0.5 * (attempt + 1))


class _Overflow(Exception):
    """A trial asked for after the budget was used up (a race between workers): not run."""


def _identity(trial) -> int:
    """A trial's own number, or the original's for a retry of a stale (dead) trial."""
    original = trial.system_attrs.get("failed_trial")
    return trial.number if original is None else int(original)


def _overflows(sweep: Sweep, trial, trials) -> bool:
    """Whether a new (not retried) trial is beyond the budget: the trials numbered below it
    already hold ``sweep.trials`` identities, or (a grid) one of them holds its grid point.
    Trial numbers are given out atomically by the storage, so two workers never both pass."""
    lower = [t for t in trials if t.number < trial.number and not t.user_attrs.get("overflow")]
    if len({_identity(t) for t in lower}) >= sweep.trials:
        return True
    grid_id = trial.system_attrs.get("grid_id")
    return grid_id is not None and any(t.system_attrs.get("grid_id") == grid_id for t in lower)


def _slots(trials) -> tuple[set[int], bool, bool]:
    """(identities started, any WAITING, any RUNNING). A failed trial's identity counts as
    started: a stale one is queued again (WAITING) by the heartbeat callback, one that raised
    by :func:`retry_failed` at the next invocation."""
    from optuna.trial import TrialState

    used = {_identity(t) for t in trials if not t.user_attrs.get("overflow")}
    return (
        used,
        any(t.state == TrialState.WAITING for t in trials),
        any(t.state == TrialState.RUNNING for t in trials),
    )


def run_worker(
    sweep_path: str,
    out_dir: str,
    url: str,
    worker: int = 0,
    threads: int | None = None,
    deadline: float | None = None,
    *,
    train: Trainer,
) -> int:
    """One worker's loop: run trials of the study until its budget is used, then wait for
    running trials (its own peers' or dead ones that the heartbeat will queue again). A trial
    stopped by SIGINT/SIGTERM ends the loop: it is recorded failed, with ``checkpoints/last``
    at its last finished step, and the next invocation resumes it.

    Returns:
        The number of trials this worker ran.

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM stopped a trial's training.
        KeyboardInterrupt: SIGINT (or, in a worker process, SIGTERM) outside training.
    """
    import optuna
    import torch
    from optuna.storages import fail_stale_trials

    if threads is not None:
        torch.set_num_threads(threads)
    sweep, out = load_sweep(sweep_path), Path(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ran, stopped = 0, []
    while deadline is None or time.time() < deadline:
        study = open_study(sweep, url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        used, waiting, running = _slots(trials)
        if len(used) >= sweep.trials and not waiting:
            if not running:
                break
            time.sleep(min(5.0, sweep.heartbeat_seconds))  # peers' trials, or dead ones
            continue
        # a sampler seed of its own for every trial, worker and invocation: a re-run must not
        # replay the random draws of the trials it already has (a grid keeps its one seed)
        study = open_study(sweep, url, seed=sweep.seed + 1000 * worker + len(trials))
        study.optimize(
            functools.partial(_objective, study, sweep, out, train, stopped),
            n_trials=1,
            catch=(Exception,),
        )
        ran += 1
        if stopped:  # SIGINT/SIGTERM: no further trial
            raise stopped[0]
    return ran


def _objective(
    study, sweep: Sweep, out: Path, train: Trainer, stopped: list[BaseException], trial
) -> list[float]:
    """Optuna's objective for one trial of :func:`run_worker`: train and evaluate its run folder
    and return the objective values; a trial beyond the budget is refused (:class:`_Overflow`).
    A trial that raised is recorded (:func:`_record_failure`) and, when a signal stopped it,
    its error appended to ``stopped``."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == trial.number)
    number = _identity(frozen)
    if frozen.system_attrs.get("failed_trial") is None and _overflows(sweep, frozen, trials):
        trial.set_user_attr("overflow", True)
        raise _Overflow(f"trial {number}: the budget of {sweep.trials} trials is used")
    entry, params = _suggest(trial, sweep)
    run_dir = usable_dir(trial_dir(sweep, out, number, entry))
    trial.set_user_attr("run_dir", run_dir.name)
    # which worker ran it: with a shared RDB study, workers on several machines each write
    # their run folders under their own --out-dir
    trial.set_user_attr("worker", f"{socket.gethostname()}:{out.resolve()}")
    try:
        record = run_trial(sweep, run_dir, entry, params, _pruning(trial, sweep), train=train)
    except optuna.TrialPruned:
        raise
    except (Exception, KeyboardInterrupt) as err:  # the next invocation retries it
        if _record_failure(trial, number, run_dir, err):
            stopped.append(err)
        raise
    trial.set_user_attr("train_s", record["train_s"])
    trial.set_user_attr("eval_s", record["eval_s"])
    return _objective_values(sweep, record["eval"])


def _suggest(trial, sweep: Sweep) -> tuple[str | None, dict]:
    """The trial's entry (None without entries) and parameters, drawn from Optuna's trial."""
    entry = trial.suggest_categorical("entry", list(sweep.entries)) if sweep.entries else None
    params = {}
    for p in sweep.space:
        if p.kind in ("categorical", "grid"):
            params[p.key] = trial.suggest_categorical(p.key, p.choices)
        elif p.kind == "int":
            params[p.key] = trial.suggest_int(
                p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            params[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return entry, params


def _pruning(trial, sweep: Sweep) -> Callable[[dict], None]:
    """The ``on_validation`` callback of a trial's training: median pruning on the validation
    loss -ELBO (nats/sentence) at each validation (nothing when ``study.pruner`` is none).

    Raises (the callback):
        optuna.TrialPruned: the trial's -ELBO is above the median at this step.
    """
    import optuna

    def report(record: dict) -> None:
        if record.get("elbo") is None or sweep.pruner == "none":
            return
        trial.report(-record["elbo"], record["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"step {record['step']}: validation -ELBO {-record['elbo']:.2f} is above the median"
            )

    return report


def _objective_values(sweep: Sweep, result: dict) -> list[float]:
    """The objectives read from an evaluation; a null field counts as the worst value."""
    values = []
    for key, direction in sweep.objectives.items():
        value = result.get(key)
        worst = math.inf if direction == "minimize" else -math.inf
        values.append(worst if value is None else float(value))
    return values


def _record_failure(trial, number: int, run_dir: Path, err: BaseException) -> bool:
    """Record why a trial failed (its ``error``, shown in ``sweep.md``; :func:`retry_failed`
    queues it again at the next invocation, which resumes its run folder).

    Returns:
        Whether a signal stopped it (training's :class:`~textvae.rundir.TrainingInterrupted`, or
        KeyboardInterrupt outside training): then the worker starts no further trial.
    """
    from textvae.rundir import TrainingInterrupted

    trial.set_user_attr("error", f"{type(err).__name__}: {err}")
    if not isinstance(err, TrainingInterrupted | KeyboardInterrupt):
        log.exception("trial %d (%s) failed", number, run_dir)
        return False
    log.warning("trial %d (%s) stopped: %s; run the sweep again to resume it", number, run_dir, err)
    return True


def retry_failed(study) -> list[int]:
    """Queue once more, with the same parameters, every trial whose last attempt raised (its
    ``error`` is kept in the failed attempt; the retry resumes the run folder when it can).

    Returns:
        The trial numbers (identities) queued.
    """
    import optuna
    from optuna.trial import TrialState

    latest = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.user_attrs.get("overflow"):
            latest[_identity(t)] = t
    queued = []
    for number, t in latest.items():
        if t.state == TrialState.FAIL and "error" in t.user_attrs:
            history = list(t.system_attrs.get("retry_history", [])) + [t.number]
            study.add_trial(
                optuna.create_trial(
                    state=TrialState.WAITING,
                    params=t.params,
                    distributions=t.distributions,
                    system_attrs={
                        **t.system_attrs,
                        "failed_trial": number,
                        "retry_history": history,
                    },
                )
            )
            queued.append(number)
    return queued


def _worker_main(
    sweep_path: str,
    out_dir: str,
    url: str,
    worker: int,
    threads: int,
    deadline: float | None,
    train: Trainer,
    signals: multiprocessing.connection.Connection,
) -> None:
    """A worker process of :func:`run_sweep`. SIGTERM stops it as SIGINT does (in training
    after a finished step, elsewhere as KeyboardInterrupt), and the number of every SIGINT or
    SIGTERM it receives is written to ``signals`` (a pipe to the parent, used as Python's signal
    wakeup fd: written when the signal arrives) for :class:`_Relay`.

    Raises:
        SystemExit: 128 + the signal's number when a signal stopped it (130 outside training).
    """
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.set_blocking(signals.fileno(), False)
    signal.set_wakeup_fd(signals.fileno(), warn_on_full_buffer=False)
    from textvae.rundir import TrainingInterrupted

    try:
        run_worker(sweep_path, out_dir, url, worker, threads, deadline, train=train)
    except TrainingInterrupted as stop:
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None


class _Relay:
    """While :func:`run_sweep`'s worker processes run, SIGINT and SIGTERM to this process are
    passed on to each worker that did not receive them itself, so that every worker stops as
    ``textvae train`` does (after a finished step, ``checkpoints/last`` written).

    Ctrl-C in a terminal, ``kill -- -PGID``, systemd or Slurm signal every process of the
    sweep; ``kill PID``, a container runtime or a parent process signal this one alone. Each
    worker reports the signals it receives as they arrive (:func:`_worker_main`), so the
    ``n``-th signal here is passed on, ``GRACE`` seconds after it came, only to a worker that
    has not had ``n``: a worker signalled twice would stop at once, without its checkpoint.
    """

    GRACE = 1.0  # seconds for a signal sent to the whole group to reach the workers

    def __init__(self, workers: list, reports: list):
        self.workers, self.reports = workers, reports
        self.received: list[tuple[int, float]] = []  # (signal, time.monotonic()) here
        self.reported = [0] * len(workers)  # signals each worker says it received
        self.had = [0] * len(workers)  # signals each worker received or was sent
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received.append((signum, time.monotonic()))

    def __enter__(self) -> _Relay:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def pass_on(self) -> None:
        """Count the workers' reported signals; send each worker the signals it lacks."""
        due = [s for s, at in self.received if time.monotonic() - at >= self.GRACE]
        for i, worker in enumerate(self.workers):
            with contextlib.suppress(BlockingIOError):  # nothing new
                data = os.read(self.reports[i].fileno(), 4096)
                self.reported[i] += sum(b in STOP_SIGNALS for b in data)
            self.had[i] = max(self.had[i], self.reported[i])
            if self.had[i] < len(due) and worker.is_alive():
                os.kill(worker.pid, due[self.had[i]])
                self.had[i] += 1


def run_sweep(
    sweep_path: str | Path,
    out_dir: str | Path | None = None,
    storage: str | None = None,
    jobs: int = 1,
    *,
    train: Trainer,
) -> tuple[Path, dict]:
    """Run (or continue) a sweep: ``jobs`` worker processes on this machine share the study,
    each with ``max(1, cores // jobs)`` torch threads; then write ``sweep.md`` and
    ``rate_distortion.png``.

    SIGINT or SIGTERM stops every trial in training after a finished step (``checkpoints/last``
    written; with ``jobs`` > 1 the signal is passed on to the workers that did not get it
    themselves, :class:`_Relay`) and records it failed; no further trial starts, and running
    the sweep again resumes those trials. The signal is then raised again for the caller's own
    handler (the CLI: KeyboardInterrupt, exit 130; SIGTERM's default, the process ends by it).

    Args:
        sweep_path: the sweep YAML.
        out_dir: the sweep folder (default: the file's ``out_dir``, else ``runs/sweep-<name>``).
        storage: an Optuna RDB URL (default ``sqlite:///OUT/study.db``); e.g.
            ``postgresql://user:password@host/db`` lets workers on several machines share the
            study (their run folders are written under their own ``out_dir``).
        jobs: worker processes on this machine (1: in this process).
        train: what trains a trial (:data:`Trainer`): ``textvae.train.train``, which the CLI
            passes; a module-level function, so that ``jobs`` > 1 worker processes can receive it.

    Returns:
        (sweep folder, :func:`write_summary`'s summary).

    Raises:
        SweepError: invalid file, or the folder holds another sweep's ``sweep.yaml``.
        RuntimeError: a worker process failed.
    """
    import optuna

    from textvae.rundir import TrainingInterrupted

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = load_sweep(sweep_path)
    out = Path(out_dir) if out_dir else (sweep.out_dir or Path("runs") / f"sweep-{sweep.name}")
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "sweep.yaml"
    resolved = OmegaConf.to_yaml(OmegaConf.create(sweep.raw))
    if saved.is_file() and saved.read_text() != resolved:
        raise SweepError(
            f"{out} holds a different sweep ({saved} differs from {sweep.path}); "
            "choose another --out-dir, or restore the sweep file"
        )
    if not saved.is_file():
        saved.write_text(resolved)
    url = storage_url(sweep, out, storage)
    retry_failed(open_study(sweep, url))  # created once here, so workers only load it
    deadline = time.time() + 60 * sweep.minutes if sweep.minutes else None
    if jobs <= 1:
        try:
            run_worker(str(sweep.path), str(out), url, 0, None, deadline, train=train)
        except TrainingInterrupted as stop:
            signal.raise_signal(stop.signum)  # the caller's handler: e.g. KeyboardInterrupt
    else:
        signum = _run_workers(sweep, out, url, jobs, deadline, train)
        if signum is not None:
            signal.raise_signal(signum)
    return out, write_summary(sweep, out, url)


def _run_workers(
    sweep: Sweep, out: Path, url: str, jobs: int, deadline: float | None, train: Trainer
) -> int | None:
    """Run ``jobs`` worker processes (:func:`_worker_main`) until they end, passing SIGINT and
    SIGTERM on to them (:class:`_Relay`).

    Returns:
        The last signal this process received while they ran, else None.

    Raises:
        RuntimeError: a worker failed (not stopped by a signal this process received).
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(jobs)]  # (read end, write end)
    workers = [
        context.Process(
            target=_worker_main,
            args=(str(sweep.path), str(out), url, i, threads, deadline, train, pipes[i][1]),
        )
        for i in range(jobs)
    ]
    for report, _ in pipes:
        os.set_blocking(report.fileno(), False)
    with _Relay(workers, [report for report, _ in pipes]) as relay:
        for w, (_, wakeup) in zip(workers, pipes, strict=True):
            w.start()
            wakeup.close()  # the worker has its own copy
        while any(w.is_alive() for w in workers):
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=0.2)
            relay.pass_on()
    for report, _ in pipes:
        report.close()
    if relay.received:
        return relay.received[-1][0]
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"sweep workers exited with codes {failed}; see their output")
    return None


UNITS_NOTE = (
    "rec, KL, ELBO, IW-NLL (± its standard error over sentences), z-usage gap: nats per "
    "sentence, EOS counted; MI: nats (aggregate posterior over the evaluated set); AU: "
    "active dimensions (threshold δ) of the latent size; PPL per word incl. EOS; BLEU "
    "0-100; wall times in seconds"
)


def write_summary(sweep: Sweep, out_dir: Path, url: str) -> dict:
    """``OUT/sweep.md`` (one row per trial; the Pareto front marked ★) and
    ``OUT/rate_distortion.png``; returns ``{"trials": [...], "pareto": [numbers], "plot": ...}``.
    """
    from textvae.atomic import write_text
    from textvae.report import evaluation_table, plot_rate_distortion

    latest, best = _latest_trials(open_study(sweep, url))
    shown, rows, dims = [], {}, {}
    for number in _summary_order(sweep, latest):
        row, result, au_dims = _summary_row(sweep, out_dir, number, latest[number], best)
        shown.append(row)
        if result:
            rows[row["label"]], dims[row["label"]] = result, au_dims
    lines = _summary_head(sweep, url, len(shown), rows) + _trials_table(sweep, shown)
    lines += ["", UNITS_NOTE + ".", ""]
    if rows:
        lines += [evaluation_table(rows, dims), ""]
    plot = plot_rate_distortion(rows, out_dir / "rate_distortion.png", f"sweep {sweep.name}")
    lines += ["![rate-distortion plane of the trials](rate_distortion.png)", ""]
    write_text(out_dir / "sweep.md", "\n".join(lines))
    return {
        "trials": shown,
        "pareto": sorted(s["number"] for s in shown if s["pareto"]),
        "plot": plot,
    }


def _latest_trials(study) -> tuple[dict, set[int]]:
    """(identity -> its last attempt, the numbers of the trials on the Pareto front); trials
    beyond the budget left out."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("overflow")]
    best = (
        {t.number for t in study.best_trials}
        if any(t.state == TrialState.COMPLETE for t in trials)
        else set()
    )
    latest = {}
    for t in sorted(trials, key=lambda t: (_identity(t), t.number)):
        latest[_identity(t)] = t  # a retried trial: its last attempt stands for it
    return latest, best


def _summary_order(sweep: Sweep, latest: dict) -> list[int]:
    """The trial identities in the order of ``sweep.md``: by number, or for a grid in the
    order the file declares the grid."""
    order = sorted(latest)
    if sweep.sampler != "grid":
        return order
    import itertools

    grid = sweep.grid()
    points = list(itertools.product(*grid.values()))

    def position(n: int) -> int:
        point = tuple(latest[n].params.get(k) for k in grid)
        return points.index(point) if point in points else len(points) + n

    return sorted(order, key=position)


def _summary_row(
    sweep: Sweep, out_dir: Path, number: int, t, best: set[int]
) -> tuple[dict, dict, int | None]:
    """One trial of ``sweep.md``: (its row, its evaluation JSON or {}, its AU denominator)."""
    import json

    from textvae.models import MODELS
    from textvae.report import au_dimensions

    folder = out_dir / t.user_attrs["run_dir"] if "run_dir" in t.user_attrs else None
    output = f"{sweep.evaluation.output}.json"
    result, au_dims = {}, None
    if folder is not None and (folder / output).is_file():
        result = json.loads((folder / output).read_text())
    if result:
        config = OmegaConf.load(folder / CONFIG)
        # the AU denominator from the model class (none where L x D depends on a backbone)
        au_dims = au_dimensions(MODELS[config.model.name], config.model)
    row = {
        "number": number,
        "label": folder.name if folder is not None else f"trial-{number:04d}",
        "state": t.state.name,
        "settings": ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in t.params.items()),
        "values": _values_cell(t),
        "pareto": t.number in best,
        "train_s": t.user_attrs.get("train_s"),
        "eval_s": t.user_attrs.get("eval_s"),
        "error": t.user_attrs.get("error"),
    }
    return row, result, au_dims


def _values_cell(t) -> str:
    """A trial's objective values for ``sweep.md`` (a pruned trial: where it was pruned)."""
    from optuna.trial import TrialState

    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        return f"pruned at step {step}: valid -ELBO {t.intermediate_values[step]:.2f}"
    # an objective the evaluation did not report (e.g. classifier_accuracy of a run without
    # classifier) was stored as the worst value, ±inf: shown as missing, not as a score
    return ", ".join("–" if v is None or math.isinf(v) else f"{v:.3f}" for v in (t.values or []))


def _summary_head(sweep: Sweep, url: str, n_shown: int, rows: dict) -> list[str]:
    """``sweep.md``'s title and paragraphs: the study, the evaluation, the entries, the
    budget."""
    e = sweep.evaluation
    first = next(iter(rows.values()), {})
    ks = sorted({r["iw_samples"] for r in rows.values() if r.get("iw_samples")})
    objectives = ", ".join(f"{d} {k}" for k, d in sweep.objectives.items())
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"Sweep file `{sweep.path}`; study `{sweep.name}` in `{_hide_password(url)}`; sampler "
        f"{sweep.sampler}{_population(sweep)}; {n_shown} of {sweep.trials} trials shown. Objectives: {objectives} "
        f"(★: on the Pareto front{'' if len(sweep.objectives) > 1 else ', i.e. the best trial'}).",
        f"Evaluation: split **{e.split}** ({first.get('data', '–')}, "
        f"{first.get('n_sentences', '–')} sentences), {e.checkpoint} checkpoint, K = "
        f"{', '.join(str(k) for k in ks) or '–'} (IW-NLL; a model without latent: exact), "
        f"precision {first.get('precision', e.precision)}, seed {e.seed}; "
        f"`{e.output}.json` in each trial's run folder.",
    ]
    lines += _entries_lines(sweep)
    if sweep.budget:
        lines += ["", "Budget per trial: " + ", ".join(f"`{b}`" for b in sweep.budget) + "."]
    if e.split == "test":
        lines.append(
            "This sweep is scored on the **test** split: it evaluates fixed recipes; "
            "do not select among them on these numbers."
        )
    return lines


def _entries_lines(sweep: Sweep) -> list[str]:
    """``sweep.md``'s list of the entries and their overrides (nothing without entries)."""
    if not sweep.entries:
        return []
    common = ", ".join(f"`{o}`" for o in sweep.overrides)
    lines = [
        "",
        "Entries (on "
        + (f"`{sweep.base.name}`" if sweep.base else "their presets")
        + (f", after the common overrides {common}" if sweep.overrides else "")
        + "):",
        "",
    ]
    for name, (preset, own) in sweep.entries.items():
        parts = ([f"preset `{preset.name}`"] if preset else []) + [f"`{o}`" for o in own]
        lines.append(f"- {name}: {', '.join(parts) or 'the base preset'}")
    return lines


def _trials_table(sweep: Sweep, shown: list[dict]) -> list[str]:
    """``sweep.md``'s table of the trials (settings, objective values, wall times, ★)."""
    lines = [
        "",
        f"| trial | state | settings | {', '.join(sweep.objectives)} | train s | eval s | Pareto |",
        "|---|---|---|---:|---:|---:|:---:|",
    ]
    for s in shown:
        state = s["state"] if not s["error"] else f"{s['state']}: {s['error'][:80]}"
        lines.append(
            f"| {s['label']} | {state} | {s['settings'] or 'base'} | {s['values'] or '–'} "
            f"| {_num(s['train_s'])} | {_num(s['eval_s'])} | {'★' if s['pareto'] else ''} |"
        )
    return lines


def _num(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _hide_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head or ":" not in head.split("://", 1)[1]:
        return url
    scheme, user = head.split("://", 1)
    return f"{scheme}://{user.split(':', 1)[0]}:***@{tail}"


def config_of(sweep: Sweep, entry: str | None, params: dict) -> Config:
    """The resolved config of one trial (for inspection and tests)."""
    preset, overrides = trial_overrides(sweep, entry, params)
    return load_config(preset, overrides)
