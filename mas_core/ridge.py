"""Ridge regression from accumulated sufficient statistics: a frozen-feature baseline that cannot forget.

A task sequence on a *frozen* feature extractor ``x = φ(image) ∈ R^d`` learns a linear map to the
targets ``y ∈ R^m`` in closed form. Everything it needs about the samples seen so far is kept in
float64 (per problem; ``w_i ≥ 0`` are per-sample weights, 1 unless given)::

    G = Σ w_i x_i x_iᵀ   [d, d]      H = Σ w_i x_i y_iᵀ   [d, m]
    s = Σ w_i x_i        [d]         u = Σ w_i y_i        [m]         n = Σ w_i

The intercept is not penalised: the data are centred with the weighted means ``x̄ = s/n``,
``ȳ = u/n``, so ``C = G − n x̄x̄ᵀ`` and ``C_xy = H − n x̄ȳᵀ``, and (:meth:`RidgeStatistics.solve`)::

    W = (C + αI)⁻¹ C_xy        [d, m]          b = ȳ − Wᵀx̄        [m]

which minimises ``Σ w_i ‖y_i − Wᵀx_i − b‖² + α‖W‖_F²`` (the ridge solution with a free bias).
Since the statistics are sums, after ``update`` with tasks ``1..t`` the solution is *exactly*
ridge regression on the concatenated data of tasks ``1..t`` (``tests/test_ridge.py`` checks it
to 1e-8 in float64): a task's predictions change only through what later tasks add to the sums.
Outputs may be added later (:meth:`RidgeStatistics.add_outputs`: zero columns of ``H`` and ``u``,
i.e. the samples seen so far have target 0 there), the recognition sequence's growing label space.

The strength is chosen per task as a dimensionless ``λ`` with ``α = λ · tr(C)/d`` (tr(C)/d is
``n`` times the mean per-feature variance, so λ does not depend on the number of samples or the
scale of the features): :func:`choose_strength` fits, for each ``λ`` of a grid, the statistics of
the previous tasks plus the current task's training samples *minus* a held-out validation part
(:func:`mas_core.hparam_search.split_positions`: the seeded ``val_fraction`` of the current
task's training samples the SGD methods' search holds out, nothing else), scores the weighted mean squared error on that part, ``Σ_val w_i‖y_i − ŷ_i‖² / Σ_val w_i``
(summed over the problems that share the samples), and takes the lowest (the larger ``λ`` on a
tie). Mean squared error rather than an experiment's ranking metric: it is the quantity ridge
minimises, it is continuous in ``λ`` (no ties among grid points on small validation parts) and it
is the same for classification (one-hot targets) and regression (slot vectors). The task is then
refitted with all of its training samples at the chosen ``λ``.

:func:`run_ridge` is the task sequence of this method (the closed-form counterpart of
:func:`mas_core.loop.train_tasks`): per task the statistics, the choice, the solution, the row
of the accuracy matrix and a checkpoint (the statistics as tensors), resumable to the same result.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from .checkpoint import atomic_write_text, check_config, load_checkpoint, save_checkpoint
from .errors import MASCoreError
from .experiment import SequenceResult
from .hparam_search import split_positions
from .loop import CHECKPOINT_NAME

RIDGE = "ridge"
RIDGE_FORMAT = 1
DEFAULT_STRENGTHS = tuple(10.0 ** k for k in range(-6, 3))  # λ: 1e-6 … 1e2, one per decade


class RidgeStatistics:
    """The float64 sufficient statistics ``G, H, s, u, n`` of one weighted ridge problem (see the
    module docs) with ``in_features`` inputs and ``out_features`` outputs."""

    def __init__(self, in_features: int, out_features: int) -> None:
        if in_features < 1 or out_features < 0:
            raise MASCoreError(f"ridge statistics need in_features ≥ 1 and out_features ≥ 0, got "
                               f"{in_features} and {out_features}")
        d, m = int(in_features), int(out_features)
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.cross = torch.zeros(d, m, dtype=torch.float64)
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_y = torch.zeros(m, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @property
    def in_features(self) -> int:
        return int(self.gram.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.cross.shape[1])

    def update(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> None:
        """Add samples ``x [N, d]`` with targets ``y [N, m]`` (and weights ``[N]``, ≥ 0) to the sums."""
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.in_features \
                or y.shape[1] != self.out_features:
            raise MASCoreError(f"ridge update needs x [N, {self.in_features}] and y [N, {self.out_features}], got "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
        if weights is None:
            weighted = x
            self.count += x.shape[0]
        else:
            weights = weights.detach().to(torch.float64).reshape(-1)
            if weights.shape[0] != x.shape[0] or bool((weights < 0).any()):
                raise MASCoreError(f"ridge weights must be [N] = [{x.shape[0]}] non-negative numbers")
            weighted = x * weights[:, None]
            self.count += weights.sum()
            y_weighted = y * weights[:, None]
            self.sum_y += y_weighted.sum(0)
        self.gram += weighted.T @ x
        self.cross += weighted.T @ y
        self.sum_x += weighted.sum(0)
        if weights is None:
            self.sum_y += y.sum(0)

    def add_outputs(self, count: int) -> None:
        """Append ``count`` outputs whose target was 0 for every sample seen so far."""
        self.cross = torch.cat([self.cross, self.cross.new_zeros(self.in_features, int(count))], dim=1)
        self.sum_y = torch.cat([self.sum_y, self.sum_y.new_zeros(int(count))])

    def merged(self, other: RidgeStatistics) -> RidgeStatistics:
        """A new statistics object holding the samples of both (the sums added)."""
        total = RidgeStatistics(self.in_features, self.out_features)
        total.load_state_dict({key: mine + other.state_dict()[key] for key, mine in self.state_dict().items()})
        return total

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(C, C_xy, x̄, ȳ)``: the centred Gram and cross matrices and the weighted means."""
        n = float(self.count)
        if n <= 0:
            d, m = self.in_features, self.out_features
            return self.gram.clone(), self.cross.clone(), self.sum_x.new_zeros(d), self.sum_y.new_zeros(m)
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        return self.gram - n * torch.outer(mean_x, mean_x), self.cross - n * torch.outer(mean_x, mean_y), mean_x, mean_y

    def alpha(self, strength: float) -> float:
        """``α = λ · tr(C)/d`` for the dimensionless strength ``λ`` (``λ`` itself when ``tr(C) = 0``)."""
        scale = float(torch.trace(self.centred()[0])) / self.in_features
        return float(strength) * (scale if scale > 0 else 1.0)

    def solve(self, alpha: float) -> tuple[Tensor, Tensor]:
        """``(W [d, m], b [m])`` in float64: ``W = (C + αI)⁻¹ C_xy``, ``b = ȳ − Wᵀx̄`` (``α > 0``;
        no samples: zeros)."""
        if not alpha > 0 or not math.isfinite(alpha):
            raise MASCoreError(f"the ridge penalty α must be a positive finite number, got {alpha}")
        centred_gram, centred_cross, mean_x, mean_y = self.centred()
        if float(self.count) <= 0:
            return centred_cross.new_zeros(self.in_features, self.out_features), mean_y
        system = centred_gram + alpha * torch.eye(self.in_features, dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(system)
        weight = torch.cholesky_solve(centred_cross, factor) if int(info) == 0 else torch.linalg.solve(system,
                                                                                                     centred_cross)
        return weight, mean_y - weight.T @ mean_x

    def path(self) -> Callable[[float], tuple[Tensor, Tensor]]:
        """``α ↦ (W, b)`` for many ``α`` at the cost of one eigendecomposition ``C = V diag(e) Vᵀ``:
        ``W = V diag(1/(e + α)) Vᵀ C_xy`` (equal to :meth:`solve` up to rounding)."""
        centred_gram, centred_cross, mean_x, mean_y = self.centred()
        eigenvalues, vectors = torch.linalg.eigh(centred_gram)
        projected = vectors.T @ centred_cross

        def solution(alpha: float) -> tuple[Tensor, Tensor]:
            if not alpha > 0 or not math.isfinite(alpha):
                raise MASCoreError(f"the ridge penalty α must be a positive finite number, got {alpha}")
            weight = vectors @ (projected / (eigenvalues + alpha)[:, None])
            return weight, mean_y - weight.T @ mean_x

        return solution

    def state_dict(self) -> dict[str, Tensor]:
        """The statistics as tensors (checkpoint-able; shapes carry ``d`` and ``m``)."""
        return {"gram": self.gram.clone(), "cross": self.cross.clone(), "sum_x": self.sum_x.clone(),
                "sum_y": self.sum_y.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (any number of outputs, the same ``d``)."""
        gram = state["gram"].to(torch.float64)
        if gram.shape != self.gram.shape:
            raise MASCoreError(f"ridge statistics of {gram.shape[0]} features cannot load into {self.in_features}")
        self.gram, self.cross = gram.clone(), state["cross"].to(torch.float64).clone()
        self.sum_x, self.sum_y = state["sum_x"].to(torch.float64).clone(), state["sum_y"].to(torch.float64).clone()
        self.count = state["count"].to(torch.float64).clone()


def squared_error(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, weights: Tensor | None = None) -> float:
    """``Σ_i w_i ‖y_i − Wᵀx_i − b‖²`` in float64."""
    residual = y.to(torch.float64) - x.to(torch.float64) @ weight - bias
    per_sample = residual.pow(2).sum(1)
    return float(per_sample.sum() if weights is None else (per_sample * weights.to(torch.float64)).sum())


@dataclass
class RidgeProblem:
    """One weighted problem of a task: samples ``x [N, d]``, targets ``y [N, m]``, weights ``[N]`` or None."""

    x: Tensor
    y: Tensor
    weights: Tensor | None = None

    def rows(self, positions: Tensor) -> RidgeProblem:
        return RidgeProblem(self.x[positions], self.y[positions],
                            None if self.weights is None else self.weights[positions])


@dataclass
class RidgeSettings:
    """The method's options: ``strengths`` (the grid of dimensionless ``λ``, ``α = λ·tr(C)/d``)
    and ``val_fraction`` (the share of the current task's training samples held out to choose λ)."""

    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    val_fraction: float = 0.2

    def validate(self) -> None:
        if not self.strengths or any(not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))
                                     for v in self.strengths):
            raise MASCoreError(f"ridge strengths must be a non-empty list of positive numbers, got {self.strengths}")
        if not 0.0 < self.val_fraction < 1.0:
            raise MASCoreError(f"ridge val_fraction must be in (0, 1), got {self.val_fraction}")


def ridge_settings(options: dict[str, Any] | None) -> RidgeSettings:
    """:class:`RidgeSettings` from a method's options (unknown keys refused)."""
    options = dict(options or {})
    known = {"strengths", "val_fraction"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MASCoreError(f"ridge takes the options {sorted(known)}, got unknown {unknown}")
    settings = RidgeSettings(**{key: ([float(v) for v in value] if key == "strengths" else float(value))
                                for key, value in options.items()})
    settings.validate()
    return settings


def choose_strength(previous: Sequence[RidgeStatistics], current: Sequence[RidgeProblem], settings: RidgeSettings,
                    *, seed: int, task: int) -> dict[str, Any]:
    """Choose ``λ`` for the current task (module docs): fit ``previous[k]`` plus the fit part of
    ``current[k]``, score the weighted MSE on the validation part summed over the problems ``k``.
    Returns ``{"strength": λ*, "tries": [{"value": λ, "val_mse": e}], "train_samples", "val_samples"}``."""
    n = int(current[0].x.shape[0])
    fit, held_out = split_positions(n, settings.val_fraction, seed, task)
    fitted = []
    for stats, problem in zip(previous, current):
        part = RidgeStatistics(stats.in_features, stats.out_features)
        rows = problem.rows(fit)
        part.update(rows.x, rows.y, rows.weights)
        fitted.append(stats.merged(part))
    paths = [stats.path() for stats in fitted]  # one eigendecomposition per problem for the whole grid
    tries = []
    for value in settings.strengths:
        error, total = 0.0, 0.0
        for stats, path, problem in zip(fitted, paths, current):
            rows = problem.rows(held_out)
            weight, bias = path(stats.alpha(value))
            error += squared_error(weight, bias, rows.x, rows.y, rows.weights)
            total += float(rows.x.shape[0] if rows.weights is None else rows.weights.to(torch.float64).sum())
        tries.append({"value": float(value), "val_mse": error / total if total > 0 else 0.0})
    best = min(tries, key=lambda item: (item["val_mse"], -item["value"]))
    return {"strength": best["value"], "tries": tries, "train_samples": int(fit.numel()),
            "val_samples": int(held_out.numel())}


class RidgeExperiment(Protocol):
    """What an experiment gives :func:`run_ridge`.

    - ``task_names``, ``identity()`` as for :class:`mas_core.experiment.Experiment`;
    - ``model``: the module whose linear read-out :meth:`set_solution` writes (returned in the result);
    - ``statistics(task)``: called at the start of every task (also when replayed on resume), it
      returns the problems' statistics for that task: the first task creates them, later ones may
      grow them (:meth:`RidgeStatistics.add_outputs`) or return them unchanged;
    - ``task_problems(task)``: the current task's training samples as :class:`RidgeProblem` s, one
      per statistics object, in that order (features of the frozen extractor, float);
    - ``set_solution(solutions, task)``: write ``[(W, b)]`` (float64) into ``model``;
    - ``evaluate(task)``: the row ``R[task][0..task]``.
    """

    task_names: list[str]
    model: Any

    def identity(self) -> dict[str, Any]: ...

    def statistics(self, task: int) -> list[RidgeStatistics]: ...

    def task_problems(self, task: int) -> list[RidgeProblem]: ...

    def set_solution(self, solutions: list[tuple[Tensor, Tensor]], task: int) -> None: ...

    def evaluate(self, task: int) -> list[float]: ...


def run_ridge(experiment: RidgeExperiment, settings: RidgeSettings, *, seed: int = 0,
              checkpoint_dir: str | Path | None = None, resume: bool = False, stop_after_task: int | None = None,
              log: Callable[[str], None] | None = None, write: bool = True) -> tuple[SequenceResult, list[dict[str, Any]]]:
    """The ridge task sequence: per task ``t`` statistics ``+=`` task ``t``'s, ``λ_t`` chosen as
    :func:`choose_strength` says, ``(W, b)`` solved at ``α = λ_t·tr(C)/d``, ``R[t]`` evaluated and
    (with ``checkpoint_dir``) ``CHECKPOINT_NAME`` written with the statistics, the rows and the
    records. ``resume`` continues after the last checkpointed task (refusing one of another
    configuration); the result equals an uninterrupted run's (``wall_time_s`` aside). ``write=False``
    reads a checkpoint but writes none (the ranks other than 0 under torchrun). Returns the
    :class:`SequenceResult` (model included) and one record per task (the strength tries)."""
    settings.validate()
    emit = log or (lambda message: None)
    names = list(experiment.task_names)
    config = {"format": RIDGE_FORMAT, "method": RIDGE, "settings": asdict(settings), "seed": int(seed),
              "experiment": experiment.identity()}
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    rows: list[list[float | None]] = []
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    elapsed = 0.0
    statistics: list[RidgeStatistics] = []
    if resume and path is not None and path.is_file():
        state = load_checkpoint(path)
        check_config(state, config, path)
        rows, records, lines = state["accuracy"], state["records"], list(state["log"])
        elapsed = float(state["wall_time_s"])
        for task in range(len(rows)):
            statistics = experiment.statistics(task)
        for stats, saved in zip(statistics, state["statistics"]):
            stats.load_state_dict(saved)
        if rows:
            experiment.set_solution([stats.solve(stats.alpha(records[-1]["strength"])) for stats in statistics],
                                    len(rows) - 1)
            emit(f"[ridge] resumed after task {len(rows)} from {path}")
    done = len(rows)
    last = len(names) if stop_after_task is None else min(len(names), int(stop_after_task))
    for task in range(done, last):
        start = time.perf_counter()
        statistics = experiment.statistics(task)
        problems = experiment.task_problems(task)
        record = {"task": task, "name": names[task], **choose_strength(statistics, problems, settings, seed=seed,
                                                                       task=task)}
        for stats, problem in zip(statistics, problems):
            stats.update(problem.x, problem.y, problem.weights)
        record["alpha"] = [stats.alpha(record["strength"]) for stats in statistics]
        experiment.set_solution([stats.solve(alpha) for stats, alpha in zip(statistics, record["alpha"])], task)
        row = list(experiment.evaluate(task))
        rows.append(row + [None] * (len(names) - task - 1))
        records.append(record)
        elapsed += time.perf_counter() - start
        line = (f"[ridge] task {task + 1}/{len(names)} ({names[task]}): λ={record['strength']:g} "
                f"(val MSE {min(t['val_mse'] for t in record['tries']):.4g}); "
                + " ".join(f"{value:.4f}" for value in row))
        lines.append(line)
        emit(line)
        if path is not None and write:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, {"config": config, "statistics": [stats.state_dict() for stats in statistics],
                                   "accuracy": rows, "records": records, "log": lines, "wall_time_s": elapsed})
            atomic_write_text(path.parent / "log.txt", "\n".join(lines) + "\n")
    result = SequenceResult(method=RIDGE, task_names=names, accuracy=[list(r) for r in rows], wall_time_s=elapsed,
                            config=config, log=lines, trained_tasks=len(rows) - done, model=experiment.model)
    return result, records


__all__ = ["DEFAULT_STRENGTHS", "RIDGE", "RidgeExperiment", "RidgeProblem", "RidgeSettings", "RidgeStatistics",
           "choose_strength", "ridge_settings", "run_ridge", "squared_error"]
