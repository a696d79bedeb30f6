"""How :mod:`mas_core` reads a batch.

A *data source* is any iterable of batches (a ``DataLoader``, a list, a generator).
A batch is one of

* a ``Tensor``: the input itself;
* a ``tuple``/``list``: the first element is the input, the second (if any) the
  labels; further elements are ignored;
* a ``dict``: the input under the key ``"input"`` and the labels under ``"target"``.

Importance estimators that are label-free (MAS, l-MAS) only ever call
:func:`batch_input`; they never read labels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

INPUT_KEY = "input"
TARGET_KEY = "target"


def batch_input(batch: Any) -> Any:
    """Return the input part of ``batch`` (see the module docstring for the layouts)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        if INPUT_KEY not in batch:
            raise KeyError(
                f"a dict batch must hold its input under the key {INPUT_KEY!r}; got keys {sorted(batch)}"
            )
        return batch[INPUT_KEY]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty tuple/list is not a batch: put the input first")
        return batch[0]
    raise TypeError(
        f"a batch must be a Tensor, a tuple/list whose first element is the input, or a dict "
        f"with key {INPUT_KEY!r}; got {type(batch).__name__}"
    )


def batch_target(batch: Any) -> Tensor:
    """Return the labels of ``batch``: second element of a tuple/list, or ``batch["target"]``."""
    if isinstance(batch, dict) and TARGET_KEY in batch:
        return batch[TARGET_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(
        "this estimator needs labels: pass batches as (input, target) tuples or dicts with "
        f"keys {INPUT_KEY!r} and {TARGET_KEY!r}"
    )


def batch_size(inputs: Any) -> int:
    """Number of samples in an input (first dimension of the first tensor found)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, dict):
        for value in inputs.values():
            return batch_size(value)
    if isinstance(inputs, (tuple, list)):
        for value in inputs:
            return batch_size(value)
    raise TypeError(f"cannot tell the batch size of {type(inputs).__name__}")


def move_to(inputs: Any, device: torch.device | str) -> Any:
    """Move a tensor or a nested tuple/list/dict of tensors to ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {key: move_to(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_to(value, device) for value in inputs)
    return inputs
