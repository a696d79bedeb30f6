"""The task-sequence runner: a multi-head model trained task by task.

Protocol (task-incremental, multi-head; Aljundi et al. 2018, Sec. 5.1): a shared
trunk, one output head per task, the task identity known at test time. For each
task ``t`` :func:`run_sequence`

1. adds a head ``Linear(feature_dim, num_classes_t)`` and makes it the active head;
2. calls ``reg.before_task(model, TaskInfo(t, head=t, ...))``;
3. trains ``epochs`` epochs with a fresh SGD optimizer (momentum, ordinary L2 weight
   decay) on ``CE(head_t(trunk(x)), y) + reg.penalty(model, x)``, calling
   ``reg.after_step(model)`` after every step;
4. calls ``reg.after_task(model, loader)`` on the task's ``importance_data`` when
   given (e.g. unlabeled test-condition data, the paper's Table 3), else on its
   labelled training data (in order, batch size ``settings.batch_size``);
5. evaluates every task seen so far with its own head: ``R[t][j]`` = top-1 accuracy
   (a fraction in [0, 1]) on the test set of task ``j`` after training task ``t``;
6. checkpoints (model, head sizes, regularizer state, accuracy rows, RNG states,
   config) atomically to ``checkpoint_dir/sequence.pt``.

The method ``"joint"`` is the upper bound: at task ``t`` it trains, from the current
model, on the union of tasks ``0..t``, each sample through its own task's head
(loss = mean over the batch of the per-sample cross-entropies), with no regularizer.

Determinism: the global torch/numpy/python generators are seeded with
``settings.seed`` at the start (a side effect on the caller's generators), the data
order of epoch ``e`` of task ``t`` is drawn from an explicit ``torch.Generator``
seeded with ``(seed, t, e)``, and the global RNG states are checkpointed, so a run
resumed after task ``t`` gives a bitwise-identical accuracy matrix.

In ``SequenceResult.accuracy`` the entries with ``j > i`` (tasks not yet trained)
are ``None`` (JSON ``null``).

Several processes (``torchrun``; :mod:`mas_core.distributed`): when a process group of
2 or more is initialised, every rank runs :func:`run_sequence` with the same arguments.
Each global batch (the same order as in one process) is split across the ranks and the
step goes through DistributedDataParallel with the penalty inside the wrapped forward;
``after_task`` gets this rank's :class:`~mas_core.distributed.RankShard` of the importance
data, so Ω is the single-process Ω; the test sets are split across ranks and the correct
counts summed; rank 0 alone writes the checkpoint and logs. The checkpoint holds the
unwrapped model, so a run resumes on any number of processes. Ranks other than 0 reseed
the global generator at every task from ``(seed, task, rank)``, so their dropout masks
differ from rank 0's.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import distributed, metrics
from .batches import batch_input, batch_target, move_to
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import DivergenceError, EmptyDataError, MASCoreError, NonFiniteError
from .regularizers import make_regularizer
from .regularizers.base import Finetune, Regularizer, TaskInfo

CHECKPOINT_NAME = "sequence.pt"
CHECKPOINT_FORMAT = 1
JOINT = "joint"


class MultiHeadNet(nn.Module):
    """A shared trunk with one linear head per task.

    ``features(x)`` is the trunk output ``[B, feature_dim]``; ``forward(x, head)``
    the logits of head ``head`` (default: ``active_head``, which the runner sets to
    the task being trained, so MAS with ``output_fn=None`` measures the active
    head's logits, as in the paper).
    """

    def __init__(self, trunk: nn.Module, feature_dim: int) -> None:
        super().__init__()
        if int(feature_dim) <= 0:
            raise MASCoreError(f"feature_dim must be a positive integer (the trunk's output width), got {feature_dim}")
        self.trunk = trunk
        self.feature_dim = int(feature_dim)
        self.heads = nn.ModuleList()
        self.active_head = 0

    def add_head(self, num_outputs: int) -> int:
        """Append a ``Linear(feature_dim, num_outputs)`` head on the trunk's device and dtype; return its index."""
        if int(num_outputs) <= 0:
            raise MASCoreError(f"a head needs at least one output, got num_outputs={num_outputs}")
        reference = next(iter(self.trunk.parameters()), None)
        head = nn.Linear(self.feature_dim, int(num_outputs))
        if reference is not None:
            head = head.to(device=reference.device, dtype=reference.dtype)
        self.heads.append(head)
        return len(self.heads) - 1

    @property
    def head_sizes(self) -> list[int]:
        """Number of outputs of every head, in order."""
        return [int(head.out_features) for head in self.heads]

    def features(self, x: Tensor) -> Tensor:
        """The trunk output (shared features) ``[B, feature_dim]``."""
        return self.trunk(x)

    def forward(self, x: Tensor, head: int | None = None) -> Tensor:
        """Logits ``[B, num_outputs]`` of head ``head`` (default: ``active_head``)."""
        index = self.active_head if head is None else head
        if not 0 <= index < len(self.heads):
            raise MASCoreError(
                f"head {index} does not exist (the model has {len(self.heads)} heads); call add_head first"
            )
        return self.heads[index](self.features(x))


@dataclass
class Task:
    """One task: labelled train and test sets (labels in ``0..num_classes-1``).

    ``importance_data`` (optional, labels not needed) is what MAS-like methods
    estimate importance on instead of the training inputs.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    importance_data: Dataset | None = None


@dataclass
class TrainSettings:
    """Optimisation settings shared by every task (SGD with momentum; ``weight_decay`` is L2)."""

    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 512
    num_workers: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class SequenceResult:
    """Outcome of :func:`run_sequence`.

    ``accuracy[i][j]``: accuracy (fraction) on task ``j`` after training task ``i``;
    ``None`` for ``j > i``. ``wall_time_s``: seconds of training and evaluation,
    summed over resumed segments.
    """

    method: str
    task_names: list[str]
    accuracy: list[list[float | None]]
    wall_time_s: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def avg_acc(self) -> float:
        """Mean of the last row of ``accuracy`` (see :func:`mas_core.metrics.average_accuracy`)."""
        return metrics.average_accuracy(self.accuracy)

    @property
    def avg_forgetting(self) -> float:
        """Mean over ``j < T-1`` of ``R[j][j] - R[T-1][j]``."""
        return metrics.average_forgetting(self.accuracy)

    @property
    def bwt(self) -> float:
        """Backward transfer: mean over ``j < T-1`` of ``R[T-1][j] - R[j][j]``."""
        return metrics.backward_transfer(self.accuracy)

    @property
    def avg_drop(self) -> float:
        """The paper's average drop: mean over all tasks of ``R[T-1][j] - R[j][j]`` (negative = forgetting)."""
        return metrics.average_drop(self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (``None`` for undefined entries of the matrix)."""
        return {
            "method": self.method,
            "task_names": list(self.task_names),
            "accuracy": [list(row) for row in self.accuracy],
            "avg_acc": self.avg_acc,
            "avg_forgetting": self.avg_forgetting,
            "bwt": self.bwt,
            "avg_drop": self.avg_drop,
            "wall_time_s": self.wall_time_s,
            "config": self.config,
        }


def evaluate(model: nn.Module, dataset: Dataset, head: int | None, *, batch_size: int = 512,
             device: str | torch.device = "cpu", num_workers: int = 0) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model(x, head=head)`` on a labelled ``dataset``.

    Runs in eval mode under ``torch.no_grad`` and restores the previous mode.
    ``head=None`` calls ``model(x)`` (a single-output model).
    """
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        with torch.no_grad():
            for batch in _batches(dataset, None, batch_size, num_workers):
                inputs = move_to(batch_input(batch), device)
                targets = batch_target(batch).to(device)
                logits = model(inputs) if head is None else model(inputs, head=head)
                correct += int((logits.argmax(dim=1) == targets).sum().item())
                total += int(targets.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise EmptyDataError("the evaluation set is empty: give every task a non-empty test set")
    return correct / total


def run_sequence(make_model: Callable[[], MultiHeadNet], tasks: list[Task], method: str | Regularizer,
                 settings: TrainSettings, *, method_options: dict | None = None,
                 checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> SequenceResult:
    """Train ``tasks`` in order with ``method`` and return the accuracy matrix (see the module docstring).

    ``method``: ``"joint"``, a registry name (:data:`mas_core.regularizers.METHODS`,
    built with ``method_options``), or a :class:`Regularizer` instance.
    ``make_model()`` must return a :class:`MultiHeadNet` (or anything with
    ``features``, ``heads``, ``add_head``, ``active_head``) with no heads yet; it is
    called after seeding, so its initialisation is deterministic.
    With ``checkpoint_dir`` a checkpoint is written after every task; ``resume=True``
    continues after the last finished task (a fresh run if there is no checkpoint)
    and raises :class:`~mas_core.errors.CheckpointMismatchError` when the checkpoint
    was written with another configuration. ``resume=False`` starts over and
    overwrites the checkpoint. A non-finite loss raises
    :class:`~mas_core.errors.DivergenceError` naming λ and the learning rate.
    """
    try:
        settings.validate()
    except ValueError as exc:
        raise MASCoreError(f"invalid TrainSettings: {exc}") from None
    if not tasks:
        raise EmptyDataError("the task list is empty: give run_sequence at least one Task")
    for index, task in enumerate(tasks):
        if task.num_classes < 1:
            raise MASCoreError(f"task {index} ({task.name}) has num_classes={task.num_classes}; it must be >= 1")
        for split in ("train", "test"):
            if len(getattr(task, split)) == 0:
                raise EmptyDataError(f"task {index} ({task.name}) has an empty {split} set")
    if resume and checkpoint_dir is None:
        raise MASCoreError("resume=True needs checkpoint_dir (the folder the interrupted run wrote to)")
    options = dict(method_options or {})
    method_name, reg = _make_method(method, options)
    emit = _logger(progress, log)
    config = _config(method_name, method, options, settings, tasks)
    info = distributed.current()
    device = distributed.local_device(settings.device)
    if info is not None and not info.is_main:
        emit = lambda message: None  # noqa: E731 - rank 0 alone logs

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start = time.perf_counter()
    _seed_everything(settings.seed)
    model = make_model()
    if not hasattr(model, "heads") or not hasattr(model, "add_head"):
        raise MASCoreError("make_model() must return a MultiHeadNet (a model with heads and add_head)")
    if len(model.heads) != 0:
        raise MASCoreError(f"make_model() returned a model with {len(model.heads)} heads; return one with none")
    model.to(device)
    accuracy: list[list[float | None]] = []
    first_task = 0
    previous_time = 0.0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, expected_config=config, map_location=device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MASCoreError(f"{checkpoint_path} has checkpoint format {state.get('format')!r}, "
                               f"this version writes {CHECKPOINT_FORMAT}; start a new run")
        for size in state["head_sizes"]:
            model.add_head(int(size))
        model.load_state_dict(state["model"])
        reg.load_state_dict(state["regularizer"])
        accuracy = [list(row) for row in state["accuracy"]]
        first_task = int(state["completed_tasks"])
        previous_time = float(state["wall_time_s"])
        _set_rng_states(state["rng"])
        emit(f"[{method_name}] resumed from {checkpoint_path} after task {first_task}/{len(tasks)}")

    for t in range(first_task, len(tasks)):
        task = tasks[t]
        if info is not None and not info.is_main:
            torch.manual_seed(_derived_seed(settings.seed, t, info.rank))
        head = model.add_head(task.num_classes)
        model.active_head = head
        reg.before_task(model, TaskInfo(index=t, head=head, num_samples=len(task.train)))
        if method_name == JOINT:
            _train_joint(model, tasks[: t + 1], t, settings, method_name, emit)
        else:
            _train_task(model, task, t, head, reg, settings, method_name, emit)
            source = task.importance_data if task.importance_data is not None else task.train
            if len(source) == 0:
                raise EmptyDataError(f"task {t} ({task.name}) has empty importance_data")
            model.active_head = head
            reg.after_task(model, _importance_batches(source, settings, info))
        model.active_head = head
        row: list[float | None] = [
            _evaluate_on_ranks(model, tasks[j].test, j, settings, device, info)
            for j in range(t + 1)
        ]
        row.extend([None] * (len(tasks) - t - 1))
        accuracy.append(row)
        emit(f"[{method_name}] after task {t + 1}/{len(tasks)} ({task.name}): "
             + " ".join(f"{value:.4f}" for value in row if value is not None))
        if checkpoint_path is not None and (info is None or info.is_main):
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT,
                "config": config,
                "completed_tasks": t + 1,
                "head_sizes": list(model.head_sizes) if hasattr(model, "head_sizes")
                else [int(h.out_features) for h in model.heads],
                "model": model.state_dict(),
                "regularizer": reg.state_dict(),
                "accuracy": accuracy,
                "rng": _get_rng_states(),
                "wall_time_s": previous_time + time.perf_counter() - start,
            })
        distributed.barrier()  # the checkpoint is complete before any rank moves on
    return SequenceResult(
        method=method_name,
        task_names=[task.name for task in tasks],
        accuracy=accuracy,
        wall_time_s=previous_time + time.perf_counter() - start,
        config=config,
    )


# --------------------------------------------------------------------------- training loops

def _train_task(model: nn.Module, task: Task, t: int, head: int, reg: Regularizer, settings: TrainSettings,
                method_name: str, emit: Callable[[str], None]) -> None:
    if distributed.current() is not None:
        _train_task_distributed(model, task, t, head, reg, settings, method_name, emit)
        return
    device = torch.device(settings.device)
    optimizer = _optimizer(model, settings)
    model.train()
    for epoch in range(settings.epochs):
        order = _epoch_order(len(task.train), settings.seed, t, epoch)
        total_loss = 0.0
        steps = 0
        for step, batch in enumerate(_batches(task.train, order, settings.batch_size, settings.num_workers)):
            inputs = move_to(batch_input(batch), device)
            targets = batch_target(batch).to(device)
            _check_targets(targets, task.num_classes, t, task.name)
            optimizer.zero_grad(set_to_none=True)
            task_loss = F.cross_entropy(model(inputs, head=head), targets)
            try:
                penalty = reg.penalty(model, inputs)
            except DivergenceError:
                raise
            except NonFiniteError as exc:
                raise _divergence(reg, settings, method_name, t, task.name, epoch, step, f"the penalty is not finite ({exc})") from None
            loss = task_loss + penalty
            if not torch.isfinite(loss).item():
                raise _divergence(reg, settings, method_name, t, task.name, epoch, step, f"the loss is {loss.item()}")
            loss.backward()
            optimizer.step()
            reg.after_step(model)
            total_loss += float(loss.detach())
            steps += 1
        _check_parameters(model, reg, settings, method_name, t, task.name, epoch)
        emit(f"[{method_name}] task {t + 1} ({task.name}) epoch {epoch + 1}/{settings.epochs}: "
             f"mean loss {total_loss / max(steps, 1):.4f}")


def _train_joint(model: nn.Module, tasks: Sequence[Task], t: int, settings: TrainSettings, method_name: str,
                 emit: Callable[[str], None]) -> None:
    if distributed.current() is not None:
        _train_joint_distributed(model, tasks, t, settings, method_name, emit)
        return
    device = torch.device(settings.device)
    union = _tagged_union(tasks)
    optimizer = _optimizer(model, settings)
    model.train()
    num_classes = [task.num_classes for task in tasks]
    for epoch in range(settings.epochs):
        order = _epoch_order(len(union), settings.seed, t, epoch)
        total_loss = 0.0
        steps = 0
        for step, batch in enumerate(_batches(union, order, settings.batch_size, settings.num_workers)):
            inputs = move_to(batch[0], device)
            targets = batch[1].to(device)
            task_ids = batch[2].to(device)
            optimizer.zero_grad(set_to_none=True)
            features = model.features(inputs)
            loss = features.new_zeros(())
            for task_id in torch.unique(task_ids).tolist():
                mask = task_ids == task_id
                _check_targets(targets[mask], num_classes[task_id], task_id, tasks[task_id].name)
                loss = loss + F.cross_entropy(model.heads[task_id](features[mask]), targets[mask], reduction="sum")
            loss = loss / targets.shape[0]
            if not torch.isfinite(loss).item():
                raise _divergence(None, settings, method_name, t, tasks[-1].name, epoch, step, f"the loss is {loss.item()}")
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            steps += 1
        _check_parameters(model, None, settings, method_name, t, tasks[-1].name, epoch)
        emit(f"[{method_name}] tasks 1..{t + 1} epoch {epoch + 1}/{settings.epochs}: "
             f"mean loss {total_loss / max(steps, 1):.4f}")


# --------------------------------------------------------------------------- several processes

def _train_task_distributed(model: nn.Module, task: Task, t: int, head: int, reg: Regularizer,
                            settings: TrainSettings, method_name: str, emit: Callable[[str], None]) -> None:
    """:func:`_train_task` on this rank's share of every global batch, through DDP."""

    def step_loss(net: nn.Module, inputs: Any, targets: Tensor, weight: float) -> Tensor:
        return weight * F.cross_entropy(net(inputs, head=head), targets, reduction="sum") + reg.penalty(net, inputs)

    def unpack(batch: Any, device: torch.device) -> tuple[Any, ...]:
        inputs = move_to(batch_input(batch), device)
        targets = batch_target(batch).to(device)
        _check_targets(targets, task.num_classes, t, task.name)
        return inputs, targets

    _distributed_epochs(model, task.train, t, reg, settings, method_name, task.name, emit, step_loss, unpack,
                        f"task {t + 1} ({task.name})", fixed_graph=True)


def _train_joint_distributed(model: nn.Module, tasks: Sequence[Task], t: int, settings: TrainSettings,
                             method_name: str, emit: Callable[[str], None]) -> None:
    """:func:`_train_joint` on this rank's share of every global batch, through DDP."""
    num_classes = [task.num_classes for task in tasks]

    def step_loss(net: nn.Module, inputs: Any, targets: Tensor, task_ids: Tensor, weight: float) -> Tensor:
        features = net.features(inputs)
        loss = features.new_zeros(())
        for task_id in torch.unique(task_ids).tolist():  # heads absent on every rank keep grad=None, as in one process
            mask = task_ids == task_id
            loss = loss + F.cross_entropy(net.heads[task_id](features[mask]), targets[mask], reduction="sum")
        return weight * loss

    def unpack(batch: Any, device: torch.device) -> tuple[Any, ...]:
        inputs, targets, task_ids = move_to(batch[0], device), batch[1].to(device), batch[2].to(device)
        for task_id in torch.unique(task_ids).tolist():
            mask = task_ids == task_id
            _check_targets(targets[mask], num_classes[task_id], task_id, tasks[task_id].name)
        return inputs, targets, task_ids

    _distributed_epochs(model, _tagged_union(tasks), t, None, settings, method_name, tasks[-1].name, emit,
                        step_loss, unpack, f"tasks 1..{t + 1}")


def _distributed_epochs(model: nn.Module, dataset: Dataset, t: int, reg: Regularizer | None,
                        settings: TrainSettings, method_name: str, task_name: str, emit: Callable[[str], None],
                        step_loss: Callable[..., Tensor], unpack: Callable[[Any, torch.device], tuple[Any, ...]],
                        label: str, *, fixed_graph: bool = False) -> None:
    """The epochs of one task on this rank: global batches from :func:`_epoch_order` (the
    single-process order), this rank's share from :func:`distributed.rank_share`, one DDP
    step per global batch. With ``fixed_graph`` (every step uses the same parameters: one
    task's head plus the penalty's) one probe of the loss decides whether DDP must look
    for unused parameters (old heads under fine-tuning) or can skip that graph traversal. The loss is summed over ranks so every rank takes the same
    divergence decision."""
    info = distributed.current()
    device = distributed.local_device(settings.device)
    optimizer = _optimizer(model, settings)
    n = len(dataset)
    find_unused = True
    if fixed_graph:  # probe once (eval mode: no BatchNorm update, no RNG draw) whether every parameter is used
        first, weight = distributed.rank_share(
            torch.as_tensor(_epoch_order(n, settings.seed, t, 0)[:settings.batch_size], dtype=torch.long), info)
        probe_batch = next(iter(_index_batches(dataset, [first], settings.num_workers)))
        was_training = model.training
        model.eval()
        try:
            reached = distributed.parameters_in_graph(step_loss(model, *unpack(probe_batch, device), weight))
        except NonFiniteError:
            reached = set()
        finally:
            model.train(was_training)
        find_unused = any(id(p) not in reached for p in model.parameters() if p.requires_grad)
    wrapped = distributed.wrap_for_training(model, step_loss, find_unused_parameters=find_unused)
    model.train()
    for epoch in range(settings.epochs):
        order = torch.as_tensor(_epoch_order(n, settings.seed, t, epoch), dtype=torch.long)
        shares = [distributed.rank_share(order[begin:begin + settings.batch_size], info)
                  for begin in range(0, n, settings.batch_size)]
        total_loss = 0.0
        for step, (batch, (_, weight)) in enumerate(zip(_index_batches(dataset, [s for s, _ in shares],
                                                                       settings.num_workers), shares)):
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = wrapped(*unpack(batch, device), weight)
            except NonFiniteError as exc:
                raise _divergence(reg, settings, method_name, t, task_name, epoch, step,
                                  f"the penalty is not finite ({exc})") from None
            loss.backward()
            # Σ_r loss_r = N · (global mean loss + penalty): the same number, and decision, on every rank
            summed = distributed.all_reduce_tensor(loss.detach().clone().to(torch.float64)).item() / info.world_size
            if not math.isfinite(summed):
                raise _divergence(reg, settings, method_name, t, task_name, epoch, step, f"the loss is {summed}")
            optimizer.step()
            if reg is not None:
                reg.after_step(model)
            total_loss += summed
        _check_parameters(model, reg, settings, method_name, t, task_name, epoch)
        emit(f"[{method_name}] {label} epoch {epoch + 1}/{settings.epochs}: "
             f"mean loss {total_loss / max(len(shares), 1):.4f}")


def _index_batches(dataset: Dataset, index_batches: Sequence[Tensor], num_workers: int) -> Iterable[Any]:
    """The batches of ``dataset`` made of the given index lists, in that order."""
    if isinstance(dataset, TensorDataset):
        return (tuple(tensor[index] for tensor in dataset.tensors) for index in index_batches)
    return DataLoader(dataset, batch_sampler=[index.tolist() for index in index_batches], num_workers=num_workers)


def _importance_batches(source: Dataset, settings: TrainSettings, info: distributed.ProcessInfo | None) -> Iterable[Any]:
    """The data for ``after_task``: the whole source in order, or this rank's
    :class:`~mas_core.distributed.RankShard` of it."""
    if info is None:
        return _batches(source, None, settings.batch_size, settings.num_workers)

    def make_batches(positions: list[int]) -> Iterable[Any]:
        index = torch.as_tensor(positions, dtype=torch.long)
        return _index_batches(source, list(index.split(settings.batch_size)), settings.num_workers)

    return distributed.RankShard(make_batches, len(source), info)


def _evaluate_on_ranks(model: nn.Module, dataset: Dataset, head: int, settings: TrainSettings,
                       device: torch.device, info: distributed.ProcessInfo | None) -> float:
    """:func:`evaluate`; with several ranks each scores its share of the test set and the
    correct and total counts are summed."""
    if info is None:
        return evaluate(model, dataset, head, batch_size=settings.eval_batch_size, device=device,
                        num_workers=settings.num_workers)
    positions = distributed.shard_positions(len(dataset), info)
    counts = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            index = torch.as_tensor(positions, dtype=torch.long)
            for batch in _index_batches(dataset, list(index.split(settings.eval_batch_size)), settings.num_workers):
                inputs = move_to(batch_input(batch), device)
                targets = batch_target(batch).to(device)
                logits = model(inputs, head=head)
                counts[0] += float((logits.argmax(dim=1) == targets).sum().item())
                counts[1] += float(targets.shape[0])
    finally:
        model.train(was_training)
    distributed.all_reduce_tensor(counts)
    if counts[1] == 0:
        raise EmptyDataError("the evaluation set is empty: give every task a non-empty test set")
    return float(counts[0] / counts[1])


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise MASCoreError("the model has no trainable parameters (requires_grad=True); nothing to train")
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def _check_targets(targets: Tensor, num_classes: int, t: int, name: str) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise MASCoreError(
            f"task {t} ({name}) has labels in [{int(targets.min())}, {int(targets.max())}] but num_classes="
            f"{num_classes}; relabel each task's classes as 0..num_classes-1"
        )


def _check_parameters(model: nn.Module, reg: Regularizer | None, settings: TrainSettings, method_name: str,
                      t: int, name: str, epoch: int) -> None:
    for parameter_name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all().item():
            raise _divergence(reg, settings, method_name, t, name, epoch, None,
                              f"parameter {parameter_name} is not finite")


def _divergence(reg: Regularizer | None, settings: TrainSettings, method_name: str, t: int, name: str,
                epoch: int, step: int | None, what: str) -> DivergenceError:
    lam = None
    for attribute in ("lam", "lam_l2"):
        if reg is not None and getattr(reg, attribute, None) is not None:
            lam = (attribute, getattr(reg, attribute))
            break
    where = f"task {t} ({name}), epoch {epoch + 1}" + (f", step {step}" if step is not None else "")
    if lam is not None:
        advice = f"{method_name} {lam[0].replace('lam', 'lambda')}={lam[1]}, learning rate={settings.lr}: lower lambda or the learning rate"
    else:
        advice = f"{method_name}, learning rate={settings.lr}: lower the learning rate"
    return DivergenceError(f"training diverged at {where}: {what}; {advice}")


# --------------------------------------------------------------------------- data

class _Tagged(Dataset):
    """A dataset whose items are ``(input, target, task_id)``."""

    def __init__(self, dataset: Dataset, task_id: int) -> None:
        self.dataset = dataset
        self.task_id = task_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        return batch_input(item), batch_target(item), self.task_id


def _tagged_union(tasks: Sequence[Task]) -> Dataset:
    """The union of the tasks' training sets, each item tagged with its task index."""
    if all(isinstance(task.train, TensorDataset) and len(task.train.tensors) >= 2 for task in tasks):
        inputs = torch.cat([task.train.tensors[0] for task in tasks])
        targets = torch.cat([task.train.tensors[1] for task in tasks])
        task_ids = torch.cat([torch.full((len(task.train),), index, dtype=torch.long) for index, task in enumerate(tasks)])
        return TensorDataset(inputs, targets, task_ids)
    return torch.utils.data.ConcatDataset([_Tagged(task.train, index) for index, task in enumerate(tasks)])


def _epoch_order(n: int, seed: int, t: int, epoch: int) -> list[int]:
    """The sample order of epoch ``epoch`` of task ``t``: a permutation drawn from a generator seeded with (seed, t, epoch)."""
    generator = torch.Generator().manual_seed(_derived_seed(seed, t, epoch))
    return torch.randperm(n, generator=generator).tolist()


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(key) & 0xFFFFFFFF for key in keys]).generate_state(1)[0])


