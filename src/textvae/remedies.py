"""The training-schedule remedies against posterior collapse, as small pieces the training loop
(:mod:`textvae.train`) calls; each reads and updates the run's :class:`TrainerState`, which is
checkpointed, so a resume on either side of any switch continues exactly. The model-side
remedies (free bits, bag-of-words, pooling, flows, ...) live with the models and the objective.

- **Cyclical / phase KL schedule**: :func:`phase_beta` is the KL weight of a step (0 in the
  autoencoder phase, else :func:`textvae.objectives.kl_weight` counted from the phase start);
  :func:`resolve_cycle` turns ``kl.cycle_epochs`` into ``kl.cycle_steps`` (DELLA's 2-epoch
  cycles, Fu et al. 2019).
- **Autoencoder pretraining** (Li et al. 2019; Park & Lee 2021's phase 1):
  :func:`initial_state` starts a run in phase ``ae`` with ``train.ae_pretrain_steps`` > 0;
  :func:`frozen_parameters` names what ``train.ae_freeze_decoder`` holds fixed;
  :func:`ae_best_improved` and :func:`update_ae_early_stop` follow the validation rec;
  :func:`ae_phase_over` says when to hand off and :func:`start_vae_phase` does it (decoder reset
  by :func:`reset_generative`, fresh optimizer state and LR schedules, KL schedule from there).
- **Aggressive inference-network training** (He et al. 2019): :func:`aggressive_picks` and
  :func:`aggressive_inner_loop` run the encoder-only steps, :func:`update_aggressive` switches it
  off at the first validation whose MI falls.
- **Collapse watch**: :func:`update_collapse` counts validations in a row with KL or z-usage
  gap under threshold and says when to warn.

A new remedy: its state as a field of :class:`TrainerState` (default = off, so older checkpoints
load), its pieces here with a test in ``tests/test_remedies_train.py``, and one call from the
loop (``train._loop`` for a step-time remedy, ``train._validate`` for a validation-time one);
its config keys in ``TrainConfig``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from textvae.config import Config, KLConfig, TrainConfig
from textvae.models import MODELS
from textvae.objectives import kl_weight


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


def initial_state(t: TrainConfig) -> TrainerState:
    """The state of a new run: phase ``ae`` with ``train.ae_pretrain_steps`` > 0 (else ``vae``);
    aggressive training on from the start when asked for and no autoencoder phase comes first."""
    phase = "ae" if t.ae_pretrain_steps > 0 else "vae"
    return TrainerState(phase=phase, aggressive=t.aggressive and phase == "vae")


def update_collapse(state: TrainerState, kl: float, z_gap: float | None, t: TrainConfig) -> bool:
    """The collapse watch: one more validation in a row with KL < ``train.collapse_kl`` or z-usage
    gap < ``train.collapse_z_gap`` (nats per sentence; a missing gap never counts), or the count
    back to 0.

    Returns:
        True when the count has reached ``train.collapse_patience`` (> 0): warn now.
    """
    low_gap = z_gap is not None and z_gap < t.collapse_z_gap
    if kl < t.collapse_kl or low_gap:
        state.collapsed_validations += 1
    else:
        state.collapsed_validations = 0
    return bool(t.collapse_patience) and state.collapsed_validations >= t.collapse_patience


def ae_best_improved(state: TrainerState, rec: float, patience: int) -> bool:
    """Whether this validation's ``rec`` (nats per sentence) is the best of phase ``ae`` so far,
    so its weights are kept (``checkpoints/ae_best``, from which ``train.ae_start: best`` starts
    phase 2). Without early stopping (``patience`` 0) the best rec is recorded here; with it,
    :func:`update_ae_early_stop` records it."""
    if state.phase != "ae" or not rec < state.ae_best_rec:
        return False
    if not patience:
        state.ae_best_rec = rec
    return True


def ae_phase_over(state: TrainerState, t: TrainConfig) -> bool:
    """Whether the autoencoder phase ends before this step: its ``train.ae_pretrain_steps`` are
    done, or early stopping marked it (``state.ae_stopped``)."""
    return state.phase == "ae" and (state.step >= t.ae_pretrain_steps or state.ae_stopped)


def start_vae_phase(
    model,
    config: Config,
    tokenizer,
    state: TrainerState,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list,
    fresh_schedules: list[dict],
) -> list[str]:
    """Li et al. 2019's hand-off to phase ``vae``: the decoder side re-initialised
    (:func:`reset_generative`, with ``train.ae_reset_decoder``), the optimizers' state cleared
    and their LR back to ``train.lr``, the LR schedules back to ``fresh_schedules`` (their
    ``state_dict`` at the start of the run), the KL schedule counted from this step, the best
    validation and collapse count forgotten, aggressive training on when configured.

    Returns:
        The ``state_dict`` keys that were re-initialised.
    """
    t = config.train
    reset = reset_generative(model, config, tokenizer) if t.ae_reset_decoder else []
    for opt in optimizers:
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = t.lr
    for sched, fresh in zip(schedulers, fresh_schedules, strict=True):
        sched.load_state_dict(copy.deepcopy(fresh))
    state.phase, state.phase_start = "vae", state.step
    state.best_valid, state.collapsed_validations = math.inf, 0
    state.aggressive, state.last_mi = t.aggressive, None
    return reset


def aggressive_picks(seed: int, step: int, n_batches: int, max_inner: int) -> torch.Tensor:
    """The batch indices (max_inner,) of the inner loop's random batches at ``step``, drawn by a
    generator seeded by the step (He et al.'s code draws random training batches), so a resumed
    run draws the same ones and the global RNG is untouched. Index 0 is unused: the inner loop
    starts on the current batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n_batches, (max_inner,), generator=gen)
