"""The training-schedule remedies against posterior collapse: each one a :class:`Remedy`, a
class registered by name (:func:`textvae.registry.register_remedy`) that declares its own
config keys and implements the hooks the training loop (:mod:`textvae.train`) calls for every
registered remedy the config switches on. The loop names no remedy. Their state is checkpointed
with the run (:class:`TrainerState`), so a resume on either side of any switch continues
exactly. The model-side remedies (free bits, bag-of-words, pooling, flows, ...) live with the
models and the objective.

The built-in remedies, in the order their hooks run:

- :class:`KLCycle` (``kl.cycle_epochs``): the cyclical KL schedule's period in epochs (DELLA's
  2-epoch cycles, Fu et al. 2019), turned into ``kl.cycle_steps`` when training starts
  (:func:`resolve_cycle`). :func:`phase_beta` is the KL weight of a step (0 in the autoencoder
  phase, else :func:`textvae.objectives.kl_weight` counted from the phase start).
- :class:`CollapseWatch` (``train.collapse_*``, keys declared here by
  :class:`CollapseWatchKeys`): :func:`update_collapse` counts validations in a row with KL or
  z-usage gap under threshold and the remedy logs the warning.
- :class:`AEPretraining` (``train.ae_*``; Li et al. 2019; Park & Lee 2021's phase 1):
  :func:`initial_state` starts a run in phase ``ae`` with ``train.ae_pretrain_steps`` > 0;
  :func:`frozen_parameters` names what ``train.ae_freeze_decoder`` holds fixed;
  :func:`ae_best_improved` and :func:`update_ae_early_stop` follow the validation rec;
  :func:`ae_phase_over` says when to hand off and :func:`start_vae_phase` does it (decoder reset
  by :func:`reset_generative`, fresh optimizer state and LR schedules, KL schedule from there).
- :class:`AggressiveTraining` (``train.aggressive*``; He et al. 2019): :func:`aggressive_picks`
  and :func:`aggressive_inner_loop` run the encoder-only steps, :func:`update_aggressive`
  switches it off at the first validation whose MI falls. (Its second optimizer, for the
  inference network, is built with the others in :mod:`textvae.train`.)

A new remedy is one class (here, or in any module imported before the config is loaded, as
``tests/test_remedies_train.py`` does)::

    @dataclass
    class MyKeys:
        my_start: int = 0  # becomes train.my_start

    @register_remedy("my_remedy")
    class MyRemedy(Remedy):
        keys = MyKeys

        @classmethod
        def enabled(cls, config):
            return config.train.my_start > 0

        def beta(self, beta):
            return 0.0 if self.run.state.step < self.run.config.train.my_start else beta

with a test; no other file is edited.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from textvae.config import Config, KLConfig, TrainConfig
from textvae.models import MODELS
from textvae.objectives import kl_weight
from textvae.registry import register_remedy
from textvae.rundir import WEIGHTS, checkpoint_path, collapse_reason, write_weights

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """Position of a run, saved in every checkpoint: the optimizer step (which drives the beta
    schedule), the data position (epoch, next batch in it), the best validation loss, the
    training phase (``ae`` or ``vae``) with the step it began at, whether aggressive
    inference-network training is on, with the MI of the previous validation (nats), and the
    early stopping of phase ``ae`` (best validation rec in nats per sentence, validations
    without improvement since, and whether the phase is to end; :func:`update_ae_early_stop`),
    and ``remedies``: remedy name -> the state of a remedy that keeps its own
    (:attr:`Remedy.state`; absent from checkpoints written before, which load with it empty)."""

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
    remedies: dict[str, dict] = field(default_factory=dict)

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


# --- the remedies as hooks of the loop -------------------------------------------------------


class Remedy:
    """A training-schedule remedy: one class, registered by name with
    :func:`textvae.registry.register_remedy`, that declares its own config keys and acts
    through hooks the training loop calls, for every registered remedy that :meth:`enabled`
    switches on, in registration order.

    Class attributes:
        name: the registered name (set by the decorator).
        keys: a dataclass of the remedy's config keys with their defaults (or None): its fields
            become keys of the ``section`` (``train`` or ``kl``) of every config
            (:func:`textvae.config.section_class`), set in a preset's YAML or by
            ``train.<key>=value``, and stored in ``config.yaml``; a key another class declares
            is an error.
        section: ``train`` (default) or ``kl``.

    An instance lives for one training (a resume builds it again): ``self.run`` is the loop's
    state (``config``, ``state`` (:class:`TrainerState`), ``raw`` (the unwrapped model),
    ``model`` (as prepared), ``optimizers``, ``schedulers``, ``accelerator``, ``run_dir``,
    ``write_log(record)``, ``shard(indices)``, ``loss(batch, beta)``, ``total`` (the step
    budget)). A remedy keeps what must survive a resume in :attr:`state`, a JSON-able dict
    saved in every checkpoint.

    Hooks (all optional; the defaults do nothing):

    - :meth:`start`: once before the first step (also when a run is resumed);
    - :meth:`begin_step`: before each step's batch is drawn (e.g. a phase hand-off);
    - :meth:`beta`: this step's KL weight, given the schedule's (or the previous remedy's);
    - :meth:`before_update`: before the optimizer step, with the batch and the step's beta;
      returns numbers to average into the ``train`` log record (e.g. ``inner_steps``);
    - :meth:`after_backward`: gradients computed, before clipping and the optimizer step;
    - :meth:`after_step`: after the optimizer step, with the objective's output;
    - :meth:`validation`: after each validation's ``valid`` record, with its metrics (models
      with a latent variable only).
    """

    name: ClassVar[str] = ""
    keys: ClassVar[type | None] = None
    section: ClassVar[str] = "train"

    def __init__(self, run: Any):
        self.run = run

    @classmethod
    def enabled(cls, config: Config) -> bool:
        """Whether ``config`` switches the remedy on (the loop calls only enabled ones)."""
        return True

    @classmethod
    def validate(cls, config: Config) -> None:
        """Check the remedy's keys in ``config`` (called by :func:`textvae.config.validate`).

        Raises:
            textvae.config.ConfigError: naming the key.
        """

    @property
    def state(self) -> dict:
        """The remedy's own checkpointed state (``TrainerState.remedies[name]``)."""
        return self.run.state.remedies.setdefault(self.name, {})

    def start(self) -> None:
        """Once before the first step of this training (also after a resume)."""

    def begin_step(self) -> None:
        """Before each step, before its batch is drawn."""

    def beta(self, beta: float) -> float:
        """This step's KL weight from ``beta``, the schedule's (:func:`phase_beta`)."""
        return beta

    def before_update(self, batch: dict, batches: list[list[int]], beta: float) -> dict:
        """Before the step's update, on this process's ``batch``; ``batches`` are the epoch's
        global batches. Returns ``{name: number}`` to average into the ``train`` record."""
        return {}

    def after_backward(self) -> None:
        """After the step's backward pass, before gradient clipping and the optimizer step."""

    def after_step(self, out: dict) -> None:
        """After the step's optimizer step; ``out`` is the objective's output
        (:func:`textvae.objectives.elbo`)."""

    def validation(self, metrics: dict) -> None:
        """After a validation, with :func:`textvae.metrics.evaluate`'s result."""


