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
  ``phase`` at a phase hand-off, ``aggressive off``, ``non-finite loss``, ``finished``).
- ``checkpoints/last/``: the full training state (``accelerate.save_state``: model weights as
  safetensors, optimizer, RNG states, LR scheduler, :class:`TrainerState` with the step that
  drives the beta schedule and the data position), written at every validation.
- ``checkpoints/best/model.safetensors``: the weights of the best validation ELBO.
- ``samples.txt``: at each validation, greedy decodings of z ~ p(z) (ancestral samples for a
  model without latent; for a conditional model, one greedy response from z ~ p(z|c) to each of
  the first validation contexts).

Training-schedule remedies (the model-side ones live in the model and its config):

- ``kl.cycle_epochs`` > 0 sets the cyclical KL schedule's period in epochs: it is turned into
  ``kl.cycle_steps`` from the number of batches per epoch when training starts
  (:func:`resolve_cycle`; a ``kl cycle`` event records the value), DELLA's 2-epoch cycles.

- Phases (Li et al. 2019, "A Surprisingly Effective Fix for Deep Latent Variable Modeling of
  Text"): with ``train.ae_pretrain_steps`` = N > 0 the run starts in phase ``ae`` (an
  autoencoder through the z bottleneck: KL weight 0, z still sampled, as their beta = 0 run)
  and at step N hands off to phase ``vae``: :func:`reset_generative` re-initialises the decoder
  side, the optimizer state and LR schedule start afresh, and the KL schedule counts from the
  phase start (:func:`phase_beta`). Phase and boundary live in :class:`TrainerState`, so a
  resume on either side of the boundary continues exactly.
