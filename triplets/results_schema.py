"""The one results schema of both experiments (``RUN/results.json``; ``docs/run_folder.md``).

Version 1::

    {"schema_version": 1, "experiment": "facts" | "recognition", "name": str,
     "metric": what R measures ("standard top-5" | "top-1 accuracy"), "complete": bool,
     "tasks": [{"index": t, "name": str, ...sizes}],
     "methods": {key: {"method": registry name or "joint", "options": {...},
                       "accuracy_matrix": R, "avg_acc": A, "forgetting": F, "bwt": BWT,
                       "avg_drop": D, "wall_time_s": s,
                       ["accuracy_matrix_merged": R_merged, "merged": {"avg_acc", "forgetting",
                        "bwt", "avg_drop"}],       # IMM only (after_task_changes_model)
                       "labels": [{"method": str, "strength": {name: λ}, "penalty_step": str | null,
                                   "importance": {"estimator": str, "samples": N | null,
                                                  "accumulation": str} | null}],   # per task
                       ...experiment extras}},
     "config": the experiment's config as a plain mapping,
     ["diverged": {key: one-line error}]}   # recognition: methods stopped by a divergence

``labels``: per task, what the method ran with (:meth:`mas_core.regularizers.base.Regularizer.describe`
after the task's ``after_task``): its strength, the penalty step and how its importance was made (the
estimator ``exact`` / ``batch`` / ``hebbian`` / ``online`` for MAS, ``fisher``, ``path integral``,
``uniform``; the samples the estimate read; the accumulation rule ``sum`` / ``average (ema α=…)`` /
``consistency`` / ``online (γ=…)``); absent from results written before it was recorded.

``R[i][j]`` is the metric (a fraction in [0, 1]) on task ``j`` of the model as trained on task
``i``, ``null`` for ``j > i``; ``A``, ``F``, ``BWT`` and ``D`` are :mod:`mas_core.metrics`'
average accuracy, forgetting (Chaudhry et al. 2018: mean over ``j < T-1`` of
``max_{j≤l<T-1} R[l][j] - R[T-1][j]``), backward transfer (mean over ``j < T-1`` of
``R[T-1][j] - R[j][j]``) and the MAS paper's average drop (mean over all ``j`` of
``R[T-1][j] - R[j][j]``). A method whose ``after_task`` changes the weights (IMM's merge) also
has ``accuracy_matrix_merged`` (row ``i``: the model after ``after_task`` of task ``i``) and
``merged``: the metrics of the final merged model against the models as trained
(:func:`mas_core.metrics.with_final_row`). Extras: ``ridge`` (the closed-form baseline,
:mod:`mas_core.ridge`: per task the strengths tried with their validation MSE, the one chosen and
its penalties ``alpha``; it has no ``lr`` or strength of an optimizer), the fact embedding's ``final`` (per mode and
task the final retrieval metrics, of the final model: for IMM the merged one), ``diagonal_mean`` and
``retrieval`` (:mod:`triplets.facts.retrieval_report`) and, with ``eval.stale_index``, ``stale_index``
(:mod:`triplets.facts.stale_index`), the recognition
sequence's ``importance_data``; both, when the config's ``search`` is enabled,
``hparam_search``: one record per task of what :mod:`mas_core.hparam_search` chose and why::

    {"task": t, "name": str, "train_samples": |S_t|, "val_samples": |V_t|, "epochs": E,
     "lr_grid": [{"lr": η, "val_acc": A(η) | null}], "reference_acc": A*, "lr": η*,
     "strength_name": "lam" | "lam_l2" | null, "threshold": (1 − tolerance)·A* | null,
     "tries": [{"value": λ_k, "val_acc": A_k | null}], "strength": {name: λ_t},
     "bracket": {"accepted": λ | null, "rejected": λ | null} | null,
     "backoff": [{"strength": {name: λ}, "error": str}], "chance_level": c | null,
     "reference_collapsed": bool, "reason": str, "seconds": s}

(``null`` accuracy: that run diverged; ``threshold`` null and ``tries`` empty where phase 2 did
not run: a method without a strength, task 0, or a reference ``A* ≤ c`` (``reference_collapsed``,
λ kept at the start); ``bracket``: the limit the two-sided stability phase found, the strongest value
that passed and the weakest that failed above it (``rejected`` null: every value tried passed),
null where phase 2 did not run; ``backoff``: the strengths whose real training diverged before ``λ_t``.)
"""
from __future__ import annotations

from typing import Any

from mas_core.loop import SequenceResult

SCHEMA_VERSION = 1
SEARCH_KEY = "hparam_search"  # the per-task search records (SequenceResult.summary adds them)


def method_summary(outcome: SequenceResult, method: str, options: dict[str, Any], **extras: Any) -> dict[str, Any]:
    """The ``methods[key]`` entry of a results document for a finished sequence."""
    return {"method": method, "options": dict(options), **outcome.summary(), **extras}


def results_document(*, experiment: str, name: str, metric: str, complete: bool, tasks: list[dict[str, Any]],
                     methods: dict[str, Any], config: dict[str, Any],
                     diverged: dict[str, str] | None = None) -> dict[str, Any]:
    """A results document of :data:`SCHEMA_VERSION` (see the module docs). ``diverged``: the
    methods whose training stopped with a divergence, each with its one-line message (the key is
    present only when some did; those methods are not in ``methods``)."""
    document = {"schema_version": SCHEMA_VERSION, "experiment": experiment, "name": name, "metric": metric,
                "complete": complete, "tasks": tasks, "methods": methods, "config": config}
    if diverged:
        document["diverged"] = dict(diverged)
    return document


__all__ = ["SCHEMA_VERSION", "SEARCH_KEY", "method_summary", "results_document"]
