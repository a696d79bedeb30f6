"""The exact per-sample engine: ``(1/N) Σ_n φ(∂s_n/∂θ)`` without one backward pass per sample.

``s_n`` is the per-sample objective (``‖F(x_n)‖₂²`` for MAS, the loss ``ℓ_n`` for Fisher) and φ is
``|·|`` (MAS) or ``(·)²`` (Fisher); ``docs/method.md`` §1 gives the definition. The model must treat
samples independently in eval mode, as every standard layer does, with the batch as the first
dimension of its inputs.

1. One ordinary forward pass of the whole batch records, for every Linear, Conv2d and affine
   BatchNorm module (:mod:`mas_core.importance.layers`), its input and the autograd edge of its
   output; one backward pass to those edges only (no weight gradients are formed) gives
   ``Δ = ∂ Σ_n s_n / ∂Y`` whose row ``n`` is ``∂s_n/∂y_n``; the layer's closed form does the rest.
2. A module qualifies only if it was called exactly once in the batch, its input has the batch as
   first dimension (2-D for Linear, 4-D for Conv2d) *and really is per sample* (the objective run
   on the first ``B − 1`` samples gives that module ``B − 1`` rows equal to the full batch's first
   ones: :func:`~mas_core.importance.checks.verify_batch`, once per batch size in an estimate and
   once per model structure, objective and batch structure across estimates
   (:func:`~mas_core.importance.checks.remembered_checks`); a Linear applied to
   a table that merely has ``B`` rows does not qualify), and each of its trainable parameters is
   used exactly once in the autograd graph (weight tying, a module applied twice per sample, or a
   parameter also used outside its module are all detected).
3. Every other parameter the output depends on (Linear over sequences, embeddings, LayerNorm, free
   ``nn.Parameter`` s, …) goes through the general fallback :func:`_accumulate_vectorised`:
   :func:`torch.func.vmap` over :func:`torch.func.grad` with :func:`torch.func.functional_call`
   (buffers passed as they are), in chunks of samples so that at most about ``2**24`` per-sample
   gradient elements exist at once (or ``chunk_size`` samples). It cuts every batch leaf with
   ``B`` rows into samples, which is only done when cutting was verified to be safe (step 2's run
   on ``B − 1`` samples gives the same objectives); otherwise, and when vmap cannot run the model
   (GRU, LSTM, RNN layers; data-dependent control flow), :func:`_accumulate_by_backward` takes the
   per-sample gradients from one forward of the whole batch (a batched backward, else one backward
   per sample): exact, and slower.
4. Parameters the output does not depend on (e.g. other tasks' heads) get exactly zero without any
   work, after one check (:func:`~mas_core.importance.checks.check_hidden_parameters`) that moving
   them leaves the output unchanged: a module inside ``torch.utils.checkpoint(...,
   use_reentrant=True)`` is invisible to the graph, and its Ω would silently be 0; it raises instead.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..batches import move_to
from ..errors import InvalidArgumentError, InvalidOutputError
from .checks import HIDDEN_FIX, BatchChecks, batch_key, check_hidden_parameters, remembered_checks, verify_batch
from .common import (Elementwise, counting_first, evaluation_mode, finish, is_batched, limited_batches,
                     trainable_parameters)
from .layers import Layer, chunk_samples, count_parameter_uses, discover_layers, exact_accumulate, nearby_leaves


def per_sample_gradient_statistic(
    model: nn.Module,
    data: Iterable[Any],
    objective: Callable[[nn.Module, Any], Tensor],
    phi: Elementwise,
    max_samples: int | None,
    chunk_size: int | None,
    estimator: str,
) -> dict[str, Tensor]:
    """``(1/N) Σ_k φ(∂ s_k/∂θ)`` for every trainable θ, exactly, per sample (see module docs)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InvalidArgumentError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    trainable = trainable_parameters(model)
    sums = {name: torch.zeros_like(parameter) for name, parameter in trainable.items()}
    layers = discover_layers(model, trainable)
    device = next(iter(trainable.values())).device
    count = 0
    checks = remembered_checks(model, objective)  # the verdicts of earlier estimates on this model
    with evaluation_mode(model):
        for batch, size, counted in limited_batches(data, max_samples):
            batch = move_to(batch, device)
            accumulate_counted(model, batch, size, counted, objective, phi, sums, trainable, layers, chunk_size, checks)
            count += counted
    return finish(sums, count, scale=1.0, estimator=estimator, data=data)


