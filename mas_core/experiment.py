"""What the task loop (:mod:`mas_core.loop`) is given and what it returns.

- :class:`OptimSettings`: the optimiser of every task (plain SGD with momentum);
- :class:`TrainData`, :class:`ImportanceSource`, :class:`Experiment`: the protocol an experiment
  implements so that :func:`mas_core.loop.train_tasks` can train it task by task;
- :class:`SequenceResult`: the accuracy matrix ``R[i][j]`` (task ``j`` after training task
  ``i``) with its metrics (:mod:`mas_core.metrics`) and the trained model;
- :class:`TaskSearch`: what a per-task hyperparameter search provides (:mod:`mas_core.hparam_search`);
- :class:`LoopHooks`, :class:`EpochRecord`, :class:`TaskRecord`: what the loop tells a caller
  while it runs (a metrics log, TensorBoard) and the one thing it asks (whether to stop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor, nn

from . import metrics
from .regularizers.base import Regularizer, TaskInfo


# --------------------------------------------------------------------------- settings

@dataclass
class OptimSettings:
    """The optimizer of every task: plain SGD with momentum, a fresh optimizer per task.

    ``epochs`` per task (``first_task_epochs`` overrides it for task 0 when set); ``lr`` the
    learning rate per step; ``momentum`` in [0, 1); ``batch_size`` samples per global batch (the
    same whatever the number of processes); ``weight_decay`` ordinary L2 (``λ_wd·θ`` added to the
    gradient) on the parameters the current task's loss reaches (not on old tasks' heads); ``clip_grad_norm`` caps the L2 norm of the gradient of all trained parameters
    (``null``: off)."""

    epochs: int = 5
    first_task_epochs: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.epochs <= 0 or (self.first_task_epochs is not None and self.first_task_epochs <= 0):
            raise ValueError("optim.epochs (and optim.first_task_epochs) must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.batch_size <= 0:
            raise ValueError(f"optim.lr and optim.batch_size must be positive, got lr={self.lr}, "
                             f"batch_size={self.batch_size}")
        if not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0:
            raise ValueError("optim.momentum must be in [0, 1) and optim.weight_decay ≥ 0")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optim.clip_grad_norm must be positive or null, got {self.clip_grad_norm}")

    def epochs_of(self, task: int) -> int:
        """The number of epochs of task ``task`` (``first_task_epochs`` for task 0 when set)."""
        if task == 0 and self.first_task_epochs is not None:
            return self.first_task_epochs
        return self.epochs


# --------------------------------------------------------------------------- the protocol

class TrainData(Protocol):
    """A task's samples, addressed by position ``0..len-1``.

    ``batches(index_batches)`` yields one batch per index tensor, in that order (a batch as
    :mod:`mas_core.batches` reads it: a tensor, a tuple ``(inputs, targets, ...)`` or a dict).
    The loop chooses the positions (its seeded order, this rank's share); the experiment only
    reads them."""

    def __len__(self) -> int: ...

    def batches(self, index_batches: Sequence[Tensor]) -> Iterable[Any]: ...


@dataclass
class ImportanceSource:
    """What ``after_task`` estimates on: ``data`` read ``batch_size`` samples at a time, in order."""

    data: TrainData
    batch_size: int


class Experiment(Protocol):
    """What an experiment gives the loop (see the module docs for when each is called).

    - ``task_names``: one name per task, in training order.
    - ``identity()``: a JSON-like dict of everything that changes the experiment's numbers
      (data, model, loss); a checkpoint is resumed only when it equals the saved one.
    - ``build_model()``: a fresh model, called right after seeding (deterministic init).
    - ``trained_module(model)``: the module the optimizer and the regularizer see (``model``
      itself, or e.g. the branches on cached trunk features); called once after ``build_model``.
    - ``begin_task(model, task) -> int | None``: prepare ``model`` for ``task`` (e.g. add and
      activate its head) and return the head index for :class:`TaskInfo` (``None``: single
      output). Replayed on resume for the finished tasks before the weights are loaded.
    - ``train_data(tasks) -> TrainData``: the training samples of the union of ``tasks`` (one
      task, or ``0..t`` in joint mode).
    - ``loss(module, batch, task) -> Tensor``: the *mean* task loss over the batch's samples
      (a scalar); in joint mode the batch may mix tasks.
    - ``importance_data(model, task, kind) -> ImportanceSource``: the data for ``after_task``,
      ``kind`` being the regularizer's ``after_task_data`` (``"inputs"``: batches whose input is
      what the trained module reads; ``"labelled"``: ``(inputs, targets)`` batches).
    - ``importance_loss``: the per-sample loss ``f(module, batch) -> Tensor[B]`` a method that
      declares ``importance_from_loss`` (EWC, mode-IMM) gets as its ``loss_fn``, or ``None`` for the
      regularizer's default.
    - ``evaluate(model, task) -> list[float]``: the row ``R[task][0..task]`` of the accuracy
      matrix (every rank calls it; an experiment that shards its test sets reduces itself).
    - ``metric_name``: what ``evaluate`` measures, for the log (e.g. ``"accuracy"``).
    """

    task_names: list[str]
    metric_name: str
    importance_loss: Callable[[nn.Module, Any], Tensor] | None

    def identity(self) -> dict[str, Any]: ...

    def build_model(self) -> nn.Module: ...

    def trained_module(self, model: nn.Module) -> nn.Module: ...

    def begin_task(self, model: nn.Module, task: int) -> int | None: ...

    def train_data(self, tasks: Sequence[int]) -> TrainData: ...

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor: ...

    def importance_data(self, model: nn.Module, task: int, kind: str) -> ImportanceSource: ...

    def evaluate(self, model: nn.Module, task: int) -> list[float]: ...


@dataclass
class SequenceResult:
    """Outcome of :func:`train_tasks`.

    ``accuracy[i][j]``: the experiment's metric (a fraction) on task ``j`` after training task
    ``i``; ``None`` for ``j > i``. ``wall_time_s``: seconds of training and evaluation, summed
    over resumed segments. ``log``: the per-task log lines. ``trained_tasks``: tasks trained by
    this call (0 when a finished checkpoint was resumed). ``model``: the final model.
    ``merged_accuracy``: for a method whose ``after_task`` changes the weights
    (``after_task_changes_model``, IMM's merge), ``merged_accuracy[i][j]`` is the metric of the
    model ``after_task`` left after task ``i`` (``accuracy`` being the model as trained on task
    ``i``, before ``after_task``); ``None`` for every other method."""

    method: str
    task_names: list[str]
    accuracy: list[list[float | None]]
    wall_time_s: float
    config: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    trained_tasks: int = 0
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    merged_accuracy: list[list[float | None]] | None = None
    hparam_search: list[dict[str, Any]] | None = None  # per task, with a search (mas_core.hparam_search)
    labels: list[dict[str, Any]] | None = None  # per task, Regularizer.describe(): estimator, samples, λ, step

    @property
    def avg_acc(self) -> float:
        """Mean of the last row of ``accuracy`` (:func:`mas_core.metrics.average_accuracy`)."""
        return metrics.average_accuracy(self.accuracy)

    @property
    def avg_forgetting(self) -> float:
        """Chaudhry et al.'s forgetting: mean over ``j < T-1`` of ``max_{j≤l<T-1} R[l][j] - R[T-1][j]``
        (:func:`mas_core.metrics.average_forgetting`)."""
        return metrics.average_forgetting(self.accuracy)

    @property
    def bwt(self) -> float:
        """Backward transfer: mean over ``j < T-1`` of ``R[T-1][j] - R[j][j]``."""
        return metrics.backward_transfer(self.accuracy)

    @property
    def avg_drop(self) -> float:
        """The paper's average drop: mean over all tasks of ``R[T-1][j] - R[j][j]`` (negative = forgetting)."""
        return metrics.average_drop(self.accuracy)

    def merged_summary(self) -> dict[str, float] | None:
        """The metrics of the model a weight-changing ``after_task`` delivers at the end (IMM's
        merge), measured against the models as trained (:func:`mas_core.metrics.with_final_row`
        of ``accuracy`` and the last row of ``merged_accuracy``): ``avg_acc``, ``forgetting``,
        ``bwt``, ``avg_drop``. ``None`` when there is no ``merged_accuracy``."""
        if self.merged_accuracy is None:
            return None
        return metrics.with_final_row(self.accuracy, self.merged_accuracy[-1])

    def summary(self) -> dict[str, Any]:
        """The metrics of the results schema (``docs/run_folder.md``): ``accuracy_matrix``,
        ``avg_acc``, ``forgetting``, ``bwt``, ``avg_drop``, ``wall_time_s``; for a method with
        ``merged_accuracy`` also ``accuracy_matrix_merged`` and ``merged`` (:meth:`merged_summary`); with a
        search ``hparam_search``; ``labels``: per task the method's
        :meth:`~mas_core.regularizers.base.Regularizer.describe` after the task (its importance
        estimator, the samples the estimate read, the accumulation rule, λ and the penalty step)."""
        summary = {"accuracy_matrix": [list(row) for row in self.accuracy], "avg_acc": self.avg_acc,
                   "forgetting": self.avg_forgetting, "bwt": self.bwt, "avg_drop": self.avg_drop,
                   "wall_time_s": self.wall_time_s}
        if self.merged_accuracy is not None:
            summary["accuracy_matrix_merged"] = [list(row) for row in self.merged_accuracy]
            summary["merged"] = self.merged_summary()
        if self.hparam_search is not None:
            summary["hparam_search"] = [dict(record) for record in self.hparam_search]
        if self.labels:
            summary["labels"] = [dict(label) for label in self.labels]
        return summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``method``, ``task_names``, :meth:`summary` and ``config`` (``None``
        for undefined entries of the matrix)."""
        return {"method": self.method, "task_names": list(self.task_names), **self.summary(), "config": self.config}


class TaskSearch(Protocol):
    """Chooses a task's learning rate and method strength before the task is trained
    (:class:`mas_core.hparam_search.SearchSettings`): ``choose`` returns a record whose ``"lr"``
    and ``"strength"`` (a dict for :meth:`Regularizer.set_strength`) the task is trained with;
    ``back_off(record, error)`` gives the smaller strength to retrain the task with when that
    training diverged (and records it in ``record``), or ``None`` when there is none;
    ``real_run_collapsed(experiment, trained, record, seed)`` says, after the real training, whether
    the task ended below the bar its strength was accepted by (a divergence too), else ``None``.
    ``choose`` is given ``stop`` (a callable, see :class:`LoopHooks`) only when the loop has hooks: a
    search may pass it to its trial runs' :class:`~mas_core.epochs.EpochSettings`."""

    def identity(self) -> dict[str, Any]: ...

    def choose(self, experiment: Any, model: nn.Module, trained: nn.Module, reg: Regularizer, *, task: int,
               head: int | None, optim: OptimSettings, seed: int, device: torch.device, method: str, label: str,
               log: Callable[[str], None]) -> dict[str, Any]: ...

    def back_off(self, record: dict[str, Any], error: str) -> dict[str, float] | None: ...

    def real_run_collapsed(self, experiment: Any, trained: nn.Module, record: dict[str, Any],
                           seed: int) -> str | None: ...


# --------------------------------------------------------------------------- what the loop tells while it runs

@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch of the loop's training of a task (not of the search's trial runs).

    ``method``: the label; ``task``: 0-based; ``attempt``: 0, then ``k`` after ``k`` back-offs of
    the search (the task trained again from its start); ``epoch``: 0-based, of ``epochs``;
    ``loss``: the mean over the epoch's steps of the global-batch objective the loop minimises,
    logs and checks (the task loss plus the penalty term); ``penalty``: the mean of the penalty
    term in it (0 for a method without one, and under ``penalty_step="proximal"``, which applies
    the penalty as a step after the optimizer's, outside the loss); ``seconds``: the epoch's wall time."""

    method: str
    task: int
    task_name: str
    attempt: int
    epoch: int
    epochs: int
    loss: float
    penalty: float
    seconds: float


@dataclass(frozen=True)
class TaskRecord:
    """One finished task: ``row`` is ``R[task]`` (``experiment.evaluate``, ``None`` beyond ``task``),
    ``merged_row`` the row after a weight-changing ``after_task`` (IMM's merge) or ``None``;
    ``metric`` the experiment's ``metric_name``; ``seconds`` the task's wall time (its search included)."""

    method: str
    task: int
    task_name: str
    metric: str
    row: list[float | None]
    merged_row: list[float | None] | None
    seconds: float


class LoopHooks:
    """What a caller of :func:`mas_core.loop.train_tasks` may observe and ask while the loop runs;
    every method is optional (this base class does nothing). Model-agnostic: a metrics log, a
    TensorBoard writer or a Ctrl-C handler live with the caller.

    Give the same kind of hooks on every rank: ``stop_requested`` is asked on every rank and the
    answers are combined (any rank asking stops all, after the same batch); the events are sent on
    rank 0 only.

    - ``run_started(method, completed_tasks, num_tasks)``: before the first task this call trains;
      ``completed_tasks`` is what a resumed checkpoint held (0 for a fresh run), so a log may drop
      what it wrote after that point in an interrupted run;
    - ``epoch_ended(record)``: :class:`EpochRecord`, after every epoch of the real training;
    - ``task_ended(record)``: :class:`TaskRecord`, after a task's evaluation, before its checkpoint;
    - ``stop_requested() -> bool``: asked after every training step and after every checkpoint; when
      true the loop raises :class:`~mas_core.errors.TrainingInterrupted` (the checkpoint of the last
      finished task stays as it was written)."""

    def run_started(self, method: str, completed_tasks: int, num_tasks: int) -> None:
        """A call of the loop starts (after a resumed checkpoint was read)."""

    def epoch_ended(self, record: EpochRecord) -> None:
        """An epoch of a task's real training ended."""

    def task_ended(self, record: TaskRecord) -> None:
        """A task was trained and evaluated."""

    def stop_requested(self) -> bool:
        """Whether the loop should stop after the current step."""
        return False
