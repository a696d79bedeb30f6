"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), diagonal Fisher, and online EWC.

After task ``t`` the diagonal empirical Fisher of the task is estimated per sample
from the true labels (:func:`mas_core.importance.fisher_importance`)::

    F_t = (1/N) Σ_k (∂ CE(F(x_k), y_k) / ∂θ)²

and accumulated into one importance vector with one anchor (constant memory)::

    offline (default):  F ← F_prev + F_t           θ* ← θ at the end of task t
    online (Schwarz et al. 2018):  F ← γ F_prev + F_t,  θ* ← θ at the end of task t

The penalty added to the loss while training later tasks is

    L_EWC(θ) = λ Σ_i F_i (θ_i − θ*_i)²

with **no 1/2** (the MAS convention of this project; Kirkpatrick's λ/2 equals our λ/2).
The original offline EWC keeps one anchor per task (Σ_t λ F_t (θ − θ*_t)²); here
the summed Fisher is anchored at the latest parameters so the memory is constant
(for parameters that did not move since their task, both agree).
Parameters that did not exist at the last ``after_task`` (new heads) are not penalized.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import MASCoreError, NonFiniteError
from ..importance import fisher_importance
from .base import Regularizer, _zero_like_model


def weighted_squared_distance(model: nn.Module, weights: dict[str, Tensor], anchors: dict[str, Tensor]) -> Tensor:
    """``Σ_i w_i (θ_i − θ*_i)²`` over the parameters of ``model`` named in ``anchors`` (a 0-d tensor).

    ``weights`` and ``anchors`` are keyed by ``named_parameters()`` names and must
    be on the parameters' device; parameters not in ``anchors`` contribute 0.
    """
    total = _zero_like_model(model)
    for name, parameter in model.named_parameters():
        anchor = anchors.get(name)
        if anchor is None:
            continue
        total = total + (weights[name] * (parameter - anchor).pow(2)).sum()
    return total


def move_state(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The same dict with every tensor on ``device`` (the dict itself when already there)."""
    if all(value.device == device for value in tensors.values()):
        return tensors
    return {name: value.to(device) for name, value in tensors.items()}


def first_parameter_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def check_finite(kind: str, tensors: dict[str, Tensor], what_to_do: str) -> None:
    """Raise :class:`NonFiniteError` naming the first entry of ``tensors`` holding a NaN or Inf."""
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"{kind} of parameter {name} has NaN or Inf entries; {what_to_do}")


def check_lambda(name: str, value: float) -> float:
    """Validate a non-negative finite penalty weight and return it as a float."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MASCoreError(f"{name} must be a number, got {value!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise MASCoreError(f"{name} must be a finite number >= 0, got {value}")
    return value


class EWC(Regularizer):
    """EWC / online EWC: penalty ``λ Σ F (θ − θ*)²`` with the accumulated diagonal Fisher ``F``.

    ``output_fn(model, batch)`` gives the logits the Fisher is taken of (default
    ``model(input)``: the active head), with the cross-entropy against the true labels as
    the per-sample loss; ``loss_fn(model, batch) -> Tensor [B]`` replaces both with any
    per-sample loss (e.g. the slot regression loss of an embedding model).
    ``max_samples`` caps the samples used per task.
    ``gamma`` (online only) decays the previous Fisher: ``F ← γ F_prev + F_t``.
    """

    name = "ewc"
    after_task_data = "labelled"

    def __init__(self, lam: float = 1.0, *, online: bool = False, gamma: float = 1.0,
                 output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 max_samples: int | None = None) -> None:
        if output_fn is not None and loss_fn is not None:
            raise MASCoreError("EWC takes output_fn (logits, cross-entropy) or loss_fn (per-sample losses), not both")
        self.lam = check_lambda("lam", lam)
        self.online = bool(online)
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise MASCoreError(f"gamma must be in [0, 1], got {gamma}")
        if not self.online and gamma != 1.0:
            raise MASCoreError(f"gamma={gamma} only applies to online EWC: pass online=True or leave gamma=1")
        if max_samples is not None and int(max_samples) < 1:
            raise MASCoreError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.gamma = gamma
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.max_samples = max_samples
        self.fisher: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}
        self.tasks_seen = 0

    @property
    def importance(self) -> dict[str, Tensor]:
        """The accumulated diagonal Fisher, keyed by parameter name."""
        return self.fisher

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ Σ_i F_i (θ_i − θ*_i)²`` (0 before the first ``after_task``)."""
        if not self.anchors:
            return _zero_like_model(model)
        device = first_parameter_device(model)
        self.fisher = move_state(self.fisher, device)
        self.anchors = move_state(self.anchors, device)
        value = self.lam * weighted_squared_distance(model, self.fisher, self.anchors)
        if not torch.isfinite(value):
            raise NonFiniteError(f"the EWC penalty is {value.item()}; lower lam (now {self.lam}) or the learning rate")
        return value

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Estimate this task's Fisher on labelled ``data``, accumulate it, and anchor at the current θ."""
        new = fisher_importance(model, data, output_fn=self.output_fn, loss_fn=self.loss_fn,
                                max_samples=self.max_samples)
        check_finite("the Fisher", new, "check the data and the model's outputs")
        decay = self.gamma if self.online else 1.0
        accumulated: dict[str, Tensor] = {}
        for name, value in new.items():
            previous = self.fisher.get(name)
            value = value.detach()
            accumulated[name] = value.clone() if previous is None else decay * previous.to(value.device) + value
        for name, previous in self.fisher.items():
            if name not in accumulated:
                accumulated[name] = decay * previous
        self.fisher = accumulated
        self.anchors = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                        if name in self.fisher}
        self.tasks_seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher), "anchors": dict(self.anchors), "tasks_seen": self.tasks_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = {name: value.detach().clone() for name, value in state["fisher"].items()}
        self.anchors = {name: value.detach().clone() for name, value in state["anchors"].items()}
        self.tasks_seen = int(state["tasks_seen"])

    def __repr__(self) -> str:
        return f"EWC(lam={self.lam}, online={self.online}, gamma={self.gamma}, max_samples={self.max_samples})"
