"""The training loop: one loop, read top to bottom, through ``accelerate``.

A run folder holds:

- ``config.yaml``: the resolved config; ``tokenizer/``: ``save_pretrained`` output;
  ``data.json``: corpus sources and counts (blank lines skipped, sentences truncated/dropped).
- ``log.jsonl``: one JSON object per line, appended (``train``, ``valid``, ``warning`` and
  ``event`` records; their fields, units and when each is written: the table in
  docs/training.md, "The log records").
- ``checkpoints/last/``: the full training state (``accelerate.save_state``: model weights as
  safetensors, the optimizers, RNG states, LR schedules, the :class:`TrainerState` with the step
  that drives the schedules, the data position and each remedy's own state), written at every
  validation.
- ``checkpoints/best/model.safetensors``: the weights of the best validation ELBO.
- ``samples.txt``: at each validation, greedy decodings of z ~ p(z) (ancestral samples for a
  model without latent; for a conditional model, one greedy response from z ~ p(z|c) to each of
  the first validation contexts).

The loop (``_loop``) reads top to bottom: for each global batch, each remedy's
``begin_step`` (e.g. the phase hand-off when due), this step's beta (the KL schedule's,
counted from the start of the training phase, then each remedy's ``beta``), each remedy's
``before_update`` (e.g. the aggressive encoder-only steps while on), one optimizer step
(:func:`optimizer_step`, with each remedy's ``after_backward`` between the backward pass and the
update), each remedy's ``after_step``, a ``train`` record every ``train.log_every`` steps, and
validation (``_validate``: evaluation, the ``valid`` record, each remedy's ``validation``, LR
schedules, samples and checkpoints) every ``train.eval_every`` steps or at each epoch's end. The
objective's settings are built once (:class:`textvae.objectives.ObjectiveSettings`).

The training-schedule remedies (KL cycle, collapse watch, autoencoder pretraining, aggressive
training) are the classes registered in :mod:`textvae.remedies`
(:class:`~textvae.remedies.Remedy`; the model-side remedies live in the model and its config);
the loop builds those the config switches on and calls their hooks without naming any. Each
declares what it needs of the loop: its state (checkpointed in ``TrainerState.remedies``), the
optimizers of its own (``parameter_groups``: aggressive training's for the inference network,
stepped with the main one unless ``joint_update`` says not), the phase of training
(:class:`~textvae.remedies.Phase`: the step the KL-weight and cosine LR schedules count from,
and whether the KL term is off, as in an autoencoder phase), and the fields of every log record.
A remedy that starts a new phase calls ``_Run.start_phase``: the optimizers' state cleared and
their LR back to ``train.lr``, the LR schedules as at the start of the run, the best validation
forgotten, each remedy's ``phase_started``.

Checkpoints are written to a temporary folder and renamed into place, so an interruption
never leaves a half-written checkpoint; an existing non-empty run folder is never
overwritten (``resume=True`` continues it).

Several processes (``torchrun`` / ``accelerate launch``; docs/scaling.md): ``train.batch_size`` is
the global batch, of which each of the N processes takes every N-th sentence, weighted so that
DDP's averaged gradient is that of the global mean; the logged values are the global batch's;
only the main process writes the run folder, logs and trackers; ``checkpoints/last`` holds one
RNG state per process and a resume needs the same N (:class:`RunDirError` otherwise); process
r > 0 draws its noise from ``train.seed + r`` after the identical initialisation; validation is
sharded as :func:`textvae.metrics.evaluate`. ``train.log_with`` sends the ``train`` and ``valid``
scalars of ``log.jsonl`` (:data:`TRACKED`) to accelerate's trackers as well.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from textvae.atomic import commit_dir, temp_dir
from textvae.config import Config, ConfigError, TrainConfig
from textvae.data import DataError, TextDataset, load_split, load_tokenizer, semi_supervised_labels
from textvae.generate import respond, sample_prior
from textvae.metrics import evaluate, runnable_precision
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings, kl_weight
from textvae.registry import discover_remedies
from textvae.remedies import Phase, Remedy
from textvae.rundir import (
    FINISHED,
    RunDirError,
    RunLog,
    TrainingInterrupted,
    checkpoint_dir,
    checkpoint_path,
    flat_config,
    resume_config,
    set_aside_log,
    write_config,
    write_data_info,
    write_weights,
)

log = logging.getLogger(__name__)

# the scalars of log.jsonl sent to the live trackers (train.log_with), per record type
TRACKED = {
    "train": ("loss", "rec", "kl", "bow", "beta", "lr", "tokens_per_s"),
    "valid": ("elbo", "rec", "kl", "mi", "mi_batch", "au", "z_gap"),
}


@dataclass
class TrainerState:
    """Position of a run, saved in every checkpoint: the optimizer step (which drives the KL and
    LR schedules), the data position (epoch, next batch in it), the best validation loss (nats
    per sentence) and the step of the last validation, and ``remedies``: remedy name -> that
    remedy's own state (:attr:`textvae.remedies.Remedy.state`; absent from checkpoints written
    before the remedy registry, which load with it empty).

    Checkpoints written before the remedies kept their own state hold it at the top level
    (``phase``, ``phase_start``, ``aggressive``, ``last_mi``, ``collapsed_validations``,
    ``ae_*``): :meth:`load_state_dict` keeps those keys in :attr:`legacy` until the remedies
    take theirs (:attr:`~textvae.remedies.Remedy.legacy_state`, :func:`_remedy_states`)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid: float = math.inf
    last_valid_step: int = -1
    remedies: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.legacy: dict = {}  # not a field: never saved

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        self.remedies = {}
        for key, value in state.items():
            if key in names:
                setattr(self, key, value)
        self.legacy = {k: v for k, v in state.items() if k not in names}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class _StopSignals:
    """Within ``with``: SIGINT and SIGTERM set :attr:`signum` instead of stopping the process
    (a second one stops it at once with KeyboardInterrupt); the previous handlers come back on
    exit. Only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s: stopping after the current step (again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(config: Config, params) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` over ``params`` with the config's LR, momentum and
    weight decay (Adam and AdamW with fused kernels)."""
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    # fused kernels (CPU and CUDA): ~3x faster updates of the 10k-row embedding/output tables
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


def optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    grad_clip: float,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    clip_grad_norm: Callable = torch.nn.utils.clip_grad_norm_,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """The update of one training step, as the loop takes it (and the bench scripts time it):
    every gradient of ``model`` cleared, ``loss`` back-propagated, ``after_backward`` called,
    the gradient norm of all of ``model``'s parameters clipped at ``grad_clip`` (0: no
    clipping), then each of ``optimizers`` stepped, in order.

    Args:
        loss: the scalar training loss (the objective's ``loss``: the batch mean of nats per
            sentence plus its penalties), its graph built by ``model``'s forward.
        backward: back-propagates ``loss`` (the loop: ``Accelerator.backward``).
        clip_grad_norm: ``(parameters, max_norm)`` -> clips in place (the loop:
            ``Accelerator.clip_grad_norm_``).
        after_backward: called between the backward pass and the clipping (the loop: each
            remedy's ``after_backward``, e.g. a frozen decoder dropping its gradients).
    """
    model.zero_grad(set_to_none=True)
    backward(loss)
    if after_backward is not None:
        after_backward()
    if grad_clip > 0:
        clip_grad_norm(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()


def train(
    config: Config,
    run_dir: str | Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    on_validation: Callable[[dict], None] | None = None,
) -> Path:
    """Train ``config`` into ``run_dir`` (or continue it with ``resume=True``).

    ``train.max_steps``, when set, takes precedence over ``train.max_epochs`` (as in HF
    Trainer). Validation (and checkpointing) happens every ``train.eval_every`` steps, or at
    each epoch's end when that is 0, and once more at the end of training. The remedies the
    config switches on (:mod:`textvae.remedies`) act through the loop's hooks (module
    docstring).

    ``on_validation``, when given, is called with each validation's ``log.jsonl`` record (step,
    elbo, rec, kl, ... in nats per sentence) after its checkpoints are written; an exception it
    raises stops training there, resumable (``textvae sweep`` prunes trials this way).

    SIGINT (Ctrl-C) and SIGTERM, when ``train`` runs in the main thread, stop it after the
    current step: ``checkpoints/last`` is written (atomically) at that step, a ``{"type":
    "event", "event": "interrupted"}`` record is logged and :class:`TrainingInterrupted` is
    raised; a second signal stops at once. A folder stopped before its first checkpoint (e.g.
    killed) holds ``config.yaml`` only: ``resume=True`` then starts it afresh from that config
    (its earlier ``log.jsonl`` is kept as ``log.aborted-<n>.jsonl``).

    Returns:
        The run folder.

    Raises:
        RunDirError: ``run_dir`` exists and is not empty (without ``resume``), has no
            ``config.yaml`` to resume, or its checkpoint was written by another number of
            processes.
        ConfigError: a resumed run would change more than its budget; ``train.batch_size`` is
            not a multiple of the number of processes; the ``train.log_with`` tracker's package
            is not installed.
        TrainingDiverged: a non-finite loss; ``checkpoints/last`` holds the last good state.
        TrainingInterrupted: SIGINT or SIGTERM; ``checkpoints/last`` holds the state.
        textvae.data.DataError: corpus problems.
    """
    with _StopSignals() as stop_signals:
        return _train(config, Path(run_dir), resume, overrides, on_validation, stop_signals)


def _train(
    config: Config | None,
    run_dir: Path,
    resume: bool,
    overrides: list[str] | None,
    on_validation: Callable[[dict], None] | None,
    stop_signals: _StopSignals,
) -> Path:
    """Set up (config, accelerator, data, model, optimizers and state), run the loop, finish."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    config, resume = _run_config(config, run_dir, resume, overrides)
    t = config.train
    accelerator = _accelerator(t, run_dir, resume)
    train_ds, valid_ds, tokenizer = _datasets(config, run_dir, resume, accelerator.is_main_process)
    model = MODELS[config.model.name](config.model, tokenizer)
    if accelerator.process_index:  # identical initial weights everywhere; then its own noise
        from accelerate.utils import set_seed

        set_seed(t.seed + accelerator.process_index)
    per_epoch = len(_epoch_batches(train_ds, t, accelerator.num_processes, 0))
    total = t.max_steps if t.max_steps is not None else t.max_epochs * per_epoch
    run = _prepare(
        config,
        run_dir,
        resume,
        accelerator,
        model,
        tokenizer,
        (train_ds, valid_ds),
        on_validation,
        (per_epoch, total),
    )
    state = run.state
    if resume and state.step >= total:  # nothing to train: say so, change nothing
        log.warning(
            "%s finished at step %d of its budget of %d steps; nothing to train (raise "
            "train.max_epochs or train.max_steps with --resume to continue it)",
            run_dir,
            state.step,
            total,
        )
        if run.log_file is not None:
            run.log_file.close()
        accelerator.end_training()
        return run_dir
    _start_events(run, resume)
    for remedy in run.remedies:  # the enabled ones, in registration order
        remedy.start()
    # a bar only on a terminal: written to a log file its \r updates are noise (as evaluate's)
    show_bar = t.progress and run.main and sys.stderr.isatty()
    bar = tqdm(total=total, initial=state.step, disable=not show_bar, desc="train")
    # log records (validation lines, collapse warnings) print above the progress bar
    with logging_redirect_tqdm():
        _loop(run, total, stop_signals, bar)
        bar.close()
    if run.log_file is not None:
        run.write_log({"type": "event", "event": FINISHED, "step": state.step})
        run.log_file.close()
    accelerator.end_training()
    return run_dir


def _start_events(run: _Run, resume: bool) -> None:
    """The ``resume`` event of a resumed run, and the ``precision`` event when bf16 runs as fp32
    (a device without native bfloat16, :mod:`textvae.precision`)."""
    t, accelerator, step = run.config.train, run.accelerator, run.state.step
    if resume:
        run.write_log({"type": "event", "event": "resume", "step": step})
    ran = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    if ran != t.precision:
        run.write_log(
            {
                "type": "event",
                "event": "precision",
                "step": step,
                "requested": t.precision,
                "ran": ran,
            }
        )


def _run_config(
    config: Config | None, run_dir: Path, resume: bool, overrides: list[str] | None
) -> tuple[Config, bool]:
    """The config to train and whether a checkpoint is resumed: a new run's own (its folder
    must be empty or absent), or the run folder's (:func:`textvae.rundir.resume_config`); a
    folder stopped before its first checkpoint starts afresh from its config.yaml."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no config.yaml)")
        config = resume_config(run_dir, config, overrides or [])
        try:
            checkpoint_dir(run_dir, "last")
        except RunDirError:  # stopped before its first checkpoint: a fresh start of its config
            resume = False
            log.warning(
                "%s has no checkpoint yet: training starts afresh from its config.yaml", run_dir
            )
            if int(os.environ.get("RANK", "0")) == 0:  # several processes: the first moves it
                set_aside_log(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"{run_dir} exists and is not empty; pass --resume to continue it or "
            "choose another --run-dir (nothing was changed)"
        )
    return config, resume


