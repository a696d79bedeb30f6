"""What the task loop (:mod:`mas_core.loop`) holds: the run's fixed parts (:class:`LoopRun`) and
the state it carries from task to task (:class:`LoopState`), which is what a checkpoint holds
(:meth:`LoopState.to_checkpoint`, :meth:`LoopState.from_checkpoint`), and a task's start that a
back-off restores (:class:`TaskStart`).

Checkpoint format 2 (``CHECKPOINT_NAME`` in the method's folder, written atomically by rank 0
after every task): ``format``, ``config`` (:func:`mas_core.loop.checkpoint_config`, compared on
resume), ``completed_tasks``, ``model`` (the unwrapped model's state dict), ``regularizer``,
``accuracy`` (the rows ``R[0..t]``), ``log`` (the per-task lines), ``rng`` (the global RNG
states), ``hparam_search`` (per task, or ``None`` without a search), ``labels`` (per task,
``Regularizer.describe()``), ``wall_time_s`` and, for a method whose ``after_task`` changes the
weights, ``merged_accuracy``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .checkpoint import check_config, get_rng_states, load_checkpoint, set_rng_states
from .errors import MASCoreError
from .experiment import Experiment, LoopHooks, OptimSettings, SequenceResult, TaskSearch
from .regularizers.base import Regularizer

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.txt"
CHECKPOINT_FORMAT = 2


@dataclass
class LoopRun:
    """The parts of one call of :func:`mas_core.loop.train_tasks` that do not change from task to
    task: the experiment, the method (``reg``, its registry ``name``, its ``label`` in messages,
    ``joint`` mode, whether its ``after_task`` changes the weights), the optimizer, the seed, the
    device, the search, where the log goes, the hooks, the checkpoint's ``config`` and folder,
    the process (``main``: rank 0 or one process) and the range of tasks to train."""

    experiment: Experiment
    reg: Regularizer
    name: str
    label: str
    joint: bool
    optim: OptimSettings
    seed: int
    device: torch.device
    config: dict[str, Any]
    num_tasks: int
    last_task: int
    folder: Path | None = None
    search: TaskSearch | None = None
    emit: Callable[[str], None] = field(default=lambda message: None)
    log_epochs: bool = True
    hooks: LoopHooks | None = None
    info: distributed.ProcessInfo | None = None

    @property
    def main(self) -> bool:
        """Rank 0, or the one process: it writes the checkpoint and the log and sends the events."""
        return self.info is None or self.info.is_main

    @property
    def changes_model(self) -> bool:
        """The method's ``after_task`` changes the weights (IMM's merge): two accuracy matrices."""
        return bool(self.reg.after_task_changes_model)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_NAME


@dataclass
class LoopState:
    """What the loop carries from task to task, and what a checkpoint holds: the model (and the
    module it trains), the accuracy matrix so far (and the merged one of a weight-changing
    ``after_task``), the log lines, the search's records, the method's labels, the number of
    finished tasks and the seconds spent in earlier, interrupted calls (``previous_time``).
    ``started``: ``time.perf_counter()`` when this call started."""

    model: nn.Module
    trained: nn.Module
    accuracy: list[list[float | None]] = field(default_factory=list)
    merged_accuracy: list[list[float | None]] | None = None
    log_lines: list[str] = field(default_factory=list)
    searched: list[dict[str, Any]] | None = None
    labels: list[dict[str, Any]] = field(default_factory=list)
    completed_tasks: int = 0
    previous_time: float = 0.0
    started: float = 0.0

    @classmethod
    def fresh(cls, run: LoopRun, model: nn.Module, trained: nn.Module, started: float) -> LoopState:
        """The state before the first task."""
        return cls(model=model, trained=trained, merged_accuracy=[] if run.changes_model else None,
                   searched=[] if run.search is not None else None, started=started)

    def load_checkpoint(self, run: LoopRun, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (:func:`read_checkpoint`'s ``state``): replay ``begin_task`` of the
        finished tasks (their heads), load the weights, the method's strength (the last finished task's
        searched value) and state, the rows, the log, the labels and the time, and restore the RNG
        states last, after the replay drew its new heads' initial weights."""
        experiment, reg = run.experiment, run.reg
        self.completed_tasks = int(state["completed_tasks"])
        for task in range(self.completed_tasks):
            experiment.begin_task(self.model, task)
        self.model.load_state_dict(state["model"])
        if self.searched is not None:
            self.searched = list(state.get("hparam_search") or [])
            if self.searched and self.searched[-1]["strength"]:
                reg.set_strength(**self.searched[-1]["strength"])  # the strength the last finished task used
        reg.load_state_dict(state["regularizer"])
        self.accuracy = [list(row) for row in state["accuracy"]]
        if run.changes_model:
            if "merged_accuracy" not in state:
                raise MASCoreError(f"{run.checkpoint_path} was written before {run.label}'s accuracy matrix held the "
                                   "model as trained (its rows are of the model after_task changed): it cannot be "
                                   "resumed; start a new output folder")
            self.merged_accuracy = [list(row) for row in state["merged_accuracy"]]
        self.log_lines = list(state["log"])
        self.labels = list(state.get("labels") or [])
        self.previous_time = float(state["wall_time_s"])
        set_rng_states(state["rng"])

    @classmethod
    def from_checkpoint(cls, run: LoopRun, model: nn.Module, trained: nn.Module, started: float,
                        state: dict[str, Any]) -> LoopState:
        """The state a checkpoint holds (see :meth:`load_checkpoint`)."""
        loop_state = cls.fresh(run, model, trained, started)
        loop_state.load_checkpoint(run, state)
        return loop_state

    def wall_time(self) -> float:
        """Seconds of training and evaluation, summed over this and the earlier calls."""
        return self.previous_time + time.perf_counter() - self.started

    def to_checkpoint(self, run: LoopRun) -> dict[str, Any]:
        """The checkpoint after ``completed_tasks`` tasks (the RNG states as they are now)."""
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "config": run.config, "completed_tasks": self.completed_tasks,
            "model": self.model.state_dict(), "regularizer": run.reg.state_dict(), "accuracy": self.accuracy,
            "log": self.log_lines, "rng": get_rng_states(), "hparam_search": self.searched, "labels": self.labels,
            "wall_time_s": self.wall_time(),
        }
        if run.changes_model:
            checkpoint["merged_accuracy"] = self.merged_accuracy
        return checkpoint

    def result(self, run: LoopRun, first_task: int) -> SequenceResult:
        """What :func:`~mas_core.loop.train_tasks` returns (``first_task``: where this call began)."""
        return SequenceResult(method=run.label, task_names=list(run.experiment.task_names), accuracy=self.accuracy,
                              wall_time_s=self.wall_time(), config=run.config, log=self.log_lines,
                              trained_tasks=max(run.last_task - first_task, 0), model=self.model,
                              merged_accuracy=self.merged_accuracy, hparam_search=self.searched, labels=self.labels)


