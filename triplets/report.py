"""The run reports of both experiments: Markdown tables and PNG plots from a results document
(:mod:`triplets.results_schema`).

Fact embedding, ``write_report(results, out_dir)`` writes

- ``out_dir/results.md``: one row per method with average top-5 (mean of the last row of
  the accuracy matrix R, standard mode), forgetting (Chaudhry et al. 2018: mean over j < T−1 of
  max_{j≤l<T−1} R[l][j] − R[T−1][j]), BWT (mean over j < T−1 of R[T−1][j] − R[j][j]), final
  generalized top-5, final MRR (standard and generalized) and final mAP (means over tasks of the
  ``final`` entries); the field's retrieval figures (:func:`triplets.facts.retrieval_report.retrieval_tables`:
  R@1/5/10 both ways, MRR, mAP@10, standard and generalized, the diagonal mean beside forgetting
  and BWT) and, when the run has them, the stale-index rows (:mod:`triplets.facts.stale_index`); then each method's
  task × task matrix. A method whose ``after_task`` changes the weights (IMM's merge) has R of the
  models as trained and a second row "(merged)" for the model it delivers (R with its last row
  from ``accuracy_matrix_merged``; the ``final`` metrics are that model's);
- ``out_dir/plots/accuracy_matrix_<method>.png``: R as a heatmap (rows: after training task i,
  columns: evaluated on task j; blank above the diagonal);
- ``out_dir/plots/per_task_top5.png``: grouped bars, one group per task and one bar per method,
  the standard top-5 on each task after the last task (the last row of R), as in the
  lifelong-fact-learning paper's figure.

Recognition sequence: :func:`recognition_markdown` (the paper's Table 2 layout for two tasks,
else average accuracy, drop, forgetting and BWT per method, IMM's merged model in a row of its
own; then per-task final accuracies with their drops) and :func:`write_recognition_plots` (``plots/accuracy.png``, ``plots/drop.png``: per task,
one bar per method).

Accuracies in ``results.json`` are fractions; the reports show percentages (points for
forgetting, BWT and drops). Every file is written atomically. Plots use matplotlib's Agg canvas
directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so no global backend is set
and nothing happens at import time.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mas_core import metrics
from mas_core.checkpoint import atomic_write_bytes, atomic_write_text
from mas_core.errors import MASCoreError
from mas_core.hparam_search import describe_choice

from .errors import TripletsError
from .results_schema import SEARCH_KEY
from .facts.retrieval_report import diagonal_mean, retrieval_tables, stale_index_tables


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def _matrix(entry: dict[str, Any], method: str) -> list[list[float | None]]:
    matrix = entry.get("accuracy_matrix")
    if not isinstance(matrix, list) or not matrix or not all(isinstance(row, list) for row in matrix):
        raise TripletsError(f"results for method {method!r} have no accuracy_matrix (list of rows); "
                            "re-run training to regenerate results.json")
    return [[None if v is None else float(v) for v in row] for row in matrix]


def forgetting_and_bwt(matrix: list[list[float | None]]) -> tuple[float | None, float | None]:
    """(forgetting, BWT) of an accuracy matrix with T ≥ 2 complete rows (:mod:`mas_core.metrics`):
    F = mean_{j<T−1} max_{j≤l<T−1} R[l][j] − R[T−1][j] (Chaudhry et al. 2018) and
    BWT = mean_{j<T−1} R[T−1][j] − R[j][j] (Lopez-Paz & Ranzato 2017); F ≥ −BWT, equal only when
    no column rises after its diagonal. ``(None, None)`` for one row or an incomplete matrix."""
    values = matrix_metrics(matrix)
    if values is None or len(matrix) < 2:
        return None, None
    return values["forgetting"], values["bwt"]


def matrix_metrics(matrix: list[list[float | None]]) -> dict[str, float] | None:
    """``avg_acc``, ``forgetting``, ``bwt`` and ``avg_drop`` of R (:mod:`mas_core.metrics`), or
    ``None`` when its lower triangle is incomplete."""
    try:
        return {"avg_acc": metrics.average_accuracy(matrix), "forgetting": metrics.average_forgetting(matrix),
                "bwt": metrics.backward_transfer(matrix), "avg_drop": metrics.average_drop(matrix)}
    except MASCoreError:
        return None


def merged_metrics(entry: dict[str, Any], method: str) -> dict[str, float] | None:
    """The metrics of the model a weight-changing ``after_task`` delivers (IMM's merge), the last
    row of ``accuracy_matrix_merged``, measured against the models as trained in R
    (:func:`mas_core.metrics.with_final_row`); ``None`` for a method without one or an
    incomplete matrix."""
    merged = entry.get("accuracy_matrix_merged")
    if merged is None:
        return None
    if not isinstance(merged, list) or not merged or not all(isinstance(row, list) for row in merged):
        raise TripletsError(f"results for method {method!r} have an accuracy_matrix_merged that is not a list of rows")
    try:
        return metrics.with_final_row(_matrix(entry, method), merged[-1])
    except MASCoreError:
        return None


def final_mean(entry: dict[str, Any], mode: str, key: str) -> float | None:
    """Mean over tasks of ``entry["final"][mode][t][key]`` (None when absent)."""
    final = entry.get("final")
    if not isinstance(final, dict) or not isinstance(final.get(mode), list):
        return None
    return _mean([task.get(key) for task in final[mode] if isinstance(task, dict)])


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: name, avg_acc, forgetting, bwt, final generalized top-5, final MRR (standard,
    ``mrr``; generalized, ``generalized_mrr``), mAP and the diagonal mean of R (``diagonal_mean``,
    plasticity; fractions or None), recomputed from the accuracy matrix (the stored values where it is incomplete), so a
    results.json written before forgetting followed Chaudhry et al. is reported with it. A method
    with ``accuracy_matrix_merged`` also has ``merged``: the delivered model's avg_acc,
    forgetting, bwt (:func:`merged_metrics`)."""
    methods = results.get("methods") if isinstance(results, dict) else None
    if not isinstance(methods, dict) or not methods:
        raise TripletsError("results hold no methods; train a run first (mas-triplets train)")
    rows = []
    for name, entry in methods.items():
        matrix = _matrix(entry, name)
        computed = matrix_metrics(matrix) or {}
        row = {
            "method": name,
            "avg_acc": computed.get("avg_acc", entry.get("avg_acc", _mean(matrix[-1]))),
            "forgetting": computed.get("forgetting", entry.get("forgetting")),
            "bwt": computed.get("bwt", entry.get("bwt")),
            "generalized_top5": final_mean(entry, "generalized", "top5"),
            "mrr": final_mean(entry, "standard", "mrr"),
            "generalized_mrr": final_mean(entry, "generalized", "mrr"),
            "map": final_mean(entry, "standard", "map"),
            "diagonal_mean": diagonal_mean(matrix),
        }
        merged = merged_metrics(entry, name)
        if merged is not None:
            row["merged"] = {key: merged[key] for key in ("avg_acc", "forgetting", "bwt")}
        rows.append(row)
    return rows


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * float(value):.2f}"


