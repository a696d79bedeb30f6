"""The diagonal empirical Fisher of EWC and mode-IMM: ``F = (1/N) Σ_n (∂ℓ_n/∂θ)²`` (``docs/method.md`` §5)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import batch_input, batch_size, batch_target
from ..errors import InvalidArgumentError, InvalidOutputError
from .common import LossFn, OutputFn, model_output
from .per_sample import per_sample_gradient_statistic


class PerSampleLossObjective:
    """s_k = ℓ_k: cross-entropy against the true label, or a user loss (Fisher)."""

    def __init__(self, output_fn: OutputFn | None, loss_fn: LossFn | None) -> None:
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.cache_identity = ("fisher", output_fn, loss_fn)  # what the per-sample verdicts depend on (checks.py)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        expected = batch_size(batch_input(batch))
        if self.loss_fn is not None:
            losses = self.loss_fn(model, batch)
            if not isinstance(losses, Tensor) or not losses.is_floating_point():
                raise InvalidOutputError(
                    f"loss_fn returned {type(losses).__name__}; it must return a float tensor of "
                    "per-sample losses, shape [batch]"
                )
            if tuple(losses.shape) != (expected,):
                raise InvalidOutputError(
                    f"loss_fn returned shape {tuple(losses.shape)} for a batch of {expected}; "
                    "return per-sample losses of shape [batch] (reduction='none')"
                )
            return losses
        logits = model_output(model, batch, self.output_fn)
        if logits.dim() != 2:
            raise InvalidOutputError(
                f"the Fisher estimator expects logits of shape [batch, classes], got "
                f"{tuple(logits.shape)}; pass loss_fn for other outputs"
            )
        target = batch_target(batch)
        return F.cross_entropy(logits, target.to(logits.device), reduction="none")


def fisher_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    output_fn: OutputFn | None = None,
    loss_fn: LossFn | None = None,
    max_samples: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher ``F = (1/N) Σ_k (∂ℓ_k/∂θ)²`` (EWC), per sample, exact.

    ``ℓ_k`` is the cross-entropy of the logits ``F(x_k)`` (``output_fn`` or the model,
    shape ``[batch, classes]``) against the true label ``y_k`` (``batch_target``), or,
    when ``loss_fn`` is given, ``loss_fn(model, batch)[k]`` (a tensor of per-sample
    losses of shape ``[batch]``, e.g. a regression loss for embeddings). Units: squared
    loss per squared unit of the parameter. Same machinery and guarantees as
    :func:`mas_importance` with ``|·|`` replaced by ``(·)²``
    (a Linear layer gets ``(Δ²)ᵀ (A²)``).
    """
    if output_fn is not None and loss_fn is not None:
        raise InvalidArgumentError(
            "give either output_fn (cross-entropy on its logits) or loss_fn (per-sample losses), not both"
        )
    objective = PerSampleLossObjective(output_fn, loss_fn)
    return per_sample_gradient_statistic(
        model, data, objective, torch.square, max_samples, chunk_size, "Fisher"
    )
