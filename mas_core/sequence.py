"""The multi-head classification sequence on the task loop (:mod:`mas_core.loop`).

Protocol (task-incremental, multi-head; Aljundi et al. 2018, Sec. 5.1): a shared trunk, one
output head per task, the task identity known at test time. :func:`run_sequence` trains a
list of :class:`Task` with :func:`mas_core.loop.train_tasks` through
:class:`ClassificationExperiment`, which

1. adds a head ``Linear(feature_dim, num_classes_t)`` at the start of task ``t`` and makes it
   the active head (so MAS with ``output_fn=None`` measures the active head's logits);
2. gives the loss ``CE(head_t(trunk(x)), y)`` (mean over the batch); in joint mode (the upper
   bound: the union of tasks ``0..t``) each sample goes through its own task's head:
   ``(1/|B|) Σ_k CE(head_{task_k}(trunk(x_k)), y_k)``;
3. hands ``after_task`` the task's ``importance_data`` when given (e.g. unlabelled
   test-condition inputs, the paper's Table 3; label-free methods only), else its labelled
   training data, in order, ``optim.batch_size`` samples at a time;
4. evaluates every task seen so far with its own head: ``R[t][j]`` = top-1 accuracy (a
   fraction in [0, 1]) on the test set of task ``j`` after training task ``t``. With several
   processes each rank scores its share of the test set and the counts are summed.

Seeding, data order, several processes, checkpoints (``checkpoint_dir/checkpoint.pt``) and
resume are the loop's (see :mod:`mas_core.loop`). In ``SequenceResult.accuracy`` the entries
with ``j > i`` (tasks not yet trained) are ``None`` (JSON ``null``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from . import distributed
from .batches import batch_input, batch_target, move_to
from .errors import EmptyDataError, MASCoreError
from .loop import (CHECKPOINT_NAME, JOINT, ImportanceSource, LoopHooks, OptimSettings, SequenceResult, TaskSearch,
                   train_tasks)
from .regularizers.base import Regularizer

TASK_KEY = "task"


class MultiHeadNet(nn.Module):
    """A shared trunk with one linear head per task.

    ``features(x)`` is the trunk output ``[B, feature_dim]``; ``forward(x, head)`` the logits
    of head ``head`` (default: ``active_head``, which the experiment sets to the task being
    trained).
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

    ``importance_data`` (optional, labels not needed) is what label-free methods (MAS, l-MAS)
    estimate importance on instead of the training inputs.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    importance_data: Dataset | None = None