def _batches(dataset: Dataset, order: list[int] | None, batch_size: int, num_workers: int) -> Iterable[Any]:
    """Batches of ``dataset`` in ``order`` (``None``: sequential). A ``TensorDataset`` is indexed directly
    (same batches as the default collate, without per-item overhead)."""
    if isinstance(dataset, TensorDataset):
        return _TensorBatches(dataset, order, batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))


class _TensorBatches:
    """Re-iterable batches of a ``TensorDataset`` (a tuple of tensors per batch)."""

    def __init__(self, dataset: TensorDataset, order: list[int] | None, batch_size: int) -> None:
        self.tensors = dataset.tensors
        self.order = torch.as_tensor(order, dtype=torch.long) if order is not None else None
        self.batch_size = batch_size
        self.n = len(dataset)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for begin in range(0, self.n, self.batch_size):
            if self.order is None:
                yield tuple(tensor[begin:begin + self.batch_size] for tensor in self.tensors)
            else:
                index = self.order[begin:begin + self.batch_size]
                yield tuple(tensor[index] for tensor in self.tensors)


# --------------------------------------------------------------------------- methods, config, RNG

def _make_method(method: str | Regularizer, options: dict[str, Any]) -> tuple[str, Regularizer]:
    if isinstance(method, Regularizer):
        if options:
            raise MASCoreError("method_options are only used with a method name; configure the Regularizer instance instead")
        return str(getattr(method, "name", type(method).__name__)), method
    if not isinstance(method, str):
        raise MASCoreError(f"method must be a name or a Regularizer instance, got {type(method).__name__}")
    if method == JOINT:
        if options:
            raise MASCoreError(f"the joint upper bound takes no method_options, got {sorted(options)}")
        return JOINT, Finetune()
    return method, make_regularizer(method, **options)


def _plain(value: Any) -> Any:
    """A JSON-like, comparable rendering of an option value (callables by qualified name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _config(method_name: str, method: str | Regularizer, options: dict[str, Any], settings: TrainSettings,
            tasks: Sequence[Task]) -> dict[str, Any]:
    described = _plain(options)
    if isinstance(method, Regularizer):
        described = {"class": f"{type(method).__module__}.{type(method).__qualname__}", "repr": repr(method)}
    return {
        "method": method_name,
        "method_options": described,
        "settings": _plain(dataclasses.asdict(settings)),
        "tasks": [
            {
                "name": task.name,
                "num_classes": int(task.num_classes),
                "train_size": len(task.train),
                "test_size": len(task.test),
                "importance_size": None if task.importance_data is None else len(task.importance_data),
            }
            for task in tasks
        ],
    }


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def _get_rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(numpy_state[0]),
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {"version": int(python_state[0]), "internal": list(python_state[1]),
                   "gauss_next": python_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].cpu().numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def _logger(progress: bool, log: Callable[[str], None] | None) -> Callable[[str], None]:
    if log is not None:
        return log
    if progress:
        return lambda message: print(message, file=sys.stderr, flush=True)
    return lambda message: None
