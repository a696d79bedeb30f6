"""Memory Aware Synapses (Aljundi et al., ECCV 2018) as a :class:`Regularizer`.

Penalty (``../shared/MAS_SPEC.md`` §2; no 1/2, gradient ``2 λ Ω (θ − θ*)``)::

    penalty(θ) = λ Σ_i Ω_i (θ_i − θ*_i)²

θ* are the parameters at the end of the last task (detached copies), Ω the
accumulated importance. After each task, :meth:`MAS.after_task` estimates Ω_new on
whatever data it is handed (training data, unlabeled data, a mix) with
:func:`~mas_core.importance.mas_importance` (``mode="exact"`` or ``"batch"``) or
:func:`~mas_core.importance.hebbian_importance` (``mode="hebbian"``, l-MAS), and
accumulates it according to ``accumulate``:

* ``"sum"`` (paper and original code; default): ``Ω ← Ω + Ω_new``.
* ``"ema"`` (the behaviour of Avalanche and FACIL): ``Ω ← α Ω + (1 − α) Ω_new`` with
  ``α = ema_alpha`` (0.5 there); the first task sets ``Ω = Ω_new``, and a parameter
  absent from one side counts as 0 there.
* ``"alpha"`` (the consistency extension, spec §4): each task's Ω_t is weighted by
  ``α_t = λ (1/S_t) / Σ_t' (1/S_t')`` with ``S_t = Σ Ω_t`` (its total mass), so that every
  task has the same mass and the weights sum to λ. Constant memory: keep
  ``U = Σ_t Ω_t / S_t`` and ``Z = Σ_t 1/S_t``; the effective importance is ``U / Z`` and
  ``penalty = λ Σ (U/Z) (θ − θ*)² = Σ_t α_t Σ Ω_t (θ − θ*)²``, so λ is applied once.

In every mode :attr:`MAS.importance` is the effective Ω and the penalty is
``λ Σ importance · (θ − θ*)²``. Parameters that did not exist at the last
``after_task`` (a new task head) are not regularized; a regularized parameter whose
shape changed, or that disappeared from the model, is an error.

The penalty is one fused computation over all parameters: a custom autograd function
whose forward takes ``d = θ − θ*`` and ``g = 2λΩ·d`` with multi-tensor
(``torch._foreach_*``) kernels and returns ``½ Σ ⟨g, d⟩``, and whose backward hands ``g``
back as the gradient (first-order differentiable only). ``benchmarks/bench_penalty.py`` compares it
with the plain per-tensor expression and the foreach-with-autograd version.

Device handling: :meth:`state_dict` holds tensors where they live; after
:meth:`load_state_dict` (e.g. from ``torch.load(..., map_location="cpu")``) the tensors
are moved, once, to each parameter's device and dtype at the first :meth:`penalty` call.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import CheckpointMismatchError, InvalidArgumentError, MASStateError, NonFiniteError
from ..importance import OutputFn, hebbian_importance, mas_importance
from .base import Regularizer, _zero_like_model

MODES = ("exact", "batch", "hebbian")
ACCUMULATIONS = ("sum", "ema", "alpha")
_STATE_VERSION = 1


class _WeightedSquaredDistance(torch.autograd.Function):
    """``½ Σ_i ⟨s_i (θ_i − a_i), θ_i − a_i⟩`` over lists of tensors, with ``s_i = 2 λ Ω_i``;
    gradient ``s_i (θ_i − a_i)`` (the product saved by the forward, returned as it is when the
    incoming gradient is 1, so the backward costs no extra pass over the parameters)."""

    @staticmethod
    def forward(ctx: Any, anchors: list[Tensor], gradient_scales: list[Tensor], *parameters: Tensor) -> Tensor:
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


class MAS(Regularizer):
    """MAS regularizer: ``penalty = λ Σ Ω (θ − θ*)²`` with Ω accumulated over tasks.

    Args:
        lam: λ ≥ 0, the penalty weight (1 in the paper's recognition experiments, 5 in
            the fact-learning code).
        mode: ``"exact"`` (per-sample MAS, default), ``"batch"`` (the original code's
            batch-level estimator, for comparison) or ``"hebbian"`` (l-MAS).
        accumulate: ``"sum"`` (default), ``"ema"`` or ``"alpha"`` (see the module docs).
        ema_alpha: α of ``"ema"``, the weight of the previous Ω, in [0, 1].
        output_fn: ``output_fn(model, batch) -> Tensor`` giving F (e.g. the current task's
            head, or the embedding before L2 normalisation); default ``model(input)``.
        max_samples: use at most this many samples to estimate Ω after each task.
    """

    name = "mas"
    after_task_data = "inputs"
    importance_from_inputs = True

    def __init__(
        self,
        lam: float = 1.0,
        *,
        mode: str = "exact",
        accumulate: str = "sum",
        ema_alpha: float = 0.5,
        output_fn: OutputFn | None = None,
        max_samples: int | None = None,
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise InvalidArgumentError(f"lam must be a finite number ≥ 0, got {lam!r}")
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        if accumulate not in ACCUMULATIONS:
            raise InvalidArgumentError(f"accumulate must be one of {ACCUMULATIONS}, got {accumulate!r}")
        if isinstance(ema_alpha, bool) or not isinstance(ema_alpha, (int, float)) or not 0.0 <= ema_alpha <= 1.0:
            raise InvalidArgumentError(f"ema_alpha must be a number in [0, 1], got {ema_alpha!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
            raise InvalidArgumentError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        self.lam = float(lam)
        self.mode = mode
        self.accumulate = accumulate
        self.ema_alpha = float(ema_alpha)
        self.output_fn = output_fn
        self.max_samples = max_samples
        self.tasks_seen = 0
        self._accumulated: dict[str, Tensor] = {}  # Ω ("sum", "ema") or U ("alpha")
        self._inverse_mass_sum = 0.0  # Z of "alpha"
        self._anchors: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}  # 2 λ · effective Ω: the penalty's gradient scale

    # ------------------------------------------------------------------ estimation and accumulation

    def estimate(self, model: nn.Module, data: Iterable[Any]) -> dict[str, Tensor]:
        """Ω_new of ``model`` on ``data`` with this regularizer's ``mode``, without storing it."""
        if self.mode == "hebbian":
            return hebbian_importance(model, data, output_fn=self.output_fn, max_samples=self.max_samples)
        return mas_importance(model, data, output_fn=self.output_fn, mode=self.mode, max_samples=self.max_samples)

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Estimate Ω_new on ``data``, accumulate it, and anchor θ* = the current parameters."""
        new = {name: value.detach() for name, value in self.estimate(model, data).items()}
        for name, value in new.items():
            previous = self._accumulated.get(name)
            if previous is not None and previous.shape != value.shape:
                raise MASStateError(
                    f"parameter {name!r} changed shape from {tuple(previous.shape)} to {tuple(value.shape)} "
                    "since the last task; MAS cannot carry its importance over (give the new layer another name)"
                )
        if self.accumulate == "sum":
            for name, value in new.items():
                previous = self._accumulated.get(name)
                self._accumulated[name] = value.clone() if previous is None else previous.to(value) + value
        elif self.accumulate == "ema":
            if self.tasks_seen == 0:
                self._accumulated = {name: value.clone() for name, value in new.items()}
            else:
                alpha = self.ema_alpha
                merged = {name: previous * alpha for name, previous in self._accumulated.items()}
                for name, value in new.items():
                    previous = merged.get(name)
                    merged[name] = (1 - alpha) * value if previous is None else previous.to(value) + (1 - alpha) * value
                self._accumulated = merged
        else:  # "alpha"
            mass = math.fsum(float(value.double().sum()) for value in new.values())
            if not math.isfinite(mass) or mass <= 0.0:
                raise NonFiniteError(
                    f"the task's total importance mass is {mass}; accumulate='alpha' needs a positive finite "
                    "mass (does the output depend on the parameters?)"
                )
            for name, value in new.items():
                previous = self._accumulated.get(name)
                scaled = value / mass
                self._accumulated[name] = scaled if previous is None else previous.to(value) + scaled
            self._inverse_mass_sum += 1.0 / mass
        parameters = dict(model.named_parameters())
        for name in self._accumulated:
            if name in parameters:
                self._anchors[name] = parameters[name].detach().clone()
        self.tasks_seen += 1
        self._refresh_weights()

    def _refresh_weights(self) -> None:
        importance = self.importance
        scale = 2.0 * self.lam
        self._weights = {name: scale * value for name, value in importance.items() if name in self._anchors}

    # ------------------------------------------------------------------ public state

    @property
    def importance(self) -> dict[str, Tensor]:
        """The effective accumulated Ω per parameter name (for ``"alpha"``: U/Z, without λ)."""
        if self.accumulate == "alpha" and self._accumulated:
            return {name: value / self._inverse_mass_sum for name, value in self._accumulated.items()}
        return dict(self._accumulated)

    @property
    def anchors(self) -> dict[str, Tensor]:
        """θ*: the parameters at the end of the last task, per name (detached copies)."""
        return dict(self._anchors)

    # ------------------------------------------------------------------ penalty

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ Σ Ω (θ − θ*)²`` over the parameters anchored at the last ``after_task``
        (zero before the first one); differentiable once. ``inputs`` is ignored."""
        if not self._weights:
            return _zero_like_model(model)
        parameters = dict(model.named_parameters())
        current, anchors, weights = [], [], []
        for name, weight in self._weights.items():
            parameter = parameters.get(name)
            if parameter is None:
                raise MASStateError(
                    f"MAS regularizes parameter {name!r} but the model has no such parameter; "
                    "pass the same model (names) that after_task saw"
                )
            anchor = self._anchors[name]
            if parameter.shape != anchor.shape:
                raise MASStateError(
                    f"parameter {name!r} has shape {tuple(parameter.shape)} but MAS anchored it with shape "
                    f"{tuple(anchor.shape)}; a changed layer cannot keep its importance"
                )
            if anchor.device != parameter.device or anchor.dtype != parameter.dtype:
                anchor = self._anchors[name] = anchor.to(device=parameter.device, dtype=parameter.dtype)
            if weight.device != parameter.device or weight.dtype != parameter.dtype:
                weight = self._weights[name] = weight.to(device=parameter.device, dtype=parameter.dtype)
            current.append(parameter)
            anchors.append(anchor)
            weights.append(weight)
        value = _WeightedSquaredDistance.apply(anchors, weights, *current)
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(
                f"the MAS penalty is {value.detach().item()}; the parameters or Ω contain NaN/Inf "
                f"(λ={self.lam}: a diverged run? lower λ or the learning rate)"
            )
        return value

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": _STATE_VERSION,
            "lam": self.lam,
            "mode": self.mode,
            "accumulate": self.accumulate,
            "ema_alpha": self.ema_alpha,
            "tasks_seen": self.tasks_seen,
            "inverse_mass_sum": self._inverse_mass_sum,
            "accumulated": {name: value.clone() for name, value in self._accumulated.items()},
            "anchors": {name: value.clone() for name, value in self._anchors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. λ, mode and α come from the constructor; the stored
        ``accumulate`` must match (it defines what the stored tensors mean)."""
        required = ("version", "accumulate", "tasks_seen", "inverse_mass_sum", "accumulated", "anchors")
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointMismatchError(f"not a MAS state: missing {missing}; was it written by another method?")
        if state["version"] != _STATE_VERSION:
            raise CheckpointMismatchError(f"MAS state version {state['version']} is not {_STATE_VERSION}")
        if state["accumulate"] != self.accumulate:
            raise CheckpointMismatchError(
                f"the MAS state was accumulated with accumulate={state['accumulate']!r} but this regularizer "
                f"uses {self.accumulate!r}; build MAS with the checkpoint's setting"
            )
        self.tasks_seen = int(state["tasks_seen"])
        self._inverse_mass_sum = float(state["inverse_mass_sum"])
        self._accumulated = {name: value.detach().clone() for name, value in state["accumulated"].items()}
        self._anchors = {name: value.detach().clone() for name, value in state["anchors"].items()}
        self._refresh_weights()

    def __repr__(self) -> str:
        return (
            f"MAS(lam={self.lam}, mode={self.mode!r}, accumulate={self.accumulate!r}, "
            f"ema_alpha={self.ema_alpha}, max_samples={self.max_samples}, tasks_seen={self.tasks_seen})"
        )
