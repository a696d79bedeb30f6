"""IVF and IVF-PQ: the one trainer, the one ``nprobe`` calibration and the one exact re-ranking,
shared by in-memory indexes (:func:`triplets.index.build_index`) and shards on disk
(:func:`triplets.index.build_sharded_index`)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch

from ..errors import TripletsError
from . import common
from .common import drop_self, normalize_rows, recall_at_k
from .exact import TopKAccumulator, rescore

RERANK_ROWS = 256


def training_rows(count: int, nlist: int, *, pq_bits: int = 8, train_size: int | None = None,
                  train_points_per_cell: int = 64, seed: int = 0) -> np.ndarray:
    """Sorted rows (int64) of the sample an IVF / IVF-PQ index is trained on.

    Size: ``min(count, train_size)`` when ``train_size`` is given, else
    ``min(count, max(train_points_per_cell·nlist, 64·2**pq_bits))`` (enough points per
    k-means centre for the cells and for each sub-quantizer's 2**pq_bits centroids; pass
    ``pq_bits=0`` for IVF-Flat), drawn without replacement by
    ``numpy.random.default_rng(seed)``. Bounding the sample bounds the build's memory: the
    sample is the only float32 block held besides one chunk.
    """
    if train_size is not None:
        if isinstance(train_size, bool) or int(train_size) < 1:
            raise TripletsError(f"train_size must be a positive integer, got {train_size!r}")
        size = min(count, int(train_size))
    else:
        size = min(count, max(int(train_points_per_cell) * int(nlist), 64 * 2 ** int(pq_bits)))
    if size >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=size, replace=False)).astype(np.int64)


def calibration_rows(count: int, calibration_queries: int, seed: int) -> np.ndarray:
    """Sorted rows (int64) of the indexed vectors used as queries to calibrate ``nprobe``:
    ``min(calibration_queries, count)`` drawn by ``numpy.random.default_rng(seed + 1)``."""
    size = min(int(calibration_queries), count)
    if size < 1:
        raise TripletsError(f"calibration_queries must be positive, got {calibration_queries}")
    return np.sort(np.random.default_rng(seed + 1).choice(count, size=size, replace=False)).astype(np.int64)


def trained_ivf(sample: np.ndarray, *, kind: str, nlist: int, pq_m: int = 0, pq_bits: int = 8, seed: int = 0,
                kmeans_iterations: int = 10) -> Any:
    """An empty IndexIVFPQ ("ivfpq") or IndexIVFFlat ("ivf") over inner product, trained on ``sample``
    (unit rows): k-means (``kmeans_iterations`` iterations, seed ``seed``) on the whole sample for
    the ``nlist`` cells, then for "ivfpq" the PQ codebooks on the sample's residuals."""
    faiss = common._faiss()
    dim = sample.shape[1]
    needed = max(int(nlist), 2 ** int(pq_bits) if kind == "ivfpq" else 0)
    if len(sample) < needed:
        raise TripletsError(
            f"a {kind} index with nlist={nlist}" + (f" and {pq_bits}-bit codes" if kind == "ivfpq" else "")
            + f" needs at least {needed} vectors to train, got {len(sample)}; use kind='flat' for so few")
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, int(pq_m), int(pq_bits), faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = int(seed)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.niter = int(kmeans_iterations)
    index.cp.max_points_per_centroid = int(math.ceil(len(sample) / nlist)) + 1  # use the whole sample
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def ivf_metadata(ivf: Any, *, kind: str, nlist: int, train_rows: int, seed: int, kmeans_iterations: int,
                 train_points_per_cell: int) -> dict[str, Any]:
    """The training facts kept in an IVF index's metadata (cells, sample, seed, code size, PQ shape)."""
    meta: dict[str, Any] = dict(nlist=int(nlist), kmeans_iterations=int(kmeans_iterations),
                                train_points_per_cell=int(train_points_per_cell), train_rows=int(train_rows),
                                seed=int(seed), code_size=int(ivf.code_size))
    if kind == "ivfpq":
        meta.update(pq_m=int(ivf.pq.M), pq_bits=int(ivf.pq.nbits))
    return meta


def calibration_neighbours(queries: np.ndarray, k: int) -> TopKAccumulator:
    """An accumulator of the exact top ``k + 1`` indexed rows of the calibration ``queries`` (which
    are indexed rows themselves, so their own row comes first); feed it every indexed chunk."""
    return TopKAccumulator(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), k + 1)


