"""The fact embedding's ridge baseline (triplets.facts.ridge): per-slot masked ridge on the frozen
EfficientNet-Lite0's pooled features, run by the fact runner with the same results, model file and
resume as every method."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import SMALL_MODEL, make_tiny_fact_file
from triplets.errors import ConfigError
from triplets.facts.model import slot_targets
from triplets.facts.train import train_run
from mas_core.loop import OptimSettings
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig
from triplets.run_folder import load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    return make_tiny_fact_file(tmp_path_factory.mktemp("ridge") / "facts.h5", num_tasks=2, facts_per_task=6,
                               train_per_fact=4, test_per_fact=2)


def _config(fact_file: Path, methods: list[MethodConfig], index: str = "none", stale: bool = False) -> TrainConfig:
    return TrainConfig(data=DataConfig(fact_file=str(fact_file)), model=SMALL_MODEL,
                       optim=OptimSettings(epochs=1, batch_size=16), methods=methods,
                       eval=EvalConfig(index=index, stale_index=stale), num_threads=1)


RIDGE = MethodConfig("ridge", {"strengths": [1e-4, 1e-2, 1.0]})


def _comparable(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result.pop("wall_time_s")
    return result


def test_the_fact_ridge_is_masked_ridge_on_all_tasks_and_works_as_a_run_model(facts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train_run(_config(facts, [RIDGE, MethodConfig("finetune")], index="flat"), out, progress=False)
    entry = results["methods"]["ridge"]
    assert entry["method"] == "ridge" and len(entry["accuracy_matrix"]) == 2 and entry["accuracy_matrix"][0][1] is None
    assert len(entry["final"]["generalized"]) == 2 and len(entry["ridge"]) == 2
    assert entry["avg_acc"] == pytest.approx(np.mean(entry["accuracy_matrix"][1]))
    assert "| ridge |" in (out / "results.md").read_text()
    assert (out / "ridge" / "index" / "images.faiss").is_file()
    with load_run(out) as run:
        model = run.load_model("ridge")
        fact_file = run.fact_file
        targets = slot_targets(torch.as_tensor(np.asarray(fact_file.fact_embeddings)), unit_norm=True).double()
        masks = torch.as_tensor(np.asarray(fact_file.slot_masks)).double()
        indices = np.concatenate([fact_file.sample_indices(task=t, split=0) for t in range(2)])
        images = torch.from_numpy(np.asarray(fact_file.pixels(np.sort(indices)))).permute(0, 3, 1, 2).float() / 255
        fact_ids = torch.as_tensor(np.asarray(fact_file.sample_fact)[np.sort(indices)])
        with torch.no_grad():
            x = model.trunk_features(images).double()
        design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        alphas = entry["ridge"][1]["alpha"]
        d = model.slot_dim
        branch = torch.cat([model.subject_branch.weight, model.predicate_object_branch.weight]).double()
        bias = torch.cat([model.subject_branch.bias, model.predicate_object_branch.bias]).double()
        for k in range(3):  # each slot: weighted ridge with an unpenalised bias on both tasks' samples
            w = masks[fact_ids, k]
            penalty = alphas[k] * torch.eye(1281, dtype=torch.float64)
            penalty[-1, -1] = 0
            y = targets[fact_ids, k * d:(k + 1) * d]
            solution = torch.linalg.solve(design.T @ (design * w[:, None]) + penalty, design.T @ (y * w[:, None]))
            scale = float(solution.abs().max())
            assert torch.allclose(branch[k * d:(k + 1) * d].T, solution[:-1], atol=1e-4 * scale, rtol=0)
            assert torch.allclose(bias[k * d:(k + 1) * d], solution[-1], atol=1e-4 * scale, rtol=0)
    assert 0.0 < entry["accuracy_matrix"][1][0] <= 1.0


def test_a_resumed_fact_ridge_equals_an_uninterrupted_one(facts: Path, tmp_path: Path) -> None:
    whole = train_run(_config(facts, [RIDGE], stale=True), tmp_path / "whole", progress=False)
    config = _config(facts, [RIDGE], stale=True)
    train_run(config, tmp_path / "part", progress=False, stop_after_task=1)
    resumed = train_run(config, tmp_path / "part", progress=False, resume=True)
    assert _comparable(resumed["methods"]["ridge"]) == _comparable(whole["methods"]["ridge"])
    # the stale-index embeddings (triplets.facts.stale_index): the same files; the last row is the fresh figure
    for name in ("after_task_1.npz", "after_task_2.npz"):
        assert ((tmp_path / "part" / "ridge" / "stale_index" / name).read_bytes()
                == (tmp_path / "whole" / "ridge" / "stale_index" / name).read_bytes())
    rows = whole["methods"]["ridge"]["stale_index"]["rows"]
    assert rows[-1]["stale"] == rows[-1]["fresh"] and rows[-1]["stale"]["top5"] == whole["methods"]["ridge"]["avg_acc"]
    assert [task["top5"] for task in rows[0]["per_task"]] == whole["methods"]["ridge"]["accuracy_matrix"][0][:1]
    first = torch.load(tmp_path / "whole" / "ridge" / "model.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "part" / "ridge" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_bad_ridge_options_fail_before_training(facts: Path, tmp_path: Path) -> None:
    for options in ({"lam": 1.0}, {"input_size": 4}, {"strengths": [-1.0]}):
        with pytest.raises(ConfigError):
            train_run(_config(facts, [MethodConfig("ridge", options)]), tmp_path / "bad", progress=False)


def test_the_ridge_reads_the_runs_feature_cache_and_gets_the_whole_networks_features(facts: Path, tmp_path: Path) -> None:
    """On a run that caches its trunk (efficientnet_lite0, cache_features) the ridge's features are
    pool(suffix(cache)): the whole network's pooled features to float rounding, so the same ridge."""
    from triplets.facts.data import open_fact_file
    from triplets.facts.experiment import fact_context
    from triplets.facts.model import ModelConfig
    from triplets.facts.ridge import FactRidge

    def config(cache: bool) -> TrainConfig:
        model = ModelConfig(backbone="efficientnet_lite0", trunk_blocks=13, input_size=48, hidden_dim=16,
                            cache_features=cache)
        return TrainConfig(data=DataConfig(fact_file=str(facts)), model=model, optim=OptimSettings(epochs=1, batch_size=16),
                           methods=[RIDGE], eval=EvalConfig(index="none"), num_threads=1)

    cached, direct = train_run(config(True), tmp_path / "cached", progress=False), train_run(
        config(False), tmp_path / "direct", progress=False)
    assert list((tmp_path / "cached" / "features").glob("*.h5")), "the ridge wrote the run's feature cache"
    assert not (tmp_path / "direct" / "features").exists()
    with open_fact_file(facts) as fact_file:
        ctx = fact_context(config(True), fact_file, torch.device("cpu"), tmp_path / "cached")
        reading, computing = FactRidge(ctx, RIDGE.options), FactRidge(ctx, RIDGE.options)
        assert reading.use_feature_cache() and reading.cache is not None and computing.cache is None
        for split in (0, 1):
            (from_cache, ids), (from_images, same_ids) = reading._features(1, split), computing._features(1, split)
            assert torch.equal(ids, same_ids) and from_cache.shape == from_images.shape == (len(ids), 1280)
            assert torch.allclose(from_cache, from_images, atol=1e-4, rtol=1e-4)
    one, other = cached["methods"]["ridge"], direct["methods"]["ridge"]
    assert [r["strength"] for r in one["ridge"]] == [r["strength"] for r in other["ridge"]]
    assert np.allclose(np.array(one["accuracy_matrix"][1]), np.array(other["accuracy_matrix"][1]), atol=0.05)
