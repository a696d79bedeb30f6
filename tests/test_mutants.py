"""Tests that kill mutants every other test let through (issue 28): SI's path integral clipped at
0, the proximal step without clamping a negative Ω, a resume that does not restore numpy's or
Python's random state, IMM starting a task from the merged model instead of the last trained one."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mas_core.loop import train_tasks
from mas_core.regularizers import IMM, SI, TaskInfo
from mas_core.sequence import ClassificationExperiment, OptimSettings

from test_si_path import _make_model, _RecordingExperiment, _tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

DAMPING = 0.1


def si_with_one_uphill_step(penalty_step: str = "gradient") -> tuple[SI, nn.Module]:
    """SI after a task of one step: a weight of two entries, both moved by +0.5, the first against
    its gradient (+1: ω = −0.5, the step went uphill), the second with it (−1: ω = +0.5)."""
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    si = SI(lam=1.0, damping=DAMPING, penalty_step=penalty_step)
    si.before_task(model, TaskInfo(index=0, head=None, num_samples=1))
    model.weight.grad = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    with torch.no_grad():
        model.weight.add_(0.5)
    si.after_step(model)
    si.after_task(model, [])
    return si, model


def test_si_keeps_a_negative_path_integral_contribution():
    """Ω is not clipped at 0 (Zenke et al.'s reference): ω / ((Δθ)² + ξ) with its sign."""
    si, _ = si_with_one_uphill_step()
    expected = torch.tensor([[-0.5], [0.5]], dtype=torch.float64) / (0.25 + DAMPING)
    torch.testing.assert_close(si.importance["weight"], expected, rtol=0, atol=1e-12)


def test_the_proximal_step_treats_a_negative_omega_as_zero():
    """θ ← θ + s (θ* − θ), s = c / (1 + c), c = 2 η λ max(Ω, 0): the entry of negative Ω stays where
    the optimizer put it; the other is pulled towards θ*."""
    si, model = si_with_one_uphill_step("proximal")
    anchor = model.weight.detach().clone()  # θ* = 1.5
    with torch.no_grad():
        model.weight.fill_(2.0)  # where the optimizer put both
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    si.after_optimizer_step(model, optimizer)
    c = 2 * 0.1 * 1.0 * 0.5 / (0.25 + DAMPING)
    pulled = 2.0 + c / (1 + c) * (float(anchor[1, 0]) - 2.0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[2.0], [pulled]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


class _DrawingExperiment(ClassificationExperiment):
    """Each loss scaled by a number drawn from numpy's or Python's global generator (as an
    augmentation drawing from them would)."""

    def __init__(self, draw: str) -> None:
        super().__init__(_make_model, _tasks(3), importance_batch_size=16)
        self.draw = draw

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        scale = 1.0 + (float(np.random.rand()) if self.draw == "numpy" else random.random())
        return super().loss(module, batch, task) * scale


@pytest.mark.parametrize("draw", ["numpy", "python"])
def test_resume_restores_numpy_and_python_random_state(tmp_path, draw):
    """A run stopped after task 1 and resumed ends with the weights of the uninterrupted run:
    the resume puts back the generators the loss draws from (the loop seeds them only once)."""
    settings = OptimSettings(epochs=1, lr=0.1, momentum=0.9, batch_size=16)
    whole = train_tasks(_DrawingExperiment(draw), "finetune", settings, seed=3, checkpoint_dir=tmp_path / "whole")
    train_tasks(_DrawingExperiment(draw), "finetune", settings, seed=3, checkpoint_dir=tmp_path / "parts",
                stop_after_task=1)
    np.random.seed(12345)  # whatever the process did in between
    random.seed(12345)
    resumed = train_tasks(_DrawingExperiment(draw), "finetune", settings, seed=3, checkpoint_dir=tmp_path / "parts",
                          resume=True)
    assert resumed.trained_tasks == 2
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_imm_starts_each_task_from_the_last_trained_model_not_the_merge():
    """Weight transfer: task t starts from θ_{t−1} as trained, not from the merged model that
    after_task loaded for evaluation."""
    trained: list[dict[str, Tensor]] = []
    merged: list[dict[str, Tensor]] = []

    class RecordingIMM(IMM):
        def after_task(self, model: nn.Module, data: Any) -> None:
            trained.append({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("trunk")})
            super().after_task(model, data)
            merged.append({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("trunk")})

    experiment = _RecordingExperiment(_tasks(3))
    train_tasks(experiment, RecordingIMM("mean", lam_l2=0.01), OptimSettings(epochs=1, lr=0.1, batch_size=16), seed=3)
    for task in (1, 2):
        start = experiment.steps[task][0][0]  # θ at the task's first loss
        for name, value in trained[task - 1].items():
            assert torch.equal(start[name], value), (task, name)
            if task == 2:
                assert not torch.equal(merged[task - 1][name], value)  # the merge differs: the test can tell
