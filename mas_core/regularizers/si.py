"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017).

During task ``t`` every optimizer step ``s`` adds to the path integral

    ω_i += −g_i^s · Δθ_i^s

where ``g^s`` is the gradient used at the step (read from ``.grad`` in
``after_step``: the gradient of the full loss, penalty included) and
``Δθ^s = θ^{s} − θ^{s−1}`` the change the step made (momentum and weight decay
included). For plain gradient descent ``Δθ = −η g`` so ``ω = η Σ_s g_s²``, and in the
gradient-flow limit ``ω`` is the loss decrease attributed to each parameter.
At the end of the task

    Ω_i ← Ω_i + ω_i / ((θ_i^end − θ_i^start)² + ξ)         (ξ = ``damping``)

and θ* ← θ^end. While training later tasks the penalty is

    L_SI(θ) = λ Σ_i Ω_i (θ_i − θ*_i)²        (no 1/2, as MAS and EWC here)

Ω is not clipped at 0 (as in the reference implementation). Parameters that
appear during a task (a head added after ``before_task``) start their path
integral at their first ``after_step``; parameters without Ω (heads added for
the current task) are not penalized.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import MASCoreError, NonFiniteError
from .base import Regularizer, TaskInfo, _zero_like_model
from .ewc import check_finite, check_lambda, first_parameter_device, move_state, weighted_squared_distance


class SI(Regularizer):
    """Synaptic Intelligence: penalty ``λ Σ Ω (θ − θ*)²`` with the path-integral importance Ω."""

    name = "si"
    uses_step_hook = True

    def __init__(self, lam: float = 1.0, *, damping: float = 0.1) -> None:
        self.lam = check_lambda("lam", lam)
        damping = float(damping)
        if not damping > 0:
            raise MASCoreError(f"damping (xi) must be > 0 to keep Ω finite, got {damping}")
        self.damping = damping
        self.importance: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}
        self.path: dict[str, Tensor] = {}
        self.start: dict[str, Tensor] = {}
        self.previous: dict[str, Tensor] = {}

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
        """``ω += −g·Δθ`` for every trainable parameter, then remember θ for the next step."""
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    continue
                previous = self.previous.get(name)
                if previous is None:
                    self._track(name, parameter)
                    continue
                if parameter.grad is not None:
                    self.path[name].sub_(parameter.grad * (parameter - previous))
                previous.copy_(parameter)

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """``Ω += ω / ((θ_end − θ_start)² + ξ)``; anchor θ* at the current parameters."""
        if not self.path:
            raise MASCoreError("SI.after_task was called without before_task: call before_task at every task start")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                path = self.path.get(name)
                if path is None:
                    continue
                change = parameter.detach() - self.start[name]
                contribution = path / (change.pow(2) + self.damping)
                previous = self.importance.get(name)
                self.importance[name] = contribution if previous is None else previous.to(contribution.device) + contribution
        check_finite("SI importance", self.importance, "lower the learning rate or raise damping")
        self.anchors = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                        if name in self.importance}

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ Σ_i Ω_i (θ_i − θ*_i)²`` (0 before the first task has ended)."""
        if not self.anchors:
            return _zero_like_model(model)
        device = first_parameter_device(model)
        self.importance = move_state(self.importance, device)
        self.anchors = move_state(self.anchors, device)
        value = self.lam * weighted_squared_distance(model, self.importance, self.anchors)
        if not torch.isfinite(value):
            raise NonFiniteError(f"the SI penalty is {value.item()}; lower lam (now {self.lam}) or the learning rate")
        return value

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": dict(self.importance),
            "anchors": dict(self.anchors),
            "path": dict(self.path),
            "start": dict(self.start),
            "previous": dict(self.previous),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("importance", "anchors", "path", "start", "previous"):
            setattr(self, key, {name: value.detach().clone() for name, value in state[key].items()})

    def __repr__(self) -> str:
        return f"SI(lam={self.lam}, damping={self.damping})"
