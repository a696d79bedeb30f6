"""Local MAS (l-MAS): Hebbian co-activation importance from forward passes only (``docs/method.md`` §4)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..batches import move_to
from .common import OutputFn, evaluation_mode, finish, limited_batches, model_output, trainable_parameters
from .layers import Layer, conv_padded_input, conv_weight_gradient, discover_layers


def hebbian_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    output_fn: OutputFn | None = None,
    max_samples: int | None = None,
) -> dict[str, Tensor]:
    """Local MAS (l-MAS, ``docs/method.md`` §4): Hebbian co-activation importance, forward passes only.

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
    trainable = trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    layers = hebbian_layers(model, trainable)
    device = next(iter(trainable.values())).device
    count = 0
    with evaluation_mode(model):
        for batch, size in limited_batches(data, max_samples):
            batch = move_to(batch, device)
            accumulate_hebbian_batch(model, batch, layers, sums, output_fn)
            count += size
    return finish(sums, count, scale=2.0, estimator="l-MAS", data=data)


def hebbian_layers(model: nn.Module, trainable: dict[str, nn.Parameter]) -> list[Layer]:
    """The Linear and Conv2d modules holding trainable parameters (the layers l-MAS measures)."""
    return [layer for layer in discover_layers(model, trainable, exclusive=False) if layer.kind in ("linear", "conv2d")]


def accumulate_hebbian_batch(model: nn.Module, batch: Any, layers: list[Layer], sums: dict[str, Tensor],
                             output_fn: OutputFn | None) -> None:
    """Add the raw co-activation sums ``Σ_{n∈batch} |y x|`` of one batch to ``sums`` (no ``2/N``):
    one forward pass under ``torch.no_grad``; the caller puts the model in eval mode."""

    def make_hook(layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                _hebbian_accumulate(layer, args[0].detach(), output.detach(), sums)

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model_output(model, batch, output_fn)
    finally:
        for handle in handles:
            handle.remove()


def _hebbian_accumulate(layer: Layer, layer_input: Tensor, output: Tensor, sums: dict[str, Tensor]) -> None:
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
        pre = conv_padded_input(module, layer_input).abs()
        sums[names["weight"]] += conv_weight_gradient(module, pre, post, per_sample=False)
