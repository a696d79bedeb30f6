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
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .batches import batch_input, move_to
from .checkpoint import (
    atomic_write_text,
    check_config,
    get_rng_states,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_states,
)
from .divergence import CollapseCheck, divergence, searched_divergence
from .errors import DivergenceError, EmptyDataError, MASCoreError, NonFiniteError
from .experiment import (Experiment, ImportanceSource, OptimSettings, SequenceResult, TaskSearch,
                         TrainData)
from .regularizers import make_regularizer, method_options, option_default
from .regularizers.base import Finetune, Regularizer, TaskInfo, describe_strength_values

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.txt"
CHECKPOINT_FORMAT = 2
JOINT = "joint"


# --------------------------------------------------------------------------- the loop

def train_tasks(experiment: Experiment, method: str | Regularizer, optim: OptimSettings, *, seed: int = 0,
                device: str | torch.device = "cpu", method_options: dict[str, Any] | None = None,
                label: str | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
                log: Callable[[str], None] | None = None, log_epochs: bool = True,
                stop_after_task: int | None = None,
                after_resume: Callable[[nn.Module, nn.Module, Regularizer, int], None] | None = None,
                search: TaskSearch | None = None) -> SequenceResult:
    """Train ``experiment``'s tasks in order with ``method``; return the accuracy matrix and the model.

    ``method``: ``"joint"`` (the loop's joint mode), a registry name of
    :mod:`mas_core.regularizers` (built with ``method_options``; a labelled estimator gets
    ``experiment.importance_loss`` as its ``loss_fn`` unless one is given) or a
    :class:`Regularizer` instance. ``label`` names the method in messages (default: its name).
    With ``checkpoint_dir`` the checkpoint ``CHECKPOINT_NAME`` and ``log.txt`` are written
    there after every task; ``resume=True`` continues after the last finished task (a fresh run
    when there is none) and raises :class:`~mas_core.errors.CheckpointMismatchError` for a
    checkpoint of another configuration; ``resume=False`` starts over. A non-finite loss,
    penalty or weight, a loss that collapsed at a finite value and a ``NonFiniteError`` from the
    method's ``after_task`` raise :class:`~mas_core.errors.DivergenceError` naming the method's
    strength and the learning rate (:mod:`mas_core.divergence`). ``log`` receives the progress lines (rank 0 only): one per task,
    and one per epoch when ``log_epochs``. ``stop_after_task=k`` stops after the first ``k`` tasks
    (checkpointed as usual, so ``resume=True`` continues with task ``k + 1``; the result then has
    ``k`` rows). ``after_resume(model, trained, reg, completed_tasks)`` is called once a checkpoint
    has been loaded and before the next task is trained (not when nothing is left to train): it may
    change the regularizer's state, e.g. replace the last task's Ω by one learned from the queries
    a deployed model answered (``docs/method.md`` §12); the checkpoint after the next task saves it.
    ``search``: before each task, choose its learning rate and the method's strength on the task's
    own training data (:mod:`mas_core.hparam_search`); its records end up in
    ``SequenceResult.hparam_search`` and the checkpoint. When the task's real training then
    diverges, the model, the trained module, the method and the random state are restored to the
    task's start and the task is trained again with the smaller strength ``search.back_off`` gives
    (recorded in the task's record and logged), until none is left.
    """
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
    last_task = num_tasks if stop_after_task is None else min(stop_after_task, num_tasks)
    joint, name, reg, options = _make_method(method, dict(method_options or {}), experiment)
    label = label or name
    info = distributed.current()
    main = info is None or info.is_main
    emit = (log or (lambda message: None)) if main else (lambda message: None)
    device = distributed.local_device(device)
    config = checkpoint_config(experiment.identity(), name, joint, options, optim, seed)
    if search is not None:
        config["search"] = search.identity()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    checkpoint_path = folder / CHECKPOINT_NAME if folder is not None else None

    start = time.perf_counter()
    seed_everything(seed)
    model = experiment.build_model().to(device)
    trained = experiment.trained_module(model)
    accuracy: list[list[float | None]] = []
    changes_model = bool(reg.after_task_changes_model)
    merged_accuracy: list[list[float | None]] | None = [] if changes_model else None
    log_lines: list[str] = []
    first_task, previous_time = 0, 0.0
    searched: list[dict[str, Any]] | None = [] if search is not None else None
    labels: list[dict[str, Any]] = []  # per task, reg.describe() after after_task (estimator, samples, λ, step)
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = _read_checkpoint(checkpoint_path, config, device)
        first_task = int(state["completed_tasks"])
        for task in range(first_task):
            experiment.begin_task(model, task)
        model.load_state_dict(state["model"])
        if searched is not None:
            searched = list(state.get("hparam_search") or [])
            if searched and searched[-1]["strength"]:
                reg.set_strength(**searched[-1]["strength"])  # the strength the last finished task used
        reg.load_state_dict(state["regularizer"])
        accuracy = [list(row) for row in state["accuracy"]]
        if changes_model:
            if "merged_accuracy" not in state:
                raise MASCoreError(f"{checkpoint_path} was written before {label}'s accuracy matrix held the model as "
                                   "trained (its rows are of the model after_task changed): it cannot be resumed; "
                                   "start a new output folder")
            merged_accuracy = [list(row) for row in state["merged_accuracy"]]
        log_lines = list(state["log"])
        labels = list(state.get("labels") or [])
        previous_time = float(state["wall_time_s"])
        set_rng_states(state["rng"])
        emit(f"[{label}] resumed from {checkpoint_path} after task {first_task}/{num_tasks}")
        if after_resume is not None and first_task < last_task:
            after_resume(model, trained, reg, first_task)

    if first_task == 0 and last_task > 0 and reg.anchors_at_start:
        _anchor_at_start(experiment, model, trained, reg, device, label, emit)

    for task in range(first_task, last_task):
        started = time.perf_counter()
        torch.manual_seed(derived_seed(seed, "task", task))
        if not main:  # other ranks draw their own dropout (rank 0 keeps the one-process stream)
            torch.manual_seed(derived_seed(seed, "task", task, "rank", info.rank))
        head = experiment.begin_task(model, task)
        data = experiment.train_data(list(range(task + 1)) if joint else [task])
        if len(data) == 0:
            raise EmptyDataError(f"task {task} ({experiment.task_names[task]}) has no training samples")
        task_optim, task_start = optim, None
        if search is not None:
            record = search.choose(experiment, model, trained, reg, task=task, head=head, optim=optim, seed=seed,
                                   device=device, method=name, label=label, log=emit)
            task_optim = dataclasses.replace(optim, lr=record["lr"])
            reg.set_strength(**record["strength"])
            searched.append(record)
            task_start = _task_start(model, trained, reg)
        epochs = optim.epochs_of(task)
        while True:
            model.train()
            trained.train()
            reg.before_task(trained, TaskInfo(index=task, head=head, num_samples=len(data)))
            try:
                mean_loss = train_task_epochs(experiment, trained, model, data, task, reg, task_optim, seed, device,
                                              joint, label, emit if log_epochs else (lambda message: None))
                model.eval()
                trained.eval()
                collapsed = search.real_run_collapsed(experiment, trained, searched[-1], seed) if search else None
                if collapsed is not None:  # ended below the bar the search accepted its strength by (§14.1)
                    raise divergence(reg, task_optim, label, task, experiment.task_names[task], None, None, collapsed)
                if changes_model:  # R[t] is the model as trained on task t, before after_task changes it
                    row = _evaluate_row(experiment, model, task, num_tasks)
                _after_task_of_trained(experiment, model, trained, reg, task, device, task_optim, label)
                break
            except DivergenceError as exc:
                if task_start is None:
                    raise
                strength = search.back_off(searched[-1], str(exc))
                if strength is None:
                    raise searched_divergence(exc, searched[-1]) from None
            failed = searched[-1]["backoff"][-1]["strength"]
            emit(f"[{label}] task {task + 1} ({experiment.task_names[task]}): training diverged at "
                 f"{describe_strength_values(failed)} (chosen by the search); restored the task's start, "
                 f"training it again with {describe_strength_values(strength)}")
            _restore_task_start(task_start, model, trained, reg)
            reg.set_strength(**strength)
        labels.append({**reg.describe(), "method": name})
        model.eval()
        trained.eval()
        after_row = _evaluate_row(experiment, model, task, num_tasks)
        if changes_model:
            merged_accuracy.append(after_row)
        else:
            row = after_row
        accuracy.append(row)
        seconds = time.perf_counter() - started
        line = (f"[{label}] task {task + 1}/{num_tasks} ({experiment.task_names[task]}): {len(data)} samples × "
                f"{epochs} epochs, mean loss {mean_loss:.4f}, {experiment.metric_name} on tasks 1..{task + 1}: "
                + " ".join(f"{value:.3f}" for value in row[:task + 1])
                + ("" if not changes_model else " (after after_task: "
                   + " ".join(f"{value:.3f}" for value in after_row[:task + 1]) + ")")
                + f" ({seconds:.1f} s)")
        log_lines.append(line)
        emit(line)
        if folder is not None and main:
            atomic_write_text(folder / LOG_NAME, "\n".join(log_lines) + "\n")
            checkpoint = {
                "format": CHECKPOINT_FORMAT, "config": config, "completed_tasks": task + 1,
                "model": model.state_dict(), "regularizer": reg.state_dict(), "accuracy": accuracy,
                "log": log_lines, "rng": get_rng_states(), "hparam_search": searched, "labels": labels,
                "wall_time_s": previous_time + time.perf_counter() - start,
            }
            if changes_model:
                checkpoint["merged_accuracy"] = merged_accuracy
            save_checkpoint(checkpoint_path, checkpoint)
        distributed.barrier()  # the checkpoint is complete before any rank moves on
    model.eval()
    return SequenceResult(method=label, task_names=list(experiment.task_names), accuracy=accuracy,
                          wall_time_s=previous_time + time.perf_counter() - start, config=config, log=log_lines,
                          trained_tasks=max(last_task - first_task, 0), model=model,
                          merged_accuracy=merged_accuracy, hparam_search=searched, labels=labels)


