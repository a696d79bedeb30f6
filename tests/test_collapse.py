"""A collapse at a finite loss is a divergence (issue 23), and so is a NonFiniteError from a method's
after_task (issue 28 item 10): the loop stops the task with a one-line DivergenceError, and with a
search it backs off exactly as from a NaN (mas_core.divergence, docs/method.md §14.1)."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from mas_core.divergence import COLLAPSE_FACTOR, CollapseCheck
from mas_core.errors import DivergenceError, NonFiniteError
from mas_core.loop import train_tasks
from mas_core.regularizers import Regularizer
from mas_core.regularizers.common import zero_penalty
from mas_core.sequence import ClassificationExperiment, MultiHeadNet, OptimSettings, Task, run_sequence

from test_hparam_search import _Forced
from test_sequence import SEED, SETTINGS, _make_model, _tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

EXPLODED = 1e30


class _Exploding(Regularizer):
    """With ``lam > 1`` the loss is a finite 1e30 from the second epoch on (5 steps of 32 per epoch
    of the tests' 160-sample tasks); with ``lam ≤ 1`` nothing (fine-tuning)."""

    name = "exploding"
    uses_step_hook = True

    def __init__(self, lam: float = 1.0) -> None:
        self.lam, self.steps = lam, 0

    def before_task(self, model, task) -> None:
        self.steps = 0

    def penalty(self, model, inputs=None):
        zero = zero_penalty(model)
        return zero + EXPLODED if self.lam > 1.0 and self.steps >= 5 else zero

    def after_step(self, model) -> None:
        self.steps += 1


class _Fragile(Regularizer):
    """``after_task`` raises NonFiniteError with ``lam > 1`` (as MAS's importance of an exploded model)."""

    name = "fragile"

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = lam

    def after_task(self, model, data) -> None:
        if self.lam > 1.0:
            raise NonFiniteError("the importance estimate holds NaN/Inf in 'trunk.0.weight'")


def _experiment() -> ClassificationExperiment:
    return ClassificationExperiment(_make_model, _tasks(), importance_batch_size=32)


def test_the_collapse_rule_compares_each_epoch_with_the_first() -> None:
    check = CollapseCheck()
    assert COLLAPSE_FACTOR == 100.0 and check.end_of_epoch(0.7) is None
    assert check.end_of_epoch(0.7 * 99.0) is None  # within k: not a collapse
    said = check.end_of_epoch(8e17)
    assert said is not None and "epoch 3, 8e+17, is above 100× the first epoch's 0.7" in said
    zero = CollapseCheck()
    assert zero.end_of_epoch(0.0) is None and zero.end_of_epoch(5.0) is None  # L̄_1 = 0: no ratio


def test_a_loss_that_explodes_to_a_finite_value_is_a_divergence() -> None:
    """Before issue 23 this run finished (every loss finite) with a mean loss of about 1e30."""
    with pytest.raises(DivergenceError) as error:
        run_sequence(_make_model, _tasks(), _Exploding(lam=4.0), SETTINGS, seed=SEED, progress=False)
    message = str(error.value)
    assert "\n" not in message and "task 1 (t0), epoch 2" in message and "collapse at a finite loss" in message
    assert "1e+30" in message and "method's strength (lam=4.0)" in message
    fine = run_sequence(_make_model, _tasks(), _Exploding(lam=1.0), SETTINGS, seed=SEED, progress=False)
    assert len(fine.accuracy) == 3


def test_a_searched_strength_that_collapses_is_backed_off_like_a_nan() -> None:
    """λ = 4 accepted by the (one-epoch) search, collapses in the two-epoch real run of task 2: backed off
    4 → 2 → 1, as from a NaN, and the record lists both collapses."""
    lines: list[str] = []
    settings = _Forced(enabled=True, lr_grid=[SETTINGS.lr], start=1.0, decay=0.5, max_tries=4, epochs=1,
                       forced={1: 4.0})
    result = train_tasks(_experiment(), _Exploding(lam=1.0), SETTINGS, seed=SEED, search=settings, log=lines.append)
    record = result.hparam_search[1]
    assert [entry["strength"] for entry in record["backoff"]] == [{"lam": 4.0}, {"lam": 2.0}]
    assert all("collapse at a finite loss" in entry["error"] for entry in record["backoff"])
    assert record["strength"] == {"lam": 1.0}
    assert len([line for line in lines if "task 2 (t1): training diverged" in line]) == 2
    floor = _Forced(enabled=True, lr_grid=[SETTINGS.lr], start=1.0, decay=0.5, max_tries=2, epochs=1, forced={1: 4.0})
    with pytest.raises(DivergenceError, match=r"collapse at a finite loss.*backed off 1 time\(s\) from lam=4, down "
                                              r"to the search's floor"):
        train_tasks(_experiment(), _Exploding(lam=1.0), SETTINGS, seed=SEED, search=floor)


def test_a_non_finite_error_from_after_task_is_backed_off_like_a_diverged_step() -> None:
    """Issue 28 item 10: MAS's after_task raising NonFiniteError on an exploded model stopped the
    searched run; now it is the task's divergence: backed off with a search, one line without."""
    settings = _Forced(enabled=True, lr_grid=[SETTINGS.lr], start=1.0, decay=0.5, max_tries=4, epochs=1,
                       forced={1: 4.0})
    result = train_tasks(_experiment(), _Fragile(lam=1.0), SETTINGS, seed=SEED, search=settings)
    record = result.hparam_search[1]
    assert [entry["strength"] for entry in record["backoff"]] == [{"lam": 4.0}, {"lam": 2.0}]
    assert all("after_task failed on the trained model" in entry["error"] for entry in record["backoff"])
    assert record["strength"] == {"lam": 1.0} and len(result.accuracy) == 3
    with pytest.raises(DivergenceError) as error:
        run_sequence(_make_model, _tasks(), _Fragile(lam=4.0), SETTINGS, seed=SEED, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("training diverged at method fragile, task 1 (t0): after_task")
    assert "holds NaN/Inf in 'trunk.0.weight'" in message and "lam=4.0" in message


def _digit_tasks() -> list[Task]:
    """Split digits, 5 tasks of 2 classes (benchmarks/loss_collapse_survey.py)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    tasks = []
    for t in range(5):
        keep = (y == 2 * t) | (y == 2 * t + 1)
        xs, ys = x[keep], y[keep] - 2 * t
        cut = int(0.8 * len(ys))
        tasks.append(Task(name=f"{2 * t}{2 * t + 1}", train=TensorDataset(xs[:cut], ys[:cut]),
                          test=TensorDataset(xs[cut:], ys[cut:]), num_classes=2))
    return tasks


def _digit_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()), 64)


def test_the_real_finite_collapse_of_the_survey_is_caught() -> None:
    """MAS with the gradient step at λ 1000, lr 0.01 on split digits: before issue 23 it finished with
    every loss finite, an epoch 1.3e22× its task's first and every task near chance (48.6 %)."""
    with pytest.raises(DivergenceError, match="collapse at a finite loss"):
        run_sequence(_digit_model, _digit_tasks(), "mas", OptimSettings(epochs=5, lr=0.01, batch_size=32), seed=0,
                     method_options={"lam": 1000.0, "penalty_step": "gradient"}, progress=False)
