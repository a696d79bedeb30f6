"""Parameter importance estimators: exact MAS, batch-level MAS, Hebbian l-MAS, diagonal Fisher.

All estimators are pure functions of ``(model, data, output_fn)`` and return a dict
``{parameter name: Tensor}`` with one entry per parameter that has
``requires_grad=True``, keyed by :meth:`torch.nn.Module.named_parameters` names and
shaped like the parameter.

Definitions (``../shared/MAS_SPEC.md``; N = number of samples actually seen)

* :func:`mas_importance`, ``mode="exact"`` (MAS, spec §1)::

      Ω = (1/N) Σ_k |∂ ‖F(x_k)‖₂² / ∂θ|            (elementwise; units of ‖F‖² per unit θ)

* :func:`mas_importance`, ``mode="batch"``, the estimator of the original code,
  Avalanche and FACIL, **for comparison only** (signs cancel inside a batch, so it is
  smaller than the exact one and depends on the batch size)::

      Ω_batch = (1/N) Σ_batches |∂ Σ_{k∈batch} ‖F(x_k)‖₂² / ∂θ|

* :func:`hebbian_importance` (l-MAS, spec §3), forward passes only, see its docstring.
* :func:`fisher_importance`: the diagonal empirical Fisher of EWC,
  ``F = (1/N) Σ_k (∂ℓ_k/∂θ)²``, per sample.

``F(x)`` is ``output_fn(model, batch)`` when given, else ``model(batch_input(batch))``
(see :mod:`mas_core.batches` for the batch layouts). The model is put in eval mode
while estimating (dropout off, BatchNorm on its running statistics) and every
module's previous ``training`` flag is restored afterwards. No buffer is written,
no ``.grad`` is touched, and the label-free estimators never read labels.

How the exact per-sample estimate is computed without materialising one gradient
per sample (the model must treat samples independently in eval mode, which every
standard layer does):

1. One ordinary forward pass of the whole batch records, for every ``nn.Linear``,
   ``nn.Conv2d`` and affine ``BatchNorm`` module, its input ``A`` and the autograd
   edge of its output; one backward pass (to those edges only: no weight gradients
   are formed) gives ``Δ = ∂ Σ_k s_k / ∂Y`` whose row ``k`` is ``∂ s_k / ∂y_k``.
   Then, for a Linear applied once to a 2-D input,
   ``Σ_k |δ_k a_kᵀ| = |Δ|ᵀ |A|`` and the bias gets ``Σ_k |δ_k|``; for a Conv2d the
   per-sample weight gradients are formed for a bounded chunk of samples at a time,
   by ``bmm`` over strided input patches (small layers) or by one weight-gradient
   convolution that runs the samples as extra groups (both much faster than
   ``unfold`` on CPU); for BatchNorm in eval mode the per-sample gradients are
   ``Σ_positions δ·x̂`` and ``Σ_positions δ``.
2. A module qualifies only if it was called exactly once in the batch, its input
   has the batch as first dimension (2-D for Linear, 4-D for Conv2d), and each of
   its trainable parameters is used exactly once in the autograd graph (so weight
   tying, a module applied twice per sample, or a parameter also used outside its
   module are all detected).
3. Every other parameter that the output depends on (Linear over sequences,
   embeddings, LayerNorm, free ``nn.Parameter`` s, ...) goes through the general
   fallback: :func:`torch.func.vmap` over :func:`torch.func.grad` with
   :func:`torch.func.functional_call` (buffers passed as they are), in chunks of
   samples so that at most about ``2**24`` per-sample gradient elements exist at
   once (or ``chunk_size`` samples when given). Parameters the output does not
   depend on (e.g. other tasks' heads) get exactly zero without any work.

``φ`` is ``|·|`` for MAS and ``(·)²`` for Fisher; the machinery is shared.

Several processes: when ``data`` is one rank's :class:`mas_core.distributed.RankShard`,
each rank sums ``φ(g_k)`` over its own samples on the module it is given (pass the
unwrapped model, never the DistributedDataParallel wrapper, whose backward averages
gradients across ranks before ``φ`` could be applied), then the sums and the sample
counts are all-reduced before dividing: ``Ω = Σ_r S_r / Σ_r N_r``, the single-process
value, the same on every rank. ``max_samples`` then counts samples of the whole source.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from mas_core.batches import batch_input, batch_size, batch_target, move_to
from mas_core.distributed import all_reduce_sums, spans_processes
from mas_core.errors import (
    InvalidArgumentError,
    EmptyDataError,
    InvalidOutputError,
    NoTrainableParametersError,
    NonFiniteError,
)

__all__ = [
    "InvalidArgumentError",
    "MAS_MODES",
    "fisher_importance",
    "hebbian_importance",
    "mas_importance",
]

OutputFn = Callable[[nn.Module, Any], Tensor]
"""``output_fn(model, batch) -> Tensor [batch, ...]``: the function F whose norm MAS protects."""

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor [batch]``: per-sample losses for the Fisher estimator."""

