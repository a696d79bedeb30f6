"""The shared base of the quadratic-anchor methods (MAS, l-MAS, EWC, SI, IMM's L2 transfer).

Each of them adds to the task loss (``docs/method.md`` §2)::

    penalty(θ) = λ Σ_k Ω_k (θ_k − θ*_k)²          gradient  2 λ Ω_k (θ_k − θ*_k)

with **no 1/2**. They differ only in how the importance Ω is obtained after a task (MAS:
output sensitivity; l-MAS: Hebbian co-activation; EWC: diagonal Fisher; SI: path
integral; IMM: Ω ≡ 1) and how it accumulates over tasks. :class:`QuadraticAnchorRegularizer`
holds everything else: Ω and the anchors θ* per parameter name, λ, the penalty, the checks,
and the ``state_dict`` of Ω and θ*. A subclass shows its estimate and its accumulation rule
in ``after_task`` and ends it with :meth:`~QuadraticAnchorRegularizer.consolidate`.

Rules every subclass inherits:

* parameters that did not exist at the last ``after_task`` (a new task head) are free: they
  have no anchor and no penalty;
* a regularized parameter whose shape changed, or that disappeared from the model, is an error
  (:class:`~mas_core.errors.MASStateError`);
* a NaN or Inf penalty raises :class:`~mas_core.errors.NonFiniteError` naming λ;
* stored tensors follow each parameter's device and dtype, moved once at the first
  :meth:`~QuadraticAnchorRegularizer.penalty` after a ``load_state_dict``.

The penalty is one fused computation over all parameters, :func:`fused_quadratic_penalty`:
a custom autograd function whose forward forms ``d = θ − θ*`` and ``g = 2λΩ·d`` with
multi-tensor (``torch._foreach_*``) kernels and returns ``½ Σ ⟨g, d⟩``, and whose backward
hands the saved ``g`` back as the gradient (first-order differentiable only).
``benchmarks/bench_penalty.py`` measures it against the per-tensor expression
``Σ (λΩ (θ − θ*)²).sum()``, a foreach version under plain autograd and a flattened one;
it is the fastest of them (its forward+backward 2.5–4× faster than the per-tensor loop on CPU).

Two options every quadratic-anchor method takes (``docs/method.md`` §13):

* ``penalty_step``: ``"proximal"`` (the default since issue 23: it cannot diverge) or
  ``"gradient"`` (the papers' form: the penalty is in the loss, its gradient goes through the
  optimizer; stable only while ``2ηλΩ < 2(1 + μ)``). With ``"proximal"`` the penalty contributes
  nothing to the loss; after every ``optimizer.step()`` the loop calls :meth:`~QuadraticAnchorRegularizer.after_optimizer_step`,
  which applies the exact minimiser of ``(1/2η)‖θ − v‖² + λ Σ Ω (θ − θ*)²`` (``v`` the parameters
  the optimizer produced, ``η`` the learning rate of the parameter's group at that step)::

      θ ← (θ + c θ*) / (1 + c) = θ + s (θ* − θ)          c = 2 η λ Ω,  s = c / (1 + c) ∈ [0, 1)

  one ``torch._foreach_lerp_`` kernel over the parameters (3 reads and 1 write per element: θ, θ*, s
  → θ), no autograd. ``s`` is cached per learning rate and recomputed when Ω or η changes. Every
  parameter ends between where the optimizer put it and θ*, whatever λ·η: the step cannot diverge.
  It is decoupled, as AdamW's weight decay: it enters neither the momentum buffer of SGD nor Adam's
  moments. Negative Ω entries (SI only) count as 0 in this step (the proximal step of a repelling
  quadratic is undefined for c ≤ −1).
* ``lam_scale``: ``"none"`` (λ as given) or ``"mean"``: the effective λ is ``λ / mean(Ω)``, the mean
  over every element of the accumulated Ω of the anchored parameters, recomputed whenever Ω changes,
  so that λ is relative to the importance's size (``λ = 1`` weighs the average parameter by 1 whatever
  the units of Ω). Saved in the state and checked on load.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import CheckpointMismatchError, InvalidArgumentError, MASStateError, NonFiniteError, did_you_mean
from .base import HYPERPARAMETERS_KEY, Regularizer
from .common import check_lambda, detached_copies, zero_penalty

PENALTY_STEPS = ("gradient", "proximal")
"""``penalty_step`` values: the penalty in the loss (the paper) or the closed-form step after the optimizer."""
LAM_SCALES = ("none", "mean")
"""``lam_scale`` values: λ as given, or λ / mean(Ω) over the anchored parameters' elements."""

