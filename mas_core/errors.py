"""Exception types of :mod:`mas_core`.

Every error raised for bad input derives from :class:`MASCoreError`, so a caller
(the ``mas-triplets`` CLI, a notebook) can catch one type and print its message.
Messages say what was wrong *and* what to do about it.
"""
from __future__ import annotations

import difflib
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


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'lr'?"`` for the valid name closest to ``name`` (``""`` when none is close).

    The one place that phrases the hint every "unknown key / method / option" error carries.
    """
    candidates = [str(item) for item in valid]
    close = difflib.get_close_matches(str(name), candidates, n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}?" if close else ""