def _accelerator(t: TrainConfig, run_dir: Path, resume: bool):
    """The ``accelerate.Accelerator`` of this training (precision, trackers, processes), the
    global seed set; checks that the processes can share the batch and the checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    # AcceleratorState is a process-wide singleton that refuses a second mixed-precision setting,
    # so a second train() in one process (tests, sweeps, notebooks) would fail; clear it (the
    # distributed PartialState is kept).
    AcceleratorState._reset_state()
    if t.log_with != "none":  # accelerate would only warn and track nothing
        from accelerate import utils

        if not getattr(utils, f"is_{t.log_with}_available")():
            raise ConfigError(
                f"train.log_with={t.log_with}: the package is not installed; "
                f"pip install 'textvae[{t.log_with}]' or set train.log_with=none"
            )
    # several processes (accelerate launch / torchrun set WORLD_SIZE): gloo without a GPU
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # bf16 on a device without native bfloat16 (an AVX2-only CPU) runs fp32, with a warning
    precision = runnable_precision(t.precision, "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        cpu=cpu,
        log_with=None if t.log_with == "none" else t.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    set_seed(t.seed)
    n_proc = accelerator.num_processes
    if t.batch_size % n_proc:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is the global batch and must be a "
            f"multiple of the {n_proc} processes (each takes batch_size / {n_proc} "
            "sentences); choose another batch size or process count"
        )
    if resume:  # one RNG state per process: another process count cannot continue the run
        last = checkpoint_dir(run_dir, "last")
        saved = len(list(last.glob("random_states_*.pkl")))
        if saved != n_proc:
            raise RunDirError(
                f"{last} was written by {saved} process(es) and this resume runs "
                f"{n_proc}; resume with the same count (torchrun --nproc_per_node "
                f"{saved} / accelerate launch --num_processes {saved}) or start a "
                "new run (nothing was changed)"
            )
    return accelerator


def _datasets(
    config: Config, run_dir: Path, resume: bool, main: bool
) -> tuple[TextDataset, TextDataset, object]:
    """The training and validation datasets and the tokenizer (built on the training split,
    or the run folder's when resuming); a new run's folder gets ``config.yaml``,
    ``tokenizer/`` and ``data.json`` (main process), a resumed one its updated config."""
    t = config.train
    train_corpus = load_split(config.data, "train")
    valid_corpus = load_split(config.data, "valid")
    conditional = MODELS[config.model.name].conditional
    if conditional and train_corpus.contexts is None:
        raise ConfigError(
            f"model.name={config.model.name!r} is conditional and needs a dialogue "
            "corpus (data.corpus=dailydialog or data.format=dialogue)"
        )
    if resume:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    else:
        # a dialogue corpus: the vocabulary covers responses and contexts
        tokenizer = MODELS[config.model.name].make_tokenizer(
            config, train_corpus.texts + (train_corpus.contexts or [])
        )
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, config)
            tokenizer.save_pretrained(str(run_dir / "tokenizer"))
            info = {
                role: {"source": c.source, **c.stats}
                for role, c in (("train", train_corpus), ("valid", valid_corpus))
            }
            info["vocab_size"] = len(tokenizer)
            write_data_info(run_dir, info)
    if resume and main:
        write_config(run_dir, config)
    train_labels = train_corpus.labels
    model_class = MODELS[config.model.name]
    if model_class.trains_on_labels(config.model):  # e.g. lstm_vae's classifier on z
        if train_labels is None:
            raise DataError(
                f"model.classifier_weight > 0 needs labels, and {train_corpus.source} "
                "has none: use a labelled corpus (yelp_sentiment) or data.label_field"
            )
        train_labels = semi_supervised_labels(
            train_labels, model_class.label_fraction(config.model)
        )
    train_ds = TextDataset(train_corpus.texts, tokenizer, train_labels, train_corpus.contexts)
    n_valid = t.valid_limit_eval or len(valid_corpus.texts)
    valid_contexts = valid_corpus.contexts[:n_valid] if valid_corpus.contexts is not None else None
    valid_ds = TextDataset(valid_corpus.texts[:n_valid], tokenizer, contexts=valid_contexts)
    return train_ds, valid_ds, tokenizer


def _epoch_batches(
    train_ds: TextDataset, t: TrainConfig, n_proc: int, epoch: int
) -> list[list[int]]:
    """The global batches of an epoch; with ``n_proc`` processes those of fewer than ``n_proc``
    sentences (at most the last, short one) are left out, since every process needs a share."""
    return [b for b in train_ds.batches(t.batch_size, True, t.seed, epoch) if len(b) >= n_proc]


def _lr_schedulers(t: TrainConfig, optimizers: list[torch.optim.Optimizer], run: _Run) -> list:
    """One LR schedule per optimizer (``train.lr_scheduler``): none for ``constant``;
    ``ReduceLROnPlateau`` for ``plateau`` (stepped at each validation with the validation loss);
    for ``cosine`` a ``LambdaLR`` stepped after each optimizer step, whose factor is read from
    the run (the step, the budget ``run.total`` and :attr:`_Run.phase`: held at 1 in an
    autoencoder phase, else decaying from the phase's start), so a resumed run and a phase
    hand-off need nothing of the schedule's own count."""
    if t.lr_scheduler == "plateau":
        return [
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                o, mode="min", factor=t.lr_decay, patience=t.lr_patience, min_lr=t.lr_min
            )
            for o in optimizers
        ]
    if t.lr_scheduler != "cosine":
        return []
    floor = t.lr_min / t.lr if t.lr > 0 else 0.0

    def factor(_: int) -> float:  # a function, not an object: LambdaLR does not pickle it
        phase = run.phase
        if phase.autoencoder:
            return 1.0
        span = max(1, run.total - phase.start)
        done = min(1.0, (run.state.step - phase.start) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]


def _prepare(
    config: Config,
    run_dir: Path,
    resume: bool,
    accelerator,
    model: torch.nn.Module,
    tokenizer,
    datasets: tuple[TextDataset, TextDataset],
    on_validation: Callable[[dict], None] | None,
    budget: tuple[int, int],
) -> _Run:
    """The :class:`_Run` the loop works with: every registered remedy the config switches on
    (in registration order) with its state; the optimizers and LR schedules, all prepared by
    accelerate with the model (:func:`_optimizers`); the checkpoint's state when resuming
    (every RNG, optimizer, schedule, the trainer state and the remedies'); the log and the
    trackers. ``budget``: (global batches per epoch, the step budget)."""
    train_ds, valid_ds = datasets
    run = _Run(
        config=config,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        raw=model,
        tokenizer=tokenizer,
        state=TrainerState(),
        train_ds=train_ds,
        valid_ds=valid_ds,
        objective=ObjectiveSettings.from_config(config.kl),
        on_validation=on_validation,
        steps_per_epoch=budget[0],
        total=budget[1],
    )
    _enable_remedies(run)  # with a new run's state; a resumed one's comes with the checkpoint
    _optimizers(run)
    if resume:
        accelerator.load_state(str(checkpoint_dir(run_dir, "last")))
        _remedy_states(run)
    _log_and_trackers(run)
    return run


def _enable_remedies(run: _Run) -> None:
    """Every registered remedy that ``run.config`` switches on, in registration order
    (:mod:`textvae.remedies`), with a new run's state (:func:`_remedy_states`); the log fields of
    every registered one that is off (``log_defaults``)."""
    registered = discover_remedies().values()
    run.remedies = [r(run) for r in registered if r.enabled(run.config)]
    run.log_defaults = {k: v for r in registered for k, v in r.log_defaults.items()}
    _remedy_states(run)


def _remedy_states(run: _Run) -> None:
    """Each enabled remedy's state, in registration order: its
    :meth:`~textvae.remedies.Remedy.initial_state`, overlaid with what the checkpoint holds of
    it, in ``TrainerState.remedies`` or, from a checkpoint written before the remedies kept
    their own, at the top level of the trainer state (its
    :attr:`~textvae.remedies.Remedy.legacy_state` keys)."""
    state = run.state
    for remedy in run.remedies:
        legacy = {k: state.legacy[k] for k in remedy.legacy_state if k in state.legacy}
        saved = state.remedies.get(remedy.name, {})
        state.remedies[remedy.name] = {**remedy.initial_state(), **legacy, **saved}


def _optimizers(run: _Run) -> None:
    """The optimizers: one for every parameter, or the main one and those of a remedy that
    splits the parameters (:meth:`~textvae.remedies.Remedy.parameter_groups`: aggressive
    training's for the inference network); their LR schedules; model and optimizers prepared
    by accelerate; the trainer state and the schedules registered for checkpointing (in this
    order: ``checkpoints/last`` of earlier runs loads)."""
    config, accelerator = run.config, run.accelerator
    main, own = _parameter_groups(run)
    optimizers = [build_optimizer(config, main), *(build_optimizer(config, g) for _, g in own)]
    run.schedulers = _lr_schedulers(config.train, optimizers, run)
    run.fresh_schedules = [copy.deepcopy(s.state_dict()) for s in run.schedulers]
    run.model, *optimizers = accelerator.prepare(run.model, *optimizers)
    run.raw = accelerator.unwrap_model(run.model)
    run.optimizer = optimizers[0]
    for (name, _), opt in zip(own, optimizers[1:], strict=True):
        run.remedy_optimizers.setdefault(name, []).append(opt)
    accelerator.register_for_checkpointing(run.state)
    for sched in run.schedulers:
        accelerator.register_for_checkpointing(sched)


def _parameter_groups(run: _Run) -> tuple[list, list[tuple[str, list]]]:
    """The main optimizer's parameters, and (remedy name, parameters) of each optimizer of a
    remedy's own.

    Raises:
        ConfigError: two enabled remedies split the parameters.
    """
    splits = [(r.name, r.parameter_groups()) for r in run.remedies]
    splits = [(name, groups) for name, groups in splits if groups is not None]
    if not splits:
        return list(run.raw.parameters()), []
    if len(splits) > 1:
        names = " and ".join(name for name, _ in splits)
        raise ConfigError(
            f"the remedies {names} each split the model's parameters between optimizers of "
            "their own; switch one of them off"
        )
    name, (main, *own) = splits[0]
    return main, [(name, group) for group in own]


def _log_and_trackers(run: _Run) -> None:
    """``log.jsonl`` and the ``train.log_with`` trackers (main process); the sum over processes
    that the inner loops and the log records need with several."""
    config, accelerator, run_dir = run.config, run.accelerator, run.run_dir
    main = accelerator.is_main_process
    run.log_file = RunLog(run_dir) if main else None
    if main and config.train.log_with != "none":
        params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flat_config(config).items()
        }
        accelerator.init_trackers(
            "textvae",
            config=params,
            init_kwargs={"wandb": {"name": run_dir.name}, "mlflow": {"run_name": run_dir.name}},
        )
    if accelerator.num_processes > 1:  # inner loops stop together; logs sum the shares

        def all_sum(x: torch.Tensor) -> torch.Tensor:
            return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()

        run.all_sum = all_sum


