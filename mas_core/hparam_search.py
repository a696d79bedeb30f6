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
3. **Stability, from both sides.** ``λ_0 = start`` (per method); the values tried lie on the grid
   ``start·decay^k``. A value *passes* when ``A(λ) ≥ (1 − tolerance)·A*`` (its validation accuracy
   after training a copy with the method at ``λ`` and ``η*`` on ``S_t``). When ``λ_0`` passes, the
   search **grows**: ``λ ← λ/decay`` (doubled at the default decay 0.5) until the first value that
   fails, and takes the last that passed. Otherwise it **decays**: ``λ ← decay·λ`` until the first
   value that passes (as before the two-sided search); when none does (or all diverge), ``λ_t`` is
   the last, smallest value tried (the floor ``start·decay^(max_tries−1)``). Both directions share
   ``max_tries`` tries, each recorded. The record's ``"bracket"`` holds the limit found: the
   strongest value accepted and the weakest rejected above it (``{"accepted": a, "rejected": r}``;
   ``r`` null when every try grew and passed: the limit lies higher; ``a`` null when none passed).
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
the threshold, the bracket, the choice and the reason in words.
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
from .epochs import EpochSettings, derived_seed, train_task_epochs
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
    ``lr_grid``: the learning rates of phase 1. ``start``: the first strength phase 2 tries (then
    grown by ``1/decay`` while it passes, decayed by ``decay`` while it fails), one number for every
    method or a mapping from a method's name or label to its start (``default``: the others).
    ``decay`` in (0, 1): the factor between tries. ``tolerance`` in
    [0, 1): the accepted fraction of the reference accuracy lost (0.2: within 20 %).
    ``max_tries``: strengths tried at most per task, growing and decaying together. ``val_fraction`` in (0, 1): the share of the
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
        set, so that a checkpoint written before it existed still resumes; ``"stability": "two-sided"``,
        so that a run whose earlier tasks were searched by the decay alone, before issue 23, is not
        continued under the two-sided search)."""
        identity = dataclasses.asdict(self)
        if identity["min_reference"] is None:
            del identity["min_reference"]
        identity["stability"] = "two-sided"
        return identity

    def choose(self, experiment: SearchableExperiment, model: nn.Module, trained: nn.Module, reg: Regularizer, *,
               task: int, head: int | None, optim: OptimSettings, seed: int, device: torch.device, method: str,
               label: str, log: Callable[[str], None] = lambda message: None,
               stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Run the protocol for ``task`` on copies of ``model``/``trained``/``reg`` (their state
        after ``experiment.begin_task``); return the record, whose ``"lr"`` and ``"strength"``
        the loop trains the task with. The global RNG states are left as they were. ``stop``: asked
        after every step of the trial runs (:class:`~mas_core.epochs.EpochSettings`), so that a
        Ctrl-C does not wait for the search to end."""
        score = getattr(experiment, "validation_score", None)
        if not callable(score):
            raise MASCoreError(f"the hyperparameter search needs {type(experiment).__name__}.validation_score(module, "
                               "task, positions) (the metric on some of the task's training samples); add it or "
                               "turn the search off")
        started = time.perf_counter()
        states = get_rng_states()
        try:
            record = _Search(self, experiment, model, trained, reg, task=task, head=head, optim=optim, seed=seed,
                             device=device, label=label, stop=stop).run(method)
        finally:
            set_rng_states(states)
        record["seconds"] = time.perf_counter() - started
        if record["reference_collapsed"]:
            log(f"[{label}] task {task + 1} search: warning: the plasticity reference {record['reference_acc']:.3f} "
                f"is no better than chance ({record['chance_level']:.3f}); see the reason below")
        log(f"[{label}] task {task + 1} search: {describe_choice(record)}; {record['reason']}")
        return record

    def real_run_collapsed(self, experiment: SearchableExperiment, trained: nn.Module, record: dict[str, Any],
                           seed: int) -> str | None:
        """The fourth divergence event (``docs/method.md`` §14.1): ``None``, or what to say when the
        task's **real** training ended below the bar its strength was accepted by.

        With ``T = (1 − tolerance)·A*`` the record's threshold (the strength passed it on ``V_t``
        after ``E`` epochs on ``S_t``) and ``A_real`` the metric of ``trained`` after the real run on
        the same ``V_t`` (module docs, step 1), which the real run **trained on**, for more or as many
        epochs, the run has collapsed when

            A_real < T − 2·√(T(1 − T)/|V_t|)      (or A_real is not finite)

        A healthy real run scores at least what the accepted search run scored on samples it had not
        seen; one that ends below that bar, by more than two standard errors of a proportion measured
        on ``|V_t|`` samples (so that a small validation split's noise does not trip it), on its own
        training samples has lost the task (LwF at a large λ_o ends every task at chance with a
        bounded loss, which no loss rule sees). Checked
        only where the stability phase ran (a ``threshold`` and a searched strength to back off
        from); the loop then backs off as from a NaN."""
        threshold = record.get("threshold")
        if threshold is None or not record.get("tries"):
            return None
        _, positions = split_positions(len(experiment.train_data([record["task"]])), self.val_fraction, seed,
                                       record["task"])
        value = float(experiment.validation_score(trained, record["task"], positions))
        bar = float(threshold)
        bound = bar - 2.0 * math.sqrt(max(bar * (1.0 - bar), 0.0) / len(positions))
        if math.isfinite(value) and value >= bound:
            return None
        return (f"the task's own validation score after training, {value:.3f}, is below the bar "
                f"{bar:.3f} = (1 − {self.tolerance:g})·{record['reference_acc']:.3f} its strength passed in "
                f"the search, by more than two standard errors on {len(positions)} samples (bound {bound:.3f}): "
                f"a collapse at a bounded loss")

    def back_off(self, record: dict[str, Any], error: str) -> dict[str, float] | None:
        """The strength to retrain a task with after its real training diverged at ``record``'s
        ``"strength"`` (``error``: the divergence message), or ``None`` when there is none left.

        The next value of phase 2's decay, ``decay·λ`` (module docs, step 4), while it stays at or
        above the floor ``start·decay^(max_tries−1)`` (``start`` = the first value tried; a value the
        search grew to above ``start`` has that many more steps to go down); ``None``
        for a record whose strength was not searched (no strength hyperparameter, or task 0; a collapsed
        reference keeps ``start``, and backs off from there). On a
        back-off, ``record`` gets the diverged value and ``error`` appended to ``"backoff"``, its
        ``"strength"`` set to the new value and its ``"reason"`` extended."""
        name, tries = record.get("strength_name"), record.get("tries") or []
        if not name or not (tries or (record.get("reference_collapsed") and record.get("task", 0) > 0)):
            return None
        start = float(tries[0]["value"]) if tries else float(record["strength"][name])  # the first value tried
        floor = start * self.decay ** (self.max_tries - 1)
        if float(record["strength"][name]) * self.decay < floor * (1.0 - 1e-9):
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
    """Phase 2, two-sided: find the strongest ``λ`` on the grid ``start·decay^k`` (``k`` any integer)
    with ``score(λ) ≥ (1 − tolerance)·reference``, within ``max_tries`` calls of ``score``.

    - ``score(start)`` passes: **grow**, ``λ ← λ/decay`` (doubled at decay 0.5), until the first
      value that fails (or diverges); the chosen value is the last that passed, just below it.
    - ``score(start)`` fails: **decay** as before, ``λ ← decay·λ``, until the first value that passes;
      when none does, the last, smallest value tried (the floor ``start·decay^(max_tries−1)``).

    Either way the chosen value ``a`` and the value ``r = a/decay`` above it that failed bracket the
    method's limit (:func:`search_bracket`); when every try grew and passed, ``r`` is unknown (the
    limit lies above the last value tried). Returns ``(tries, chosen)``: every ``(λ, A)`` tried in
    order (``A`` ``None`` for a diverged run) and the index of the chosen one."""
    threshold = (1.0 - tolerance) * reference

    def passed(accuracy: float | None) -> bool:
        return accuracy is not None and accuracy >= threshold

    tries: list[tuple[float, float | None]] = [(float(start), score(float(start)))]
    if passed(tries[0][1]):  # grow until the first rejection
        while len(tries) < max_tries:
            value = tries[-1][0] / decay
            tries.append((value, score(value)))
            if not passed(tries[-1][1]):
                return tries, len(tries) - 2
        return tries, len(tries) - 1
    while len(tries) < max_tries:  # decay until the first acceptance
        value = tries[-1][0] * decay
        tries.append((value, score(value)))
        if passed(tries[-1][1]):
            break
    return tries, len(tries) - 1


