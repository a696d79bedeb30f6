"""The protocol every continual-learning method shares.

The training loop (:mod:`mas_core.sequence`, or an application's own loop) owns
the model, the optimizer and the data. It calls, for each task ``t``::

    reg.before_task(model, task)              # once, before the first step of task t
    for batch in train_data:
        loss = task_loss(model, batch) + reg.penalty(model, inputs)
        loss.backward(); optimizer.step()
        reg.after_optimizer_step(model, optimizer)   # if reg.uses_optimizer_step_hook (proximal penalty)
        reg.after_step(model)                 # once per optimizer step
    reg.after_task(model, data)               # once, after the last step of task t

A method never reaches into the loop: it sees the model, the task description
and the data it is handed. All state needed to resume lives in
:meth:`Regularizer.state_dict` as tensors and plain Python values, so a checkpoint
can be loaded with ``torch.load(weights_only=True)``.

Fine-tuning is the empty method (:class:`Finetune`): zero penalty, no state.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import Tensor, nn

from ..errors import CheckpointMismatchError, InvalidArgumentError, did_you_mean
from .common import check_lambda, zero_penalty

HYPERPARAMETERS_KEY = "hyperparameters"
"""The ``state_dict`` key under which a method saves :meth:`Regularizer.hyperparameters`."""


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about the task that is starting.

    ``index`` counts from 0. ``head`` names the output head of a multi-head model
    (``None`` for single-output models such as the triplet embedding).
    ``num_samples`` is the number of training samples of the task, when known.
    """

    index: int
    head: int | None = None
    num_samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)



def describe_strength_values(strength: dict[str, float]) -> str:
    """``{"lam": 5.0}`` → ``"lam=5"`` (``", "``-joined; ``""`` for no strength)."""
    return ", ".join(f"{key}={value:g}" for key, value in strength.items())

