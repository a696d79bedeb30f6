"""Retrieval benchmark: FAISS flat and IVF against scikit-learn brute force and an exact numpy reference.

    python benchmarks/bench_retrieval.py                     # 165,150 × 1152, 10K queries, k = 10
    python benchmarks/bench_retrieval.py --facts 20000 --queries 1000 --repeats 1   # a quick look

Vectors: ``--facts`` database vectors (default 165,150: the lifelong-fact-learning
benchmarks' fact count) of ``--dim`` dimensions (default 1152 = 3 slots × 384, MiniLM) and
``--queries`` held-out queries from the same distribution, searched for their ``--k``
nearest neighbours by cosine similarity. Two distributions:

- ``clustered``: a Gaussian mixture like real embeddings (``--clusters`` centres ~ N(0, I),
  each vector = centre + ``--spread`` · N(0, I)); IVF's cells follow the clusters.
- ``uniform``: uniform directions on the unit sphere (standard normal vectors). The worst
  case for IVF: in 1152 dimensions the neighbours of a query are spread over all cells, so
  the calibrated ``nprobe`` approaches ``nlist`` and IVF is barely faster than flat.

Measured (median of ``--repeats`` timed searches each; index build times are reported
separately and not part of the speedups):

- ``faiss_vs_sklearn_speedup``: sklearn ``NearestNeighbors(algorithm="brute", metric="cosine")``
  kneighbors time / FAISS ``IndexFlatIP`` search time, same vectors and k (clustered data).
- ``flat_recall_at_10``: FAISS flat against the exact numpy reference (a float32 matrix
  product picks k + 8 candidates per query, re-scored in float64 and sorted). A returned id counts as correct when it is in the
  reference's top k or its exact score ties the k-th best within 1e-6 (float32 summation
  order can swap equal-scored neighbours); must be 1.0. ``sklearn_recall_at_10`` likewise.
- ``ivf_recall_at_10`` and ``ivf_vs_flat_speedup`` (flat search time / IVF search time) with
  ``nlist`` = :func:`triplets.index.default_nlist` and ``nprobe`` calibrated by
  :func:`triplets.index.build_index` (recall@10 ≥ 0.95 on sampled database vectors, never on
  the benchmark's queries), for each distribution; ``ivf_nprobe_sweep`` shows recall and
  speedup for other ``nprobe`` values.

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np


def make_vectors(kind: str, count: int, queries: int, dim: int, clusters: int, spread: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(database [count, dim], queries [queries, dim]) float32 unit vectors of the given distribution."""
    rng = np.random.default_rng(seed)
    total = count + queries
    if kind == "uniform":
        data = rng.standard_normal((total, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        data = centres[rng.integers(0, clusters, total)]
        data += spread * rng.standard_normal((total, dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    order = rng.permutation(total)
    return np.ascontiguousarray(data[order[:count]]), np.ascontiguousarray(data[order[count:]])


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 512,
                margin: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k by numpy: (ids [q, k], k-th best score [q]).

    Candidates are the top k + ``margin`` of a float32 matrix product; their scores are
    recomputed in float64 and sorted, so rounding cannot reorder the returned k.
    """
    ids = np.empty((len(queries), k), dtype=np.int64)
    kth = np.empty(len(queries), dtype=np.float64)
    wide = min(len(database), k + margin)
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        scores = block @ database.T
        candidates = np.argpartition(-scores, wide - 1, axis=1)[:, :wide]
        exact = np.einsum("qd,qcd->qc", block.astype(np.float64), database[candidates].astype(np.float64))
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        ids[start:start + chunk] = np.take_along_axis(candidates, order, axis=1)
        kth[start:start + chunk] = np.take_along_axis(exact, order, axis=1)[:, -1]
    return ids, kth


def recall_with_ties(found: np.ndarray, truth: np.ndarray, kth: np.ndarray, database: np.ndarray,
                     queries: np.ndarray, tolerance: float = 1e-6) -> float:
    """Fraction of returned ids in the exact top k, or tying its k-th score within ``tolerance``."""
    correct = 0
    for row in range(len(found)):
        truth_set = set(truth[row].tolist())
        extra = [i for i in found[row].tolist() if i >= 0 and i not in truth_set]
        hits = len(found[row]) - len(extra) - int((found[row] < 0).sum())
        if extra:
            scores = database[extra].astype(np.float64) @ queries[row].astype(np.float64)
            hits += int((scores >= kth[row] - tolerance).sum())
        correct += hits
    return correct / truth.size


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last result)."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="FAISS vs scikit-learn retrieval benchmark")
    parser.add_argument("--facts", type=int, default=165_150)
    parser.add_argument("--dim", type=int, default=1152, help="vector size (3 slots × 384 for MiniLM)")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--uniform-queries", type=int, default=None,
                        help="queries for the uniform case (default: --queries); IVF there scans nearly every cell")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around a cluster centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-uniform", action="store_true")
    args = parser.parse_args(argv)

    import faiss
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    from triplets.index import build_index, default_nlist

    k = args.k
    report: dict[str, Any] = {
        "facts": args.facts, "dim": args.dim, "queries": args.queries, "k": k, "repeats": args.repeats,
        "clusters": args.clusters, "spread": args.spread, "faiss": faiss.__version__, "sklearn": sklearn.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(), "nlist": default_nlist(args.facts),
    }
    kinds = ["clustered"] + ([] if args.skip_uniform else ["uniform"])
    for kind in kinds:
        started = time.perf_counter()
        num_queries = args.queries if kind == "clustered" or args.uniform_queries is None else args.uniform_queries
        report[f"{kind}_queries"] = num_queries
        database, queries = make_vectors(kind, args.facts, num_queries, args.dim, args.clusters, args.spread,
                                         args.seed)
        truth, kth = exact_top_k(database, queries, k)
        print(f"[{kind}] data + exact numpy reference: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

        started = time.perf_counter()
        flat = build_index(database, kind="flat", use_gpu=False)
        report[f"{kind}_flat_build_s"] = time.perf_counter() - started
        flat_seconds, (_, flat_ids) = timed(lambda: flat.search(queries, k), args.repeats)
        report[f"{kind}_flat_search_s"] = flat_seconds
        report[f"{kind}_flat_recall_at_10"] = recall_with_ties(flat_ids, truth, kth, database, queries)
        print(f"[{kind}] flat: {flat_seconds:.2f} s, recall {report[f'{kind}_flat_recall_at_10']:.4f}",
              file=sys.stderr, flush=True)

        if kind == "clustered" and not args.skip_sklearn:
            neighbours = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(database)
            sk_seconds, (_, sk_ids) = timed(lambda: neighbours.kneighbors(queries, k), args.repeats)
            report["sklearn_search_s"] = sk_seconds
            report["sklearn_recall_at_10"] = recall_with_ties(np.asarray(sk_ids), truth, kth, database, queries)
            report["faiss_vs_sklearn_speedup"] = sk_seconds / flat_seconds
            print(f"[{kind}] sklearn brute: {sk_seconds:.2f} s", file=sys.stderr, flush=True)
            del neighbours

        started = time.perf_counter()
        ivf = build_index(database, kind="ivf", use_gpu=False, seed=args.seed)
        report[f"{kind}_ivf_build_s"] = time.perf_counter() - started
        calibrated = ivf.nprobe
        report[f"{kind}_ivf_nprobe"] = calibrated
        report[f"{kind}_ivf_calibration_recall"] = ivf.metadata["calibrated_recall_at_10"]
        ivf_seconds, (_, ivf_ids) = timed(lambda: ivf.search(queries, k), args.repeats)
        report[f"{kind}_ivf_search_s"] = ivf_seconds
        report[f"{kind}_ivf_recall_at_10"] = recall_with_ties(ivf_ids, truth, kth, database, queries)
        report[f"{kind}_ivf_vs_flat_speedup"] = flat_seconds / ivf_seconds
        print(f"[{kind}] ivf nprobe {calibrated}: {ivf_seconds:.2f} s, recall "
              f"{report[f'{kind}_ivf_recall_at_10']:.4f}", file=sys.stderr, flush=True)
        sweep = []
        for nprobe in sorted({max(1, calibrated // 2), calibrated * 2} - {calibrated}):
            if nprobe > ivf.metadata["nlist"]:
                continue
            ivf.nprobe = nprobe
            seconds, (_, ids) = timed(lambda: ivf.search(queries, k), 1)
            sweep.append({"nprobe": nprobe, "recall_at_10": recall_with_ties(ids, truth, kth, database, queries),
                          "speedup_vs_flat": flat_seconds / seconds})
        report[f"{kind}_ivf_nprobe_sweep"] = sweep
        del flat, ivf, database, queries

    # the headline figures: clustered data (the uniform case is reported beside them)
    report["flat_recall_at_10"] = report["clustered_flat_recall_at_10"]
    report["ivf_recall_at_10"] = report["clustered_ivf_recall_at_10"]
    report["ivf_vs_flat_speedup"] = report["clustered_ivf_vs_flat_speedup"]
    print(json.dumps(report, sort_keys=True))
    return report


if __name__ == "__main__":
    main()