def _evaluate_row(experiment: Experiment, model: nn.Module, task: int, num_tasks: int) -> list[float | None]:
    """The row ``R[task]`` of the accuracy matrix: ``experiment.evaluate`` on tasks ``0..task``,
    ``None`` for the tasks not yet trained."""
    row: list[float | None] = [float(value) for value in experiment.evaluate(model, task)][:task + 1]
    return row + [None] * (num_tasks - task - 1)


def _task_start(model: nn.Module, trained: nn.Module, reg: Regularizer) -> dict[str, Any]:
    """What a back-off restores (taken before ``reg.before_task``): deep copies of the model's, the
    trained module's and the method's states, the method's strength and the global RNG states."""
    return {"model": copy.deepcopy(model.state_dict()),
            "trained": None if trained is model else copy.deepcopy(trained.state_dict()),
            "reg": copy.deepcopy(reg.state_dict()), "strength": dict(reg.strength), "rng": get_rng_states()}


def _restore_task_start(start: dict[str, Any], model: nn.Module, trained: nn.Module, reg: Regularizer) -> None:
    """Put ``model``, ``trained``, ``reg`` and the global RNGs back to :func:`_task_start`'s ``start``
    (the strength first: a method's state is only loaded with the strength it was saved with)."""
    model.load_state_dict(start["model"])
    if start["trained"] is not None:
        trained.load_state_dict(start["trained"])
    reg.set_strength(**start["strength"])
    reg.load_state_dict(copy.deepcopy(start["reg"]))
    set_rng_states(start["rng"])


