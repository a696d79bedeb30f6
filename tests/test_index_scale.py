"""Indexes past RAM: IVF-PQ recall and bytes per vector, shards on disk equal to one index, chunked
input, memory-mapped loading, exact re-ranking, bad folders and interrupted builds."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import mas_core.checkpoint as checkpoint_module
from triplets.errors import RunFolderError, TripletsError
from triplets.index import (
    MANIFEST_NAME,
    ShardedFactIndex,
    build_index,
    build_sharded_index,
    default_pq_m,
    load_index,
    load_sharded_index,
    normalize_rows,
    pq_m_choices,
    shard_bounds,
)

COUNT, DIM, PQ_M, QUERIES = 20_000, 64, 8, 200


def _embedding_like(rng, count, dim, clusters=40, spread=0.35, intrinsic=8, extra_queries=0):
    """Gaussian-mixture vectors whose within-cluster variation spans ``intrinsic`` random directions
    (as real embeddings vary along few); with extra_queries, held-out queries from the same mixture."""
    centres = rng.normal(size=(clusters, dim))
    basis = rng.normal(size=(intrinsic, dim))
    total = count + extra_queries
    data = centres[rng.integers(0, clusters, total)] + spread * rng.normal(size=(total, intrinsic)) @ basis
    data = data.astype(np.float32)
    return data[:count], data[count:]


def _exact_ids(database, queries, k):
    scores = normalize_rows(queries) @ normalize_rows(database).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist())]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    database, queries = _embedding_like(rng, COUNT, DIM, extra_queries=QUERIES)
    return database, queries, _exact_ids(database, queries, 10)


@pytest.fixture(scope="module")
def single(data):
    """One in-memory IVF-PQ index (nprobe calibrated)."""
    return build_index(data[0], kind="ivfpq", pq_m=PQ_M, use_gpu=False)


@pytest.fixture(scope="module")
def sharded_dir(data, tmp_path_factory):
    """The same vectors as three shard files, built from the in-memory array in 3,000-row chunks."""
    folder = tmp_path_factory.mktemp("sharded")
    build_sharded_index(data[0], folder, num_shards=3, pq_m=PQ_M, chunk_rows=3000, fingerprint="model-a")
    return folder


def test_ivfpq_recall_and_calibration(data, single):
    database, queries, truth = data
    _, ids = single.search(queries, 10)
    recall = _recall(ids, truth)
    # 8-byte codes of 64-d vectors: the IVF stage finds the neighbours' cells (cell recall ≥ 0.95 by
    # calibration), PQ's coding error then costs about a third of them on these vectors (measured 0.67)
    assert recall >= 0.55, f"IVF-PQ recall@10 {recall:.3f}"
    meta = single.metadata
    assert meta["pq_m"] == PQ_M and meta["pq_bits"] == 8 and meta["code_size"] == PQ_M
    assert meta["calibrated_cell_recall_at_10"] >= 0.95
    calibrated = single.nprobe
    assert 1 <= calibrated < meta["nlist"] // 4
    # the calibrated nprobe loses little against scanning every cell
    single.nprobe = meta["nlist"]
    _, exhaustive = single.search(queries, 10)
    single.nprobe = calibrated
    assert _recall(exhaustive, truth) - recall <= 0.05
    # re-ranking 4·k candidates by their exact inner product recovers almost all of it (measured 0.98)
    refined = build_index(database, kind="ivfpq", pq_m=PQ_M, refine_factor=4, use_gpu=False)
    scores, refined_ids = refined.search(queries, 10)
    assert _recall(refined_ids, truth) >= 0.9
    exact = np.einsum("qd,qkd->qk", normalize_rows(queries), normalize_rows(database)[refined_ids])
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_bytes_per_vector(single):
    assert single.code_bytes_per_vector == PQ_M + 8  # code + int64 id in the inverted lists
    # plus the coarse centroids (nlist·d·4) and PQ codebooks (d·256·4) shared by all vectors
    shared = (single.metadata["nlist"] * DIM * 4 + DIM * 256 * 4) / COUNT
    assert PQ_M + 8 <= single.bytes_per_vector <= PQ_M + 8 + shared + 2
    flat = build_index(np.eye(DIM).repeat(10, axis=0), use_gpu=False)
    assert flat.bytes_per_vector == pytest.approx(4 * DIM, rel=0.05)
    assert single.bytes_per_vector < 4 * DIM / 5


def test_pq_m_must_divide_dim(data):
    assert pq_m_choices(12) == [1, 2, 3, 4, 6, 12]
    assert default_pq_m(384) == 48 and default_pq_m(1152) == 144 and default_pq_m(64) == 8
    with pytest.raises(TripletsError, match=r"pq_m=7 does not divide the dimension 64.*1, 2, 4, 8, 16, 32, 64"):
        build_index(data[0][:2000], kind="ivfpq", pq_m=7)
    with pytest.raises(TripletsError, match="pq_bits"):
        build_index(data[0][:2000], kind="ivfpq", pq_m=8, pq_bits=0)


def test_ivfpq_save_load_round_trip(single, data, tmp_path):
    path = single.save(tmp_path / "pq.faiss")
    loaded = load_index(path, use_gpu=False)
    assert loaded.kind == "ivfpq" and loaded.nprobe == single.nprobe
    for a, b in zip(single.search(data[1], 10), loaded.search(data[1], 10)):
        np.testing.assert_array_equal(a, b)


def test_shards_equal_the_single_index(data, single, sharded_dir):
    _, queries, _ = data
    index = load_sharded_index(sharded_dir, use_gpu=False)
    assert isinstance(index, ShardedFactIndex) and index.count == COUNT and index.dim == DIM
    manifest = json.loads((sharded_dir / MANIFEST_NAME).read_text())
    assert [s["count"] for s in manifest["shards"]] == [6666, 6667, 6667]
    # same sample, same training, same calibration → same metadata, and the shards' lists together are
    # exactly the single index's lists, so every score and id agrees (ties included: faiss orders by id)
    for key in ("nlist", "nprobe", "calibrated_cell_recall_at_10", "calibrated_recall_at_10", "train_rows"):
        assert index.metadata[key] == single.metadata[key], key
    calibrated = single.nprobe
    for nprobe in (1, calibrated, 64):
        index.nprobe = nprobe
        single.nprobe = nprobe
        single_scores, single_ids = single.search(queries, 10)
        shard_scores, shard_ids = index.search(queries, 10)
        np.testing.assert_array_equal(shard_ids, single_ids)
        np.testing.assert_array_equal(shard_scores, single_scores)
    single.nprobe = calibrated


def test_shard_files_hold_global_id_ranges(sharded_dir):
    manifest = json.loads((sharded_dir / MANIFEST_NAME).read_text())
    assert [(s["first_id"], s["end_id"]) for s in manifest["shards"]] == shard_bounds(COUNT, 3)
    for entry in manifest["shards"]:
        shard = faiss.read_index(str(sharded_dir / entry["file"]))
        lists = faiss.extract_index_ivf(shard).invlists
        ids = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(cell), lists.list_size(cell)).copy()
                              for cell in range(lists.nlist) if lists.list_size(cell)])
        assert np.array_equal(np.sort(ids), np.arange(entry["first_id"], entry["end_id"]))


def test_mmap_and_in_ram_loading_agree(data, sharded_dir, tmp_path):
    mapped = load_sharded_index(sharded_dir, mmap=True, use_gpu=False)
    in_ram = load_sharded_index(sharded_dir, mmap=False, use_gpu=False)
    lists = faiss.extract_index_ivf(mapped._shards[0]).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)  # memory-mapped file
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(in_ram._shards[0]).invlists),
                      faiss.ArrayInvertedLists)
    for a, b in zip(mapped.search(data[1], 10), in_ram.search(data[1], 10)):
        np.testing.assert_array_equal(a, b)
    assert mapped.index_bytes == sum(p.stat().st_size for p in sharded_dir.glob("shard-*.faiss"))
    assert mapped.bytes_per_vector < 4 * DIM / 5

    copy = load_sharded_index(mapped.save(tmp_path / "saved"), expected_fingerprint="model-a", use_gpu=False)
    assert copy.folder == tmp_path / "saved" and len(copy.shard_paths) == 3
    for a, b in zip(mapped.search(data[1], 10), copy.search(data[1], 10)):
        np.testing.assert_array_equal(a, b)


def test_chunked_input_equals_in_memory_input(data, sharded_dir, tmp_path):
    database = data[0]
    sizes = [5000, 1, 7321, 4000]
    sizes.append(COUNT - sum(sizes))
    edges = np.cumsum([0] + sizes)
    chunks = (database[a:b].astype(np.float64) for a, b in zip(edges[:-1], edges[1:]))  # a one-shot generator
    build_sharded_index(chunks, tmp_path / "from_chunks", num_shards=3, pq_m=PQ_M, chunk_rows=3000,
                        fingerprint="model-a")
    memmap = np.lib.format.open_memmap(tmp_path / "input.npy", mode="w+", dtype=np.float32, shape=database.shape)
    memmap[:] = database
    memmap.flush()
    build_sharded_index(np.load(tmp_path / "input.npy", mmap_mode="r"), tmp_path / "from_memmap", num_shards=3,
                        pq_m=PQ_M, chunk_rows=4096, fingerprint="model-a")
    reference = json.loads((sharded_dir / MANIFEST_NAME).read_text())
    for name in ("from_chunks", "from_memmap"):
        manifest = json.loads((tmp_path / name / MANIFEST_NAME).read_text())
        assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]], name
        assert manifest["metadata"] == reference["metadata"], name
    assert not list((tmp_path / "from_chunks").glob(".*"))  # the spill file is gone


def test_sharded_refine_from_vectors_file(data, tmp_path):
    database, queries, truth = data
    build_sharded_index(database, tmp_path, num_shards=2, pq_m=PQ_M, refine_factor=4)
    index = load_sharded_index(tmp_path, use_gpu=False)
    assert index.refine_factor == 4
    scores, ids = index.search(queries, 10)
    assert _recall(ids, truth) >= 0.9
    exact = np.einsum("qd,qkd->qk", normalize_rows(queries), normalize_rows(database)[ids])
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # among 40 candidates an indexed vector finds itself, and exact re-ranking puts it first (score 1)
    own_scores, own = index.search(database[:50], 10)
    assert own[:, 0].tolist() == list(range(50))
    np.testing.assert_allclose(own_scores[:, 0], 1.0, atol=1e-5)
    index.refine_factor = None
    assert _recall(index.search(queries, 10)[1], truth) < _recall(ids, truth)
    assert load_sharded_index(tmp_path, refine_factor=None, use_gpu=False).refine_factor is None


def test_bad_folders(data, sharded_dir, tmp_path):
    import shutil

    with pytest.raises(RunFolderError, match="no sharded index manifest"):
        load_sharded_index(tmp_path / "nothing")
    with pytest.raises(RunFolderError, match="model-a.*model-b|model-b.*model-a"):
        load_sharded_index(sharded_dir, expected_fingerprint="model-b")
    assert load_sharded_index(sharded_dir, expected_fingerprint="model-a", use_gpu=False).fingerprint == "model-a"

    copy = tmp_path / "copy"
    shutil.copytree(sharded_dir, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    second = copy / manifest["shards"][1]["file"]
    second.unlink()
    with pytest.raises(RunFolderError, match="shard file .*-00001-of-00003.faiss.* is missing"):
        load_sharded_index(copy)
    # a truncated shard fails the size check, an altered one the checksum
    shutil.copyfile(sharded_dir / second.name, second)
    second.write_bytes(second.read_bytes()[:-100])
    with pytest.raises(RunFolderError, match="bytes, the manifest says"):
        load_sharded_index(copy)
    altered = bytearray((sharded_dir / second.name).read_bytes())
    altered[-1] ^= 0xFF
    second.write_bytes(bytes(altered))
    with pytest.raises(RunFolderError, match="checksum"):
        load_sharded_index(copy)
    # a shard of other vectors' dimension, its size and checksum matching the manifest
    other = build_index(np.random.default_rng(1).normal(size=(3000, 32)), kind="ivfpq", pq_m=4, nprobe=2)
    other.save(tmp_path / "other.faiss")
    payload = (tmp_path / "other.faiss").read_bytes()
    second.write_bytes(payload)
    import hashlib

    manifest["shards"][1].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="32-dimensional vectors, the manifest says 64"):
        load_sharded_index(copy)
    (copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        load_sharded_index(copy)
    with pytest.raises(TripletsError, match="does not divide"):
        build_sharded_index(data[0][:3000], tmp_path / "bad", pq_m=5)
    with pytest.raises(TripletsError, match="sharded index is one of"):
        build_sharded_index(data[0][:3000], tmp_path / "bad", kind="hnsw")
    with pytest.raises(TripletsError, match="chunk 1 has 3 columns"):
        build_sharded_index(iter([np.ones((5, 4)), np.ones((5, 3))]), tmp_path / "bad")
    assert not list((tmp_path / "bad").iterdir())


def test_interrupted_build_leaves_no_partial_files(data, tmp_path, monkeypatch):
    database = data[0][:6000]
    folder = tmp_path / "index"
    build_sharded_index(database, folder, num_shards=3, pq_m=PQ_M, nlist=32, nprobe=4)  # a previous, complete index
    real_atomic_write = checkpoint_module._atomic_write
    calls = []

    def dies_while_writing_the_second_shard(path, data_bytes):
        calls.append(path)
        if len(calls) < 2:
            return real_atomic_write(path, lambda handle: handle.write(data_bytes))

        def write_half_then_die(handle):
            handle.write(data_bytes[: len(data_bytes) // 2])
            raise KeyboardInterrupt("killed")
        return real_atomic_write(path, write_half_then_die)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", dies_while_writing_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_sharded_index(database, folder, num_shards=3, pq_m=PQ_M, nlist=32, nprobe=4, refine_factor=2)
    assert len(calls) == 2
    assert list(folder.iterdir()) == []  # no manifest, no shard, no *.tmp, no vectors file
    with pytest.raises(RunFolderError, match="no sharded index manifest"):
        load_sharded_index(folder)
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", lambda path, payload: real_atomic_write(
        path, lambda handle: handle.write(payload)))
    build_sharded_index(database, folder, num_shards=3, pq_m=PQ_M, nlist=32, nprobe=4)  # a rerun completes
    assert load_sharded_index(folder, use_gpu=False).count == 6000


class _FakeMultiGpuFaiss:
    """Stands in for faiss-gpu with two GPUs: records the cloner options, searches a CPU copy."""

    class GpuMultipleClonerOptions:
        shard = False

    def __init__(self, real):
        self._real = real
        self.cloned = []
        self.StandardGpuResources = object

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 2

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.cloned.append((index, co))
        return self._real.clone_index(index)

    def GpuParameterSpace(self):  # noqa: N802 (faiss's name)
        return self._real.ParameterSpace()


def test_sharded_index_goes_to_all_gpus_as_shards(data, sharded_dir, monkeypatch):
    """The multi-GPU path with a stand-in faiss (no GPU here; untested on hardware): the shards are
    merged into one IVF index with every global id and cloned with GpuMultipleClonerOptions(shard=True)."""
    import triplets.index.common as index_module

    cpu = load_sharded_index(sharded_dir, use_gpu=False)
    fake = _FakeMultiGpuFaiss(faiss)
    monkeypatch.setattr(index_module, "_faiss", lambda: fake)
    on_gpus = load_sharded_index(sharded_dir, use_gpu="auto")
    assert on_gpus.on_gpu and len(fake.cloned) == 1
    merged, options = fake.cloned[0]
    assert options.shard is True and merged.ntotal == COUNT
    on_gpus.nprobe = cpu.nprobe = 16
    for a, b in zip(cpu.search(data[1], 10), on_gpus.search(data[1], 10)):
        np.testing.assert_array_equal(a, b)