def _loop(run: _Run, total: int, stop_signals: _StopSignals, bar) -> None:
    """The training loop: epochs of global batches, one optimizer step per batch, a ``train``
    log record every ``train.log_every`` steps, validation (with its checkpoints and the
    validation-time remedies, :func:`_validate`) every ``train.eval_every`` steps or at each
    epoch's end, and once more at the end."""
    t, state = run.config.train, run.state
    window = _Window()
    stop = state.step >= total
    while not stop:
        batches = run.epoch_batches(state.epoch)  # global batches; each process takes its share
        while state.batch_in_epoch < len(batches) and not stop:
            if stop_signals.signum is not None:  # SIGINT/SIGTERM during the last step
                run.interrupt(stop_signals.signum, bar)
            for remedy in run.remedies:
                remedy.begin_step()  # e.g. the autoencoder phase's hand-off
            n_global = len(batches[state.batch_in_epoch])
            batch = run.shard(batches[state.batch_in_epoch])
            beta = run.beta()
            run.model.train()
            stats = {}  # e.g. aggressive training's encoder-only steps before the update
            for remedy in run.remedies:
                stats.update(remedy.before_update(batch, batches, beta))
            out = run.update(batch, n_global, beta)
            state.step += 1
            if t.lr_scheduler == "cosine":
                for sched in run.schedulers:
                    sched.step()
            state.batch_in_epoch += 1
            for remedy in run.remedies:
                remedy.after_step(out)
            window.add(out, batch, n_global, stats)
            bar.update(1)
            if state.step % t.log_every == 0:
                record = window.record(run, beta)
                run.write_log(record)
                bar.set_postfix(
                    {k: f"{record[k]:.3g}" for k in ("rec", "kl", "beta") if k in record}
                )
                window = _Window()
            stop = state.step >= total
            if t.eval_every and state.step % t.eval_every == 0:
                _validate(run)
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
            if not t.eval_every:
                _validate(run)
    if state.last_valid_step != state.step:
        _validate(run)


