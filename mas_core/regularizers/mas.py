"""Memory Aware Synapses (Aljundi et al., ECCV 2018) and its local variant l-MAS.

Penalty (``docs/method.md`` §2; no 1/2, gradient ``2 λ Ω (θ − θ*)``), inherited from
:class:`~mas_core.regularizers.quadratic.QuadraticAnchorRegularizer`::

    penalty(θ) = λ Σ_k Ω_k (θ_k − θ*_k)²

After each task Ω_new is estimated on whatever data the loop hands over (training data,
unlabelled data, a mix; labels are never read) — ``docs/method.md`` §1:

* ``mode="exact"``: ``Ω_new = (1/N) Σ_n |∂‖F(x_n)‖₂²/∂θ|`` per sample (:func:`~mas_core.importance.mas_importance`);
* ``mode="batch"``: the original code's ``|∂ Σ_{n∈batch} ‖F(x_n)‖₂²/∂θ|`` per batch, for comparison;
* ``mode="hebbian"`` (l-MAS, :class:`LocalMAS`): ``Ω_new[W]_ij = (2/N) Σ_n |y_i x_j|``
  (:func:`~mas_core.importance.hebbian_importance`);

or taken from an :class:`~mas_core.importance.OnlineImportance` that accumulated it from the
inputs a deployed model answered (§12; ``after_task(model, accumulator)``), or given directly
(:meth:`MAS.add_task_importance`, e.g. a :func:`~mas_core.importance.mix_importance` of both),
then accumulated (``docs/method.md`` §3) with ``accumulate``:

* ``"sum"`` (paper and original code; default): ``Ω ← Ω + Ω_new``;
* ``"ema"`` (Avalanche, FACIL): ``Ω ← α Ω + (1 − α) Ω_new``, ``α = ema_alpha``, starting from
  ``Ω = 0`` as they do, so after ``T`` tasks ``Ω = Σ_t (1 − α) α^{T−t} Ω_t`` (α = 0.5, 3 tasks:
  weights 0.125, 0.25, 0.5); a parameter absent from one side counts as 0 there;
* ``"alpha"`` (equal task mass): keep ``U = Σ_t Ω_t / S_t`` and ``Z = Σ_t 1/S_t`` with
  ``S_t = Σ Ω_t``; the effective Ω is ``U / Z``, so task ``t`` weighs ``α_t = λ (1/S_t)/Z``
  in the penalty and the weights sum to λ.

θ* are the parameters at the end of the last task. New heads are free; see the base class
for the checks, the fused penalty and the state layout. ``anchor="start"`` (MAS anchored at the
pretrained weights) adds a task 0 before the first: Ω₀ of the pretrained network's own output at
its weights θ₀, and θ* = θ₀ (:meth:`MAS.anchor_at_start`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import CheckpointMismatchError, InvalidArgumentError, MASStateError, NonFiniteError
from ..importance import OnlineImportance, OutputFn, hebbian_importance, mas_importance
from .common import check_max_samples, counting_samples
from .quadratic import QuadraticAnchorRegularizer, check_choice

IMPORTANCE_MODES = ("exact", "batch", "hebbian")
ACCUMULATIONS = ("sum", "ema", "alpha")
ANCHORS = ("none", "start")
"""``anchor`` values: no anchor before task 1, or Ω₀ and θ* at the starting (pretrained) weights."""

__all__ = ["ACCUMULATIONS", "ANCHORS", "IMPORTANCE_MODES", "MAS", "LocalMAS", "MASStateError"]


class MAS(QuadraticAnchorRegularizer):
    """MAS regularizer: ``penalty = λ Σ Ω (θ − θ*)²`` with Ω accumulated over tasks.

    Args:
        lam: λ ≥ 0, the penalty weight (1 in the paper's recognition experiments, 5 in
            the fact-learning code).
        mode: ``"exact"`` (per-sample MAS, default), ``"batch"`` (the original code's
            batch-level estimator, for comparison) or ``"hebbian"`` (l-MAS).
        accumulate: ``"sum"`` (default), ``"ema"`` or ``"alpha"`` (see the module docs).
        ema_alpha: α of ``"ema"``, the weight of the previous Ω, in [0, 1) (0.5 in Avalanche and FACIL).
        output_fn: ``output_fn(model, batch) -> Tensor`` giving F (e.g. the current task's
            head, or the embedding before L2 normalisation); default ``model(input)``.
        max_samples: use at most this many samples to estimate Ω after each task.
        penalty_step: ``"proximal"`` (default: the closed-form step after each optimizer step, which
            cannot diverge) or ``"gradient"`` (the penalty in the loss: the paper's form; ``docs/method.md`` §13).
        lam_scale: ``"none"`` (λ as given) or ``"mean"`` (λ / mean Ω; ``docs/method.md`` §13).
        anchor: ``"none"`` (default) or ``"start"``: MAS anchored at the pretrained weights θ₀.
            Before task 1 the loop hands :meth:`anchor_at_start` the first task's inputs (no
            labels) and the experiment's pretrained output F₀; Ω₀ = (1/N) Σ_k |∂‖F₀(x_k)‖²/∂θ|
            at θ₀ (this ``mode``'s estimator) is accumulated as a task 0 and θ* = θ₀, so the
            penalty λ Σ Ω₀ (θ − θ₀)² already holds while task 1 trains and Ω₀ stays in the sum.
    """

    name = "mas"
    display_name = "MAS"
    after_task_data = "inputs"
    importance_from_inputs = True
    importance_state_key = "accumulated"  # Ω ("sum", "ema") or U ("alpha")
    required_extra_keys = ("accumulate", "tasks_seen", "inverse_mass_sum")

    def __init__(self, lam: float = 1.0, *, mode: str = "exact", accumulate: str = "sum", ema_alpha: float = 0.5,
                 output_fn: OutputFn | None = None, max_samples: int | None = None,
                 penalty_step: str = "proximal", lam_scale: str = "none", anchor: str = "none") -> None:
        super().__init__(lam, penalty_step=penalty_step, lam_scale=lam_scale)
        self.anchor = check_choice("anchor", anchor, ANCHORS)
        self.anchors_at_start = self.anchor == "start"
        if mode not in IMPORTANCE_MODES:
            raise InvalidArgumentError(f"mode must be one of {IMPORTANCE_MODES}, got {mode!r}")
        if accumulate not in ACCUMULATIONS:
            raise InvalidArgumentError(f"accumulate must be one of {ACCUMULATIONS}, got {accumulate!r}")
        if isinstance(ema_alpha, bool) or not isinstance(ema_alpha, (int, float)) or not 0.0 <= ema_alpha <= 1.0:
            raise InvalidArgumentError(f"ema_alpha must be a number in [0, 1], got {ema_alpha!r}")
        if accumulate == "ema" and ema_alpha == 1:
            raise InvalidArgumentError(
                "ema_alpha=1 with accumulate='ema' keeps Ω at 0 (the average starts from 0); use a value in [0, 1)"
            )
        self.mode = mode
        self.accumulate = accumulate
        self.ema_alpha = float(ema_alpha)
        self.output_fn = output_fn
        self.max_samples = check_max_samples(max_samples)
        self.tasks_seen = 0
        self._inverse_mass_sum = 0.0  # Z of "alpha"

    def estimate(self, model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
        """Ω_new of ``model`` on ``data`` with this regularizer's ``mode``, without storing it."""
        if self.mode == "hebbian":
            return hebbian_importance(model, data, output_fn=self.output_fn, max_samples=self.max_samples)
        return mas_importance(model, data, output_fn=self.output_fn, mode=self.mode, max_samples=self.max_samples)

    def anchor_at_start(self, model: nn.Module, data: Iterable[Any], output_fn: OutputFn) -> None:
        """Ω₀ of ``output_fn`` (the pretrained network's own output F₀) at the current weights θ₀
        on ``data`` (this ``mode``'s estimator, ``max_samples`` of them), accumulated as a task
        of its own, and θ* = θ₀ (see ``anchor`` in the class docs). Parameters F₀ does not reach
        (a new projection layer) get Ω₀ = 0: free while task 1 trains."""
        if self.tasks_seen:
            raise MASStateError(f"{self.display_name} already holds the importance of {self.tasks_seen} task(s): "
                                "anchor_at_start comes before the first task")
        if self.mode == "hebbian":
            start = hebbian_importance(model, data, output_fn=output_fn, max_samples=self.max_samples)
        else:
            start = mas_importance(model, data, output_fn=output_fn, mode=self.mode, max_samples=self.max_samples)
        self.add_task_importance(model, start)

    def after_task(self, model: nn.Module, data: Iterable[Any] | OnlineImportance) -> None:
        """Estimate Ω_new on ``data``, accumulate it, and anchor θ* = the current parameters.

        ``data`` may also be an :class:`~mas_core.importance.OnlineImportance` that has
        accumulated Ω_new from a stream (the inputs the deployed model answered,
        ``docs/method.md`` §12): its Ω is used as it is (this regularizer's ``max_samples``
        does not apply; the accumulator has its own)."""
        if isinstance(data, OnlineImportance):
            new = self.importance_from_accumulator(model, data)
            self.note_importance("online", data.count)
        else:
            data, used = counting_samples(data, self.max_samples)
            new = self.estimate(model, data)
            self.note_importance(self.mode, used())
        self.add_task_importance(model, new)

    def accumulation_rule(self) -> str:
        """``"sum"``, ``"average (ema α=…)"`` or ``"consistency"`` (``accumulate="alpha"``, §3)."""
        return {"sum": "sum", "ema": f"average (ema α={self.ema_alpha:g})", "alpha": "consistency"}[self.accumulate]

    def importance_from_accumulator(self, model: nn.Module, accumulator: OnlineImportance) -> dict[str, Tensor]:
        """Ω_new of an :class:`~mas_core.importance.OnlineImportance`, checked against this
        regularizer (its estimator must be this ``mode``'s) and the model (the same θ)."""
        if self.mode == "batch":
            raise InvalidArgumentError(
                "MAS(mode='batch') cannot take an online accumulator: the batch estimate depends on the batch "
                "boundaries; use mode='exact'"
            )
        expected = "hebbian" if self.mode == "hebbian" else "mas"
        if accumulator.estimator != expected:
            raise InvalidArgumentError(
                f"{self.display_name} (mode={self.mode!r}) needs an accumulator with estimator={expected!r}, "
                f"got {accumulator.estimator!r}"
            )
        accumulator.check_model(model)
        return accumulator.importance()

    def add_task_importance(self, model: nn.Module, task_importance: dict[str, Tensor]) -> None:
        """Accumulate a given Ω_new of the task that just ended with this regularizer's rule
        (``accumulate``: sum, ema or alpha; ``docs/method.md`` §3) and anchor θ* = the current
        parameters: what :meth:`after_task` does once it has estimated Ω_new.

        ``task_importance`` maps parameter names of ``model`` to tensors of their shapes, finite
        and ≥ 0 (e.g. an :class:`~mas_core.importance.OnlineImportance`'s Ω, or
        :func:`~mas_core.importance.mix_importance` of a training-data and a query Ω); a subset
        of the parameters is allowed (the others count as 0 for this task)."""
        new = {name: value.detach() for name, value in task_importance.items()}
        self.check_task_importance(model, new)
        for name, value in new.items():
            if bool((value < 0).any()):
                raise InvalidArgumentError(
                    f"{self.display_name} importance must be ≥ 0, but parameter {name!r} has a negative value"
                )
        self.check_shapes(new)
        stored = self._importance
        if self.accumulate == "sum":  # Ω ← Ω + Ω_new
            merged = dict(stored)
            for name, value in new.items():
                previous = stored.get(name)
                merged[name] = value.clone() if previous is None else previous.to(value) + value
        elif self.accumulate == "ema":  # Ω ← α Ω + (1 − α) Ω_new, from Ω = 0 (Avalanche, FACIL)
            alpha = self.ema_alpha
            merged = {name: previous * alpha for name, previous in stored.items()}
            for name, value in new.items():
                previous = merged.get(name)
                merged[name] = (1 - alpha) * value if previous is None else previous.to(value) + (1 - alpha) * value
        else:  # "alpha": U ← U + Ω_new / S_new,  Z ← Z + 1 / S_new
            mass = math.fsum(float(value.double().sum()) for value in new.values())
            if not math.isfinite(mass) or mass <= 0.0:
                raise NonFiniteError(
                    f"the task's total importance mass is {mass}; accumulate='alpha' needs a positive finite "
                    "mass (does the output depend on the parameters?)"
                )
            merged = dict(stored)
            for name, value in new.items():
                previous = stored.get(name)
                scaled = value / mass
                merged[name] = scaled if previous is None else previous.to(value) + scaled
            self._inverse_mass_sum += 1.0 / mass
        self.tasks_seen += 1
        self.consolidate(model, merged)

    def replace_last_task_importance(self, model: nn.Module, last_task_importance: dict[str, Tensor] | None,
                                     task_importance: dict[str, Tensor]) -> None:
        """Replace the last task's contribution to the accumulated Ω by ``task_importance`` and
        re-anchor θ* at ``model``'s parameters (those at the end of that task; ``docs/method.md`` §12).

        ``last_task_importance`` is the Ω_t that :meth:`after_task` accumulated for the last task
        (e.g. estimated again on the same data at the same θ); it may be ``None`` when only one
        task has been seen. With Ω_t' = ``task_importance``::

            sum:    Ω ← Ω − Ω_t + Ω_t'
            ema:    Ω ← Ω − (1 − α) Ω_t + (1 − α) Ω_t'             (first task: Ω ← Ω_t')
            alpha:  U ← U − Ω_t / S_t + Ω_t' / S_t',  Z ← Z − 1/S_t + 1/S_t'

        After the first task the result is exactly what :meth:`after_task` with Ω_t' would have
        given. Later, the earlier tasks' part ``Ω − contribution(Ω_t)`` is formed in float64 and
        clamped at 0: it carries the rounding of the stored sum (half a unit in the last place
        of Ω's dtype). Raises :class:`~mas_core.errors.MASStateError` before any task, or when
        ``last_task_importance`` exceeds what was accumulated by more than rounding (it is not the
        Ω that was accumulated: other data, another θ)."""
        if self.tasks_seen == 0:
            raise MASStateError(f"{self.display_name} has no task's importance to replace yet; call after_task first")
        new = {name: value.detach() for name, value in task_importance.items()}
        self.check_task_importance(model, new)
        if self.tasks_seen == 1:
            previous: dict[str, Tensor] = {}
            inverse_mass_sum = 0.0
        else:
            if last_task_importance is None:
                raise MASStateError(
                    f"{self.display_name} has accumulated {self.tasks_seen} tasks; replacing the last one needs its "
                    "own importance (last_task_importance)"
                )
            last = {name: value.detach() for name, value in last_task_importance.items()}
            self.check_task_importance(model, last)
            previous, inverse_mass_sum = self._without_last_task(last)
        saved = (self._importance, self.tasks_seen, self._inverse_mass_sum)
        self._importance, self.tasks_seen, self._inverse_mass_sum = previous, self.tasks_seen - 1, inverse_mass_sum
        try:
            self.add_task_importance(model, new)
        except BaseException:
            self._importance, self.tasks_seen, self._inverse_mass_sum = saved
            raise

    def _without_last_task(self, last: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """The stored state (Ω or U, and Z) before the last task's ``last`` was accumulated (≥ 2 tasks seen)."""
        if self.accumulate == "alpha":
            mass = math.fsum(float(value.double().sum()) for value in last.values())
            if not math.isfinite(mass) or mass <= 0.0:
                raise NonFiniteError(f"the last task's importance mass is {mass}; it cannot have been accumulated")
            share, inverse_mass_sum = 1.0 / mass, self._inverse_mass_sum - 1.0 / mass
        else:
            share, inverse_mass_sum = (1.0 if self.accumulate == "sum" else 1.0 - self.ema_alpha), 0.0
        divisor = self.ema_alpha if self.accumulate == "ema" else 1.0
        previous: dict[str, Tensor] = {}
        for name, stored in self._importance.items():
            value = stored.double()
            if name in last:
                contribution = last[name].double().to(value.device) * share
                rest = value - contribution
                tolerance = 1e-4 * float(torch.maximum(value.abs(), contribution.abs()).max()) if value.numel() else 0.0
                if bool((rest < -tolerance).any()):
                    raise MASStateError(
                        f"the last task's importance of parameter {name!r} exceeds what {self.display_name} "
                        "accumulated; it is not the Ω after_task used (other importance data, or another θ?)"
                    )
                value = rest.clamp(min=0.0)
            previous[name] = (value / divisor if divisor > 0 else torch.zeros_like(value)).to(stored.dtype)
        return previous, inverse_mass_sum

    @property
    def importance(self) -> dict[str, Tensor]:
        """The effective accumulated Ω per parameter name (for ``"alpha"``: U/Z, without λ)."""
        if self.accumulate == "alpha" and self._importance:
            return {name: value / self._inverse_mass_sum for name, value in self._importance.items()}
        return dict(self._importance)

    def extra_state(self) -> dict[str, Any]:
        return {"lam": self.lam, "mode": self.mode, "accumulate": self.accumulate, "ema_alpha": self.ema_alpha,
                "tasks_seen": self.tasks_seen, "inverse_mass_sum": self._inverse_mass_sum}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """The stored ``accumulate`` must match (it defines what the stored tensors mean); λ, mode
        and α were checked against the constructor's by ``check_hyperparameters``."""
        if state["accumulate"] != self.accumulate:
            raise CheckpointMismatchError(
                f"the MAS state was accumulated with accumulate={state['accumulate']!r} but this regularizer "
                f"uses {self.accumulate!r}; build MAS with the checkpoint's setting"
            )
        self.tasks_seen = int(state["tasks_seen"])
        self._inverse_mass_sum = float(state["inverse_mass_sum"])

    def __repr__(self) -> str:
        return (
            f"MAS(lam={self.lam}, mode={self.mode!r}, accumulate={self.accumulate!r}, "
            f"ema_alpha={self.ema_alpha}, max_samples={self.max_samples}, penalty_step={self.penalty_step!r}, "
            f"lam_scale={self.lam_scale!r}, anchor={self.anchor!r}, tasks_seen={self.tasks_seen})"
        )


class LocalMAS(MAS):
    """l-MAS: :class:`MAS` with the local Hebbian importance (``mode="hebbian"``, fixed)."""

    name = "lmas"
    display_name = "l-MAS"

    def __init__(self, lam: float = 1.0, *, accumulate: str = "sum", ema_alpha: float = 0.5,
                 output_fn: OutputFn | None = None, max_samples: int | None = None,
                 penalty_step: str = "proximal", lam_scale: str = "none", anchor: str = "none") -> None:
        super().__init__(lam, mode="hebbian", accumulate=accumulate, ema_alpha=ema_alpha,
                         output_fn=output_fn, max_samples=max_samples, penalty_step=penalty_step,
                         lam_scale=lam_scale, anchor=anchor)
