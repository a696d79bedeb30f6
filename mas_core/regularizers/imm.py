"""Incremental Moment Matching (Lee, Kim, Jun, Ha & Zhang, NeurIPS 2017): mean-IMM and mode-IMM.

Tasks are trained sequentially with weight transfer (task ``t`` starts from
``θ_{t−1}``, the parameters trained on task ``t−1``) and the L2-transfer penalty

    L_L2(θ) = lam_l2 Σ_i (θ_i − θ_{t−1,i})²

After task ``t`` its parameters ``θ_t`` (and, for mode-IMM, its diagonal Fisher
``F_t`` from :func:`mas_core.importance.fisher_importance` on the task's labelled
data) are stored, and the shared parameters are merged over the ``T`` tasks so
far, with ``α_t = 1/T``:

    mean-IMM:  θ = Σ_t α_t θ_t
    mode-IMM:  θ = Σ_t α_t (F_t + ε) θ_t / Σ_t α_t (F_t + ε)      (elementwise)

The merged parameters are loaded into the model in ``after_task`` (so the
evaluation after task ``t`` sees the merged model); ``before_task`` of the next task
restores ``θ_{t}`` (weight transfer, as in the paper). Heads are not merged: a
task's head only exists from that task on, and the parameters of ``model.heads``
are left as trained. Only parameters present in every stored task are merged.

Memory is not constant: IMM needs every ``θ_t`` (and every ``F_t`` for mode-IMM),
i.e. O(T × shared parameters).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import MASCoreError, NonFiniteError
from ..importance import fisher_importance
from .base import Regularizer, TaskInfo, _zero_like_model
from .ewc import check_finite, check_lambda, first_parameter_device, move_state

MODES = ("mean", "mode")


def shared_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that do not belong to ``model.heads`` (all of them if it has none)."""
    heads = getattr(model, "heads", None)
    head_ids = {id(parameter) for parameter in heads.parameters()} if isinstance(heads, nn.Module) else set()
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and id(parameter) not in head_ids]


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


class IMM(Regularizer):
    """Mean-IMM or mode-IMM with weight transfer and the L2-transfer penalty ``lam_l2 Σ (θ − θ_{t−1})²``."""

    name = "imm"

    def __init__(self, mode: str = "mean", *, lam_l2: float = 1e-4, max_samples: int | None = None,
                 output_fn: Callable[[nn.Module, Any], Tensor] | None = None, eps: float = 1e-8) -> None:
        if mode not in MODES:
            raise MASCoreError(f"IMM mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.after_task_data = "inputs" if mode == "mode" else "none"  # mode-IMM's Fisher reads inputs
        self.lam_l2 = check_lambda("lam_l2", lam_l2)
        if max_samples is not None and int(max_samples) < 1:
            raise MASCoreError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.max_samples = max_samples
        self.output_fn = output_fn
        self.eps = float(eps)
        self.task_parameters: list[dict[str, Tensor]] = []
        self.task_fishers: list[dict[str, Tensor]] = []

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Weight transfer: load the previous task's (unmerged) parameters ``θ_{t−1}`` into the model."""
        if not self.task_parameters:
            return
        previous = self.task_parameters[-1]
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in previous:
                    parameter.copy_(previous[name].to(parameter.device))

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``lam_l2 Σ_i (θ_i − θ_{t−1,i})²`` over the stored shared parameters (0 on the first task)."""
        if not self.task_parameters or self.lam_l2 == 0:
            return _zero_like_model(model)
        device = first_parameter_device(model)
        self.task_parameters[-1] = move_state(self.task_parameters[-1], device)
        previous = self.task_parameters[-1]
        total = _zero_like_model(model)
        for name, parameter in model.named_parameters():
            anchor = previous.get(name)
            if anchor is not None:
                total = total + (parameter - anchor).pow(2).sum()
        value = self.lam_l2 * total
        if not torch.isfinite(value):
            raise NonFiniteError(f"the IMM L2-transfer penalty is {value.item()}; lower lam_l2 (now {self.lam_l2}) or the learning rate")
        return value

    @property
    def strength(self) -> dict[str, float]:
        """``{"lam_l2": …}``: the L2-transfer penalty's weight."""
        return {"lam_l2": float(self.lam_l2)}

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Store ``θ_t`` (and ``F_t`` for mode-IMM), merge the shared parameters, load the merge into the model."""
        names = shared_parameter_names(model)
        if not names:
            raise MASCoreError("IMM found no shared (non-head) trainable parameters to merge")
        parameters = dict(model.named_parameters())
        self.task_parameters.append({name: parameters[name].detach().clone() for name in names})
        if self.mode == "mode":
            fisher = fisher_importance(model, data, output_fn=self.output_fn, max_samples=self.max_samples)
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
                "task_fishers": [dict(fisher) for fisher in self.task_fishers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_parameters = [{name: value.detach().clone() for name, value in params.items()}
                                for params in state["task_parameters"]]
        self.task_fishers = [{name: value.detach().clone() for name, value in fisher.items()}
                             for fisher in state["task_fishers"]]

    def __repr__(self) -> str:
        return f"IMM(mode={self.mode!r}, lam_l2={self.lam_l2}, max_samples={self.max_samples})"
