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
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import CheckpointMismatchError, MASStateError, NonFiniteError, did_you_mean
from .base import Regularizer
from .common import check_lambda, detached_copies, zero_penalty

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
    """

    display_name = "quadratic"
    strength_name = "lam"
    importance_state_key = "importance"
    uniform_importance = False
    required_extra_keys: tuple[str, ...] = ()

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = check_lambda(self.strength_name, lam)
        self._importance: dict[str, Tensor] = {}  # what accumulates (Ω; for MAS "alpha": U)
        self._anchors: dict[str, Tensor] = {}
        self._gradient_scales: dict[str, Tensor] = {}  # 2 λ Ω per anchored name: the penalty's gradient scale

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
        if self.uniform_importance:
            self._gradient_scales = {}
            return
        scale = 2.0 * self.lam
        self._gradient_scales = {name: scale * value for name, value in self.importance.items()
                                 if name in self._anchors}

    # ------------------------------------------------------------------ penalty

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ Σ_k Ω_k (θ_k − θ*_k)²`` over the parameters anchored at the last ``after_task``
        (0 before the first one, and for λ = 0); differentiable once. ``inputs`` is ignored."""
        names: Iterable[str] = self._anchors if self.uniform_importance else self._gradient_scales
        if not names or self.lam == 0:
            return zero_penalty(model)
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
            current.append(parameter)
            anchors.append(anchor)
            if not self.uniform_importance:
                scale = self._gradient_scales[name]
                if scale.device != parameter.device or scale.dtype != parameter.dtype:
                    scale = self._gradient_scales[name] = scale.to(device=parameter.device, dtype=parameter.dtype)
                scales.append(scale)
        value = fused_quadratic_penalty(current, anchors, 2.0 * self.lam if self.uniform_importance else scales)
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(
                f"the {self.display_name} penalty is {value.detach().item()}; the parameters or Ω contain NaN/Inf "
                f"({self.describe_strength()}: a diverged run? lower {self.strength_name} or the learning rate)"
            )
        return value

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
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another method or layout version is refused
        with :class:`~mas_core.errors.CheckpointMismatchError`."""
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
        self.load_extra_state(state)
        self._importance = detached_copies(state[self.importance_state_key])
        self._anchors = detached_copies(state["anchors"])
        self._refresh_scales()
