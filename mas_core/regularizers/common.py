"""Small helpers shared by the regularizers: argument checks, finite checks, devices, shared parameters."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..batches import batch_input, batch_size
from ..errors import InvalidArgumentError, NonFiniteError


def check_lambda(name: str, value: Any) -> float:
    """Validate a penalty weight (finite, ``>= 0``) and return it as a float.

    Raises :class:`~mas_core.errors.InvalidArgumentError` naming the option otherwise.
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_max_samples(value: Any) -> int | None:
    """``None`` or a positive integer: the cap on samples an estimator reads after a task."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"max_samples must be a positive integer or None, got {value!r}")
    return value


def check_finite(kind: str, tensors: dict[str, Tensor], what_to_do: str) -> None:
    """Raise :class:`NonFiniteError` naming the first entry of ``tensors`` holding a NaN or Inf."""
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"{kind} of parameter {name} has NaN or Inf entries; {what_to_do}")


def detached_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: value.detach().clone()}``: the form in which state is stored and restored."""
    return {name: value.detach().clone() for name, value in tensors.items()}


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


def zero_penalty(model: nn.Module) -> Tensor:
    """A 0-d zero on the model's first parameter's device and dtype (the penalty of no method)."""
    for parameter in model.parameters():
        return parameter.new_zeros(())
    return torch.zeros(())


def shared_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that do not belong to ``model.heads`` (all of them if it has none)."""
    heads = getattr(model, "heads", None)
    head_ids = {id(parameter) for parameter in heads.parameters()} if isinstance(heads, nn.Module) else set()
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and id(parameter) not in head_ids]


class CountedSamples:
    """An iterable of batches passed through unchanged that counts the samples of the last pass:
    ``seen`` = Σ over the batches yielded of :func:`~mas_core.batches.batch_size` of each batch's input."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data, self.seen = data, 0

    def __iter__(self) -> Iterator[Any]:
        self.seen = 0
        for batch in self.data:
            try:
                self.seen += batch_size(batch_input(batch))  # the estimators' own count
            except (KeyError, TypeError, ValueError):
                pass  # the estimator reports a malformed batch itself
            yield batch


def counting_samples(data: Iterable[Any], max_samples: int | None) -> tuple[Iterable[Any], Callable[[], int]]:
    """``(data', used)``: ``data'`` to hand to an estimator in place of ``data``, and ``used()``, after the
    estimate, the number of samples it read: ``min(N, max_samples)`` with ``N`` the samples of ``data``.
    A :class:`~mas_core.distributed.RankShard` (it spans processes) is passed as it is and counted by its
    own ``count`` (every rank's samples), so the estimators still reduce across ranks."""
    if isinstance(data, Tensor):  # not an iterable of batches: left for the estimator to refuse
        return data, lambda: 0
    if getattr(data, "spans_processes", False) and hasattr(data, "count"):
        total = int(data.count)
        return data, lambda: total if max_samples is None else min(total, max_samples)
    counted = CountedSamples(data)
    return counted, lambda: counted.seen if max_samples is None else min(counted.seen, max_samples)