@register_remedy("kl_cycle")
class KLCycle(Remedy):
    """``kl.cycle_epochs`` > 0: the cyclical schedule's period in epochs (DELLA: 2), turned into
    ``kl.cycle_steps`` from the number of batches per epoch when training starts
    (:func:`resolve_cycle`); a ``kl cycle`` event records the value."""

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.kl.cycle_epochs > 0

    def start(self) -> None:
        run = self.run
        kl = resolve_cycle(run.config.kl, run.steps_per_epoch)
        run.config = dataclasses.replace(run.config, kl=kl)
        run.write_log(
            {
                "type": "event",
                "event": "kl cycle",
                "step": run.state.step,
                "cycle_epochs": kl.cycle_epochs,
                "cycle_steps": kl.cycle_steps,
            }
        )


@dataclass
class CollapseWatchKeys:
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


@register_remedy("collapse_watch")
class CollapseWatch(Remedy):
    """The collapse watch (:func:`update_collapse`): a ``posterior collapse`` warning (logged and
    in ``log.jsonl``) once KL or z-usage gap have stayed under their thresholds for
    ``train.collapse_patience`` validations in a row. Always on (patience 0: never warns)."""

    keys = CollapseWatchKeys

    def validation(self, metrics: dict) -> None:
        run, m = self.run, metrics
        state, t = run.state, run.config.train
        if not update_collapse(state, m["kl"], m["z_gap"], t):
            return
        gap = "n/a" if m["z_gap"] is None else f"{m['z_gap']:.3f}"
        reason = collapse_reason(m["kl"], m["z_gap"], t.collapse_kl, t.collapse_z_gap)
        message = (
            f"posterior collapse? for {state.collapsed_validations} validations in a "
            f"row KL < {t.collapse_kl} or z-usage gap < {t.collapse_z_gap} nats/sentence "
            f"(now KL {m['kl']:.3f}, z_gap {gap}, AU {m['au']}): {reason}; consider "
            "free bits, a longer KL warm-up or pooling"
        )
        log.warning("step %d: %s", state.step, message)
        run.write_log(
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


@register_remedy("ae_pretraining")
class AEPretraining(Remedy):
    """Autoencoder pretraining (``train.ae_pretrain_steps`` > 0; Li et al. 2019, Park & Lee 2021):
    the hand-off to phase ``vae`` before the step where it is due (:func:`ae_phase_over`,
    :meth:`hand_off`), the frozen decoder's gradients dropped in phase ``ae``
    (:func:`frozen_parameters`), and at each validation the best phase-1 weights kept
    (``checkpoints/ae_best``) and the early stop (:func:`update_ae_early_stop`)."""

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.train.ae_pretrain_steps > 0

    def start(self) -> None:
        run, t = self.run, self.run.config.train
        if run.state.phase == "ae" and run.total <= t.ae_pretrain_steps and not t.ae_patience:
            log.warning(
                "the budget (%d steps) ends within autoencoder pretraining (%d steps): no VAE "
                "phase in this run unless it is resumed with a larger budget",
                run.total,
                t.ae_pretrain_steps,
            )

    def begin_step(self) -> None:
        if ae_phase_over(self.run.state, self.run.config.train):
            self.hand_off()

    def after_backward(self) -> None:
        for p in frozen_parameters(self.run.raw, self.run.config, self.run.state):
            p.grad = None  # phase ae with a frozen decoder: the optimizers skip them

    def validation(self, metrics: dict) -> None:
        run, rec = self.run, metrics["rec"]
        state, t = run.state, run.config.train
        if ae_best_improved(state, rec, t.ae_patience) and run.main:
            # phase 2 may start from here (train.ae_start: best)
            write_weights(
                run.run_dir,
                "ae_best",
                run.raw.state_dict(),
                {"info.json": {"step": state.step, "rec": rec}},
            )
        if update_ae_early_stop(state, rec, t.ae_patience):
            log.info(
                "step %d: validation rec has not improved for %d validations: the "
                "autoencoder phase ends",
                state.step,
                t.ae_patience,
            )
            run.write_log(
                {
                    "type": "event",
                    "event": "ae early stop",
                    "step": state.step,
                    "rec": rec,
                    "best_rec": state.ae_best_rec,
                }
            )

    def hand_off(self) -> None:
        """The hand-off of :func:`start_vae_phase`, logged. With ``train.ae_start: best`` the
        weights are first those of the best phase-1 validation rec (Park & Lee 2021's early
        stopping keeps its argmin), when a validation happened."""
        run = self.run
        state, t = run.state, run.config.train
        start = {"start": "last", "from_step": state.step}
        if t.ae_start == "best":
            run.accelerator.wait_for_everyone()
            folder = checkpoint_path(run.run_dir, "ae_best")
            if (folder / WEIGHTS).is_file():
                run.raw.load_state_dict(load_file(str(folder / WEIGHTS)))
                info = json.loads((folder / "info.json").read_text())
                start = {"start": "best", "from_step": info["step"], "best_rec": info["rec"]}
            else:
                start["start"] = "last (no phase-1 validation to choose from)"
        reset = start_vae_phase(
            run.raw,
            run.config,
            run.tokenizer,
            state,
            run.optimizers,
            run.schedulers,
            run.fresh_schedules,
        )
        reason = "early stop" if state.ae_stopped else "steps"
        log.info(
            "step %d: autoencoder pretraining done (%s); VAE phase starts (%d tensors "
            "re-initialised)",
            state.step,
            reason,
            len(reset),
        )
        run.write_log(
            {
                "type": "event",
                "event": "phase",
                "step": state.step,
                "reset": len(reset),
                "reason": reason,
                **start,
            }
        )


@register_remedy("aggressive")
class AggressiveTraining(Remedy):
    """Aggressive inference-network training (``train.aggressive``; He et al. 2019, Algorithm
    1): while on (``TrainerState.aggressive``), each step first runs the encoder-only steps of
    :func:`aggressive_inner_loop` on the current batch and then random batches of the epoch
    (their count is the ``train`` record's ``inner_steps``); :func:`update_aggressive` switches
    it off for good at the first validation whose MI is lower than the previous one."""

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.train.aggressive

    def before_update(self, batch: dict, batches: list[list[int]], beta: float) -> dict:
        run = self.run
        if not run.state.aggressive:
            return {"inner_steps": 0}
        t = run.config.train
        picks = aggressive_picks(t.seed, run.state.step, len(batches), t.aggressive_max_inner)

        def draw(i: int) -> dict:
            return batch if i == 0 else run.shard(batches[int(picks[i])])

        inner = aggressive_inner_loop(
            run.raw,
            run.enc_optimizer,
            draw,
            lambda b: run.loss(b, beta)["loss"],
            t.aggressive_max_inner,
            t.aggressive_window,
            t.grad_clip,
            run.accelerator.backward,
            run.all_sum,
        )
        return {"inner_steps": inner}

    def validation(self, metrics: dict) -> None:
        run, mi = self.run, metrics["mi"]
        state = run.state
        last_mi = state.last_mi
        # None: a flow's I(x; z_K) failed
        if mi is not None and update_aggressive(state, mi):
            log.info(
                "step %d: validation MI fell from %.3f to %.3f nats: aggressive training off",
                state.step,
                last_mi,
                mi,
            )
            run.write_log(
                {
                    "type": "event",
                    "event": "aggressive off",
                    "step": state.step,
                    "mi": mi,
                    "last_mi": last_mi,
                }
            )