def read_checkpoint(path: Path, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, refused in one line when it is of another format or configuration."""
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise MASCoreError(f"{path} has checkpoint format {state.get('format')!r} (written by an older version); "
                           f"this version reads format {CHECKPOINT_FORMAT}: delete it or use a new output folder")
    check_config(state, config, path)
    return state


@dataclass
class TaskStart:
    """What a back-off restores (taken before ``reg.before_task``): deep copies of the model's, the
    trained module's and the method's states, the method's strength and the global RNG states."""

    model: dict[str, Any]
    trained: dict[str, Any] | None
    reg: dict[str, Any]
    strength: dict[str, float]
    rng: dict[str, Any]

    @classmethod
    def take(cls, model: nn.Module, trained: nn.Module, reg: Regularizer) -> TaskStart:
        return cls(model=copy.deepcopy(model.state_dict()),
                   trained=None if trained is model else copy.deepcopy(trained.state_dict()),
                   reg=copy.deepcopy(reg.state_dict()), strength=dict(reg.strength), rng=get_rng_states())

    def restore(self, model: nn.Module, trained: nn.Module, reg: Regularizer) -> None:
        """Put ``model``, ``trained``, ``reg`` and the global RNGs back (the strength first: a method's
        state is only loaded with the strength it was saved with)."""
        model.load_state_dict(self.model)
        if self.trained is not None:
            trained.load_state_dict(self.trained)
        reg.set_strength(**self.strength)
        reg.load_state_dict(copy.deepcopy(self.reg))
        set_rng_states(self.rng)


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "LOG_NAME", "LoopRun", "LoopState", "TaskStart", "read_checkpoint"]
