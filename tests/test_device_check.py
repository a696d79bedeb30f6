"""benchmarks/device_check.py: its CPU dry run runs every part, so the GPU check cannot rot between uses.

The dry run is a real launch (``python benchmarks/device_check.py --dry-run`` in a temporary
folder): every part must end ``ok``; a sub-part may be skipped only where it cannot run on a
CPU (FAISS on a GPU without faiss-gpu, a backbone triplets.facts.model does not have yet). The
comparisons must really compare: every error is a finite number at most its tolerance (on the
CPU the "device" is the CPU, so the training and Ω comparisons come out 0; two processes
against one differ by float32 rounding only).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
PARTS = ("environment", "training", "equality", "importance", "retrieval", "distributed", "throughput")


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _allowed_skip(part: str, name: str) -> bool:
    """The sub-parts that truly cannot run on a CPU-only machine."""
    from triplets.facts.model import BACKBONES

    if part == "retrieval" and name == "faiss_gpu":
        return True
    return "efficientnet_lite0" in name and "efficientnet_lite0" not in BACKBONES


def _numbers(value, path=""):
    """Every number of a JSON document with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("device-check")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", "report.json"], cwd=folder,
                          env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((folder / "report.json").read_text()), done.stdout


def test_every_part_of_the_dry_run_is_ok_and_only_gpu_only_pieces_are_skipped(dry_run):
    report, printed = dry_run
    assert report["format"] == "mas-triplets-device-check" and report["dry_run"] is True
    assert list(report["parts"]) == list(PARTS)
    assert report["failed_parts"] == []
    for part, record in report["parts"].items():
        assert record["status"] == "ok", (part, record["summary"])
        assert 0 <= record["wall_s"] <= record["budget_s"]
        assert part in printed
        for name, sub in record["subparts"].items():
            if sub["status"] == "skipped":
                assert _allowed_skip(part, name), (part, name, sub["reason"])
                assert sub["reason"] and "\n" not in sub["reason"]
            else:
                assert sub["status"] == "ok", (part, name, sub["reason"])



def test_the_gpu_budgets_fit_in_8_minutes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.device_check import TOTAL_BUDGET_S
    from benchmarks.device_check_common import GPU

    assert sum(GPU.budgets.values()) <= TOTAL_BUDGET_S <= 8 * 60


def test_every_figure_is_a_finite_number(dry_run):
    report, _ = dry_run
    numbers = list(_numbers(report))
    assert len(numbers) > 100
    assert all(math.isfinite(value) for _, value in numbers), [item for item in numbers if not math.isfinite(item[1])]
    training = report["parts"]["training"]["subparts"]
    for name in ("small_cnn/fp32", "small_cnn/bf16", "resnet18_frozen/fp32", "resnet18_cached/bf16"):
        run = training[name]
        assert run["losses_finite"] is True and math.isfinite(run["loss_last"]) and run["steps"] >= 2
        assert run["train_samples_per_s"] > 0 and run["step_samples_per_s"] > 0
        assert run["omega_parameters"] > 0 and run["omega_mean"] > 0
    assert training["train_run/small_cnn_fp32"]["index_files"] == ["facts.faiss", "images.faiss"]
    speeds = report["throughput"]
    assert set(speeds["training_step_samples_per_s"]) == {"small_cnn/fp32", "small_cnn/bf16", "resnet18/fp32",
                                                          "resnet18/bf16"}
    assert all(value > 0 for group in ("training_step_samples_per_s", "omega_exact_samples_per_s",
                                       "omega_batch_mode_samples_per_s", "retrieval_queries_per_s")
               for value in speeds[group].values())
    environment = report["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"


def test_the_comparisons_compare_numbers_within_their_tolerances(dry_run):
    report, _ = dry_run
    parts = report["parts"]
    tolerance = report["float32_rtol"]
    assert tolerance == 1e-4
    equal = parts["equality"]["subparts"]["small_cnn"]
    assert equal["steps"] >= 2 and equal["devices"] == ["cpu", "cpu"]
    for key in ("loss_rel_error", "weights_rel_error", "omega_rel_error"):
        assert isinstance(equal[key], float) and 0.0 <= equal[key] <= equal[f"{key}_tolerance"] == tolerance
    for name in ("small_cnn", "resnet18_frozen"):
        importance = parts["importance"]["subparts"][name]
        assert 0.0 <= importance["omega_rel_error"] <= tolerance
        assert importance["exact_samples_per_s"] > 0 and importance["batch_mode_samples_per_s"] > 0
    retrieval = parts["retrieval"]["subparts"]
    assert retrieval["cpu_reference"]["backend"] == "faiss-rescored"
    assert retrieval["torch_device"]["ids_equal_fraction"] == 1.0
    assert retrieval["torch_device"]["queries_per_s"] > 0 and retrieval["cpu_reference"]["queries_per_s"] > 0
    distributed = parts["distributed"]["subparts"]
    one, two = distributed["world1_gloo"], distributed["world2_gloo"]
    assert one["world_size"] == 1 and 0.0 <= one["ddp_step_weights_rel_error"] <= tolerance
    assert one["all_reduce_rel_error"] == 0.0 and one["all_reduce_values"] > 0
    assert 0.0 <= two["weights_rel_error"] <= 1e-5 and 0.0 <= two["omega_rel_error"] <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_without_a_gpu_and_without_dry_run_it_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", "report.json"], cwd=tmp_path, env=_environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "report.json").exists()
