"""Exception types of :mod:`mas_core`.

Every error raised for bad input derives from :class:`MASCoreError`, so a caller
(the ``mas-triplets`` CLI, a notebook) can catch one type and print its message.
Messages say what was wrong *and* what to do about it.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable


class MASCoreError(Exception):
    """Base class of every error :mod:`mas_core` raises for bad input or state."""


class EmptyDataError(MASCoreError, ValueError):
    """The data source yielded no samples."""


class NoTrainableParametersError(MASCoreError, ValueError):
    """The model has no parameter with ``requires_grad=True``."""


class InvalidOutputError(MASCoreError, TypeError):
    """``output_fn`` (or the model) returned something that is not a floating-point tensor."""


class NonFiniteError(MASCoreError, FloatingPointError):
    """A NaN or Inf appeared in an importance estimate, a penalty or a loss."""


class DivergenceError(NonFiniteError):
    """Training diverged (loss not finite); usually lambda times the learning rate is too large."""


class CheckpointMismatchError(MASCoreError, ValueError):
    """A checkpoint was written by a run with another configuration, or is corrupt."""


class TrainingInterrupted(Exception):
    """Training stopped because the caller asked it to (:meth:`mas_core.experiment.LoopHooks.stop_requested`,
    e.g. on Ctrl-C) after a finished batch. Not a :class:`MASCoreError`: nothing was wrong.

    ``method``: the label; ``completed_tasks``: the tasks the checkpoint ``checkpoint`` holds
    (``None``: no checkpoint folder, or no task finished yet: nothing is saved); ``task``: the
    0-based task in progress, abandoned and trained again from its start on resume (``None``
    when the stop came between two tasks)."""

    def __init__(self, method: str, completed_tasks: int, num_tasks: int, *, task: int | None = None,
                 checkpoint: str | None = None) -> None:
        self.method, self.completed_tasks, self.num_tasks = method, completed_tasks, num_tasks
        self.task, self.checkpoint = task, checkpoint
        if task is not None:
            where = f"during task {task + 1}/{num_tasks} (it is trained again from its start on resume)"
        else:
            where = f"after task {completed_tasks}/{num_tasks}" if completed_tasks else "before its first task"
        saved = (f"{checkpoint} holds tasks 1..{completed_tasks}" if checkpoint is not None and completed_tasks
                 else "no task was finished, nothing is saved")
        super().__init__(f"[{method}] interrupted {where}; {saved}")


class InvalidArgumentError(MASCoreError, ValueError):
    """An argument of an estimator or a regularizer has a value it does not accept."""


class MASStateError(MASCoreError, ValueError):
    """The model no longer matches the parameters a regularizer anchored (shape changed, parameter gone)."""


class UnknownOptionError(MASCoreError, TypeError):
    """An option that the chosen method does not take."""


class UnknownMethodError(MASCoreError, KeyError):
    """A continual-learning method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def edit_distance(a: str, b: str) -> int:
    """The optimal-string-alignment distance of ``a`` and ``b``: the fewest insertions,
    deletions, substitutions and swaps of two neighbouring characters turning one into the other."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], previous2[j - 2] + 1)
        previous2, previous = previous, row
    return previous[len(b)]


def _initials(name: str) -> str:
    """``"learning_rate"`` → ``"lr"`` (first letters of the parts between ``_``, ``-``, ``.``, spaces)."""
    return "".join(part[0] for part in re.split(r"[_\-.\s]+", name) if part)


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for left, right in zip(a, b):
        if left != right:
            break
        count += 1
    return count


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'lr'?"`` for the valid name closest to ``name`` (``""`` when there is none).

    The one place that phrases the hint every "unknown key / method / option" error carries.
    Candidates are compared case-insensitively and ranked, best first: the same name in
    another case; an abbreviation of the other (``lerning_rate`` → ``lr``: the initials of
    one are the other); a small edit distance (:func:`edit_distance` ≤ max(1, ⌊len/3⌋) of the
    longer name: typos, a missing or doubled letter, swapped letters); a shared prefix of at
    least two characters (longest first); else the most similar by :mod:`difflib`'s ratio.
    Ties within a rank go to the smaller edit distance, then the longer shared prefix.
    """
    candidates = list(dict.fromkeys(str(item) for item in valid))
    if not candidates:
        return ""
    wanted = str(name).lower()

    def rank(candidate: str) -> tuple:
        lower = candidate.lower()
        distance = edit_distance(wanted, lower)
        prefix = _common_prefix(wanted, lower)
        ratio = difflib.SequenceMatcher(None, wanted, lower).ratio()
        if lower == wanted:
            tier = 0
        elif len(lower) >= 2 and (_initials(wanted) == lower or _initials(lower) == wanted) and lower[0] == wanted[0]:
            tier = 1
        elif distance <= max(1, max(len(wanted), len(lower)) // 3):
            tier = 2
        elif prefix >= 2:
            tier = 3
        else:
            tier = 4
        if tier == 4:
            return (tier, -ratio, distance)
        return (tier, distance, -prefix, -ratio)

    best = min(candidates, key=rank)
    if rank(best)[0] == 4 and rank(best)[1] == 0:  # nothing in common at all
        return ""
    return f"; did you mean {best!r}?"
