"""Incremental Moment Matching (Lee, Kim, Jun, Ha & Zhang, NeurIPS 2017): mean-IMM and mode-IMM.

Tasks are trained sequentially with weight transfer (task ``t`` starts from
``θ_{t−1}``, the parameters trained on task ``t−1``) and the L2-transfer penalty

    L_L2(θ) = lam_l2 Σ_i (θ_i − θ_{t−1,i})²

the quadratic-anchor penalty with Ω ≡ 1 and θ* = θ_{t−1} (inherited from
:class:`~mas_core.regularizers.quadratic.QuadraticAnchorRegularizer`; ``docs/method.md`` §7).

After task ``t`` its parameters ``θ_t`` (and, for mode-IMM, its diagonal Fisher
``F_t`` from :func:`mas_core.importance.fisher_importance` on the task's labelled
data, or of ``loss_fn`` as for EWC) are stored, and the shared parameters are merged over the ``T`` tasks so
far, with ``α_t = 1/T``:

    mean-IMM:  θ = Σ_t α_t θ_t
    mode-IMM:  θ = Σ_t α_t (F_t + ε) θ_t / Σ_t α_t (F_t + ε)      (elementwise)

The merged parameters are loaded into the model in ``after_task``
(``after_task_changes_model``: the task loop evaluates the model as trained on task ``t`` for
the accuracy matrix ``R[t]`` before the merge, and the merged model after it for the row of its
own, ``merged_accuracy``); ``before_task`` of the next task restores ``θ_{t}`` (weight
transfer, as in the paper). Heads are not merged: a
task's head only exists from that task on, and the parameters of ``model.heads``
are left as trained. Only parameters present in every stored task are merged.

Memory is not constant: IMM needs every ``θ_t`` (and every ``F_t`` for mode-IMM),
i.e. O(T × shared parameters).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError, MASCoreError
from ..importance import fisher_importance
from .base import HYPERPARAMETERS_KEY, TaskInfo
from .common import (
    check_finite,
    check_max_samples,
    detached_copies,
    first_parameter_device,
    move_state,
    shared_parameter_names,
)
from .quadratic import QuadraticAnchorRegularizer

IMM_MODES = ("mean", "mode")


def merge_mean(task_parameters: list[dict[str, Tensor]], names: Iterable[str]) -> dict[str, Tensor]:
    """Mean-IMM: ``θ = (1/T) Σ_t θ_t`` for every name."""
    count = len(task_parameters)
    return {name: sum(params[name] for params in task_parameters) / count for name in names}


def merge_mode(task_parameters: list[dict[str, Tensor]], task_fishers: list[dict[str, Tensor]],
               names: Iterable[str], eps: float = 1e-8) -> dict[str, Tensor]:
    """Mode-IMM: ``θ = Σ_t α_t (F_t+ε) θ_t / Σ_t α_t (F_t+ε)`` with ``α_t = 1/T``, elementwise."""
    count = len(task_parameters)
    alpha = 1.0 / count
    merged = {}
    for name in names:
        numerator = sum(alpha * (fisher[name] + eps) * params[name] for params, fisher in zip(task_parameters, task_fishers))
        denominator = sum(alpha * (fisher[name] + eps) for fisher in task_fishers)
        merged[name] = numerator / denominator
    return merged


class IMM(QuadraticAnchorRegularizer):
    """Mean-IMM or mode-IMM with weight transfer and the L2-transfer penalty ``lam_l2 Σ (θ − θ_{t−1})²``.

    Mode-IMM's Fisher is EWC's: the cross-entropy of ``output_fn``'s logits (default the model's
    output) against the true labels, or any per-sample ``loss_fn(model, batch) -> Tensor [B]``.
    ``penalty_step="proximal"`` (the default) applies the L2 transfer as ``θ ← (θ + c θ_{t−1}) / (1 + c)``,
    ``c = 2 η lam_l2``, after each optimizer step (``docs/method.md`` §13); ``"gradient"`` puts it in
    the loss (the paper's form). Ω ≡ 1, so there is no ``lam_scale``.
    """

    name = "imm"
    display_name = "IMM L2-transfer"
    importance_estimator = "uniform"  # Ω ≡ 1 for the transfer penalty (mode-IMM's Fisher serves the merge)
    strength_name = "lam_l2"
    uniform_importance = True
    after_task_changes_model = True  # the merge is loaded into the model

    def accumulation_rule(self) -> str:
        """The transfer penalty anchors at the last task's weights: nothing accumulates."""
        return "none (anchor θ_{t−1})"

    def __init__(self, mode: str = "mean", *, lam_l2: float = 1e-4, max_samples: int | None = None,
                 output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, eps: float = 1e-8,
                 penalty_step: str = "proximal") -> None:
        super().__init__(lam_l2, penalty_step=penalty_step)
        if mode not in IMM_MODES:
            raise InvalidArgumentError(f"IMM mode must be one of {IMM_MODES}, got {mode!r}")
        if output_fn is not None and loss_fn is not None:
            raise InvalidArgumentError("IMM takes output_fn (logits, cross-entropy) or loss_fn (per-sample losses), not both")
        self.mode = mode
        self.after_task_data = "labelled" if mode == "mode" else "none"  # mode-IMM's Fisher reads the labels
        self.importance_from_loss = mode == "mode"  # ... as the per-sample loss's Fisher (loss_fn)
        self.max_samples = check_max_samples(max_samples)
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.eps = float(eps)
        self.task_parameters: list[dict[str, Tensor]] = []
        self.task_fishers: list[dict[str, Tensor]] = []

    @property
    def lam_l2(self) -> float:
        """The L2-transfer penalty's weight (λ of the base class)."""
        return self.lam

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Weight transfer: load the previous task's (unmerged) parameters ``θ_{t−1}`` into the model."""
        if not self.task_parameters:
            return
        previous = self.task_parameters[-1]
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in previous:
                    parameter.copy_(previous[name].to(parameter.device))

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Store ``θ_t`` (and ``F_t`` for mode-IMM), merge the shared parameters, load the merge into the model."""
        names = shared_parameter_names(model)
        if not names:
            raise MASCoreError("IMM found no shared (non-head) trainable parameters to merge")
        parameters = dict(model.named_parameters())
        self.task_parameters.append({name: parameters[name].detach().clone() for name in names})
        self._anchors = self.task_parameters[-1]  # θ* of the L2 transfer: θ_t, unmerged
        if self.mode == "mode":
            fisher = fisher_importance(model, data, output_fn=self.output_fn, loss_fn=self.loss_fn,
                                       max_samples=self.max_samples)
            missing = [name for name in names if name not in fisher]
            if missing:
                raise MASCoreError(f"fisher_importance returned no entry for {missing[:3]}; IMM cannot merge them")
            fisher = {name: fisher[name].detach().clone() for name in names}
            check_finite("the Fisher", fisher, "check the data and the model's outputs")
            self.task_fishers.append(fisher)
        common = [name for name in names if all(name in params for params in self.task_parameters)]
        device = first_parameter_device(model)
        stored = [move_state(params, device) for params in self.task_parameters]
        if self.mode == "mean":
            merged = merge_mean(stored, common)
        else:
            fishers = [move_state(fisher, device) for fisher in self.task_fishers]
            merged = merge_mode(stored, fishers, common, self.eps)
        check_finite("the merged IMM model", merged, "check the stored parameters")
        with torch.no_grad():
            for name in common:
                parameters[name].copy_(merged[name])

    def state_dict(self) -> dict[str, Any]:
        return {"task_parameters": [dict(params) for params in self.task_parameters],
                "task_fishers": [dict(fisher) for fisher in self.task_fishers],
                HYPERPARAMETERS_KEY: self.hyperparameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_hyperparameters(state)
        self.task_parameters = [detached_copies(params) for params in state["task_parameters"]]
        self.task_fishers = [detached_copies(fisher) for fisher in state["task_fishers"]]
        self._anchors = self.task_parameters[-1] if self.task_parameters else {}

    def __repr__(self) -> str:
        return (f"IMM(mode={self.mode!r}, lam_l2={self.lam_l2}, max_samples={self.max_samples}, "
                f"penalty_step={self.penalty_step!r})")
