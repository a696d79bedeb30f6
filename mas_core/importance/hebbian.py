"""Local MAS (l-MAS): Hebbian co-activation importance from forward passes only (``docs/method.md`` §4).

The sum runs over samples: ``Σ_k`` of the co-activations of sample ``k``'s own forward pass. One forward
of a batch gives that sum as the sum over a layer's rows only when the layer's input is one row per
sample; a shape cannot tell (a layer applied to a table of prototypes that happens to have ``B``
rows sees the table once per *batch*, not once per sample). So the same guard as the exact MAS
engine decides (:func:`~mas_core.importance.checks.verify_batch`, once per batch size): a layer
verified per-sample adds its rows of the counted samples; any other layer that took part in the
batch's forward is measured by one forward per counted sample (exact, slower). When the batch
cannot be cut into samples (a ``B``-row tensor of it is not per sample) and some layer is not
verified per-sample, the estimate raises :class:`~mas_core.errors.InvalidOutputError` instead of
returning a wrong Ω (batches of one sample are always exact).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..batches import batch_input, batch_size, move_to
from ..errors import InvalidOutputError
from .checks import BatchChecks, verify_batch
from .common import (OutputFn, evaluation_mode, finish, limited_batches, model_output, slice_batch,
                     trainable_parameters)
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
    co-activation event). ``k`` runs over samples, each with its own forward pass (module docs:
    how a batch is verified to give exactly that). ``max_samples``: only the first that many
    samples (the batch that crosses it runs whole, its later samples not counted). Parameters of
    every other module type (BatchNorm, embeddings, free parameters) get zero importance; they
    are still present in the result. Units: squared activations. Evaluated under
    ``torch.no_grad`` in eval mode.
    """
    trainable = trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    layers = hebbian_layers(model, trainable)
    device = next(iter(trainable.values())).device
    count = 0
    checks = BatchChecks()
    with evaluation_mode(model):
        for batch, size, counted in limited_batches(data, max_samples):
            batch = move_to(batch, device)
            accumulate_hebbian_batch(model, batch, layers, sums, output_fn, counted=counted, checks=checks)
            count += counted
    return finish(sums, count, scale=2.0, estimator="l-MAS", data=data)


def hebbian_layers(model: nn.Module, trainable: dict[str, nn.Parameter]) -> list[Layer]:
    """The Linear and Conv2d modules holding trainable parameters (the layers l-MAS measures)."""
    return [layer for layer in discover_layers(model, trainable, exclusive=False) if layer.kind in ("linear", "conv2d")]


def accumulate_hebbian_batch(model: nn.Module, batch: Any, layers: list[Layer], sums: dict[str, Tensor],
                             output_fn: OutputFn | None, *, counted: int | None = None,
                             checks: BatchChecks | None = None) -> None:
    """Add the raw co-activation sums ``Σ_{k<counted} Σ_{applications in k's forward} |y x|`` of the
    first ``counted`` samples of one batch (all by default) to ``sums`` (no ``2/N``); forward
    passes under ``torch.no_grad`` (the caller puts the model in eval mode). ``checks`` caches the
    per-sample verdicts across the batches of one estimate (``None``: verify this batch alone).
    Raises :class:`~mas_core.errors.InvalidOutputError` when the batch cannot be split into its
    samples (module docs)."""
    size = batch_size(batch_input(batch))
    counted = size if counted is None else counted
    checks = BatchChecks() if checks is None else checks
    verdict = checks.by_size.get(size)
    rows = slice(None) if counted == size else slice(0, counted)  # of a per-sample layer (B = 1: all of them)
    calls: list[list[tuple[Tensor, Tensor] | None]] = [[] for _ in layers]

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)):
                return
            if verdict is None:  # the first batch of this size: kept for verify_batch
                calls[index].append((args[0].detach(), output.detach()))
                return
            if index in verdict.per_sample_layers:  # verified: add the counted rows now
                _hebbian_accumulate(layers[index], args[0].detach()[rows], output.detach()[rows], sums)
            calls[index].append(None)  # called (a layer not per sample is measured sample by sample below)

        return hook

    with torch.no_grad():
        output = _forward_with_hooks(model, batch, output_fn, layers, make_hook)
    if verdict is None:
        full_inputs = [entries[0][0] if len(entries) == 1 else None for entries in calls]
        verdict = checks.by_size[size] = verify_batch(model, batch, size, _output_of(output_fn), layers, full_inputs,
                                                      output)
        for index in verdict.per_sample_layers:  # called once (B = 1: any number of times, or not at all)
            for layer_input, layer_output in calls[index]:
                _hebbian_accumulate(layers[index], layer_input[rows], layer_output[rows], sums)
    others = [index for index, entries in enumerate(calls) if entries and index not in verdict.per_sample_layers]
    if not others:
        return
    if not verdict.slicing_is_safe:
        shown = ", ".join(repr(_layer_name(model, layers[index])) for index in others[:3])
        raise InvalidOutputError(
            f"l-MAS cannot tell which rows of the input of {shown} belong to which sample: it is not one row per "
            f"sample, and the batch cannot be cut into its samples (a tensor of it with {size} rows is not per "
            "sample, or the model needs the whole batch); pass batches of one sample, or keep tables shared by "
            "all samples out of the batch (in the model, or in output_fn's closure)")
    chosen = [layers[index] for index in others]

    def make_sample_hook(layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                _hebbian_accumulate(layer, args[0].detach(), output.detach(), sums)

        return hook

    with torch.no_grad():
        for sample in range(counted):  # sample k's own forward, for the layers a batch cannot split
            _forward_with_hooks(model, slice_batch(batch, size, sample + 1, start=sample), output_fn, chosen,
                                lambda index: make_sample_hook(chosen[index]))


def _forward_with_hooks(model: nn.Module, batch: Any, output_fn: OutputFn | None, layers: list[Layer],
                        make_hook: Callable[[int], Callable[..., None]]) -> Tensor:
    """F(batch) with ``make_hook(i)`` as a forward hook on ``layers[i]`` for the duration."""
    handles = [layer.module.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        return model_output(model, batch, output_fn)
    finally:
        for handle in handles:
            handle.remove()


def _output_of(output_fn: OutputFn | None) -> Callable[[nn.Module, Any], Tensor]:
    """The function :func:`~mas_core.importance.checks.verify_batch` compares on the cut batch: F itself."""
    return lambda model, batch: model_output(model, batch, output_fn)


def _layer_name(model: nn.Module, layer: Layer) -> str:
    return next((name for name, module in model.named_modules() if module is layer.module), type(layer.module).__name__)


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
