"""FAISS indexes: exactness, recall of the approximate kinds, persistence and fingerprints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import triplets.index.common as index_module
from triplets.errors import RunFolderError, TripletsError
from triplets.fingerprint import model_fingerprint
from triplets.index import build_index, default_nlist, load_index, normalize_rows, sidecar_path


def _clustered(rng, count, dim, clusters=40, spread=0.35, extra_queries=0):
    """Gaussian-mixture vectors (like embeddings); with extra_queries, also held-out queries from the same mixture."""
    centres = rng.normal(size=(clusters, dim))
    total = count + extra_queries
    data = (centres[rng.integers(0, clusters, total)] + spread * rng.normal(size=(total, dim))).astype(np.float32)
    return (data[:count], data[count:]) if extra_queries else data


def _exact_top_k(database, queries, k):
    scores = normalize_rows(queries) @ normalize_rows(database).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_flat_is_exact_cosine():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(500, 24)) * rng.uniform(0.1, 10, size=(500, 1))  # scale must not matter
    queries = rng.normal(size=(30, 24))
    index = build_index(database)
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = _exact_top_k(database, queries, 10)
    assert ids.dtype == np.int64 and ids.shape == (30, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert np.all(scores <= 1.0 + 1e-5) and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_ids_mapping_and_k_larger_than_count():
    rng = np.random.default_rng(1)
    database = rng.normal(size=(6, 5))
    index = build_index(database, ids=np.arange(6) * 10 + 7)
    scores, ids = index.search(database[2], 50)
    assert ids.shape == (1, 6)
    assert ids[0, 0] == 27 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sorted(ids[0].tolist()) == [7, 17, 27, 37, 47, 57]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_reach_recall(kind):
    rng = np.random.default_rng(2)
    database, queries = _clustered(rng, 6000, 32, extra_queries=300)
    index = build_index(database, kind=kind)
    _, ids = index.search(queries, 10)
    _, truth = _exact_top_k(database, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
    assert recall >= 0.95, f"{kind} recall@10 {recall:.3f}"
    if kind == "ivf":
        assert index.metadata["nlist"] == default_nlist(6000) == min(round(4 * np.sqrt(6000)), 6000 // 39)
        assert 1 <= index.nprobe < index.metadata["nlist"]  # calibrated, cheaper than exhaustive
        assert index.metadata["calibrated_recall_at_10"] >= 0.95


def test_ivf_on_structureless_vectors_warns():
    rng = np.random.default_rng(6)
    with pytest.warns(UserWarning, match="flat index will be faster"):
        index = build_index(rng.normal(size=(4000, 64)), kind="ivf", calibration_queries=100)
    assert index.nprobe > index.metadata["nlist"] // 4


def test_default_nlist_rule():
    assert default_nlist(165_150) == round(4 * np.sqrt(165_150))
    assert default_nlist(100) == 2  # at least 39 training points per cell
    assert default_nlist(10) == 1


def test_save_load_round_trip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(4)
    database = _clustered(rng, 3000, 16)
    index = build_index(database, kind="ivf", nprobe=3, fingerprint="abc123", ids=np.arange(3000) + 5,
                        metadata={"contents": "facts"})
    path = index.save(tmp_path / "index" / "facts.faiss")
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["dim"] == 16 and sidecar["count"] == 3000 and sidecar["kind"] == "ivf"
    assert sidecar["fingerprint"] == "abc123" and sidecar["metadata"]["contents"] == "facts"
    loaded = load_index(path, expected_fingerprint="abc123")
    assert loaded.nprobe == 3 and loaded.kind == "ivf"
    queries = database[:20]
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RunFolderError, match="abc123.*zzz|zzz.*abc123"):
        load_index(path, expected_fingerprint="zzz")
    # a torn save (index bytes replaced, sidecar not) is refused
    build_index(database[:100]).save(tmp_path / "other.faiss")
    path.write_bytes((tmp_path / "other.faiss").read_bytes())
    with pytest.raises(RunFolderError, match="checksum"):
        load_index(path)
    with pytest.raises(RunFolderError, match="no index"):
        load_index(tmp_path / "missing.faiss")


def test_model_fingerprint_tracks_weights():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    second = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    second.load_state_dict(first.state_dict())
    assert model_fingerprint(first) == model_fingerprint(second)
    with torch.no_grad():
        second[0].weight[0, 0] += 1e-6
    assert model_fingerprint(first) != model_fingerprint(second)


def test_bad_inputs():
    with pytest.raises(TripletsError, match="kind"):
        build_index(np.ones((5, 3)), kind="lsh")
    with pytest.raises(TripletsError, match="NaN"):
        build_index(np.full((5, 3), np.nan))
    index = build_index(np.eye(4))
    with pytest.raises(TripletsError, match="4-dimensional"):
        index.search(np.ones((2, 3)), 1)
    with pytest.raises(TripletsError, match="k must"):
        index.search(np.ones((2, 4)), 0)
    with pytest.raises(TripletsError, match="use_gpu=True"):
        build_index(np.eye(4), use_gpu=True)


class _FakeGpuFaiss:
    """Stands in for a GPU build of faiss: records the copy to the GPUs, searches on the CPU copy."""

    def __init__(self, real):
        self._real = real
        self.copied = []
        self.StandardGpuResources = object

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 1

    def index_cpu_to_all_gpus(self, index):
        self.copied.append(index)
        return self._real.clone_index(index)


def test_gpu_index_used_transparently(monkeypatch, tmp_path):
    import faiss

    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setattr(index_module, "_faiss", lambda: fake)
    rng = np.random.default_rng(5)
    database = rng.normal(size=(200, 8))
    index = build_index(database)  # use_gpu="auto": GPU seen → moved there
    assert index.on_gpu and len(fake.copied) == 1
    _, ids = index.search(database[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    hnsw = build_index(database, kind="hnsw")  # FAISS has no GPU HNSW: stays on the CPU
    assert not hnsw.on_gpu
    path = index.save(tmp_path / "gpu.faiss")  # the CPU index is what is written
    monkeypatch.setattr(index_module, "_faiss", lambda: faiss)
    assert not load_index(path).on_gpu
