"""Retrieval metrics as continual vision–language papers report them (CLIP-style R@K, MRR).

:mod:`triplets.facts.evaluate` keeps the lifelong-fact-learning paper's metrics (top-K with
Sherlock's order-aware groups, whose MRR forgives the other members of a fact's group, and
fact → image mAP); this module adds the strict retrieval figures of CTP, ZSCL, TiC-CLIP and
the CLIP-style benchmarks. All scores are cosines, computed exactly as in
:mod:`triplets.facts.evaluate` (image rows L2-normalised, fact vectors divided by their norms on the
scores, float32 blocked products of :func:`triplets.index.score_blocks`), and ties are broken
against the ground truth (an all-equal scorer scores no better than the worst order). Equal
vectors always score equal (:func:`first_equal_rows`).

Image → fact (:func:`image_to_fact_recall`). Each test region (image) i with true fact g_i is a
query; the candidate facts C (the task's own facts in standard mode, every task's in generalized
mode) are ranked by cosine with it, and

    rank_i   = 1 + #{c ∈ C, c ≠ g_i : s(i, c) ≥ s(i, g_i)}
    R@K      = (1/n) Σ_i [rank_i ≤ K]                (``i2f_r1``, ``i2f_r5``, ``i2f_r10``)
    MRR      = (1/n) Σ_i 1 / rank_i                  (``i2f_mrr``)

over the n test regions: only the true fact counts (for an <S,P,O> fact whose triple is unique
this is Sherlock's top-K; for <S> and <S,P> facts Sherlock's groups are more lenient).

Fact → image (:func:`fact_to_image_recall`). Each candidate fact f with at least one test region
of its own (P_f = its positive regions, N_f the other regions of the evaluated set) is a query;
the regions are ranked by cosine with f, and, as text → image R@K in CLIP-style papers (a hit
when any relevant item is among the first K),

    rank_f   = 1 + #{i ∈ N_f : s(f, i) ≥ max_{p ∈ P_f} s(f, p)}
    R@K      = (1/m) Σ_f [rank_f ≤ K]                (``f2i_r1``, ``f2i_r5``, ``f2i_r10``)

over the m facts with a positive region. mAP@10 is :mod:`triplets.facts.evaluate`'s ``map_at_10``:
per fact AP@10 = (1 / min(10, |P_f|)) Σ_{k ≤ 10, region at k positive} precision@k (regions
sorted by score, ties against the positives), averaged over the same m facts.

:func:`average_precision` and :func:`average_precision_at_k` are the dense reference
definitions (numpy, one row per query) that the blocked computations are tested against.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import TripletsError
from ..index import normalize_rows, score_blocks

FIELD_KS = (1, 5, 10)
IMAGE_TO_FACT_FIELD_KEYS = ("i2f_r1", "i2f_r5", "i2f_r10", "i2f_mrr")
FACT_TO_IMAGE_FIELD_KEYS = ("f2i_r1", "f2i_r5", "f2i_r10")
FIELD_KEYS = IMAGE_TO_FACT_FIELD_KEYS + FACT_TO_IMAGE_FIELD_KEYS
BLOCK_BYTES = 1 << 26   # float32 scores of one block (64 MiB; the masks and comparisons add at most as much again)


def row_hashes(vectors: np.ndarray) -> np.ndarray:
    """int64 [n]: a hash of each row's bytes (equal rows, equal hashes; within this process)."""
    return np.fromiter((hash(row.tobytes()) for row in np.ascontiguousarray(vectors)), dtype=np.int64,
                       count=len(vectors))


def first_equal_rows(vectors: np.ndarray, rows: np.ndarray | None = None,
                     hashes: np.ndarray | None = None) -> torch.Tensor | None:
    """For each of ``rows`` (default: all) of ``vectors``, the position in ``rows`` of the first one
    with exactly the same values (int64 [len(rows)]), or None when all differ. ``hashes``:
    :func:`row_hashes` of those rows, when known. Equal vectors must score equal: a blocked GEMM
    may round the products of two equal columns differently (by their place in a block), so
    their scores are copied from one."""
    rows = np.arange(len(vectors)) if rows is None else rows
    if len(rows) < 2:
        return None
    hashes = row_hashes(vectors[rows]) if hashes is None else hashes
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    representative = first[inverse.reshape(-1)]
    copies = np.flatnonzero(representative != np.arange(len(rows)))
    if copies.size == 0:
        return None
    same = (vectors[rows[copies]] == vectors[rows[representative[copies]]]).all(axis=1)  # not a collision?
    representative[copies[~same]] = copies[~same]
    if (representative == np.arange(len(rows))).all():
        return None
    return torch.from_numpy(representative.astype(np.int64))


