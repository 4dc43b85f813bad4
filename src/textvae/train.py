"""The training loop: one loop, read top to bottom, through ``accelerate``.

A run folder holds:

- ``config.yaml``: the resolved config; ``tokenizer/``: ``save_pretrained`` output;
  ``data.json``: corpus sources and counts (blank lines skipped, sentences truncated/dropped).
- ``log.jsonl``: one JSON object per line, each with ``phase`` (``ae`` or ``vae``) and
  ``aggressive`` (aggressive inference-network training on at that point): ``{"type": "train",
  step, epoch, loss, rec, kl, beta, lr, tokens_per_s}`` every ``train.log_every`` steps (window
  means; nats per sentence; plus ``bow`` with a bag-of-words head and ``inner_steps``, the mean
  encoder-only steps per step, with ``train.aggressive``) and
  ``{"type": "valid", step, epoch, beta, elbo, rec, kl, mi, mi_batch, au, au_delta, z_gap,
  kl_per_dim}`` at each validation (single-sample ELBO on the validation split; ``z_gap`` is
  the z-usage gap of :func:`textvae.metrics.z_usage_gap`; ``kl`` is a one-sample Monte Carlo
  estimate and ``kl_per_dim`` null when the KL has no closed form, e.g. with a flow), ``{"type": "warning", "warning":
  "posterior collapse", step, kl, z_gap, validations, message}`` when KL or z-usage gap have
  stayed under ``train.collapse_kl`` / ``train.collapse_z_gap`` for
  ``train.collapse_patience`` validations in a row, plus ``{"type": "event", ...}`` (``resume``,
  ``phase`` at a phase hand-off, ``aggressive off``, ``non-finite loss``, ``finished``, and
  ``precision`` with ``requested`` and ``ran`` when bf16 ran as fp32 on a device without native
  bfloat16).
- ``checkpoints/last/``: the full training state (``accelerate.save_state``: model weights as
  safetensors, optimizer, RNG states, LR scheduler, :class:`~textvae.remedies.TrainerState` with the step that
  drives the beta schedule and the data position), written at every validation.
- ``checkpoints/best/model.safetensors``: the weights of the best validation ELBO.
- ``samples.txt``: at each validation, greedy decodings of z ~ p(z) (ancestral samples for a
  model without latent; for a conditional model, one greedy response from z ~ p(z|c) to each of
  the first validation contexts).

The loop (``_loop``) reads top to bottom: for each global batch, each remedy's
``begin_step`` (e.g. the phase hand-off when due), this step's beta (the schedule's, then each
remedy's ``beta``), each remedy's ``before_update`` (e.g. the aggressive encoder-only steps
while on), one optimizer step (each remedy's ``after_backward`` between the backward pass and
the update), each remedy's ``after_step``, a ``train`` record every ``train.log_every`` steps,
and validation (``_validate``: evaluation, the ``valid`` record, each remedy's ``validation``,
LR schedules, samples and checkpoints) every ``train.eval_every`` steps or at each epoch's end.
The objective's settings are built once (:class:`textvae.objectives.ObjectiveSettings`). The
training-schedule remedies are the classes registered in :mod:`textvae.remedies`
(:class:`~textvae.remedies.Remedy`); the loop builds those the config switches on and calls
their hooks without naming any. Their state is in the checkpointed
:class:`~textvae.remedies.TrainerState` (the model-side remedies live in the model and its
config):

- :class:`~textvae.remedies.KLCycle`: ``kl.cycle_epochs`` > 0 sets the cyclical KL schedule's
  period in epochs, turned into ``kl.cycle_steps`` from the number of batches per epoch when
  training starts (a ``kl cycle`` event records the value), DELLA's 2-epoch cycles.
- :class:`~textvae.remedies.CollapseWatch`: the ``posterior collapse`` warning.
- :class:`~textvae.remedies.AEPretraining`, phases (Li et al. 2019, "A Surprisingly Effective
  Fix for Deep Latent Variable Modeling of Text"): with ``train.ae_pretrain_steps`` = N > 0 the
  run starts in phase ``ae`` (an autoencoder through the z bottleneck: KL weight 0, z still
  sampled, as their beta = 0 run) and at step N hands off to phase ``vae``: the decoder side is
  re-initialised, the optimizer state and LR schedule start afresh, and the KL schedule counts
  from the phase start (:func:`~textvae.remedies.phase_beta`). Phase and boundary live in the
  trainer state, so a resume on either side of the boundary continues exactly. The same two
  phases as Park & Lee 2021 ("Finetuning Pretrained Transformers into Variational
  Autoencoders", the ``t5_vae`` model): ``train.ae_reset_decoder=false`` (phase 2 starts from
  the phase-1 weights), ``train.ae_patience`` (phase 1 ends early once the validation ``rec``
  has not improved for that many validations; the hand-off event says ``reason``: ``steps`` or
  ``early stop``) and ``train.ae_freeze_decoder`` (phase 1 drops the gradients of the model's
  ``decoder_modules``).
- :class:`~textvae.remedies.AggressiveTraining` (He et al. 2019, "Lagging Inference Networks
  and Posterior Collapse in Variational Autoencoders", Algorithm 1): while on, each step first
  runs encoder-only updates with their own optimizer (built here: the inference network's
  parameters apart) and then updates the decoder side only; it is switched off for good at the
  first validation whose MI is lower than the previous one. Both optimizers, the flag and the
  last MI are checkpointed.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textvae import remedies
from textvae.atomic import commit_dir, temp_dir
from textvae.config import Config, ConfigError, TrainConfig
from textvae.data import DataError, TextDataset, load_split, load_tokenizer, semi_supervised_labels
from textvae.generate import respond, sample_prior
from textvae.metrics import evaluate, runnable_precision
from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings
from textvae.registry import discover_remedies
from textvae.remedies import Remedy, TrainerState
from textvae.rundir import (
    FINISHED,
    RunDirError,
    RunLog,
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a finished step; ``checkpoints/last`` holds
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


def _optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    # fused kernels (CPU and CUDA): ~3x faster updates of the 10k-row embedding/output tables
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


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
    each epoch's end when that is 0, and once more at the end of training. The phases of
    ``train.ae_pretrain_steps`` and aggressive training (``train.aggressive``) are described in
    the module docstring.

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
        total,
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
    if resume:
        run.write_log({"type": "event", "event": "resume", "step": state.step})
    ran = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    if ran != t.precision:  # bf16 on a device without native bfloat16 (textvae.precision)
        run.write_log(
            {
                "type": "event",
                "event": "precision",
                "step": state.step,
                "requested": t.precision,
                "ran": ran,
            }
        )
    run.steps_per_epoch, run.total = per_epoch, total
    # every registered remedy the config switches on, in registration order (textvae.remedies)
    run.remedies = [r(run) for r in discover_remedies().values() if r.enabled(config)]
    for remedy in run.remedies:
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
    # the classifier on z (a key of lstm_vae only) sees a fixed fraction of labels
    if getattr(config.model, "classifier_weight", 0.0) > 0:
        if train_labels is None:
            raise DataError(
                f"model.classifier_weight > 0 needs labels, and {train_corpus.source} "
                "has none: use a labelled corpus (yelp_sentiment) or data.label_field"
            )
        train_labels = semi_supervised_labels(train_labels, config.model.classifier_label_fraction)
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


def _lr_schedulers(
    t: TrainConfig, optimizers: list[torch.optim.Optimizer], state: TrainerState, total: int
) -> list:
    """One LR schedule per optimizer (``train.lr_scheduler``): none for ``constant``;
    ``ReduceLROnPlateau`` for ``plateau`` (stepped at each validation with the validation loss);
    for ``cosine`` a ``LambdaLR`` stepped after each optimizer step, whose factor is read from
    ``state`` (the step and the phase's start), so a resumed run and the autoencoder phase's
    hand-off need nothing of the schedule's own count. ``total``: the run's step budget."""
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
        if state.phase == "ae":
            return 1.0
        span = max(1, total - state.phase_start)
        done = min(1.0, (state.step - state.phase_start) / span)
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
    total: int,
) -> _Run:
    """The optimizers and LR schedules, all prepared by accelerate with the model; the trainer
    state (a new run's, or the checkpoint's with every RNG, optimizer and schedule when
    resuming); the log and the trackers: the :class:`_Run` the loop works with."""
    t = config.train
    train_ds, valid_ds = datasets
    # aggressive training (He et al. 2019) updates the two halves apart: its own optimizer for
    # the inference network, the main one for the rest; otherwise one optimizer for everything
    enc_optimizer = None
    if t.aggressive:
        optimizer = _optimizer(
            config, [p for n, p in model.named_parameters() if not model.is_inference_key(n)]
        )
        enc_optimizer = _optimizer(config, model.inference_parameters())
    else:
        optimizer = _optimizer(config, model.parameters())
    optimizers = [o for o in (optimizer, enc_optimizer) if o is not None]
    state = remedies.initial_state(t) if not resume else TrainerState()  # resume: loaded below
    schedulers = _lr_schedulers(t, optimizers, state, total)
    fresh_schedules = [copy.deepcopy(s.state_dict()) for s in schedulers]
    model, *optimizers = accelerator.prepare(model, *optimizers)
    optimizer = optimizers[0]
    enc_optimizer = optimizers[1] if enc_optimizer is not None else None
    accelerator.register_for_checkpointing(state)
    for sched in schedulers:
        accelerator.register_for_checkpointing(sched)
    if resume:
        accelerator.load_state(str(checkpoint_dir(run_dir, "last")))
    main = accelerator.is_main_process
    log_file = RunLog(run_dir) if main else None
    if main and t.log_with != "none":
        params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flat_config(config).items()
        }
        accelerator.init_trackers(
            "textvae",
            config=params,
            init_kwargs={"wandb": {"name": run_dir.name}, "mlflow": {"run_name": run_dir.name}},
        )
    all_sum = None
    if accelerator.num_processes > 1:  # inner loops stop together; logs sum the shares

        def all_sum(x: torch.Tensor) -> torch.Tensor:
            return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()

    return _Run(
        config=config,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        raw=accelerator.unwrap_model(model),
        tokenizer=tokenizer,
        optimizer=optimizer,
        enc_optimizer=enc_optimizer,
        schedulers=schedulers,
        fresh_schedules=fresh_schedules,
        state=state,
        train_ds=train_ds,
        valid_ds=valid_ds,
        objective=ObjectiveSettings.from_config(config.kl),
        log_file=log_file,
        on_validation=on_validation,
        all_sum=all_sum,
    )


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
                    rec=f"{record['rec']:.2f}", kl=f"{record['kl']:.2f}", beta=f"{beta:.3f}"
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
    (``optimizer`` for everything, or for the generative side while ``enc_optimizer`` has the
    inference network, with ``train.aggressive``), the :class:`TrainerState`, the datasets and
    the log; its methods are the loop's steps that touch several of them."""

    config: Config
    run_dir: Path
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    raw: torch.nn.Module  # the unwrapped model
    tokenizer: object
    optimizer: torch.optim.Optimizer
    enc_optimizer: torch.optim.Optimizer | None
    schedulers: list
    fresh_schedules: list[dict]
    state: TrainerState
    train_ds: TextDataset
    valid_ds: TextDataset
    objective: ObjectiveSettings
    log_file: RunLog | None  # log.jsonl (main process only)
    on_validation: Callable[[dict], None] | None
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None  # sum over processes; None for one
    remedies: list[Remedy] = field(default_factory=list)  # the enabled ones, in order
    total: int = 0  # the step budget
    steps_per_epoch: int = 0

    def beta(self) -> float:
        """This step's KL weight: the schedule's (:func:`remedies.phase_beta`: 0 in phase
        ``ae``), then each remedy's :meth:`~textvae.remedies.Remedy.beta`."""
        beta = remedies.phase_beta(self.state, self.config.kl)
        for remedy in self.remedies:
            beta = remedy.beta(beta)
        return beta

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.enc_optimizer) if o is not None]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def write_log(self, record: dict) -> None:
        """Append ``record`` (with the phase and the aggressive flag) to ``log.jsonl`` and send
        its :data:`TRACKED` scalars to the trackers; main process only."""
        if self.log_file is not None:
            record = {**record, "phase": self.state.phase, "aggressive": self.state.aggressive}
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
        # the KL target penalty is part of the VAE phase only (the AE phase trains with KL weight 0)
        out = self.model(batch, self.objective.at(beta, kl_target=self.state.phase == "vae"))
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
        """One optimizer step on this process's share of a global batch of ``n_global``
        sentences; returns the objective's output."""
        t, n_proc = self.config.train, self.accelerator.num_processes
        out = self.loss(batch, beta)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: weigh each by its share of the batch, so
        # the update is that of the mean over the global batch (weight 1 when equal)
        share = batch["input_ids"].size(0) * n_proc / n_global
        self.accelerator.backward(out["loss"] if share == 1 else out["loss"] * share)
        for remedy in self.remedies:
            remedy.after_backward()  # e.g. phase ae's frozen decoder drops its gradients
        if t.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        if self.enc_optimizer is not None and not self.state.aggressive:
            self.enc_optimizer.step()  # joint update; while aggressive the decoder side only
        return out

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
            "kl": sums["kl"] / n,
            "beta": beta,
            "lr": run.optimizer.param_groups[0]["lr"],
            "tokens_per_s": sums["tokens"] / max(dt, 1e-9),
        }
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
        "beta": run.beta(),
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