@dataclass
class _Run:
    """What the loop works with: the config, the run folder, the prepared model and optimizers
    (``optimizer``, the main one, for every parameter or for those no remedy takes:
    ``remedy_optimizers``), the LR schedules, the :class:`TrainerState`, the enabled remedies,
    the datasets and the log; its methods are the loop's steps that touch several of them.
    (:func:`_prepare` builds it in steps: the fields with defaults are filled there.)"""

    config: Config
    run_dir: Path
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    raw: torch.nn.Module  # the unwrapped model
    tokenizer: object
    state: TrainerState
    train_ds: TextDataset
    valid_ds: TextDataset
    objective: ObjectiveSettings
    on_validation: Callable[[dict], None] | None
    steps_per_epoch: int
    total: int  # the step budget
    optimizer: torch.optim.Optimizer | None = None
    remedy_optimizers: dict[str, list[torch.optim.Optimizer]] = field(default_factory=dict)
    schedulers: list = field(default_factory=list)  # one per optimizer, in optimizers' order
    fresh_schedules: list[dict] = field(default_factory=list)  # their state at the start
    remedies: list[Remedy] = field(default_factory=list)  # the enabled ones, in order
    log_defaults: dict = field(default_factory=dict)  # every registered remedy's log_defaults
    log_file: RunLog | None = None  # log.jsonl (main process only)
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # over processes; None: one

    @property
    def phase(self) -> Phase:
        """The phase of training the run is in: the first enabled remedy's that reports one
        (:meth:`~textvae.remedies.Remedy.phase`), else one phase from step 0."""
        for remedy in self.remedies:
            phase = remedy.phase()
            if phase is not None:
                return phase
        return Phase()

    def beta(self) -> float:
        """This step's KL weight: the schedule's (:func:`textvae.objectives.kl_weight`) counted
        from the start of the :attr:`phase` (0 in an autoencoder phase), then each remedy's
        :meth:`~textvae.remedies.Remedy.beta`."""
        phase = self.phase
        beta = (
            0.0 if phase.autoencoder else kl_weight(self.state.step - phase.start, self.config.kl)
        )
        for remedy in self.remedies:
            beta = remedy.beta(beta)
        return beta

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer: the main one, then the remedies' own."""
        return [self.optimizer, *(o for opts in self.remedy_optimizers.values() for o in opts)]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log_fields(self) -> dict:
        """The fields every ``log.jsonl`` record carries: each enabled remedy's
        :meth:`~textvae.remedies.Remedy.log_fields`, the ``log_defaults`` of those that are off."""
        fields = dict(self.log_defaults)
        for remedy in self.remedies:
            fields.update(remedy.log_fields())
        return fields

    def write_log(self, record: dict) -> None:
        """Append ``record`` (with :meth:`log_fields`: the phase, the aggressive flag) to
        ``log.jsonl`` and send its :data:`TRACKED` scalars to the trackers; main process only."""
        if self.log_file is not None:
            record = {**record, **self.log_fields()}
            self.log_file.write(record)
            if record["type"] in TRACKED and self.config.train.log_with != "none":
                self.accelerator.log(
                    {
                        f"{record['type']}/{k}": record[k]
                        for k in TRACKED[record["type"]]
                        if record.get(k) is not None
                    },
                    step=record["step"],
                )

    def start_phase(self) -> None:
        """A remedy began a new phase of training (after changing what its
        :meth:`~textvae.remedies.Remedy.phase` reports; Li et al. 2019's hand-off): the
        optimizers' state cleared and their LR back to ``train.lr``, the LR schedules back to
        their state at the start of the run, the best validation forgotten, and every enabled
        remedy's :meth:`~textvae.remedies.Remedy.phase_started`."""
        for opt in self.optimizers:
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = self.config.train.lr
        for sched, fresh in zip(self.schedulers, self.fresh_schedules, strict=True):
            sched.load_state_dict(copy.deepcopy(fresh))
        self.state.best_valid = math.inf
        for remedy in self.remedies:
            remedy.phase_started()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch; with N processes those of fewer than N sentences
        (at most the last, short one) are left out, since every process needs a share."""
        return _epoch_batches(
            self.train_ds, self.config.train, self.accelerator.num_processes, epoch
        )

    def shard(self, indices: list[int]) -> dict:
        """This process's share of a global batch (every N-th sentence: balanced lengths)."""
        rank, n_proc = self.accelerator.process_index, self.accelerator.num_processes
        return {
            k: v.to(self.accelerator.device)
            for k, v in self.train_ds.collate(indices[rank::n_proc]).items()
        }

    def loss(self, batch: dict, beta: float) -> dict:
        """The training objective on a batch; a non-finite loss stops the run."""
        # no KL target penalty in an autoencoder phase (which trains with KL weight 0)
        settings = self.objective.at(beta, kl_target=not self.phase.autoencoder)
        out = self.model(batch, settings)
        loss = out["loss"]
        if not torch.isfinite(loss):
            rec, kl = out["rec"].mean().item(), out["kl"].mean().item()
            step = self.state.step
            self.write_log(
                {"type": "event", "event": "non-finite loss", "step": step, "rec": rec, "kl": kl}
            )
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step} (rec {rec:.4g}, kl {kl:.4g}); "
                f"training stopped. The last good state is {self.run_dir / 'checkpoints' / 'last'}; "
                "lower train.lr or lengthen the KL warm-up, then resume or restart."
            )
        return out

    def update(self, batch: dict, n_global: int, beta: float) -> dict:
        """One optimizer step (:func:`optimizer_step`) on this process's share of a global batch
        of ``n_global`` sentences: the main optimizer, and the remedies' own whose
        :meth:`~textvae.remedies.Remedy.joint_update` says so; returns the objective's output."""
        n_proc = self.accelerator.num_processes
        out = self.loss(batch, beta)
        # DDP averages the processes' gradients: weigh each by its share of the batch, so
        # the update is that of the mean over the global batch (weight 1 when equal)
        share = batch["input_ids"].size(0) * n_proc / n_global
        stepped = [self.optimizer]
        for remedy in self.remedies:  # e.g. while aggressive, the decoder side only
            stepped += remedy.optimizers if remedy.joint_update() else []
        optimizer_step(
            out["loss"] if share == 1 else out["loss"] * share,
            self.model,
            stepped,
            self.config.train.grad_clip,
            backward=self.accelerator.backward,
            clip_grad_norm=self.accelerator.clip_grad_norm_,
            after_backward=self.after_backward,
        )
        return out

    def after_backward(self) -> None:
        """Each remedy's :meth:`~textvae.remedies.Remedy.after_backward` (e.g. phase ``ae``'s
        frozen decoder drops its gradients)."""
        for remedy in self.remedies:
            remedy.after_backward()

    def save_last(self) -> None:
        """``checkpoints/last``: every process saves its own RNG state into the same folder;
        the main one commits it."""
        last = checkpoint_path(self.run_dir, "last")
        tmp = temp_dir(last) if self.main else last.with_name("last.tmp")
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.main:
            commit_dir(tmp, last)

    def save_best(self) -> None:
        """``checkpoints/best``: the weights and the trainer state (main process)."""
        if self.main:
            write_weights(
                self.run_dir,
                "best",
                self.raw.state_dict(),
                {"trainer_state.json": self.state.state_dict()},
            )

    def interrupt(self, signum: int, bar) -> None:
        """Stop after a finished step on SIGINT/SIGTERM: checkpoint, log, raise.

        Raises:
            TrainingInterrupted: always.
        """
        self.save_last()
        self.write_log(
            {
                "type": "event",
                "event": "interrupted",
                "step": self.state.step,
                "signal": signal.Signals(signum).name,
            }
        )
        bar.close()
        if self.log_file is not None:
            self.log_file.close()
        raise TrainingInterrupted(signum, self.state.step, self.run_dir)


