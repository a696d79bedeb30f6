"""The fast path: branches trained on cached trunk features (model.cache_features)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from test_train import make_tiny_fact_file
from triplets.errors import ConfigError
from triplets.fingerprint import feature_cache_fingerprint
from triplets.facts.model import ModelConfig, build_model
from triplets.facts.train import train_run
from mas_core.loop import OptimSettings
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig, load_train_config
from triplets.run_folder import load_run

IMAGE_SIZE = 32
SLOT_DIM = 8


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    """2 tasks × 4 facts, 4 training and 2 test images per fact, 32×32 pixels."""
    return make_tiny_fact_file(tmp_path_factory.mktemp("cached") / "facts.h5", num_tasks=2, facts_per_task=4,
                               train_per_fact=4, test_per_fact=2, image_size=IMAGE_SIZE, slot_dim=SLOT_DIM)


def _config(fact_file: Path, *, methods, cache: bool) -> TrainConfig:
    model = ModelConfig(backbone="resnet18", hidden_dim=16, cache_features=cache, freeze_trunk=not cache)
    return TrainConfig(
        data=DataConfig(fact_file=str(fact_file)), model=model,
        optim=OptimSettings(epochs=1, batch_size=8, lr=0.01),
        methods=methods, eval=EvalConfig(index="none", batch_size=16, stale_index=cache), num_threads=1,
    )


def _tensors(state, prefix=""):
    """Flatten a nested state dict into {path: tensor}."""
    found = {}
    if isinstance(state, torch.Tensor):
        found[prefix] = state
    elif isinstance(state, dict):
        for key, value in state.items():
            found.update(_tensors(value, f"{prefix}/{key}"))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            found.update(_tensors(value, f"{prefix}/{index}"))
    return found


def count_cache_writes(monkeypatch) -> list[Path]:
    """Record the path of every feature cache written from now on (the write still happens)."""
    import triplets.facts.feature_cache as cache_module

    writes: list[Path] = []
    real_write = cache_module.write_feature_cache

    def counting_write(path, *args, **kwargs):
        writes.append(Path(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "write_feature_cache", counting_write)
    return writes


def test_cached_run_equals_frozen_trunk_run_and_the_cache_is_reused(facts, tmp_path, monkeypatch):
    finetune, mas = MethodConfig("finetune"), MethodConfig("mas", {"lam": 1.0, "mode": "exact"})
    frozen = train_run(_config(facts, methods=[finetune, mas], cache=False), tmp_path / "frozen", progress=False)
    assert not (tmp_path / "frozen" / "features").exists()

    writes = count_cache_writes(monkeypatch)
    cached_dir = tmp_path / "cached"
    train_run(_config(facts, methods=[finetune], cache=True), cached_dir, progress=False)
    assert len(writes) == 1
    cache_files = sorted((cached_dir / "features").glob("*.h5"))
    assert cache_files == writes and cache_files[0].suffix == ".h5"
    mtime = os.stat(cache_files[0]).st_mtime_ns
    # resume with a second method: the same cache is read, not recomputed
    cached = train_run(_config(facts, methods=[finetune, mas], cache=True), cached_dir, resume=True, progress=False)
    assert len(writes) == 1 and sorted((cached_dir / "features").glob("*.h5")) == cache_files
    assert os.stat(cache_files[0]).st_mtime_ns == mtime

    for method in ("finetune", "mas"):
        R_frozen = frozen["methods"][method]["accuracy_matrix"]
        R_cached = cached["methods"][method]["accuracy_matrix"]
        assert np.allclose(np.array(R_frozen, dtype=float), np.array(R_cached, dtype=float), atol=1e-9, equal_nan=True)
        assert cached["methods"][method]["final"]["generalized"][1]["top5"] == pytest.approx(
            frozen["methods"][method]["final"]["generalized"][1]["top5"])
        rows = cached["methods"][method]["stale_index"]["rows"]  # the cached path's stale index: C[T] = fresh
        assert rows[-1]["stale"] == rows[-1]["fresh"] and [row["index_after_task"] for row in rows] == [1, 2]
        a = torch.load(tmp_path / "frozen" / method / "model.pt", weights_only=True)["model"]
        b = torch.load(cached_dir / method / "model.pt", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5, rtol=1e-4), f"{method}: {name}"
    # MAS's importance covers the branch parameters only, and is the same on either path
    omega_frozen = _tensors(torch.load(tmp_path / "frozen" / "mas" / "checkpoint.pt", weights_only=True)["regularizer"])
    omega_cached = _tensors(torch.load(cached_dir / "mas" / "checkpoint.pt", weights_only=True)["regularizer"])
    assert omega_frozen.keys() == omega_cached.keys() and omega_cached
    assert not any("trunk" in key for key in omega_cached)
    assert sum(float(v.float().abs().sum()) for v in omega_cached.values()) > 0
    for key in omega_frozen:
        assert torch.allclose(omega_frozen[key].float(), omega_cached[key].float(), atol=1e-6, rtol=1e-4), key

    # the trunk did not train: equal to a freshly built model with the same seed
    torch.manual_seed(0)
    fresh = build_model(_config(facts, methods=[finetune], cache=True).model, SLOT_DIM, IMAGE_SIZE)
    trained = torch.load(cached_dir / "mas" / "model.pt", weights_only=True)["model"]
    for name, value in fresh.state_dict().items():
        if name.startswith("trunk."):
            assert torch.equal(value, trained[name]), name

    # (1) the cached features are the trunk's output on the images; the loaded model embeds raw images
    with load_run(cached_dir) as run:
        model = run.load_model("mas")
        assert model.trunk_frozen and not any(p.requires_grad for p in model.trunk.parameters())
        pixels = torch.from_numpy(np.asarray(run.fact_file.pixels(np.arange(run.fact_file.num_samples))))
        images = pixels.permute(0, 3, 1, 2).float() / 255.0
        assert feature_cache_fingerprint(model, run.fact_file) == cache_files[0].stem
    with h5py.File(cache_files[0], "r") as handle:
        stored = torch.from_numpy(np.asarray(handle["features"]))
    assert stored.dtype == torch.float32 and stored.shape == (len(images), 128, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    with torch.no_grad():
        direct = model.trunk_features(images)
        assert torch.allclose(stored, direct, atol=1e-5, rtol=1e-4)
        from_images = model.embed(images)
        from_cache = F.normalize(model.forward_features(stored), dim=1)
    assert torch.allclose(from_images, from_cache, atol=1e-5)


def test_fingerprint_changes_with_the_trunk_and_the_fact_file(facts, tmp_path):
    from data_prep.facts.fact_file import open_facts

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", hidden_dim=16, cache_features=True), SLOT_DIM, IMAGE_SIZE)
    other_file = make_tiny_fact_file(tmp_path / "other.h5", num_tasks=2, facts_per_task=4, train_per_fact=4,
                                     test_per_fact=2, image_size=IMAGE_SIZE, slot_dim=SLOT_DIM, seed=1)
    with open_facts(facts) as fact_file, open_facts(other_file) as other:
        key = feature_cache_fingerprint(model, fact_file)
        assert feature_cache_fingerprint(model, fact_file) == key  # deterministic
        assert feature_cache_fingerprint(model, other) != key  # another fact file
        # a branch change does not touch the trunk's features; a trunk change does
        with torch.no_grad():
            model.subject_branch[-1].weight.add_(1.0)
        assert feature_cache_fingerprint(model, fact_file) == key
        with torch.no_grad():
            model.trunk[0].weight[0, 0, 0, 0] += 1e-3
        assert feature_cache_fingerprint(model, fact_file) != key


def test_cache_and_frozen_trunk_are_refused_for_the_small_cnn(facts, tmp_path):
    for key in ("cache_features", "freeze_trunk"):
        config = ModelConfig(backbone="small_cnn", **{key: True})
        with pytest.raises(ConfigError, match=f"model.{key} needs a pretrained architecture"):
            config.validate()
        with pytest.raises(ConfigError, match="pretrained architecture"):
            build_model(config, SLOT_DIM, IMAGE_SIZE)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"fact_file": str(facts)}}))
    with pytest.raises(ConfigError, match="cache_features needs a pretrained architecture"):
        load_train_config(path, ["model.cache_features=true"])
    config = dataclasses.replace(_config(facts, methods=[MethodConfig("finetune")], cache=True),
                                 model=ModelConfig(cache_features=True))
    with pytest.raises(ConfigError, match="small_cnn"):
        train_run(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_a_shared_cache_folder_is_computed_once_for_several_run_folders(facts, tmp_path, monkeypatch):
    """``feature_cache_dir``: two run folders (one method each) share one cache file, the second run
    reads it, and its figures equal a run that kept its own cache in ``RUN/features``."""
    writes = count_cache_writes(monkeypatch)
    shared = tmp_path / "shared_cache"
    finetune, mas = MethodConfig("finetune"), MethodConfig("mas", {"lam": 1.0, "mode": "exact"})
    results = {}
    for method, folder in ((finetune, "run_finetune"), (mas, "run_mas")):
        config = dataclasses.replace(_config(facts, methods=[method], cache=True), feature_cache_dir=str(shared))
        results[method.name] = train_run(config, tmp_path / folder, progress=False)
        assert not (tmp_path / folder / "features").exists()
    assert len(writes) == 1 and writes[0].parent == shared
    assert sorted(path.name for path in shared.glob("*.h5")) == [writes[0].name]
    own = train_run(_config(facts, methods=[mas], cache=True), tmp_path / "own", progress=False)
    assert len(writes) == 2 and writes[1].parent == tmp_path / "own" / "features"
    assert writes[1].name == writes[0].name  # the same fingerprint: the same trunk and fact file
    shared_matrix = results["mas"]["methods"]["mas"]["accuracy_matrix"]
    assert np.allclose(np.array(shared_matrix, dtype=float), np.array(own["methods"]["mas"]["accuracy_matrix"],
                                                                      dtype=float), equal_nan=True)


def test_concurrent_requests_for_one_shared_cache_compute_it_once(facts, tmp_path, monkeypatch):
    """Two threads asking for the same missing cache: one computes it under the lock, the other waits
    and reads it (no second write)."""
    import threading

    import triplets.facts.feature_cache as cache_module
    from data_prep.facts.fact_file import open_facts

    writes: list[Path] = []
    real_write = cache_module.write_feature_cache
    entered = threading.Event()

    def slow_write(path, *args, **kwargs):
        writes.append(Path(path))
        entered.set()
        threading.Event().wait(0.3)  # the other thread arrives while this one holds the lock
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "write_feature_cache", slow_write)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", hidden_dim=16, cache_features=True), SLOT_DIM, IMAGE_SIZE)
    found: list[Path] = []
    with open_facts(facts) as fact_file:
        def request() -> None:
            found.append(cache_module.ensure_feature_cache(tmp_path / "shared", model, fact_file, batch_size=16))

        first = threading.Thread(target=request)
        first.start()
        assert entered.wait(10)
        request()
        first.join()
    assert len(writes) == 1 and found[0] == found[1] == writes[0] and writes[0].is_file()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir() if not p.name.startswith(".")) == [writes[0].name]


def test_a_cache_folder_that_is_a_file_is_refused(facts, tmp_path):
    from data_prep.facts.fact_file import open_facts
    from triplets.facts.feature_cache import ensure_feature_cache

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", hidden_dim=16, cache_features=True), SLOT_DIM, IMAGE_SIZE)
    with open_facts(facts) as fact_file, pytest.raises(ConfigError, match="is a file, not a folder"):
        ensure_feature_cache(blocker, model, fact_file)
