"""What the parts of the device check share: sizes, budgets, sub-part outcomes and comparisons.

A *part* (training, importance, retrieval, …) is a :class:`Section` of named *sub-parts*; each
sub-part runs in its own ``try``/``except`` and ends ``ok``, ``skipped (why)`` or
``failed (one line)``; the part's status is ``failed`` when a sub-part failed, ``ok`` when
at least one ran and none failed, ``skipped`` when none ran. Every part has a wall-clock
:class:`Budget`: a sub-part started after it is spent is skipped, and the training loop checks
it at every step (:class:`BudgetSpent`).

Comparisons (:func:`relative_error`): ``max_i |a_i − b_i| / max_i |b_i|`` over every entry of
every tensor (float64), ``b`` the CPU reference.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

FLOAT32_RTOL = 1e-4   # CUDA against CPU in float32, TF32 off: losses, weights after a few steps, Ω
OK, SKIPPED, FAILED = "ok", "skipped", "failed"


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: ``GPU`` (the real check, ≤ 8 minutes on one GPU) or ``DRY`` (the
    CPU dry run of the test, tiny)."""

    # the synthetic fact file (training, equality, distributed)
    tasks: int
    facts_per_task: int
    train_per_fact: int
    test_per_fact: int
    image_size: int
    slot_dim: int
    batch_size: int
    epochs: int
    importance_samples: int
    backbone_tasks: int | None      # tasks trained with the torchvision backbones (None: all)
    equality_epochs: int            # epochs of the equality case (2 SGD steps each)
    equality_cases: tuple[str, ...]   # of "small_cnn", "resnet18_frozen"
    # importance: (case name, backbone, frozen trunk, image size, samples timed, samples compared, batch)
    importance_cases: tuple[tuple[str, str, bool, int, int, int, int], ...]
    # retrieval: database rows, dimension, queries, k
    database: int
    dimension: int
    queries: int
    k: int
    # throughput of the training step: backbones, image size, batch, timed steps
    step_backbones: tuple[str, ...]
    step_image_size: int
    step_batch: int
    step_steps: int
    # seconds per part
    budgets: Mapping[str, float]


BUDGETS = {"environment": 15, "training": 170, "equality": 40, "importance": 60, "retrieval": 60,
           "distributed": 75, "throughput": 50}   # 470 s of the 8 minutes; the rest is start-up

GPU = Sizes(tasks=2, facts_per_task=16, train_per_fact=24, test_per_fact=4, image_size=64, slot_dim=32,
            batch_size=32, epochs=10, importance_samples=256, backbone_tasks=None, equality_epochs=3,
            equality_cases=("small_cnn", "resnet18_frozen"),
            importance_cases=(("small_cnn", "small_cnn", False, 64, 4096, 256, 256),
                              ("resnet18_frozen_224px", "resnet18", True, 224, 512, 8, 64)),
            database=100_000, dimension=1152, queries=1024, k=10,
            step_backbones=("small_cnn", "resnet18", "efficientnet_lite0", "vgg16"), step_image_size=224,
            step_batch=64, step_steps=20, budgets=BUDGETS)

DRY = Sizes(tasks=2, facts_per_task=4, train_per_fact=4, test_per_fact=2, image_size=32, slot_dim=8,
            batch_size=8, epochs=1, importance_samples=4, backbone_tasks=1, equality_epochs=1,
            equality_cases=("small_cnn",),   # the same code for resnet18; CPU against CPU proves no more
            importance_cases=(("small_cnn", "small_cnn", False, 32, 32, 16, 16),
                              ("resnet18_frozen", "resnet18", True, 32, 4, 4, 4)),
            database=2000, dimension=48, queries=64, k=10,
            step_backbones=("small_cnn", "resnet18"), step_image_size=32, step_batch=4, step_steps=3,
            budgets={name: 3 * seconds for name, seconds in BUDGETS.items()})   # a busy shared CPU: room to spare


class BudgetSpent(Exception):
    """A part's wall-clock budget ran out; what was left of it is skipped."""


class Skip(Exception):
    """A sub-part that cannot run on this machine; the message says why."""


class CheckFailed(Exception):
    """A check that ran and did not hold (a non-finite loss, an error above its tolerance)."""


