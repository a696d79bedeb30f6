"""Learning without Forgetting (Li & Hoiem 2016; ``docs/method.md`` §8).

At the start of every task after the first, a frozen copy of the model is taken
(``before_task``). While the new task is trained, the outputs of the old heads on
the *new* task's inputs are kept close to the copy's:

    L_LwF(θ) = λ Σ_{old heads j} KL( softmax(z_j^old / T) ‖ softmax(z_j / T) )

averaged over the batch (``T`` = ``temperature``), with λ = λ_o = 1 and T = 2 by default:
Li & Hoiem's ``L_old = −Σ_k y'_k log ŷ'_k`` with ``y' = softmax(z^old/T)``,
``ŷ' = softmax(z/T)``, whose gradient with respect to the new logits is
``(softmax(z/T) − softmax(z^old/T)) / T`` per sample. KL differs from that soft
cross-entropy by the constant entropy of ``p_old``: same gradient, and the penalty is
exactly 0 when the model equals its snapshot. ``t_squared=True`` multiplies the
distillation by ``T²`` (Hinton et al. 2015's convention, which keeps gradient magnitudes
independent of T; 4× Li & Hoiem's gradient at T = 2); it is off by default.

Multi-head models (with a ``heads`` attribute; the runner's
:class:`~mas_core.sequence.MultiHeadNet`) distill every head except the one of the
current task. A model without ``heads`` (a single-output model such as the triplet
embedding) distills its whole output with the mean squared error
``λ · mean((model(x) − old(x))²)``; a subclass with a penalty on the shared features (EBLL) adds
it there too, on ``model.features(x)`` against the snapshot's (the output then computed from those
features by ``model.output_from_features`` when the model offers it, so one forward serves both).

The copy is rebuilt lazily from the stored ``state_dict`` of the old model and the
current model's structure, so the regularizer's own ``state_dict`` holds tensors
only and a resumed run distills from the same snapshot. The copy runs in eval mode.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MASCoreError, NonFiniteError
from .base import HYPERPARAMETERS_KEY, Regularizer, TaskInfo
from .common import check_lambda, zero_penalty


def distillation_loss(new_logits: Tensor, old_logits: Tensor, temperature: float, *,
                      t_squared: bool = False) -> Tensor:
    """``KL(softmax(old/T) ‖ softmax(new/T))`` averaged over the batch (0 when the logits agree),
    times ``T²`` when ``t_squared`` (Hinton's convention; Li & Hoiem use no factor).

    Gradient with respect to ``new_logits`` (without ``t_squared``): ``(softmax(new/T) −
    softmax(old/T)) / (T · B)`` for a batch of ``B``, the gradient of Li & Hoiem's
    ``mean_n −Σ_k y'_nk log ŷ'_nk``."""
    value = F.kl_div(
        F.log_softmax(new_logits / temperature, dim=1),
        F.log_softmax(old_logits.detach() / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return value * (temperature * temperature) if t_squared else value


class LwF(Regularizer):
    """LwF: distillation of the old heads (or, for single-output models, MSE of the output).

    Args:
        lam: λ_o ≥ 0, the weight of the distillation (1 in Li & Hoiem).
        temperature: T > 0 (2 in Li & Hoiem).
        t_squared: multiply the distillation by T² (Hinton et al.'s convention; off by default,
            as in Li & Hoiem).
    """

    name = "lwf"

    def __init__(self, lam: float = 1.0, *, temperature: float = 2.0, t_squared: bool = False) -> None:
        self.lam = check_lambda("lam", lam)
        temperature = float(temperature)
        if not temperature > 0:
            raise MASCoreError(f"temperature must be > 0, got {temperature}")
        if not isinstance(t_squared, bool):
            raise MASCoreError(f"t_squared must be true or false, got {t_squared!r}")
        self.temperature = temperature
        self.t_squared = t_squared
        self.old_state: dict[str, Tensor] | None = None
        self.old_heads: list[int] = []
        self._old_model: nn.Module | None = None

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Snapshot the model (its ``state_dict``) unless this is the first task."""
        self._old_model = None
        if task.index == 0:
            self.old_state = None
            self.old_heads = []
            return
        self.old_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        heads = getattr(model, "heads", None)
        self.old_heads = [j for j in range(len(heads)) if j != task.head] if heads is not None else []

    def old_model(self, model: nn.Module) -> nn.Module | None:
        """The frozen snapshot, rebuilt from the stored state and ``model``'s structure (``None`` before any)."""
        if self.old_state is None:
            return None
        if self._old_model is None:
            frozen = copy.deepcopy(model)
            for parameter in frozen.parameters():
                parameter.grad = None
                parameter.requires_grad_(False)
            missing, _ = frozen.load_state_dict(self.old_state, strict=False)
            needed = [name for name in missing if not _belongs_to_other_head(name, self.old_heads, model)]
            if needed:
                raise MASCoreError(
                    f"the LwF snapshot lacks {needed[:3]}: the model's structure changed since before_task; "
                    "call before_task again after changing the model"
                )
            frozen.eval()
            self._old_model = frozen
        return self._old_model

    def penalty(self, model: nn.Module, inputs: Any = None) -> Tensor:
        """``λ Σ_j KL(old_j ‖ new_j)`` (× T² with ``t_squared``) over the old heads (MSE for single-output models); 0 on the first task."""
        if self.old_state is None:
            return zero_penalty(model)
        if inputs is None:
            raise MASCoreError(f"{type(self).__name__} needs the batch inputs: call penalty(model, inputs)")
        value = self._penalty_terms(model, inputs)
        if not torch.isfinite(value):
            raise NonFiniteError(
                f"the {type(self).__name__} penalty is {value.item()}; lower lam (now {self.lam}) or the learning rate"
            )
        return value

    def _penalty_terms(self, model: nn.Module, inputs: Any) -> Tensor:
        old = self.old_model(model)
        assert old is not None
        if getattr(model, "heads", None) is None:
            if self._has_feature_penalty() and callable(getattr(model, "features", None)):
                return self._single_output_terms(model, old, inputs)
            with torch.no_grad():
                target = old(inputs)
            return self.lam * F.mse_loss(model(inputs), target)
        if not self.old_heads:
            return zero_penalty(model)
        new_features, old_features = self._features(model, old, inputs)
        total = zero_penalty(model)
        for j in self.old_heads:
            if new_features is None:
                new_logits = model(inputs, head=j)
                with torch.no_grad():
                    old_logits = old(inputs, head=j)
            else:
                new_logits = model.heads[j](new_features)
                with torch.no_grad():
                    old_logits = old.heads[j](old_features)
            total = total + distillation_loss(new_logits, old_logits, self.temperature, t_squared=self.t_squared)
        total = self.lam * total
        if new_features is not None:
            total = total + self._feature_penalty(new_features, old_features)
        return total

    def _single_output_terms(self, model: nn.Module, old: nn.Module, inputs: Any) -> Tensor:
        """A model without heads, with ``features``: ``λ · mean((out − out_old)²)`` plus
        :meth:`_feature_penalty` of ``features(x)`` against the snapshot's. The outputs come from the
        features through ``output_from_features`` when the model has it (one forward), else from a
        second forward."""
        new_features, old_features = self._features(model, old, inputs)
        assert new_features is not None and old_features is not None
        if callable(getattr(model, "output_from_features", None)):
            output = model.output_from_features(new_features)
            with torch.no_grad():
                target = old.output_from_features(old_features)
        else:
            output = model(inputs)
            with torch.no_grad():
                target = old(inputs)
        return self.lam * F.mse_loss(output, target) + self._feature_penalty(new_features, old_features)

    def _has_feature_penalty(self) -> bool:
        """Whether :meth:`_feature_penalty` can be non-zero (never for LwF, whose single-output
        penalty then stays the plain output MSE; EBLL once it holds an encoder)."""
        return False

    def _feature_penalty(self, new_features: Tensor, old_features: Tensor) -> Tensor:
        """Extra penalty on the shared features (0 for LwF; EBLL's code preservation)."""
        return new_features.new_zeros(())

    @staticmethod
    def _features(model: nn.Module, old: nn.Module, inputs: Any) -> tuple[Tensor | None, Tensor | None]:
        """Shared features of the current and the old model (``(None, None)`` when the model has no ``features``)."""
        if not callable(getattr(model, "features", None)):
            return None, None
        with torch.no_grad():
            old_features = old.features(inputs)
        return model.features(inputs), old_features

    def state_dict(self) -> dict[str, Any]:
        return {"old_state": None if self.old_state is None else dict(self.old_state),
                "old_heads": list(self.old_heads), HYPERPARAMETERS_KEY: self.hyperparameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state saved with other hyperparameters (λ, ``temperature`` …)
        is refused with :class:`~mas_core.errors.CheckpointMismatchError`."""
        self.check_hyperparameters(state)
        old_state = state["old_state"]
        self.old_state = None if old_state is None else {name: value.detach().clone() for name, value in old_state.items()}
        self.old_heads = [int(j) for j in state["old_heads"]]
        self._old_model = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, temperature={self.temperature}, t_squared={self.t_squared})"


def _belongs_to_other_head(name: str, old_heads: list[int], model: nn.Module) -> bool:
    """True for state keys of heads that are not distilled (added after the snapshot)."""
    if getattr(model, "heads", None) is None or not name.startswith("heads."):
        return False
    index = name.split(".")[1]
    return index.isdigit() and int(index) not in old_heads
