"""The recognition sequence on EfficientNet-Lite0 (frozen prefix, trainable suffix, cached prefix
features) and its ridge baseline (triplets.recognition.ridge over mas_core.ridge)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from mas_core.loop import OptimSettings
from mas_core.ridge import RidgeSettings, RidgeStatistics, run_ridge
from mas_core.sequence import Task, run_sequence
from triplets.backbones import efficientnet_lite0, pretrained_split
from triplets.recognition.run import run_recognition
from triplets.recognition.config import load_recognition_config
from triplets.recognition.config import ModelSpec
from triplets.recognition.data import build_tasks, model_factory, prefix_features
from triplets.recognition.ridge import RecognitionRidge, run_recognition_ridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_model_spec_keys_are_checked() -> None:
    ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, trunk_blocks=16, cache_features=True).validate()
    bad = [ModelSpec(arch="small_cnn", trunk_blocks=3),
           ModelSpec(arch="efficientnet_lite0", channels=3, trunk_blocks=17),
           ModelSpec(arch="efficientnet_lite0", channels=1),
           ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, resize=40, cache_features=True),
           ModelSpec(arch="efficientnet_lite0", channels=3, pretrained_weights="scratch", cache_features=True)]
    for spec in bad:
        with pytest.raises(ValueError):
            spec.validate()


def test_the_trunk_gives_the_backbones_pooled_features_with_and_without_the_cache() -> None:
    x = _images(4, 0)
    reference = efficientnet_lite0().pooled_features(x)
    model = model_factory(ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, trunk_blocks=10))().eval()
    assert model.feature_dim == 1280
    assert torch.allclose(model.features(x), reference, atol=1e-6, rtol=0)
    spec = ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, trunk_blocks=10, cache_features=True)
    cached = model_factory(spec)().eval()
    prefix = pretrained_split("efficientnet_lite0", None, 10).prefix
    assert torch.allclose(cached.features(prefix_features(prefix, x)), reference, atol=1e-6, rtol=0)


def test_a_training_step_moves_the_suffix_and_never_the_frozen_prefix() -> None:
    """finetune through the task loop, 1 epoch in train mode: the prefix's parameters and batch-norm
    buffers are bit-identical afterwards (FrozenModule keeps eval mode), the suffix's have moved."""
    spec = ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, trunk_blocks=14)
    make_model = model_factory(spec)
    before = make_model().trunk.state_dict()
    labels = torch.arange(16) % 2
    task = Task("a", TensorDataset(_images(16, 1), labels), TensorDataset(_images(4, 2), labels[:4]), 2)
    result = run_sequence(make_model, [task], "finetune", OptimSettings(epochs=1, lr=0.05, batch_size=8),
                          progress=False)
    after = result.model.trunk.state_dict()
    prefix_keys = [key for key in before if key.startswith("0.")]  # trunk = (FrozenModule(prefix), suffix, pool)
    suffix_keys = [key for key in before if key.startswith("1.")]
    assert any("running_mean" in key for key in prefix_keys) and any("running_var" in key for key in prefix_keys)
    assert all(torch.equal(before[key], after[key]) for key in prefix_keys)
    assert sum(not torch.equal(before[key], after[key]) for key in suffix_keys if "running" in key) > 0
    assert sum(not torch.equal(before[key], after[key]) for key in suffix_keys if key.endswith("weight")) > 0


def test_frozen_batch_norm_keeps_the_suffix_statistics() -> None:
    """model.freeze_batch_norm: after a training epoch the suffix's batch-norm buffers and affine
    parameters are those of ImageNet; its convolution has moved."""
    spec = ModelSpec(arch="efficientnet_lite0", channels=3, input_size=32, trunk_blocks=16, freeze_batch_norm=True)
    make_model = model_factory(spec)
    before = make_model().trunk.state_dict()
    labels = torch.arange(16) % 2
    task = Task("a", TensorDataset(_images(16, 3), labels), TensorDataset(_images(4, 4), labels[:4]), 2)
    after = run_sequence(make_model, [task], "finetune", OptimSettings(epochs=1, lr=0.05, batch_size=8),
                         progress=False).model.trunk.state_dict()
    norms = [key for key in before if key.startswith("1.") and "_bn1" in key]
    assert len(norms) == 5 and all(torch.equal(before[key], after[key]) for key in norms)
    assert not torch.equal(before["1.0._conv_head.weight"], after["1.0._conv_head.weight"])


def _config(root: Path, methods: list[str], test_per_class: int = 4, options: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recognition.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-pretrained", "seed": 0, "data_dir": str(root / "data"),
        "tasks": [{"name": "low", "dataset": "digits", "classes": [0, 1, 2], "max_train_per_class": 12,
                   "max_test_per_class": test_per_class},
                  {"name": "high", "dataset": "digits", "classes": [7, 8, 9], "max_train_per_class": 12,
                   "max_test_per_class": test_per_class}],
        "model": {"arch": "efficientnet_lite0", "input_size": 32, "channels": 3, "trunk_blocks": 16,
                  "cache_features": True},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "device": "cpu"},
        "methods": methods, **({"method_options": options} if options else {})}, sort_keys=False))
    return path


