"""`mas-triplets train` under torchrun: 2 processes give the 1-process numbers, only rank 0
writes, and a run resumes on another number of processes.

The launches are real: ``python -m torch.distributed.run --standalone --nproc_per_node=2
-m triplets.cli train ...`` on the CPU (gloo), one torch thread per process. A machine on
which torchrun cannot start makes these tests fail (never skip).

Tolerances (float reduction order): with 2 processes each gradient is the all-reduced sum of
two half-batch sums instead of one sum over the batch, and Ω is the sum of two per-rank sums,
so the numbers agree up to float32 rounding (measured here: weights within 1.5e-7, Ω within
5e-7 relative, accuracy matrices and logged losses identical). We allow weights within 1e-5,
Ω within 1e-4 relative, logged mean losses within 1e-3, and in the accuracy matrix one test
image per entry (1/12 here: rounding can only move an image whose 5th and 6th nearest facts
are tied to within ~1e-6). The model has GroupNorm/LayerNorm (``model.norm: group``) and no
dropout, so nothing else differs between 1 and 2 processes (BatchNorm's per-rank batch
statistics would).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

try:  # pytest puts tests/ on sys.path (rootdir-less test modules)
    from test_train import die_after_first_mas_task, make_tiny_fact_file
except ModuleNotFoundError:  # pragma: no cover - imported as a package module
    from tests.test_train import die_after_first_mas_task, make_tiny_fact_file

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_train_worker.py")
NUM_TEST_PER_TASK = 12  # 6 facts × 2 test images
ACCURACY_TOLERANCE = 1.0 / NUM_TEST_PER_TASK + 1e-12
WEIGHT_TOLERANCE = 1e-5
IMPORTANCE_RTOL = 1e-4
LOSS_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    """2 tasks × 6 facts, 4 training and 2 test images per fact (24 training samples per task)."""
    return make_tiny_fact_file(tmp_path_factory.mktemp("dist") / "facts.h5", num_tasks=2, facts_per_task=6,
                               train_per_fact=4, test_per_fact=2)


@pytest.fixture(scope="module")
def config_path(facts, tmp_path_factory) -> Path:
    """finetune then exact MAS; global batches of 23 and 1 per epoch, so rank 1 gets an uneven
    share (11 of 23) and an empty one (weight 0); importance in batches of 5 per rank."""
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"fact_file": str(facts)},
        "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32, "norm": "group",
                  "dropout": 0.0},
        "optim": {"epochs": 2, "batch_size": 23, "lr": 0.05},
        "methods": [{"name": "finetune"}, {"name": "mas", "options": {"lam": 1.0, "mode": "exact"}}],
        "eval": {"index": "none", "batch_size": 5},
        "num_threads": 1, "device": "cpu",
    }))
    return path


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def torchrun(*arguments: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2`` of ``-m triplets.cli``
    (or of ``script``) with ``arguments``."""
    target = script if script is not None else ["-m", "triplets.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *target, *arguments]
    return subprocess.run(command, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=300)


def _succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"torchrun failed (exit {result.returncode}); stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")


def _single_process(config_path: Path, out: Path, *, resume: bool = False) -> dict:
    from triplets.facts.train import train_run
    from triplets.facts.train_config import load_train_config

    return train_run(load_train_config(config_path), out, resume=resume, progress=False)


def _files(run: Path) -> set[str]:
    return {str(path.relative_to(run)) for path in run.rglob("*") if path.is_file()}