class Regularizer:
    """Base class: the empty method. Subclasses override what they need.

    A method declares what it needs from the training loop, so no loop keeps lists of
    method names:

    - ``name``: the registry name used in configs;
    - ``after_task_data``: what :meth:`after_task` reads. ``"none"`` (nothing: the loop
      may pass an empty iterable), ``"inputs"`` (unlabelled input batches: MAS, l-MAS;
      these may come from any unlabelled source such as test-condition data) or
      ``"labelled"`` (``(inputs, targets)`` batches: EWC's Fisher, EBLL's autoencoder);
    - ``importance_from_loss``: :meth:`after_task` estimates importance from a per-sample loss of
      its labelled batches (EWC's Fisher, mode-IMM's), so on an experiment with an
      ``importance_loss`` the loop builds it with that ``loss_fn``; a method that reads labelled
      data for something else (EBLL trains its autoencoder on the features) leaves it ``False``
      and runs on any experiment;
    - ``importance_from_inputs``: its importance Ω is estimated from unlabelled inputs
      alone, so it may be computed on another data source than the training set (MAS,
      l-MAS; the paper's test-condition experiment);
    - ``uses_step_hook``: :meth:`after_step` must be called after every optimizer step
      (SI's path integral); the loop may skip the call otherwise;
    - ``uses_optimizer_step_hook``: :meth:`after_optimizer_step` must be called right after
      every ``optimizer.step()`` and before :meth:`after_step` (the proximal penalty step of the
      quadratic-anchor methods, ``penalty_step="proximal"``); the loop may skip it otherwise;
    - ``after_task_changes_model``: :meth:`after_task` changes the model's weights (IMM loads
      its merge); the loop then evaluates the accuracy matrix's row before it (the model as
      trained) and once more after it (a row of its own, ``merged_accuracy``). A method that
      changes the weights in ``after_task`` must declare it;
    - ``anchors_at_start``: before the first task the loop calls :meth:`anchor_at_start` with the
      first task's unlabelled inputs and the experiment's ``pretrained_output`` (MAS and l-MAS with
      ``anchor="start"``: importance of the pretrained network, penalty towards its weights);
    - :attr:`strength`: the hyperparameters that set the method's strength, for messages
      such as "lower lam (now 5.0)"; :meth:`set_strength` changes them (the hyperparameter
      search of :mod:`mas_core.hparam_search`);
    - :meth:`hyperparameters`: every constructor option with a plain value (λ, ``mode``,
      ``accumulate``, ``ema_alpha``, SI's ``damping``, EWC's ``online``/``gamma``, LwF's
      ``temperature`` …), saved in the state under :data:`HYPERPARAMETERS_KEY` and checked on
      load by :meth:`check_hyperparameters`, except the options in ``unchecked_hyperparameters``
      (callables, and options that do not change what the stored state means).
    """

    name = "finetune"
    after_task_data: str = "none"
    importance_from_loss: bool = False
    importance_from_inputs: bool = False
    uses_step_hook: bool = False
    uses_optimizer_step_hook: bool = False
    after_task_changes_model: bool = False
    anchors_at_start: bool = False
    unchecked_hyperparameters: tuple[str, ...] = ("output_fn", "loss_fn")

    @property
    def strength(self) -> dict[str, float]:
        """The strength hyperparameters by name (``{"lam": 5.0}``); empty for fine-tuning."""
        lam = getattr(self, "lam", None)
        return {} if lam is None else {"lam": float(lam)}

    def describe_strength(self) -> str:
        """``"lam=5.0"`` (``"no strength hyperparameter"`` when :attr:`strength` is empty)."""
        return describe_strength_values(self.strength) or "no strength hyperparameter"

    def describe(self) -> dict[str, Any]:
        """What a result must say about this method beside its numbers (recorded per task by the loop in
        ``results.json``, the reports and the checkpoint)::

            {"method": name, "strength": {name: λ}, "penalty_step": "proximal" | "gradient" | None,
             "importance": {"estimator": str, "samples": N | None, "accumulation": str} | None}

        ``importance``: how the method's Ω was made (quadratic-anchor methods; ``None`` for the others):
        the estimator (MAS: ``exact``, ``batch``, ``hebbian`` or ``online``; EWC ``fisher``; SI
        ``path integral``; IMM ``uniform``), the samples the last estimate read and the accumulation
        rule over tasks (``sum``, ``average`` (ema), ``consistency`` (MAS's alpha), ``online`` (EWC))."""
        return {"method": self.name, "strength": dict(self.strength),
                "penalty_step": getattr(self, "penalty_step", None), "importance": self.importance_label()}

    def importance_label(self) -> dict[str, Any] | None:
        """The ``importance`` part of :meth:`describe` (``None``: the method keeps no importance)."""
        return None

    def set_strength(self, **values: float) -> None:
        """Set the strength hyperparameters by their :attr:`strength` names (``set_strength(lam=2.5)``;
        IMM: ``set_strength(lam_l2=1e-3)``), each checked finite and ``>= 0``.

        Every method keeps its one strength hyperparameter in the attribute ``lam`` (IMM calls it
        ``lam_l2``), so this one implementation serves all of them; a method that caches something
        derived from λ refreshes it in :meth:`_strength_changed`. Raises
        :class:`~mas_core.errors.InvalidArgumentError` for a name :attr:`strength` does not list."""
        known = self.strength
        for key, value in values.items():
            if key not in known:
                listed = ", ".join(known) or "none"
                raise InvalidArgumentError(f"{type(self).__name__} has no strength hyperparameter {key!r}"
                                           f"{did_you_mean(key, list(known))} (it has: {listed})")
            self.lam = check_lambda(key, value)
        if values:
            self._strength_changed()

    def _strength_changed(self) -> None:
        """Called after :meth:`set_strength` changed λ (nothing to refresh here)."""

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Called once before training on ``task`` starts."""

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """The term added to the task loss. ``inputs`` is the current batch's input
        (used by data-dependent methods such as LwF and EBLL; ignored by MAS, EWC, SI)."""
        return zero_penalty(model)

    def after_optimizer_step(self, model: nn.Module, optimizer: Any) -> None:
        """Called right after every ``optimizer.step()`` (before :meth:`after_step`) when
        :attr:`uses_optimizer_step_hook` is true; may change the parameters in place (no autograd)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every ``optimizer.step()`` (SI's path integral needs it)."""

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Called once after training on a task, with a data source of that task."""

    def anchor_at_start(self, model: nn.Module, data: Iterable[Any], output_fn: Any) -> None:
        """Called once before the first task when :attr:`anchors_at_start` is declared, with the
        first task's unlabelled inputs and ``output_fn(model, batch)``, the pretrained output."""
        raise InvalidArgumentError(f"{type(self).__name__} does not anchor at the starting weights")

    def hyperparameters(self) -> dict[str, Any]:
        """``{option: value}`` for every keyword of this class's constructors (the whole MRO) that
        the instance holds under the same name as a plain value (``None``, bool, int, float, str)."""
        names: list[str] = []
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for parameter in inspect.signature(init).parameters.values():
                if parameter.name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) \
                        and parameter.name not in names:
                    names.append(parameter.name)
        values = {}
        for name in names:
            value = getattr(self, name, _MISSING)
            if value is None or isinstance(value, (bool, int, float, str)):
                values[name] = value
        return values

    def check_hyperparameters(self, state: dict[str, Any]) -> None:
        """Refuse a state saved with other hyperparameters than this instance's: a
        :class:`~mas_core.errors.CheckpointMismatchError` (a ``ValueError``) naming the first
        option that differs, the saved and the given value. States written before the
        hyperparameters were saved are checked on the options they kept at their top level
        (MAS's ``lam``, ``mode``, ``accumulate``, ``ema_alpha``), and load when those agree."""
        saved = state.get(HYPERPARAMETERS_KEY)
        given = self.hyperparameters()
        if not isinstance(saved, dict):
            saved = {name: state[name] for name in given
                     if name in state and (state[name] is None or isinstance(state[name], (bool, int, float, str)))}
        for name, value in given.items():
            if name in self.unchecked_hyperparameters or name not in saved:
                continue
            if saved[name] != value or isinstance(saved[name], str) != isinstance(value, str):
                label = getattr(self, "display_name", type(self).__name__)
                raise CheckpointMismatchError(
                    f"the {label} state was saved with {name}={saved[name]!r} but this regularizer has "
                    f"{name}={value!r}; build it with {name}={saved[name]!r} to load this state"
                )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_MISSING = object()


class Finetune(Regularizer):
    """Plain fine-tuning: no penalty. The lower bound of every comparison."""

    name = "finetune"