def test_grayscale_sources_are_replicated_to_three_channels_in_the_backbones_range(tmp_path: Path) -> None:
    config = load_recognition_config(_config(tmp_path, ["ridge"]), ["model.cache_features=false"])
    tasks = build_tasks(config)
    inputs = tasks[0].train.tensors[0]
    assert inputs.shape[1:] == (3, 32, 32)
    assert torch.equal(inputs[:, 0], inputs[:, 1]) and torch.equal(inputs[:, 0], inputs[:, 2])
    assert float(inputs.min()) >= -1.0 and float(inputs.max()) <= 1.0 and float(inputs.min()) < -0.9


def _features(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.tensors
    with torch.no_grad():
        return model.features(x).double(), y


def test_ridge_row_is_ridge_on_every_task_so_far_and_its_choice_never_reads_test_data(tmp_path: Path) -> None:
    """The recognition runner's ridge: after task 2 the heads equal ridge (torch.linalg.solve on the
    concatenated one-hot problem) at the chosen α, R[1][0] is the accuracy of that solution on task 1's
    test images (it moves only through the shared statistics); a smaller test set leaves the chosen
    strengths and their validation errors unchanged; the report has its row."""
    results = run_recognition(load_recognition_config(_config(tmp_path, ["ridge", "finetune"])), tmp_path / "run",
                              progress=False)
    entry = results["methods"]["ridge"]
    assert entry["method"] == "ridge" and len(entry["ridge"]) == 2
    assert "| ridge |" in (tmp_path / "run" / "results.md").read_text()
    config = load_recognition_config(_config(tmp_path, ["ridge"]))
    tasks = build_tasks(config)
    model = model_factory(config.model)().eval()
    (x0, y0), (x1, y1) = (_features(model, task.train) for task in tasks)
    x = torch.cat([x0, x1])
    targets = torch.zeros(len(x), 6, dtype=torch.float64)
    targets[torch.arange(len(x)), torch.cat([y0, y1 + 3])] = 1.0
    stats = RidgeStatistics(1280, 6)
    stats.update(x, targets)
    alpha = entry["ridge"][1]["alpha"][0]
    assert abs(alpha - stats.alpha(entry["ridge"][1]["strength"])) < 1e-6 * alpha
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    penalty = alpha * torch.eye(1281, dtype=torch.float64)
    penalty[-1, -1] = 0
    solution = torch.linalg.solve(design.T @ design + penalty, design.T @ targets)
    tx, ty = _features(model, tasks[0].test)
    predicted = (tx @ solution[:-1, :3] + solution[-1, :3]).argmax(1)
    assert entry["accuracy_matrix"][1][0] == pytest.approx(float((predicted == ty).double().mean()), abs=1e-12)
    assert entry["accuracy_matrix"][0][0] > 0.5 and entry["accuracy_matrix"][1][1] > 0.5
    fewer = run_recognition(load_recognition_config(_config(tmp_path / "b", ["ridge"], test_per_class=2)),
                            tmp_path / "b" / "run", progress=False)
    assert fewer["methods"]["ridge"]["ridge"] == entry["ridge"]
    assert fewer["tasks"][0]["num_test"] == 6 and results["tasks"][0]["num_test"] == 12


def test_a_resumed_ridge_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    config = load_recognition_config(_config(tmp_path, ["ridge"]))
    tasks = build_tasks(config)
    make_model = model_factory(config.model)
    settings = RidgeSettings(strengths=[1e-3, 1e-1, 10.0])
    whole, whole_records = run_recognition_ridge(make_model, tasks, settings, seed=0, batch_size=8,
                                                 checkpoint_dir=tmp_path / "whole")
    first = RecognitionRidge(make_model, tasks, batch_size=8)
    stopped, _ = run_ridge(first, settings, checkpoint_dir=tmp_path / "part", stop_after_task=1)
    assert stopped.trained_tasks == 1
    resumed, resumed_records = run_recognition_ridge(make_model, tasks, settings, seed=0, batch_size=8,
                                                     checkpoint_dir=tmp_path / "part", resume=True)
    assert resumed.trained_tasks == 1 and resumed_records == whole_records
    assert json.dumps(resumed.accuracy) == json.dumps(whole.accuracy)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    with pytest.raises(Exception, match="differ|mismatch|config"):
        run_recognition_ridge(make_model, tasks, RidgeSettings(strengths=[1.0]), seed=0, batch_size=8,
                              checkpoint_dir=tmp_path / "part", resume=True)