def calibrate_nprobe_by_cells(quantizer: Any, queries: np.ndarray, neighbour_cells: np.ndarray, nlist: int,
                              target_recall: float) -> tuple[int, float]:
    """Smallest nprobe in (1, 2, 4, …, nlist) whose probed cells hold ≥ ``target_recall`` of the neighbours.

    ``neighbour_cells[q, j]``: the cell of query q's j-th exact neighbour (−1: none). A query
    probes its ``nprobe`` best cells by the coarse quantizer's own ranking; the cell recall
    is the fraction of neighbours lying in probed cells: the recall@k of IVF-Flat with this
    quantizer, and an upper bound of IVF-PQ's (whose codes also reorder candidates).
    Returns (nprobe, cell recall at that nprobe).
    """
    ranks = np.full(neighbour_cells.shape, nlist, dtype=np.int64)
    for start in range(0, len(queries), 64):
        block = np.ascontiguousarray(queries[start:start + 64], dtype=np.float32)
        _, order = quantizer.search(block, nlist)
        rank_of_cell = np.full((len(block), nlist), nlist, dtype=np.int64)
        valid_order = np.where(order >= 0, order, 0)
        np.put_along_axis(rank_of_cell, valid_order, np.arange(nlist, dtype=np.int64)[None, :], axis=1)
        cells = neighbour_cells[start:start + 64]
        ranks[start:start + 64] = np.where(cells >= 0, np.take_along_axis(rank_of_cell, np.where(cells >= 0, cells, 0), axis=1), -1)
    valid = ranks >= 0
    if not valid.any():
        return 1, 1.0
    candidates = sorted({min(nlist, 2 ** p) for p in range(0, int(math.ceil(math.log2(max(nlist, 1)))) + 1)} | {nlist})
    recall = 0.0
    for nprobe in candidates:
        recall = float((ranks[valid] < nprobe).mean())
        if recall >= target_recall:
            return int(nprobe), recall
    return int(nlist), recall


def calibrate_ivf(index: Any, quantizer: Any, query_rows: np.ndarray, neighbours: TopKAccumulator,
                  read_rows: Callable[[np.ndarray], np.ndarray], nlist: int, target_recall: float) -> dict[str, Any]:
    """nprobe by :func:`calibrate_nprobe_by_cells`, then the end-to-end recall@10 of ``index`` there.

    ``neighbours``: exact top k+1 (:func:`calibration_neighbours`) of the calibration queries
    (the indexed rows ``query_rows``) over every indexed vector; ``read_rows(sorted rows)``
    returns those indexed vectors so their cells can be looked up. Self matches are excluded
    throughout. Sets ``nprobe`` on ``index`` and returns the metadata entries.
    """
    faiss = common._faiss()
    k = neighbours.keep - 1
    if k < 1:
        return dict(nprobe=nlist, calibrated_cell_recall_at_10=1.0, calibrated_recall_at_10=1.0,
                    target_recall=target_recall)
    queries = neighbours.queries.numpy()
    truth = drop_self(neighbours.best_ids(), query_rows, k)
    wanted = np.unique(truth[truth >= 0])
    cells_of_wanted = quantizer.assign(normalize_rows(np.asarray(read_rows(wanted))), 1)[:, 0]
    neighbour_cells = np.where(truth >= 0, cells_of_wanted[np.searchsorted(wanted, np.where(truth >= 0, truth, wanted[0]))], -1)
    nprobe, cell_recall = calibrate_nprobe_by_cells(quantizer, queries, neighbour_cells, nlist, target_recall)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
    recall = recall_at_k(drop_self(np.asarray(found), query_rows, k), truth)
    return dict(nprobe=int(nprobe), calibrated_cell_recall_at_10=cell_recall, calibrated_recall_at_10=recall,
                target_recall=target_recall)


def warn_unclustered(nprobe: int, nlist: int, target_recall: float) -> None:
    """Warn when calibration needed more than a quarter of the cells: IVF gains nothing there."""
    if nprobe > max(1, nlist // 4):
        warnings.warn(
            f"IVF needs nprobe={nprobe} of nlist={nlist} cells for recall@10 ≥ {target_recall}: these vectors "
            "have no cluster structure for IVF to use, and a flat index will be faster", stacklevel=3)


def rerank_exact(queries: np.ndarray, candidates: np.ndarray, vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking of approximate candidates: the best ``k`` of each query's ``candidates``
    (rows, −1 = none) by float64 inner product with ``vectors[row]`` (unit rows; an array or
    memmap, read as sorted distinct rows per 256 queries), equal scores by ascending row.
    Returns (scores float32 [q, k], rows int64 [q, k]), −inf / −1 where fewer were found."""
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows_out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), RERANK_ROWS):
        block = np.asarray(candidates[start:start + RERANK_ROWS], dtype=np.int64)
        found = block >= 0
        wanted = np.unique(block[found])
        if len(wanted) == 0:
            continue
        rows = np.ascontiguousarray(vectors[wanted], dtype=np.float32)  # sorted reads from a memmap
        local = np.where(found, np.searchsorted(wanted, np.where(found, block, wanted[0])), -1)
        query_block = torch.from_numpy(np.ascontiguousarray(queries[start:start + RERANK_ROWS], dtype=np.float32))
        scores, picked = rescore(query_block, torch.from_numpy(local), torch.from_numpy(rows), min(k, block.shape[1]))
        picked_np = picked.numpy()
        width = picked_np.shape[1]
        scores_out[start:start + len(block), :width] = scores.numpy().astype(np.float32)
        rows_out[start:start + len(block), :width] = np.where(picked_np >= 0, wanted[np.maximum(picked_np, 0)], -1)
    return scores_out, rows_out