def search_bracket(record: dict[str, Any]) -> dict[str, float | None] | None:
    """The bracket the stability phase found: ``{"accepted": a, "rejected": r}``, ``a`` the strongest
    value that passed (the chosen one, unless every try failed: ``None``) and ``r`` the weakest value
    above it that failed (``None`` when every value tried passed: the limit lies above ``a``).
    Read from the record's ``"bracket"``, or from its ``"tries"`` for a record written before the
    two-sided search; ``None`` when the phase did not run (no strength, task 0, collapsed reference)."""
    if record.get("bracket"):
        return dict(record["bracket"])
    tries, threshold = record.get("tries") or [], record.get("threshold")
    if not tries or threshold is None:
        return None
    ok = [t["value"] for t in tries if t.get("val_acc") is not None and t["val_acc"] >= threshold]
    accepted = max(ok) if ok else None
    above = [t["value"] for t in tries if t["value"] not in ok and (accepted is None or t["value"] > accepted)]
    return {"accepted": accepted, "rejected": min(above) if above else None}


def describe_choice(record: dict[str, Any]) -> str:
    """``"lr 0.05, lam=2.5 (5 rejected)"`` (``"lr 0.05"`` where the strength was not searched: a
    method without one, or task 0, where it has no effect). The parenthesis is the bracket of
    :func:`search_bracket`: the weakest value above the choice that failed the validation threshold;
    ``"(none rejected up to λ)"`` when every value tried passed (the limit lies higher), ``"(none
    accepted)"`` when none did (the floor was taken); ``"(backed off)"`` after a back-off."""
    text = f"lr {record['lr']:g}"
    searched = record.get("tries") or (record.get("reference_collapsed") and record.get("strength_name")
                                       and record.get("task", 0) > 0)  # λ_0 kept, nothing tried
    strength = (record.get("strength") or {}) if searched else {}
    text += f", {describe_strength_values(strength)}" if strength else ""
    bracket = search_bracket(record) if strength else None
    if record.get("backoff"):
        return text + " (backed off)"
    if bracket is None:
        return text
    if bracket["accepted"] is None:
        return text + " (none accepted)"
    if bracket["rejected"] is None:
        return text + f" (none rejected up to {bracket['accepted']:g})"
    return text + f" ({bracket['rejected']:g} rejected)"