def checked_fact_ids(values: Any, count: int, name: str) -> np.ndarray:
    """``values`` (an array or any iterable) as int64 fact ids in ``0..count−1``; ``TripletsError``
    naming ``name`` otherwise (both retrieval directions and :mod:`triplets.facts.evaluate` check ids so)."""
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TripletsError(f"{name} must be a 1-D array of integer fact ids, got dtype {array.dtype} shape {array.shape}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= count):
        raise TripletsError(f"{name} hold fact ids outside 0..{count - 1}; the data and the fact list disagree")
    return array


def candidate_score_blocks(images: np.ndarray, table: Any, candidates: np.ndarray,
                           block_bytes: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, scores)`` blocks of the cosines [stop − start, |candidates|] of unit ``images``
    with the candidate facts of ``table`` ((image · v)/‖v‖), equal fact vectors given equal columns
    (:func:`first_equal_rows`), computed by :func:`triplets.index.score_blocks`."""
    every_fact = len(candidates) == len(table.vectors)          # candidates = 0..F−1: no copy
    rows = torch.from_numpy(table.vectors if every_fact else np.ascontiguousarray(table.vectors[candidates]))
    scale = torch.from_numpy(table.inverse_norms if every_fact
                             else np.ascontiguousarray(table.inverse_norms[candidates]))
    equal_facts = first_equal_rows(table.vectors, candidates, table.hashes()[candidates])
    for start, stop, scores in score_blocks(torch.from_numpy(images), rows, block_bytes=block_bytes):
        scores.mul_(scale)
        yield start, stop, (scores if equal_facts is None else scores.index_select(1, equal_facts))


def _checked(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any) -> tuple[np.ndarray, np.ndarray]:
    images = normalize_rows(image_embeddings, name="image embeddings")
    if images.shape[1] != table.vectors.shape[1]:
        raise TripletsError(f"image embeddings are {images.shape[1]}-d but fact embeddings {table.vectors.shape[1]}-d")
    truth = checked_fact_ids(image_fact_ids, len(table.vectors), "image fact ids")
    if len(truth) != len(images) or len(images) == 0:
        raise TripletsError(f"{len(images)} image embeddings and {len(truth)} fact ids: need as many, at least one")
    return images, truth


def image_to_fact_ranks(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any,
                        candidate_fact_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """int64 [n]: each image's rank of its true fact among the candidates (module docstring:
    ``1 + #{c ≠ g : s(i, c) ≥ s(i, g)}``). ``table``: a :class:`triplets.facts.evaluate.FactTable`
    (``vectors`` [F, D], ``inverse_norms`` [F], ``hashes()``), indexed by fact id."""
    images, truth = _checked(image_embeddings, image_fact_ids, table)
    candidates = np.unique(checked_fact_ids(candidate_fact_ids, len(table.vectors), "candidate fact ids"))
    position = np.searchsorted(candidates, truth)
    if (position >= len(candidates)).any() or (candidates[np.minimum(position, len(candidates) - 1)] != truth).any():
        raise TripletsError("some ground-truth facts are not among the candidates; use the task's facts or "
                            "generalized mode")
    rank = np.empty(len(images), dtype=np.int64)
    for start, stop, scores in candidate_score_blocks(images, table, candidates, BLOCK_BYTES):
        truth_scores = scores[torch.arange(stop - start), torch.from_numpy(position[start:stop])]
        rank[start:stop] = (scores >= truth_scores[:, None]).sum(dim=1).numpy()   # the truth counts itself: 1 + …
    return rank


def image_to_fact_recall(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any,
                         candidate_fact_ids: Sequence[int] | np.ndarray,
                         ks: Sequence[int] = FIELD_KS) -> dict[str, float]:
    """``{"i2f_r{K}": R@K for K in ks, "i2f_mrr": MRR}`` of ranking the candidate facts for each
    image (module docstring), fractions in [0, 1]."""
    rank = image_to_fact_ranks(image_embeddings, image_fact_ids, table, candidate_fact_ids)
    result = {f"i2f_r{int(k)}": float((rank <= int(k)).mean()) for k in ks}
    result["i2f_mrr"] = float((1.0 / rank).mean())
    return result


def fact_to_image_ranks(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any,
                        fact_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(queries [m], rank [m])``: the facts of ``fact_ids`` with at least one positive image
    (sorted) and, per fact, the rank of its best-ranked positive among the images
    (``1 + #{negatives scoring ≥ the best positive}``)."""
    images, truth = _checked(image_embeddings, image_fact_ids, table)
    queries = np.unique(checked_fact_ids(fact_ids, len(table.vectors), "fact ids"))
    queries = queries[np.isin(queries, truth)]
    if queries.size == 0:
        raise TripletsError("none of the facts has a positive image; evaluate on a split with images of these facts")
    query_rows = torch.from_numpy(np.ascontiguousarray(table.unit_rows(queries)))
    truth_t = torch.from_numpy(truth)
    equal_images = first_equal_rows(images)
    rank = np.empty(len(queries), dtype=np.int64)
    for start, stop, scores in score_blocks(query_rows, torch.from_numpy(images), block_bytes=BLOCK_BYTES):
        if equal_images is not None:
            scores = scores.index_select(1, equal_images)
        positive = truth_t[None, :] == torch.from_numpy(queries[start:stop])[:, None]
        best = scores.masked_fill(~positive, -float("inf")).amax(dim=1)
        rank[start:stop] = (1 + ((scores >= best[:, None]) & ~positive).sum(dim=1)).numpy()
    return queries, rank


def fact_to_image_recall(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any,
                         fact_ids: Sequence[int] | np.ndarray, ks: Sequence[int] = FIELD_KS) -> dict[str, float]:
    """``{"f2i_r{K}": R@K for K in ks}`` of ranking the images for each fact with a positive image
    (module docstring), fractions in [0, 1]."""
    _, rank = fact_to_image_ranks(image_embeddings, image_fact_ids, table, fact_ids)
    return {f"f2i_r{int(k)}": float((rank <= int(k)).mean()) for k in ks}


def field_metrics(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, table: Any,
                  candidate_fact_ids: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Every key of :data:`FIELD_KEYS` for one task: image → fact over the candidates, fact → image
    with the candidates that have a test image as queries (the facts :mod:`triplets.facts.evaluate`'s mAP
    averages over)."""
    metrics = image_to_fact_recall(image_embeddings, image_fact_ids, table, candidate_fact_ids)
    metrics.update(fact_to_image_recall(image_embeddings, image_fact_ids, table, candidate_fact_ids))
    return metrics


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row-wise AP = Σ_thresholds (R_n − R_{n−1}) P_n (sklearn's definition; ties share a threshold).

    ``scores``, ``labels`` (bool): [q, n]. Rows without positives give 0.
    """
    scores = np.atleast_2d(scores)
    labels = np.atleast_2d(labels).astype(bool)
    count = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    true_positives = np.cumsum(sorted_labels, axis=1)
    is_group_end = np.ones_like(sorted_labels)
    is_group_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    column = np.broadcast_to(np.arange(count), sorted_scores.shape)
    end_of_group = np.where(is_group_end, column, count)
    end_of_group = np.minimum.accumulate(end_of_group[:, ::-1], axis=1)[:, ::-1]   # next group end at or after i
    group_precision = np.take_along_axis(true_positives, end_of_group, axis=1) / (end_of_group + 1.0)
    positives = sorted_labels.sum(axis=1)
    summed = (sorted_labels * group_precision).sum(axis=1)
    return np.divide(summed, positives, out=np.zeros(len(scores)), where=positives > 0)


def average_precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int, positives: np.ndarray | None = None,
                           positions: np.ndarray | None = None) -> np.ndarray:
    """Row-wise AP@k = (1 / min(k, #positives)) Σ_{i ≤ k, label_i} precision@i (ties against positives)."""
    scores = np.atleast_2d(scores)
    labels = np.atleast_2d(labels).astype(bool)
    if positives is None:
        positives = labels.sum(axis=1).astype(np.float64)
    top = min(int(k), scores.shape[1])
    if positions is None:
        positions = np.arange(1, scores.shape[1] + 1, dtype=np.float64)
    order = np.lexsort((labels, -scores), axis=1)[:, :top]     # primary: score desc; ties: negatives first
    hits = np.take_along_axis(labels, order, axis=1)
    precision = np.cumsum(hits, axis=1) / positions[:top]
    denominator = np.minimum(float(k), positives)
    summed = (hits * precision).sum(axis=1)
    return np.divide(summed, denominator, out=np.zeros(len(scores)), where=denominator > 0)


__all__ = ["FACT_TO_IMAGE_FIELD_KEYS", "FIELD_KEYS", "FIELD_KS", "IMAGE_TO_FACT_FIELD_KEYS", "average_precision",
           "average_precision_at_k", "fact_to_image_ranks", "fact_to_image_recall", "field_metrics",
           "first_equal_rows", "image_to_fact_ranks", "image_to_fact_recall", "row_hashes"]
