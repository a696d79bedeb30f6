"""Continual-learning metrics on an accuracy matrix.

``R[i][j]`` is the accuracy (a fraction in [0, 1], or any consistent unit) on task
``j`` measured right after training task ``i``. Only the lower triangle
(``j <= i``) is defined; entries with ``j > i`` are ignored and may be ``None`` or
``NaN`` (the task loop, :func:`mas_core.loop.train_tasks`, writes ``None`` so that the matrix
is valid JSON). ``T`` is the number of rows (tasks trained so far); the matrix may
also have more columns than rows (the accuracy of tasks not yet trained is ignored).

With ``a_j = R[j][j]`` (accuracy right after learning task j) and
``f_j = R[T-1][j]`` (final accuracy):

* average accuracy      ``A   = (1/T) Σ_{j<T} f_j``
* average forgetting    ``F   = (1/(T-1)) Σ_{j<T-1} max_{l∈{j..T-2}} (R[l][j] - f_j)``   (0 when T = 1;
  Chaudhry et al., ECCV 2018: the drop from the *best* accuracy task j ever had before the
  last task, not from ``a_j``)
* backward transfer     ``BWT = (1/(T-1)) Σ_{j<T-1} (f_j - a_j)``  (0 when T = 1; Lopez-Paz &
  Ranzato, NeurIPS 2017)
* average drop          ``D   = (1/T) Σ_{j<T} (f_j - a_j)``  (the MAS paper's "average
  drop"; the last task contributes 0; negative means forgetting)

``F ≥ -BWT`` always (the maximum includes ``l = j``), with equality when every column only
decreases after its diagonal; on a column that drops and then recovers they may differ in sign.

All functions are pure and return plain Python floats in the unit of ``R``.
"""
from __future__ import annotations

import math
from typing import Sequence

from .errors import MASCoreError

AccuracyMatrix = Sequence[Sequence[float | None]]


def _validated(R: AccuracyMatrix) -> list[list[float]]:
    """Return the lower triangle of ``R`` as floats, checking shape and finiteness."""
    try:
        rows = [list(row) for row in R]
    except TypeError:
        raise MASCoreError(
            f"an accuracy matrix must be a list of rows (lists of floats); got {type(R).__name__}"
        ) from None
    if not rows:
        raise MASCoreError("the accuracy matrix is empty: train at least one task before computing metrics")
    lower: list[list[float]] = []
    for i, row in enumerate(rows):
        if len(row) < i + 1:
            raise MASCoreError(
                f"row {i} of the accuracy matrix has {len(row)} entries; it needs at least {i + 1} "
                "(R[i][j] for every j <= i)"
            )
        values = []
        for j in range(i + 1):
            value = row[j]
            if value is None or not math.isfinite(float(value)):
                raise MASCoreError(
                    f"R[{i}][{j}] is {value!r}; every entry with j <= i must be a finite accuracy"
                )
            values.append(float(value))
        lower.append(values)
    return lower


def average_accuracy(R: AccuracyMatrix) -> float:
    """``(1/T) Σ_j R[T-1][j]``: mean accuracy over all tasks after the last one is trained."""
    rows = _validated(R)
    last = rows[-1]
    return sum(last) / len(last)


def average_forgetting(R: AccuracyMatrix) -> float:
    """Chaudhry et al. (2018): ``(1/(T-1)) Σ_{j<T-1} max_{l∈{j..T-2}} (R[l][j] - R[T-1][j])``; 0.0 for T = 1.

    Per old task, the best accuracy it had after it was learned and before the last task,
    minus its final accuracy. Positive means the tasks lost accuracy; it is never below
    ``-backward_transfer(R)``.
    """
    rows = _validated(R)
    T = len(rows)
    if T == 1:
        return 0.0
    return sum(max(rows[l][j] for l in range(j, T - 1)) - rows[-1][j] for j in range(T - 1)) / (T - 1)


def backward_transfer(R: AccuracyMatrix) -> float:
    """BWT ``(1/(T-1)) Σ_{j<T-1} (R[T-1][j] - R[j][j])`` (Lopez-Paz & Ranzato 2017); 0.0 for T = 1."""
    rows = _validated(R)
    T = len(rows)
    if T == 1:
        return 0.0
    return sum(rows[-1][j] - rows[j][j] for j in range(T - 1)) / (T - 1)


def average_drop(R: AccuracyMatrix) -> float:
    """The MAS paper's average drop ``(1/T) Σ_{j<T} (R[T-1][j] - R[j][j])`` (negative = forgetting)."""
    rows = _validated(R)
    T = len(rows)
    return sum(rows[-1][j] - rows[j][j] for j in range(T)) / T


def with_final_row(R: AccuracyMatrix, final_row: Sequence[float | None]) -> dict[str, float]:
    """The metrics of a model delivered in place of the last trained one (IMM's merge), whose
    accuracies on the ``T`` tasks are ``final_row``, measured against the models as trained in ``R``:

    * ``avg_acc``    ``(1/T) Σ_{j<T} m_j``
    * ``forgetting`` ``(1/(T-1)) Σ_{j<T-1} max_{l∈{j..T-2}} R[l][j] - m_j``
    * ``bwt``        ``(1/(T-1)) Σ_{j<T-1} (m_j - R[j][j])``
    * ``avg_drop``   ``(1/T) Σ_{j<T} (m_j - R[j][j])``: the last task counts too (what the
      replacement lost on the task just trained)

    with ``m_j = final_row[j]``; the forgetting and BWT of ``R`` with its last row replaced."""
    rows = _validated(R)
    T = len(rows)
    final = _validated(rows[:-1] + [list(final_row)])[-1]
    delivered = rows[:-1] + [final]
    return {"avg_acc": average_accuracy(delivered), "forgetting": average_forgetting(delivered),
            "bwt": backward_transfer(delivered), "avg_drop": sum(final[j] - rows[j][j] for j in range(T)) / T}
