"""Per-task hyperparameters chosen by one protocol that never looks at old tasks' data.

The continual hyperparameter framework of De Lange et al. (TPAMI 2021, "A continual learning
survey", Sec. 4.2; FACIL's ``--gridsearch-tasks``), the same for every method. Before task ``t``
is trained, on deep copies of the current model and method (the real ones are not touched):

1. **Split.** The positions ``0..n−1`` of task ``t``'s training data (``experiment.train_data([t])``)
   are shuffled by a generator seeded ``derived_seed(seed, "search-split", t)``; the first
   ``v = max(1, round(f·n))`` (``f = val_fraction``) form the validation split ``V_t``, the rest
   the search's training split ``S_t``. No test sample and no sample of another task is read.
2. **Maximal plasticity.** For every learning rate ``η`` of ``lr_grid``: fine-tune a copy of the
   model (no penalty; the method's ``before_task`` has run, so IMM starts from its transferred
   weights as its training does) on ``S_t`` for ``E`` epochs (``epochs``; default the task's own) and
   measure ``A(η)`` = the experiment's metric on ``V_t`` (``experiment.validation_score``).
   ``η* = argmax_η A(η)`` (the first of the grid on ties; a diverged run scores nothing) and
   ``A* = A(η*)``, the plasticity reference.
3. **Stability decay.** ``λ_0 = start`` (per method), ``λ_{k+1} = decay·λ_k``. For
   ``k = 0, 1, …, max_tries−1``: train a copy of the model with the method at ``λ_k`` and ``η*``
   on ``S_t`` and measure ``A_k`` on ``V_t``; stop at the first ``k`` with
   ``A_k ≥ (1 − tolerance)·A*`` and take ``λ_t = λ_k``. When no value qualifies (or all
   diverge), ``λ_t`` is the last, smallest value tried (the floor ``start·decay^(max_tries−1)``).
   A method without a strength (fine-tuning, joint) skips this phase; so does task 0, where no
   method has anything to protect yet (every penalty is 0 whatever λ), and λ keeps its value.
   **A collapsed reference.** When ``A*`` is no better than chance (``A* ≤ c``, every learning
   rate collapsed), the threshold ``(1 − tolerance)·A*`` means nothing: the record is marked
   ``"reference_collapsed": true``, a warning is logged, and λ is the most stable value ``λ_0 =
   start``, not decayed (nothing is tried). ``c`` is ``min_reference`` when set, else the
   experiment's ``chance_score(task)`` when it has one (e.g. ``1/classes`` of a task's head);
   without either the check is off.

The loop (:func:`mas_core.loop.train_tasks`) then trains task ``t`` for real with ``η*`` and
``λ_t`` on the task's **whole** training set (``S_t ∪ V_t``: the split serves the choice only).

4. **Back-off.** The real run is longer and in another order than the search's runs, so a ``λ_t``
   accepted on ``V_t`` can still diverge there. Then the loop restores the model, the trained module
   and the method exactly as they were before the task's ``before_task`` (state dicts copied before
   the first attempt), restores the random state the first attempt started from, and trains the
   task again with ``λ ← decay·λ`` (:meth:`SearchSettings.back_off`: the value phase 2 would have
   tried next), down to the floor ``start·decay^(max_tries−1)``. At the floor, for a method without
   a strength, and on task 0 (where λ was not searched and changes nothing), the
   :class:`~mas_core.errors.DivergenceError` stands. Each back-off is logged and recorded
   (``"backoff"``: ``[{"strength": {name: λ that diverged}, "error": message}, …]``; ``"strength"``
   becomes the value finally trained with, ``"reason"`` says so), so
   ``λ_t = λ_search·decay^k`` after ``k`` back-offs, and the run equals one given that ``λ_t``
   directly.
λ is the method's :attr:`~mas_core.regularizers.base.Regularizer.strength` (λ of MAS, l-MAS,
EWC, SI; LwF's and EBLL's distillation weight λ_o; IMM's ``lam_l2``), set with
:meth:`~mas_core.regularizers.base.Regularizer.set_strength`.

Determinism: every candidate run reseeds torch with ``derived_seed(seed, "search", t, phase, k)``
and orders its samples by ``derived_seed(seed, "search")``; the global RNG states are restored
afterwards, so the real training draws exactly what it would have drawn without the search.
Several processes: the copies train through the loop's own step (DDP), and the validation
metric must be the same on every rank (the experiments reduce or compute it whole).

Each task yields a JSON-friendly record (``results.json``'s ``hparam_search``,
``docs/run_folder.md``): the grid with each ``A(η)``, ``A*``, the values tried with their ``A_k``,
the threshold, the choice and the reason in words.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import get_rng_states, set_rng_states
from .errors import DivergenceError, EmptyDataError, MASCoreError, did_you_mean
from .experiment import Experiment, OptimSettings, TrainData
from .loop import derived_seed, train_task_epochs
from .regularizers import METHODS, make_regularizer
from .regularizers.base import Finetune, Regularizer, TaskInfo, describe_strength_values

DEFAULT_KEY = "default"


class SearchableExperiment(Experiment, Protocol):
    """An :class:`~mas_core.loop.Experiment` the search can run on: it also scores a module on
    some of a task's own training samples.

    ``validation_score(module, task, positions) -> float``: the experiment's metric (a fraction,
    higher is better; the same kind as ``evaluate``'s) of ``module`` (the trained module) on the
    samples at ``positions`` of ``train_data([task])``; it must read nothing else. Optional:
    ``chance_score(task) -> float | None``, the score of a model that has learnt nothing
    (:func:`chance_level`)."""

    def validation_score(self, module: nn.Module, task: int, positions: Tensor) -> float: ...


def chance_level(experiment: Any, task: int) -> float | None:
    """The experiment's optional ``chance_score(task) -> float | None``: the validation score a model
    that has learnt nothing gets on ``task`` (the same metric as ``validation_score``); ``None``
    when the experiment does not offer one."""
    chance = getattr(experiment, "chance_score", None)
    if not callable(chance):
        return None
    value = chance(task)
    return None if value is None else float(value)


@dataclass
class SearchSettings:
    """``search:`` the per-task hyperparameter search (see the module docs for the protocol).

    ``enabled``: run it (false: every task uses ``optim.lr`` and the configured strength).
    ``lr_grid``: the learning rates of phase 1. ``start``: the first (highest) strength of phase
    2, one number for every method or a mapping from a method's name or label to its start
    (``default``: the others). ``decay`` in (0, 1): the factor between tries. ``tolerance`` in
    [0, 1): the accepted fraction of the reference accuracy lost (0.2: within 20 %).
    ``max_tries``: strengths tried at most per task. ``val_fraction`` in (0, 1): the share of the
    task's training samples held out. ``epochs``: epochs of each search run (null: the task's
    own). ``min_reference`` in [0, 1): the plasticity reference ``A*`` at or below which it counts
    as collapsed (the strength is then not decayed; module docs); null: the experiment's chance
    level (``chance_score``), or no check when it has none."""

    enabled: bool = False
    lr_grid: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.01, 0.005, 0.001])
    start: float | dict[str, float] = 100.0
    decay: float = 0.5
    tolerance: float = 0.2
    max_tries: int = 7
    val_fraction: float = 0.2
    epochs: int | None = None
    min_reference: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if not self.lr_grid or not all(math.isfinite(lr) and lr > 0 for lr in self.lr_grid):
            raise ValueError(f"search.lr_grid must list positive learning rates, got {self.lr_grid}")
        starts = self.start.values() if isinstance(self.start, dict) else [self.start]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in starts):
            raise ValueError(f"search.start must be positive (a number or a mapping of them), got {self.start}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"search.decay must be in (0, 1), got {self.decay}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"search.tolerance must be in [0, 1), got {self.tolerance}")
        if self.max_tries < 1:
            raise ValueError(f"search.max_tries must be at least 1, got {self.max_tries}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"search.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"search.epochs must be positive or null (the task's own), got {self.epochs}")
        if self.min_reference is not None and not (isinstance(self.min_reference, (int, float))
                                                   and 0.0 <= self.min_reference < 1.0):
            raise ValueError(f"search.min_reference must be in [0, 1) or null (the experiment's chance level), "
                             f"got {self.min_reference}")

    def start_for(self, method: str, label: str | None = None) -> float:
        """The phase-2 start of ``method`` (its ``label`` first, then its name, then ``default``);
        ``ValueError`` when a mapping has none of them."""
        if not isinstance(self.start, dict):
            return float(self.start)
        for key in (label, method, DEFAULT_KEY):
            if key is not None and key in self.start:
                return float(self.start[key])
        raise ValueError(f"search.start has no value for method {label or method!r}: add {label or method!r} or "
                         f"'{DEFAULT_KEY}' to it")

    def resolved_for(self, method: str, label: str | None = None) -> "SearchSettings":
        """These settings with a ``start`` mapping replaced by the one number of ``method``/``label``
        (:meth:`start_for`), for a runner that names the method otherwise in the loop (unchanged
        when ``start`` is a number or has no value for it)."""
        if not isinstance(self.start, dict):
            return self
        try:
            return dataclasses.replace(self, start=self.start_for(method, label))
        except ValueError:
            return self

    def check_methods(self, methods: Sequence[tuple[str, str]]) -> None:
        """``ValueError`` for a key of a ``start`` mapping that names none of ``methods``
        (``(registry name or "joint", label)`` pairs) and, when enabled, for a method with a strength
        hyperparameter that has no start."""
        if isinstance(self.start, dict):
            known = {DEFAULT_KEY} | {name for name, _ in methods} | {label for _, label in methods}
            for key in self.start:
                if key not in known:
                    raise ValueError(f"search.start: {key!r} names no method of this config"
                                     f"{did_you_mean(key, sorted(known))} (valid: {', '.join(sorted(known))})")
        if self.enabled:
            for name, label in methods:
                if name in METHODS and make_regularizer(name).strength:
                    self.start_for(name, label)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (every setting; ``min_reference`` only when
        set, so that a checkpoint written before it existed still resumes)."""
        identity = dataclasses.asdict(self)
        if identity["min_reference"] is None:
            del identity["min_reference"]
        return identity

    def choose(self, experiment: SearchableExperiment, model: nn.Module, trained: nn.Module, reg: Regularizer, *,
               task: int, head: int | None, optim: OptimSettings, seed: int, device: torch.device, method: str,
               label: str, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
        """Run the protocol for ``task`` on copies of ``model``/``trained``/``reg`` (their state
        after ``experiment.begin_task``); return the record, whose ``"lr"`` and ``"strength"``
        the loop trains the task with. The global RNG states are left as they were."""
        score = getattr(experiment, "validation_score", None)
        if not callable(score):
            raise MASCoreError(f"the hyperparameter search needs {type(experiment).__name__}.validation_score(module, "
                               "task, positions) (the metric on some of the task's training samples); add it or "
                               "turn the search off")
        started = time.perf_counter()
        states = get_rng_states()
        try:
            record = _Search(self, experiment, model, trained, reg, task, head, optim, seed, device, label).run(method)
        finally:
            set_rng_states(states)
        record["seconds"] = time.perf_counter() - started
        if record["reference_collapsed"]:
            log(f"[{label}] task {task + 1} search: warning: the plasticity reference {record['reference_acc']:.3f} "
                f"is no better than chance ({record['chance_level']:.3f}); see the reason below")
        log(f"[{label}] task {task + 1} search: {describe_choice(record)}; {record['reason']}")
        return record

    def back_off(self, record: dict[str, Any], error: str) -> dict[str, float] | None:
        """The strength to retrain a task with after its real training diverged at ``record``'s
        ``"strength"`` (``error``: the divergence message), or ``None`` when there is none left.

        The next value of phase 2's decay, ``decay·λ`` (module docs, step 4), while it stays at or
        above the floor ``start·decay^(max_tries−1)`` (``start`` = the first value tried); ``None``
        for a record whose strength was not searched (no strength hyperparameter, or task 0; a collapsed
        reference keeps ``start``, and backs off from there). On a
        back-off, ``record`` gets the diverged value and ``error`` appended to ``"backoff"``, its
        ``"strength"`` set to the new value and its ``"reason"`` extended."""
        name, tries = record.get("strength_name"), record.get("tries") or []
        if not name or not (tries or (record.get("reference_collapsed") and record.get("task", 0) > 0)):
            return None
        steps = max(len(tries) - 1, 0) + len(record.get("backoff") or [])  # decay steps from start so far
        if steps + 1 >= self.max_tries:
            return None
        failed = float(record["strength"][name])
        value = failed * self.decay
        record.setdefault("backoff", []).append({"strength": {name: failed}, "error": error})
        record["strength"] = {name: value}
        record["reason"] += (f"; the real training diverged at {name}={failed:g}, retrained with "
                             f"{name}={value:g} (× decay {self.decay:g})")
        return {name: value}


class _Positions:
    """Some positions of a :class:`~mas_core.loop.TrainData`, read as a TrainData of their own."""

    def __init__(self, data: TrainData, positions: Tensor) -> None:
        self.data, self.positions = data, positions

    def __len__(self) -> int:
        return len(self.positions)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterable[Any]:
        return self.data.batches([self.positions[index] for index in index_batches])


def split_positions(n: int, val_fraction: float, seed: int, task: int) -> tuple[Tensor, Tensor]:
    """``(train, validation)`` positions of a task of ``n`` training samples: a permutation drawn
    from ``derived_seed(seed, "search-split", task)``, its first ``max(1, round(f·n))`` held out."""
    if n < 2:
        raise EmptyDataError(f"task {task} has {n} training sample(s); the search needs at least 2 to hold one out")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, "search-split", task)))
    held_out = min(n - 1, max(1, round(val_fraction * n)))
    return order[held_out:].sort().values, order[:held_out].sort().values


