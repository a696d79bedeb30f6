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

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import Tensor, nn

from ..errors import InvalidArgumentError, did_you_mean
from .common import check_lambda, zero_penalty


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


class Regularizer:
    """Base class: the empty method. Subclasses override what they need.

    A method declares what it needs from the training loop, so no loop keeps lists of
    method names:

    - ``name``: the registry name used in configs;
    - ``after_task_data``: what :meth:`after_task` reads. ``"none"`` (nothing: the loop
      may pass an empty iterable), ``"inputs"`` (unlabelled input batches: MAS, l-MAS,
      EBLL; these may come from any unlabelled source such as test-condition data) or
      ``"labelled"`` (``(inputs, targets)`` batches and a per-sample loss: EWC's Fisher);
    - ``importance_from_inputs``: its importance Ω is estimated from unlabelled inputs
      alone, so it may be computed on another data source than the training set (MAS,
      l-MAS; the paper's test-condition experiment);
    - ``uses_step_hook``: :meth:`after_step` must be called after every optimizer step
      (SI's path integral); the loop may skip the call otherwise;
    - ``uses_optimizer_step_hook``: :meth:`after_optimizer_step` must be called right after
      every ``optimizer.step()`` and before :meth:`after_step` (the proximal penalty step of the
      quadratic-anchor methods, ``penalty_step="proximal"``); the loop may skip it otherwise;
    - :attr:`strength`: the hyperparameters that set the method's strength, for messages
      such as "lower lam (now 5.0)"; :meth:`set_strength` changes them (the hyperparameter
      search of :mod:`mas_core.hparam_search`).
    """

    name = "finetune"
    after_task_data: str = "none"
    importance_from_inputs: bool = False
    uses_step_hook: bool = False
    uses_optimizer_step_hook: bool = False

    @property
    def strength(self) -> dict[str, float]:
        """The strength hyperparameters by name (``{"lam": 5.0}``); empty for fine-tuning."""
        lam = getattr(self, "lam", None)
        return {} if lam is None else {"lam": float(lam)}

    def describe_strength(self) -> str:
        """``"lam=5.0"`` (``"no strength hyperparameter"`` when :attr:`strength` is empty)."""
        items = self.strength
        return ", ".join(f"{key}={value:g}" for key, value in items.items()) or "no strength hyperparameter"

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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Finetune(Regularizer):
    """Plain fine-tuning: no penalty. The lower bound of every comparison."""

    name = "finetune"
