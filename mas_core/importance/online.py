"""Online importance: Ω accumulated from the inputs a deployed model answers (``docs/method.md`` §12).

MAS needs no labels, so the importance can be learned from what the model is used for: every
input it answers adds its per-sample term to a running sum (MAS, Sec. 3: "whenever a new sample
is fed to the deployed network"). :class:`OnlineImportance` keeps, per trainable parameter ``k``,

    S_k = Σ_n φ_k(x_n)          N = number of samples seen          Ω_k = c · S_k / N

with ``φ_k(x) = |∂‖F(x)‖₂²/∂θ_k|`` and ``c = 1`` (``estimator="mas"``, §1.1, the same exact
per-sample engine as :func:`~mas_core.importance.mas_importance`) or the Hebbian co-activation
``φ = |y_i x_j|`` and ``c = 2`` (``estimator="hebbian"``, l-MAS, §4). ``S`` and ``N`` are
additive over samples, so the order and the batching of the stream do not matter, two
accumulators merge by adding (``S = S_a + S_b``, ``N = N_a + N_b``), and Ω over any stream equals
the one-pass estimate over the concatenated stream (up to the rounding of sums).

Memory is constant: one float64 tensor per trainable parameter (float32 on MPS, which has no
float64) and a counter; an update also holds the batch's own sums (one more tensor per
parameter) until they are checked and added, so a batch with a NaN/Inf leaves the accumulator
as it was. The sums are float64 so that a long stream of float32 terms loses no precision.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..batches import batch_input, batch_size, move_to
from ..distributed import all_reduce_sums
from ..errors import CheckpointMismatchError, EmptyDataError, InvalidArgumentError, MASStateError, NonFiniteError
from .checks import BatchChecks
from .common import OutputFn, evaluation_mode, limited_batches, trainable_parameters
from .hebbian import accumulate_hebbian_batch, hebbian_layers
from .layers import discover_layers
from .mas import SquaredNormObjective
from .per_sample import accumulate_counted

ESTIMATORS = ("mas", "hebbian")
"""``"mas"``: exact per-sample MAS (§1.1); ``"hebbian"``: l-MAS co-activations (§4)."""

STATE_VERSION = 1

_SCALE = {"mas": 1.0, "hebbian": 2.0}  # c in Ω = c · S / N
_FINGERPRINT_TOLERANCE = 1e-9  # relative; the same θ summed on another device differs by ~1e-13


def parameter_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """``{name: [Σ|θ|, Σθ²]}`` in float64 over the trainable parameters: a cheap identity of θ.

    Two accumulators (or an accumulator and a regularizer) may only be combined when their
    fingerprints agree, i.e. Ω was measured at the same parameters."""
    trainable = trainable_parameters(model)
    with torch.no_grad():
        stacked = torch.stack([
            torch.stack([p.detach().double().abs().sum(), p.detach().double().square().sum()]).cpu()
            for p in trainable.values()
        ])
    return {name: [float(a), float(b)] for name, (a, b) in zip(trainable, stacked.tolist())}


def fingerprint_difference(expected: dict[str, list[float]], actual: dict[str, list[float]]) -> str | None:
    """The first parameter whose fingerprint differs (names, or values beyond rounding), else ``None``."""
    if list(expected) != list(actual):
        missing = sorted(set(expected) ^ set(actual))
        if missing:
            return f"the parameter names differ ({missing[0]!r} is on one side only)"
        return "the parameter order differs"
    for name, (a0, b0) in expected.items():
        a1, b1 = actual[name]
        for x, y in ((a0, a1), (b0, b1)):
            if not math.isclose(x, y, rel_tol=_FINGERPRINT_TOLERANCE, abs_tol=1e-300):
                return f"parameter {name!r} has other values"
    return None


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class OnlineImportance:
    """A streaming accumulator of MAS (or l-MAS) importance over the inputs a model answers.

    Feed it batches as they come (:meth:`update`, any number of calls, any sizes); read
    ``Ω = c · S / N`` with :meth:`importance`; save and resume it (:meth:`state_dict`,
    :meth:`load_state_dict`); combine deployments or processes (:meth:`merge`,
    :meth:`all_reduce`); hand it to :meth:`mas_core.MAS.after_task` as the task's data.

    Args:
        model: the deployed network; its parameters with ``requires_grad=True`` are measured.
            It must not change while the accumulator is in use (Ω is taken at one θ); its
            fingerprint (:func:`parameter_fingerprint`) is recorded here and checked by
            :meth:`merge`, :meth:`load_state_dict` and MAS.
        estimator: ``"mas"`` (exact per-sample MAS, the default) or ``"hebbian"`` (l-MAS).
            MAS's ``mode="batch"`` has no streaming form (it depends on the batch boundaries).
        output_fn: ``output_fn(model, batch) -> Tensor [batch, ...]``, the function F (a task
            head, the embedding before L2 normalisation); default ``model(input)``.
        output_label: a name for F (e.g. ``"head 3"``); accumulators with different labels,
            or options, are never merged or loaded into each other. Give one whenever
            ``output_fn`` picks one of several outputs.
        max_samples: stop after this many samples (the batch that crosses the limit is
            counted to the limit only, as in :func:`~mas_core.importance.mas_importance`); ``None``: no limit.
        chunk_size: samples per vectorised chunk of the general fallback (see
            :func:`~mas_core.importance.mas_importance`); it does not change the result.

    The model's ``training`` flags, parameters, buffers and ``.grad`` are left as they were.
    Gradients are formed internally (under ``torch.enable_grad``), so :meth:`update` may be
    called inside ``torch.no_grad()`` (e.g. right where the query is answered), but not under
    ``torch.inference_mode()``. One accumulator is not thread-safe: give each serving thread or
    process its own and :meth:`merge` them.
    """

    def __init__(self, model: nn.Module, *, estimator: str = "mas", output_fn: OutputFn | None = None,
                 output_label: str | None = None, max_samples: int | None = None,
                 chunk_size: int | None = None) -> None:
        if estimator not in ESTIMATORS:
            hint = " (MAS's batch mode depends on the batch boundaries and has no streaming form)" \
                if estimator == "batch" else ""
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}{hint}")
        if output_label is not None and not isinstance(output_label, str):
            raise InvalidArgumentError(f"output_label must be a string or None, got {output_label!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise InvalidArgumentError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise InvalidArgumentError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.model = model
        self.estimator = estimator
        self.output_fn = output_fn
        self.output_label = output_label
        self.max_samples = max_samples
        self.chunk_size = chunk_size
        self._trainable = trainable_parameters(model)
        self._device = next(iter(self._trainable.values())).device
        self._fingerprint = parameter_fingerprint(model)
        self._sums = {name: torch.zeros(p.shape, dtype=_sum_dtype(p.device), device=p.device)
                      for name, p in self._trainable.items()}
        self._count = 0
        self._checks = BatchChecks()  # per-sample verdicts per batch size (mas_core.importance.checks)
        if estimator == "mas":
            self._layers = discover_layers(model, self._trainable)
            self._objective = SquaredNormObjective(output_fn)
        else:
            self._layers = hebbian_layers(model, self._trainable)

    # ------------------------------------------------------------------ reading

    @property
    def count(self) -> int:
        """N: the number of samples accumulated so far."""
        return self._count

    @property
    def sums(self) -> dict[str, Tensor]:
        """S: the raw per-parameter sums (copies, in the accumulation dtype), before ``c / N``."""
        return {name: value.clone() for name, value in self._sums.items()}

    @property
    def fingerprint(self) -> dict[str, list[float]]:
        """The fingerprint of θ at which the sums were taken (:func:`parameter_fingerprint`)."""
        return {name: list(value) for name, value in self._fingerprint.items()}

    @property
    def is_full(self) -> bool:
        """True when ``max_samples`` samples have been taken (further updates take nothing)."""
        return self.max_samples is not None and self._count >= self.max_samples

    def importance(self) -> dict[str, Tensor]:
        """``Ω = c · S / N`` per parameter name, in each parameter's dtype (``c`` = 1 for MAS, 2 for l-MAS).

        Units: ‖F‖² per unit of the parameter (MAS) or squared activations (l-MAS), as the
        one-pass estimators. Raises :class:`~mas_core.errors.EmptyDataError` before the first sample."""
        if self._count == 0:
            raise EmptyDataError(
                "the accumulator has seen no samples yet; call update(batch) with the inputs the model answers first"
            )
        factor = _SCALE[self.estimator] / self._count
        return {name: (total * factor).to(self._trainable[name].dtype) for name, total in self._sums.items()}

    # ------------------------------------------------------------------ accumulating

    def update(self, batch: Any) -> int:
        """Add the samples of one batch (a Tensor, an ``(input, ...)`` tuple/list or a
        ``{"input": ...}`` dict; labels are never read) and return how many were taken
        (fewer than the batch holds once ``max_samples`` is reached).

        Cost: one forward pass and one backward pass to the layer outputs (MAS; more for
        parameters outside Linear/Conv2d/BatchNorm), or one forward pass (l-MAS).
        Raises :class:`~mas_core.errors.EmptyDataError` for a batch of no samples and
        :class:`~mas_core.errors.NonFiniteError` when the batch's terms hold NaN/Inf (the
        accumulator is then left unchanged)."""
        if torch.is_inference_mode_enabled():
            raise InvalidArgumentError(
                "OnlineImportance.update needs gradients and cannot run under torch.inference_mode(); "
                "call it outside, or under torch.no_grad() which it overrides"
            )
        size = batch_size(batch_input(batch))
        if size == 0:
            raise EmptyDataError("the batch has no samples; pass batches of at least one input")
        if self.is_full:
            return 0
        counted = size
        if self.max_samples is not None:  # the batch stays whole; only its first samples count
            _, _, counted = next(limited_batches([batch], self.max_samples - self._count))
        batch = move_to(batch, self._device)
        batch_sums = {name: torch.zeros_like(p) for name, p in self._trainable.items()}
        with evaluation_mode(self.model):
            if self.estimator == "mas":
                accumulate_counted(self.model, batch, size, counted, self._objective, torch.abs, batch_sums,
                                   self._trainable, self._layers, self.chunk_size, self._checks)
            else:
                accumulate_hebbian_batch(self.model, batch, self._layers, batch_sums, self.output_fn,
                                         counted=counted, checks=self._checks)
        # the terms are ≥ 0, so their float64 total is finite exactly when every term is (one sync)
        totals = torch.stack([value.sum(dtype=_sum_dtype(value.device)).to(self._device, _sum_dtype(self._device))
                              for value in batch_sums.values()])
        finite = torch.isfinite(totals)
        if not bool(finite.all()):
            name = list(batch_sums)[int((~finite).nonzero()[0])]
            raise NonFiniteError(
                f"the importance terms of this batch contain NaN or Inf (first in parameter {name!r}); "
                "the batch was not added (a bad input, or an output that overflows)"
            )
        for name, value in batch_sums.items():
            self._sums[name] += value
        self._count += counted
        return counted

    def update_from(self, data: Iterable[Any]) -> int:
        """:meth:`update` with every batch of ``data`` (empty batches are skipped); returns the samples taken."""
        if isinstance(data, Tensor):
            raise InvalidArgumentError("data must be an iterable of batches; pass a single batch to update()")
        taken = 0
        for batch in data:
            if self.is_full:
                break
            if batch_size(batch_input(batch)) > 0:
                taken += self.update(batch)
        return taken

    # ------------------------------------------------------------------ combining

    def _options(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "output_label": self.output_label}

    def merge(self, other: "OnlineImportance") -> "OnlineImportance":
        """Add another accumulator of the same model, θ and options: ``S += S_other``, ``N += N_other``.

        Returns ``self``. The result is what one accumulator fed both streams would hold (up to
        the rounding of the sums). ``max_samples`` is not applied to merged samples. Raises
        :class:`~mas_core.errors.InvalidArgumentError` for accumulators of other parameters,
        values of θ, estimators or output labels."""
        if not isinstance(other, OnlineImportance):
            raise InvalidArgumentError(f"can only merge another OnlineImportance, got {type(other).__name__}")
        if other is self:
            raise InvalidArgumentError("cannot merge an accumulator with itself (it would count every sample twice)")
        if other._options() != self._options():
            raise InvalidArgumentError(
                f"cannot merge accumulators with different options: {other._options()} vs {self._options()}"
            )
        problem = (_shape_difference(_shapes(self._sums), _shapes(other._sums))
                   or fingerprint_difference(self._fingerprint, other._fingerprint))
        if problem:
            raise InvalidArgumentError(f"cannot merge accumulators of different models: {problem}")
        for name, value in other._sums.items():
            self._sums[name] += value.to(self._sums[name])
        self._count += other._count
        return self

    def all_reduce(self) -> "OnlineImportance":
        """Sum ``S`` and ``N`` over the processes of the running ``torch.distributed`` job, in place
        (every rank must call it; a no-op in a single process). Afterwards every rank holds the
        total, so merge it nowhere else. Returns ``self``."""
        self._sums, self._count = all_reduce_sums(self._sums, self._count)
        return self

    # ------------------------------------------------------------------ checkpointing

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~mas_core.errors.MASStateError` unless ``model``'s trainable parameters
        have the names, shapes and values (fingerprint) at which the sums were taken."""
        shapes = {name: tuple(p.shape) for name, p in trainable_parameters(model).items()}
        problem = (_shape_difference(_shapes(self._sums), shapes)
                   or fingerprint_difference(self._fingerprint, parameter_fingerprint(model)))
        if problem:
            raise MASStateError(
                f"the online importance was accumulated on other parameters than this model's: {problem}; "
                "Ω must be taken at the parameters it protects"
            )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "estimator": self.estimator,
            "output_label": self.output_label,
            "max_samples": self.max_samples,
            "count": self._count,
            "sums": {name: value.clone() for name, value in self._sums.items()},
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the accumulator then continues exactly as the saved one
        would have. Refuses (:class:`~mas_core.errors.CheckpointMismatchError`) a state of another
        layout, estimator, output label, parameter set or θ. ``max_samples`` and ``chunk_size``
        stay this accumulator's own (the saved ``max_samples`` is a record)."""
        required = ("version", "estimator", "output_label", "max_samples", "count", "sums", "fingerprint")
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointMismatchError(f"not an OnlineImportance state: missing {missing}")
        if state["version"] != STATE_VERSION:
            raise CheckpointMismatchError(
                f"OnlineImportance state version {state['version']} is not {STATE_VERSION}, "
                "the version this release reads"
            )
        options = {"estimator": state["estimator"], "output_label": state["output_label"]}
        if options != self._options():
            raise CheckpointMismatchError(
                f"the saved accumulator has options {options} but this one {self._options()}; "
                "build it with the saved ones"
            )
        problem = _shape_difference(_shapes(self._sums), _shapes(state["sums"])) or fingerprint_difference(
            state["fingerprint"], parameter_fingerprint(self.model))
        if problem:
            raise CheckpointMismatchError(f"the saved accumulator belongs to another model: {problem}")
        self._sums = {name: state["sums"][name].detach().to(device=value.device, dtype=value.dtype).clone()
                      for name, value in self._sums.items()}
        self._count = int(state["count"])
        self._fingerprint = {name: [float(a), float(b)] for name, (a, b) in state["fingerprint"].items()}

    def __repr__(self) -> str:
        label = f", output_label={self.output_label!r}" if self.output_label is not None else ""
        return (f"OnlineImportance(estimator={self.estimator!r}{label}, count={self._count}, "
                f"max_samples={self.max_samples}, parameters={len(self._sums)})")


def _shapes(tensors: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in tensors.items()}


def _shape_difference(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference in parameter names or shapes (``{name: shape}``), else ``None``."""
    if set(expected) != set(actual):
        name = sorted(set(expected) ^ set(actual))[0]
        side = "the first" if name in expected else "the second"
        return f"parameter {name!r} exists only in {side} one"
    for name, shape in expected.items():
        if actual[name] != shape:
            return f"parameter {name!r} has shape {actual[name]}, not {shape}"
    return None
