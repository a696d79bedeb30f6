"""The run report: a Markdown comparison table and PNG plots from ``results.json``.

``write_report(results, out_dir)`` writes

- ``out_dir/results.md``: one row per method with average top-5 (mean of the last row of
  the accuracy matrix R, standard mode), forgetting (mean over j < T−1 of R[j][j] − R[T−1][j]),
  BWT (mean over j < T−1 of R[T−1][j] − R[j][j]), final generalized top-5 and final mAP
  (means over tasks of the ``final`` entries), then each method's task × task matrix;
- ``out_dir/plots/accuracy_matrix_<method>.png``: R as a heatmap (rows: after training task i,
  columns: evaluated on task j; blank above the diagonal);
- ``out_dir/plots/per_task_top5.png``: grouped bars, one group per task and one bar per method,
  the standard top-5 on each task after the last task (the last row of R), as in the
  lifelong-fact-learning paper's figure.

Accuracies in ``results.json`` are fractions; the report shows percentages (points for
forgetting and BWT). Every file is written atomically. Plots use matplotlib's Agg canvas
directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so no global backend is set
and nothing happens at import time.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

from .errors import TripletsError


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
    """(forgetting, BWT) of an accuracy matrix with T rows: F = mean_{j<T−1} R[j][j] − R[T−1][j], BWT = −F."""
    last = len(matrix) - 1
    drops = [matrix[j][j] - matrix[last][j] for j in range(last)
             if matrix[j][j] is not None and matrix[last][j] is not None]
    if not drops:
        return None, None
    forgetting = sum(drops) / len(drops)
    return forgetting, -forgetting


def final_mean(entry: dict[str, Any], mode: str, key: str) -> float | None:
    """Mean over tasks of ``entry["final"][mode][t][key]`` (None when absent)."""
    final = entry.get("final")
    if not isinstance(final, dict) or not isinstance(final.get(mode), list):
        return None
    return _mean([task.get(key) for task in final[mode] if isinstance(task, dict)])


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: name, avg_top5, forgetting, bwt, final generalized top-5 and mAP (fractions or None)."""
    methods = results.get("methods") if isinstance(results, dict) else None
    if not isinstance(methods, dict) or not methods:
        raise TripletsError("results hold no methods; train a run first (mas-triplets train)")
    rows = []
    for name, entry in methods.items():
        matrix = _matrix(entry, name)
        forgetting, bwt = forgetting_and_bwt(matrix)
        rows.append({
            "method": name,
            "avg_top5": entry.get("avg_top5", _mean(matrix[-1])),
            "forgetting": entry.get("forgetting", forgetting),
            "bwt": entry.get("bwt", bwt),
            "generalized_top5": final_mean(entry, "generalized", "top5"),
            "map": final_mean(entry, "standard", "map"),
        })
    return rows


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * float(value):.2f}"


def comparison_table(results: dict[str, Any]) -> str:
    """The Markdown comparison table (percentages; forgetting and BWT in points)."""
    lines = ["| method | avg top-5 (%) | forgetting (pts) | BWT (pts) | final generalized top-5 (%) | mAP (%) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in summary_rows(results):
        lines.append(f"| {row['method']} | {_percent(row['avg_top5'])} | {_percent(row['forgetting'])} | "
                     f"{_percent(row['bwt'])} | {_percent(row['generalized_top5'])} | {_percent(row['map'])} |")
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


def render_markdown(results: dict[str, Any]) -> str:
    """The whole results.md text."""
    parts = ["# Results", "",
             "Image → fact top-5 accuracy with Sherlock's order-aware ground truth; standard mode ranks the "
             "task's own facts, generalized mode the facts of all tasks. avg top-5: mean over tasks after the "
             "last task (standard). forgetting: mean drop from just after learning a task to the end; "
             "BWT = −forgetting. mAP: fact → image mean average precision, averaged over tasks.", "",
             comparison_table(results), ""]
    for name, entry in results["methods"].items():
        parts += [f"## {name}: accuracy matrix R (standard top-5, %)", "", matrix_table(_matrix(entry, name)), ""]
    return "\n".join(parts)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "method"


def _png_bytes(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def heatmap_png(matrix: list[list[float | None]], title: str) -> bytes:
    """PNG bytes of R as an annotated heatmap (percent), blank where R is undefined."""
    import numpy as np  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    width = max(len(row) for row in matrix)
    values = np.full((len(matrix), width), np.nan)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                values[i, j] = 100.0 * value
    figure = Figure(figsize=(1.1 * width + 2.2, 1.0 * len(matrix) + 1.6))
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


def per_task_bars_png(results: dict[str, Any]) -> bytes:
    """PNG bytes of grouped bars: per task, one bar per method, the top-5 after the last task."""
    import numpy as np  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    names = list(results["methods"])
    last_rows = {name: _matrix(results["methods"][name], name)[-1] for name in names}
    num_tasks = max(len(row) for row in last_rows.values())
    figure = Figure(figsize=(max(5.0, 1.3 * num_tasks + 2.0), 4.0))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    positions = np.arange(num_tasks)
    for offset, name in enumerate(names):
        row = last_rows[name]
        heights = [100.0 * row[j] if j < len(row) and row[j] is not None else 0.0 for j in range(num_tasks)]
        axes.bar(positions - 0.4 + width * (offset + 0.5), heights, width, label=name)
    axes.set_xticks(positions, [f"task {j + 1}" for j in range(num_tasks)])
    axes.set_ylabel("top-5 accuracy after the last task (%)")
    axes.set_ylim(0.0, 100.0)
    axes.set_title("Per-task top-5 accuracy at the end of the sequence")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)  # beside, not over, the bars
    axes.grid(axis="y", alpha=0.3)
    return _png_bytes(figure)


def write_report(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write results.md and plots/accuracy_matrix_<method>.png, plots/per_task_top5.png under ``out_dir``.

    Everything is rendered first and then written atomically, so a failure writes nothing.
    """
    from mas_core.checkpoint import atomic_write_bytes, atomic_write_text  # noqa: PLC0415

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
