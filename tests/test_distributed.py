"""mas_core on several processes: ``torchrun``, 2 processes, the gloo backend, on this CPU.

The worker (``tests/distributed_worker.py``) builds the same data and models as these
tests build in-process; the tests compare the 2-process results with 1-process ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from mas_core import distributed, run_sequence

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max() / b[name].abs().max().clamp_min(1e-30)) for name in b)


@pytest.fixture(scope="module")
def two_process_importance(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("importance") / "importance.pt"
    torchrun("--mode", "importance", "--out", str(out))
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process_importance() -> dict:
    torch.set_num_threads(1)
    inputs = worker.make_inputs()
    return worker.estimates(lambda name: worker.batches_of(inputs[name], list(range(worker.NUM_SAMPLES))))


@pytest.mark.parametrize("key", ["mlp/mas", "cnn/mas", "mlp/fisher", "cnn/fisher", "mlp/hebbian", "cnn/hebbian",
                                 "mlp/mas_first20", "cnn/mas_first20"])
def test_importance_over_two_processes_equals_one_process(two_process_importance, one_process_importance, key):
    # 37 samples over 2 ranks: 19 + 18, nothing padded, so nothing is counted twice
    assert int(two_process_importance["shard_sizes"]["rank"]) == 19
    assert relative_error(two_process_importance[key], one_process_importance[key]) <= 1e-5


def test_gradient_averaged_by_ddp_underestimates_mas(two_process_importance, one_process_importance):
    """The trap: |g| taken after DDP's all-reduce is |mean of the ranks' gradients|, not mean |g_k|."""
    naive = sum(float(value.sum()) for value in two_process_importance["mlp/naive_ddp"].values())
    exact = sum(float(value.sum()) for value in one_process_importance["mlp/mas"].values())
    assert naive < 0.8 * exact


def test_rank_share_splits_global_batches_without_padding():
    info = distributed.ProcessInfo(rank=1, world_size=3, local_rank=1, backend="gloo")
    share, weight = distributed.rank_share(torch.arange(10, 17), info)
    assert share.tolist() == [11, 14] and weight == pytest.approx(3 / 7)
    share, weight = distributed.rank_share(torch.tensor([5]), info)  # fewer samples than ranks
    assert share.tolist() == [5] and weight == 0.0
    shards = [distributed.shard_positions(10, distributed.ProcessInfo(r, 3, r, "gloo")) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    single, weight = distributed.rank_share(torch.arange(4))
    assert single.tolist() == [0, 1, 2, 3] and weight == 0.25


def test_backend_is_chosen_by_device():
    assert distributed.choose_backend("cpu") == "gloo"
    assert distributed.init_from_environment("cpu") is None  # no torchrun environment: a plain process


METHODS = ["mas", "ewc", "si", "joint"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> tuple[dict, Path]:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("one")
    results = {method: run_sequence(worker.make_model, worker.make_tasks(), method, worker.SETTINGS, seed=worker.SEED,
                                    method_options=worker.METHOD_OPTIONS[method], checkpoint_dir=folder / method,
                                    progress=False).accuracy
               for method in METHODS}
    return results, folder


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def test_two_process_sequence_equals_one_process(one_process_runs, tmp_path):
    """2-task runs of MAS, EWC, SI and joint on 2 processes: the same accuracy matrix, and final
    weights within 1e-5 relative (measured: ≤ 2e-7; only the order of floating-point sums differs)."""
    expected, one_folder = one_process_runs
    out = tmp_path / "two.pt"
    torchrun("--mode", "sequence", "--methods", ",".join(METHODS), "--out", str(out),
             "--checkpoint-dir", str(tmp_path / "two"))
    got = torch.load(out, weights_only=True)
    for method in METHODS:
        assert got[method] == expected[method], method
        assert relative_error(final_weights(tmp_path / "two" / method), final_weights(one_folder / method)) <= 1e-5
    # MAS keeps the first task better than the unregularised runs would be expected to: a sanity number
    assert expected["mas"][1][0] >= expected["si"][1][0]


@pytest.mark.parametrize("crash_on, resume_on", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(one_process_runs, tmp_path, crash_on, resume_on):
    """A run killed in task 2 on ``crash_on`` processes, resumed on ``resume_on``, ends as the uninterrupted run."""
    expected, one_folder = one_process_runs
    folder = tmp_path / "run"
    crashed = torchrun("--mode", "sequence", "--methods", "mas", "--out", str(tmp_path / "never.pt"),
                       "--checkpoint-dir", str(folder), "--crash-in-task", "2", nproc=crash_on, check=False)
    assert crashed.returncode != 0 and not (tmp_path / "never.pt").exists()
    state = torch.load(folder / "mas" / "checkpoint.pt", weights_only=True)
    assert state["completed_tasks"] == 1
    out = tmp_path / "resumed.pt"
    torchrun("--mode", "sequence", "--methods", "mas", "--out", str(out), "--checkpoint-dir", str(folder),
             "--resume", nproc=resume_on)
    assert torch.load(out, weights_only=True)["mas"] == expected["mas"]
    assert relative_error(final_weights(folder / "mas"), final_weights(one_folder / "mas")) <= 1e-5


def test_worked_example_own_ddp_loop(tmp_path):
    """scripts/ddp_own_loop.py on 2 processes: the RankShard Ω equals rank 0's one-process Ω of the
    same weights, and |grad| after DDP's averaging is far smaller."""
    import re

    script = Path(__file__).resolve().parents[1] / "scripts" / "ddp_own_loop.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"task (\d): 2 process\(es\).*this task's Ω total ([\d.]+), one-process Ω total ([\d.]+), "
                      r"naive DDP Ω total ([\d.]+)", done.stdout)
    assert [row[0] for row in rows] == ["0", "1"], done.stdout
    for _, sharded, alone, naive in rows:
        assert float(sharded) == pytest.approx(float(alone), rel=1e-5)
        assert float(naive) < 0.6 * float(alone)
