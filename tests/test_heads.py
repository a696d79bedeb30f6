"""Heads in the multi-head sequence: Ω of task t is measured on task t's head, and a
regularized run leaves the old tasks' heads exactly as they were trained (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mas_core.loop import train_tasks
from mas_core.regularizers import MAS
from mas_core.sequence import ClassificationExperiment, MultiHeadNet, OptimSettings, Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

IN_DIM, WIDTH = 5, 6
SETTINGS = OptimSettings(epochs=2, lr=0.1, momentum=0.9, batch_size=16)


def _tasks(num_tasks: int = 3, size: int = 32) -> list[Task]:
    generator = torch.Generator().manual_seed(11)
    tasks = []
    for t in range(num_tasks):
        direction = torch.randn(IN_DIM, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (size,), generator=generator)
        inputs = torch.randn(size, IN_DIM, generator=generator, dtype=torch.float64) + labels[:, None] * direction
        data = TensorDataset(inputs, labels)
        tasks.append(Task(name=f"t{t}", train=data, test=data, num_classes=3))
    return tasks


def _make_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(IN_DIM, WIDTH, dtype=torch.float64), nn.Tanh()), WIDTH)


class _SnapshotMAS(MAS):
    """MAS keeping, per task, the model it estimated Ω on and that task's Ω (the increment of the sum)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.models: list[nn.Module] = []
        self.increments: list[dict[str, Tensor]] = []

    def after_task(self, model, data) -> None:
        before = {name: value.clone() for name, value in self.importance.items()}
        self.models.append(copy.deepcopy(model))
        super().after_task(model, data)
        self.increments.append({name: value - before.get(name, torch.zeros_like(value))
                                for name, value in self.importance.items()})


def _brute_force_mas(model: MultiHeadNet, inputs: Tensor, head: int) -> dict[str, Tensor]:
    """(1/N) Σ_n |∂‖head(trunk(x_n))‖²/∂θ|, one sample at a time, for every parameter."""
    named = list(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in named}
    for x in inputs:
        output = model(x[None], head=head)
        grads = torch.autograd.grad(output.pow(2).sum(), [p for _, p in named], allow_unused=True)
        for (name, _), g in zip(named, grads):
            if g is not None:
                sums[name] += g.abs()
    return {name: value / len(inputs) for name, value in sums.items()}


def test_mas_omega_of_each_task_is_measured_on_that_tasks_head() -> None:
    tasks = _tasks()
    experiment = ClassificationExperiment(_make_model, tasks, importance_batch_size=16)
    mas = _SnapshotMAS(lam=1.0)
    train_tasks(experiment, mas, SETTINGS, seed=2)
    for t in range(3):
        expected = _brute_force_mas(mas.models[t], tasks[t].train.tensors[0], head=t)
        for name, value in expected.items():
            measured = mas.increments[t].get(name, torch.zeros_like(value))
            torch.testing.assert_close(measured, value, rtol=1e-9, atol=1e-12, msg=f"task {t}, {name}")
        assert float(mas.increments[t][f"heads.{t}.weight"].abs().sum()) > 0  # its own head has Ω
        for other in range(t):  # an old head takes no part in task t's output
            assert float(mas.increments[t].get(f"heads.{other}.weight", torch.zeros(1)).abs().sum()) == 0.0
    # another head's Ω would differ: the check above can tell them apart
    wrong = _brute_force_mas(mas.models[1], tasks[1].train.tensors[0], head=0)
    assert not torch.allclose(wrong["trunk.0.weight"], mas.increments[1]["trunk.0.weight"], rtol=1e-3)


class _HeadRecordingExperiment(ClassificationExperiment):
    """Copies every parameter after each task (evaluate runs once per task, after after_task)."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(_make_model, tasks, importance_batch_size=16)
        self.after: list[dict[str, Tensor]] = []

    def evaluate(self, model: nn.Module, task: int) -> list[float]:
        self.after.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return super().evaluate(model, task)


@pytest.mark.parametrize("method, options", [("mas", {"lam": 1.0}), ("ewc", {"lam": 10.0}), ("si", {"lam": 1.0}),
                                             ("lmas", {"lam": 1.0})])
def test_old_heads_stay_exactly_as_trained_under_a_regularized_run(method: str, options: dict) -> None:
    experiment = _HeadRecordingExperiment(_tasks())
    train_tasks(experiment, method, SETTINGS, method_options=options, seed=2)
    after = experiment.after
    for t in range(1, 3):
        for head in range(t):
            for kind in ("weight", "bias"):
                name = f"heads.{head}.{kind}"
                assert torch.equal(after[t][name], after[head][name]), f"{name} moved during task {t}"
    assert not torch.equal(after[2]["trunk.0.weight"], after[0]["trunk.0.weight"])  # the trunk did train
