"""The task loop: the one place that trains a model task by task.

An experiment (the fact embedding, the recognition sequence, a user's own) plugs in through
the small :class:`Experiment` protocol; :func:`train_tasks` owns everything else: seeding,
the sample order, the optimizer, several processes, the regularizer's hooks, the divergence
check, the accuracy matrix, checkpoints and resume. For each task ``t``::

    torch.manual_seed(derived_seed(seed, "task", t))     # dropout, new heads: the same on resume
    info = experiment.begin_task(model, t)               # e.g. add and activate head t
    lr, λ = search.choose(...) when a search is given    # on copies, task t's data only: mas_core.hparam_search
    start = copies of the states and the RNG, with a search    # for a back-off (below)
    reg.before_task(trained, info)
    for epoch e < optim.epochs_of(t):                    # a fresh SGD optimizer per task
        order = randperm(n, Generator(derived_seed(seed, t, e)))
        for every global batch b = order[k·B:(k+1)·B]:  # this rank's share of it, see below
            loss = scale · experiment.loss(trained, batch, t) + reg.penalty(trained, inputs)
            backward; clip_grad_norm (optional); step
            reg.after_optimizer_step(trained, optimizer) if reg.uses_optimizer_step_hook  # proximal penalty
            reg.after_step(trained) if reg.uses_step_hook
        after each epoch: NaN/Inf weights, or a collapse (epoch mean loss > 100× the first's)
    reg.after_task(trained, experiment.importance_data(...))   # what reg.after_task_data asks for
    # diverged (any of the above, or a NonFiniteError from after_task: mas_core.divergence) with a
    # searched λ: restore start, λ ← search.back_off(...) (decay·λ, down to the search's floor),
    # train the task again from reg.before_task; else the DivergenceError stands
    R[t][j] = experiment.evaluate(model, t)[j], j ≤ t
    # a method whose after_task changes the weights (reg.after_task_changes_model: IMM's merge):
    #   R[t] is evaluated *before* after_task (the model as trained on task t), and
    #   R_merged[t] = experiment.evaluate(model, t) after it (SequenceResult.merged_accuracy)
    checkpoint (atomic, rank 0)                                # CHECKPOINT_NAME, with RNG states

``joint`` is a mode of the loop, not a regularizer: at task ``t`` it trains, from the current
model and with no regularizer, on the union of tasks ``0..t`` (``experiment.train_data([0..t])``).

One code path for one process and for N (``torchrun``; :mod:`mas_core.distributed`): the loss
goes through :func:`~mas_core.distributed.wrap_for_training` (DDP when N > 1) with the penalty
inside the wrapped forward. Rank ``r`` of ``N`` trains on positions ``r, r+N, …`` of every global
batch, and ``experiment.loss`` returns the *mean* loss over the samples it is given, so the loop
scales it by ``scale = N·|share| / |batch|``; DDP's average over ranks is then the global-batch
mean loss (one process: ``scale = 1`` exactly, so N = 1 computes the plain mean loss). The loss
that is logged and checked for divergence is all-reduced, so every rank takes the same decision.
Importance data reaches ``after_task`` as a :class:`~mas_core.distributed.RankShard` (the
estimators reduce across ranks). Rank 0 alone writes the checkpoint and the log; ranks other
than 0 draw their dropout from ``derived_seed(seed, "task", t, "rank", r)``.

Resume: the checkpoint holds the model (unwrapped), the regularizer's state, the rows of the
accuracy matrix, the log and the RNG states; the per-task seed and the per-epoch order depend
only on ``(seed, t, e)``, so a resumed run equals an uninterrupted one bit for bit, on any
number of processes.

The parts: :func:`train_tasks` checks its arguments into a :class:`~mas_core.loop_state.LoopRun`
(what does not change from task to task) and builds a :class:`~mas_core.loop_state.LoopState`
(what a checkpoint holds: ``from_checkpoint`` / ``to_checkpoint``); :func:`train_one_task` trains one
task and owns the search's back-off; its epochs are :func:`mas_core.epochs.train_task_epochs`'s, with
one :class:`~mas_core.epochs.EpochSettings`; :mod:`mas_core.task_end` holds ``after_task``, the
anchor at the start and the task's row. A caller may watch and stop the loop through
:class:`~mas_core.experiment.LoopHooks` (``hooks=``): a record after every epoch and every task
(rank 0), and after every step the question whether to stop (all ranks' answers combined, carried by
the step's loss all-reduce), answered with :class:`~mas_core.errors.TrainingInterrupted`; the
checkpoint of the last finished task stays as it was, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .checkpoint import atomic_write_text, save_checkpoint, seed_everything
from .divergence import divergence, searched_divergence
from .epochs import EpochSettings, derived_seed, epoch_shares, train_task_epochs
from .errors import DivergenceError, EmptyDataError, MASCoreError, TrainingInterrupted
from .experiment import (Experiment, ImportanceSource, LoopHooks, OptimSettings, SequenceResult, TaskRecord,
                         TaskSearch, TrainData)
from .loop_state import CHECKPOINT_FORMAT, CHECKPOINT_NAME, LOG_NAME, LoopRun, LoopState, TaskStart, read_checkpoint
from .regularizers import JOINT, make_regularizer, method_options, option_default
from .regularizers.base import Finetune, Regularizer, TaskInfo, describe_strength_values
from .task_end import after_task_of_trained, anchor_at_start, evaluate_row

# --------------------------------------------------------------------------- the loop

def train_tasks(experiment: Experiment, method: str | Regularizer, optim: OptimSettings, *, seed: int = 0,
                device: str | torch.device = "cpu", method_options: dict[str, Any] | None = None,
                label: str | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
                log: Callable[[str], None] | None = None, log_epochs: bool = True,
                stop_after_task: int | None = None,
                after_resume: Callable[[nn.Module, nn.Module, Regularizer, int], None] | None = None,
                search: TaskSearch | None = None, hooks: LoopHooks | None = None) -> SequenceResult:
    """Train ``experiment``'s tasks in order with ``method``; return the accuracy matrix and the model.

    ``method``: ``"joint"`` (the loop's joint mode), a registry name of
    :mod:`mas_core.regularizers` (built with ``method_options``; a method that declares
    ``importance_from_loss`` gets ``experiment.importance_loss`` as its ``loss_fn`` unless one is
    given) or a
    :class:`Regularizer` instance. ``label`` names the method in messages (default: its name).
    With ``checkpoint_dir`` the checkpoint ``CHECKPOINT_NAME`` and ``log.txt`` are written there
    after every task; ``resume=True`` continues after the last finished task (a fresh run when
    there is none) and raises :class:`~mas_core.errors.CheckpointMismatchError` for a checkpoint
    of another configuration; ``resume=False`` starts over. A non-finite loss, penalty or weight,
    a loss that collapsed at a finite value and a ``NonFiniteError`` from the method's
    ``after_task`` raise :class:`~mas_core.errors.DivergenceError` naming the method's strength and
    the learning rate (:mod:`mas_core.divergence`). ``log`` receives the progress lines (rank 0
    only): one per task, and one per epoch when ``log_epochs``. ``stop_after_task=k`` stops after
    the first ``k`` tasks (checkpointed as usual, so ``resume=True`` continues with task ``k + 1``;
    the result then has ``k`` rows). ``after_resume(model, trained, reg, completed_tasks)`` is called
    once a checkpoint has been loaded and before the next task is trained (not when nothing is left
    to train): it may change the regularizer's state, e.g. replace the last task's Ω by one learned
    from the queries a deployed model answered (``docs/method.md`` §12); the checkpoint after the
    next task saves it. ``search``: before each task, choose its learning rate and the method's
    strength on the task's own training data (:mod:`mas_core.hparam_search`); its records end up in
    ``SequenceResult.hparam_search`` and the checkpoint; when the task's real training diverges, the
    task is trained again from its start with the smaller strength ``search.back_off`` gives
    (:func:`train_one_task`). ``hooks``: :class:`~mas_core.experiment.LoopHooks`, told of every
    epoch and task (a metrics log) and asked whether to stop (Ctrl-C): then
    :class:`~mas_core.errors.TrainingInterrupted` is raised after the current step, the checkpoint
    of the last finished task left as it was.
    """
    run = _loop_run(experiment, method, optim, seed=seed, device=device, method_options=method_options,
                    label=label, checkpoint_dir=checkpoint_dir, resume=resume, log=log, log_epochs=log_epochs,
                    stop_after_task=stop_after_task, search=search, hooks=hooks)
    started = time.perf_counter()
    seed_everything(seed)
    model = experiment.build_model().to(run.device)
    trained, path = experiment.trained_module(model), run.checkpoint_path
    state = LoopState.fresh(run, model, trained, started)
    if resume and path is not None and path.is_file():
        state = LoopState.from_checkpoint(run, model, trained, started, read_checkpoint(path, run.config, run.device))
        run.emit(f"[{run.label}] resumed from {path} after task {state.completed_tasks}/{run.num_tasks}")
        if after_resume is not None and state.completed_tasks < run.last_task:
            after_resume(state.model, state.trained, run.reg, state.completed_tasks)
    first_task = state.completed_tasks
    if hooks is not None and run.main:
        hooks.run_started(run.label, first_task, run.num_tasks)
    if first_task == 0 and run.last_task > 0 and run.reg.anchors_at_start:
        anchor_at_start(experiment, state.model, state.trained, run.reg, run.device, run.label, run.emit)
    for task in range(first_task, run.last_task):
        if _stop_requested(run):  # a stop asked between two tasks (or before the first)
            raise _interrupted(run, state, None)
        try:
            _finish_task(run, state, task, *train_one_task(run, state, task))
        except TrainingInterrupted:
            raise _interrupted(run, state, task) from None
    state.model.eval()
    return state.result(run, first_task)


def _loop_run(experiment: Experiment, method: str | Regularizer, optim: OptimSettings, *, seed: int,
              device: str | torch.device, method_options: dict[str, Any] | None, label: str | None,
              checkpoint_dir: str | Path | None, resume: bool, log: Callable[[str], None] | None, log_epochs: bool,
              stop_after_task: int | None, search: TaskSearch | None, hooks: LoopHooks | None) -> LoopRun:
    """:func:`train_tasks`'s arguments checked (one-line errors) and gathered in a :class:`LoopRun`."""
    try:
        optim.validate()
    except ValueError as exc:
        raise MASCoreError(f"invalid optimizer settings: {exc}") from None
    num_tasks = len(experiment.task_names)
    if num_tasks == 0:
        raise EmptyDataError("the experiment has no tasks: give it at least one")
    if resume and checkpoint_dir is None:
        raise MASCoreError("resume=True needs checkpoint_dir (the folder the interrupted run wrote to)")
    if stop_after_task is not None and (isinstance(stop_after_task, bool) or not isinstance(stop_after_task, int)
                                        or stop_after_task < 1):
        raise MASCoreError(f"stop_after_task must be a positive number of tasks or None, got {stop_after_task!r}")
    joint, name, reg, options = _make_method(method, dict(method_options or {}), experiment)
    info = distributed.current()
    main = info is None or info.is_main
    config = checkpoint_config(experiment.identity(), name, joint, options, optim, seed)
    if search is not None:
        config["search"] = search.identity()
    return LoopRun(experiment=experiment, reg=reg, name=name, label=label or name, joint=joint, optim=optim,
                   seed=seed, device=distributed.local_device(device), config=config, num_tasks=num_tasks,
                   last_task=num_tasks if stop_after_task is None else min(stop_after_task, num_tasks),
                   folder=Path(checkpoint_dir) if checkpoint_dir is not None else None, search=search,
                   emit=(log or (lambda message: None)) if main else (lambda message: None), log_epochs=log_epochs,
                   hooks=hooks, info=info)


def train_one_task(run: LoopRun, state: LoopState, task: int) -> tuple[float, list[float | None], int, float]:
    """Train task ``task``: seed it, let the experiment begin it (its head), choose its learning rate and
    strength with the search (when given), train it and run the method's ``after_task``; return
    ``(mean loss, R[task] of the model as trained when after_task changes the weights, samples, start time)``.

    Back-off: when the real training of a searched task diverges (a
    :class:`~mas_core.errors.DivergenceError` from the epochs or from ``after_task``), the model, the
    trained module, the method and the random state are restored to the task's start
    (:class:`~mas_core.loop_state.TaskStart`) and the task is trained again with the smaller
    strength ``search.back_off`` gives (recorded in the task's record and logged), until none is
    left: then the error names the search's choice (:func:`~mas_core.divergence.searched_divergence`)."""
    experiment, reg, started = run.experiment, run.reg, time.perf_counter()
    torch.manual_seed(derived_seed(run.seed, "task", task))
    if not run.main:  # other ranks draw their own dropout (rank 0 keeps the one-process stream)
        torch.manual_seed(derived_seed(run.seed, "task", task, "rank", run.info.rank))
    head = experiment.begin_task(state.model, task)
    data = experiment.train_data(list(range(task + 1)) if run.joint else [task])
    if len(data) == 0:
        raise EmptyDataError(f"task {task} ({experiment.task_names[task]}) has no training samples")
    task_optim, task_start = run.optim, None
    if run.search is not None:
        stop = {} if run.hooks is None else {"stop": run.hooks.stop_requested}  # a search of its own may not take it
        record = run.search.choose(experiment, state.model, state.trained, reg, task=task, head=head, optim=run.optim,
                                   seed=run.seed, device=run.device, method=run.name, label=run.label, log=run.emit,
                                   **stop)
        task_optim = dataclasses.replace(run.optim, lr=record["lr"])
        reg.set_strength(**record["strength"])
        state.searched.append(record)
        task_start = TaskStart.take(state.model, state.trained, reg)
    settings = EpochSettings(optim=task_optim, seed=run.seed, device=run.device, joint=run.joint, label=run.label,
                             emit=run.emit if run.log_epochs else (lambda message: None), events=run.hooks,
                             stop=None if run.hooks is None else run.hooks.stop_requested)
    for attempt in range(1_000_000):  # one attempt, and one more after each back-off
        state.model.train()
        state.trained.train()
        reg.before_task(state.trained, TaskInfo(index=task, head=head, num_samples=len(data)))
        try:
            mean_loss, row = _attempt(run, state, task, data, dataclasses.replace(settings, attempt=attempt))
            return mean_loss, row, len(data), started
        except DivergenceError as exc:
            if task_start is None:
                raise
            strength = run.search.back_off(state.searched[-1], str(exc))
            if strength is None:
                raise searched_divergence(exc, state.searched[-1]) from None
        failed = state.searched[-1]["backoff"][-1]["strength"]
        run.emit(f"[{run.label}] task {task + 1} ({experiment.task_names[task]}): training diverged at "
                 f"{describe_strength_values(failed)} (chosen by the search); restored the task's start, "
                 f"training it again with {describe_strength_values(strength)}")
        task_start.restore(state.model, state.trained, reg)
        reg.set_strength(**strength)
    raise AssertionError("unreachable: the search's back-off ends at its floor")


def _attempt(run: LoopRun, state: LoopState, task: int, data: TrainData,
             settings: EpochSettings) -> tuple[float, list[float | None]]:
    """One attempt at task ``task`` (after ``reg.before_task``): its epochs, with a search the check that
    the real run did not end below the bar its strength passed (``search.real_run_collapsed``: a
    divergence, backed off like a NaN), then (evaluated before it when it changes the weights) the
    method's ``after_task``."""
    experiment, model, trained = run.experiment, state.model, state.trained
    mean_loss = train_task_epochs(experiment, trained, model, data, task, run.reg, settings)
    model.eval()
    trained.eval()
    search = run.search
    collapsed = search.real_run_collapsed(experiment, trained, state.searched[-1], run.seed) if search else None
    if collapsed is not None:  # ended below the bar the search accepted its strength by (§14.1)
        raise divergence(run.reg, settings.optim, run.label, task, experiment.task_names[task], None, None, collapsed)
    row: list[float | None] = []
    if run.changes_model:  # R[t] is the model as trained on task t, before after_task changes it
        row = evaluate_row(experiment, model, task, run.num_tasks)
    after_task_of_trained(experiment, model, trained, run.reg, task, run.device, settings.optim, run.label)
    return mean_loss, row


def _finish_task(run: LoopRun, state: LoopState, task: int, mean_loss: float, row: list[float | None],
                 samples: int, started: float) -> None:
    """After task ``task``: the method's label, its row(s) of the accuracy matrix, the log line, the
    hooks' task record, and the checkpoint (rank 0; every rank waits for it)."""
    experiment, model = run.experiment, state.model
    state.labels.append({**run.reg.describe(), "method": run.name})
    model.eval()
    state.trained.eval()
    after_row = evaluate_row(experiment, model, task, run.num_tasks)
    if run.changes_model:
        state.merged_accuracy.append(after_row)
    else:
        row = after_row
    state.accuracy.append(row)
    seconds = time.perf_counter() - started
    line = (f"[{run.label}] task {task + 1}/{run.num_tasks} ({experiment.task_names[task]}): {samples} samples × "
            f"{run.optim.epochs_of(task)} epochs, mean loss {mean_loss:.4f}, {experiment.metric_name} on tasks "
            f"1..{task + 1}: " + " ".join(f"{value:.3f}" for value in row[:task + 1])
            + ("" if not run.changes_model else " (after after_task: "
               + " ".join(f"{value:.3f}" for value in after_row[:task + 1]) + ")")
            + f" ({seconds:.1f} s)")
    state.log_lines.append(line)
    run.emit(line)
    if run.hooks is not None and run.main:
        run.hooks.task_ended(TaskRecord(method=run.label, task=task, task_name=experiment.task_names[task],
                                        metric=experiment.metric_name, row=list(row),
                                        merged_row=list(after_row) if run.changes_model else None, seconds=seconds))
    state.completed_tasks = task + 1
    if run.folder is not None and run.main:
        atomic_write_text(run.folder / LOG_NAME, "\n".join(state.log_lines) + "\n")
        save_checkpoint(run.checkpoint_path, state.to_checkpoint(run))
    distributed.barrier()  # the checkpoint is complete before any rank moves on


def _stop_requested(run: LoopRun) -> bool:
    """Whether any rank's hooks ask to stop (between tasks; one all-reduce when several processes run)."""
    if run.hooks is None:
        return False
    flag = torch.tensor([1.0 if run.hooks.stop_requested() else 0.0], dtype=torch.float64, device=run.device)
    return float(distributed.all_reduce_tensor(flag)[0]) > 0


def _interrupted(run: LoopRun, state: LoopState, task: int | None) -> TrainingInterrupted:
    """The :class:`~mas_core.errors.TrainingInterrupted` of this run (``task``: the one abandoned)."""
    saved = run.checkpoint_path if run.folder is not None and state.completed_tasks > 0 else None
    return TrainingInterrupted(run.label, state.completed_tasks, run.num_tasks, task=task,
                               checkpoint=None if saved is None else str(saved))


# --------------------------------------------------------------------------- helpers

def checkpoint_config(identity: dict[str, Any], method: str, joint: bool, options: Any, optim: OptimSettings,
                      seed: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the experiment's ``identity``, the method
    and its options, the optimizer settings and the seed (not the device or the log). A method's
    ``penalty_step`` is recorded even when the options leave it to the default, so that a checkpoint
    written under the old default (gradient) is not resumed under the new one (proximal, issue 23)."""
    return {"format": CHECKPOINT_FORMAT, "method": method, "joint": joint, "method_options": _plain(options),
            "optim": dataclasses.asdict(optim), "seed": int(seed), "experiment": identity}


def resolved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of the registry method ``method`` with ``penalty_step`` filled in from the constructor's
    default when it is left out: what a checkpoint records, so that a checkpoint written under the old
    default (gradient) is not resumed under the new one (proximal, issue 23) without a word."""
    if method == JOINT or "penalty_step" in options:
        return options
    step = option_default(method, "penalty_step")
    return options if step is None else {**options, "penalty_step": step}


def _make_method(method: str | Regularizer, options: dict[str, Any],
                 experiment: Experiment) -> tuple[bool, str, Regularizer, dict[str, Any]]:
    """``(joint, name, regularizer, options)`` of ``method``."""
    if isinstance(method, Regularizer):
        if options:
            raise MASCoreError("method_options are only used with a method name; configure the Regularizer "
                               "instance instead")
        described = {"class": f"{type(method).__module__}.{type(method).__qualname__}", "repr": repr(method)}
        return False, str(getattr(method, "name", type(method).__name__)), method, described
    if not isinstance(method, str):
        raise MASCoreError(f"method must be a name or a Regularizer instance, got {type(method).__name__}")
    if method == JOINT:
        if options:
            raise MASCoreError(f"the joint upper bound takes no method options, got {sorted(options)}")
        return True, JOINT, Finetune(), options
    reg = make_regularizer(method, **options)
    loss_fn = getattr(experiment, "importance_loss", None)
    if reg.after_task_data == "labelled" and reg.importance_from_loss and loss_fn is not None \
            and "loss_fn" not in options:
        if "loss_fn" not in method_options(method):
            raise MASCoreError(f"method {method!r} takes no loss_fn, so it cannot estimate importance on this "
                               "experiment's loss; choose another method")
        reg = make_regularizer(method, **options, loss_fn=loss_fn)
    return False, method, reg, resolved_options(method, options)


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


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "EpochSettings", "Experiment", "ImportanceSource", "JOINT",
           "LoopHooks", "LoopRun", "LoopState", "OptimSettings", "SequenceResult", "TaskSearch", "TrainData",
           "checkpoint_config", "derived_seed", "epoch_shares", "resolved_options", "train_one_task",
           "train_task_epochs", "train_tasks"]