- The same two phases as Park & Lee 2021 ("Finetuning Pretrained Transformers into Variational
  Autoencoders", the ``t5_vae`` model): ``train.ae_reset_decoder=false`` (phase 2 starts from
  the phase-1 weights), ``train.ae_patience`` (phase 1 ends early once the validation ``rec``
  has not improved for that many validations: :func:`update_ae_early_stop`; the hand-off event
  says ``reason``: ``steps`` or ``early stop``) and ``train.ae_freeze_decoder`` (phase 1 drops
  the gradients of the model's ``decoder_modules``: :func:`frozen_parameters`).
- Aggressive inference-network training (He et al. 2019, "Lagging Inference Networks and
  Posterior Collapse in Variational Autoencoders", Algorithm 1): while on, each step first runs
  :func:`aggressive_inner_loop` (encoder-only updates with their own optimizer) and then
  updates the decoder side only; :func:`update_aggressive` switches it off for good at the first
  validation whose MI is lower than the previous one. Both optimizers, the flag and the last MI
  are checkpointed.

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
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from textvae.atomic import commit_dir, temp_dir
from textvae.config import Config, ConfigError, KLConfig
from textvae.data import DataError, TextDataset, load_split, load_tokenizer, semi_supervised_labels
from textvae.generate import respond, sample_prior
from textvae.metrics import evaluate
from textvae.models import MODELS
from textvae.objectives import kl_weight
from textvae.rundir import (
    FINISHED,
    WEIGHTS,
    RunDirError,
    RunLog,
    checkpoint_dir,
    checkpoint_path,
    collapse_reason,
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


@dataclass
class TrainerState:
    """Position of a run, saved in every checkpoint: the optimizer step (which drives the beta
    schedule), the data position (epoch, next batch in it), the best validation loss, the
    training phase (``ae`` or ``vae``) with the step it began at, whether aggressive
    inference-network training is on, with the MI of the previous validation (nats), and the
    early stopping of phase ``ae`` (best validation rec in nats per sentence, validations
    without improvement since, and whether the phase is to end; :func:`update_ae_early_stop`)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid: float = math.inf
    last_valid_step: int = -1
    collapsed_validations: int = 0
    phase: str = "vae"
    phase_start: int = 0
    aggressive: bool = False
    last_mi: float | None = None
    ae_best_rec: float = math.inf
    ae_bad_validations: int = 0
    ae_stopped: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    # fused kernels (CPU and CUDA): ~3x faster updates of the 10k-row embedding/output tables
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


def phase_beta(state: TrainerState, kl: KLConfig) -> float:
    """The KL weight of the current step: 0 in phase ``ae``; in phase ``vae`` the schedule
    :func:`textvae.objectives.kl_weight` at ``state.step - state.phase_start`` (so a warm-up
    after autoencoder pretraining starts from its beginning, as Li et al. 2019's second run)."""
    if state.phase == "ae":
        return 0.0
    return kl_weight(state.step - state.phase_start, kl)


def resolve_cycle(kl: KLConfig, steps_per_epoch: int) -> KLConfig:
    """The KL config with the cyclical period in steps: ``cycle_steps`` = round(``cycle_epochs``
    * ``steps_per_epoch``) (at least 1) when ``cycle_epochs`` > 0 (DELLA's period of 2 epochs),
    else ``kl`` unchanged."""
    if kl.cycle_epochs <= 0:
        return kl
    return dataclasses.replace(kl, cycle_steps=max(1, round(kl.cycle_epochs * steps_per_epoch)))


def update_aggressive(state: TrainerState, mi: float) -> bool:
    """He et al. 2019's switch: aggressive training stops for good once the validation MI
    decreases (their code: ``if cur_mi - pre_mi < 0``, checked at each epoch; here at each
    validation, with the protocol's aggregate-posterior MI over the validation set). The first
    validation of a phase has no predecessor and never switches it off.

    Args:
        mi: I_q(x; z) of this validation, nats.

    Returns:
        True when this call switched aggressive training off.
    """
    if not state.aggressive:
        return False
    off = state.last_mi is not None and mi < state.last_mi
    state.last_mi = mi
    if off:
        state.aggressive = False
    return off


def update_ae_early_stop(state: TrainerState, rec: float, patience: int) -> bool:
    """Early stopping of the autoencoder phase on the validation reconstruction (Park & Lee
    2021's phase 1): a validation whose ``rec`` is below the phase's best resets the count,
    any other counts one; after ``patience`` in a row the phase is marked to end
    (``state.ae_stopped``; the hand-off happens before the next step). Does nothing outside
    phase ``ae`` or with ``patience`` 0.

    Args:
        rec: E_q[-log p(x|z)] of this validation, nats per sentence.

    Returns:
        True when this call ended the phase.
    """
    if state.phase != "ae" or patience <= 0 or state.ae_stopped:
        return False
    if rec < state.ae_best_rec:
        state.ae_best_rec, state.ae_bad_validations = rec, 0
        return False
    state.ae_bad_validations += 1
    state.ae_stopped = state.ae_bad_validations >= patience
    return state.ae_stopped


def frozen_parameters(model, config: Config, state: TrainerState) -> list[torch.nn.Parameter]:
    """The parameters held fixed at this step: the model's ``decoder_modules`` in phase ``ae``
    with ``train.ae_freeze_decoder`` (and its ``latent_projection_modules`` with
    ``train.ae_freeze_latent_projection``), else none. The loop drops their gradients before the
    update, so no optimizer (nor weight decay) moves them."""
    if not (config.train.ae_freeze_decoder and state.phase == "ae"):
        return []
    names = model.decoder_modules + (
        getattr(model, "latent_projection_modules", ())
        if config.train.ae_freeze_latent_projection
        else ()
    )
    return [
        p
        for name in names
        if getattr(model, name, None) is not None
        for p in getattr(model, name).parameters()
    ]


def aggressive_inner_loop(
    model,
    enc_optimizer: torch.optim.Optimizer,
    draw_batch: Callable[[int], dict],
    loss_of: Callable[[dict], torch.Tensor],
    max_inner: int,
    window: int,
    grad_clip: float,
    backward: Callable[[torch.Tensor], None] | None = None,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Encoder-only updates until the encoder's loss stops improving (He et al. 2019, Alg. 1).

    Step i (0-based) computes the training loss on ``draw_batch(i)`` (He et al.'s code: the
    current batch first, then random training batches), back-propagates, clips the inference
    network's gradient norm at ``grad_clip`` (0 = no clipping) and steps ``enc_optimizer``, whose
    parameters are the inference network's only: every other parameter is left unchanged
    (their gradients are computed and discarded). After every ``window`` steps the window's loss
    per token (sum over sentences / real tokens, EOS counted) is compared with the previous
    window's; the loop stops when it is higher, and after ``max_inner`` steps at most.

    Args:
        model: the unwrapped model (``inference_parameters()``, ``zero_grad``).
        loss_of: batch -> scalar training loss (mean over the batch of nats per sentence).
        backward: how to back-propagate (``accelerator.backward``); ``loss.backward`` if None.
        all_sum: sums a float64 tensor over processes (several processes must stop together:
            they compare the window losses of all their batches); None for one process.

    Returns:
        The number of encoder-only steps taken, 1 <= n <= max_inner.

    Raises:
        ValueError: ``max_inner`` or ``window`` < 1, or the model has no inference network.
    """
    if max_inner < 1 or window < 1:
        raise ValueError(f"max_inner ({max_inner}) and window ({window}) must be >= 1")
    params = model.inference_parameters()
    previous, total, tokens = math.inf, 0.0, 0
    for i in range(max_inner):
        batch = draw_batch(i)
        loss = loss_of(batch)
        model.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(loss)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        enc_optimizer.step()
        total += loss.item() * batch["input_ids"].size(0)
        tokens += int(batch["attention_mask"].sum())
        if (i + 1) % window == 0:
            sums = torch.tensor([total, float(tokens)], dtype=torch.float64)
            if all_sum is not None:
                sums = all_sum(sums)
            current = float(sums[0] / sums[1])
            if current > previous:
                break
            previous, total, tokens = current, 0.0, 0
    model.zero_grad(set_to_none=True)
    return i + 1


def reset_generative(model, config: Config, tokenizer) -> list[str]:
    """Li et al. 2019's decoder reset: every parameter and buffer outside the inference network
    (decoder, bag-of-words head) is set, in place, to its value in a model freshly built under
    ``torch.manual_seed(config.train.seed)``: the initialisation this run started from, as a
    second run with the same seed that loads the pretrained encoder. The caller's RNG is
    untouched; the inference network is kept.

    Returns:
        The ``state_dict`` keys that were reset.

    Raises:
        ValueError: the model names no inference network (``inference_modules``).
    """
    if not model.inference_modules:
        raise ValueError(f"{type(model).__name__} has no inference network to keep")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        fresh = MODELS[config.model.name](config.model, tokenizer)
    state = {k: v for k, v in fresh.state_dict().items() if not model.is_inference_key(k)}
    model.load_state_dict(state, strict=False)
    return sorted(state)


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
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

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
    t = config.train
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
    accelerator = Accelerator(
        mixed_precision="no" if t.precision == "fp32" else t.precision,
        cpu=cpu,
        log_with=None if t.log_with == "none" else t.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    set_seed(t.seed)
    main = accelerator.is_main_process
    n_proc, rank = accelerator.num_processes, accelerator.process_index
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
    if config.model.classifier_weight > 0:  # the classifier on z sees a fixed fraction of labels
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

    model = MODELS[config.model.name](config.model, tokenizer)
    if rank:  # identical initial weights everywhere; then each process its own noise
        set_seed(t.seed + rank)
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
    schedulers = []
    if t.lr_scheduler == "plateau":
        schedulers = [
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                o, mode="min", factor=t.lr_decay, patience=t.lr_patience, min_lr=t.lr_min
            )
            for o in optimizers
        ]
    fresh_schedules = [copy.deepcopy(s.state_dict()) for s in schedulers]
    model, *optimizers = accelerator.prepare(model, *optimizers)
    optimizer = optimizers[0]
    enc_optimizer = optimizers[1] if enc_optimizer is not None else None
    state = TrainerState()
    if not resume:
        state.phase = "ae" if t.ae_pretrain_steps > 0 else "vae"
        state.aggressive = t.aggressive and state.phase == "vae"
    accelerator.register_for_checkpointing(state)
    for sched in schedulers:
        accelerator.register_for_checkpointing(sched)
    if resume:
        accelerator.load_state(str(checkpoint_dir(run_dir, "last")))
    raw = accelerator.unwrap_model(model)
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

    def write_log(record: dict) -> None:
        if log_file is not None:
            record = {**record, "phase": state.phase, "aggressive": state.aggressive}
            log_file.write(record)
            if record["type"] in TRACKED and t.log_with != "none":
                accelerator.log(
                    {
                        f"{record['type']}/{k}": record[k]
                        for k in TRACKED[record["type"]]
                        if record.get(k) is not None
                    },
                    step=record["step"],
                )

    if resume:
        write_log({"type": "event", "event": "resume", "step": state.step})

    def check_collapse(m: dict) -> None:
        """Count validations in a row with KL or z-usage gap under threshold; warn past patience."""
        low_gap = m["z_gap"] is not None and m["z_gap"] < t.collapse_z_gap
        if m["kl"] < t.collapse_kl or low_gap:
            state.collapsed_validations += 1
        else:
            state.collapsed_validations = 0
        if t.collapse_patience and state.collapsed_validations >= t.collapse_patience:
            gap = "n/a" if m["z_gap"] is None else f"{m['z_gap']:.3f}"
            reason = collapse_reason(m["kl"], m["z_gap"], t.collapse_kl, t.collapse_z_gap)
            message = (
                f"posterior collapse? for {state.collapsed_validations} validations in a "
                f"row KL < {t.collapse_kl} or z-usage gap < {t.collapse_z_gap} nats/sentence "
                f"(now KL {m['kl']:.3f}, z_gap {gap}, AU {m['au']}): {reason}; consider "
                "free bits, a longer KL warm-up or pooling"
            )
            log.warning("step %d: %s", state.step, message)
            write_log(
                {
                    "type": "warning",
                    "warning": "posterior collapse",
                    "step": state.step,
                    "kl": m["kl"],
                    "z_gap": m["z_gap"],
                    "au": m["au"],
                    "validations": state.collapsed_validations,
                    "message": message,
                }
            )

    def validate() -> dict:
        m = evaluate(
            raw,
            valid_ds,
            iw_samples=0,
            au_delta=config.eval.au_delta,
            batch_size=config.eval.batch_size,
            chunk_tokens=config.eval.chunk_tokens,
            precision=t.precision,
            seed=t.seed,
            num_processes=n_proc,
            process_index=rank,
        )
        record = {
            "type": "valid",
            "step": state.step,
            "epoch": state.epoch,
            "beta": phase_beta(state, config.kl),
            **{
                k: m[k]
                for k in (
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
            },
        }
        write_log(record)
        if raw.has_latent:
            log.info(
                "step %d: valid elbo %.2f rec %.2f kl %.3f mi %.3f au %d/%d z_gap %.3f "
                "(nats/sentence)",
                state.step,
                m["elbo"],
                m["rec"],
                m["kl"],
                math.nan if m["mi"] is None else m["mi"],
                m["au"],
                math.prod(raw.latent_shape),
                m["z_gap"] if m["z_gap"] is not None else math.nan,
            )
            check_collapse(m)
            if state.phase == "ae" and m["rec"] < state.ae_best_rec:
                save_ae_best(m["rec"])  # phase 2 may start from here (train.ae_start: best)
                if not t.ae_patience:  # update_ae_early_stop tracks it when it runs
                    state.ae_best_rec = m["rec"]
            if update_ae_early_stop(state, m["rec"], t.ae_patience):
                log.info(
                    "step %d: validation rec has not improved for %d validations: the "
                    "autoencoder phase ends",
                    state.step,
                    t.ae_patience,
                )
                write_log(
                    {
                        "type": "event",
                        "event": "ae early stop",
                        "step": state.step,
                        "rec": m["rec"],
                        "best_rec": state.ae_best_rec,
                    }
                )
            last_mi = state.last_mi
            if m["mi"] is not None and update_aggressive(
                state, m["mi"]
            ):  # None: a flow's I(x; z_K) failed
                log.info(
                    "step %d: validation MI fell from %.3f to %.3f nats: aggressive training off",
                    state.step,
                    last_mi,
                    m["mi"],
                )
                write_log(
                    {
                        "type": "event",
                        "event": "aggressive off",
                        "step": state.step,
                        "mi": m["mi"],
                        "last_mi": last_mi,
                    }
                )
        loss = -m["elbo"]
        for sched in schedulers:
            sched.step(loss)
        # greedy decoding of z ~ p(z) shows what z encodes; a model without z samples ancestrally;
        # a conditional model answers the first validation contexts from z ~ p(z|c)
        strategy = "greedy" if raw.has_latent else "sample"
        what = "prior samples"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed + state.step)
            if not t.num_samples:
                samples = []
            elif raw.conditional:
                contexts = valid_ds.contexts[: t.num_samples]
                samples = [
                    f"{c} => {r[0]}"
                    for c, r in zip(
                        contexts, respond(raw, contexts, 1, strategy=strategy), strict=True
                    )
                ]
                what = "responses (context => response)"
            else:
                samples = sample_prior(raw, t.num_samples, strategy=strategy)
        state.last_valid_step = state.step
        if main:
            with open(run_dir / "samples.txt", "a") as fh:
                fh.write(
                    f"# step {state.step}, {what}, {strategy}\n"
                    + "".join(s + "\n" for s in samples)
                )
        if loss < state.best_valid:
            state.best_valid = loss
            if main:
                write_weights(
                    run_dir, "best", raw.state_dict(), {"trainer_state.json": state.state_dict()}
                )
        save_last()
        if on_validation is not None:
            on_validation(record)
        return record

    def save_last() -> None:
        # every process saves its own RNG state into the same folder; the main one commits it
        last = checkpoint_path(run_dir, "last")
        tmp = temp_dir(last) if main else last.with_name("last.tmp")
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            commit_dir(tmp, last)

    def forward(batch: dict, beta: float) -> dict:
        """The training objective on a batch; a non-finite loss stops the run."""
        # the KL target penalty is part of the VAE phase only (the AE phase trains with KL weight 0)
        target_weight = config.kl.target_weight if state.phase == "vae" else 0.0
        out = model(
            batch,
            beta=beta,
            free_bits=config.kl.free_bits,
            free_bits_mode=config.kl.free_bits_mode,
            kl_target=config.kl.target,
            kl_target_weight=target_weight,
        )
        loss = out["loss"]
        if not torch.isfinite(loss):
            rec, kl = out["rec"].mean().item(), out["kl"].mean().item()
            write_log(
                {
                    "type": "event",
                    "event": "non-finite loss",
                    "step": state.step,
                    "rec": rec,
                    "kl": kl,
                }
            )
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {state.step} (rec {rec:.4g}, kl {kl:.4g}); "
                f"training stopped. The last good state is {run_dir / 'checkpoints' / 'last'}; "
                "lower train.lr or lengthen the KL warm-up, then resume or restart."
            )
        return out

    def save_ae_best(rec: float) -> None:
        """The phase-1 weights of the best validation rec so far, ``checkpoints/ae_best``."""
        if not main:
            return
        write_weights(
            run_dir, "ae_best", raw.state_dict(), {"info.json": {"step": state.step, "rec": rec}}
        )

    def start_vae_phase() -> None:
        """Li et al. 2019 hand-off: decoder side re-initialised, optimizers and LR schedules as
        in a fresh run (the encoder keeps its pretrained weights), KL schedule from here. With
        ``train.ae_start: best`` the weights are first those of the best phase-1 validation rec
        (Park & Lee 2021's early stopping keeps its argmin), when a validation happened."""
        start = {"start": "last", "from_step": state.step}
        if t.ae_start == "best":
            accelerator.wait_for_everyone()
            folder = checkpoint_path(run_dir, "ae_best")
            if (folder / WEIGHTS).is_file():
                raw.load_state_dict(load_file(str(folder / WEIGHTS)))
                info = json.loads((folder / "info.json").read_text())
                start = {"start": "best", "from_step": info["step"], "best_rec": info["rec"]}
            else:
                start["start"] = "last (no phase-1 validation to choose from)"
        reset = reset_generative(raw, config, tokenizer) if t.ae_reset_decoder else []
        for opt in optimizers:
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = t.lr
        for sched, fresh in zip(schedulers, fresh_schedules, strict=True):
            sched.load_state_dict(copy.deepcopy(fresh))
        state.phase, state.phase_start = "vae", state.step
        state.best_valid, state.collapsed_validations = math.inf, 0
        state.aggressive, state.last_mi = t.aggressive, None
        reason = "early stop" if state.ae_stopped else "steps"
        log.info(
            "step %d: autoencoder pretraining done (%s); VAE phase starts (%d tensors "
            "re-initialised)",
            state.step,
            reason,
            len(reset),
        )
        write_log(
            {
                "type": "event",
                "event": "phase",
                "step": state.step,
                "reset": len(reset),
                "reason": reason,
                **start,
            }
        )

    def epoch_batches(epoch: int) -> list[list[int]]:
        """The global batches of an epoch; with N processes those of fewer than N sentences
        (at most the last, short one) are left out, since every process needs a share."""
        return [b for b in train_ds.batches(t.batch_size, True, t.seed, epoch) if len(b) >= n_proc]

    def shard(indices: list[int]) -> dict:
        """This process's share of a global batch (every N-th sentence: balanced lengths)."""
        return {
            k: v.to(accelerator.device) for k, v in train_ds.collate(indices[rank::n_proc]).items()
        }

    per_epoch = len(epoch_batches(0))
    total = t.max_steps if t.max_steps is not None else t.max_epochs * per_epoch
    if config.kl.cycle_epochs > 0:  # the cyclical period in epochs (DELLA: 2), now in steps
        config = dataclasses.replace(config, kl=resolve_cycle(config.kl, per_epoch))
        write_log(
            {
                "type": "event",
                "event": "kl cycle",
                "step": state.step,
                "cycle_epochs": config.kl.cycle_epochs,
                "cycle_steps": config.kl.cycle_steps,
            }
        )
    if state.phase == "ae" and total <= t.ae_pretrain_steps and not t.ae_patience:
        log.warning(
            "the budget (%d steps) ends within autoencoder pretraining (%d steps): no VAE "
            "phase in this run unless it is resumed with a larger budget",
            total,
            t.ae_pretrain_steps,
        )
    bar = tqdm(total=total, initial=state.step, disable=not (t.progress and main), desc="train")
    all_sum = None
    if n_proc > 1:  # the inner loops of all processes stop at the same step; logs sum shares

        def all_sum(x: torch.Tensor) -> torch.Tensor:
            return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()

    def new_window() -> dict:
        return {
            "loss": 0.0,
            "rec": 0.0,
            "kl": 0.0,
            "bow": 0.0,
            "cls": 0.0,
            "n_cls": 0,
            "inner": 0,
            "n": 0,
            "tokens": 0,
            "t0": time.perf_counter(),
        }

    window = new_window()
    stop = state.step >= total
    # log records (validation lines, collapse warnings) print above the progress bar
    with logging_redirect_tqdm():
        while not stop:
            batches = epoch_batches(state.epoch)  # global batches; each process takes its share
            while state.batch_in_epoch < len(batches) and not stop:
                if stop_signals.signum is not None:  # SIGINT/SIGTERM during the last step
                    save_last()
                    write_log(
                        {
                            "type": "event",
                            "event": "interrupted",
                            "step": state.step,
                            "signal": signal.Signals(stop_signals.signum).name,
                        }
                    )
                    bar.close()
                    if log_file is not None:
                        log_file.close()
                    raise TrainingInterrupted(stop_signals.signum, state.step, run_dir)
                if state.phase == "ae" and (state.step >= t.ae_pretrain_steps or state.ae_stopped):
                    start_vae_phase()
                n_global = len(batches[state.batch_in_epoch])
                batch = shard(batches[state.batch_in_epoch])
                n_local = batch["input_ids"].size(0)
                beta = phase_beta(state, config.kl)
                model.train()
                inner = 0
                if state.aggressive:
                    # the current batch first, then random batches drawn by a generator seeded by
                    # the step, so a resumed run draws the same ones
                    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + state.step)
                    picks = torch.randint(len(batches), (t.aggressive_max_inner,), generator=gen)

                    def draw(i: int, batch=batch, picks=picks, batches=batches) -> dict:
                        return batch if i == 0 else shard(batches[int(picks[i])])

                    inner = aggressive_inner_loop(
                        raw,
                        enc_optimizer,
                        draw,
                        lambda b, beta=beta: forward(b, beta)["loss"],
                        t.aggressive_max_inner,
                        t.aggressive_window,
                        t.grad_clip,
                        accelerator.backward,
                        all_sum,
                    )
                out = forward(batch, beta)
                loss = out["loss"]
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                # DDP averages the processes' gradients: weigh each by its share of the batch, so
                # the update is that of the mean over the global batch (weight 1 when equal)
                share = n_local * n_proc / n_global
                accelerator.backward(loss if share == 1 else loss * share)
                for p in frozen_parameters(raw, config, state):
                    p.grad = None  # phase ae with a frozen decoder: the optimizers skip them
                if t.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                if enc_optimizer is not None and not state.aggressive:
                    enc_optimizer.step()  # joint update; while aggressive the decoder side only
                state.step += 1
                state.batch_in_epoch += 1
                # this process's share of the global batch means (summed over processes below)
                window["loss"] += loss.item() * n_local / n_global
                window["rec"] += out["rec"].sum().item() / n_global
                window["kl"] += out["kl"].sum().item() / n_global
                if out["bow"] is not None:
                    window["bow"] += out["bow"].sum().item() / n_global
                if out.get("cls") is not None:
                    window["cls"] += out["cls"].item()
                    window["n_cls"] += 1
                window["inner"] += inner
                window["n"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                bar.update(1)
                if state.step % t.log_every == 0:
                    n, dt = window["n"], time.perf_counter() - window["t0"]
                    if all_sum is not None:
                        keys = ("loss", "rec", "kl", "bow", "tokens")
                        sums = all_sum(
                            torch.tensor([float(window[k]) for k in keys], dtype=torch.float64)
                        )
                        window.update(zip(keys, sums.tolist(), strict=True))
                    record = {
                        "type": "train",
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": window["loss"] / n,
                        "rec": window["rec"] / n,
                        "kl": window["kl"] / n,
                        "beta": beta,
                        "lr": optimizer.param_groups[0]["lr"],
                        "tokens_per_s": window["tokens"] / max(dt, 1e-9),
                    }
                    if raw.bow_head is not None:
                        record["bow"] = window["bow"] / n
                    if window["n_cls"]:  # classifier cross-entropy, nats per labelled sentence
                        record["cls"] = window["cls"] / window["n_cls"]
                    if t.aggressive:
                        record["inner_steps"] = window["inner"] / n
                    write_log(record)
                    bar.set_postfix(
                        rec=f"{record['rec']:.2f}", kl=f"{record['kl']:.2f}", beta=f"{beta:.3f}"
                    )
                    window = new_window()
                stop = state.step >= total
                if t.eval_every and state.step % t.eval_every == 0:
                    validate()
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
                if not t.eval_every:
                    validate()
        if state.last_valid_step != state.step:
            validate()
        bar.close()
    if log_file is not None:
        write_log({"type": "event", "event": FINISHED, "step": state.step})
        log_file.close()
    accelerator.end_training()
    return run_dir