STATE_VERSION = 1
"""Version of the ``state_dict`` layout. States written before the field existed (EWC, SI)
have the same layout and load as version 1."""


class _FusedQuadraticPenalty(torch.autograd.Function):
    """``½ Σ_i ⟨s_i (θ_i − a_i), θ_i − a_i⟩`` over lists of tensors, with ``s_i = 2 λ Ω_i`` (a list
    of tensors, or one number for all); gradient ``s_i (θ_i − a_i)`` (the product saved by the
    forward, returned as it is when the incoming gradient is 1, so the backward costs no extra
    pass over the parameters)."""

    @staticmethod
    def forward(ctx: Any, anchors: list[Tensor], gradient_scales: list[Tensor] | float, *parameters: Tensor) -> Tensor:
        differences = torch._foreach_sub(list(parameters), anchors)
        gradients = torch._foreach_mul(differences, gradient_scales)
        dots = [torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(gradients, differences)]
        del differences
        ctx.save_for_backward(*gradients)
        if all(dot.dtype == dots[0].dtype for dot in dots):
            return torch.stack(dots).sum() * 0.5
        return sum(dots[1:], dots[0]) * 0.5

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        gradients = list(ctx.saved_tensors)
        if not (grad_output.device.type == "cpu" and float(grad_output) == 1.0):
            gradients = torch._foreach_mul(gradients, grad_output)
        return (None, None, *gradients)


def fused_quadratic_penalty(parameters: list[Tensor], anchors: list[Tensor],
                            gradient_scales: list[Tensor] | float) -> Tensor:
    """``½ Σ_i ⟨s_i (θ_i − θ*_i), θ_i − θ*_i⟩``: with ``s_i = 2λΩ_i`` this is ``λ Σ_i Ω_i (θ_i − θ*_i)²``.

    ``parameters``, ``anchors`` and ``gradient_scales`` (or one number ``s`` for every tensor)
    are aligned lists on the same devices and dtypes. Differentiable once with respect to
    ``parameters``; the gradient is ``s_i (θ_i − θ*_i)``.
    """
    return _FusedQuadraticPenalty.apply(anchors, gradient_scales, *parameters)