class _Search:
    """One task's search (the module docs' steps 1–3)."""

    def __init__(self, settings: SearchSettings, experiment: SearchableExperiment, model: nn.Module,
                 trained: nn.Module, reg: Regularizer, *, task: int, head: int | None, optim: OptimSettings, seed: int,
                 device: torch.device, label: str, stop: Callable[[], bool] | None = None) -> None:
        self.settings, self.experiment, self.task, self.head = settings, experiment, task, head
        self.model, self.trained, self.reg = model, trained, reg
        self.seed, self.device, self.label, self.stop = seed, device, label, stop
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
            "strength": dict(self.reg.strength), "bracket": None, "backoff": [], "chance_level": level,
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
        record["bracket"] = search_bracket(record)
        rejected = record["bracket"]["rejected"]
        if accuracy is not None and accuracy >= threshold:
            limit = (f"{name}={rejected:g} above it was rejected" if rejected is not None else
                     f"no value was rejected within search.max_tries={settings.max_tries}: the limit lies above")
            record["reason"] = (f"{name}={value:g}: val acc {accuracy:.3f} ≥ (1 − {tolerance:g})·{reference:.3f} = "
                                f"{threshold:.3f}, within {100 * tolerance:g} % of the plasticity reference, the "
                                f"strongest accepted of {len(tries)} tried from {start:g}; {limit}")
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
            train_task_epochs(self.experiment, trained, model, self.train_split, self.task, reg,
                              EpochSettings(optim=optim, seed=derived_seed(self.seed, "search"), device=self.device,
                                            label=self.label, stop=self.stop))
        except DivergenceError:
            return None
        model.eval()
        trained.eval()
        value = float(self.experiment.validation_score(trained, self.task, self.val_positions))
        return value if math.isfinite(value) else None


__all__ = ["SearchSettings", "SearchableExperiment", "best_learning_rate", "chance_level", "describe_choice",
           "search_bracket", "split_positions", "stability_decay"]
