"""benchmarks/task_orders.py's own logic: the orders it draws and the statistics it reports."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mas_core import average_accuracy, average_forgetting, backward_transfer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "task_orders.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("task_orders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_orders_are_distinct_permutations_fixed_by_the_seed(script) -> None:
    orders = script.task_orders(5, 5, seed=0)
    assert orders == script.task_orders(5, 5, seed=0)
    assert orders[0] == [0, 1, 2, 3, 4]  # the given order first
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in orders)
    assert len({tuple(order) for order in orders}) == 5
    assert script.task_orders(5, 5, seed=1) != orders
    all_of_three = script.task_orders(3, 6, seed=0)  # every order of 3 tasks, no repeat
    assert sorted(map(tuple, all_of_three)) == sorted(__import__("itertools").permutations(range(3)))
    with pytest.raises(ValueError, match="fewer than 7"):
        script.task_orders(3, 7, seed=0)


# A column that rises after its diagonal and falls back (task 0: 0.8 -> 0.9 -> 0.85): Chaudhry's
# forgetting counts the fall from 0.9, BWT the change from 0.8, so F != -BWT.
MATRIX = [[0.8, None, None],
          [0.9, 0.7, None],
          [0.85, 0.6, 1.0]]


def test_run_metrics_are_mas_core_metrics_on_a_hand_made_matrix(script) -> None:
    metrics = script.run_metrics(MATRIX)
    assert metrics["avg_acc"] == pytest.approx((0.85 + 0.6 + 1.0) / 3) == average_accuracy(MATRIX)
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.85) + (0.7 - 0.6)) / 2)
    assert metrics["forgetting"] == average_forgetting(MATRIX)
    assert metrics["bwt"] == pytest.approx(((0.85 - 0.8) + (0.6 - 0.7)) / 2) == backward_transfer(MATRIX)
    assert metrics["final_by_position"] == [0.85, 0.6, 1.0]


def test_summary_mean_sd_and_task_mapping(script) -> None:
    # order [2, 0, 1]: position 0 holds task 2, so task "c" ended at 0.85 in this run
    runs = [{"order": [0, 1, 2], **script.run_metrics(MATRIX)},
            {"order": [2, 0, 1], **script.run_metrics([[1.0, None, None], [1.0, 0.9, None], [0.5, 0.9, 0.8]])},
            {"order": [1, 2, 0], "diverged": True}]
    summary = script.summarize(runs, ["a", "b", "c"])
    assert summary["orders"] == 3 and summary["diverged"] == 1
    values = [runs[0]["forgetting"], runs[1]["forgetting"]]
    assert runs[1]["forgetting"] == pytest.approx((0.5 + 0.0) / 2)
    assert summary["forgetting"]["mean"] == pytest.approx(np.mean(values))
    assert summary["forgetting"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert summary["avg_acc"]["sd"] == pytest.approx(np.std([runs[0]["avg_acc"], runs[1]["avg_acc"]], ddof=1))
    assert summary["final_by_position"][0]["mean"] == pytest.approx((0.85 + 0.5) / 2)
    assert summary["final_by_task"]["c"]["mean"] == pytest.approx((1.0 + 0.5) / 2)  # position 2, then 0
    assert summary["final_by_task"]["a"]["mean"] == pytest.approx((0.85 + 0.9) / 2)
    assert script.mean_sd([0.3])["sd"] is None


def test_matched_lambda_and_recorded_mean_omega(script) -> None:
    runs = {"sum": [{"mean_omega": [1.0, 3.0, 9.0]}], "alpha": [{"mean_omega": [1.0, 1.0, 9.0]}],
            "ema": [{"mean_omega": [0.5, 1.5, 9.0]}]}
    assert script.matched_lams(0.5, runs) == pytest.approx({"alpha": 0.5 * 4 / 2, "ema": 0.5 * 4 / 2})

    model = nn.Linear(2, 1, bias=False)
    reg = script.RecordingMAS(1.0, accumulate="alpha")
    reg.add_task_importance(model, {"weight": torch.tensor([[1.0, 3.0]])})   # mass 4
    reg.add_task_importance(model, {"weight": torch.tensor([[6.0, 2.0]])})   # mass 8
    # alpha: (Ω1/4 + Ω2/8) / (1/4 + 1/8); its mean is (1 + 1) / (3/8) / 2 elements
    assert reg.mean_omega == pytest.approx([2.0, (2 / (3 / 8)) / 2])
    assert math.isclose(reg.mean_omega[1], float(reg.importance["weight"].mean()), rel_tol=1e-12)