class _Window:
    """The running sums of one ``train`` log record (``train.log_every`` steps): this process's
    share of the global batch means, summed over processes when the record is written."""

    def __init__(self):
        self.loss = self.rec = self.kl = self.bow = self.cls = 0.0
        self.n_cls = self.n = self.tokens = 0
        self.stats: dict[str, float] = {}  # the remedies' numbers (e.g. inner_steps), summed
        self.t0 = time.perf_counter()

    def add(self, out: dict, batch: dict, n_global: int, stats: dict) -> None:
        n_local = batch["input_ids"].size(0)
        self.loss += out["loss"].item() * n_local / n_global
        self.rec += out["rec"].sum().item() / n_global
        self.kl += out["kl"].sum().item() / n_global
        if out["bow"] is not None:
            self.bow += out["bow"].sum().item() / n_global
        if out.get("cls") is not None:
            self.cls += out["cls"].item()
            self.n_cls += 1
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0) + value
        self.n += 1
        self.tokens += int(batch["attention_mask"].sum())

    def record(self, run: _Run, beta: float) -> dict:
        """The ``train`` record of the window (window means, nats per sentence)."""
        n, dt = self.n, time.perf_counter() - self.t0
        sums = {"loss": self.loss, "rec": self.rec, "kl": self.kl, "bow": self.bow}
        sums["tokens"] = self.tokens
        if run.all_sum is not None:
            total = run.all_sum(
                torch.tensor([float(v) for v in sums.values()], dtype=torch.float64)
            )
            sums = dict(zip(sums, total.tolist(), strict=True))
        record = {
            "type": "train",
            "step": run.state.step,
            "epoch": run.state.epoch,
            "loss": sums["loss"] / n,
            "rec": sums["rec"] / n,
            "lr": run.optimizer.param_groups[0]["lr"],
            "tokens_per_s": sums["tokens"] / max(dt, 1e-9),
        }
        if run.raw.has_latent:  # a model without latent has no KL term and no KL weight
            record["kl"], record["beta"] = sums["kl"] / n, beta
        if run.raw.bow_head is not None:
            record["bow"] = sums["bow"] / n
        if self.n_cls:  # classifier cross-entropy, nats per labelled sentence
            record["cls"] = self.cls / self.n_cls
        for key, value in self.stats.items():  # window means of the remedies' numbers
            record[key] = value / n
        return record


