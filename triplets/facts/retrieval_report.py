"""The field's retrieval figures in a fact run's results: summaries for ``results.json`` and the
Markdown tables of ``results.md`` (pure Python on a results document; no model, no index).

Per method, :func:`summary_extras` adds to ``results.json``

- ``diagonal_mean``: plasticity, the accuracy right after learning each task,
  ``(1/T) Σ_j R[j][j]`` (standard top-5; for IMM the models as trained);
- ``retrieval``: ``{"standard": {key: mean over tasks}, "generalized": {...}}`` of the final
  model's per-task ``final`` metrics for the keys of :data:`SUMMARY_KEYS` (the strict R@K and MRR
  of :mod:`triplets.facts.retrieval_metrics`, fact → image mAP@10), those every task has.

:func:`retrieval_tables` and :func:`stale_index_tables` render them (percentages; forgetting
and BWT in points) for :func:`triplets.report.render_markdown`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

SUMMARY_KEYS = ("i2f_r1", "i2f_r5", "i2f_r10", "i2f_mrr", "f2i_r1", "f2i_r5", "f2i_r10", "map_at_10")
RETRIEVAL_MODES = ("standard", "generalized")
"""The two retrieval evaluations: "standard" ranks the task's own facts, "generalized" every task's."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def diagonal_mean(matrix: Any) -> float | None:
    """``(1/T) Σ_j R[j][j]`` over the rows of ``matrix`` (None when a diagonal value is missing)."""
    if not isinstance(matrix, list) or not matrix:
        return None
    values = [_number(row[j]) if isinstance(row, list) and j < len(row) else None for j, row in enumerate(matrix)]
    return None if any(value is None for value in values) else sum(values) / len(values)


def retrieval_summary(final: Any) -> dict[str, dict[str, float]] | None:
    """Means over tasks of :data:`SUMMARY_KEYS` per mode of a ``final`` entry (keys every task has);
    None when ``final`` holds none of them."""
    if not isinstance(final, dict):
        return None
    summary: dict[str, dict[str, float]] = {}
    for mode in RETRIEVAL_MODES:
        tasks = final.get(mode)
        if not isinstance(tasks, list) or not tasks or not all(isinstance(task, dict) for task in tasks):
            continue
        means = {}
        for key in SUMMARY_KEYS:
            values = [_number(task.get(key)) for task in tasks]
            if all(value is not None for value in values):
                means[key] = sum(values) / len(values)
        if means:
            summary[mode] = means
    return summary or None


def summary_extras(entry: dict[str, Any]) -> dict[str, Any]:
    """``{"diagonal_mean": …, "retrieval": …}`` of a method's entry (absent values left out)."""
    extras: dict[str, Any] = {}
    diagonal = diagonal_mean(entry.get("accuracy_matrix"))
    if diagonal is not None:
        extras["diagonal_mean"] = diagonal
    summary = retrieval_summary(entry.get("final"))
    if summary is not None:
        extras["retrieval"] = summary
    return extras


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * float(value):.2f}"


def retrieval_tables(results: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Two Markdown tables, standard and generalized: per method the diagonal mean, forgetting and
    BWT (of R; ``rows``: :func:`triplets.report.summary_rows`) and the final model's image → fact
    R@1/5/10 and MRR, fact → image R@1/5/10 and mAP@10, means over tasks."""
    by_name = {row["method"]: row for row in rows}
    metric_header = "I→F R@1 | I→F R@5 | I→F R@10 | I→F MRR | F→I R@1 | F→I R@5 | F→I R@10 | F→I mAP@10"
    parts = []
    for mode in RETRIEVAL_MODES:
        continual = mode == "standard"
        title = ("Retrieval as continual vision–language papers report it (final model, mean over tasks, %; "
                 "I→F: each test region ranks the candidate facts and only its true fact counts; F→I: each fact "
                 "with a test region ranks the regions, a hit when one of its own is among the first K; "
                 f"{mode} mode: {'each task’s own facts' if continual else 'the facts of all tasks'} as candidates"
                 + ("; diagonal mean: the standard top-5 right after learning each task (plasticity)" if continual
                    else "") + "):")
        continual_header = "diagonal mean | forgetting (pts) | BWT (pts) | " if continual else ""
        head = "| method | " + continual_header + metric_header + " |"
        columns = 8 + (3 if continual else 0)
        lines = [title, "", head, "|---|" + "---:|" * columns]
        for name, entry in results["methods"].items():
            summary = (retrieval_summary(entry.get("final")) or {}).get(mode, {})
            cells = [_percent(summary.get(key)) for key in SUMMARY_KEYS]
            if continual:
                row = by_name.get(name, {})
                cells = [_percent(diagonal_mean(entry.get("accuracy_matrix"))), _percent(row.get("forgetting")),
                         _percent(row.get("bwt"))] + cells
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def stale_index_tables(results: dict[str, Any]) -> str:
    """The stale-index rows of every method that has them (:mod:`triplets.facts.stale_index`): per index
    built after task s, the standard top-5 and MRR on the facts of tasks 1..s from that index and
    from the final model's fresh embeddings; ``""`` when no method has them."""
    stale = {name: entry["stale_index"] for name, entry in results["methods"].items()
             if isinstance(entry.get("stale_index"), dict) and entry["stale_index"].get("rows")}
    if not stale:
        return ""
    lines = ["Stale index (standard mode, %): the final model's queries (the fact vectors) against the test-region "
             "embeddings computed by the model after task s, on the facts of tasks 1..s, beside the final model's "
             "fresh embeddings of the same regions (C[T] = fresh; Δ = stale − fresh):", "",
             "| method | index after task | stale top-5 | fresh top-5 | Δ top-5 (pts) | stale MRR | fresh MRR | "
             "stale F→I mAP@10 | fresh F→I mAP@10 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in stale.items():
        for row in entry["rows"]:
            old, new = row.get("stale", {}), row.get("fresh", {})
            delta = None if old.get("top5") is None or new.get("top5") is None else old["top5"] - new["top5"]
            lines.append(f"| {name} | {row.get('index_after_task')} | {_percent(old.get('top5'))} | "
                         f"{_percent(new.get('top5'))} | {_percent(delta)} | {_percent(old.get('mrr'))} | "
                         f"{_percent(new.get('mrr'))} | {_percent(old.get('map_at_10'))} | "
                         f"{_percent(new.get('map_at_10'))} |")
    return "\n".join(lines)


__all__ = ["RETRIEVAL_MODES", "SUMMARY_KEYS", "diagonal_mean", "retrieval_summary", "retrieval_tables", "stale_index_tables",
           "summary_extras"]
