"""SI's path integral through the task loop, against a brute-force reference (float64).

Zenke et al.'s reference integrates ω with the gradient of the task loss alone. The reference
here records, at every step of the loop, θ and the task loss's own gradient
(``torch.autograd.grad`` of the experiment's loss, apart from the penalty the loop adds) and
recomputes ``Ω = Σ_t Σ_s −g_s·Δθ_s / ((θ_end − θ_start)² + ξ)`` with a fresh sum per task.
It fails if SI integrates the full gradient (loss + penalty), if the loop never calls
``after_step`` (Ω would be 0) or if SI does not reset its running sum at every task.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mas_core.regularizers import SI, TaskInfo
from mas_core.sequence import ClassificationExperiment, MultiHeadNet, OptimSettings, Task
from mas_core.loop import train_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

IN_DIM, WIDTH, DAMPING = 4, 6, 0.1


def _tasks(num_tasks: int = 3, size: int = 48) -> list[Task]:
    generator = torch.Generator().manual_seed(5)
    tasks = []
    for t in range(num_tasks):
        direction = torch.randn(IN_DIM, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 2, (size,), generator=generator)
        inputs = torch.randn(size, IN_DIM, generator=generator, dtype=torch.float64) + (2 * labels[:, None] - 1) * direction
        data = TensorDataset(inputs, labels)
        tasks.append(Task(name=f"t{t}", train=data, test=data, num_classes=2))
    return tasks


def _make_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(IN_DIM, WIDTH, dtype=torch.float64), nn.Tanh()), WIDTH)


class _RecordingExperiment(ClassificationExperiment):
    """Records per task, at every loss the loop asks for, θ and the task loss's own gradient,
    and θ at the end of the task (``evaluate`` runs after ``after_task``, which SI leaves alone)."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(_make_model, tasks, importance_batch_size=16)
        self.steps: dict[int, list[tuple[dict[str, Tensor], dict[str, Tensor]]]] = {}
        self.ends: dict[int, dict[str, Tensor]] = {}

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        value = super().loss(module, batch, task)
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, [p for _, p in named], retain_graph=True, allow_unused=True)
        theta = {name: p.detach().clone() for name, p in named}
        gradient = {name: torch.zeros_like(p) if g is None else g.detach().clone() for (name, p), g in zip(named, grads)}
        self.steps.setdefault(task, []).append((theta, gradient))
        return value

    def evaluate(self, model: nn.Module, task: int) -> list[float]:
        self.ends[task] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return super().evaluate(model, task)


def _reference_importance(experiment: _RecordingExperiment, si: SI | None = None) -> dict[str, Tensor]:
    """Σ_t ω_t / ((θ_end − θ_start)² + ξ), ω_t = Σ_s −g_s·(θ_{s+1} − θ_s) with g_s the task loss's
    gradient; with ``si``, g_s is instead the full gradient (task + the penalty of the Ω and θ*
    the loop's SI held during that task), what SI integrated before the fix."""
    importance: dict[str, Tensor] = {}
    anchors: dict[str, Tensor] = {}
    for task in sorted(experiment.steps):
        steps, end = experiment.steps[task], experiment.ends[task]
        thetas = [theta for theta, _ in steps] + [end]
        omega = {name: torch.zeros_like(value) for name, value in steps[0][0].items()}
        for s, (theta, gradient) in enumerate(steps):
            for name in omega:
                g = gradient[name]
                if si is not None and name in importance:
                    g = g + 2 * si.lam * importance[name] * (theta[name] - anchors[name])
                omega[name] -= g * (thetas[s + 1][name] - theta[name])
        for name, value in omega.items():
            contribution = value / ((end[name] - steps[0][0][name]) ** 2 + DAMPING)
            importance[name] = importance[name] + contribution if name in importance else contribution
        anchors = {name: end[name].clone() for name in importance}
    return importance


def _run_si(lam: float, settings: OptimSettings) -> tuple[SI, _RecordingExperiment]:
    experiment = _RecordingExperiment(_tasks())
    si = SI(lam=lam, damping=DAMPING)
    train_tasks(experiment, si, settings, seed=3)
    return si, experiment


def test_si_omega_integrates_the_task_loss_gradient_alone_over_three_tasks() -> None:
    si, experiment = _run_si(2.0, OptimSettings(epochs=2, lr=0.1, momentum=0.9, batch_size=16))
    reference = _reference_importance(experiment)
    full_gradient = _reference_importance(experiment, si)
    assert set(si.importance) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(si.importance[name], value, rtol=1e-9, atol=1e-12)
    # the test can tell the two: with the penalty's gradient Ω of the trunk differs by far more
    # than the tolerance from task 2 on
    trunk = reference["trunk.0.weight"]
    difference = float((full_gradient["trunk.0.weight"] - trunk).abs().max() / trunk.abs().max())
    assert difference > 0.05, difference
    assert float(trunk.abs().max()) > 1e-3  # the loop called after_step: Ω is not silently 0


def test_si_omega_matches_the_reference_without_momentum_and_under_weight_decay() -> None:
    """Δθ is whatever the optimizer did (weight decay included); ω uses the task gradient all the same."""
    si, experiment = _run_si(1.0, OptimSettings(epochs=1, lr=0.2, momentum=0.0, batch_size=16, weight_decay=0.01))
    for name, value in _reference_importance(experiment).items():
        torch.testing.assert_close(si.importance[name], value, rtol=1e-9, atol=1e-12)


def test_the_loop_calls_si_after_every_step() -> None:
    calls = []

    class CountingSI(SI):
        def after_step(self, model: nn.Module) -> None:
            calls.append(1)
            super().after_step(model)

    experiment = _RecordingExperiment(_tasks(2))
    si = CountingSI(lam=1.0, damping=DAMPING)
    train_tasks(experiment, si, OptimSettings(epochs=2, lr=0.1, momentum=0.9, batch_size=16), seed=3)
    assert len(calls) == sum(len(steps) for steps in experiment.steps.values()) == 2 * 2 * 3
    assert all(float(value.abs().sum()) > 0 for name, value in si.importance.items() if name.startswith("trunk"))


def test_si_resets_its_running_sum_and_start_at_every_task() -> None:
    model = _make_model()
    model.add_head(2)
    si = SI(lam=1.0, damping=DAMPING)
    si.before_task(model, TaskInfo(index=0, head=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = _tasks(1)[0].train.tensors
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        si.after_step(model)
    assert float(si.path["trunk.0.weight"].abs().sum()) > 0
    si.after_task(model, ())
    first = {name: value.clone() for name, value in si.importance.items()}
    si.before_task(model, TaskInfo(index=1, head=0))
    for name, parameter in model.named_parameters():
        assert torch.equal(si.path[name], torch.zeros_like(parameter)), name
        assert torch.equal(si.start[name], parameter.detach()), name
    # a task without steps adds nothing: Ω stays what the first task left
    si.after_task(model, ())
    for name, value in first.items():
        torch.testing.assert_close(si.importance[name], value, rtol=0, atol=0)
