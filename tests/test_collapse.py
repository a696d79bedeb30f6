"""A collapse at a finite loss is a divergence (issue 23), and so is a NonFiniteError from a method's
after_task (issue 28 item 10): the loop stops the task with a one-line DivergenceError, and with a
search it backs off exactly as from a NaN (mas_core.divergence, docs/method.md §14.1)."""
from __future__ import annotations

import math

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


def test_a_searched_task_that_ends_at_chance_at_a_bounded_loss_is_backed_off() -> None:
    """LwF at λ_o 16, lr 0.05 on split digits: task 2 ends at chance (0.43 on a two-way task; λ_o 4
    learns it, 0.99) with every epoch's loss bounded, the case of the searched split Fashion-MNIST
    (λ_o 2048) that no loss rule sees. Since issue 23 (§14.1, event 4) a searched task's own
    validation score after the real run is checked against the search's bar: below it, the task is backed off like a NaN
    until it learns (16 → 8 here: 0.83 on the test split). Fails without the check (no back-off, task 2 at 0.43)."""
    optim = OptimSettings(epochs=5, lr=0.05, batch_size=32)
    tasks = _digit_tasks()[:2]
    plain = run_sequence(_digit_model, tasks, "lwf", optim, seed=0, method_options={"lam": 16.0}, progress=False)
    assert plain.accuracy[1][1] < 0.5  # the collapse, without the search: nothing fires
    lines: list[str] = []
    settings = _Forced(enabled=True, lr_grid=[0.05], start=1.0, decay=0.5, max_tries=8, forced={1: 16.0})
    experiment = ClassificationExperiment(_digit_model, tasks, importance_batch_size=32)
    result = train_tasks(experiment, "lwf", optim, seed=0, search=settings, method_options={"lam": 16.0},
                         log=lines.append)
    record = result.hparam_search[1]
    assert record["reference_acc"] > 0.9 and not record["reference_collapsed"]
    assert record["backoff"] and all("below the bar" in entry["error"] and "bounded loss" in entry["error"]
                                     for entry in record["backoff"])
    assert record["backoff"][0]["strength"] == {"lam": 16.0}
    assert record["strength"] == {"lam": 8.0} and result.accuracy[1][1] > 0.8  # 0.83 against 0.43
    assert any("task 2 (23): training diverged at lam=16" in line for line in lines)


def test_the_real_run_rule_is_the_search_bar_on_the_task_own_validation_samples() -> None:
    """``real_run_collapsed``: the real run's score on V_t against the record's threshold
    T = (1 − tolerance)·A*, less two standard errors of a proportion on |V_t| samples; off where the stability phase did not run (no threshold or no tries)."""
    from mas_core.hparam_search import SearchSettings

    class _Scored:
        def __init__(self, value: float) -> None:
            self.value = value

        def train_data(self, tasks):
            return list(range(50))

        def validation_score(self, module, task, positions):
            assert len(positions) == 10  # the search's V_t: 20 % of 50
            return self.value

    settings = SearchSettings(enabled=True)
    record = {"task": 1, "threshold": 0.72, "reference_acc": 0.9, "tries": [{"value": 4.0, "val_acc": 0.8}]}
    bound = 0.72 - 2.0 * math.sqrt(0.72 * 0.28 / 10)  # two standard errors below the bar on |V_t| = 10
    assert settings.real_run_collapsed(_Scored(bound), None, record, 0) is None
    said = settings.real_run_collapsed(_Scored(bound - 0.01), None, record, 0)
    assert f"is below the bar 0.720 = (1 − 0.2)·0.900" in said and f"on 10 samples (bound {bound:.3f})" in said
    assert "bounded loss" in said
    assert settings.real_run_collapsed(_Scored(float("nan")), None, record, 0) is not None
    assert settings.real_run_collapsed(_Scored(0.1), None, {**record, "threshold": None}, 0) is None
    assert settings.real_run_collapsed(_Scored(0.1), None, {**record, "tries": []}, 0) is None