def assert_same_run(run: Path, reference: Path, methods=("finetune", "mas")) -> None:
    """``run`` holds the numbers of ``reference`` within the tolerances of the module docs."""
    results = json.loads((run / "results.json").read_text())["methods"]
    expected = json.loads((reference / "results.json").read_text())["methods"]
    assert list(results) == list(expected) == list(methods)
    for method in methods:
        R, R_ref = results[method]["accuracy_matrix"], expected[method]["accuracy_matrix"]
        assert len(R) == len(R_ref) == 2
        for row, row_ref in zip(R, R_ref):
            for value, value_ref in zip(row, row_ref):
                assert (value is None) == (value_ref is None)
                if value is not None:
                    assert abs(value - value_ref) <= ACCURACY_TOLERANCE, (method, R, R_ref)
        weights = torch.load(run / method / "model.pt", weights_only=True)["model"]
        weights_ref = torch.load(reference / method / "model.pt", weights_only=True)["model"]
        assert weights.keys() == weights_ref.keys()
        assert not any(name.startswith("module.") for name in weights)  # the unwrapped model, never DDP's
        for name in weights:
            assert torch.allclose(weights[name], weights_ref[name], rtol=0, atol=WEIGHT_TOLERANCE), (method, name)
        losses = [float(line.split("mean loss ")[1].split(",")[0])
                  for line in (run / method / "log.txt").read_text().splitlines()]
        losses_ref = [float(line.split("mean loss ")[1].split(",")[0])
                      for line in (reference / method / "log.txt").read_text().splitlines()]
        assert len(losses) == len(losses_ref) == 2  # one line per task: never doubled by a second rank
        assert losses == pytest.approx(losses_ref, abs=LOSS_TOLERANCE)
    importance = torch.load(run / "mas" / "checkpoint.pt", weights_only=True)["regularizer"]["accumulated"]
    importance_ref = torch.load(reference / "mas" / "checkpoint.pt", weights_only=True)["regularizer"]["accumulated"]
    assert importance.keys() == importance_ref.keys() and importance
    for name in importance:
        scale = float(importance_ref[name].abs().max())
        assert scale > 0, name  # the estimate is not trivially zero
        assert float((importance[name] - importance_ref[name]).abs().max()) <= IMPORTANCE_RTOL * scale, name