def best_learning_rate(scores: Sequence[float | None]) -> int:
    """Index of the highest score (the first on ties; ``None`` = diverged never wins); ``-1`` if all are ``None``."""
    best = -1
    for index, value in enumerate(scores):
        if value is not None and (best < 0 or value > scores[best]):
            best = index
    return best


def stability_decay(score: Callable[[float], float | None], start: float, decay: float, tolerance: float,
                    reference: float, max_tries: int) -> tuple[list[tuple[float, float | None]], int]:
    """Phase 2: try ``λ_k = start·decay^k`` until ``score(λ_k) ≥ (1 − tolerance)·reference``.

    Returns ``(tries, chosen)``: every ``(λ_k, A_k)`` tried in order (``A_k`` ``None`` for a
    diverged run) and the index of the chosen one: the first within tolerance, else the last."""
    threshold = (1.0 - tolerance) * reference
    tries: list[tuple[float, float | None]] = []
    value = float(start)
    for _ in range(max_tries):
        accuracy = score(value)
        tries.append((value, accuracy))
        if accuracy is not None and accuracy >= threshold:
            return tries, len(tries) - 1
        value *= decay
    return tries, len(tries) - 1


def accepted_at_start(record: dict[str, Any]) -> bool:
    """True when the stability decay accepted its first value (``start``) and the real run kept it:
    the search never reached the strength at which plasticity drops, so a higher ``start`` might
    have been chosen (the method's row is then bounded by the start, not by the protocol)."""
    tries = record.get("tries") or []
    threshold = record.get("threshold")
    return (len(tries) == 1 and not record.get("backoff") and threshold is not None
            and tries[0].get("val_acc") is not None and tries[0]["val_acc"] >= threshold)