MAS_MODES = ("exact", "batch")

# Upper bound on the number of tensor elements a chunk of per-sample work may
# materialise (per-sample gradients in the fallback and for Conv2d weights).
_ELEMENT_BUDGET = 2**24

# Per-sample Conv2d weight gradients: patch matrices up to this many elements per sample
# go through strided patches + bmm, larger ones through a grouped weight-gradient conv.
_STRIDED_PATCH_LIMIT = 16384

_Elementwise = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Public estimators


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
            crosses the limit is truncated, so exactly that many are used).
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
    objective = _SquaredNormObjective(output_fn)
    if mode == "batch":
        return _batch_gradient_statistic(model, data, objective, torch.abs, max_samples, "MAS")
    return _per_sample_gradient_statistic(
        model, data, objective, torch.abs, max_samples, chunk_size, "MAS"
    )


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
    objective = _PerSampleLossObjective(output_fn, loss_fn)
    return _per_sample_gradient_statistic(
        model, data, objective, torch.square, max_samples, chunk_size, "Fisher"
    )


def hebbian_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    output_fn: OutputFn | None = None,
    max_samples: int | None = None,
) -> dict[str, Tensor]:
    """Local MAS (l-MAS, spec §3): Hebbian co-activation importance, forward passes only.

    For every ``nn.Linear`` with input ``x`` (pre-synaptic) and output ``y = Wx + b``
    (post-synaptic; ``∂‖y‖²/∂W_ij = 2 y_i x_j``)::

        Ω[W]_ij = (2/N) Σ_k |y_i^k x_j^k|          Ω[b]_i = (2/N) Σ_k |y_i^k|

    For ``nn.Conv2d`` (our choice, the same co-activation taken per output position
    ``p``, with ``x_{c,p+(u,v)}`` the input under kernel tap ``(u, v)`` at ``p``,
    padding included)::

        Ω[W]_{o,c,u,v} = (2/N) Σ_k Σ_p |y_{o,p}^k x_{c,p+(u,v)}^k|     Ω[b]_o = (2/N) Σ_k Σ_p |y_{o,p}^k|

    computed as the weight gradient of a convolution with input ``|X|`` (padded as the
    layer pads it) and output gradient ``|Y|``, summed over samples and positions at once. A Linear over a sequence sums over positions in the same way, and a
    module applied several times per sample sums over its applications (each one is a
    co-activation event). Parameters of every other module type (BatchNorm, embeddings,
    free parameters) get zero importance; they are still present in the result.
    Units: squared activations. Evaluated under ``torch.no_grad`` in eval mode.
    """
    trainable = _trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    layers = [
        layer for layer in _discover_layers(model, trainable, exclusive=False) if layer.kind in ("linear", "conv2d")
    ]

    def make_hook(layer: _Layer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                _hebbian_accumulate(layer, args[0].detach(), output.detach(), sums)

        return hook

    device = next(iter(trainable.values())).device
    count = 0
    with _evaluation_mode(model), torch.no_grad():
        handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
        try:
            for batch, size in _limited_batches(data, max_samples):
                batch = move_to(batch, device)
                _model_output(model, batch, output_fn)
                count += size
        finally:
            for handle in handles:
                handle.remove()
    return _finish(sums, count, scale=2.0, estimator="l-MAS", data=data)


# ----------------------------------------------------------------------------------------------
# Per-sample objectives s_k (shape [batch]); the estimators differentiate them.


def _model_output(model: nn.Module, batch: Any, output_fn: OutputFn | None) -> Tensor:
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


class _SquaredNormObjective:
    """s_k = ‖F(x_k)‖₂² (MAS)."""

    def __init__(self, output_fn: OutputFn | None) -> None:
        self.output_fn = output_fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        output = _model_output(model, batch, self.output_fn)
        return output.reshape(output.shape[0], -1).square().sum(dim=1)


class _PerSampleLossObjective:
    """s_k = ℓ_k: cross-entropy against the true label, or a user loss (Fisher)."""

    def __init__(self, output_fn: OutputFn | None, loss_fn: LossFn | None) -> None:
        self.output_fn = output_fn
        self.loss_fn = loss_fn

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
        logits = _model_output(model, batch, self.output_fn)
        if logits.dim() != 2:
            raise InvalidOutputError(
                f"the Fisher estimator expects logits of shape [batch, classes], got "
                f"{tuple(logits.shape)}; pass loss_fn for other outputs"
            )
        target = batch_target(batch)
        return F.cross_entropy(logits, target.to(logits.device), reduction="none")


# ----------------------------------------------------------------------------------------------
# Data handling


def _trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise NoTrainableParametersError(
            f"{type(model).__name__} has no parameter with requires_grad=True; unfreeze the "
            "parameters whose importance you want"
        )
    return trainable


def _is_batched(leaf: Any, size: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == size


def _slice_batch(batch: Any, size: int, keep: int) -> Any:
    """The first ``keep`` samples of ``batch`` (every tensor whose first dimension is ``size``)."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([leaf[:keep] if _is_batched(leaf, size) else leaf for leaf in leaves], spec)


def _limited_batches(data: Iterable[Any], max_samples: int | None) -> Iterator[tuple[Any, int]]:
    """Yield ``(batch, number of samples)``, truncated to ``max_samples`` in total."""
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
        if max_samples is not None and seen + size > max_samples:
            batch = _slice_batch(batch, size, max_samples - seen)
            size = max_samples - seen
        yield batch, size
        seen += size
        if max_samples is not None and seen >= max_samples:
            return


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; each module's own ``training`` flag is restored after."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in previous:
            module.training = was_training


def _finish(sums: dict[str, Tensor], count: int, *, scale: float, estimator: str,
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


# ----------------------------------------------------------------------------------------------
# Layers with an exact per-sample path


@dataclass
class _Layer:
    """A module with a closed-form per-sample gradient; ``names`` maps its attribute
    (``"weight"``/``"bias"``) to the trainable parameter's name (exclusive owner only)."""

    module: nn.Module
    kind: str  # "linear" | "conv2d" | "batchnorm"
    names: dict[str, str]

    def parameters(self) -> list[Tensor]:
        return [getattr(self.module, attribute) for attribute in self.names]

    def accepts(self, layer_input: Tensor, size: int) -> bool:
        if layer_input.dim() == 0 or layer_input.shape[0] != size:
            return False
        if self.kind == "linear":
            return layer_input.dim() == 2
        if self.kind == "conv2d":
            return layer_input.dim() == 4
        return layer_input.dim() >= 2 and not self.module.training and self.module.running_mean is not None


def _layer_kind(module: nn.Module) -> str | None:
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return "linear"
    if forward is nn.Conv2d.forward:
        return "conv2d"
    if forward is nn.modules.batchnorm._BatchNorm.forward and module.affine:
        return "batchnorm"
    return None


def _discover_layers(model: nn.Module, trainable: dict[str, nn.Parameter], *, exclusive: bool = True) -> list[_Layer]:
    """Linear/Conv2d/affine-BatchNorm modules with trainable parameters; with ``exclusive``,
    only parameters owned by that one module are listed (shared ones need the fallback)."""
    name_of = {id(p): name for name, p in trainable.items()}
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    layers = []
    for module in model.modules():
        kind = _layer_kind(module)
        if kind is None:
            continue
        names = {}
        for attribute in ("weight", "bias"):
            parameter = getattr(module, attribute, None)
            if isinstance(parameter, Tensor) and id(parameter) in name_of and (owners[id(parameter)] == 1 or not exclusive):
                names[attribute] = name_of[id(parameter)]
        if names:
            layers.append(_Layer(module, kind, names))
    return layers


def _count_parameter_uses(root: Tensor) -> dict[int, int]:
    """How many autograd edges lead from ``root``'s graph into each leaf (by ``id``)."""
    uses: dict[int, int] = {}
    if root.grad_fn is None:
        return uses
    seen = {root.grad_fn}
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        for next_node, _ in node.next_functions:
            if next_node is None:
                continue
            variable = getattr(next_node, "variable", None)
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            elif next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return uses


def _nearby_leaves(node: Any, depth: int = 2) -> set[int]:
    """``id`` of the leaves within ``depth`` autograd edges of ``node`` (a layer's own
    parameters: Conv/BatchNorm at 1, a Linear weight behind its transpose at 2)."""
    found: set[int] = set()
    frontier = [node]
    for _ in range(depth):
        following = []
        for current in frontier:
            for next_node, _ in getattr(current, "next_functions", ()):
                if next_node is None:
                    continue
                variable = getattr(next_node, "variable", None)
                if variable is not None:
                    found.add(id(variable))
                else:
                    following.append(next_node)
        frontier = following
    return found


def _conv_padded_input(module: nn.Conv2d, layer_input: Tensor) -> Tensor:
    """The input of a Conv2d padded exactly as ``nn.Conv2d`` pads it (any ``padding_mode``,
    ``"same"``/``"valid"``), so that the convolution itself runs with padding 0."""
    kernel = module.kernel_size
    if isinstance(module.padding, str):
        pads: list[int] = []
        for dimension in (1, 0):  # F.pad order: last dimension first
            if module.padding == "same":
                total = module.dilation[dimension] * (kernel[dimension] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [0, 0]
    else:
        pads = [module.padding[1], module.padding[1], module.padding[0], module.padding[0]]
    if not any(pads):
        return layer_input
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(layer_input, pads, mode=mode)


def _conv_weight_gradient(module: nn.Conv2d, padded_input: Tensor, grad_output: Tensor, *, per_sample: bool) -> Tensor:
    """``∂/∂W`` of ``⟨grad_output, conv(padded_input)⟩``: summed over the batch, or per sample
    (``[batch, *weight.shape]``).

    Per sample, small patch matrices (``in_channels/groups · kh · kw · positions`` up to
    ``_STRIDED_PATCH_LIMIT``) are gathered with a strided view and multiplied with ``bmm``;
    larger ones run the batch as extra groups of one weight-gradient convolution. Both are
    exact; the switch only picks the faster one on CPU (``benchmarks/bench_importance.py``)."""
    weight_shape = module.weight.shape
    if not per_sample:
        return torch.nn.grad.conv2d_weight(
            padded_input, weight_shape, grad_output, module.stride, 0, module.dilation, module.groups
        )
    size = padded_input.shape[0]
    out_channels, group_in, kernel_h, kernel_w = weight_shape
    groups = module.groups
    positions = grad_output.shape[2] * grad_output.shape[3]
    if group_in * kernel_h * kernel_w * positions <= _STRIDED_PATCH_LIMIT:
        padded_input = padded_input.contiguous()
        s_batch, s_channel, s_row, s_column = padded_input.stride()
        patches = padded_input.as_strided(
            (size, groups * group_in, kernel_h, kernel_w, grad_output.shape[2], grad_output.shape[3]),
            (s_batch, s_channel, s_row * module.dilation[0], s_column * module.dilation[1],
             s_row * module.stride[0], s_column * module.stride[1]),
        ).reshape(size, groups, group_in * kernel_h * kernel_w, positions)
        grads = grad_output.reshape(size, groups, out_channels // groups, positions) @ patches.transpose(2, 3)
        return grads.reshape(size, *weight_shape)
    grads = torch.nn.grad.conv2d_weight(
        padded_input.reshape(1, -1, *padded_input.shape[2:]),
        (size * weight_shape[0], *weight_shape[1:]),
        grad_output.reshape(1, -1, *grad_output.shape[2:]),
        module.stride, 0, module.dilation, module.groups * size,
    )
    return grads.reshape(size, *weight_shape)


def _chunk(total: int, per_sample_elements: int, requested: int | None = None) -> int:
    if requested is not None:
        return max(1, min(total, requested))
    return max(1, min(total, _ELEMENT_BUDGET // max(1, per_sample_elements)))


def _exact_accumulate(layer: _Layer, layer_input: Tensor, grad: Tensor, phi: _Elementwise, sums: dict[str, Tensor]) -> None:
    """Add ``Σ_k φ(per-sample gradient)`` of ``layer``'s parameters to ``sums``.

    ``grad`` is ``∂ Σ_k s_k / ∂(layer output)``, whose slice ``k`` is ``∂ s_k/∂y_k``."""
    module = layer.module
    names = layer.names
    size = layer_input.shape[0]
    if layer.kind == "linear":
        if "weight" in names:
            sums[names["weight"]] += phi(grad).transpose(0, 1) @ phi(layer_input)
        if "bias" in names:
            sums[names["bias"]] += phi(grad).sum(dim=0)
        return
    if layer.kind == "conv2d":
        if "bias" in names:
            sums[names["bias"]] += phi(grad.reshape(size, grad.shape[1], -1).sum(dim=2)).sum(dim=0)
        if "weight" in names:
            padded = _conv_padded_input(module, layer_input)
            positions = grad.shape[2] * grad.shape[3]
            step = _chunk(size, module.weight.numel() + module.weight[0].numel() * module.groups * positions)
            total = sums[names["weight"]]
            for start in range(0, size, step):
                per_sample_grad = _conv_weight_gradient(
                    module, padded[start:start + step], grad[start:start + step], per_sample=True
                )
                total += phi(per_sample_grad).sum(dim=0)
        return
    # batchnorm in eval mode: y = γ (x − μ)/√(σ² + ε) + β per channel (dimension 1)
    channels = layer_input.shape[1]
    view = [1, channels] + [1] * (layer_input.dim() - 2)
    grad_flat = grad.reshape(size, channels, -1)
    if "weight" in names:
        normalised = (layer_input - module.running_mean.view(view)) * torch.rsqrt(module.running_var.view(view) + module.eps)
        sums[names["weight"]] += phi((grad_flat * normalised.reshape(size, channels, -1)).sum(dim=2)).sum(dim=0)
    if "bias" in names:
        sums[names["bias"]] += phi(grad_flat.sum(dim=2)).sum(dim=0)


def _hebbian_accumulate(layer: _Layer, layer_input: Tensor, output: Tensor, sums: dict[str, Tensor]) -> None:
    """Add Σ |y x| co-activations of one application of ``layer`` to ``sums`` (no 2/N yet)."""
    module = layer.module
    names = layer.names
    if layer.kind == "linear":
        x = layer_input.reshape(-1, module.in_features).abs()
        y = output.reshape(-1, module.out_features).abs()
        if "weight" in names:
            sums[names["weight"]] += y.transpose(0, 1) @ x
        if "bias" in names:
            sums[names["bias"]] += y.sum(dim=0)
        return
    if layer_input.dim() == 3:  # unbatched Conv2d input [C, H, W]
        layer_input, output = layer_input.unsqueeze(0), output.unsqueeze(0)
    post = output.abs()
    if "bias" in names:
        sums[names["bias"]] += post.sum(dim=(0, 2, 3))
    if "weight" in names:
        pre = _conv_padded_input(module, layer_input).abs()
        sums[names["weight"]] += _conv_weight_gradient(module, pre, post, per_sample=False)


# ----------------------------------------------------------------------------------------------
# The engines


def _per_sample_gradient_statistic(
    model: nn.Module,
    data: Iterable[Any],
    objective: Callable[[nn.Module, Any], Tensor],
    phi: _Elementwise,
    max_samples: int | None,
    chunk_size: int | None,
    estimator: str,
) -> dict[str, Tensor]:
    """``(1/N) Σ_k φ(∂ s_k/∂θ)`` for every trainable θ, exactly, per sample (see module docs)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InvalidArgumentError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    trainable = _trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    layers = _discover_layers(model, trainable)
    device = next(iter(trainable.values())).device
    count = 0
    with _evaluation_mode(model):
        for batch, size in _limited_batches(data, max_samples):
            batch = move_to(batch, device)
            _accumulate_batch(model, batch, size, objective, phi, sums, trainable, layers, chunk_size)
            count += size
    return _finish(sums, count, scale=1.0, estimator=estimator, data=data)


def _accumulate_batch(
    model: nn.Module,
    batch: Any,
    size: int,
    objective: Callable[[nn.Module, Any], Tensor],
    phi: _Elementwise,
    sums: dict[str, Tensor],
    trainable: dict[str, nn.Parameter],
    layers: list[_Layer],
    chunk_size: int | None,
) -> None:
    records: list[list[tuple[Tensor, GradientEdge] | None]] = [[] for _ in layers]

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor) and output.requires_grad:
                records[index].append((args[0].detach(), get_gradient_edge(output)))
            else:
                records[index].append(None)

        return hook

    handles = [layer.module.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            per_sample = objective(model, batch)
            total = per_sample.sum()
    finally:
        for handle in handles:
            handle.remove()
    if not total.requires_grad:
        raise InvalidOutputError(
            "the output does not depend on any trainable parameter (is output_fn running under "
            "torch.no_grad() or detaching?)"
        )
    uses = _count_parameter_uses(total)
    exact: list[tuple[_Layer, Tensor, GradientEdge]] = []
    for layer, calls in zip(layers, records):
        if len(calls) != 1 or calls[0] is None:
            continue
        layer_input, edge = calls[0]
        if not layer.accepts(layer_input, size):
            continue
        parameters = layer.parameters()
        counts = [uses.get(id(parameter), 0) for parameter in parameters]
        if max(counts) == 0:
            continue  # the output does not depend on this layer: its gradient is exactly 0
        near = _nearby_leaves(edge.node)
        if all(count == 1 and id(parameter) in near for parameter, count in zip(parameters, counts)):
            exact.append((layer, layer_input, edge))
    covered = {id(parameter) for layer, _, _ in exact for parameter in layer.parameters()}
    fallback = [
        name for name, parameter in trainable.items()
        if uses.get(id(parameter), 0) > 0 and id(parameter) not in covered
    ]
    if exact:
        grads = torch.autograd.grad(total, [edge for _, _, edge in exact])
        for (layer, layer_input, _), grad in zip(exact, grads):
            _exact_accumulate(layer, layer_input, grad, phi, sums)
    del total, per_sample, records, exact
    if fallback:
        _accumulate_vectorised(model, batch, size, objective, phi, sums, fallback, chunk_size)


class _ObjectiveModule(nn.Module):
    """Wraps ``objective(model, batch)`` so :func:`torch.func.functional_call` can swap the
    parameters of ``model`` (keys ``"model.<name>"``) while ``output_fn`` sees the model."""

    def __init__(self, model: nn.Module, objective: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any) -> Tensor:
        return self.objective(self.model, batch)


def _accumulate_vectorised(
    model: nn.Module,
    batch: Any,
    size: int,
    objective: Callable[[nn.Module, Any], Tensor],
    phi: _Elementwise,
    sums: dict[str, Tensor],
    names: list[str],
    chunk_size: int | None,
) -> None:
    """The general fallback: per-sample gradients of ``names`` by vmap over grad, chunked."""
    wrapper = _ObjectiveModule(model, objective)
    parameters = dict(model.named_parameters())
    differentiable = {name: parameters[name].detach() for name in names}
    constants = {f"model.{name}": p.detach() for name, p in parameters.items() if name not in differentiable}
    constants.update({f"model.{name}": buffer for name, buffer in model.named_buffers()})
    leaves, spec = tree_flatten(batch)
    positions = [i for i, leaf in enumerate(leaves) if _is_batched(leaf, size)]

    def sample_objective(weights: dict[str, Tensor], sample_leaves: list[Tensor]) -> Tensor:
        rebuilt = list(leaves)
        for position, leaf in zip(positions, sample_leaves):
            rebuilt[position] = leaf.unsqueeze(0)
        state = dict(constants)
        state.update({f"model.{name}": tensor for name, tensor in weights.items()})
        return torch.func.functional_call(wrapper, state, (tree_unflatten(rebuilt, spec),)).sum()

    per_sample_grads = torch.func.vmap(torch.func.grad(sample_objective), in_dims=(None, 0))
    step = _chunk(size, sum(t.numel() for t in differentiable.values()), chunk_size)
    for start in range(0, size, step):
        chunk = [leaves[i][start:start + step] for i in positions]
        with torch.enable_grad():
            grads = per_sample_grads(differentiable, chunk)
        for name in names:
            sums[name] += phi(grads[name]).sum(dim=0)


def _batch_gradient_statistic(
    model: nn.Module,
    data: Iterable[Any],
    objective: Callable[[nn.Module, Any], Tensor],
    phi: _Elementwise,
    max_samples: int | None,
    estimator: str,
) -> dict[str, Tensor]:
    """``(1/N) Σ_batches φ(∂ Σ_{k∈batch} s_k/∂θ)``: the batch-level estimator (comparison only)."""
    trainable = _trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    names = list(trainable)
    device = next(iter(trainable.values())).device
    count = 0
    with _evaluation_mode(model):
        for batch, size in _limited_batches(data, max_samples):
            batch = move_to(batch, device)
            with torch.enable_grad():
                total = objective(model, batch).sum()
            if not total.requires_grad:
                raise InvalidOutputError(
                    "the output does not depend on any trainable parameter (is output_fn running "
                    "under torch.no_grad() or detaching?)"
                )
            grads = torch.autograd.grad(total, [trainable[name] for name in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    sums[name] += phi(grad)
            count += size
    return _finish(sums, count, scale=1.0, estimator=f"{estimator} (batch mode)", data=data)
