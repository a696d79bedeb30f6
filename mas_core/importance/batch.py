"""The batch-level estimate of the original MAS code, Avalanche and FACIL, for comparison only.

``Ω_batch = (1/N) Σ_batches φ(∂ Σ_{n∈batch} s_n / ∂θ)`` (``docs/method.md`` §1.2): signs cancel
inside a batch, so it is smaller than the per-sample estimate and depends on the batch size.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..batches import move_to
from ..errors import InvalidOutputError
from .common import Elementwise, counting_first, evaluation_mode, finish, limited_batches, trainable_parameters


def batch_gradient_statistic(
    model: nn.Module,
    data: Iterable[Any],
    objective: Callable[[nn.Module, Any], Tensor],
    phi: Elementwise,
    max_samples: int | None,
    estimator: str,
) -> dict[str, Tensor]:
    """``(1/N) Σ_batches φ(∂ Σ_{k∈batch} s_k/∂θ)``: the batch-level estimator (comparison only)."""
    trainable = trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    names = list(trainable)
    device = next(iter(trainable.values())).device
    count = 0
    with evaluation_mode(model):
        for batch, size, counted in limited_batches(data, max_samples):
            batch = move_to(batch, device)
            batch, counted_objective = counting_first(batch, size, counted, objective)  # only the counted samples
            with torch.enable_grad():
                total = counted_objective(model, batch).sum()
            if not total.requires_grad:
                raise InvalidOutputError(
                    "the output does not depend on any trainable parameter (is output_fn running "
                    "under torch.no_grad() or detaching?)"
                )
            grads = torch.autograd.grad(total, [trainable[name] for name in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    sums[name] += phi(grad)
            count += counted
    return finish(sums, count, scale=1.0, estimator=f"{estimator} (batch mode)", data=data)