def accumulate_counted(model: nn.Module, batch: Any, size: int, counted: int,
                       objective: Callable[[nn.Module, Any], Tensor], phi: Elementwise, sums: dict[str, Tensor],
                       trainable: dict[str, nn.Parameter], layers: list[Layer], chunk_size: int | None,
                       checks: BatchChecks) -> None:
    """:func:`accumulate_batch` of the first ``counted`` samples of a batch of ``size``: the whole
    batch, the others' objectives multiplied by 0 (:func:`~mas_core.importance.common.counting_first`;
    the ``max_samples`` cap never cuts a batch), verified on its own (not cached in ``checks``)."""
    if counted < size:
        batch, objective = counting_first(batch, size, counted, objective)
        checks = BatchChecks(hidden_checked=checks.hidden_checked)
    accumulate_batch(model, batch, size, objective, phi, sums, trainable, layers, chunk_size, checks)


def accumulate_batch(
    model: nn.Module,
    batch: Any,
    size: int,
    objective: Callable[[nn.Module, Any], Tensor],
    phi: Elementwise,
    sums: dict[str, Tensor],
    trainable: dict[str, nn.Parameter],
    layers: list[Layer],
    chunk_size: int | None,
    checks: BatchChecks | None = None,
) -> None:
    """Add ``Σ_{n∈batch} φ(∂s_n/∂θ)`` of one batch of ``size`` samples to ``sums`` (no division).
    The caller puts the model in eval mode; ``layers`` is :func:`discover_layers` of ``trainable``;
    ``checks`` caches the per-sample verdicts across the batches of one estimate (``None``: verify
    this batch on its own)."""
    checks = BatchChecks() if checks is None else checks
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
            "torch.no_grad(), detaching, or inside torch.utils.checkpoint(..., use_reentrant=True)?)"
        )
    reference = per_sample.detach().clone()
    key = batch_key(batch, records) if checks.remembered is not None else None
    verdict = checks.verdict(size, key)
    if verdict is None:
        full_inputs = [calls[0][0] if len(calls) == 1 and calls[0] is not None else None for calls in records]
        verdict = verify_batch(model, batch, size, objective, layers, full_inputs, reference)
        checks.keep(size, key, verdict)
    uses = count_parameter_uses(total)
    exact: list[tuple[Layer, Tensor, GradientEdge]] = []
    for index, (layer, calls) in enumerate(zip(layers, records)):
        if len(calls) != 1 or calls[0] is None or index not in verdict.per_sample_layers:
            continue
        layer_input, edge = calls[0]
        if not layer.accepts(layer_input, size):
            continue
        parameters = layer.parameters()
        counts = [uses.get(id(parameter), 0) for parameter in parameters]
        if max(counts) == 0:
            continue  # the output does not depend on this layer: its gradient is exactly 0
        near = nearby_leaves(edge.node)
        if all(count == 1 and id(parameter) in near for parameter, count in zip(parameters, counts)):
            exact.append((layer, layer_input, edge))
    covered = {id(parameter) for layer, _, _ in exact for parameter in layer.parameters()}
    fallback = [
        name for name, parameter in trainable.items()
        if uses.get(id(parameter), 0) > 0 and id(parameter) not in covered
    ]
    if exact:
        try:
            grads = torch.autograd.grad(total, [edge for _, _, edge in exact])
        except RuntimeError as error:
            if "use_reentrant" not in str(error):
                raise
            raise InvalidOutputError(
                f"the output goes through torch.utils.checkpoint(..., use_reentrant=True), which autograd.grad "
                f"cannot differentiate: {HIDDEN_FIX}"
            ) from None
        for (layer, layer_input, _), grad in zip(exact, grads):
            exact_accumulate(layer, layer_input, grad, phi, sums)
    del total, per_sample, records, exact
    if fallback:
        vectorised = verdict.slicing_is_safe
        if vectorised:
            try:
                _accumulate_vectorised(model, batch, size, objective, phi, sums, fallback, chunk_size)
            except RuntimeError:  # vmap cannot run the model (recurrent layers, data-dependent control flow)
                vectorised = False
        if not vectorised:
            _accumulate_by_backward(model, batch, size, objective, phi, sums, fallback, chunk_size)
    if not checks.hidden_checked:
        unreached = {name: parameter for name, parameter in trainable.items() if uses.get(id(parameter), 0) == 0}
        check_hidden_parameters(model, batch, objective, reference, unreached)
        checks.hidden_checked = True


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
    phi: Elementwise,
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
    positions = [i for i, leaf in enumerate(leaves) if is_batched(leaf, size)]

    def sample_objective(weights: dict[str, Tensor], sample_leaves: list[Tensor]) -> Tensor:
        rebuilt = list(leaves)
        for position, leaf in zip(positions, sample_leaves):
            rebuilt[position] = leaf.unsqueeze(0)
        state = dict(constants)
        state.update({f"model.{name}": tensor for name, tensor in weights.items()})
        return torch.func.functional_call(wrapper, state, (tree_unflatten(rebuilt, spec),)).sum()

    per_sample_grads = torch.func.vmap(torch.func.grad(sample_objective), in_dims=(None, 0))
    step = chunk_samples(size, sum(t.numel() for t in differentiable.values()), chunk_size)
    chunks = []
    for start in range(0, size, step):  # every chunk first, so that a failure adds nothing to sums
        chunk = [leaves[i][start:start + step] for i in positions]
        with torch.enable_grad():
            grads = per_sample_grads(differentiable, chunk)
        chunks.append({name: phi(grads[name]).sum(dim=0) for name in names})
    for chunk_sums in chunks:
        for name in names:
            sums[name] += chunk_sums[name]