def comparison_table(results: dict[str, Any]) -> str:
    """The Markdown comparison table (percentages; forgetting and BWT in points)."""
    lines = ["| method | avg top-5 (%) | forgetting (pts) | BWT (pts) | final generalized top-5 (%) | MRR (%) | "
             "generalized MRR (%) | mAP (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary_rows(results):
        merged = row.get("merged")
        final_metrics = (f"{_percent(row['generalized_top5'])} | {_percent(row['mrr'])} | "
                         f"{_percent(row['generalized_mrr'])} | {_percent(row['map'])}")
        final = "— | — | — | —" if merged else final_metrics
        lines.append(f"| {row['method']} | {_percent(row['avg_acc'])} | {_percent(row['forgetting'])} | "
                     f"{_percent(row['bwt'])} | {final} |")
        if merged:  # the final model is the merged one: the final metrics are its
            lines.append(f"| {row['method']} (merged) | {_percent(merged['avg_acc'])} | "
                         f"{_percent(merged['forgetting'])} | {_percent(merged['bwt'])} | {final_metrics} |")
    return "\n".join(lines)


def matrix_table(matrix: list[list[float | None]]) -> str:
    """A task × task Markdown table of R in percent (row i: after training task i+1)."""
    width = max(len(row) for row in matrix)
    header = "| after task \\ on task | " + " | ".join(str(j + 1) for j in range(width)) + " |"
    lines = [header, "|---|" + "---:|" * width]
    for i, row in enumerate(matrix):
        cells = [_percent(row[j]) if j < len(row) else "—" for j in range(width)]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_table(results: dict[str, Any]) -> str:
    """The hyperparameters the per-task search chose (:mod:`mas_core.hparam_search`): one row per
    method that ran it, one cell per task (``lr 0.05, lam=2.5 (5 rejected)``, :func:`~mas_core.hparam_search.describe_choice`);
    ``""`` when no method did."""
    searched = {name: entry[SEARCH_KEY] for name, entry in results["methods"].items()
                if isinstance(entry.get(SEARCH_KEY), list) and entry[SEARCH_KEY]}
    if not searched:
        return ""
    tasks = _task_names(results)
    lines = ["Hyperparameters chosen per task by the search (validation split of each task's own training "
             "data; results.json's hparam_search holds every try and the reason). In parentheses the bracket of "
             "the method's limit: the weakest strength above the choice that the validation threshold rejected "
             "(\"none rejected up to λ\": every value tried passed, the limit lies higher; \"none accepted\": "
             "the floor was taken; \"backed off\": the real run diverged at the choice):", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, records in searched.items():
        cells = {int(record["task"]): describe_choice(record) for record in records}
        lines.append(f"| {name} | " + " | ".join(cells.get(j, "—") for j in range(len(tasks))) + " |")
    return "\n".join(lines)


def labels_table(results: dict[str, Any]) -> str:
    """What each method's numbers were made with (:meth:`~mas_core.regularizers.base.Regularizer.describe`,
    recorded per task in ``results.json``'s ``labels``): the importance estimator, the samples it read
    per task, the accumulation rule, λ per task and the penalty step; ``""`` when no method has labels
    (results written before they were recorded)."""
    labelled = {name: entry["labels"] for name, entry in results["methods"].items()
                if isinstance(entry.get("labels"), list) and entry["labels"]}
    if not labelled:
        return ""
    lines = ["What each method ran with (per task, `/`-separated; results.json's labels): the importance "
             "estimator and the samples its estimate read, the accumulation rule over tasks, the strength and "
             "the penalty step (proximal: the closed-form step after the optimizer; gradient: the papers' form "
             "in the loss):", "",
             "| method | importance | samples per task | accumulation | strength per task | penalty step |",
             "|---|---|---|---|---|---|"]
    for name, labels in labelled.items():
        last = labels[-1]
        importance = last.get("importance") or {}
        estimators = sorted({str((label.get("importance") or {}).get("estimator")) for label in labels})
        samples = "/".join("–" if (label.get("importance") or {}).get("samples") is None
                           else str(label["importance"]["samples"]) for label in labels)
        strengths = "/".join(", ".join(f"{value:g}" for value in (label.get("strength") or {}).values()) or "–"
                             for label in labels)
        lines.append(f"| {name} | {', '.join(estimators) if importance else '–'} | {samples if importance else '–'} | "
                     f"{importance.get('accumulation', '–')} | {strengths} | {last.get('penalty_step') or '–'} |")
    return "\n".join(lines)


def ridge_table(results: dict[str, Any]) -> str:
    """The strength ``λ`` the ridge baseline chose per task (:mod:`mas_core.ridge`; its records
    under ``ridge``), one row per ridge method; ``""`` when there is none."""
    chosen = {name: entry["ridge"] for name, entry in results["methods"].items()
              if isinstance(entry.get("ridge"), list) and entry["ridge"]}
    if not chosen:
        return ""
    tasks = _task_names(results)
    lines = ["Ridge strength λ chosen per task (α = λ·tr(C)/d; the lowest mean squared error on a validation part "
             "of the task's own training samples; results.json's ridge holds every try):", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, records in chosen.items():
        cells = {int(record["task"]): f"{float(record['strength']):g}" for record in records}
        lines.append(f"| {name} | " + " | ".join(cells.get(j, "—") for j in range(len(tasks))) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """The whole results.md text."""
    parts = ["# Results", "",
             "Image → fact top-5 accuracy with Sherlock's order-aware ground truth; standard mode ranks the "
             "task's own facts, generalized mode the facts of all tasks. avg top-5: mean over tasks after the "
             "last task (standard). forgetting (Chaudhry et al. 2018): mean over the tasks before the last of "
             "the best top-5 a task had before the last task minus its final top-5; BWT: mean of final minus "
             "just-after top-5 (Lopez-Paz & Ranzato 2017). A \"(merged)\" row: the model IMM delivers (its merge), "
             "whose final metrics those are; the row above it is the models as trained. mAP: fact → image mean "
             "average precision, averaged over tasks.", "",
             comparison_table(results), "", retrieval_tables(results, summary_rows(results)), ""]
    for table in (stale_index_tables(results), search_table(results), labels_table(results), ridge_table(results)):
        if table:
            parts += [table, ""]
    for name, entry in results["methods"].items():
        parts += [f"## {name}: accuracy matrix R (standard top-5, %)", "", matrix_table(_matrix(entry, name)), ""]
        if entry.get("accuracy_matrix_merged") is not None:
            parts += [f"## {name}: the merged model after each task (standard top-5, %)", "",
                      matrix_table(_matrix({"accuracy_matrix": entry["accuracy_matrix_merged"]}, name)), ""]
    return "\n".join(parts + diverged_lines(results))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "method"


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas (matplotlib is imported here, on first use,
    so importing this module sets no backend and stays light)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy, first use only
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def heatmap_png(matrix: list[list[float | None]], title: str) -> bytes:
    """PNG bytes of R as an annotated heatmap (percent), blank where R is undefined."""
    width = max(len(row) for row in matrix)
    values = np.full((len(matrix), width), np.nan)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                values[i, j] = 100.0 * value
    figure = _new_figure(1.1 * width + 2.2, 1.0 * len(matrix) + 1.6)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=100.0, cmap="viridis")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                axes.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center",
                          color="white" if values[i, j] < 60 else "black", fontsize=9)
    axes.set_xticks(range(width), [str(j + 1) for j in range(width)])
    axes.set_yticks(range(len(matrix)), [str(i + 1) for i in range(len(matrix))])
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after training task")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="top-5 accuracy (%)")
    return _png_bytes(figure)


def grouped_bars_png(groups: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str, title: str,
                     ylim: tuple[float, float] | None = None) -> bytes:
    """PNG bytes of grouped bars: one group per entry of ``groups``, one bar per series (its
    values in the units shown), the legend beside the bars, a line at 0."""
    names = list(series)
    figure = _new_figure(max(5.0, 1.3 * len(groups) + 2.0), 4.0)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    positions = np.arange(len(groups))
    for offset, name in enumerate(names):
        axes.bar(positions - 0.4 + width * (offset + 0.5), list(series[name]), width, label=name)
    axes.set_xticks(positions, list(groups), rotation=20 if max(map(len, groups), default=0) > 8 else 0)
    axes.set_ylabel(ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_title(title)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)  # beside, not over, the bars
    axes.grid(axis="y", alpha=0.3)
    return _png_bytes(figure)


def per_task_bars_png(results: dict[str, Any]) -> bytes:
    """PNG bytes of grouped bars: per task, one bar per method, the top-5 after the last task."""
    names = list(results["methods"])
    last_rows = {name: _matrix(results["methods"][name], name)[-1] for name in names}
    num_tasks = max(len(row) for row in last_rows.values())
    series = {name: [100.0 * row[j] if j < len(row) and row[j] is not None else 0.0 for j in range(num_tasks)]
              for name, row in last_rows.items()}
    return grouped_bars_png([f"task {j + 1}" for j in range(num_tasks)], series,
                            ylabel="top-5 accuracy after the last task (%)", ylim=(0.0, 100.0),
                            title="Per-task top-5 accuracy at the end of the sequence")


def write_report(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write results.md and plots/accuracy_matrix_<method>.png, plots/per_task_top5.png under ``out_dir``.

    Everything is rendered first and then written atomically, so a failure writes nothing.
    """
    out_dir = Path(out_dir)
    markdown = render_markdown(results)
    files: dict[Path, bytes] = {}
    for name, entry in results["methods"].items():
        files[out_dir / "plots" / f"accuracy_matrix_{_safe_name(name)}.png"] = heatmap_png(
            _matrix(entry, name), f"{name}: top-5 accuracy (%)")
    files[out_dir / "plots" / "per_task_top5.png"] = per_task_bars_png(results)
    atomic_write_text(out_dir / "results.md", markdown + "\n")
    for path, data in files.items():
        atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------- the recognition sequence

def _task_names(results: dict[str, Any]) -> list[str]:
    return [str(task["name"]) if isinstance(task, dict) else str(task) for task in results["tasks"]]


def recognition_markdown(results: dict[str, Any]) -> str:
    """Markdown tables of a recognition results document (accuracies and drops in percent), the
    metrics recomputed from each accuracy matrix (:func:`matrix_metrics`); a method with
    ``accuracy_matrix_merged`` (IMM) gets a "(merged)" row for the model it delivers; the methods
    under ``diverged`` are listed with their errors after the tables."""
    tasks = _task_names(results)
    methods = results["methods"]
    lines = [f"# {results['name']}: {' → '.join(tasks)}", ""]
    finals = []  # (row name, entry, R, final row)
    for name, entry in methods.items():
        R = _matrix(entry, name)
        finals.append((name, entry, R, R[-1]))
        if entry.get("accuracy_matrix_merged") is not None:
            merged = _matrix({"accuracy_matrix": entry["accuracy_matrix_merged"]}, name)
            finals.append((f"{name} (merged)", entry, R, merged[-1]))
    if len(tasks) == 2:
        lines += [f"| method | {tasks[0]} (drop) | {tasks[1]} |", "|---|---|---|"]
        for name, _, R, last in finals:
            lines.append(f"| {name} | {_percent(last[0])} ({100.0 * (last[0] - R[0][0]):+.2f}) | {_percent(last[1])} |")
        lines += ["", "First-task accuracy after learning the second task, with its drop from the accuracy right "
                  "after learning it (Table 2 layout); second-task accuracy. Percent."]
    else:
        lines += ["| method | avg acc | avg drop | avg forgetting | BWT | wall time (s) |", "|---|---|---|---|---|---|"]
        for name, entry, R, last in finals:
            values = matrix_metrics(R) if last is R[-1] else merged_metrics(entry, name)
            if values is None:
                values = {key: entry[key] for key in ("avg_acc", "avg_drop", "forgetting", "bwt")}
            lines.append(f"| {name} | {_percent(values['avg_acc'])} | {100.0 * values['avg_drop']:+.2f} | "
                         f"{_percent(values['forgetting'])} | {100.0 * values['bwt']:+.2f} | "
                         f"{entry['wall_time_s']:.1f} |")
        lines += ["", "avg acc: mean final test accuracy over tasks; avg drop: mean over tasks of final minus "
                  "just-after accuracy (the MAS paper's; negative = forgetting); avg forgetting: mean over the tasks "
                  "before the last of the best accuracy a task had before the last task minus its final accuracy "
                  "(Chaudhry et al. 2018); BWT: mean over the same tasks of final minus just-after accuracy "
                  "(Lopez-Paz & Ranzato 2017). \"(merged)\": the model IMM delivers (its merge after the last task), "
                  "measured against the models as trained. Percent."]
    lines += ["", "Final accuracy per task (drop from just after learning it):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, _, R, last in finals:
        cells = [f"{_percent(last[j])} ({100.0 * (last[j] - R[j][j]):+.1f})" for j in range(len(tasks))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for table in (search_table(results), labels_table(results), ridge_table(results)):
        if table:
            lines += ["", table]
    return "\n".join(lines + diverged_lines(results)) + "\n"


def diverged_lines(results: dict[str, Any]) -> list[str]:
    """The methods under ``diverged`` with their errors (:mod:`triplets.runner`), as Markdown lines
    (none when no method diverged)."""
    diverged = results.get("diverged") or {}
    if not diverged:
        return []
    return ["", "Diverged (not in the tables; `--resume` trains them again):", "",
            *[f"- {name}: {message}" for name, message in diverged.items()]]


def write_recognition_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """``folder/accuracy.png`` and ``folder/drop.png``: per task, one bar per method, the final
    accuracy and its drop from just after learning the task (PNGs written atomically)."""
    tasks = _task_names(results)
    matrices = {name: _matrix(entry, name) for name, entry in results["methods"].items()}
    written = []
    for kind, ylabel in (("accuracy", "final test accuracy (%)"), ("drop", "drop: final − just after (points)")):
        series = {name: [100.0 * (R[-1][j] if kind == "accuracy" else R[-1][j] - R[j][j]) for j in range(len(tasks))]
                  for name, R in matrices.items()}
        data = grouped_bars_png(tasks, series, ylabel=ylabel, title=f"{results['name']}: per-task {kind}")
        path = Path(folder) / f"{kind}.png"
        atomic_write_bytes(path, data)
        written.append(path)
    return written
