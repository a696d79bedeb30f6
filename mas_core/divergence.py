"""When a task's training counts as diverged, and the one-line errors that say so.

The loop (:func:`mas_core.loop.train_task_epochs`) stops a task with a
:class:`~mas_core.errors.DivergenceError` when

1. a step's loss or penalty is NaN or Inf, or a weight holds NaN/Inf after an epoch;
2. **the loss collapsed at a finite value** (:class:`CollapseCheck`): with ``L̄_e`` the mean
   global-batch loss of epoch ``e`` (counted from 1) of the task,

       L̄_e > k · L̄_1          for some e ≥ 2,     k = COLLAPSE_FACTOR = 100

   (checked only when ``L̄_1 > 0``; a task of one epoch is checked for NaN/Inf only);
3. the method's ``after_task`` raises :class:`~mas_core.errors.NonFiniteError` on the trained model
   (e.g. MAS's importance of a model whose outputs exploded; the loop converts it);
4. with a search, the task's real training ended below the bar its strength passed, on the search's
   own validation samples (:meth:`mas_core.hparam_search.SearchSettings.real_run_collapsed`): a
   collapse at a bounded loss.

All four are the same event for the hyperparameter search's back-off (``docs/method.md`` §14).
Why ``k = 100`` (``docs/method.md`` §14.1): in the 215 runs of ``benchmarks/loss_collapse_survey.py``
that finished with a working model (split digits; an MLP and a small CNN with BatchNorm; MAS, EWC, SI,
IMM; both penalty steps; λ from 1e-3 to 1e4; two learning rates; ``docs/loss_collapse_survey*.jsonl``)
no epoch's mean loss was above 5.5× its task's first epoch's (the MLP's at most 1.38); the one run
that ended finite at chance there (MAS, gradient step, λ 1000, lr 0.01, MLP: 48.6 % on 2-way tasks)
reached 1.3e22×, and the collapses the tables recorded ended at 8e17 (MAS, batch estimator, synth4)
and 6e15 (EWC, the real-image world's semantic split) on a loss of order 1. Any ``k`` from about 6 to
1e14 separates the two; 100 keeps an 18-fold margin above the highest healthy ratio and stops a
collapse long before float32's range.
"""
from __future__ import annotations

from typing import Any

from .errors import DivergenceError
from .experiment import OptimSettings
from .regularizers.base import Regularizer, describe_strength_values

COLLAPSE_FACTOR = 100.0
"""``k``: an epoch whose mean loss is above ``k`` times the task's first epoch's has collapsed."""


class CollapseCheck:
    """The finite-collapse rule of the module docs for one task's training: feed it each epoch's mean
    loss in order; :meth:`end_of_epoch` returns what to say when the rule fires, else ``None``."""

    def __init__(self, factor: float | None = None) -> None:
        self.factor = float(COLLAPSE_FACTOR if factor is None else factor)
        self.first: float | None = None
        self.epoch = 0

    def end_of_epoch(self, mean_loss: float) -> str | None:
        """``None``, or ``"the mean loss of epoch e, L̄_e, is above k× the first epoch's L̄_1 (...)"``."""
        self.epoch += 1
        if self.first is None:
            self.first = float(mean_loss)
            return None
        if self.first > 0 and mean_loss > self.factor * self.first:
            return (f"the mean loss of epoch {self.epoch}, {mean_loss:.3g}, is above {self.factor:g}× the first "
                    f"epoch's {self.first:.3g}: a collapse at a finite loss")
        return None


def divergence(reg: Regularizer, optim: OptimSettings, label: str, task: int, name: str, epoch: int | None,
               step: int | None, what: str) -> DivergenceError:
    """The one-line :class:`~mas_core.errors.DivergenceError` of a task: where (method, task, epoch
    and step when known), what happened, and what to lower (the learning rate, the strength)."""
    where = f"method {label}, task {task + 1} ({name})" + (f", epoch {epoch + 1}" if epoch is not None else "") + (
        f", step {step}" if step is not None else "")
    strength = ", ".join(f"{key}={value}" for key, value in reg.strength.items())
    advice = f"lower the learning rate (optim.lr, now {optim.lr})"
    if strength:
        advice += f" or the method's strength ({strength})"
    return DivergenceError(f"training diverged at {where}: {what}; {advice}")


def searched_divergence(exc: DivergenceError, chosen: dict[str, Any]) -> DivergenceError:
    """The divergence of a task whose lr and strength the search chose, with no back-off left."""
    backoff = chosen.get("backoff") or []
    history = "" if not backoff else (f"; backed off {len(backoff)} time(s) from "
                                      f"{describe_strength_values(backoff[0]['strength'])}, down to the search's floor")
    return DivergenceError(
        f"{exc} (both were chosen by the hyperparameter search on a validation split of this task: "
        f"lr={chosen['lr']}, strength {chosen['strength'] or 'none'}{history}; lower search.start or the top of "
        "search.lr_grid, or use a smaller search.tolerance)")


__all__ = ["COLLAPSE_FACTOR", "CollapseCheck", "divergence", "searched_divergence"]