def _validate(run: _Run) -> dict:
    """Validation: :func:`textvae.metrics.evaluate` on the validation split (single sample, no IW
    bound), its ``valid`` log record, the validation-time remedies (collapse watch, autoencoder
    phase best and early stop, aggressive switch-off), the LR schedules, prior samples into
    ``samples.txt``, ``checkpoints/best`` when the ELBO improved, then ``checkpoints/last``."""
    config, state, raw = run.config, run.state, run.raw
    t = config.train
    m = evaluate(
        raw,
        run.valid_ds,
        iw_samples=0,
        au_delta=config.eval.au_delta,
        batch_size=config.eval.batch_size,
        chunk_tokens=config.eval.chunk_tokens,
        precision=t.precision,
        seed=t.seed,
        num_processes=run.accelerator.num_processes,
        process_index=run.accelerator.process_index,
    )
    record = {
        "type": "valid",
        "step": state.step,
        "epoch": state.epoch,
        **({"beta": run.beta()} if raw.has_latent else {}),
        **{k: m[k] for k in VALID_FIELDS},
    }
    run.write_log(record)
    if raw.has_latent:
        log.info(
            "step %d: valid elbo %.2f rec %.2f kl %.3f mi %.3f au %d/%d z_gap %.3f (nats/sentence)",
            state.step,
            m["elbo"],
            m["rec"],
            m["kl"],
            math.nan if m["mi"] is None else m["mi"],
            m["au"],
            math.prod(raw.latent_shape),
            m["z_gap"] if m["z_gap"] is not None else math.nan,
        )
        for remedy in run.remedies:
            remedy.validation(m)  # collapse watch, phase-1 best and early stop, aggressive off
    else:  # a model without latent: its ELBO is log p(x), exact
        log.info("step %d: valid nll %.2f (nats/sentence)", state.step, -m["elbo"])
    loss = -m["elbo"]
    if t.lr_scheduler == "plateau":
        for sched in run.schedulers:
            sched.step(loss)
    _write_samples(run)
    state.last_valid_step = state.step
    if loss < state.best_valid:
        state.best_valid = loss
        run.save_best()
    run.save_last()
    if run.on_validation is not None:
        run.on_validation(record)
    return record


