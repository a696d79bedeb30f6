"""Around a task's training: the importance data ``after_task`` reads (this rank's share), the
method's ``after_task`` (a :class:`~mas_core.errors.NonFiniteError` there is the task's
divergence), the anchor at the starting weights before the first task, and the task's row of the
accuracy matrix.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .batches import move_to
from .divergence import divergence
from .errors import DivergenceError, EmptyDataError, MASCoreError, NonFiniteError
from .experiment import Experiment, OptimSettings
from .regularizers.base import Regularizer


def evaluate_row(experiment: Experiment, model: nn.Module, task: int, num_tasks: int) -> list[float | None]:
    """The row ``R[task]`` of the accuracy matrix: ``experiment.evaluate`` on tasks ``0..task``,
    ``None`` for the tasks not yet trained."""
    row: list[float | None] = [float(value) for value in experiment.evaluate(model, task)][:task + 1]
    return row + [None] * (num_tasks - task - 1)


def after_task_of_trained(experiment: Experiment, model: nn.Module, trained: nn.Module, reg: Regularizer,
                           task: int, device: torch.device, optim: OptimSettings, label: str) -> None:
    """:func:`_after_task`, where a :class:`~mas_core.errors.NonFiniteError` (e.g. MAS's importance
    of a model that exploded at a finite loss) is the task's divergence: raised as a
    :class:`~mas_core.errors.DivergenceError`, so the loop backs off from it as from a diverged step."""
    try:
        _after_task(experiment, model, trained, reg, task, device)
    except DivergenceError:
        raise
    except NonFiniteError as exc:
        raise divergence(reg, optim, label, task, experiment.task_names[task], None, None,
                         f"after_task failed on the trained model ({exc})") from None


def _after_task(experiment: Experiment, model: nn.Module, trained: nn.Module, reg: Regularizer, task: int,
                device: torch.device) -> None:
    """``reg.after_task`` on what it declares it reads: this rank's share of the experiment's
    importance source (``"inputs"`` / ``"labelled"``) or nothing (``"none"``)."""
    kind = reg.after_task_data
    if kind == "none":
        reg.after_task(trained, ())
        return
    reg.after_task(trained, _importance_shard(experiment, model, task, kind, device))


def _importance_shard(experiment: Experiment, model: nn.Module, task: int, kind: str,
                      device: torch.device) -> distributed.RankShard:
    """This rank's share of ``experiment.importance_data(model, task, kind)``, batches on ``device``."""
    source = experiment.importance_data(model, task, kind)
    if len(source.data) == 0:
        raise EmptyDataError(f"task {task} ({experiment.task_names[task]}) has no importance data")

    def make_batches(positions: list[int]) -> Iterable[Any]:
        index = torch.as_tensor(positions, dtype=torch.long)
        return (move_to(batch, device) for batch in source.data.batches(list(index.split(source.batch_size))))

    return distributed.RankShard(make_batches, len(source.data))


def anchor_at_start(experiment: Experiment, model: nn.Module, trained: nn.Module, reg: Regularizer,
                     device: torch.device, label: str, emit: Callable[[str], None]) -> None:
    """Before task 1 of a fresh run, a method that declares ``anchors_at_start`` (MAS or l-MAS with
    ``anchor="start"``) measures Ω₀ at the starting (pretrained) weights θ₀ on the first task's
    importance inputs, without labels, of ``experiment.pretrained_output`` (F₀: the pretrained
    network's own output), and anchors θ* = θ₀ (``docs/method.md``, "MAS anchored at the
    pretrained weights")."""
    output_fn = getattr(experiment, "pretrained_output", None)
    if output_fn is None:
        raise MASCoreError(f"{label}: anchor='start' needs an experiment that defines pretrained_output(module, batch) "
                           "(the pretrained network's own output); this one does not")
    model.eval()
    trained.eval()
    started = time.perf_counter()
    reg.anchor_at_start(trained, _importance_shard(experiment, model, 0, "inputs", device), output_fn)
    emit(f"[{label}] anchored at the starting weights: Ω₀ of the pretrained output measured on task 1's inputs "
         f"({time.perf_counter() - started:.1f} s)")


__all__ = ["after_task_of_trained", "anchor_at_start", "evaluate_row"]
