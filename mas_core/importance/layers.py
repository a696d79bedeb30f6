"""Layers whose per-sample gradients have a closed form: Linear, Conv2d, affine BatchNorm (eval mode).

:func:`discover_layers` finds them; :func:`count_parameter_uses` and :func:`nearby_leaves` let the
engine (:mod:`mas_core.importance.per_sample`) check, on the autograd graph, that each of their
parameters is used exactly once and by that module; :func:`exact_accumulate` then adds
``Σ_n φ(∂s_n/∂θ)`` from the layer's input ``A`` and the gradient ``Δ`` at its output:

* Linear on a 2-D input: ``Σ_n φ(δ_n a_nᵀ) = φ(Δ)ᵀ φ(A)`` (exact for φ = ``|·|`` and ``(·)²``, which
  are multiplicative), bias ``Σ_n φ(δ_n)``;
* Conv2d: per-sample weight gradients for a cache-sized chunk of samples at a time, by ``bmm`` over
  strided input patches or by one weight-gradient convolution that runs the samples as extra
  groups (:func:`conv_weight_gradient`, :func:`per_sample_conv_by_groups`);
* BatchNorm in eval mode: ``Σ_positions δ·x̂`` and ``Σ_positions δ`` per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import Elementwise

# Upper bound on the number of tensor elements a chunk of per-sample work may
# materialise (per-sample gradients in the fallback and for Conv2d weights).
_ELEMENT_BUDGET = 2**24

# Per-sample Conv2d weight gradients: patch matrices up to this many elements per sample
# go through strided patches + bmm, larger ones through a grouped weight-gradient conv.
_STRIDED_PATCH_LIMIT = 16384

# ... and so do patch rows of ``in_channels/groups · kh · kw`` in this range whatever their size:
# there the small per-sample products run below the grouped convolution on a CPU (the stride-2 CNN's
# 16→32 layer: 3.1 against 4.1 ms per 256 samples, chunked), while below it (first layers, 1×1) and
# above it (3×3 over 64 channels and more) the patches win (docs/benchmarks.md, issue 27).
_GROUPED_PATCH_ROWS = (64, 256)

# Per-sample Conv2d work runs in chunks of samples whose per-sample gradients and patches hold about
# this many elements (4 MiB of float32): they stay in the cache between the product, φ and the sum
# over samples (the whole batch of 256 at once was 1.3-1.5x slower, benchmarks/bench_importance.py).
_CONV_CHUNK_ELEMENTS = 2**20


@dataclass
class Layer:
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


def discover_layers(model: nn.Module, trainable: dict[str, nn.Parameter], *, exclusive: bool = True) -> list[Layer]:
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
            layers.append(Layer(module, kind, names))
    return layers


def count_parameter_uses(root: Tensor) -> dict[int, int]:
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


def nearby_leaves(node: Any, depth: int = 2) -> set[int]:
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


def conv_padded_input(module: nn.Conv2d, layer_input: Tensor) -> Tensor:
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


def per_sample_conv_by_groups(module: nn.Conv2d, positions: int) -> bool:
    """Whether :func:`conv_weight_gradient` forms ``module``'s per-sample weight gradients by one
    grouped weight-gradient convolution (else by ``bmm`` over strided patches), for ``positions``
    output positions per sample. Both are exact; the rule only picks the faster one on a CPU."""
    patch_rows = module.weight[0].numel()  # in_channels/groups · kh · kw
    low, high = _GROUPED_PATCH_ROWS
    return patch_rows * positions > _STRIDED_PATCH_LIMIT or low <= patch_rows <= high


def conv_weight_gradient(module: nn.Conv2d, padded_input: Tensor, grad_output: Tensor, *, per_sample: bool,
                         padding: tuple[int, int] = (0, 0)) -> Tensor:
    """``∂/∂W`` of ``⟨grad_output, conv(padded_input)⟩``: summed over the batch, or per sample
    (``[batch, *weight.shape]``). ``padding`` (zeros) is what ``padded_input`` still lacks; the
    ``bmm`` path needs it applied (0).

    Per sample (:func:`per_sample_conv_by_groups` decides), patch matrices are gathered with a
    strided view and multiplied with ``bmm``, or the batch runs as extra groups of one
    weight-gradient convolution. Both are exact; the switch only picks the faster one on CPU
    (``benchmarks/bench_importance.py``)."""
    weight_shape = module.weight.shape
    if not per_sample:
        return torch.nn.grad.conv2d_weight(
            padded_input, weight_shape, grad_output, module.stride, padding, module.dilation, module.groups
        )
    size = padded_input.shape[0]
    out_channels, group_in, kernel_h, kernel_w = weight_shape
    groups = module.groups
    positions = grad_output.shape[2] * grad_output.shape[3]
    if not per_sample_conv_by_groups(module, positions):
        if any(padding):
            raise ValueError("the bmm path of conv_weight_gradient needs the padded input")
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
        module.stride, padding, module.dilation, module.groups * size,
    )
    return grads.reshape(size, *weight_shape)


def _zero_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """``module``'s padding as the convolution's own ``padding`` argument, when it pads with zeros
    by a number of pixels (no copy of the input); ``None`` when :func:`conv_padded_input` must pad."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return (int(module.padding[0]), int(module.padding[1]))


def chunk_samples(total: int, per_sample_elements: int, requested: int | None = None) -> int:
    if requested is not None:
        return max(1, min(total, requested))
    return max(1, min(total, _ELEMENT_BUDGET // max(1, per_sample_elements)))


def _phi_in_place(phi: Elementwise, values: Tensor) -> Tensor:
    """``φ(values)``, written over ``values`` (a temporary) for ``|·|`` and ``(·)²``: one pass and no
    second per-sample-gradient-sized tensor."""
    if phi is torch.abs:
        return values.abs_()
    if phi is torch.square:
        return values.square_()
    return phi(values)


def exact_accumulate(layer: Layer, layer_input: Tensor, grad: Tensor, phi: Elementwise, sums: dict[str, Tensor]) -> None:
    """Add ``Σ_k φ(per-sample gradient)`` of ``layer``'s parameters to ``sums``.

    ``grad`` is ``∂ Σ_k s_k / ∂(layer output)``, whose slice ``k`` is ``∂ s_k/∂y_k``."""
    module = layer.module
    names = layer.names
    size = layer_input.shape[0]
    if layer.kind == "linear":
        grad_phi = phi(grad)
        if "weight" in names:
            sums[names["weight"]] += grad_phi.transpose(0, 1) @ phi(layer_input)
        if "bias" in names:
            sums[names["bias"]] += grad_phi.sum(dim=0)
        return
    if layer.kind == "conv2d":
        if "bias" in names:
            sums[names["bias"]] += phi(grad.reshape(size, grad.shape[1], -1).sum(dim=2)).sum(dim=0)
        if "weight" in names:
            positions = grad.shape[2] * grad.shape[3]
            padding = _zero_padding(module) if per_sample_conv_by_groups(module, positions) else None
            padded = conv_padded_input(module, layer_input) if padding is None else layer_input
            per_sample_elements = module.weight.numel() + module.weight[0].numel() * module.groups * positions
            step = max(1, min(size, _CONV_CHUNK_ELEMENTS // per_sample_elements))
            total = sums[names["weight"]]
            for start in range(0, size, step):
                per_sample_grad = conv_weight_gradient(
                    module, padded[start:start + step], grad[start:start + step], per_sample=True,
                    padding=padding or (0, 0),
                )
                total += _phi_in_place(phi, per_sample_grad).sum(dim=0)
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