# the evaluation fields of a ``valid`` log record
VALID_FIELDS = (
    "elbo",
    "rec",
    "kl",
    "mi",
    "mi_batch",
    "au",
    "au_delta",
    "z_gap",
    "kl_per_dim",
    "encoder_dispersion",
)


def _write_samples(run: _Run) -> None:
    """Greedy decodings of z ~ p(z) into ``samples.txt`` (they show what z encodes); a model
    without z samples ancestrally; a conditional model answers the first validation contexts
    from z ~ p(z|c). Under a forked RNG seeded by the step."""
    raw, t, step = run.raw, run.config.train, run.state.step
    strategy = "greedy" if raw.has_latent else "sample"
    what = "prior samples"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed + step)
        if not t.num_samples:
            samples = []
        elif raw.conditional:
            contexts = run.valid_ds.contexts[: t.num_samples]
            responses = respond(raw, contexts, 1, strategy=strategy)
            samples = [f"{c} => {r[0]}" for c, r in zip(contexts, responses, strict=True)]
            what = "responses (context => response)"
        else:
            samples = sample_prior(raw, t.num_samples, strategy=strategy)
    if run.main:
        with open(run.run_dir / "samples.txt", "a") as fh:
            fh.write(f"# step {step}, {what}, {strategy}\n" + "".join(s + "\n" for s in samples))
