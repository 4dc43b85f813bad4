"""The run folder: its layout, the log, checkpoints, the saved config and the evaluations.

:func:`textvae.train.train` writes a run folder; :func:`textvae.load`, ``textvae evaluate``,
:mod:`textvae.report` (report, compare) and :mod:`textvae.sweep` read it through this module and
never import the training loop. Every write goes through :mod:`textvae.atomic` (a file or a
folder is renamed into place whole). A run folder holds:

- ``config.yaml`` (:data:`CONFIG`): the resolved config (:func:`write_config`,
  :func:`read_config`); ``tokenizer/`` (:data:`TOKENIZER`): ``save_pretrained`` output;
  ``data.json`` (:data:`DATA`): corpus sources and counts.
- ``log.jsonl`` (:data:`LOG`): one JSON record per line with a ``type`` (``train``, ``valid``,
  ``warning``, ``event``), appended by :class:`RunLog`, read by :func:`read_log`; the record
  ``{"type": "event", "event": "finished"}`` (:data:`FINISHED`) marks a run whose training
  reached its budget (:func:`is_finished`). The fields of each record type are listed in
  :mod:`textvae.train`. A run restarted before its first checkpoint keeps its earlier log as
  ``log.aborted-<n>.jsonl`` (:func:`set_aside_log`).
- ``checkpoints/<which>/`` (:func:`checkpoint_path`, :func:`checkpoint_dir`): ``last`` (the full
  training state, ``accelerate.save_state``), ``best`` (``model.safetensors`` of the best
  validation ELBO and ``trainer_state.json``), ``ae_best`` (``model.safetensors`` of the best
  autoencoder-phase rec and ``info.json``); each written whole and committed atomically
  (:func:`write_weights`, :func:`textvae.atomic.commit_dir`).
- ``samples.txt`` (:data:`SAMPLES`): decodings at each validation; ``tensorboard/`` with
  ``train.log_with=tensorboard``.
- ``eval-<what>-<full|N>[-K<k>]-<precision>[-gen].json``: ``textvae evaluate`` outputs
  (:func:`evaluation_name`; fields in :data:`textvae.fields.EVAL_FIELDS`), the most complete of a
  split chosen by :func:`best_evaluation`; ``report/``: ``textvae report``.

A run folder is never deleted or overwritten: training refuses a non-empty folder unless it
resumes it (:func:`resume_config` says what a resumed run may change).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from textvae.atomic import commit_dir, replacing, temp_dir, write_text

if TYPE_CHECKING:
    import torch

    from textvae.config import Config

CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
DATA = "data.json"
LOG = "log.jsonl"
SAMPLES = "samples.txt"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
FINISHED = "finished"  # the event that closes the log of a run that reached its budget

# keys a resumed run may change: its budget and its display, nothing that changes the maths
RESUMABLE_OVERRIDES = ("train.max_steps", "train.max_epochs", "train.progress", "train.log_with")


class RunDirError(ValueError):
    """The run folder cannot be used as asked (exists and is not empty, or nothing to resume)."""


def default_run_dir(config_path: str | Path | None, root: str | Path = "runs") -> Path:
    """``runs/<preset name>-<UTC time>``, with a numeric suffix if that exists already."""
    stem = Path(config_path).stem if config_path else "run"
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    """``RUN_DIR/checkpoints/<which>`` (``last``, ``best``, ``ae_best``), whether it exists or not."""
    return Path(run_dir) / CHECKPOINTS / which


def checkpoint_dir(run_dir: str | Path, which: str) -> Path:
    """``checkpoints/<which>``, or its ``.old`` twin if a save was interrupted mid-rename
    (:func:`textvae.atomic.commit_dir`).

    Raises:
        RunDirError: neither exists.
    """
    path = checkpoint_path(run_dir, which)
    for candidate in (path, path.with_name(which + ".old")):
        if candidate.is_dir():
            return candidate
    raise RunDirError(f"{run_dir}: no '{which}' checkpoint (expected {path})")


def write_weights(
    run_dir: str | Path, which: str, weights: dict[str, torch.Tensor], info: dict[str, dict]
) -> Path:
    """Write ``checkpoints/<which>/`` atomically: ``model.safetensors`` (``weights``, a state
    dict; made contiguous) and one JSON file per item of ``info`` (file name: record). The folder
    is written whole into ``<which>.tmp/`` and then committed (:func:`textvae.atomic.commit_dir`),
    so an interruption leaves the previous checkpoint readable. Returns the folder."""
    from safetensors.torch import save_file

    final = checkpoint_path(run_dir, which)
    tmp = temp_dir(final)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    for name, record in info.items():
        (tmp / name).write_text(json.dumps(record))
    commit_dir(tmp, final)
    return final


def tokenizer_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/tokenizer``, the tokenizer's ``save_pretrained`` folder (it always holds
    ``tokenizer_config.json``).

    Raises:
        RunDirError: the folder, or its ``tokenizer_config.json``, is missing (the path is named).
    """
    path = Path(run_dir) / TOKENIZER
    if not path.is_dir():
        raise RunDirError(f"{run_dir}: no tokenizer folder (expected {path}, written by training)")
    if not (path / "tokenizer_config.json").is_file():
        raise RunDirError(f"{path}: not a saved tokenizer (no tokenizer_config.json in it)")
    return path


