"""Metrics on an accuracy matrix, against hand-computed numbers."""
from __future__ import annotations

import math

import pytest

from mas_core.errors import MASCoreError
from mas_core.metrics import average_accuracy, average_drop, average_forgetting, backward_transfer, with_final_row
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


def test_forgetting_is_chaudhrys_maximum_over_earlier_rows_on_a_non_monotone_column() -> None:
    # column 0 rises after it is learned (0.5 -> 0.9) and then falls to 0.6: it forgot 0.3 of
    # its best accuracy, though it ends above R[0][0]
    rising = [
        [0.50, None, None],
        [0.90, 0.80, None],
        [0.60, 0.75, 0.90],
    ]
    # Chaudhry et al. 2018: ((0.90 - 0.60) + (0.80 - 0.75)) / 2 = 0.175
    assert average_forgetting(rising) == pytest.approx(0.175)
    # BWT (Lopez-Paz & Ranzato): ((0.60 - 0.50) + (0.75 - 0.80)) / 2 = +0.025, so -BWT = -0.025:
    # the definition the loop used before (R[j][j] - R[T-1][j]) had the other sign
    assert backward_transfer(rising) == pytest.approx(0.025)
    assert -backward_transfer(rising) < 0 < average_forgetting(rising)
    # the MAS paper's average drop over the three tasks: (0.10 - 0.05 + 0) / 3
    assert average_drop(rising) == pytest.approx(0.05 / 3)
    # the last row is not a candidate for the maximum: only rows j..T-2
    assert average_forgetting([[0.5, None], [0.9, 0.8]]) == pytest.approx(0.5 - 0.9)


def test_forgetting_is_never_below_minus_bwt_and_equals_it_on_decreasing_columns() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        T = rng.randint(2, 6)
        R = [[rng.random() for _ in range(i + 1)] for i in range(T)]
        assert average_forgetting(R) >= -backward_transfer(R) - 1e-12
        decreasing = [[min(R[k][j] for k in range(j, i + 1)) for j in range(i + 1)] for i in range(T)]
        assert average_forgetting(decreasing) == pytest.approx(-backward_transfer(decreasing))


def test_metrics_of_a_model_delivered_in_place_of_the_last_trained_one() -> None:
    merged = [0.75, 0.95, 0.70]  # e.g. IMM's merge after the last task
    values = with_final_row(R, merged)
    assert values["avg_acc"] == pytest.approx((0.75 + 0.95 + 0.70) / 3)
    assert values["forgetting"] == pytest.approx(((0.90 - 0.75) + (0.95 - 0.95)) / 2)
    assert values["bwt"] == pytest.approx(((0.75 - 0.90) + (0.95 - 0.95)) / 2)
    # the last task counts in the drop: the merge lost 0.15 on the task just trained
    assert values["avg_drop"] == pytest.approx(((0.75 - 0.90) + 0.0 + (0.70 - 0.85)) / 3)
    assert with_final_row(R, R[-1]) == pytest.approx({"avg_acc": average_accuracy(R), "bwt": backward_transfer(R),
                                                     "forgetting": average_forgetting(R), "avg_drop": average_drop(R)})
    with pytest.raises(MASCoreError, match="R\\[2\\]\\[1\\]"):
        with_final_row(R, [0.7, None, 0.8])


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