@pytest.fixture(scope="module")
def one_process(config_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _single_process(config_path, out)
    return out


def test_two_processes_give_the_one_process_results_and_only_rank_0_writes(config_path, one_process, tmp_path):
    out = tmp_path / "two"
    result = torchrun("train", "--config", str(config_path), "--out", str(out), "--no-progress")
    _succeeded(result)
    assert_same_run(out, one_process)
    # rank 0 alone wrote: the same files as one process, nothing half-written or per-rank beside them
    assert _files(out) == _files(one_process)
    assert not [name for name in _files(out) if "tmp" in name]
    assert (out / "config.yaml").read_text() == (one_process / "config.yaml").read_text()
    # rank 0 alone printed the summary; rank 1 printed no error
    assert result.stdout.count("run folder:") == 1 and result.stdout.count("\nmas ") == 1, result.stdout
    assert "error" not in result.stderr.lower(), result.stderr[-3000:]

    # a refused folder: rank 0's error reaches rank 1, both exit 2, one line is printed
    again = torchrun("train", "--config", str(config_path), "--out", str(out), "--no-progress")
    assert again.returncode != 0
    lines = [line for line in again.stderr.splitlines() if line.startswith("mas-triplets train")]
    assert lines == [f"mas-triplets train: error: {out} already holds a run; pass --resume to continue it or "
                     "choose a new --out (nothing was overwritten)"], again.stderr[-3000:]
    assert _files(out) == _files(one_process)  # nothing overwritten


def test_killed_on_two_processes_resumes_on_one(config_path, one_process, tmp_path):
    out = tmp_path / "run"
    killed = torchrun("mas:1", "train", "--config", str(config_path), "--out", str(out), "--no-progress",
                      script=[str(WORKER)])
    assert killed.returncode != 0, killed.stderr[-3000:]
    state = torch.load(out / "mas" / "checkpoint.pt", weights_only=True)
    assert state["completed_tasks"] == 1 and not (out / "mas" / "model.pt").exists()
    assert (out / "finetune" / "model.pt").is_file()
    finetune_bytes = (out / "finetune" / "model.pt").read_bytes()

    _single_process(config_path, out, resume=True)
    assert (out / "finetune" / "model.pt").read_bytes() == finetune_bytes  # finished earlier: skipped
    assert_same_run(out, one_process)


def test_killed_on_one_process_resumes_on_two(config_path, one_process, tmp_path, monkeypatch):
    import mas_core.loop as train_module

    out = tmp_path / "run"
    real_save = die_after_first_mas_task(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _single_process(config_path, out)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert not (out / "mas" / "model.pt").exists()

    resumed = torchrun("train", "--config", str(config_path), "--out", str(out), "--resume", "--no-progress")
    _succeeded(resumed)
    assert_same_run(out, one_process)
    assert len((out / "mas" / "log.txt").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- the split, without processes
def _shares(samples, batch_size: int, seed: int, world_size: int = 2):
    """Per rank, the loop's ``(batch, scale)`` of every global batch of epoch 0 of task 0."""
    from mas_core.distributed import ProcessInfo
    from mas_core.loop import epoch_shares

    ranks = [ProcessInfo(rank=r, world_size=world_size, local_rank=r, backend="gloo") for r in range(world_size)]
    out = []
    for info in ranks:
        shares = epoch_shares(len(samples), batch_size, seed, 0, 0, info)
        out.append([(*batch, scale) for batch, (_, scale) in zip(samples.batches([i for i, _ in shares]), shares)])
    return out


def _whole(samples, batch_size: int, seed: int):
    from mas_core.loop import epoch_shares

    shares = epoch_shares(len(samples), batch_size, seed, 0, 0, None)
    assert all(scale == 1.0 for _, scale in shares)  # one process: the plain mean loss
    return list(samples.batches([index for index, _ in shares]))


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_every_global_batch_is_split_across_ranks_without_loss_or_padding(facts, in_memory):
    from data_prep.facts.fact_file import open_facts
    from triplets.facts.data import FactSamples

    with open_facts(facts) as fact_file:
        samples = FactSamples(fact_file, [(0, 0)], in_memory=in_memory)
        whole = _whole(samples, 10, seed=3)  # 24 samples: 10, 10, 4
        shares = _shares(samples, 10, seed=3, world_size=3)
        assert [len(rank) for rank in shares] == [3, 3, 3]
        for b, (images, fact_ids) in enumerate(whole):
            parts = [shares[r][b] for r in range(3)]
            # scale N·|share|/|batch|: the DDP average of the ranks' scaled means is the batch mean
            assert [part[2] for part in parts] == pytest.approx([3 * len(part[1]) / len(fact_ids) for part in parts])
            # rank r holds positions r, r+3, … of the global batch, with their images
            for r, (rank_images, rank_ids, _) in enumerate(parts):
                assert torch.equal(rank_ids, fact_ids[r::3])
                assert torch.allclose(rank_images, images[r::3])
        # a global batch smaller than the number of ranks: the empty share gets one sample at scale 0
        # (24 samples in batches of 22: the last global batch holds 2 samples for 3 ranks)
        tail = _shares(samples, 22, seed=3, world_size=3)
        assert [[len(batch[1]) for batch in rank] for rank in tail] == [[8, 1], [7, 1], [7, 1]]
        assert [rank[1][2] for rank in tail] == pytest.approx([1.5, 1.5, 0.0])
        # an importance shard: positions r, r+N, … in file order, every sample exactly once
        everything = torch.cat([ids for _, ids in samples.in_order(5)])
        for r in range(2):
            index = torch.arange(r, len(samples), 2)
            ids = torch.cat([ids for _, ids in samples.batches(list(index.split(5)))])
            assert torch.equal(ids, everything[r::2])


def test_cached_features_are_split_like_images(tmp_path, facts):
    import h5py
    import numpy as np

    from data_prep.facts.fact_file import open_facts
    from triplets.facts.feature_cache import FEATURE_DATASET, FeatureSamples

    with open_facts(facts) as fact_file:
        stored = np.random.default_rng(0).normal(size=(int(fact_file.num_samples), 2, 1, 1)).astype(np.float32)
        with h5py.File(tmp_path / "features.h5", "w") as handle:
            handle[FEATURE_DATASET] = stored
        samples = FeatureSamples(tmp_path / "features.h5", fact_file, [(1, 0)])
        whole = _whole(samples, 7, seed=5)
        shares = _shares(samples, 7, seed=5)
        for b, (features, fact_ids) in enumerate(whole):
            for r in range(2):
                assert torch.equal(shares[r][b][0], features[r::2]) and torch.equal(shares[r][b][1], fact_ids[r::2])
        positions = [1, 4, 5, 9]
        (chosen, ids), = list(samples.batches([torch.tensor(positions)]))
        assert torch.equal(chosen, samples.features[positions]) and torch.equal(ids, samples.fact_ids[positions])