# --- the saved config ------------------------------------------------------------------------


def read_config(run_dir: str | Path) -> Config:
    """The run's ``config.yaml`` as a checked :class:`~textvae.config.Config`.

    Raises:
        FileNotFoundError: no ``config.yaml`` (not a run folder).
        textvae.config.ConfigError: a key is unknown or a value invalid.
    """
    from omegaconf import OmegaConf

    from textvae.config import config_from_dict

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} not found")
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(path)))


def write_config(run_dir: str | Path, config: Config) -> Path:
    """Write ``config`` as the run's ``config.yaml`` atomically. Returns the path."""
    from textvae.config import save_config

    path = Path(run_dir) / CONFIG
    with replacing(path) as tmp:
        save_config(config, tmp)
    return path


def write_data_info(run_dir: str | Path, info: dict) -> Path:
    """Write the run's ``data.json`` (corpus sources and counts) atomically."""
    return write_text(Path(run_dir) / DATA, json.dumps(info, indent=2))


def flat_config(config: Config) -> dict:
    """``{"section.key": value}`` of every leaf of ``config`` (nested sections dotted)."""
    from omegaconf import OmegaConf

    def walk(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return walk(OmegaConf.to_container(OmegaConf.structured(config)))


def resume_config(run_dir: Path, config: Config | None, overrides: list[str]) -> Config:
    """The saved config of ``run_dir`` with the budget of ``config`` and ``overrides`` applied.

    So the command that started a run, re-run with ``--resume``, continues it: an override or
    a given config may repeat any key's saved value; only :data:`RESUMABLE_OVERRIDES` may differ
    (a given config's values of those keys are taken, then the overrides').

    Raises:
        ConfigError: an override or a given config changes a key other than
            :data:`RESUMABLE_OVERRIDES` (the key, its saved and its given value are named).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from textvae.config import ConfigError

    saved = read_config(run_dir)
    base = OmegaConf.structured(saved)
    if config is not None:
        given = flat_config(config)
        budget = OmegaConf.create({})
        for key in RESUMABLE_OVERRIDES:
            OmegaConf.update(budget, key, given[key])
        base = OmegaConf.merge(base, budget)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:  # unknown key, wrong type
        raise ConfigError(f"--resume: {err}") from err
    resumed: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    old, new = flat_config(saved), flat_config(resumed)
    for key in old:
        if old[key] != new[key] and key not in RESUMABLE_OVERRIDES:
            raise ConfigError(
                f"--resume: '{key}' cannot change in a resumed run ({run_dir}/"
                f"config.yaml has {old[key]!r}, the override {new[key]!r}; only "
                f"{', '.join(RESUMABLE_OVERRIDES)} may change)"
            )
    if config is not None:
        given = flat_config(config)
        changed = [k for k in new if new[k] != given[k] and k not in RESUMABLE_OVERRIDES]
        if changed:
            raise ConfigError(
                f"--resume: the given config differs from {run_dir}/config.yaml "
                f"in {', '.join(f'{k} ({new[k]!r} saved, {given[k]!r} given)' for k in changed)}"
            )
    return resumed


# --- the log -------------------------------------------------------------------------------


class RunLog:
    """Appends records to ``RUN_DIR/log.jsonl``, one JSON object per line, flushed at once (a
    reader, or a crash, sees every record written so far). Use as a context manager or
    :meth:`close` it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOG
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        """Append ``record`` (JSON-serialisable, with a ``type``)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(run_dir: str | Path) -> dict[str, list[dict]]:
    """The records of ``RUN_DIR/log.jsonl`` grouped by their ``type`` (train, valid, warning,
    event), in file order. A resumed run's records are kept as written.

    Raises:
        FileNotFoundError: no ``log.jsonl``. ValueError: a line is not JSON (the line number
            is given).
    """
    path = Path(run_dir) / LOG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl (is it a run folder?)")
    groups: dict[str, list[dict]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
        groups.setdefault(record.get("type", "other"), []).append(record)
    return groups


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run's training reached its budget: the last event of ``log.jsonl`` is
    :data:`FINISHED` (a run resumed with a larger budget is unfinished until it ends again).
    False without a log.

    Raises:
        ValueError: a line of the log is not JSON.
    """
    try:
        events = read_log(run_dir).get("event", [])
    except FileNotFoundError:
        return False
    return bool(events) and events[-1].get("event") == FINISHED


def set_aside_log(run_dir: str | Path) -> Path | None:
    """Rename ``log.jsonl`` to the first free ``log.aborted-<n>.jsonl`` (a run restarted from
    scratch keeps the log of its aborted start). Returns the new path, or None without a log."""
    run_dir = Path(run_dir)
    if not (run_dir / LOG).is_file():
        return None
    n = 1
    while (run_dir / f"log.aborted-{n}.jsonl").exists():
        n += 1
    return (run_dir / LOG).rename(run_dir / f"log.aborted-{n}.jsonl")  # a free name: a move


def collapse_reason(
    kl: float, z_gap: float | None, kl_threshold: float, gap_threshold: float
) -> str:
    """Which collapse criterion holds, in words (the reason in the log's posterior-collapse
    warning and in the report's latent status): little information in q(z|x) (KL under its
    threshold, nats/sentence), a decoder that barely uses z (z-usage gap under its threshold),
    or both."""
    low_kl = kl < kl_threshold
    low_gap = z_gap is not None and z_gap < gap_threshold
    if low_kl and low_gap:
        return "z carries little information and the decoder barely uses it"
    if low_gap:
        return "the decoder barely uses z"
    if low_kl:
        return "z carries little information"
    return "z is in use"


# --- evaluations ---------------------------------------------------------------------------


def evaluation_name(
    what: str,
    n_sentences: int | None,
    iw_samples: int | None,
    precision: str,
    generation: bool = False,
) -> str:
    """The file stem of an evaluation, naming what it is: ``eval-<split or file stem>-<full or
    N sentences>[-K<k>]-<precision>[-gen]``, e.g. ``eval-test-full-K500-bf16``.

    Args:
        what: the split (``test``) or the evaluated file's stem.
        n_sentences: None for the whole split or file, else the count evaluated.
        iw_samples: K, or None for a model without latent (its likelihood is exact).
        generation: whether generation metrics are included.
    """
    parts = ["eval", what, "full" if n_sentences is None else str(n_sentences)]
    if iw_samples is not None:
        parts.append(f"K{iw_samples}")
    parts.append(precision)
    if generation:
        parts.append("gen")
    return "-".join(parts)


def read_evaluations(run_dir: str | Path) -> dict[str, dict]:
    """``{file name: evaluation dict}`` of every ``eval-*.json`` in the run folder, the old
    ``eval-<split>.json`` names included, most complete first (:func:`completeness`).

    Raises:
        ValueError: a file is not valid JSON (the file is named).
    """
    found = [(path, _read_json(path)) for path in Path(run_dir).glob("eval-*.json")]
    found.sort(key=lambda item: completeness(item[1], item[0]), reverse=True)
    return {path.name: record for path, record in found}


def completeness(record: dict, path: Path | None = None) -> tuple:
    """Sort key of evaluations of one split, larger = more complete: more sentences (the full
    set over a subset), then more importance samples K (an exact likelihood counts as the most),
    then fp32 over bf16, then the newer file."""
    k = record.get("iw_samples")
    if k is None and record.get("nll") is not None:
        k = math.inf  # exact -log p(x) of a model without latent
    return (
        record.get("n_sentences") or 0,
        k or 0,
        record.get("precision") == "fp32",
        path.stat().st_mtime if path is not None else 0.0,
    )


def best_evaluation(run_dir: str | Path, which: str = "test") -> tuple[str, dict] | None:
    """The most complete evaluation (:func:`completeness`) of split ``which``, or the file
    ``which`` (a name with or without ``.json``) when it exists: (file name, record), or None.

    Raises:
        ValueError: a file is not valid JSON (the file is named).
    """
    run_dir = Path(run_dir)
    for name in (which, f"{which}.json"):
        if name.startswith("eval-") and (run_dir / name).is_file():
            return name, _read_json(run_dir / name)
    split = which.removeprefix("eval-")
    for name, record in read_evaluations(run_dir).items():
        if record.get("split") == split:
            return name, record
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON evaluation record ({err})") from err


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a finished step (raised by
    :func:`textvae.train.train`; here beside the run folder it describes, so that the sweep
    recognises it without importing the training loop); ``checkpoints/last`` holds
    that step, so ``train(None, run_dir, resume=True)`` continues exactly.

    Attributes:
        signum: the signal's number (``signal.SIGINT`` 2, ``signal.SIGTERM`` 15).
        step: the optimizer steps done. run_dir: the run folder.
    """

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, Path(run_dir)
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: training stopped after step {step}; the full state is in "
            f"{self.run_dir / 'checkpoints' / 'last'}"
        )