def describe_choice(record: dict[str, Any]) -> str:
    """``"lr 0.05, lam=2.5"`` (``"lr 0.05"`` where the strength was not searched: a method without
    one, or task 0, where it has no effect); ``" (start)"`` appended where the first value tried was
    accepted (:func:`accepted_at_start`)."""
    text = f"lr {record['lr']:g}"
    searched = record.get("tries") or (record.get("reference_collapsed") and record.get("strength_name")
                                       and record.get("task", 0) > 0)  # λ_0 kept, nothing tried
    strength = (record.get("strength") or {}) if searched else {}
    text += f", {describe_strength_values(strength)}" if strength else ""
    return text + (" (start)" if accepted_at_start(record) else "")


class _Search:
    """One task's search (the module docs' steps 1–3)."""

    def __init__(self, settings: SearchSettings, experiment: SearchableExperiment, model: nn.Module,
                 trained: nn.Module, reg: Regularizer, task: int, head: int | None, optim: OptimSettings, seed: int,
                 device: torch.device, label: str) -> None:
        self.settings, self.experiment, self.task, self.head = settings, experiment, task, head
        self.model, self.trained, self.reg = model, trained, reg
        self.seed, self.device, self.label = seed, device, label
        self.optim = dataclasses.replace(optim, epochs=settings.epochs or optim.epochs_of(task),
                                         first_task_epochs=None)
        data = experiment.train_data([task])
        self.train_positions, self.val_positions = split_positions(len(data), settings.val_fraction, seed, task)
        self.train_split = _Positions(data, self.train_positions)

    def run(self, method: str) -> dict[str, Any]:
        settings, tolerance = self.settings, self.settings.tolerance
        lr_scores = [self._candidate(None, lr, ("lr", index)) for index, lr in enumerate(settings.lr_grid)]
        best = best_learning_rate(lr_scores)
        if best < 0:
            raise DivergenceError(f"method {self.label}, task {self.task + 1}: every learning rate of search.lr_grid "
                                  f"{settings.lr_grid} diverged while fine-tuning; give smaller ones")
        lr, reference = settings.lr_grid[best], float(lr_scores[best])
        level = settings.min_reference if settings.min_reference is not None else chance_level(self.experiment,
                                                                                                 self.task)
        collapsed = level is not None and reference <= level
        record: dict[str, Any] = {
            "task": self.task, "name": self.experiment.task_names[self.task],
            "train_samples": len(self.train_positions), "val_samples": len(self.val_positions),
            "epochs": self.optim.epochs, "lr_grid": [{"lr": g, "val_acc": a} for g, a in zip(settings.lr_grid, lr_scores)],
            "reference_acc": reference, "lr": lr, "threshold": None, "strength_name": None, "tries": [],
            "strength": dict(self.reg.strength), "backoff": [], "chance_level": level,
            "reference_collapsed": collapsed,
        }
        note = "" if not collapsed else (f"; the plasticity reference {reference:.3f} is no better than chance "
                                         f"({level:.3f}): every learning rate collapsed, lr {lr:g} is arbitrary")
        names = list(self.reg.strength)
        if not names:
            record["reason"] = f"{self.label} has no strength hyperparameter: the learning rate alone is searched" + note
            return record
        if len(names) > 1:
            raise MASCoreError(f"the search decays one strength hyperparameter; {self.label} has {names}")
        name = names[0]
        record["strength_name"] = name
        if self.task == 0 and not self.reg.anchors_at_start:
            record["reason"] = (f"first task: nothing to protect yet (the penalty is 0 whatever {name}), "
                                f"{name} kept at {self.reg.strength[name]:g}") + note
            return record
        try:
            start = settings.start_for(method, self.label)
        except ValueError as exc:
            raise MASCoreError(str(exc)) from None
        if collapsed:
            record["strength"] = {name: start}
            record["reason"] = (f"the plasticity reference {reference:.3f} is no better than chance ({level:.3f}): "
                                f"every learning rate collapsed, so the threshold (1 − {tolerance:g})·A* means nothing; "
                                f"{name} kept at the most stable value, the start {start:g}, not decayed")
            return record

        def score(value: float) -> float | None:
            return self._candidate({name: value}, lr, ("strength", value))

        tries, chosen = stability_decay(score, start, settings.decay, tolerance, reference, settings.max_tries)
        threshold = (1.0 - tolerance) * reference
        value, accuracy = tries[chosen]
        record.update(threshold=threshold, tries=[{"value": v, "val_acc": a} for v, a in tries],
                      strength={name: value})
        if accuracy is not None and accuracy >= threshold:
            record["reason"] = (f"{name}={value:g}: val acc {accuracy:.3f} ≥ (1 − {tolerance:g})·{reference:.3f} = "
                                f"{threshold:.3f}, within {100 * tolerance:g} % of the plasticity reference, the first of "
                                f"{len(tries)} tried from {start:g}")
        else:
            record["reason"] = (f"no {name} within {100 * tolerance:g} % of the plasticity reference {reference:.3f} "
                                f"after {len(tries)} tries from {start:g}; took the smallest tried, {value:g}")
        return record

    def _candidate(self, strength: dict[str, float] | None, lr: float, tag: tuple[Any, ...]) -> float | None:
        """Train a copy on ``S_t`` at ``lr`` with a copy of the method at ``strength`` (``None``: with
        no penalty, phase 1); its metric on ``V_t`` (``None`` when it diverged). The method's
        ``before_task`` runs in both phases, so both start where the method's training starts
        (IMM's weight transfer). The copies share the experiment (a method may hold its bound
        methods, e.g. EWC's ``loss_fn``; it holds data and open files, never trained state)."""
        model, trained, reg = copy.deepcopy((self.model, self.trained, self.reg),
                                            {id(self.experiment): self.experiment})
        if strength is not None:
            reg.set_strength(**strength)
        torch.manual_seed(derived_seed(self.seed, "search", self.task, *tag))
        model.train()
        trained.train()
        reg.before_task(trained, TaskInfo(index=self.task, head=self.head, num_samples=len(self.train_split)))
        if strength is None:
            reg = Finetune()
        optim = dataclasses.replace(self.optim, lr=lr)
        try:
            train_task_epochs(self.experiment, trained, model, self.train_split, self.task, reg, optim,
                              derived_seed(self.seed, "search"), self.device, False, self.label, lambda message: None)
        except DivergenceError:
            return None
        model.eval()
        trained.eval()
        value = float(self.experiment.validation_score(trained, self.task, self.val_positions))
        return value if math.isfinite(value) else None


__all__ = ["SearchSettings", "SearchableExperiment", "accepted_at_start", "best_learning_rate", "chance_level",
           "describe_choice", "split_positions", "stability_decay"]
