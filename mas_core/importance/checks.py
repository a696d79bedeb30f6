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

Verdicts are also remembered across estimates (:func:`remembered_checks`), per model object: the
verification costs one more forward and a comparison of every layer input, as much as the rest of
a small model's estimate, and an estimate is usually repeated on the same model (once per task,
per benchmark repeat). A remembered verdict is reused only when everything it was decided on is
the same: the model's modules and parameters (objects, shapes, dtypes, devices, ``requires_grad``),
its buffers' shapes, the objective's callables (the same ``output_fn`` / ``loss_fn`` objects, held
by weak reference), the batch's structure (the layout, every tensor's shape, dtype and device,
every other leaf's value) and which layers the batch's forward called with which input shapes.
The hidden-parameter check is not remembered: it runs once in every estimate.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

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
    """Verdicts cached across the batches of one estimate (or of one online accumulator);
    ``remembered``: the verdicts kept across estimates for this model and objective
    (:func:`remembered_checks`), keyed by :func:`batch_key`."""

    by_size: dict[int, SizeVerdict] = field(default_factory=dict)
    hidden_checked: bool = False
    remembered: dict[Hashable, SizeVerdict] | None = None

    def verdict(self, size: int, key: Hashable | None) -> SizeVerdict | None:
        """The verdict decided earlier for this batch size in this estimate, or for this very
        batch structure (``key``) in an earlier one; None when it must be verified."""
        found = self.by_size.get(size)
        if found is None and key is not None and self.remembered is not None:
            found = self.remembered.get(key)
            if found is not None:
                self.by_size[size] = found
        return found

    def keep(self, size: int, key: Hashable | None, verdict: SizeVerdict) -> None:
        self.by_size[size] = verdict
        if key is not None and self.remembered is not None:
            if len(self.remembered) >= _REMEMBERED_PER_MODEL:
                self.remembered.clear()  # bounded: a stream of ever new shapes never grows it
            self.remembered[key] = verdict


_REMEMBERED_PER_MODEL = 256
# model -> {(structure, objective ids): (weak references to the objective's callables, {batch key: verdict})}
_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[list[Any], dict[Hashable, SizeVerdict]]]]
_REMEMBERED = weakref.WeakKeyDictionary()


def _model_structure(model: nn.Module) -> Hashable:
    """What a verdict depends on in the model: its module objects and types, its parameters'
    objects, shapes, dtypes, devices and ``requires_grad``, its buffers' shapes and dtypes."""
    return (
        tuple((name, type(module), id(module)) for name, module in model.named_modules(remove_duplicate=False)),
        tuple((name, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
              for name, p in model.named_parameters(remove_duplicate=False)),
        tuple((name, tuple(b.shape), b.dtype) for name, b in model.named_buffers(remove_duplicate=False)),
    )


def _weak(function: Any) -> Any:
    """A weak reference to an objective's callable (``WeakMethod`` for bound methods); None when
    the callable cannot be weakly referenced (then nothing is remembered)."""
    try:
        return weakref.WeakMethod(function) if hasattr(function, "__self__") and hasattr(function, "__func__") \
            else weakref.ref(function)
    except TypeError:
        return None


def _same(referent: Any, part: Any) -> bool:
    """Whether a weak reference still points at ``part`` (a freed callable's id may be reused)."""
    if referent is part:
        return True
    try:
        return referent is not None and bool(referent == part)  # WeakMethod: a new, equal bound method
    except Exception:  # an __eq__ that does not answer a bool
        return False


def remembered_checks(model: nn.Module, objective: Callable[[nn.Module, Any], Tensor]) -> BatchChecks:
    """A :class:`BatchChecks` for one estimate whose verdicts are shared with every earlier and later
    estimate on ``model`` with the same structure and the same objective (module docs). The
    objective says what it is made of by a ``cache_identity`` tuple (a name and the user's callables,
    ``None`` for absent ones); an objective without one is verified afresh in every estimate."""
    identity = getattr(objective, "cache_identity", None)
    if identity is None:
        return BatchChecks()
    callables = [part for part in identity if part is not None and not isinstance(part, str)]
    references = [_weak(part) for part in callables]
    if any(reference is None for reference in references):
        return BatchChecks()
    key = (_model_structure(model), tuple(part if part is None or isinstance(part, str) else id(part)
                                          for part in identity))
    per_model = _REMEMBERED.setdefault(model, {})
    entry = per_model.get(key)
    if entry is None or not all(_same(reference(), part) for reference, part in zip(entry[0], callables)):
        if len(per_model) >= _REMEMBERED_PER_MODEL:
            per_model.clear()
        entry = per_model[key] = (references, {})
    return BatchChecks(remembered=entry[1])


def batch_key(batch: Any, calls: list[list[Any]]) -> Hashable | None:
    """The structure of a batch a verdict was decided on: its pytree layout, each tensor leaf's shape,
    dtype and device, each other leaf's type and value, and ``calls`` (for each layer, the shape of
    its input in each call, ``None`` for a call that recorded nothing); None when a leaf is neither a
    tensor nor a hashable value (the verdict is then not remembered)."""
    leaves, spec = tree_flatten(batch)
    described: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            described.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            described.append((type(leaf), leaf))
        else:
            return None
    return spec, tuple(described), tuple(tuple(None if call is None else tuple(call[0].shape) for call in layer_calls)
                                         for layer_calls in calls)


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
