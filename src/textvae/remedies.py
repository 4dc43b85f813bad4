"""The training-schedule remedies against posterior collapse: each one a :class:`Remedy`, a
class registered by name (:func:`textvae.registry.register_remedy`) that declares what it needs
and implements the hooks the training loop (:mod:`textvae.train`) calls for every registered
remedy the config switches on. The loop names no remedy. Each remedy owns

- its config keys: a dataclass of :mod:`textvae.remedy_keys` (a leaf module, so loading a config
  never imports this one) with their checks (``validate``), named by :attr:`Remedy.keys`;
- its state: :attr:`Remedy.state`, a dict checkpointed with the run
  (``TrainerState.remedies[<name>]``), which starts as :meth:`Remedy.initial_state`, so a resume
  on either side of any switch continues exactly; checkpoints written before the remedies kept
  their own state held it at the top level of the trainer state, and
  :attr:`Remedy.legacy_state` names the keys taken from there;
- the optimizers it needs: :meth:`Remedy.parameter_groups` splits the model's parameters between
  the main optimizer and optimizers of its own (:attr:`Remedy.optimizers`), and
  :meth:`Remedy.joint_update` says whether these take part in a step's update;
- the phase of training it puts the run in (:meth:`Remedy.phase`, a :class:`Phase`: the step
  the KL-weight and cosine LR schedules count from, and whether the KL term is off), and the
  fields it adds to every ``log.jsonl`` record (:meth:`Remedy.log_fields`, with
  :attr:`Remedy.log_defaults` while it is off).

The model-side remedies (free bits, bag-of-words, pooling, flows, ...) live with the models and
the objective.

The built-in remedies, in the order their hooks run:

- :class:`KLCycle` (``kl.cycle_epochs``): the cyclical KL schedule's period in epochs (DELLA's
  2-epoch cycles, Fu et al. 2019), turned into ``kl.cycle_steps`` when training starts
  (:func:`resolve_cycle`).
- :class:`CollapseWatch` (``train.collapse_*``, :class:`~textvae.remedy_keys.CollapseWatchKeys`):
  :func:`update_collapse` counts validations in a row with KL or z-usage gap under threshold and
  the remedy logs the warning.
- :class:`AEPretraining` (``train.ae_*``, :class:`~textvae.remedy_keys.AEPretrainingKeys`; Li et
  al. 2019; Park & Lee 2021's phase 1): the run starts in phase ``ae``, an autoencoder phase
  (:class:`Phase`); :func:`frozen_parameters` names what ``train.ae_freeze_decoder`` holds fixed;
  :func:`ae_best_improved` and :func:`update_ae_early_stop` follow the validation rec;
  :func:`ae_phase_over` says when to hand off and :meth:`AEPretraining.hand_off` does it (decoder
  reset by :func:`reset_generative`, then the loop's ``start_phase``: fresh optimizer state and
  LR schedules, the best validation forgotten, every remedy's :meth:`Remedy.phase_started`).
- :class:`AggressiveTraining` (``train.aggressive*``,
  :class:`~textvae.remedy_keys.AggressiveTrainingKeys`; He et al. 2019): its own optimizer for the
  inference network (:meth:`~AggressiveTraining.parameter_groups`); :func:`aggressive_picks` and
  :func:`aggressive_inner_loop` run the encoder-only steps, :func:`update_aggressive` switches
  it off at the first validation whose MI falls.

A new remedy is one class (here, or in any module imported before the config is loaded, as
``tests/test_remedy_registry.py`` does)::

    @dataclass
    class MyKeys(RemedyKeys):
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

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from textvae.config import Config, KLConfig
from textvae.models import MODELS
from textvae.registry import register_remedy
from textvae.remedy_keys import AEPretrainingKeys, AggressiveTrainingKeys, CollapseWatchKeys
from textvae.rundir import WEIGHTS, checkpoint_path, collapse_reason, write_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """A phase of training, as a remedy that divides training into phases reports it
    (:meth:`Remedy.phase`); a run no remedy divides is one phase from step 0.

    Attributes:
        start: the step the phase began at: the KL weight schedule
            (:func:`textvae.objectives.kl_weight`) and the cosine LR schedule count from here,
            so a warm-up after autoencoder pretraining starts from its beginning (as Li et al.
            2019's second run).
        autoencoder: the KL term is off: KL weight 0 and no KL target penalty; the cosine LR
            schedule holds ``train.lr`` until a phase with the KL term starts.
    """

    start: int = 0
    autoencoder: bool = False


def resolve_cycle(kl: KLConfig, steps_per_epoch: int) -> KLConfig:
    """The KL config with the cyclical period in steps: ``cycle_steps`` = round(``cycle_epochs``
    * ``steps_per_epoch``) (at least 1) when ``cycle_epochs`` > 0 (DELLA's period of 2 epochs),
    else ``kl`` unchanged."""
    if kl.cycle_epochs <= 0:
        return kl
    return dataclasses.replace(kl, cycle_steps=max(1, round(kl.cycle_epochs * steps_per_epoch)))


def update_aggressive(state: dict, mi: float) -> bool:
    """He et al. 2019's switch: aggressive training stops for good once the validation MI
    decreases (their code: ``if cur_mi - pre_mi < 0``, checked at each epoch; here at each
    validation, with the protocol's aggregate-posterior MI over the validation set). The first
    validation of a phase has no predecessor and never switches it off.

    Args:
        state: :class:`AggressiveTraining`'s (``aggressive``, ``last_mi``), updated in place.
        mi: I_q(x; z) of this validation, nats.

    Returns:
        True when this call switched aggressive training off.
    """
    if not state["aggressive"]:
        return False
    off = state["last_mi"] is not None and mi < state["last_mi"]
    state["last_mi"] = mi
    if off:
        state["aggressive"] = False
    return off


def update_ae_early_stop(state: dict, rec: float, patience: int) -> bool:
    """Early stopping of the autoencoder phase on the validation reconstruction (Park & Lee
    2021's phase 1): a validation whose ``rec`` is below the phase's best resets the count,
    any other counts one; after ``patience`` in a row the phase is marked to end
    (``ae_stopped``; the hand-off happens before the next step). Does nothing outside
    phase ``ae`` or with ``patience`` 0.

    Args:
        state: :class:`AEPretraining`'s (``phase``, ``ae_best_rec``, ``ae_bad_validations``,
            ``ae_stopped``), updated in place.
        rec: E_q[-log p(x|z)] of this validation, nats per sentence.

    Returns:
        True when this call ended the phase.
    """
    if state["phase"] != "ae" or patience <= 0 or state["ae_stopped"]:
        return False
    if rec < state["ae_best_rec"]:
        state["ae_best_rec"], state["ae_bad_validations"] = rec, 0
        return False
    state["ae_bad_validations"] += 1
    state["ae_stopped"] = state["ae_bad_validations"] >= patience
    return state["ae_stopped"]


def frozen_parameters(model, config: Config, state: dict) -> list[torch.nn.Parameter]:
    """The parameters held fixed at this step: the model's ``decoder_modules`` in phase ``ae``
    (``state``: :class:`AEPretraining`'s) with ``train.ae_freeze_decoder`` (and its
    ``latent_projection_modules`` with ``train.ae_freeze_latent_projection``), else none. The
    remedy drops their gradients before the update, so no optimizer (nor weight decay) moves
    them."""
    if not (config.train.ae_freeze_decoder and state["phase"] == "ae"):
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


def update_collapse(state: dict, kl: float, z_gap: float | None, t: CollapseWatchKeys) -> bool:
    """The collapse watch: one more validation in a row with KL < ``train.collapse_kl`` or z-usage
    gap < ``train.collapse_z_gap`` (nats per sentence; a missing gap never counts), or the count
    (``state["collapsed_validations"]``, :class:`CollapseWatch`'s) back to 0.

    Returns:
        True when the count has reached ``train.collapse_patience`` (> 0): warn now.
    """
    low_gap = z_gap is not None and z_gap < t.collapse_z_gap
    if kl < t.collapse_kl or low_gap:
        state["collapsed_validations"] += 1
    else:
        state["collapsed_validations"] = 0
    count = state["collapsed_validations"]
    return bool(t.collapse_patience) and count >= t.collapse_patience


def ae_best_improved(state: dict, rec: float, patience: int) -> bool:
    """Whether this validation's ``rec`` (nats per sentence) is the best of phase ``ae`` so far,
    so its weights are kept (``checkpoints/ae_best``, from which ``train.ae_start: best`` starts
    phase 2). Without early stopping (``patience`` 0) the best rec is recorded here; with it,
    :func:`update_ae_early_stop` records it. ``state``: :class:`AEPretraining`'s."""
    if state["phase"] != "ae" or not rec < state["ae_best_rec"]:
        return False
    if not patience:
        state["ae_best_rec"] = rec
    return True


def ae_phase_over(state: dict, step: int, t: AEPretrainingKeys) -> bool:
    """Whether the autoencoder phase ends before optimizer step ``step`` + 1: its
    ``train.ae_pretrain_steps`` are done, or early stopping marked it (``ae_stopped``).
    ``state``: :class:`AEPretraining`'s."""
    return state["phase"] == "ae" and (step >= t.ae_pretrain_steps or state["ae_stopped"])


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
    :func:`textvae.registry.register_remedy`, that declares what it needs and acts through hooks
    the training loop calls, for every registered remedy that :meth:`enabled` switches on, in
    registration order.

    Class attributes:
        name: the registered name (set by the decorator).
        keys: the remedy's config keys (or None): a dataclass subclassing
            :class:`textvae.remedy_keys.RemedyKeys`, with their defaults and their checks
            (``validate``); its fields become keys of its ``section`` (``train`` or ``kl``) of
            every config (:func:`textvae.config.section_class`), set in a preset's YAML or by
            ``train.<key>=value``, and stored in ``config.yaml``; a key another class declares
            is an error. The built-in remedies' keys live in :mod:`textvae.remedy_keys`, so that
            loading a config imports no remedy.
        legacy_state: the keys of :attr:`state` that checkpoints written before the remedies
            kept their own state held at the top level of the trainer state (read from there
            when resuming such a checkpoint).
        log_defaults: the fields every ``log.jsonl`` record carries while the remedy is off
            (while on: :meth:`log_fields`), so the records of every run have the same keys.

    An instance lives for one training (a resume builds it again): ``self.run`` is the loop's
    state (``config``, ``state`` (the trainer state: ``step``, ``epoch``, ``best_valid``, ...),
    ``raw`` (the unwrapped model), ``model`` (as prepared), ``optimizer`` (the main one),
    ``tokenizer``, ``accelerator``, ``run_dir``, ``main`` (the main process), ``total`` (the step
    budget), ``steps_per_epoch``, ``phase`` (:class:`Phase`), ``write_log(record)``,
    ``shard(indices)``, ``loss(batch, beta)``, ``start_phase()``, ``all_sum``).

    What it declares (all optional; the defaults ask for nothing):

    - :meth:`initial_state`: its state at the start of a run, a JSON-able dict; :attr:`state`;
    - :meth:`parameter_groups`: optimizers of its own for part of the model (:attr:`optimizers`),
      and :meth:`joint_update`: whether they step with the main one in a step's update;
    - :meth:`phase`: the phase of training it puts the run in;
    - :meth:`log_fields`: fields added to every ``log.jsonl`` record.

    Hooks (all optional; the defaults do nothing):

    - :meth:`start`: once before the first step (also when a run is resumed);
    - :meth:`begin_step`: before each step's batch is drawn (e.g. a phase hand-off);
    - :meth:`beta`: this step's KL weight, given the schedule's (or the previous remedy's);
    - :meth:`before_update`: before the optimizer step, with the batch and the step's beta;
      returns numbers to average into the ``train`` log record (e.g. ``inner_steps``);
    - :meth:`after_backward`: gradients computed, before clipping and the optimizer step;
    - :meth:`after_step`: after the optimizer step, with the objective's output;
    - :meth:`validation`: after each validation's ``valid`` record, with its metrics (models
      with a latent variable only);
    - :meth:`phase_started`: a remedy began a new phase of training (the loop's
      ``start_phase``).
    """

    name: ClassVar[str] = ""
    keys: ClassVar[type | None] = None
    legacy_state: ClassVar[tuple[str, ...]] = ()
    log_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, run: Any):
        self.run = run

    @classmethod
    def enabled(cls, config: Config) -> bool:
        """Whether ``config`` switches the remedy on (the loop calls only enabled ones)."""
        return True

    @property
    def state(self) -> dict:
        """The remedy's own checkpointed state (``TrainerState.remedies[name]``)."""
        return self.run.state.remedies.setdefault(self.name, {})

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of its own (:meth:`parameter_groups`), as prepared by accelerate."""
        return self.run.remedy_optimizers.get(self.name, [])

    def initial_state(self) -> dict:
        """The remedy's :attr:`state` when a run starts (the remedies before it in
        registration order have theirs already: e.g. :attr:`run.phase <Phase>` is known)."""
        return {}

    def parameter_groups(self) -> list[list[torch.nn.Parameter]] | None:
        """None (default): the main optimizer updates every parameter. Otherwise the parameters
        of each optimizer: the main one's first, then one list per optimizer of the remedy's own
        (:attr:`optimizers`; each built from ``train.optimizer`` and its settings, with its own
        LR schedule, checkpointed). At most one enabled remedy may split them."""
        return None

    def joint_update(self) -> bool:
        """Whether the remedy's own :attr:`optimizers` step with the main one in this step's
        update (after :meth:`before_update`)."""
        return True

    def phase(self) -> Phase | None:
        """The phase of training the remedy puts the run in now, or None (no phases of its own);
        the loop uses the first enabled remedy's answer."""
        return None

    def log_fields(self) -> dict:
        """Fields (name -> JSON value) added to every ``log.jsonl`` record while the remedy is on
        (see :attr:`log_defaults`)."""
        return {}

    def start(self) -> None:
        """Once before the first step of this training (also after a resume)."""

    def begin_step(self) -> None:
        """Before each step, before its batch is drawn."""

    def beta(self, beta: float) -> float:
        """This step's KL weight from ``beta``, the schedule's
        (:func:`textvae.objectives.kl_weight` counted from the :class:`Phase`'s start; 0 in an
        autoencoder phase)."""
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

    def phase_started(self) -> None:
        """A new phase of training began (a remedy called the loop's ``start_phase``, after
        changing its :meth:`phase`): forget what belonged to the previous one."""


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


@register_remedy("collapse_watch")
class CollapseWatch(Remedy):
    """The collapse watch (:func:`update_collapse`): a ``posterior collapse`` warning (logged and
    in ``log.jsonl``) once KL or z-usage gap have stayed under their thresholds for
    ``train.collapse_patience`` validations in a row. Always on (patience 0: never warns). Its
    state: ``collapsed_validations``, back to 0 when a new phase starts."""

    keys = CollapseWatchKeys
    legacy_state = ("collapsed_validations",)

    def initial_state(self) -> dict:
        return {"collapsed_validations": 0}

    def phase_started(self) -> None:
        self.state["collapsed_validations"] = 0

    def validation(self, metrics: dict) -> None:
        run, m = self.run, metrics
        t, step = run.config.train, run.state.step
        if not update_collapse(self.state, m["kl"], m["z_gap"], t):
            return
        count = self.state["collapsed_validations"]
        gap = "n/a" if m["z_gap"] is None else f"{m['z_gap']:.3f}"
        reason = collapse_reason(m["kl"], m["z_gap"], t.collapse_kl, t.collapse_z_gap)
        message = (
            f"posterior collapse? for {count} validations in a "
            f"row KL < {t.collapse_kl} or z-usage gap < {t.collapse_z_gap} nats/sentence "
            f"(now KL {m['kl']:.3f}, z_gap {gap}, AU {m['au']}): {reason}; consider "
            "free bits, a longer KL warm-up or pooling"
        )
        log.warning("step %d: %s", step, message)
        run.write_log(
            {
                "type": "warning",
                "warning": "posterior collapse",
                "step": step,
                "kl": m["kl"],
                "z_gap": m["z_gap"],
                "au": m["au"],
                "validations": count,
                "message": message,
            }
        )


@register_remedy("ae_pretraining")
class AEPretraining(Remedy):
    """Autoencoder pretraining (``train.ae_pretrain_steps`` > 0; Li et al. 2019, Park & Lee 2021):
    the run starts in phase ``ae``, an autoencoder phase (:meth:`phase`: KL weight 0, no KL
    target, the cosine LR held), with z still sampled (as their beta = 0 run); the hand-off to
    phase ``vae`` before the step where it is due (:func:`ae_phase_over`, :meth:`hand_off`); the
    frozen decoder's gradients dropped in phase ``ae`` (:func:`frozen_parameters`); and at each
    validation the best phase-1 weights kept (``checkpoints/ae_best``) and the early stop
    (:func:`update_ae_early_stop`).

    Its state: ``phase`` (``ae`` or ``vae``, the ``phase`` of every ``log.jsonl`` record) and
    ``phase_start`` (the step phase ``vae`` began at), the best phase-1 validation rec
    (``ae_best_rec``, nats per sentence), the validations without improvement since
    (``ae_bad_validations``) and whether early stopping ended the phase (``ae_stopped``)."""

    keys = AEPretrainingKeys
    legacy_state = ("phase", "phase_start", "ae_best_rec", "ae_bad_validations", "ae_stopped")
    log_defaults = {"phase": "vae"}

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.train.ae_pretrain_steps > 0

    def initial_state(self) -> dict:
        return {
            "phase": "ae",
            "phase_start": 0,
            "ae_best_rec": math.inf,
            "ae_bad_validations": 0,
            "ae_stopped": False,
        }

    def phase(self) -> Phase:
        return Phase(start=self.state["phase_start"], autoencoder=self.state["phase"] == "ae")

    def log_fields(self) -> dict:
        return {"phase": self.state["phase"]}

    def start(self) -> None:
        run, t = self.run, self.run.config.train
        if self.state["phase"] == "ae" and run.total <= t.ae_pretrain_steps and not t.ae_patience:
            log.warning(
                "the budget (%d steps) ends within autoencoder pretraining (%d steps): no VAE "
                "phase in this run unless it is resumed with a larger budget",
                run.total,
                t.ae_pretrain_steps,
            )

    def begin_step(self) -> None:
        if ae_phase_over(self.state, self.run.state.step, self.run.config.train):
            self.hand_off()

    def after_backward(self) -> None:
        for p in frozen_parameters(self.run.raw, self.run.config, self.state):
            p.grad = None  # phase ae with a frozen decoder: the optimizers skip them

    def validation(self, metrics: dict) -> None:
        run, rec, state = self.run, metrics["rec"], self.state
        t, step = run.config.train, run.state.step
        if ae_best_improved(state, rec, t.ae_patience) and run.main:
            # phase 2 may start from here (train.ae_start: best)
            write_weights(
                run.run_dir,
                "ae_best",
                run.raw.state_dict(),
                {"info.json": {"step": step, "rec": rec}},
            )
        if update_ae_early_stop(state, rec, t.ae_patience):
            log.info(
                "step %d: validation rec has not improved for %d validations: the "
                "autoencoder phase ends",
                step,
                t.ae_patience,
            )
            run.write_log(
                {
                    "type": "event",
                    "event": "ae early stop",
                    "step": step,
                    "rec": rec,
                    "best_rec": state["ae_best_rec"],
                }
            )

    def hand_off(self) -> None:
        """Li et al. 2019's hand-off to phase ``vae``, logged: the weights first those of the
        best phase-1 validation rec with ``train.ae_start: best`` (:meth:`_start_weights`), the
        decoder side re-initialised (:func:`reset_generative`, with ``train.ae_reset_decoder``),
        then phase ``vae`` from this step and the loop's ``start_phase`` (the optimizers' state
        cleared and their LR back to ``train.lr``, the LR schedules as at the start of the run,
        the best validation forgotten, every remedy's :meth:`~Remedy.phase_started`)."""
        run, t, step = self.run, self.run.config.train, self.run.state.step
        start = self._start_weights()
        reset = reset_generative(run.raw, run.config, run.tokenizer) if t.ae_reset_decoder else []
        self.state["phase"], self.state["phase_start"] = "vae", step
        run.start_phase()
        reason = "early stop" if self.state["ae_stopped"] else "steps"
        log.info(
            "step %d: autoencoder pretraining done (%s); VAE phase starts (%d tensors "
            "re-initialised)",
            step,
            reason,
            len(reset),
        )
        run.write_log(
            {
                "type": "event",
                "event": "phase",
                "step": step,
                "reset": len(reset),
                "reason": reason,
                **start,
            }
        )

    def _start_weights(self) -> dict:
        """With ``train.ae_start: best``, load the weights of the best phase-1 validation rec
        (Park & Lee 2021's early stopping keeps its argmin) when a validation happened. Returns
        the ``start`` fields of the ``phase`` event."""
        run = self.run
        start = {"start": "last", "from_step": run.state.step}
        if run.config.train.ae_start == "best":
            run.accelerator.wait_for_everyone()
            folder = checkpoint_path(run.run_dir, "ae_best")
            if (folder / WEIGHTS).is_file():
                run.raw.load_state_dict(load_file(str(folder / WEIGHTS)))
                info = json.loads((folder / "info.json").read_text())
                start = {"start": "best", "from_step": info["step"], "best_rec": info["rec"]}
            else:
                start["start"] = "last (no phase-1 validation to choose from)"
        return start


@register_remedy("aggressive")
class AggressiveTraining(Remedy):
    """Aggressive inference-network training (``train.aggressive``; He et al. 2019, Algorithm
    1): the inference network has an optimizer of its own (:meth:`parameter_groups`); while on
    (``state["aggressive"]``, the ``aggressive`` of every ``log.jsonl`` record), each step first
    runs the encoder-only steps of :func:`aggressive_inner_loop` on the current batch and then
    random batches of the epoch (their count is the ``train`` record's ``inner_steps``), and the
    step's update moves the decoder side only (:meth:`joint_update`); :func:`update_aggressive`
    switches it off for good at the first validation whose MI is lower than the previous one
    (``last_mi``, nats). It is on from the start of every phase that is not an autoencoder one."""

    keys = AggressiveTrainingKeys
    legacy_state = ("aggressive", "last_mi")
    log_defaults = {"aggressive": False}

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.train.aggressive

    def initial_state(self) -> dict:
        return {"aggressive": not self.run.phase.autoencoder, "last_mi": None}

    def phase_started(self) -> None:
        self.state.update(self.initial_state())

    def parameter_groups(self) -> list[list[torch.nn.Parameter]]:
        """The generative side (every parameter outside the inference network) for the main
        optimizer, the inference network (``inference_parameters``) for its own."""
        model = self.run.raw
        generative = [p for n, p in model.named_parameters() if not model.is_inference_key(n)]
        return [generative, model.inference_parameters()]

    def joint_update(self) -> bool:
        return not self.state["aggressive"]  # while on, its inner loop updated the encoder

    def log_fields(self) -> dict:
        return {"aggressive": self.state["aggressive"]}

    def before_update(self, batch: dict, batches: list[list[int]], beta: float) -> dict:
        run = self.run
        if not self.state["aggressive"]:
            return {"inner_steps": 0}
        t = run.config.train
        picks = aggressive_picks(t.seed, run.state.step, len(batches), t.aggressive_max_inner)

        def draw(i: int) -> dict:
            return batch if i == 0 else run.shard(batches[int(picks[i])])

        inner = aggressive_inner_loop(
            run.raw,
            self.optimizers[0],
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
        last_mi, step = self.state["last_mi"], run.state.step
        # None: a flow's I(x; z_K) failed
        if mi is not None and update_aggressive(self.state, mi):
            log.info(
                "step %d: validation MI fell from %.3f to %.3f nats: aggressive training off",
                step,
                last_mi,
                mi,
            )
            run.write_log(
                {
                    "type": "event",
                    "event": "aggressive off",
                    "step": step,
                    "mi": mi,
                    "last_mi": last_mi,
                }
            )
