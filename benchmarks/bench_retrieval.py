"""Retrieval benchmark: every exact search against the matrix-multiply limit, and IVF / HNSW
against the fastest exact search.

    python benchmarks/bench_retrieval.py                     # 165,150 × 1152, 10K queries, k = 10
    python benchmarks/bench_retrieval.py --facts 20000 --queries 1000 --repeats 1   # a quick look
    python benchmarks/bench_retrieval.py --case million      # 1,000,000 × 384 IVF-PQ, sharded over files
    python benchmarks/bench_retrieval.py --case evaluate [--run runs/demo]   # seconds per evaluation

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
separately and not part of the speedups), all in one run:

- the exact searches: a flat index searched by the CPU default, FAISS's brute-force candidates
  re-scored in float64 (``exact_backend="faiss-rescored"``, :mod:`triplets.index.exact`;
  ``exact_*``), the same search with the candidates from blocked products by numpy's BLAS
  (``"blas"``; ``exact_blas_*``) and by ``torch.mm`` (``"torch"``; ``exact_torch_*``), the same
  flat index searched by FAISS ``IndexFlatIP`` alone (float32 ranking; ``faiss_flat_*``), and
  sklearn ``NearestNeighbors(algorithm="brute", metric="cosine")`` (``sklearn_*``); their
  GFLOP/s count the product's 2·q·n·d operations;
- the GEMM limit, a bare product of the same [q, d] × [d, n] shape into one preallocated
  output, nothing else (:func:`bare_gemm`), by numpy's BLAS blocked as the exact backend blocks
  it (1024 queries × 32,768 rows: ``gemm_s``), in whole rows (1024 queries × n:
  ``gemm_full_rows_s``) and by ``torch.mm`` in the same blocks (``gemm_torch_s``);
  ``gemm_limit_s`` is the fastest of the three;
- ``exact_vs_gemm_throughput`` = gemm_limit_s / exact_search_s (goal ≥ 0.8),
  ``exact_vs_sklearn_speedup`` = sklearn_search_s / exact_search_s (goal ≥ 3),
  ``exact_vs_faiss_flat_speedup``, and ``gemm_limit_vs_sklearn_speedup`` = sklearn_search_s /
  gemm_limit_s: the most any search that computes every score can gain on scikit-learn here;
- ``flat_recall_at_10``: the exact backend against the exact numpy reference (a float32 matrix
  product picks k + 8 candidates per query, re-scored in float64 and sorted). A returned id
  counts as correct when it is in the reference's top k or its exact score ties the k-th best
  within 1e-6; must be 1.0 (``faiss_flat_recall_at_10``, ``sklearn_recall_at_10`` likewise);
  ``clustered_exact_same_ids_as_float64_reference``: the fraction of queries whose k ids come
  out identical, in the same order, to the reference's;
- ``fastest_exact``: the fastest of the three exact searches; ``ivf_vs_fastest_exact_speedup``
  and ``ivf_recall_at_10`` (``nlist`` = :func:`triplets.index.default_nlist`, ``nprobe``
  calibrated by :func:`triplets.index.build_index`: recall@10 ≥ 0.95 on sampled database
  vectors, never on the benchmark's queries; ``ivf_nprobe_sweep`` shows other values), and
  ``hnsw_vs_fastest_exact_speedup``, ``hnsw_recall_at_10`` (M = 32, efSearch = 128;
  clustered data only; ``--skip-hnsw``).

``--case evaluate``: seconds per evaluation (:func:`triplets.facts.evaluate.evaluate_embeddings` on
every task, standard and generalized; a fresh fact file each time, so nothing is cached) on a
synthetic world of ``--facts`` facts in ``--tasks`` tasks with ``--eval-images`` test images per
task (:func:`synthetic_evaluation`; ``--facts 0`` skips it), and, with ``--run``, seconds per ``evaluate_run`` of that
run folder (which also embeds the images). Only public functions of :mod:`triplets.facts.evaluate`
are called, so the same command with an older tree on ``PYTHONPATH`` gives the "before".

``--case million``: 1,000,000 clustered unit vectors (``--vectors``, ``--dim`` default 384:
one MiniLM slot, a common image-embedding size; 1152 takes about three times as long to
train and add on 2 cores) are written chunk by chunk to a float32 memmap in ``--workdir``
(never held in RAM), indexed with :func:`triplets.index.build_sharded_index` (IVF-PQ, nlist
= :func:`triplets.index.default_nlist`, ``--pq-m`` sub-quantizers of 8 bits, ``--shards``
files, ``--refine-store`` also writes the vectors for re-ranking) and reopened memory-mapped
with :func:`triplets.index.load_sharded_index`. The exact top 10 of ``--queries`` held-out
queries comes from a chunked float32 matrix product re-scored in float64 (as above). Reported:
recall@10 (ties within 1e-6 count) and search time per query at each nprobe of
``--nprobes`` without re-ranking and, for ``--refine-factors``, with exact re-ranking of
refine·10 candidates; build time (train + add + write + calibration); bytes per vector of
the shard files (codes, ids, list headers, each shard's centroids and codebooks) against
flat's 4·dim; peak memory: ``ru_maxrss`` (which counts the memory-mapped input's pages
touched, reclaimable page cache) and the peak anonymous resident memory (``RssAnon``,
sampled every 0.1 s: what the process really holds) of each phase.

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
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


def round_robin(functions: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """({name: median seconds}, {name: last result}) over ``repeats`` rounds, each calling every
    function once, the order rotated by one place per round."""
    names = list(functions)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            results[name] = functions[name]()
            seconds[name].append(time.perf_counter() - started)
        print(f"  round {round_number + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names),
              file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in seconds.items()}, results


def write_clustered_memmap(path: Path, count: int, queries: int, dim: int, clusters: int, spread: float, seed: int,
                           chunk_rows: int = 65536, intrinsic_dim: int | None = None) -> tuple[np.memmap, np.ndarray]:
    """(database float32 memmap [count, dim] at ``path``, queries [queries, dim]): unit vectors of the
    ``clustered`` mixture (centre ~ N(0, I) of ``clusters``, plus ``spread``·N(0, I)), written one
    chunk at a time; the queries are further draws from the same mixture (held out). With
    ``intrinsic_dim`` r, the noise is ``spread``·z·B with z ~ N(0, I_r) and a fixed random
    B [r, dim] of N(0, 1/r) entries (so each coordinate still has variance ``spread``², the
    same noise power as the isotropic case): within a cluster the vectors vary along r
    directions only, as real embeddings vary along few."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = None
    if intrinsic_dim:
        basis = rng.standard_normal((intrinsic_dim, dim), dtype=np.float32) / np.float32(np.sqrt(intrinsic_dim))

    def draw(rows: int) -> np.ndarray:
        block = centres[rng.integers(0, clusters, rows)]
        if basis is None:
            block += spread * rng.standard_normal((rows, dim), dtype=np.float32)
        else:
            block += spread * (rng.standard_normal((rows, len(basis)), dtype=np.float32) @ basis)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        return block

    database = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, chunk_rows):
        stop = min(count, start + chunk_rows)
        database[start:stop] = draw(stop - start)
    database.flush()
    del database
    return np.load(path, mmap_mode="r"), np.ascontiguousarray(draw(queries))


