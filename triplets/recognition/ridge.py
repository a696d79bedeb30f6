"""The ridge baseline of the recognition sequence: one-hot labels regressed on the frozen trunk's features.

The model is the configured :class:`~mas_core.sequence.MultiHeadNet` with its whole trunk frozen at
its initial weights (for ``efficientnet_lite0`` the ImageNet weights: the pooled 1280-d features;
:class:`~triplets.backbones.FrozenModule`, eval mode). The label space is the concatenation of the
tasks' classes: task ``t`` owns the block ``[o_t, o_t + k_t)`` (``o_t = Σ_{j<t} k_j``), a sample of
task ``t`` with label ``c`` has the target ``e_{o_t + c}`` (zeros in every other task's block,
:meth:`mas_core.ridge.RidgeStatistics.add_outputs` pads the earlier samples with zeros when a task
arrives). After task ``t`` the map ``(W, b)`` is ridge regression on tasks ``1..t`` together
(:mod:`mas_core.ridge`), and head ``j`` is ``Linear`` with weight ``W[:, o_j:o_j+k_j]ᵀ`` and bias
``b[o_j:o_j+k_j]``: the class of a test image of task ``j`` is ``argmax`` over its own block (the
multi-head protocol), so a task's accuracy moves only through what later tasks add to the shared
statistics. Nothing is trained by gradient: the ``train`` settings (lr, epochs, batch size) do not
apply, the strength ``λ`` is chosen per task on the task's own training data
(:func:`mas_core.ridge.choose_strength`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mas_core.checkpoint import seed_everything
from mas_core.ridge import RidgeProblem, RidgeSettings, RidgeStatistics, run_ridge
from mas_core.sequence import IndexedData, MultiHeadNet, Task, evaluate

from ..backbones import FrozenModule


def trunk_features(trunk: nn.Module, dataset: Any, batch_size: int, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(features [N, d], labels [N])`` of a labelled dataset, in order, the trunk in eval mode."""
    data = IndexedData(dataset, num_workers)
    features, labels = [], []
    trunk.eval()
    with torch.no_grad():
        for batch in data.batches(list(torch.arange(len(dataset)).split(batch_size))):
            features.append(trunk(batch[0]))
            labels.append(torch.as_tensor(batch[1]).reshape(-1))
    return torch.cat(features), torch.cat(labels)


class RecognitionRidge:
    """A :class:`mas_core.ridge.RidgeExperiment` over a list of :class:`Task` (see the module docs)."""

    def __init__(self, make_model: Callable[[], nn.Module], tasks: Sequence[Task], *, batch_size: int,
                 eval_batch_size: int = 512, num_workers: int = 0) -> None:
        network = make_model()
        self.model = MultiHeadNet(FrozenModule(network.trunk), network.feature_dim)
        self.tasks = list(tasks)
        self.task_names = [task.name for task in tasks]
        self.offsets = [sum(int(task.num_classes) for task in self.tasks[:t]) for t in range(len(self.tasks))]
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self._statistics: list[RidgeStatistics] = []

    def identity(self) -> dict[str, Any]:
        return {"eval_batch_size": self.eval_batch_size, "tasks": [
            {"name": task.name, "num_classes": int(task.num_classes), "train_size": len(task.train),
             "test_size": len(task.test)} for task in self.tasks]}

    def statistics(self, task: int) -> list[RidgeStatistics]:
        classes = int(self.tasks[task].num_classes)
        if task == 0:
            self._statistics = [RidgeStatistics(self.model.feature_dim, classes)]
        else:
            self._statistics[0].add_outputs(classes)
        self.model.add_head(classes)
        return self._statistics

    def task_problems(self, task: int) -> list[RidgeProblem]:
        features, labels = trunk_features(self.model.trunk, self.tasks[task].train, self.batch_size, self.num_workers)
        targets = torch.zeros(len(labels), self.offsets[task] + int(self.tasks[task].num_classes), dtype=torch.float64)
        targets[torch.arange(len(labels)), self.offsets[task] + labels] = 1.0
        return [RidgeProblem(features, targets)]

    def set_solution(self, solutions: list[tuple[Tensor, Tensor]], task: int) -> None:
        weight, bias = solutions[0]
        with torch.no_grad():
            for j in range(task + 1):
                block = slice(self.offsets[j], self.offsets[j] + int(self.tasks[j].num_classes))
                head = self.model.heads[j]
                head.weight.copy_(weight[:, block].T.to(head.weight.dtype))
                head.bias.copy_(bias[block].to(head.bias.dtype))

    def evaluate(self, task: int) -> list[float]:
        return [evaluate(self.model, self.tasks[j].test, j, batch_size=self.eval_batch_size,
                         num_workers=self.num_workers) for j in range(task + 1)]


def run_recognition_ridge(make_model: Callable[[], nn.Module], tasks: Sequence[Task], settings: RidgeSettings, *,
                          seed: int, batch_size: int, eval_batch_size: int = 512, num_workers: int = 0,
                          checkpoint_dir: str | Path | None = None, resume: bool = False,
                          log: Callable[[str], None] | None = None, write: bool = True):
    """Run the ridge sequence (:func:`mas_core.ridge.run_ridge`) on ``tasks``; the model is built
    after ``seed_everything(seed)`` as the task loop does. Returns ``(SequenceResult, records)``."""
    seed_everything(seed)
    experiment = RecognitionRidge(make_model, tasks, batch_size=batch_size, eval_batch_size=eval_batch_size,
                                  num_workers=num_workers)
    return run_ridge(experiment, settings, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, log=log,
                     write=write)


__all__ = ["RecognitionRidge", "run_recognition_ridge", "trunk_features"]