def train_task_epochs(experiment: Experiment, trained: nn.Module, model: nn.Module, data: TrainData, task: int,
                      reg: Regularizer, optim: OptimSettings, seed: int, device: torch.device, joint: bool,
                      label: str, emit: Callable[[str], None]) -> float:
    """Train ``trained`` on ``data`` as task ``task`` for ``optim.epochs_of(task)`` epochs on this rank;
    return the mean global-batch loss over all steps.

    A fresh SGD optimizer (``optim``'s lr, momentum and weight decay, the latter only on the
    parameters the task's loss reaches: :func:`_parameter_groups`); epoch ``e`` visits the samples
    in the order :func:`epoch_shares` draws from ``(seed, task, e)``; each step minimises
    ``scale·experiment.loss + reg.penalty`` (through DDP when several processes run), clips the
    gradient norm when ``optim.clip_grad_norm`` is set and calls the regularizer's step hooks.
    ``model`` (the whole model, of which ``trained`` is the trained part) is checked for NaN/Inf
    after every epoch; ``joint``: the loop's joint mode (one parameter group); ``label`` names the
    method in errors; ``emit`` gets one line per epoch. Raises
    :class:`~mas_core.errors.DivergenceError` (naming the strength and the learning rate) on a
    non-finite loss, penalty or weight, and on a collapse at a finite loss (an epoch's mean loss
    above :data:`~mas_core.divergence.COLLAPSE_FACTOR` times the first epoch's). The task loop and
    the hyperparameter search's candidate
    runs (:mod:`mas_core.hparam_search`) both train through it."""
    info = distributed.current()
    world_size = 1 if info is None else info.world_size
    name = experiment.task_names[task]
    parameters = [p for p in trained.parameters() if p.requires_grad]
    if not parameters:
        raise MASCoreError("the model has no trainable parameters (requires_grad=True); nothing to train")
    optimizer = torch.optim.SGD(_parameter_groups(experiment, trained, parameters, data, task, seed, optim, device,
                                                  joint),
                                lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    def step_loss(module: nn.Module, batch: Any, scale: float) -> Tensor:
        return scale * experiment.loss(module, batch, task) + reg.penalty(module, batch_input(batch))

    n = len(data)
    find_unused = True
    if info is not None and not joint:  # probe once whether every trained parameter takes part in a step
        find_unused = _some_parameter_unused(trained, parameters, data, step_loss, seed, task, optim, device)
    wrapped = distributed.wrap_for_training(trained, step_loss, find_unused_parameters=find_unused)
    epochs = optim.epochs_of(task)
    total, steps = 0.0, 0
    collapse = CollapseCheck()
    for epoch in range(epochs):
        shares = epoch_shares(n, optim.batch_size, seed, task, epoch, info)
        epoch_total = 0.0
        for step, (batch, (_, scale)) in enumerate(zip(data.batches([index for index, _ in shares]), shares)):
            batch = move_to(batch, device)
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = wrapped(batch, scale)
            except NonFiniteError as exc:
                raise divergence(reg, optim, label, task, name, epoch, step, f"the penalty is not finite ({exc})") from None
            # Σ_r loss_r / N: the global-batch loss, the same number (and decision) on every rank
            value = distributed.all_reduce_tensor(loss.detach().to(torch.float64).reshape(1).clone())
            value = float(value[0]) / world_size
            if not math.isfinite(value):
                raise divergence(reg, optim, label, task, name, epoch, step, f"the loss is {value}")
            loss.backward()
            if optim.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, optim.clip_grad_norm)
            optimizer.step()
            if reg.uses_optimizer_step_hook:  # e.g. the proximal penalty step, before SI sees Δθ
                reg.after_optimizer_step(trained, optimizer)
            if reg.uses_step_hook:
                reg.after_step(trained)
            epoch_total += value
        broken = next((key for key, value in model.state_dict().items()
                       if value.is_floating_point() and not torch.isfinite(value).all()), None)
        if broken is not None:
            raise divergence(reg, optim, label, task, name, epoch, None, f"{broken} holds NaN/Inf")
        collapsed = collapse.end_of_epoch(epoch_total / max(len(shares), 1))
        if collapsed is not None:
            raise divergence(reg, optim, label, task, name, epoch, None, collapsed)
        emit(f"[{label}] task {task + 1} ({name}) epoch {epoch + 1}/{epochs}: "
             f"mean loss {epoch_total / max(len(shares), 1):.4f}")
        total += epoch_total
        steps += len(shares)
    return total / max(steps, 1)


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
                      task: int, seed: int, optim: OptimSettings, device: torch.device,
                      joint: bool) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: weight decay only on the parameters the current task's loss
    reaches (probed on the first batch of the task, eval mode: no BatchNorm update, no dropout draw;
    the global RNG is restored after).
    The others (old tasks' heads) stay in the optimizer, so a method's penalty may still move them
    (LwF's distillation), but are not decayed: under MAS, EWC or SI an old head whose anchor holds it
    keeps its weights bit for bit. Without weight decay, and in joint mode (a batch may miss a task),
    one group of every parameter."""
    if optim.weight_decay == 0 or joint:
        return [{"params": parameters}]
    index, _ = epoch_shares(len(data), optim.batch_size, seed, task, 0, distributed.current())[0]
    was_training = trained.training
    with torch.random.fork_rng(devices=[]):  # a random crop while reading the batch leaves the run's stream as it was
        batch = move_to(next(iter(data.batches([index]))), device)
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
                           step_loss: Callable[..., Tensor], seed: int, task: int, optim: OptimSettings,
                           device: torch.device) -> bool:
    """Whether some trained parameter takes no part in the first step's loss (then DDP must look
    for unused parameters at every step, e.g. old heads under fine-tuning). Eval mode: no
    BatchNorm update, no dropout draw."""
    index, scale = epoch_shares(len(data), optim.batch_size, seed, task, 0, distributed.current())[0]
    batch = move_to(next(iter(data.batches([index]))), device)
    was_training = trained.training
    trained.eval()
    try:
        reached = distributed.parameters_in_graph(step_loss(trained, batch, scale))
    except NonFiniteError:
        reached = set()
    finally:
        trained.train(was_training)
    return any(id(p) not in reached for p in parameters)


def _after_task_of_trained(experiment: Experiment, model: nn.Module, trained: nn.Module, reg: Regularizer,
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


def _anchor_at_start(experiment: Experiment, model: nn.Module, trained: nn.Module, reg: Regularizer,
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


# --------------------------------------------------------------------------- helpers

def checkpoint_config(identity: dict[str, Any], method: str, joint: bool, options: Any, optim: OptimSettings,
                      seed: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the experiment's ``identity``, the method
    and its options, the optimizer settings and the seed (not the device or the log). A method's
    ``penalty_step`` is recorded even when the options leave it to the default, so that a checkpoint
    written under the old default (gradient) is not resumed under the new one (proximal, issue 23)."""
    return {"format": CHECKPOINT_FORMAT, "method": method, "joint": joint, "method_options": _plain(options),
            "optim": dataclasses.asdict(optim), "seed": int(seed), "experiment": identity}


def derived_seed(*parts: Any) -> int:
    """A 62-bit seed from ``parts``: the first 8 bytes (little-endian) of SHA-256 of their
    ``str`` joined by ``":"``. Independent streams for (seed, task), (seed, task, epoch), …"""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


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
    if reg.after_task_data == "labelled" and loss_fn is not None and "loss_fn" not in options:
        if "loss_fn" not in method_options(method):
            raise MASCoreError(f"method {method!r} takes no loss_fn, so it cannot estimate importance on this "
                               "experiment's loss; choose another method")
        reg = make_regularizer(method, **options, loss_fn=loss_fn)
    return False, method, reg, resolved_options(method, options)


def _read_checkpoint(path: Path, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise MASCoreError(f"{path} has checkpoint format {state.get('format')!r} (written by an older version); "
                           f"this version reads format {CHECKPOINT_FORMAT}: delete it or use a new output folder")
    check_config(state, config, path)
    return state


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


__all__ = ["CHECKPOINT_NAME", "Experiment", "ImportanceSource", "JOINT", "OptimSettings", "SequenceResult",
           "TaskSearch", "TrainData", "checkpoint_config", "derived_seed", "epoch_shares", "resolved_options",
           "train_task_epochs", "train_tasks"]
