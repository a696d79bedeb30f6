"""The run report: Markdown numbers, valid PNG plots, atomic writes."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from triplets.errors import TripletsError
from triplets.report import (
    comparison_table,
    forgetting_and_bwt,
    matrix_table,
    recognition_markdown,
    summary_rows,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results():
    finetune = [[0.80, None, None], [0.60, 0.70, None], [0.50, 0.55, 0.75]]
    mas = [[0.80, None, None], [0.75, 0.70, None], [0.70, 0.66, 0.72]]

    def final(top5, gen_top5, map_value):
        # MRR: the standard mode's top-5 less 0.1, the generalized mode's less 0.2 (numbers to check)
        return {"standard": [{"top5": v, "mrr": v - 0.1, "map": map_value} for v in top5],
                "generalized": [{"top5": v, "mrr": v - 0.2, "map": map_value} for v in gen_top5]}

    return {"methods": {
        "finetune": {"accuracy_matrix": finetune, "avg_acc": float(np.mean(finetune[-1])), "forgetting": 0.225,
                     "bwt": -0.225, "final": final([0.5, 0.55, 0.75], [0.3, 0.35, 0.5], 0.25)},
        "mas": {"accuracy_matrix": mas, "avg_acc": float(np.mean(mas[-1])), "forgetting": 0.07, "bwt": -0.07,
                "final": final([0.7, 0.66, 0.72], [0.5, 0.45, 0.55], 0.4)},
    }, "tasks": [{"index": t} for t in range(3)]}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_forgetting_and_bwt_definitions():
    forgetting, bwt = forgetting_and_bwt([[0.8, None, None], [0.6, 0.7, None], [0.5, 0.55, 0.75]])
    assert forgetting == pytest.approx(((0.8 - 0.5) + (0.7 - 0.55)) / 2)
    assert bwt == pytest.approx(-forgetting)
    assert forgetting_and_bwt([[0.9]]) == (None, None)
    # a column that rises after it is learned: Chaudhry's forgetting and −BWT differ in sign
    forgetting, bwt = forgetting_and_bwt([[0.5, None, None], [0.9, 0.8, None], [0.6, 0.75, 0.9]])
    assert forgetting == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)  # 0.175
    assert bwt == pytest.approx(((0.6 - 0.5) + (0.75 - 0.8)) / 2)  # +0.025


def _with_imm(results: dict) -> dict:
    """``_results()`` plus an IMM entry whose merged model differs from the trained ones, and a
    stale stored forgetting (R[j][j] − R[T−1][j], the definition before Chaudhry's)."""
    trained = [[0.90, None, None], [0.95, 0.80, None], [0.60, 0.70, 0.85]]
    merged = [[0.90, None, None], [0.85, 0.75, None], [0.70, 0.72, 0.60]]
    results["methods"]["imm"] = {"accuracy_matrix": trained, "accuracy_matrix_merged": merged, "avg_acc": 0.7167,
                                 "forgetting": 0.2, "bwt": -0.2, "avg_drop": -0.1333, "wall_time_s": 2.0,
                                 "final": {"standard": [{"top5": 0.7, "mrr": 0.5, "map": 0.3}] * 3,
                                           "generalized": [{"top5": 0.4, "mrr": 0.25, "map": 0.3}] * 3}}
    return results


def test_reports_recompute_chaudhry_forgetting_and_show_the_merged_model_apart():
    results = _with_imm(_results())
    rows = {row["method"]: row for row in summary_rows(results)}
    # trained models: forgetting ((0.95 - 0.60) + (0.80 - 0.70)) / 2 = 0.225, not the stored 0.2
    assert rows["imm"]["forgetting"] == pytest.approx(0.225)
    assert rows["imm"]["bwt"] == pytest.approx(((0.60 - 0.90) + (0.70 - 0.80)) / 2)
    # the delivered (merged) model: last row 0.70 0.72 0.60 against the trained models' rows
    assert rows["imm"]["merged"]["avg_acc"] == pytest.approx((0.70 + 0.72 + 0.60) / 3)
    assert rows["imm"]["merged"]["forgetting"] == pytest.approx(((0.95 - 0.70) + (0.80 - 0.72)) / 2)
    table = comparison_table(results)
    assert "| imm | 71.67 | 22.50 | -20.00 | — | — | — | — |" in table
    assert "| imm (merged) | 67.33 | 16.50 | -14.00 | 40.00 | 50.00 | 25.00 | 30.00 |" in table
    results["name"] = "demo"
    results["tasks"] = [{"name": name} for name in ("a", "b", "c")]
    for entry in results["methods"].values():
        entry.setdefault("wall_time_s", 1.0)
    markdown = recognition_markdown(results)
    # drop of the merged model, the last task included: mean of (0.70 − 0.90, 0.72 − 0.80, 0.60 − 0.85)
    assert "| imm | 71.67 | -13.33 | 22.50 | -20.00 | 2.0 |" in markdown
    assert "| imm (merged) | 67.33 | -17.67 | 16.50 | -14.00 | 2.0 |" in markdown
    assert "| imm (merged) | 70.00 (-20.0) | 72.00 (-8.0) | 60.00 (-25.0) |" in markdown


def test_table_numbers():
    rows = {row["method"]: row for row in summary_rows(_results())}
    assert rows["mas"]["generalized_top5"] == pytest.approx(0.5)
    assert rows["finetune"]["map"] == pytest.approx(0.25)
    assert rows["mas"]["mrr"] == pytest.approx((0.6 + 0.56 + 0.62) / 3)
    assert rows["mas"]["generalized_mrr"] == pytest.approx(0.3)
    table = comparison_table(_results())
    assert "| finetune | 60.00 | 22.50 | -22.50 | 38.33 | 50.00 | 18.33 | 25.00 |" in table
    assert "| mas | 69.33 | 7.00 | -7.00 | 50.00 | 59.33 | 30.00 | 40.00 |" in table
    matrix = matrix_table([[0.8, None], [0.6, 0.7]])
    assert "| 1 | 80.00 | — |" in matrix and "| 2 | 60.00 | 70.00 |" in matrix


def test_write_report_files(tmp_path):
    write_report(_results(), tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "| mas | 69.33 | 7.00 | -7.00 | 50.00 | 59.33 | 30.00 | 40.00 |" in markdown
    assert "## finetune: accuracy matrix" in markdown and "| 3 | 50.00 | 55.00 | 75.00 |" in markdown
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["accuracy_matrix_finetune.png", "accuracy_matrix_mas.png", "per_task_top5.png"]
    for name in names:
        width, height = _png_size((tmp_path / "plots" / name).read_bytes())
        assert width > 200 and height > 200
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary files left behind


def test_bad_results_write_nothing(tmp_path):
    with pytest.raises(TripletsError, match="no methods"):
        write_report({"methods": {}}, tmp_path)
    with pytest.raises(TripletsError, match="accuracy_matrix"):
        write_report({"methods": {"mas": {"avg_acc": 0.5}}}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_matplotlib_backend_untouched_at_import():
    import subprocess
    import sys

    code = ("import sys, triplets.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported at import'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_ridge_row_needs_no_optimizer_fields_and_its_strengths_are_tabled():
    """The ridge baseline's entry has no lr, strength or hparam_search: both reports give it its
    row and a table of the λ it chose per task."""
    from triplets.report import render_markdown

    ridge = [[0.9, None, None], [0.85, 0.8, None], [0.84, 0.78, 0.7]]
    records = [{"task": t, "name": f"t{t + 1}", "strength": s, "tries": [], "alpha": [1.0]}
               for t, s in enumerate((0.01, 0.1, 1e-4))]
    results = _results()
    results["tasks"] = [{"index": t, "name": f"t{t + 1}"} for t in range(3)]
    results["methods"]["ridge"] = {"method": "ridge", "options": {}, "accuracy_matrix": ridge, "avg_acc": 0.44,
                                   "forgetting": 0.0, "bwt": 0.0, "avg_drop": 0.0, "wall_time_s": 3.0,
                                   "ridge": records, "final": _results()["methods"]["mas"]["final"]}
    facts = render_markdown(results)
    assert "| ridge | 77.33 | 4.00 | -4.00 |" in facts
    assert "| ridge | 0.01 | 0.1 | 0.0001 |" in facts
    for entry in results["methods"].values():
        entry.setdefault("avg_drop", 0.0)
        entry.setdefault("wall_time_s", 1.0)
    results["name"] = "recognition"
    recognition = recognition_markdown(results)
    assert "| ridge | 77.33 |" in recognition and "| ridge | 0.01 | 0.1 | 0.0001 |" in recognition
