"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

During task ``t`` every optimizer step ``s`` adds to the path integral

    ω_i += −g_i^s · Δθ_i^s

where ``g^s`` is the gradient of the **task loss alone** at ``θ^{s−1}`` (the unregularized loss,
as in Zenke et al.'s reference implementation, not the loss plus the SI penalty) and
``Δθ^s = θ^{s} − θ^{s−1}`` the change the step made (momentum, weight decay and the penalty's
pull included). For plain gradient descent on the task loss alone ``Δθ = −η g`` so
``ω = η Σ_s g_s²``, and in the gradient-flow limit ``ω`` is the task-loss decrease attributed to
each parameter.

``after_step`` reads ``g`` from ``.grad``, which the loop filled with the gradient of
``task loss + penalty``; the penalty's part is removed analytically. With
``penalty_step="gradient"`` the fused penalty's gradient is ``s (θ^{s−1} − θ*)`` with
``s = 2 λ_eff Ω`` (the same per-parameter scale the fused penalty of
:mod:`~mas_core.regularizers.quadratic` applies, read from it, at the θ the backward saw, which
``after_step`` remembered), so ``g = .grad − s (θ^{s−1} − θ*)``. With ``penalty_step="proximal"``
the penalty is not in the loss and ``.grad`` already is the task loss's gradient. With
``clip_grad_norm`` active on a step the loop clipped the sum, so ``g`` is then
``c (g_task + g_pen) − g_pen`` (``c`` the clipping factor), not exactly ``c g_task``.
At the end of the task

    Ω_i ← Ω_i + ω_i / ((θ_i^end − θ_i^start)² + ξ)         (ξ = ``damping``)

and θ* ← θ^end; ``before_task`` resets ω to 0 and θ^start to the current θ. While training
later tasks the penalty is

    L_SI(θ) = λ Σ_i Ω_i (θ_i − θ*_i)²        (no 1/2, as MAS and EWC here; ``docs/method.md`` §6)

inherited from :class:`~mas_core.regularizers.quadratic.QuadraticAnchorRegularizer`.

Ω is not clipped at 0 (as in the reference implementation). Parameters that
appear during a task (a head added after ``before_task``) start their path
integral at their first ``after_step``; parameters without Ω (heads added for
the current task) are not penalized.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError, MASCoreError
from .base import TaskInfo
from .common import check_finite, detached_copies
from .quadratic import QuadraticAnchorRegularizer


class SI(QuadraticAnchorRegularizer):
    """Synaptic Intelligence: penalty ``λ Σ Ω (θ − θ*)²`` with the path-integral importance Ω.

    ``penalty_step``: ``"proximal"`` (default) or ``"gradient"`` (the paper's form); ``docs/method.md`` §13."""

    name = "si"
    display_name = "SI"
    importance_estimator = "path integral"  # over the task's optimizer steps: no sample count
    uses_step_hook = True
    required_extra_keys = ("path", "start", "previous")

    def __init__(self, lam: float = 1.0, *, damping: float = 0.1, penalty_step: str = "proximal",
                 lam_scale: str = "none") -> None:
        super().__init__(lam, penalty_step=penalty_step, lam_scale=lam_scale)
        damping = float(damping)
        if not damping > 0:
            raise InvalidArgumentError(f"damping (xi) must be > 0 to keep Ω finite, got {damping}")
        self.damping = damping
        self.path: dict[str, Tensor] = {}  # ω of the current task
        self.start: dict[str, Tensor] = {}  # θ at the task start
        self.previous: dict[str, Tensor] = {}  # θ before the last step

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Start a new path integral at the current parameters."""
        self.start = {}
        self.previous = {}
        self.path = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self._track(name, parameter)

    def _track(self, name: str, parameter: Tensor) -> None:
        value = parameter.detach()
        self.start[name] = value.clone()
        self.previous[name] = value.clone()
        self.path[name] = torch.zeros_like(value)

    def after_step(self, model: nn.Module) -> None:
        """``ω += −g·Δθ`` for every trainable parameter, ``g`` the task loss's gradient at the θ
        before the step (``.grad`` less the penalty's gradient, see the module docs); then
        remember θ for the next step."""
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    continue
                previous = self.previous.get(name)
                if previous is None:
                    self._track(name, parameter)
                    continue
                gradient = parameter.grad
                if gradient is not None:
                    penalty_gradient = self._penalty_gradient(name, previous)
                    if penalty_gradient is not None:
                        gradient = gradient - penalty_gradient
                    self.path[name].sub_(gradient * (parameter - previous))
                previous.copy_(parameter)

    def _penalty_gradient(self, name: str, theta: Tensor) -> Tensor | None:
        """The gradient the penalty put into ``.grad`` of ``name`` at parameters ``theta``:
        ``s (θ − θ*)`` with the fused penalty's scale ``s = 2 λ_eff Ω``, or ``None`` where the
        penalty contributes nothing (proximal step, λ = 0, a parameter without Ω)."""
        if self.penalty_step == "proximal" or self.lam == 0:
            return None
        scale = self._gradient_scales.get(name)
        anchor = self._anchors.get(name)
        if scale is None or anchor is None:
            return None
        return scale.to(theta) * (theta - anchor.to(theta))

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """``Ω += ω / ((θ_end − θ_start)² + ξ)``; anchor θ* at the current parameters."""
        if not self.path:
            raise MASCoreError("SI.after_task was called without before_task: call before_task at every task start")
        contributions = {}
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                path = self.path.get(name)
                if path is not None:
                    contributions[name] = path / ((parameter.detach() - self.start[name]).pow(2) + self.damping)
        self.check_shapes(contributions)
        importance = dict(self._importance)
        for name, contribution in contributions.items():
            previous = importance.get(name)
            importance[name] = contribution if previous is None else previous.to(contribution.device) + contribution
        check_finite("SI importance", importance, "lower the learning rate or raise damping")
        self.consolidate(model, importance)

    def extra_state(self) -> dict[str, Any]:
        return {"path": dict(self.path), "start": dict(self.start), "previous": dict(self.previous)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.path = detached_copies(state["path"])
        self.start = detached_copies(state["start"])
        self.previous = detached_copies(state["previous"])

    def __repr__(self) -> str:
        return (f"SI(lam={self.lam}, damping={self.damping}, penalty_step={self.penalty_step!r}, "
                f"lam_scale={self.lam_scale!r})")