def check_choice(option: str, value: Any, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of ``valid``; otherwise :class:`~mas_core.errors.InvalidArgumentError`
    naming ``option``, the nearest valid value and all of them."""
    if isinstance(value, str) and value in valid:
        return value
    hint = did_you_mean(value, valid) if isinstance(value, str) else ""
    raise InvalidArgumentError(f"{option} must be one of {', '.join(valid)}, got {value!r}{hint}")


class QuadraticAnchorRegularizer(Regularizer):
    """Base of the methods whose penalty is ``λ Σ_k Ω_k (θ_k − θ*_k)²``.

    Subclasses estimate Ω in ``after_task``, accumulate it, and call :meth:`consolidate`.
    Class attributes a subclass may set:

    - ``display_name``: the method's name in messages ("MAS", "EWC" …);
    - ``strength_name``: the option that holds λ (``"lam"``; IMM: ``"lam_l2"``);
    - ``importance_state_key``: the ``state_dict`` key of the stored Ω (kept as earlier
      releases wrote it: ``"accumulated"`` for MAS, ``"fisher"`` for EWC);
    - ``uniform_importance``: Ω ≡ 1 on every anchored parameter (IMM's L2 transfer), so no Ω
      is stored at all (the subclass sets ``_anchors`` itself);
    - ``required_extra_keys``: the keys :meth:`load_extra_state` reads.

    ``penalty_step`` (``"gradient"`` | ``"proximal"``) and ``lam_scale`` (``"none"`` | ``"mean"``)
    are described in the module docs.
    """

    display_name = "quadratic"
    strength_name = "lam"
    importance_state_key = "importance"
    uniform_importance = False
    required_extra_keys: tuple[str, ...] = ()
    unchecked_hyperparameters = ("output_fn", "loss_fn", "penalty_step")  # Ω and θ* mean the same under both steps

    def __init__(self, lam: float = 1.0, *, penalty_step: str = "proximal", lam_scale: str = "none") -> None:
        self.lam = check_lambda(self.strength_name, lam)
        self.penalty_step = check_choice("penalty_step", penalty_step, PENALTY_STEPS)
        self.lam_scale = check_choice("lam_scale", lam_scale, LAM_SCALES)
        self._importance: dict[str, Tensor] = {}  # what accumulates (Ω; for MAS "alpha": U)
        self._anchors: dict[str, Tensor] = {}
        self._gradient_scales: dict[str, Tensor] = {}  # 2 λ_eff Ω per anchored name: the penalty's gradient scale
        self._lam_divisor = 1.0  # mean Ω of the anchored elements when lam_scale == "mean"
        self._shrink_cache: tuple[float, dict[str, Tensor]] | None = None  # (η, s = c/(1+c) per name)

    importance_estimator = "uniform"
    """The label of the estimator that makes Ω (:meth:`importance_label`); subclasses name theirs."""

    def note_importance(self, estimator: str, samples: int | None) -> None:
        """Record how the last task's Ω was made (the estimator, the samples it read) for :meth:`describe`."""
        self._importance_note = {"estimator": estimator, "samples": samples}

    def accumulation_rule(self) -> str:
        """How Ω accumulates over tasks: ``"sum"`` here (MAS and EWC name their options)."""
        return "sum"

    def importance_label(self) -> dict[str, Any] | None:
        """``{"estimator", "samples", "accumulation"}`` (:meth:`Regularizer.describe`): the last
        :meth:`note_importance`, else the class's :attr:`importance_estimator` with ``samples`` None."""
        note = getattr(self, "_importance_note", None) or {"estimator": self.importance_estimator, "samples": None}
        return {**note, "accumulation": self.accumulation_rule()}

    @property
    def uses_optimizer_step_hook(self) -> bool:  # type: ignore[override]
        """True with ``penalty_step="proximal"``: the loop must call :meth:`after_optimizer_step`."""
        return self.penalty_step == "proximal"

    @property
    def effective_lam(self) -> float:
        """The λ the penalty applies: ``λ`` (``lam_scale="none"``) or ``λ / mean(Ω)`` (``"mean"``)."""
        return self.lam / self._lam_divisor

    def describe_strength(self) -> str:
        """``"lam=5"``, with ``" / mean Ω (effective 2.3e+03)"`` under ``lam_scale="mean"``."""
        text = super().describe_strength()
        if self.lam_scale == "mean":
            text += f" / mean Ω (effective {self.effective_lam:.3g})"
        return text

    def _strength_changed(self) -> None:
        """λ changed (:meth:`set_strength`): recompute the cached ``2 λ_eff Ω``."""
        self._refresh_scales()

    # ------------------------------------------------------------------ what the method declares

    @property
    def strength(self) -> dict[str, float]:
        """``{strength_name: λ}``, e.g. ``{"lam": 5.0}``."""
        return {self.strength_name: float(self.lam)}

    @property
    def importance(self) -> dict[str, Tensor]:
        """The effective accumulated Ω per parameter name (without λ)."""
        return dict(self._importance)

    @property
    def anchors(self) -> dict[str, Tensor]:
        """θ*: the parameters at the end of the last task, per name (detached copies)."""
        return dict(self._anchors)

    # ------------------------------------------------------------------ after a task

    def check_shapes(self, new: dict[str, Tensor]) -> None:
        """Refuse to accumulate a task's Ω onto a stored Ω of another shape (a rebuilt layer)."""
        for name, value in new.items():
            previous = self._importance.get(name)
            if previous is not None and previous.shape != value.shape:
                raise MASStateError(
                    f"parameter {name!r} changed shape from {tuple(previous.shape)} to {tuple(value.shape)} "
                    f"since the last task; {self.display_name} cannot carry its importance over "
                    "(give the new layer another name)"
                )

    def check_task_importance(self, model: nn.Module, importance: dict[str, Tensor]) -> None:
        """Refuse a task's Ω given from outside that does not fit ``model``: a name that is not one
        of its parameters, another shape, not a tensor, or NaN/Inf."""
        parameters = dict(model.named_parameters())
        for name, value in importance.items():
            parameter = parameters.get(name)
            if parameter is None:
                raise MASStateError(
                    f"the importance names parameter {name!r}, which the model does not have"
                    f"{did_you_mean(name, parameters)}"
                )
            if not isinstance(value, Tensor) or value.shape != parameter.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise MASStateError(
                    f"the importance of parameter {name!r} has shape {shape}, the parameter {tuple(parameter.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteError(f"the importance of parameter {name!r} contains NaN or Inf")

    def consolidate(self, model: nn.Module, importance: dict[str, Tensor]) -> None:
        """Store the accumulated ``importance`` and anchor θ* at the model's current parameters,
        for every name that has an importance and is still in the model."""
        self._importance = importance
        parameters = dict(model.named_parameters())
        for name in self._importance:
            if name in parameters:
                self._anchors[name] = parameters[name].detach().clone()
        self._refresh_scales()

    def _refresh_scales(self) -> None:
        """Recompute ``2 λ_eff Ω`` (and, for ``lam_scale="mean"``, mean(Ω)) after Ω or θ* changed."""
        self._shrink_cache = None
        if self.uniform_importance:
            self._gradient_scales = {}
            self._lam_divisor = 1.0
            return
        anchored = {name: value for name, value in self.importance.items() if name in self._anchors}
        self._lam_divisor = 1.0
        if self.lam_scale == "mean" and anchored:
            count = sum(value.numel() for value in anchored.values())
            mean = math.fsum(float(value.double().sum()) for value in anchored.values()) / max(count, 1)
            if not (math.isfinite(mean) and mean > 0.0):
                raise NonFiniteError(
                    f"lam_scale='mean' needs a positive finite mean importance, but the mean of {self.display_name}'s "
                    f"Ω over {count} anchored elements is {mean}; use lam_scale='none'"
                )
            self._lam_divisor = mean
        scale = 2.0 * self.effective_lam
        self._gradient_scales = {name: scale * value for name, value in anchored.items()}

    # ------------------------------------------------------------------ penalty

    def _aligned(self, model: nn.Module) -> tuple[list[str], list[Tensor], list[Tensor], list[Tensor]]:
        """``(names, θ, θ*, 2λ_eff Ω)`` aligned over the anchored parameters (the scales list is empty
        for a uniform Ω); stored tensors are moved once to each parameter's device and dtype."""
        names: list[str] = list(self._anchors if self.uniform_importance else self._gradient_scales)
        parameters = dict(model.named_parameters())
        current, anchors, scales = [], [], []
        for name in names:
            parameter = parameters.get(name)
            if parameter is None:
                raise MASStateError(
                    f"{self.display_name} regularizes parameter {name!r} but the model has no such parameter; "
                    "pass the same model (names) that after_task saw"
                )
            anchor = self._anchors[name]
            if parameter.shape != anchor.shape:
                raise MASStateError(
                    f"parameter {name!r} has shape {tuple(parameter.shape)} but {self.display_name} anchored it "
                    f"with shape {tuple(anchor.shape)}; a changed layer cannot keep its importance"
                )
            if anchor.device != parameter.device or anchor.dtype != parameter.dtype:
                anchor = self._anchors[name] = anchor.to(device=parameter.device, dtype=parameter.dtype)
                self._shrink_cache = None
            current.append(parameter)
            anchors.append(anchor)
            if not self.uniform_importance:
                scale = self._gradient_scales[name]
                if scale.device != parameter.device or scale.dtype != parameter.dtype:
                    scale = self._gradient_scales[name] = scale.to(device=parameter.device, dtype=parameter.dtype)
                    self._shrink_cache = None
                scales.append(scale)
        return names, current, anchors, scales

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ_eff Σ_k Ω_k (θ_k − θ*_k)²`` over the parameters anchored at the last ``after_task``
        (0 before the first one, for λ = 0, and with ``penalty_step="proximal"``, whose penalty is
        applied by :meth:`after_optimizer_step` instead); differentiable once. ``inputs`` is ignored."""
        if self.penalty_step == "proximal" or self.lam == 0:
            return zero_penalty(model)
        names, current, anchors, scales = self._aligned(model)
        if not names:
            return zero_penalty(model)
        value = fused_quadratic_penalty(current, anchors, 2.0 * self.lam if self.uniform_importance else scales)
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(
                f"the {self.display_name} penalty is {value.detach().item()}; the parameters or Ω contain NaN/Inf "
                f"({self.describe_strength()}: a diverged run? lower {self.strength_name} or the learning rate)"
            )
        return value

    def after_optimizer_step(self, model: nn.Module, optimizer: Any) -> None:
        """The proximal penalty step (``penalty_step="proximal"``; a no-op otherwise), right after
        ``optimizer.step()``: for every anchored parameter that some param group of ``optimizer``
        holds, with that group's current learning rate ``η``::

            θ ← (θ + c θ*) / (1 + c) = θ + s (θ* − θ)         c = 2 η λ_eff max(Ω, 0),  s = c / (1 + c)

        the minimiser of ``(1/2η)‖θ − v‖² + λ_eff Σ Ω (θ − θ*)²`` over θ given the optimizer's output
        ``v``. In place, without autograd, one ``torch._foreach_lerp_`` per learning rate; ``s`` is cached
        until Ω, θ* or η change. Decoupled: the optimizer's state (momentum, Adam's moments) never
        sees the penalty."""
        if self.penalty_step != "proximal" or self.lam == 0:
            return
        names, current, anchors, scales = self._aligned(model)
        if not names:
            return
        learning_rates = {id(parameter): float(group["lr"]) for group in optimizer.param_groups
                          for parameter in group["params"]}
        by_rate: dict[float, list[int]] = {}
        for index, parameter in enumerate(current):
            rate = learning_rates.get(id(parameter))
            if rate is not None and rate > 0:
                by_rate.setdefault(rate, []).append(index)
        with torch.no_grad():
            for rate, indices in by_rate.items():
                targets = [current[i] for i in indices]
                ends = [anchors[i] for i in indices]
                if self.uniform_importance:
                    c = 2.0 * rate * self.effective_lam
                    torch._foreach_lerp_(targets, ends, c / (1.0 + c))
                else:
                    shrink = self._shrink_factors(rate, names, scales)
                    torch._foreach_lerp_(targets, ends, [shrink[names[i]] for i in indices])

    def _shrink_factors(self, rate: float, names: list[str], scales: list[Tensor]) -> dict[str, Tensor]:
        """``s = c / (1 + c)`` with ``c = η · max(2 λ_eff Ω, 0)`` per anchored name, cached for the
        last learning rate ``η`` (one schedule step costs one recomputation)."""
        if self._shrink_cache is not None and self._shrink_cache[0] == rate:
            return self._shrink_cache[1]
        with torch.no_grad():
            shrink = {}
            for name, scale in zip(names, scales):
                c = scale.clamp(min=0.0) * rate
                shrink[name] = c / (1.0 + c)
        self._shrink_cache = (rate, shrink)
        return shrink

    # ------------------------------------------------------------------ checkpointing

    def extra_state(self) -> dict[str, Any]:
        """The subclass's own state beside Ω and θ* (tensors and plain values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (``state`` is the whole dict; its keys
        ``required_extra_keys`` are known to be present)."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            self.importance_state_key: {name: value.clone() for name, value in self._importance.items()},
            "anchors": {name: value.clone() for name, value in self._anchors.items()},
            "penalty_step": self.penalty_step,
            "lam_scale": self.lam_scale,
            HYPERPARAMETERS_KEY: self.hyperparameters(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another method, layout version, ``lam_scale`` or
        other hyperparameters (λ, ``mode``, ``accumulate``, ``ema_alpha``, ``damping``, ``gamma`` …:
        :meth:`~mas_core.regularizers.base.Regularizer.check_hyperparameters`) is refused with
        :class:`~mas_core.errors.CheckpointMismatchError` (``penalty_step`` is saved for the record;
        Ω and θ* mean the same under both steps, so it may differ)."""
        required = (self.importance_state_key, "anchors", *self.required_extra_keys)
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointMismatchError(
                f"not a {self.display_name} state: missing {missing}; was it written by another method?"
            )
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise CheckpointMismatchError(
                f"{self.display_name} state version {version} is not {STATE_VERSION}, the version this release reads"
            )
        saved_scale = state.get("lam_scale", "none")  # states written before the option: λ as given
        if saved_scale != self.lam_scale:
            raise CheckpointMismatchError(
                f"the {self.display_name} state was written with lam_scale={saved_scale!r} but this regularizer "
                f"uses {self.lam_scale!r}; λ would mean another strength: build it with the checkpoint's setting"
            )
        self.check_hyperparameters(state)
        self.load_extra_state(state)
        self._importance = detached_copies(state[self.importance_state_key])
        self._anchors = detached_copies(state["anchors"])
        self._refresh_scales()