class Budget:
    """``seconds`` of wall clock from now (never past ``until``, a ``time.perf_counter`` value)."""

    def __init__(self, seconds: float, until: float | None = None) -> None:
        self.seconds = float(seconds)
        deadline = time.perf_counter() + self.seconds
        self.deadline = deadline if until is None else min(deadline, until)

    def left(self) -> float:
        """Seconds left (negative once spent)."""
        return self.deadline - time.perf_counter()

    def check(self, what: str) -> None:
        """Raise :class:`BudgetSpent` naming ``what`` when the budget is spent."""
        if self.left() <= 0:
            raise BudgetSpent(f"budget of {self.seconds:.0f} s spent before {what}")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Section:
    """One part of the check: named sub-parts, each with its own status and figures."""

    def __init__(self, budget: Budget, device: torch.device | None = None) -> None:
        self.budget = budget
        self.device = device
        self.subparts: dict[str, dict[str, Any]] = {}

    def run(self, name: str, action: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run ``action(figures)`` as sub-part ``name``; ``figures`` is the dict it fills (kept when it
        fails). Returns the sub-part's record (``status``, ``reason``, ``wall_s``, figures and, on a
        CUDA device, ``gpu_memory_peak_bytes``: ``torch.cuda.max_memory_allocated`` of the sub-part)."""
        figures: dict[str, Any] = {}
        cuda = self.device is not None and self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        status, reason = OK, None
        try:
            self.budget.check(name)
            action(figures)
        except (Skip, BudgetSpent) as exc:
            status, reason = SKIPPED, str(exc)
        except Exception as exc:  # noqa: BLE001 - one failing sub-part must not stop the others
            status, reason = FAILED, one_line(exc)
        record = {"status": status, "reason": reason, "wall_s": round(time.perf_counter() - started, 3)}
        record.update((key, value) for key, value in figures.items() if key not in record)
        if cuda:
            record["gpu_memory_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        self.subparts[name] = record
        return record

    def status(self) -> tuple[str, str | None]:
        """``(status, reason)`` of the whole part from its sub-parts."""
        failed = [name for name, record in self.subparts.items() if record["status"] == FAILED]
        if failed:
            return FAILED, "; ".join(f"{name}: {self.subparts[name]['reason']}" for name in failed)
        if any(record["status"] == OK for record in self.subparts.values()):
            return OK, None
        reasons = sorted({str(record["reason"]) for record in self.subparts.values()})
        return SKIPPED, "; ".join(reasons) or "nothing to run"


def relative_error(actual: Tensor | Mapping[str, Tensor] | Iterable[Tensor],
                   expected: Tensor | Mapping[str, Tensor] | Iterable[Tensor]) -> float:
    """``max |a − b| / max |b|`` over every entry (float64, on the CPU); the same keys or order
    are required. 0 when both are all zeros."""
    if isinstance(actual, Tensor):
        pairs = [(actual, expected)]
    elif isinstance(actual, Mapping):
        assert isinstance(expected, Mapping)
        if set(actual) != set(expected):
            raise CheckFailed(f"compared states differ in keys: {sorted(set(actual) ^ set(expected))[:4]}")
        pairs = [(actual[key], expected[key]) for key in expected]
    else:
        pairs = list(zip(actual, expected, strict=True))
    largest_diff, largest = 0.0, 0.0
    for a, b in pairs:
        a64 = a.detach().to("cpu", torch.float64)
        b64 = b.detach().to("cpu", torch.float64)
        largest_diff = max(largest_diff, float((a64 - b64).abs().max()) if a64.numel() else 0.0)
        largest = max(largest, float(b64.abs().max()) if b64.numel() else 0.0)
    if largest == 0.0:
        return 0.0 if largest_diff == 0.0 else math.inf
    return largest_diff / largest


def within(figures: dict[str, Any], name: str, error: float, tolerance: float) -> None:
    """Record ``figures[name] = error`` and ``figures[name + "_tolerance"]``; raise
    :class:`CheckFailed` when ``error`` is not a finite number ≤ ``tolerance``."""
    figures[name] = float(error)
    figures[f"{name}_tolerance"] = float(tolerance)
    if not (math.isfinite(error) and error <= tolerance):
        raise CheckFailed(f"{name} = {error:.3g} exceeds the tolerance {tolerance:.0e}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(action: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, action())`` with the device synchronised before and after."""
    synchronize(device)
    started = time.perf_counter()
    result = action()
    synchronize(device)
    return time.perf_counter() - started, result


def per_second(count: float, seconds: float) -> float:
    """``count / seconds``, rounded to 4 significant figures (``inf`` for 0 s)."""
    return float(f"{count / seconds:.4g}") if seconds > 0 else math.inf


class float32_exact:  # noqa: N801 - used as a context manager, named as one
    """TF32 off (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``) and
    ``float32_matmul_precision("highest")`` inside; the previous settings restored after."""

    def __enter__(self) -> "float32_exact":
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved[:2]
        torch.set_float32_matmul_precision(self.saved[2])


def replace_sizes(sizes: Sizes, **changes: Any) -> Sizes:
    """``sizes`` with ``changes`` (e.g. smaller budgets for a test)."""
    return dataclasses.replace(sizes, **changes)
