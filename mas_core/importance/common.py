"""Plumbing shared by the importance estimators: the function F, batches, eval mode, the final average.

* :data:`OutputFn` / :data:`LossFn`: the callables a caller passes (``docs/method.md`` §1);
* :func:`model_output`: F(batch), validated (a float tensor with the batch first);
* :func:`limited_batches`: ``(batch, size, counted)``, the batches whole, the first ``counted``
  samples of each counting, ``max_samples`` in all; :func:`counting_first` makes an objective count
  only those (the cap never cuts a batch: a tensor with ``B`` rows need not be per sample);
* :func:`evaluation_mode`: eval mode for the estimate, each module's own flag restored after;
* :func:`finish`: ``scale · Σ / N``, checked for NaN/Inf; with several processes (``data`` a
  :class:`mas_core.distributed.RankShard`) the sums and counts of all ranks are all-reduced
  first, so ``Ω = Σ_r S_r / Σ_r N_r`` is the one-process value on every rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..batches import batch_input, batch_size
from ..distributed import all_reduce_sums, spans_processes
from ..errors import EmptyDataError, InvalidArgumentError, InvalidOutputError, NonFiniteError, NoTrainableParametersError

OutputFn = Callable[[nn.Module, Any], Tensor]
"""``output_fn(model, batch) -> Tensor [batch, ...]``: the function F whose norm MAS protects."""

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor [batch]``: per-sample losses for the Fisher estimator."""

Elementwise = Callable[[Tensor], Tensor]
"""φ, applied to each per-sample gradient: ``torch.abs`` for MAS, ``torch.square`` for Fisher."""


def model_output(model: nn.Module, batch: Any, output_fn: OutputFn | None) -> Tensor:
    """F(batch), validated: a floating-point tensor with the batch as first dimension."""
    source = "output_fn" if output_fn is not None else "the model"
    output = output_fn(model, batch) if output_fn is not None else model(batch_input(batch))
    if not isinstance(output, Tensor):
        raise InvalidOutputError(
            f"{source} returned {type(output).__name__}, not a tensor; pass "
            "output_fn=lambda model, batch: ... returning the float tensor F(x) of shape [batch, ...]"
        )
    if not output.is_floating_point():
        raise InvalidOutputError(
            f"{source} returned a {output.dtype} tensor; importance needs a floating-point output F(x)"
        )
    expected = batch_size(batch_input(batch))
    if output.dim() == 0 or output.shape[0] != expected:
        raise InvalidOutputError(
            f"{source} returned shape {tuple(output.shape)} for a batch of {expected} samples; "
            "F(x) must have the batch as its first dimension"
        )
    return output


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise NoTrainableParametersError(
            f"{type(model).__name__} has no parameter with requires_grad=True; unfreeze the "
            "parameters whose importance you want"
        )
    return trainable


def is_batched(leaf: Any, size: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == size


def slice_batch(batch: Any, size: int, keep: int, start: int = 0) -> Any:
    """Samples ``start..keep-1`` of ``batch``: every tensor whose first dimension is ``size`` cut to
    those rows, the other leaves as they are. Only safe where that was verified
    (:func:`mas_core.importance.checks.verify_batch`): a ``size``-row tensor need not be per sample."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([leaf[start:keep] if is_batched(leaf, size) else leaf for leaf in leaves], spec)


def counting_first(batch: Any, size: int, counted: int,
                   objective: Callable[[nn.Module, Any], Tensor]) -> tuple[Any, Callable[[nn.Module, Any], Tensor]]:
    """``(batch', objective')`` whose per-sample objectives are those of ``batch`` for its first
    ``counted`` samples and exactly 0 for the others: ``batch' = (batch, w)`` with the per-sample
    weights ``w_n = [n < counted]`` and ``objective'(model, (b, w)) = objective(model, b)·w``, so the
    uncounted samples' gradients are exactly 0 and the batch is never cut (``batch`` itself when
    every sample counts). ``w`` is a real per-sample leaf: cutting ``batch'`` cuts it along."""
    if counted >= size:
        return batch, objective
    leaves, _ = tree_flatten(batch)
    device = next((leaf.device for leaf in leaves if isinstance(leaf, Tensor)), None)
    weights = (torch.arange(size, device=device) < counted).to(torch.float32)

    def weighted(model: nn.Module, pair: tuple[Any, Tensor]) -> Tensor:
        values = objective(model, pair[0])
        return values * pair[1].to(values.dtype)

    return (batch, weights), weighted


def limited_batches(data: Iterable[Any], max_samples: int | None) -> Iterator[tuple[Any, int, int]]:
    """Yield ``(batch, size, counted)``: every batch whole (``size`` samples) with the number of its
    first samples that count, ``size`` except for the batch that crosses ``max_samples`` (then
    ``max_samples`` minus the samples before it), after which it stops. The batch is not cut: which
    of its tensors are per sample is for the estimator to verify (:func:`counting_first`)."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise InvalidArgumentError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if isinstance(data, Tensor):
        raise InvalidArgumentError(
            "data must be an iterable of batches (a DataLoader, a list of batches); wrap a single "
            "tensor batch as [tensor]"
        )
    if max_samples is not None and hasattr(data, "first") and getattr(data, "spans_processes", False):
        data, max_samples = data.first(max_samples), None  # a limit on the union of the ranks' shards
    seen = 0
    for batch in data:
        size = batch_size(batch_input(batch))
        if size == 0:
            continue
        counted = size if max_samples is None else min(size, max_samples - seen)
        yield batch, size, counted
        seen += counted
        if max_samples is not None and seen >= max_samples:
            return


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; each module's own ``training`` flag is restored after."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in previous:
            module.training = was_training


def finish(sums: dict[str, Tensor], count: int, *, scale: float, estimator: str,
            data: Any = None) -> dict[str, Tensor]:
    """``scale · sums / count``, checked; over all ranks when ``data`` is a rank's shard
    (:class:`mas_core.distributed.RankShard`): ``Σ_r sums_r / Σ_r count_r``."""
    if spans_processes(data):
        sums, count = all_reduce_sums(sums, count)
    if count == 0:
        raise EmptyDataError(
            f"the data source yielded no samples; {estimator} importance needs at least one batch"
        )
    result = {}
    for name, total in sums.items():
        value = total * (scale / count)
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(
                f"{estimator} importance of parameter {name!r} contains NaN or Inf; check the model "
                "and the data for NaN/overflow (a diverged model, a bad input)"
            )
        result[name] = value
    return result
