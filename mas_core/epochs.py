"""A task's epochs: the one place a model takes optimizer steps (:func:`train_task_epochs`).

The task loop (:mod:`mas_core.loop`) trains every task through it and the hyperparameter
search (:mod:`mas_core.hparam_search`) its trial runs, so both see the same sample order, the
same optimizer and the same divergence checks. What a call needs beside the model and the data
travels in one :class:`EpochSettings`. The sample order of epoch ``e`` of task ``t`` is drawn from
``derived_seed(seed, t, e)`` (:func:`epoch_shares`), independent of the number of processes.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import distributed
from .batches import batch_input, move_to
from .divergence import CollapseCheck, divergence
from .errors import MASCoreError, NonFiniteError, TrainingInterrupted
from .experiment import EpochRecord, Experiment, LoopHooks, OptimSettings, TrainData
from .regularizers.base import Regularizer


def _silent(message: str) -> None:
    """A log that drops its lines."""


@dataclass(frozen=True)
class EpochSettings:
    """How :func:`train_task_epochs` trains a task, beside the model and the data.

    ``optim``: the optimizer (its ``lr`` is the task's); ``seed``: the run's seed (the sample order
    of epoch ``e`` is drawn from ``derived_seed(seed, task, e)``); ``device``: where batches go;
    ``joint``: the loop's joint mode (one parameter group); ``label``: the method in messages;
    ``emit``: one line per epoch; ``events``: :meth:`LoopHooks.epoch_ended` after every epoch, sent
    on rank 0 only (the loop's real training; the search's trial runs give none); ``stop``: asked
    after every step (the answers of all ranks combined): when true,
    :class:`~mas_core.errors.TrainingInterrupted` is raised after that step; ``attempt``: the
    back-off attempt the epoch records carry."""

    optim: OptimSettings
    seed: int
    device: torch.device
    joint: bool = False
    label: str = ""
    emit: Callable[[str], None] = _silent
    events: LoopHooks | None = None
    stop: Callable[[], bool] | None = None
    attempt: int = 0


def derived_seed(*parts: Any) -> int:
    """A 62-bit seed from ``parts``: the first 8 bytes (little-endian) of SHA-256 of their
    ``str`` joined by ``":"``. Independent streams for (seed, task), (seed, task, epoch), …"""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def train_task_epochs(experiment: Experiment, trained: nn.Module, model: nn.Module, data: TrainData, task: int,
                      reg: Regularizer, settings: EpochSettings) -> float:
    """Train ``trained`` on ``data`` as task ``task`` for ``settings.optim.epochs_of(task)`` epochs on
    this rank; return the mean global-batch loss over all steps.

    A fresh SGD optimizer (``optim``'s lr, momentum and weight decay, the latter only on the
    parameters the task's loss reaches: :func:`_parameter_groups`); epoch ``e`` visits the samples
    in the order :func:`epoch_shares` draws from ``(seed, task, e)``; each step minimises
    ``scale·experiment.loss + reg.penalty`` (through DDP when several processes run), clips the
    gradient norm when ``optim.clip_grad_norm`` is set and calls the regularizer's step hooks.
    ``model`` (the whole model, of which ``trained`` is the trained part) is checked for NaN/Inf
    after every epoch. Raises :class:`~mas_core.errors.DivergenceError` (naming the strength and
    the learning rate) on a non-finite loss, penalty or weight, and on a collapse at a finite loss
    (an epoch's mean loss above :data:`~mas_core.divergence.COLLAPSE_FACTOR` times the first
    epoch's); :class:`~mas_core.errors.TrainingInterrupted` after a step when ``settings.stop`` asks."""
    steps = _TaskSteps(experiment, trained, data, task, reg, settings)
    info = distributed.current()
    epochs = settings.optim.epochs_of(task)
    total, count = 0.0, 0
    collapse = CollapseCheck()
    for epoch in range(epochs):
        started = time.perf_counter()
        epoch_total, epoch_steps, penalty = steps.epoch(epoch)
        broken = next((key for key, value in model.state_dict().items()
                       if value.is_floating_point() and not torch.isfinite(value).all()), None)
        if broken is not None:
            raise steps.diverged(epoch, None, f"{broken} holds NaN/Inf")
        mean = epoch_total / max(epoch_steps, 1)
        collapsed = collapse.end_of_epoch(mean)
        if collapsed is not None:
            raise steps.diverged(epoch, None, collapsed)
        settings.emit(f"[{settings.label}] task {task + 1} ({steps.name}) epoch {epoch + 1}/{epochs}: "
                      f"mean loss {mean:.4f}")
        if settings.events is not None and (info is None or info.is_main):
            settings.events.epoch_ended(EpochRecord(
                method=settings.label, task=task, task_name=steps.name, attempt=settings.attempt, epoch=epoch,
                epochs=epochs, loss=mean, penalty=penalty, seconds=time.perf_counter() - started))
        total += epoch_total
        count += epoch_steps
    return total / max(count, 1)


class _TaskSteps:
    """The optimizer, the (DDP-wrapped) step loss and one epoch's steps of one task."""

    def __init__(self, experiment: Experiment, trained: nn.Module, data: TrainData, task: int, reg: Regularizer,
                 settings: EpochSettings) -> None:
        self.experiment, self.trained, self.data, self.task, self.reg = experiment, trained, data, task, reg
        self.settings, self.info = settings, distributed.current()
        self.name = experiment.task_names[task]
        self.parameters = [p for p in trained.parameters() if p.requires_grad]
        if not self.parameters:
            raise MASCoreError("the model has no trainable parameters (requires_grad=True); nothing to train")
        optim = settings.optim
        self.optimizer = torch.optim.SGD(_parameter_groups(experiment, trained, self.parameters, data, task, settings),
                                         lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        self.penalties: list[Tensor | float] | None = [] if settings.events is not None else None
        self.step_loss = _step_loss(experiment, reg, task, self.penalties)  # holds nothing that holds it: no cycle
        find_unused = True
        if self.info is not None and not settings.joint:  # probe once whether every trained parameter takes part
            find_unused = _some_parameter_unused(trained, self.parameters, data, self.step_loss, task, settings)
        self.wrapped = distributed.wrap_for_training(trained, self.step_loss, find_unused_parameters=find_unused)

    def diverged(self, epoch: int, step: int | None, what: str) -> Exception:
        """The task's :class:`~mas_core.errors.DivergenceError` at ``epoch`` (and ``step``)."""
        return divergence(self.reg, self.settings.optim, self.settings.label, self.task, self.name, epoch, step, what)

    def epoch(self, epoch: int) -> tuple[float, int, float]:
        """Train one epoch; return the sum of its global-batch losses, its number of steps and the mean
        penalty term (all-reduced; ``nan`` when no epoch record is asked for)."""
        settings, reg, optimizer = self.settings, self.reg, self.optimizer
        world_size = 1 if self.info is None else self.info.world_size
        shares = epoch_shares(len(self.data), settings.optim.batch_size, settings.seed, self.task, epoch, self.info)
        if self.penalties is not None:
            self.penalties.clear()
        epoch_total = 0.0
        for step, (batch, (_, scale)) in enumerate(zip(self.data.batches([index for index, _ in shares]), shares)):
            batch = move_to(batch, settings.device)
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = self.wrapped(batch, scale)
            except NonFiniteError as exc:
                raise self.diverged(epoch, step, f"the penalty is not finite ({exc})") from None
            # Σ_r loss_r / N: the global-batch loss, the same number (and decision) on every rank
            reduced = loss.detach().to(torch.float64).reshape(1).clone()
            asked = self.info is not None and settings.stop is not None
            if asked:  # several processes: the stop request travels with the loss, so every rank stops alike
                reduced = torch.cat([reduced, reduced.new_tensor([1.0 if settings.stop() else 0.0])])
            reduced = distributed.all_reduce_tensor(reduced)
            value = float(reduced[0]) / world_size
            if not math.isfinite(value):
                raise self.diverged(epoch, step, f"the loss is {value}")
            loss.backward()
            if settings.optim.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.parameters, settings.optim.clip_grad_norm)
            optimizer.step()
            if reg.uses_optimizer_step_hook:  # e.g. the proximal penalty step, before SI sees Δθ
                reg.after_optimizer_step(self.trained, optimizer)
            if reg.uses_step_hook:
                reg.after_step(self.trained)
            epoch_total += value
            if settings.stop is not None and (float(reduced[1]) > 0 if asked else settings.stop()):
                raise TrainingInterrupted(settings.label, 0, len(self.experiment.task_names), task=self.task)
        return epoch_total, len(shares), self._mean_penalty(len(shares), world_size)

    def _mean_penalty(self, steps: int, world_size: int) -> float:
        """The epoch's mean penalty term over its steps and the ranks (one all-reduce per epoch)."""
        if self.penalties is None:
            return math.nan
        tensors = [value for value in self.penalties if isinstance(value, Tensor)]
        total = torch.tensor([sum(value for value in self.penalties if not isinstance(value, Tensor))],
                             dtype=torch.float64, device=self.settings.device)
        if tensors:  # one stack and one sum per epoch, not one per step
            total += torch.stack([value.reshape(()) for value in tensors]).to(torch.float64).sum()
        return float(distributed.all_reduce_tensor(total)[0]) / world_size / max(steps, 1)


def _step_loss(experiment: Experiment, reg: Regularizer, task: int,
               penalties: list[Tensor | float] | None) -> Callable[[nn.Module, Any, float], Tensor]:
    """``step_loss(module, batch, scale) = scale·experiment.loss + reg.penalty`` of one batch (the penalty
    term appended to ``penalties`` for the epoch record, when given). A closure over the task's parts
    only, so that the DDP wrapper holding it forms no reference cycle (the model and the optimizer's
    state are freed as soon as the task's epochs end, not at the next garbage collection)."""

    def step_loss(module: nn.Module, batch: Any, scale: float) -> Tensor:
        task_loss = scale * experiment.loss(module, batch, task)
        penalty = reg.penalty(module, batch_input(batch))
        if penalties is not None:
            penalties.append(penalty.detach() if isinstance(penalty, Tensor) else float(penalty))
        return task_loss + penalty

    return step_loss


def epoch_shares(n: int, batch_size: int, seed: int, task: int, epoch: int,
                 info: distributed.ProcessInfo | None) -> list[tuple[Tensor, float]]:
    """This rank's ``(positions, scale)`` of every global batch of epoch ``epoch`` of task ``task``.

    The global order is ``randperm(n)`` drawn from a generator seeded with
    ``derived_seed(seed, task, epoch)`` (independent of the number of processes), cut into
    batches of ``batch_size``; rank ``r`` of ``N`` keeps positions ``r, r+N, …`` of each and
    ``scale = N·|share| / |batch|`` (exactly 1 in one process; 0 for the one padded sample of a
    rank whose share is empty). When ``n mod batch_size = 1`` (and ``n > batch_size``) the last
    sample joins the batch before it (one batch of ``batch_size + 1``): a batch of one sample
    cannot train a model with BatchNorm in train mode (it has no batch variance)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, task, epoch))
    order = torch.randperm(n, generator=generator)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    shares = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        global_batch = order[begin:end]
        share, weight = distributed.rank_share(global_batch, info)
        world_size = 1 if info is None else info.world_size
        scale = 0.0 if weight == 0.0 else len(share) * world_size / len(global_batch)
        shares.append((share, scale))
    return shares


def _parameter_groups(experiment: Experiment, trained: nn.Module, parameters: list[Tensor], data: TrainData,
                      task: int, settings: EpochSettings) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: weight decay only on the parameters the current task's loss
    reaches (probed on the first batch of the task, eval mode: no BatchNorm update, no dropout draw;
    the global RNG is restored after).
    The others (old tasks' heads) stay in the optimizer, so a method's penalty may still move them
    (LwF's distillation), but are not decayed: under MAS, EWC or SI an old head whose anchor holds it
    keeps its weights bit for bit. Without weight decay, and in joint mode (a batch may miss a task),
    one group of every parameter."""
    optim = settings.optim
    if optim.weight_decay == 0 or settings.joint:
        return [{"params": parameters}]
    index, _ = epoch_shares(len(data), optim.batch_size, settings.seed, task, 0, distributed.current())[0]
    was_training = trained.training
    with torch.random.fork_rng(devices=[]):  # a random crop while reading the batch leaves the run's stream as it was
        batch = move_to(next(iter(data.batches([index]))), settings.device)
        trained.eval()
        try:
            with torch.enable_grad():
                reached = distributed.parameters_in_graph(experiment.loss(trained, batch, task))
        finally:
            trained.train(was_training)
    decayed = [p for p in parameters if id(p) in reached]
    kept = [p for p in parameters if id(p) not in reached]
    groups = [{"params": decayed}] if decayed else []
    return groups + ([{"params": kept, "weight_decay": 0.0}] if kept else [])


def _some_parameter_unused(trained: nn.Module, parameters: list[Tensor], data: TrainData,
                           step_loss: Callable[..., Tensor], task: int, settings: EpochSettings) -> bool:
    """Whether some trained parameter takes no part in the first step's loss (then DDP must look
    for unused parameters at every step, e.g. old heads under fine-tuning). Eval mode: no
    BatchNorm update, no dropout draw."""
    optim = settings.optim
    index, scale = epoch_shares(len(data), optim.batch_size, settings.seed, task, 0, distributed.current())[0]
    batch = move_to(next(iter(data.batches([index]))), settings.device)
    was_training = trained.training
    trained.eval()
    try:
        reached = distributed.parameters_in_graph(step_loss(trained, batch, scale))
    except NonFiniteError:
        reached = set()
    finally:
        trained.train(was_training)
    return any(id(p) not in reached for p in parameters)


__all__ = ["EpochSettings", "derived_seed", "epoch_shares", "train_task_epochs"]
