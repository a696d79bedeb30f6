"""Mixing two importance estimates of the same parameters (``docs/method.md`` §12).

``Ω = (1 − ρ) · Ω_a + ρ · Ω_b`` elementwise, e.g. Ω_a from the training data and Ω_b from the
inputs the deployed model answered (:class:`~mas_core.importance.OnlineImportance`), with ρ the
stated share of the queries. Both are averages per sample, so ρ is the weight of the query
distribution in the mixture regardless of how many samples each side read.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, NonFiniteError, did_you_mean


def mix_importance(base: dict[str, Tensor], other: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """``{name: (1 − weight) · base[name] + weight · other[name]}``, in ``base``'s dtypes and devices.

    Args:
        base: Ω_a per parameter name (e.g. from the training data).
        other: Ω_b with the same names and shapes (e.g. from answered queries).
        weight: ρ in [0, 1], the share of ``other``; 0 returns ``base``'s values and 1
            ``other``'s, exactly.

    Raises:
        InvalidArgumentError (names, shapes or ρ), NonFiniteError (a NaN/Inf value).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0 \
            or not math.isfinite(weight):
        raise InvalidArgumentError(f"the mixing weight must be a number in [0, 1], got {weight!r}")
    if set(base) != set(other):
        only_base = sorted(set(base) - set(other))
        only_other = sorted(set(other) - set(base))
        name, present, absent = (only_base[0], "the first", other) if only_base else (only_other[0], "the second", base)
        raise InvalidArgumentError(
            f"both importances must cover the same parameters: {name!r} is only in {present}"
            f"{did_you_mean(name, absent)}"
        )
    mixed: dict[str, Tensor] = {}
    for name, a in base.items():
        b = other[name]
        if a.shape != b.shape:
            raise InvalidArgumentError(
                f"parameter {name!r} has importance of shape {tuple(a.shape)} in the first and {tuple(b.shape)} "
                "in the second; both must be taken on the same model"
            )
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise NonFiniteError(f"the importance of parameter {name!r} contains NaN or Inf; cannot mix it")
        b = b.detach().to(a)
        mixed[name] = a.detach() * (1.0 - weight) + b * weight
    return mixed
