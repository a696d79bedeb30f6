"""The blocked-GEMM exact search equals the float64 brute force: random data, k > n, k = n, ties
across block boundaries, clear errors; the backend choice (rule, override, config validation)."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triplets.errors import TripletsError
from triplets.index import SCORERS
from triplets.index import exact_search as exact_search_with
from triplets.index import (build_index, choose_exact_backend, exact_search, load_index, multiply_transposed,
                            normalize_rows, score_blocks)


def _reference(queries, database, k):
    """Float64 brute force on the same float32 unit rows: per query, ids by (score desc, id asc)."""
    q = normalize_rows(queries).astype(np.float64)
    x = normalize_rows(database).astype(np.float64)
    scores = q @ x.T
    ids = np.broadcast_to(np.arange(len(x)), scores.shape)
    order = np.lexsort((ids, -scores), axis=1)[:, : min(k, len(x))]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("scorer", ["faiss", "blas", "torch"])
@pytest.mark.parametrize("count,dim,queries,k,block_bytes,query_block", [
    (5000, 64, 200, 10, 1 << 27, 1024),        # one block
    (5000, 64, 200, 1, 4 * 64 * 700, 64),      # query and database blocks, last ones partial
    (1000, 32, 50, 10, 4 * 16 * 40, 16),
    (257, 7, 33, 5, 4 * 3 * 17, 3),            # blocks of 17 rows: many boundaries
])
def test_equals_float64_brute_force_across_block_sizes(count, dim, queries, k, block_bytes, query_block, scorer):
    rng = np.random.default_rng(count + dim)
    database = rng.normal(size=(count, dim)) * rng.uniform(0.1, 10.0, size=(count, 1))  # any scale
    query_rows = rng.normal(size=(queries, dim))
    scores, ids = exact_search(query_rows, database, k, block_bytes=block_bytes, query_block=query_block, scorer=scorer)
    ref_scores, ref_ids = _reference(query_rows, database, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (queries, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [12, 13, 50])
def test_k_equal_to_or_above_the_database_size_returns_every_row_ranked(k):
    rng = np.random.default_rng(3)
    database, queries = rng.normal(size=(13, 6)), rng.normal(size=(4, 6))
    scores, ids = exact_search(queries, database, k, block_bytes=4 * 4 * 5, query_block=4)
    assert ids.shape == (4, min(k, 13))
    np.testing.assert_array_equal(ids, _reference(queries, database, k)[1])
    if k >= 13:
        assert all(sorted(row) == list(range(13)) for row in ids.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("scorer", SCORERS)
def test_ties_come_out_in_ascending_id_order_across_block_boundaries(scorer):
    """Copies of one vector at rows 3, 40, 41, 77 and 99 (in different database blocks of 10 rows)
    tie exactly in float64; a query equal to it gets them first, lowest id first, and with k = 3
    only the three lowest of the five tied rows (the cut falls inside the tie). Their float32
    scores may differ in the last bit with the row's place in a block; with no margin at all,
    the completeness check widens the search until the float64 re-scoring sees every tied row."""
    exact_search = partial(exact_search_with, scorer=scorer)
    rng = np.random.default_rng(11)
    database = rng.normal(size=(100, 16)).astype(np.float32)
    copies = [3, 40, 41, 77, 99]
    database[copies] = database[77]
    query = database[77:78] * 2.5
    for block_bytes in (4 * 10, 4 * 1000):
        _, ids = exact_search(query, database, 3, block_bytes=block_bytes, query_block=1, margin=0)
        assert ids[0].tolist() == [3, 40, 41]
        _, ids = exact_search(query, database, 7, block_bytes=block_bytes, query_block=1, margin=0)
        assert ids[0, :5].tolist() == copies
    many = np.repeat(database[:1], 60, axis=0)  # 60 equal rows, far more than margin + k
    _, ids = exact_search(many[:1], many, 4, block_bytes=4 * 7, query_block=1, margin=1)
    assert ids[0].tolist() == [0, 1, 2, 3]
    zeros = np.zeros((6, 4), dtype=np.float32)  # every score 0: all tied, ids ascending
    _, ids = exact_search(np.ones((2, 4)), zeros, 4, block_bytes=8, query_block=1)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 60), queries=st.integers(1, 9), dim=st.integers(1, 6), k=st.integers(1, 70),
       block=st.integers(4, 40), query_block=st.integers(1, 5), seed=st.integers(0, 2**16),
       duplicates=st.booleans())
def test_property_equals_float64_brute_force(count, queries, dim, k, block, query_block, seed, duplicates):
    rng = np.random.default_rng(seed)
    database = rng.normal(size=(count, dim))
    if duplicates and count > 2:
        database[rng.integers(0, count, count // 2)] = database[0]  # often more copies than the margin
    query_rows = rng.normal(size=(queries, dim))
    _, ids = exact_search(query_rows, database, k, block_bytes=4 * block * query_block, query_block=query_block)
    np.testing.assert_array_equal(ids, _reference(query_rows, database, k)[1])


def test_bad_input_gives_one_clear_error():
    database = np.ones((5, 3), dtype=np.float32)
    with pytest.raises(TripletsError, match="query set is empty"):
        exact_search(np.zeros((0, 3)), database, 2)
    with pytest.raises(TripletsError, match="database is empty"):
        exact_search(np.ones((2, 3)), np.zeros((0, 3)), 2)
    bad = database.copy()
    bad[2, 1] = np.nan
    with pytest.raises(TripletsError, match="NaN or infinite"):
        exact_search(np.ones((2, 3)), bad, 2)
    with pytest.raises(TripletsError, match="NaN or infinite"):
        exact_search(np.array([[1.0, np.inf, 0.0]]), database, 2)
    with pytest.raises(TripletsError, match="NaN or infinite"):  # the in-place path checks too
        exact_search(np.ones((1, 3), np.float32), bad, 2, normalized=True)
    with pytest.raises(TripletsError, match="k must be a positive integer"):
        exact_search(np.ones((2, 3)), database, 0)
    with pytest.raises(TripletsError, match="4-dimensional but the database is 3-dimensional"):
        exact_search(np.ones((2, 4)), database, 1)


def test_single_query_vector_and_score_blocks():
    rng = np.random.default_rng(2)
    database, query = rng.normal(size=(30, 5)), rng.normal(size=5)
    _, ids = exact_search(query, database, 4)
    np.testing.assert_array_equal(ids, _reference(query[None], database, 4)[1])
    import torch

    q = torch.from_numpy(normalize_rows(rng.normal(size=(11, 5))))
    x = torch.from_numpy(normalize_rows(database))
    for gemm in ("blas", "torch"):
        seen = []
        for start, stop, block in score_blocks(q, x, block_bytes=4 * 30 * 4, gemm=gemm):  # 4 rows per block
            assert block.shape == (stop - start, 30) and stop - start <= 4
            seen.append(block.clone())
        np.testing.assert_allclose(torch.cat(seen).numpy(), (q @ x.T).numpy(), atol=1e-6)


def test_multiply_transposed_writes_the_product_in_place_with_either_gemm():
    import torch

    rng = np.random.default_rng(9)
    a, b = torch.from_numpy(rng.normal(size=(7, 33)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(19, 33)).astype(np.float32))
    reference = a.double() @ b.double().T
    for gemm in ("blas", "torch"):
        out = torch.full((7, 19), float("nan"))
        assert multiply_transposed(a, b[0:19], out, gemm=gemm) is out
        np.testing.assert_allclose(out.numpy(), reference.numpy(), rtol=0, atol=1e-5)
    with pytest.raises(TripletsError, match="did you mean 'blas'"):
        exact_search(a.numpy(), b.numpy(), 3, scorer="blsa")


def test_backend_rule_and_override():
    assert choose_exact_backend("auto", faiss_on_gpu=False) == "faiss-rescored"
    assert choose_exact_backend("auto", faiss_on_gpu=True) == "faiss"
    assert choose_exact_backend("faiss") == "faiss" and choose_exact_backend("torch", faiss_on_gpu=True) == "torch"
    assert choose_exact_backend("blas", faiss_on_gpu=True) == "blas"
    with pytest.raises(TripletsError, match="did you mean 'torch'"):
        choose_exact_backend("troch")


def test_flat_index_backends_agree_and_survive_save_and_load(tmp_path):
    rng = np.random.default_rng(4)
    database, queries = rng.normal(size=(500, 12)), rng.normal(size=(40, 12))
    ids = np.arange(1000, 1500)
    by_default = build_index(database, ids=ids, use_gpu=False)
    by_blas = build_index(database, ids=ids, use_gpu=False, exact_backend="blas")
    by_torch = build_index(database, ids=ids, use_gpu=False, exact_backend="torch")
    by_faiss = build_index(database, ids=ids, use_gpu=False, exact_backend="faiss")
    assert by_blas.exact_backend == "blas" and by_torch.exact_backend == "torch" and by_faiss.exact_backend == "faiss"
    (s1, i1), (s2, i2), (s3, i3) = by_blas.search(queries, 10), by_faiss.search(queries, 10), by_torch.search(queries, 10)
    np.testing.assert_array_equal(i1, 1000 + _reference(queries, database, 10)[1])
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_array_equal(s1, s3)     # both re-score the same candidates in float64
    assert by_default.exact_backend == "faiss-rescored"
    s4, i4 = by_default.search(queries, 10)
    np.testing.assert_array_equal(i4, i1)
    np.testing.assert_array_equal(s4, s1)
    loaded = load_index(by_default.save(tmp_path / "flat.faiss"), use_gpu=False)
    assert loaded.exact_backend == "faiss-rescored"
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], i1)
    assert build_index(database, kind="hnsw", use_gpu=False).exact_backend is None


def test_eval_config_exact_backend_is_validated():
    from triplets.config import ConfigError, from_dict
    from triplets.facts.train_config import TrainConfig

    config = from_dict(TrainConfig, {"eval": {"exact_backend": "faiss"}})
    assert config.eval.exact_backend == "faiss" and TrainConfig().eval.exact_backend == "auto"
    with pytest.raises(ConfigError, match="did you mean 'torch'"):
        from_dict(TrainConfig, {"eval": {"exact_backend": "torhc"}})
    assert from_dict(TrainConfig, {"eval": {"exact_backend": "blas"}}).eval.exact_backend == "blas"


@pytest.mark.parametrize("scorer", SCORERS)
def test_near_ties_below_float32_resolution_are_ranked_as_in_float64(scorer):
    """40 vectors within 10⁻⁶ of each other (closer than float32 products can tell apart, further
    than float64's rounding): with no margin the completeness check widens the search, and the
    order is the float64 one."""
    exact_search = partial(exact_search_with, scorer=scorer)
    rng = np.random.default_rng(21)
    base = rng.normal(size=256)
    database = np.concatenate([rng.normal(size=(500, 256)), base + 1e-6 * rng.normal(size=(40, 256))])
    query = (base + 0.01 * rng.normal(size=256))[None, :]
    for margin in (0, 8):
        _, ids = exact_search(query, database, 10, margin=margin, block_bytes=4 * 64)
        np.testing.assert_array_equal(ids, _reference(query, database, 10)[1])
