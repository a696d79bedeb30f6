"""The checks that keep the exact per-sample engine from returning a wrong Ω (``docs/method.md`` §1.1).

The engine (:mod:`mas_core.importance.per_sample`) reads "per sample" off shapes: a layer input, or a
batch leaf, whose first dimension is the batch size ``B``. A shape can lie:

* a tensor that is not per-sample can have ``B`` rows by coincidence (a Linear applied to a table of
  ``B`` prototypes; a batch that carries a ``[B, d]`` table shared by all its samples);
* a parameter can change the output without the autograd graph reaching it (a module inside
  ``torch.utils.checkpoint(..., use_reentrant=True)`` whose input does not require grad), so the
  graph says "unused" and Ω would be 0.

:func:`verify_batch` runs the objective once more on the first ``B − 1`` samples (every batch leaf
with ``B`` rows cut to ``B − 1``) and says whether cutting the batch's leaves is safe (the ``B − 1``
objectives equal the full batch's first ``B − 1``); only then, when the cut run is a run of the first
``B − 1`` samples, it keeps as per-sample the layers whose input had ``B`` rows and now has ``B − 1``
rows equal to the full batch's first ``B − 1`` (a cut table of the batch would pass that test, so an
unsafe cut leaves no layer per-sample). For ``B = 1`` there is nothing to verify: the batch gradient
is the per-sample gradient. The users: the exact engine (MAS, Fisher), l-MAS's Hebbian sums
(:mod:`mas_core.importance.hebbian`); the ``max_samples`` cap never cuts a batch
(:func:`~mas_core.importance.common.counting_first`).
:func:`check_hidden_parameters` moves the parameters the graph does not reach and refuses the
estimate when the output moves with them. Verdicts are cached per batch size in a
:class:`BatchChecks` (the model's structure is assumed to depend on the batch only through its size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import InvalidOutputError
from .common import slice_batch
from .layers import Layer

HIDDEN_BY = "inside torch.utils.checkpoint(..., use_reentrant=True), or a function that hides parameters from autograd"
HIDDEN_FIX = "use use_reentrant=False or estimate without checkpointing"
_RELATIVE_TOLERANCE = 1e-4  # another batch size may round differently (GEMM blocking); a wrong cut differs by O(1)


@dataclass
class SizeVerdict:
    """What :func:`verify_batch` found for one batch size: the indices (into the engine's layer list)
    of the layers whose input is per-sample, and whether cutting the batch's ``B``-row leaves is safe."""

    per_sample_layers: set[int]
    slicing_is_safe: bool


@dataclass
class BatchChecks:
    """Verdicts cached across the batches of one estimate (or of one online accumulator)."""

    by_size: dict[int, SizeVerdict] = field(default_factory=dict)
    hidden_checked: bool = False


def _close(actual: Tensor, expected: Tensor) -> bool:
    if actual.shape != expected.shape:
        return False
    magnitudes = expected.detach().abs()
    finite = magnitudes[torch.isfinite(magnitudes)]
    scale = float(finite.max()) if finite.numel() else 0.0
    atol = _RELATIVE_TOLERANCE * scale + 1e-12  # NaN/Inf entries are left to the estimate's own finite check
    return bool(torch.allclose(actual.detach().to(expected.dtype), expected.detach(), rtol=_RELATIVE_TOLERANCE,
                               atol=atol, equal_nan=True))


def verify_batch(model: nn.Module, batch: Any, size: int, objective: Callable[[nn.Module, Any], Tensor],
                 layers: list[Layer], full_inputs: list[Tensor | None], full_objective: Tensor) -> SizeVerdict:
    """Which of ``layers`` really see one row per sample, and whether the batch may be cut.

    ``full_inputs[i]`` is layer ``i``'s input in the full batch (``None`` when it was not called
    exactly once); ``full_objective`` the full batch's per-sample objectives ``[B, ...]``. One
    forward of the first ``B − 1`` samples, without autograd (the model is in eval mode). When the
    cut is not safe no layer is per-sample (the cut run is not one of the first ``B − 1`` samples)."""
    if size < 2:
        return SizeVerdict(set(range(len(layers))), True)
    keep = size - 1
    seen: list[list[Tensor | None]] = [[] for _ in layers]

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[index].append(args[0].detach() if args and isinstance(args[0], Tensor) else None)

        return hook

    handles = [layer.module.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            part = objective(model, slice_batch(batch, size, keep))
    except Exception:  # the cut batch is not a batch of this model: nothing may be cut
        return SizeVerdict(set(), False)
    finally:
        for handle in handles:
            handle.remove()
    slicing_is_safe = isinstance(part, Tensor) and _close(part, full_objective[:keep])
    per_sample: set[int] = set()
    if not slicing_is_safe:
        return SizeVerdict(per_sample, False)
    for index, (full, calls) in enumerate(zip(full_inputs, seen)):
        if full is None or len(calls) != 1 or calls[0] is None or full.dim() == 0 or full.shape[0] != size:
            continue
        if calls[0].dim() >= 1 and calls[0].shape[0] == keep and _close(calls[0], full[:keep]):
            per_sample.add(index)
    return SizeVerdict(per_sample, slicing_is_safe)


def _perturbation(parameter: Tensor) -> Tensor:
    """A deterministic move of about 10 % of the parameter's typical size (no RNG is drawn)."""
    pattern = torch.cos(torch.arange(parameter.numel(), device=parameter.device, dtype=torch.float64) * 1.618)
    scale = 0.1 * (float(parameter.detach().abs().mean()) + 1e-3) if parameter.numel() else 0.0
    return (scale * pattern).to(parameter.dtype).reshape(parameter.shape)


def check_hidden_parameters(model: nn.Module, batch: Any, objective: Callable[[nn.Module, Any], Tensor],
                            reference: Tensor, unreached: dict[str, Tensor]) -> None:
    """Raise :class:`~mas_core.errors.InvalidOutputError` when a parameter the autograd graph does not
    reach (``unreached``) still changes the per-sample objectives ``reference``: its Ω would be 0.

    Each parameter is moved in place under ``torch.no_grad`` and restored bit for bit; one forward
    for all of them, one per parameter only when that forward moved."""
    if not unreached:
        return

    def moved(names: list[str]) -> bool:
        saved = {name: unreached[name].detach().clone() for name in names}
        try:
            with torch.no_grad():
                for name in names:
                    unreached[name].add_(_perturbation(unreached[name]))
                value = objective(model, batch)
        finally:
            with torch.no_grad():
                for name in names:
                    unreached[name].copy_(saved[name])
        return not _close(value, reference)

    names = list(unreached)
    if not moved(names):
        return
    culprits = [name for name in names if moved([name])] or names
    shown = ", ".join(repr(name) for name in culprits[:3]) + (f" and {len(culprits) - 3} more" if len(culprits) > 3 else "")
    plural = len(culprits) > 1
    raise InvalidOutputError(
        f"parameter{'s' if plural else ''} {shown} change{'' if plural else 's'} the output but the autograd graph "
        f"does not reach {'them' if plural else 'it'} ({HIDDEN_BY}), so the importance would be 0 there: {HIDDEN_FIX}"
    )