class IndexedData:
    """A ``Dataset`` read by positions (:class:`mas_core.loop.TrainData`): a ``TensorDataset``
    is indexed directly (the default collate's batches without per-item overhead), any other
    dataset through a ``DataLoader`` with these index lists as its batch sampler."""

    def __init__(self, dataset: Dataset, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterable[Any]:
        """The batches made of ``index_batches``, in that order."""
        if isinstance(self.dataset, TensorDataset):
            return (tuple(tensor[index] for tensor in self.dataset.tensors) for index in index_batches)
        return DataLoader(self.dataset, batch_sampler=[index.tolist() for index in index_batches],
                          num_workers=self.num_workers)


class _TaggedUnion:
    """The union of several tasks' training sets; every batch a dict ``{"input", "target", "task"}``."""

    def __init__(self, tasks: Sequence[Task], task_ids: Sequence[int], num_workers: int) -> None:
        if all(isinstance(task.train, TensorDataset) and len(task.train.tensors) >= 2 for task in tasks):
            self.tensors: tuple[Tensor, ...] | None = (
                torch.cat([task.train.tensors[0] for task in tasks]),
                torch.cat([task.train.tensors[1] for task in tasks]),
                torch.cat([torch.full((len(task.train),), task_id, dtype=torch.long)
                           for task, task_id in zip(tasks, task_ids)]))
            self.dataset: Dataset | None = None
        else:
            self.tensors = None
            self.dataset = ConcatDataset([_Tagged(task.train, task_id) for task, task_id in zip(tasks, task_ids)])
        self.size = sum(len(task.train) for task in tasks)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return self.size

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[dict[str, Any]]:
        if self.tensors is not None:
            inputs, targets, task_ids = self.tensors
            for index in index_batches:
                yield {"input": inputs[index], "target": targets[index], TASK_KEY: task_ids[index]}
            return
        yield from DataLoader(self.dataset, batch_sampler=[index.tolist() for index in index_batches],
                              num_workers=self.num_workers)


class _Tagged(Dataset):
    """A dataset whose items are ``{"input", "target", "task"}``."""

    def __init__(self, dataset: Dataset, task_id: int) -> None:
        self.dataset = dataset
        self.task_id = task_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        return {"input": batch_input(item), "target": batch_target(item), TASK_KEY: self.task_id}


class ClassificationExperiment:
    """A list of :class:`Task` on a :class:`MultiHeadNet`, as a :class:`mas_core.loop.Experiment`."""

    metric_name = "accuracy"
    importance_loss = None  # EWC's default: cross-entropy of the active head

    def __init__(self, make_model: Callable[[], nn.Module], tasks: Sequence[Task], *, importance_batch_size: int,
                 eval_batch_size: int = 512, num_workers: int = 0) -> None:
        if not tasks:
            raise EmptyDataError("the task list is empty: give at least one Task")
        for index, task in enumerate(tasks):
            if task.num_classes < 1:
                raise MASCoreError(f"task {index} ({task.name}) has num_classes={task.num_classes}; it must be >= 1")
            for split in ("train", "test"):
                if len(getattr(task, split)) == 0:
                    raise EmptyDataError(f"task {index} ({task.name}) has an empty {split} set")
            if task.importance_data is not None and len(task.importance_data) == 0:
                raise EmptyDataError(f"task {index} ({task.name}) has empty importance_data")
        if eval_batch_size < 1 or num_workers < 0:
            raise MASCoreError(f"eval_batch_size must be >= 1 and num_workers >= 0, got {eval_batch_size} and "
                               f"{num_workers}")
        self.make_model = make_model
        self.tasks = list(tasks)
        self.task_names = [task.name for task in tasks]
        self.importance_batch_size = importance_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers

    def identity(self) -> dict[str, Any]:
        return {"eval_batch_size": self.eval_batch_size, "tasks": [
            {"name": task.name, "num_classes": int(task.num_classes), "train_size": len(task.train),
             "test_size": len(task.test),
             "importance_size": None if task.importance_data is None else len(task.importance_data)}
            for task in self.tasks]}

    def build_model(self) -> nn.Module:
        model = self.make_model()
        if not hasattr(model, "heads") or not hasattr(model, "add_head"):
            raise MASCoreError("make_model() must return a MultiHeadNet (a model with heads and add_head)")
        if len(model.heads) != 0:
            raise MASCoreError(f"make_model() returned a model with {len(model.heads)} heads; return one with none")
        return model

    def trained_module(self, model: nn.Module) -> nn.Module:
        return model

    def begin_task(self, model: nn.Module, task: int) -> int:
        head = model.add_head(self.tasks[task].num_classes)
        model.active_head = head
        return head

    def train_data(self, tasks: Sequence[int]) -> IndexedData | _TaggedUnion:
        if len(tasks) == 1:
            return IndexedData(self.tasks[tasks[0]].train, self.num_workers)
        return _TaggedUnion([self.tasks[t] for t in tasks], list(tasks), self.num_workers)

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        inputs, targets = batch_input(batch), batch_target(batch)
        if not (isinstance(batch, dict) and TASK_KEY in batch):
            self._check_targets(targets, task)
            return F.cross_entropy(module(inputs, head=task), targets)
        task_ids = batch[TASK_KEY]
        features = module.features(inputs)
        loss = features.new_zeros(())
        for task_id in torch.unique(task_ids).tolist():  # heads absent from the batch keep grad=None
            mask = task_ids == task_id
            self._check_targets(targets[mask], task_id)
            loss = loss + F.cross_entropy(module.heads[task_id](features[mask]), targets[mask], reduction="sum")
        return loss / targets.shape[0]

    def importance_data(self, model: nn.Module, task: int, kind: str) -> ImportanceSource:
        source = self.tasks[task].importance_data
        if source is None or kind == "labelled":
            source = self.tasks[task].train
        return ImportanceSource(IndexedData(source, self.num_workers), self.importance_batch_size)

    def pretrained_output(self, module: nn.Module, batch: Any) -> Tensor:
        """F₀ of a method anchored at the starting weights (MAS ``anchor="start"``): the shared
        trunk's features ``[B, feature_dim]`` (the pretrained network's own output when the trunk
        is pretrained; no head is involved)."""
        return module.features(batch_input(batch))

    def evaluate(self, model: nn.Module, task: int) -> list[float]:
        device = next(model.parameters()).device
        return [evaluate(model, self.tasks[j].test, j, batch_size=self.eval_batch_size, device=device,
                         num_workers=self.num_workers) for j in range(task + 1)]

    def validation_score(self, module: nn.Module, task: int, positions: Tensor) -> float:
        """Top-1 accuracy of head ``task`` on the training samples of ``task`` at ``positions``
        (the held-out split of the hyperparameter search, :mod:`mas_core.hparam_search`)."""
        train = self.tasks[task].train
        if isinstance(train, TensorDataset):
            held_out: Dataset = TensorDataset(*(tensor[positions] for tensor in train.tensors))
        else:
            held_out = Subset(train, positions.tolist())
        device = next(module.parameters()).device
        return evaluate(module, held_out, task, batch_size=self.eval_batch_size, device=device,
                        num_workers=self.num_workers)

    def chance_score(self, task: int) -> float:
        """``1 / num_classes`` of task ``task``'s head: the expected top-1 accuracy of a uniformly
        random guess (a model that always predicts one class scores that class's share instead,
        about the same on balanced tasks); the search's collapsed-reference level
        (:mod:`mas_core.hparam_search`)."""
        return 1.0 / self.tasks[task].num_classes

    def _check_targets(self, targets: Tensor, task: int) -> None:
        num_classes, name = self.tasks[task].num_classes, self.tasks[task].name
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise MASCoreError(
                f"task {task} ({name}) has labels in [{int(targets.min())}, {int(targets.max())}] but num_classes="
                f"{num_classes}; relabel each task's classes as 0..num_classes-1")


def evaluate(model: nn.Module, dataset: Dataset, head: int | None, *, batch_size: int = 512,
             device: str | torch.device = "cpu", num_workers: int = 0) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model(x, head=head)`` on a labelled ``dataset``.

    Runs in eval mode under ``torch.no_grad`` and restores the previous mode. ``head=None``
    calls ``model(x)``. Under ``torchrun`` every rank scores its share of the samples
    (:func:`mas_core.distributed.shard_positions`) and the correct and total counts are summed,
    so every rank returns the accuracy on the whole set.
    """
    index = torch.as_tensor(distributed.shard_positions(len(dataset)), dtype=torch.long)
    counts = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in IndexedData(dataset, num_workers).batches(list(index.split(batch_size))):
                inputs = move_to(batch_input(batch), device)
                targets = batch_target(batch).to(device)
                logits = model(inputs) if head is None else model(inputs, head=head)
                counts[0] += float((logits.argmax(dim=1) == targets).sum().item())
                counts[1] += float(targets.shape[0])
    finally:
        model.train(was_training)
    distributed.all_reduce_tensor(counts)
    if counts[1] == 0:
        raise EmptyDataError("the evaluation set is empty: give every task a non-empty test set")
    return float(counts[0] / counts[1])


def run_sequence(make_model: Callable[[], nn.Module], tasks: list[Task], method: str | Regularizer,
                 optim: OptimSettings, *, seed: int = 0, device: str | torch.device = "cpu",
                 eval_batch_size: int = 512, num_workers: int = 0, method_options: dict | None = None,
                 checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None, search: TaskSearch | None = None,
                 hooks: LoopHooks | None = None) -> SequenceResult:
    """Train ``tasks`` in order with ``method`` on the task loop; return the accuracy matrix.

    ``method``: ``"joint"``, a registry name (:data:`mas_core.regularizers.METHODS`, built
    with ``method_options``) or a :class:`Regularizer` instance. ``make_model()`` must return a
    :class:`MultiHeadNet` (or anything with ``features``, ``heads``, ``add_head``,
    ``active_head``) with no heads yet; it is called after seeding. Checkpoints, resume and
    divergence as in :func:`mas_core.loop.train_tasks`; ``progress`` prints the log lines to
    stderr when no ``log`` is given. ``search``: the per-task hyperparameter search
    (:class:`mas_core.hparam_search.SearchSettings`), or ``None`` for the given settings. ``hooks``:
    the loop's :class:`~mas_core.experiment.LoopHooks` (per-epoch records, a stop request).
    """
    experiment = ClassificationExperiment(make_model, tasks, importance_batch_size=optim.batch_size,
                                          eval_batch_size=eval_batch_size, num_workers=num_workers)
    if log is None and progress:
        log = _print_to_stderr
    return train_tasks(experiment, method, optim, seed=seed, device=device, method_options=method_options,
                       checkpoint_dir=checkpoint_dir, resume=resume, log=log, search=search, hooks=hooks)


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["CHECKPOINT_NAME", "ClassificationExperiment", "IndexedData", "JOINT", "MultiHeadNet", "OptimSettings",
           "SequenceResult", "Task", "evaluate", "run_sequence"]
