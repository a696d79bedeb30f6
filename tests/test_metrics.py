"""Metrics on an accuracy matrix, against hand-computed numbers."""
from __future__ import annotations

import math

import pytest

from mas_core.errors import MASCoreError
from mas_core.metrics import average_accuracy, average_drop, average_forgetting, backward_transfer
from mas_core.sequence import SequenceResult

# R[i][j]: accuracy on task j after training task i.
R = [
    [0.90, None, None],
    [0.80, 0.95, None],
    [0.70, 0.90, 0.85],
]


def test_hand_computed_values() -> None:
    assert average_accuracy(R) == pytest.approx((0.70 + 0.90 + 0.85) / 3)  # 0.81667
    # forgetting: ((0.90 - 0.70) + (0.95 - 0.90)) / 2 = 0.125
    assert average_forgetting(R) == pytest.approx(0.125)
    assert backward_transfer(R) == pytest.approx(-0.125)
    # average drop over all 3 tasks: (-0.20 - 0.05 + 0) / 3
    assert average_drop(R) == pytest.approx(-0.25 / 3)


def test_upper_triangle_may_be_nan_and_is_ignored() -> None:
    with_nan = [[0.9, math.nan, 123.0], [0.8, 0.95, math.nan], [0.7, 0.9, 0.85]]
    assert average_forgetting(with_nan) == pytest.approx(0.125)
    assert average_accuracy(with_nan) == pytest.approx(average_accuracy(R))


def test_single_task_and_prefix() -> None:
    assert average_accuracy([[0.6]]) == pytest.approx(0.6)
    assert average_forgetting([[0.6]]) == 0.0
    assert backward_transfer([[0.6]]) == 0.0
    assert average_drop([[0.6]]) == 0.0
    # the first two rows of a 3-task matrix: only tasks 0 and 1 count
    assert average_accuracy(R[:2]) == pytest.approx((0.80 + 0.95) / 2)
    assert average_forgetting(R[:2]) == pytest.approx(0.10)


def test_bad_matrices_raise() -> None:
    with pytest.raises(MASCoreError, match="empty"):
        average_accuracy([])
    with pytest.raises(MASCoreError, match=r"R\[1\]\[0\]"):
        average_forgetting([[0.9, None], [None, 0.8]])
    with pytest.raises(MASCoreError, match="row 1"):
        average_accuracy([[0.9], [0.8]])


def test_sequence_result_properties_and_json() -> None:
    import json

    result = SequenceResult(method="mas", task_names=["a", "b", "c"], accuracy=R, wall_time_s=1.5)
    assert result.avg_acc == pytest.approx(average_accuracy(R))
    assert result.avg_forgetting == pytest.approx(0.125)
    assert result.bwt == pytest.approx(-0.125)
    assert result.avg_drop == pytest.approx(-0.25 / 3)
    decoded = json.loads(json.dumps(result.to_dict()))
    assert decoded["accuracy_matrix"][0][1] is None
    assert decoded["forgetting"] == pytest.approx(0.125)
    assert decoded["avg_drop"] == pytest.approx(-0.25 / 3) and decoded["method"] == "mas"
