"""MAS importance (Aljundi et al., ECCV 2018): ``Ω = (1/N) Σ_n |∂‖F(x_n)‖₂²/∂θ|`` (``docs/method.md`` §1)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from .batch import batch_gradient_statistic
from .common import OutputFn, model_output
from .per_sample import per_sample_gradient_statistic

MAS_MODES = ("exact", "batch")


class SquaredNormObjective:
    """s_k = ‖F(x_k)‖₂² (MAS)."""

    def __init__(self, output_fn: OutputFn | None) -> None:
        self.output_fn = output_fn
        self.cache_identity = ("mas", output_fn)  # what the per-sample verdicts depend on (checks.py)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        output = model_output(model, batch, self.output_fn)
        return output.reshape(output.shape[0], -1).square().sum(dim=1)


def mas_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    output_fn: OutputFn | None = None,
    mode: str = "exact",
    max_samples: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """MAS importance ``Ω = (1/N) Σ_k |∂‖F(x_k)‖₂²/∂θ|`` for every trainable parameter.

    Args:
        model: the network; its parameters with ``requires_grad=True`` are measured.
        data: any iterable of batches (Tensor, ``(input, ...)`` tuple/list or
            ``{"input": ...}`` dict). Labels, when present, are never read.
        output_fn: ``output_fn(model, batch) -> Tensor [batch, ...]``, the function F
            (a task head, the embedding before any L2 normalisation). Default:
            ``model(batch_input(batch))``.
        mode: ``"exact"`` (per-sample, the paper's definition) or ``"batch"`` (the
            original code's ``|gradient of the batch sum|``, for comparison only).
        max_samples: use only the first ``max_samples`` samples (the batch that
            crosses the limit runs whole with only its first samples counted, so
            exactly that many are used and no tensor of it is cut).
        chunk_size: samples per vectorised chunk in the general fallback; ``None``
            picks the largest chunk whose per-sample gradients hold ≤ 2**24 elements.

    Returns:
        ``{name: Ω}`` in units of ‖F‖² per unit of the parameter, averaged over the N
        samples actually used.

    Raises:
        EmptyDataError, NoTrainableParametersError, InvalidOutputError,
        NonFiniteError (naming the parameter), InvalidArgumentError.
    """
    if mode not in MAS_MODES:
        raise InvalidArgumentError(f"mode must be one of {MAS_MODES}, got {mode!r}")
    objective = SquaredNormObjective(output_fn)
    if mode == "batch":
        return batch_gradient_statistic(model, data, objective, torch.abs, max_samples, "MAS")
    return per_sample_gradient_statistic(
        model, data, objective, torch.abs, max_samples, chunk_size, "MAS"
    )