def exact_top_k_chunked(database: np.ndarray, queries: np.ndarray, k: int, chunk_rows: int = 16384,
                        margin: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_top_k` for a database read in row chunks (a memmap): the top k + ``margin``
    candidates of float32 products kept over the chunks, then re-scored in float64."""
    wide = min(len(database), k + margin)
    best_scores = np.full((len(queries), wide), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), wide), -1, dtype=np.int64)
    for start in range(0, len(database), chunk_rows):
        chunk = np.asarray(database[start:start + chunk_rows], dtype=np.float32)
        scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + len(chunk)), (len(queries), len(chunk)))],
                             axis=1)
        keep = np.argpartition(-scores, wide - 1, axis=1)[:, :wide]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    ids = np.empty((len(queries), k), dtype=np.int64)
    kth = np.empty(len(queries), dtype=np.float64)
    for row in range(len(queries)):
        candidates = np.sort(best_ids[row])
        exact = np.asarray(database[candidates], dtype=np.float64) @ queries[row].astype(np.float64)
        order = np.argsort(-exact, kind="stable")[:k]
        ids[row] = candidates[order]
        kth[row] = exact[order][-1]
    return ids, kth


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the
    next phase's RssAnon does not count what an earlier phase freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class AnonymousMemoryPeak:
    """Peak of this process's anonymous resident memory (``RssAnon`` of /proc/self/status, bytes),
    sampled every ``interval`` seconds in a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def start(self) -> "AnonymousMemoryPeak":
        self.peak = self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())
        return self.peak


def run_million(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--case million`` benchmark (module docstring); returns the report."""
    import faiss

    from triplets.index import build_sharded_index, default_nlist, default_pq_m, load_sharded_index

    k = args.k
    count, dim = args.vectors, args.dim
    pq_m = args.pq_m or default_pq_m(dim)
    report: dict[str, Any] = {
        "case": "million", "vectors": count, "dim": dim, "queries": args.queries, "k": k, "repeats": args.repeats,
        "clusters": args.clusters, "spread": args.spread, "shards": args.shards, "pq_m": pq_m, "pq_bits": 8,
        "nlist": default_nlist(count), "faiss": faiss.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
        "flat_bytes_per_vector": 4 * dim, "intrinsic_dim": args.intrinsic_dim,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-million-", dir=args.workdir))
    memory = AnonymousMemoryPeak()
    report["rss_anon_mb_baseline"] = memory.current() / 2**20  # interpreter + numpy + faiss + torch, before any data
    try:
        started = time.perf_counter()
        memory.start()
        database, queries = write_clustered_memmap(workdir / "input.npy", count, args.queries, dim, args.clusters,
                                                   args.spread, args.seed, intrinsic_dim=args.intrinsic_dim)
        report["generate_s"] = time.perf_counter() - started
        started = time.perf_counter()
        truth, kth = exact_top_k_chunked(database, queries, k)
        report["exact_search_s"] = time.perf_counter() - started
        report["exact_search_ms_per_query"] = 1000 * report["exact_search_s"] / len(queries)
        report["peak_rss_anon_mb_generate_and_exact"] = memory.stop() / 2**20
        print(f"[million] data {report['generate_s']:.0f} s, exact reference {report['exact_search_s']:.0f} s",
              file=sys.stderr, flush=True)

        release_freed_memory()
        report["rss_anon_mb_before_build"] = memory.current() / 2**20
        started = time.perf_counter()
        memory.start()
        manifest = build_sharded_index(database, workdir / "index", num_shards=args.shards, pq_m=pq_m,
                                       refine_factor=max(args.refine_factors) if args.refine_store else None,
                                       seed=args.seed)
        report["build_s"] = time.perf_counter() - started
        report["peak_rss_anon_mb_build"] = memory.stop() / 2**20
        report["ru_maxrss_mb_after_build"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"[million] sharded build {report['build_s']:.0f} s", file=sys.stderr, flush=True)

        release_freed_memory()
        report["rss_anon_mb_before_load"] = memory.current() / 2**20
        started = time.perf_counter()
        memory.start()
        index = load_sharded_index(manifest.parent, mmap=True, use_gpu=False, refine_factor=None)
        report["load_s"] = time.perf_counter() - started
        meta = index.metadata
        report.update(calibrated_nprobe=meta["nprobe"], calibrated_cell_recall_at_10=meta["calibrated_cell_recall_at_10"],
                      calibrated_recall_at_10=meta["calibrated_recall_at_10"], train_rows=meta["train_rows"],
                      code_size=meta["code_size"], index_bytes=index.index_bytes,
                      bytes_per_vector=index.bytes_per_vector, code_bytes_per_vector=index.code_bytes_per_vector,
                      flat_over_ivfpq_memory=4 * dim / index.bytes_per_vector,
                      shard_bytes=[shard["bytes"] for shard in index.manifest["shards"]])
        sweep = []
        refine_factors = [None] + (list(args.refine_factors) if args.refine_store else [])
        for refine in refine_factors:
            index.refine_factor = refine
            for nprobe in args.nprobes:
                if nprobe > meta["nlist"]:
                    continue
                index.nprobe = nprobe
                seconds, (_, ids) = timed(lambda: index.search(queries, k), args.repeats)
                sweep.append({"nprobe": nprobe, "refine_factor": refine,
                              "recall_at_10": recall_with_ties(ids, truth, kth, database, queries),
                              "ms_per_query": 1000 * seconds / len(queries)})
                print(f"[million] nprobe {nprobe} refine {refine}: recall {sweep[-1]['recall_at_10']:.4f}, "
                      f"{sweep[-1]['ms_per_query']:.3f} ms/query", file=sys.stderr, flush=True)
        report["sweep"] = sweep
        report["peak_rss_anon_mb_search"] = memory.stop() / 2**20
        report["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        at_calibrated = [row for row in sweep if row["nprobe"] == meta["nprobe"] and row["refine_factor"] is None]
        if at_calibrated:
            report["ivfpq_recall_at_10"] = at_calibrated[0]["recall_at_10"]
        del index, database
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, sort_keys=True))
    return report


class SyntheticFactFile:
    """The parts of an opened fact file that evaluation reads: ``facts`` (S, P, O tuples),
    ``fact_embeddings`` [F, dim], ``num_tasks`` and ``facts_of_task``."""

    path = "synthetic"

    def __init__(self, facts: list[tuple], embeddings: np.ndarray, tasks: list[np.ndarray]) -> None:
        self.facts, self.fact_embeddings, self._tasks = facts, embeddings, tasks
        self.num_tasks = len(tasks)

    def facts_of_task(self, task: int) -> np.ndarray:
        return self._tasks[task]


def synthetic_evaluation(count: int, tasks: int, images_per_task: int, dim: int, spread: float,
                         seed: int) -> tuple[list[tuple], np.ndarray, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """(facts, fact embeddings [count, dim], facts of each task, per task (image embeddings, fact ids)).

    Facts: subject i mod 5000; a third each of orders <S>, <S,P>, <S,P,O> (predicate from 100,
    object from 3000); a fact's vector is its slots' random vectors side by side (dim/3 each,
    zeros for absent slots), so facts sharing a subject are alike. Tasks: a random partition.
    Images: a task's facts drawn at random, vector = the fact's + ``spread``·N(0, I)."""
    rng = np.random.default_rng(seed)
    slot = dim // 3
    subjects, predicates, objects = (rng.standard_normal((size, slot), dtype=np.float32) for size in (5000, 100, 3000))
    facts, embeddings = [], np.zeros((count, 3 * slot), dtype=np.float32)
    for i in range(count):
        order = 1 + i % 3
        s, p, o = i % 5000, (i // 5000 + 7 * i) % 100, (i // 3) % 3000
        facts.append((f"s{s}", f"p{p}" if order >= 2 else None, f"o{o}_{i}" if order == 3 else None))
        embeddings[i, :slot] = subjects[s]
        if order >= 2:
            embeddings[i, slot:2 * slot] = predicates[p]
        if order == 3:
            embeddings[i, 2 * slot:] = objects[o]
    task_facts = [np.sort(part) for part in np.array_split(rng.permutation(count), tasks)]
    images = []
    for own in task_facts:
        truth = rng.choice(own, size=images_per_task)
        vectors = embeddings[truth] + spread * rng.standard_normal((len(truth), 3 * slot), dtype=np.float32)
        images.append((vectors, truth.astype(np.int64)))
    return facts, embeddings, task_facts, images


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``--case evaluate``: seconds per evaluation (every task, standard and generalized) of the
    embeddings of a synthetic world of ``--facts`` facts, and of ``mas-triplets evaluate`` on
    ``--run`` when given. Works with the evaluate module of any version of the tree (run it
    with the old tree first on PYTHONPATH for a before/after)."""
    from triplets.facts.evaluate import evaluate_embeddings
    from triplets.facts.data import fact_image_dataset
    from triplets.facts.retrieval_report import RETRIEVAL_MODES

    report: dict[str, Any] = {"case": "evaluate", "facts": args.facts, "dim": args.dim, "tasks": args.tasks,
                              "images_per_task": args.eval_images, "spread": args.eval_spread, "repeats": args.repeats,
                              "cpu_count": os.cpu_count()}
    if args.facts > 0:  # --facts 0: the run only
        started = time.perf_counter()
        facts, embeddings, task_facts, images = synthetic_evaluation(args.facts, args.tasks, args.eval_images, args.dim,
                                                                     args.eval_spread, args.seed)
        print(f"[evaluate] synthetic world: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

        def evaluation() -> list[dict[str, float]]:
            fact_file = SyntheticFactFile(facts, embeddings, task_facts)  # a fresh file: nothing cached
            return [evaluate_embeddings(vectors, truth, fact_file, task, mode=mode)
                    for task, (vectors, truth) in enumerate(images) for mode in RETRIEVAL_MODES]

        seconds, metrics = timed(evaluation, args.repeats)
        report["synthetic_evaluate_s"] = seconds
        report["synthetic_metrics"] = metrics
        print(f"[evaluate] synthetic: {seconds:.2f} s per evaluation", file=sys.stderr, flush=True)
    if args.run:
        from triplets.facts.evaluate import evaluate_run

        run_seconds, results = timed(lambda: evaluate_run(args.run), args.repeats)
        report["run"] = str(args.run)
        report["run_evaluate_s"] = run_seconds
        report["run_final"] = {method: entry.get("final") for method, entry in results["methods"].items()}
        print(f"[evaluate] run {args.run}: {run_seconds:.2f} s per evaluate_run", file=sys.stderr, flush=True)
        from triplets.facts.evaluate import embed_images
        from triplets.run_folder import load_run

        with load_run(args.run) as run:  # the ranking alone: every method's test embeddings computed once
            embedded = []
            for method in run.methods:
                model = run.load_model(method)
                embedded += [embed_images(model, fact_image_dataset(run.fact_file, task, "test"))
                             for task in range(int(run.fact_file.num_tasks))]

            def ranking() -> None:
                fact_file = run.fact_file
                for number, (vectors, truth) in enumerate(embedded):
                    for mode in RETRIEVAL_MODES:
                        evaluate_embeddings(vectors, truth, fact_file, number % int(fact_file.num_tasks), mode=mode)

            report["run_ranking_s"] = timed(ranking, args.repeats)[0]
        print(f"[evaluate] run {args.run}: {report['run_ranking_s']:.3f} s of ranking per evaluation",
              file=sys.stderr, flush=True)
    print(json.dumps(report, sort_keys=True))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="FAISS vs scikit-learn retrieval benchmark")
    parser.add_argument("--case", choices=("default", "million", "evaluate"), default="default",
                        help="million: 1M-vector IVF-PQ sharded over files; evaluate: seconds per evaluation "
                             "(see the module docstring)")
    parser.add_argument("--tasks", type=int, default=8, help="--case evaluate: tasks of the synthetic world")
    parser.add_argument("--eval-images", type=int, default=500, help="--case evaluate: test images per task")
    parser.add_argument("--eval-spread", type=float, default=4.0,
                        help="--case evaluate: image noise around its fact's vector (larger: harder)")
    parser.add_argument("--run", default=None, help="--case evaluate: also time evaluate_run on this run folder")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="--case million: database vectors")
    parser.add_argument("--shards", type=int, default=4, help="--case million: shard files")
    parser.add_argument("--pq-m", type=int, default=None, help="--case million: PQ sub-quantizers (default dim/8)")
    parser.add_argument("--nprobes", type=lambda text: [int(v) for v in text.split(",")],
                        default=[1, 2, 4, 8, 16, 32, 64], help="--case million: nprobe values, comma-separated")
    parser.add_argument("--refine-factors", type=lambda text: [int(v) for v in text.split(",")], default=[4, 16, 64],
                        help="--case million: exact re-ranking of refine·k candidates, comma-separated")
    parser.add_argument("--refine-store", action=argparse.BooleanOptionalAction, default=True,
                        help="--case million: store the vectors (4·dim bytes each on disk) for re-ranking")
    parser.add_argument("--intrinsic-dim", type=int, default=None,
                        help="--case million: within-cluster noise along this many random directions (default: all)")
    parser.add_argument("--workdir", default=None, help="--case million: folder for the memmap and shards")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--facts", type=int, default=165_150)
    parser.add_argument("--dim", type=int, default=None,
                        help="vector size (default 1152 = 3 slots × 384 for MiniLM; --case million: 384)")
    parser.add_argument("--queries", type=int, default=None, help="default 10,000 (--case million: 1,000)")
    parser.add_argument("--uniform-queries", type=int, default=None,
                        help="queries for the uniform case (default: --queries); IVF there scans nearly every cell")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around a cluster centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-uniform", action="store_true")
    parser.add_argument("--skip-hnsw", action="store_true")
    args = parser.parse_args(argv)
    if args.case == "million":
        args.dim = args.dim or 384
        args.queries = args.queries or 1000
        return run_million(args)
    args.dim = args.dim or 1152
    if args.case == "evaluate":
        return run_evaluate(args)
    args.queries = args.queries or 10_000

    import faiss
    import sklearn
    import torch
    from sklearn.neighbors import NearestNeighbors

    from triplets.index import build_index, default_nlist

    k = args.k
    report: dict[str, Any] = {
        "facts": args.facts, "dim": args.dim, "queries": args.queries, "k": k, "repeats": args.repeats,
        "clusters": args.clusters, "spread": args.spread, "faiss": faiss.__version__, "sklearn": sklearn.__version__,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(), "nlist": default_nlist(args.facts),
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
        flops = 2.0 * num_queries * args.facts * args.dim

        # every search is built first, then timed round-robin (one call of each per round, the
        # order rotating), so that a change of load on the shared machine hits all of them alike
        searches: dict[str, Callable[[], Any]] = {}
        for backend, name in (("faiss-rescored", "exact"), ("blas", "exact_blas"), ("torch", "exact_torch"),
                              ("faiss", "faiss_flat")):
            started = time.perf_counter()
            flat = build_index(database, kind="flat", use_gpu=False, exact_backend=backend)
            report[f"{kind}_flat_{backend}_build_s"] = time.perf_counter() - started
            searches[name] = (lambda index: lambda: index.search(queries, k)[1])(flat)
        if kind == "clustered":  # the exact backend's blocks (1024 queries × 128 MiB of scores), and whole rows
            searches["gemm"] = lambda: bare_gemm(queries, database, 1024, (1 << 27) // (4 * 1024))
            searches["gemm_full_rows"] = lambda: bare_gemm(queries, database, 1024, None)
            searches["gemm_torch"] = lambda: bare_gemm(queries, database, 1024, (1 << 27) // (4 * 1024), gemm="torch")
            if not args.skip_sklearn:
                neighbours = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(database)
                searches["sklearn"] = lambda: np.asarray(neighbours.kneighbors(queries, k)[1])
        started = time.perf_counter()
        ivf = build_index(database, kind="ivf", use_gpu=False, seed=args.seed)
        report[f"{kind}_ivf_build_s"] = time.perf_counter() - started
        calibrated = ivf.nprobe
        report[f"{kind}_ivf_nprobe"] = calibrated
        report[f"{kind}_ivf_calibration_recall"] = ivf.metadata["calibrated_recall_at_10"]
        searches["ivf"] = lambda: ivf.search(queries, k)[1]
        print(f"[{kind}] ivf built: {report[f'{kind}_ivf_build_s']:.1f} s, nprobe {calibrated}", file=sys.stderr,
              flush=True)
        if kind == "clustered" and not args.skip_hnsw:
            started = time.perf_counter()
            hnsw = build_index(database, kind="hnsw", use_gpu=False)
            report["hnsw_build_s"] = time.perf_counter() - started
            report["hnsw_ef_search"] = hnsw.metadata["ef_search"]
            searches["hnsw"] = lambda: hnsw.search(queries, k)[1]
            print(f"[{kind}] hnsw built: {report['hnsw_build_s']:.1f} s", file=sys.stderr, flush=True)

        seconds, found = round_robin(searches, args.repeats)
        for name, ids in found.items():
            prefix = "" if name in ("sklearn", "hnsw") else f"{kind}_"   # only measured on clustered data
            if name.startswith("gemm"):
                report[f"{name}_s"], report[f"{name}_gflops"] = seconds[name], flops / seconds[name] / 1e9
                continue
            report[f"{prefix}{name}_search_s"] = seconds[name]
            if name in ("exact", "exact_blas", "exact_torch", "faiss_flat", "sklearn"):
                report[f"{prefix}{name}_gflops"] = flops / seconds[name] / 1e9
            report[f"{prefix}{name}_recall_at_10"] = recall_with_ties(ids, truth, kth, database, queries)
            print(f"[{kind}] {name}: {seconds[name]:.2f} s", file=sys.stderr, flush=True)
        for name in [n for n in found if n.startswith("gemm")]:
            print(f"[{kind}] {name}: {seconds[name]:.2f} s", file=sys.stderr, flush=True)
        report[f"{kind}_exact_same_ids_as_float64_reference"] = float((found["exact"] == truth).all(axis=1).mean())
        exact_names = [name for name in ("exact", "exact_blas", "exact_torch", "faiss_flat", "sklearn") if name in seconds]
        fastest = min(exact_names, key=seconds.__getitem__)
        report[f"{kind}_fastest_exact"] = fastest
        report[f"{kind}_exact_vs_faiss_flat_speedup"] = seconds["faiss_flat"] / seconds["exact"]
        report[f"{kind}_ivf_vs_fastest_exact_speedup"] = seconds[fastest] / seconds["ivf"]
        if "gemm" in seconds:  # against the fastest of the bare products: the machine's limit
            report["gemm_limit_s"] = min(seconds["gemm"], seconds["gemm_full_rows"], seconds["gemm_torch"])
            report["gemm_limit_gflops"] = flops / report["gemm_limit_s"] / 1e9
            report["exact_vs_gemm_throughput"] = report["gemm_limit_s"] / seconds["exact"]
            report["exact_torch_vs_gemm_throughput"] = report["gemm_limit_s"] / seconds["exact_torch"]
            report["exact_blas_vs_gemm_throughput"] = report["gemm_limit_s"] / seconds["exact_blas"]
        if "sklearn" in seconds:
            report["exact_vs_sklearn_speedup"] = seconds["sklearn"] / seconds["exact"]
            report["faiss_vs_sklearn_speedup"] = seconds["sklearn"] / seconds["faiss_flat"]
            if "gemm" in seconds:
                report["gemm_limit_vs_sklearn_speedup"] = seconds["sklearn"] / report["gemm_limit_s"]
        if "hnsw" in seconds:
            report["hnsw_vs_fastest_exact_speedup"] = seconds[fastest] / seconds["hnsw"]
        sweep = []
        for nprobe in sorted({max(1, calibrated // 2), calibrated * 2} - {calibrated}):
            if nprobe > ivf.metadata["nlist"]:
                continue
            ivf.nprobe = nprobe
            sweep_seconds, (_, ids) = timed(lambda: ivf.search(queries, k), 1)
            sweep.append({"nprobe": nprobe, "recall_at_10": recall_with_ties(ids, truth, kth, database, queries),
                          "speedup_vs_fastest_exact": seconds[fastest] / sweep_seconds})
        report[f"{kind}_ivf_nprobe_sweep"] = sweep
        searches.clear()
        del flat, ivf, database, queries

    # the headline figures: clustered data (the uniform case is reported beside them)
    report["flat_recall_at_10"] = report["clustered_exact_recall_at_10"]
    report["faiss_flat_recall_at_10"] = report["clustered_faiss_flat_recall_at_10"]
    report["exact_vs_faiss_flat_speedup"] = report["clustered_exact_vs_faiss_flat_speedup"]
    report["fastest_exact"] = report["clustered_fastest_exact"]
    report["ivf_recall_at_10"] = report["clustered_ivf_recall_at_10"]
    report["ivf_vs_fastest_exact_speedup"] = report["clustered_ivf_vs_fastest_exact_speedup"]
    print(json.dumps(report, sort_keys=True))
    return report


def bare_gemm(queries: np.ndarray, database: np.ndarray, rows: int = 1024, columns: int | None = None,
              gemm: str = "blas") -> None:
    """The GEMM limit: queries · databaseᵀ by :func:`triplets.index.multiply_transposed` (``gemm``:
    numpy's BLAS or ``torch.mm``) in blocks of ``rows`` queries × ``columns`` database rows (None:
    all n) written into one preallocated float32 output, nothing else (no selection, no copies)."""
    import torch

    from triplets.index import multiply_transposed

    q, x = torch.from_numpy(queries), torch.from_numpy(database)
    width = len(x) if columns is None else min(columns, len(x))
    out = torch.empty(min(rows, len(q)) * width)
    for start in range(0, len(q), rows):
        block = q[start:start + rows]
        for first in range(0, len(x), width):
            part = x[first:first + width]
            multiply_transposed(block, part, out[: len(block) * len(part)].view(len(block), len(part)), gemm=gemm)


if __name__ == "__main__":
    main()