def _accumulate_by_backward(
    model: nn.Module,
    batch: Any,
    size: int,
    objective: Callable[[nn.Module, Any], Tensor],
    phi: Elementwise,
    sums: dict[str, Tensor],
    names: list[str],
    chunk_size: int | None,
) -> None:
    """The exact fallback that never cuts the batch: one forward of the whole batch, then the
    per-sample gradients ``∂s_n/∂θ`` of ``names`` by a batched backward with one-hot output
    gradients (chunks of samples), or, where the model's backward cannot be batched, one backward
    per sample."""
    parameters = dict(model.named_parameters())
    targets = [parameters[name] for name in names]
    with torch.enable_grad():
        per_sample = objective(model, batch)
    step = chunk_samples(size, sum(t.numel() for t in targets), chunk_size)
    for start in range(0, size, step):
        stop = min(size, start + step)
        one_hot = torch.zeros(stop - start, size, dtype=per_sample.dtype, device=per_sample.device)
        one_hot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        try:
            grads = torch.autograd.grad(per_sample, targets, grad_outputs=one_hot, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
            batched = [None if grad is None else phi(grad).sum(dim=0) for grad in grads]
        except RuntimeError:
            batched = [None] * len(targets)
            for n in range(start, stop):
                try:
                    grads = torch.autograd.grad(per_sample[n], targets, retain_graph=True, allow_unused=True)
                except RuntimeError as error:  # e.g. cuDNN's RNN backward, which refuses eval mode
                    shown = ", ".join(repr(name) for name in names[:3])
                    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise InvalidOutputError(
                        f"the per-sample gradients of {shown} cannot be computed in eval mode ({first_line}); "
                        "on CUDA, recurrent layers need torch.backends.cudnn.flags(enabled=False) around the estimate"
                    ) from None
                for i, grad in enumerate(grads):
                    if grad is not None:
                        batched[i] = phi(grad) if batched[i] is None else batched[i] + phi(grad)
        for name, value in zip(names, batched):
            if value is not None:
                sums[name] += value
