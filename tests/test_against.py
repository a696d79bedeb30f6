"""benchmarks/against.py on a tiny fake benchmark in a temporary git repository (issue 27): the base
revision's code is what the base runs import, the figures are parsed and compared, the worktree goes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

AGAINST = Path(__file__).resolve().parents[1] / "benchmarks" / "against.py"

BENCHMARK = '''import json
from fakepkg.speed import VALUE
print("warming up")
print("mlp: " + json.dumps({"exact_s": VALUE, "label": "text", "ok": True}))
print("rate: " + str(4 * VALUE))
print(json.dumps({"benchmark": "fake", "speed": VALUE, "nested": {"constant": 7}}))
'''


def _git(repo: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *arguments], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "fakepkg").mkdir(parents=True)
    (root / "benchmarks").mkdir()
    (root / "fakepkg" / "__init__.py").write_text("")
    (root / "fakepkg" / "speed.py").write_text("VALUE = 2.0\n")
    (root / "benchmarks" / "bench_fake.py").write_text(BENCHMARK)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "base")
    (root / "fakepkg" / "speed.py").write_text("VALUE = 3.0\n")  # the working tree's change, not committed
    return root


def _against(repo: Path, *arguments: str) -> tuple[str, dict]:
    options = [argument for argument in arguments if argument.startswith("--") or argument == "current"]
    rest = [argument for argument in arguments if argument not in options]
    result = subprocess.run([sys.executable, str(AGAINST), "--rounds", "2", *options, "HEAD", *rest], cwd=repo,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


def test_figures_of_base_and_working_tree_with_their_ratio(repo: Path) -> None:
    output, report = _against(repo, "benchmarks/bench_fake.py")
    figures = report["figures"]
    assert set(figures) == {"mlp.exact_s", "rate", "speed", "nested.constant"}  # no booleans, no strings
    assert figures["speed"]["base"] == 2.0 and figures["speed"]["current"] == 3.0
    assert figures["speed"]["ratio"] == pytest.approx(1.5)
    assert figures["rate"]["base_rounds"] == [8.0, 8.0] and figures["rate"]["current_rounds"] == [12.0, 12.0]
    assert figures["mlp.exact_s"]["ratio"] == pytest.approx(1.5)
    assert figures["nested.constant"]["ratio"] == 1.0
    assert report["base_script"] == "base revision's" and report["rounds"] == 2
    assert "of each tree" in output and "speed" in output and "1.500" in output
    assert _git(repo, "worktree", "list").count("\n") == 1  # the temporary worktree is gone
    assert (repo / "fakepkg" / "speed.py").read_text() == "VALUE = 3.0\n"  # the working tree untouched


def test_a_benchmark_absent_at_the_base_runs_from_the_working_tree(repo: Path) -> None:
    (repo / "benchmarks" / "bench_new.py").write_text(BENCHMARK.replace('"speed"', '"new_speed"'))
    output, report = _against(repo, "benchmarks/bench_new.py")
    assert report["base_script"] == "working tree's" and "absent at HEAD" in output
    assert report["figures"]["new_speed"]["base"] == 2.0 and report["figures"]["new_speed"]["current"] == 3.0
    assert _git(repo, "worktree", "list").count("\n") == 1


def test_script_current_runs_the_working_tree_script_on_the_base_code(repo: Path) -> None:
    (repo / "benchmarks" / "bench_fake.py").write_text(BENCHMARK.replace('"speed"', '"renamed"'))
    output, report = _against(repo, "--script", "current", "benchmarks/bench_fake.py")
    assert report["base_script"] == "working tree's" and "--script current" in output
    assert report["figures"]["renamed"]["base"] == 2.0 and report["figures"]["renamed"]["current"] == 3.0


def test_a_failing_benchmark_is_status_2_and_the_worktree_still_goes(repo: Path) -> None:
    (repo / "benchmarks" / "bench_fake.py").write_text("raise SystemExit('broken')\n")
    result = subprocess.run([sys.executable, str(AGAINST), "--rounds", "1", "HEAD", "benchmarks/bench_fake.py"],
                            cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "failed with status 1" in result.stderr
    assert _git(repo, "worktree", "list").count("\n") == 1
