"""Nearest-neighbour indexes over fact and image embeddings (cosine similarity).

Cosine similarity is computed as the inner product of L2-normalised vectors: every
vector added to an index and every query is divided by its Euclidean norm here (a zero
vector stays zero and scores 0 against everything), so callers pass raw embeddings and
get back scores in [-1, 1].

Four kinds of index (:func:`build_index`, :class:`FactIndex`):

- ``"flat"`` (default): exact search. The vectors live in a ``faiss.IndexFlatIP`` (the file
  format); searches run on the exact backend chosen by ``exact_backend``
  (:func:`choose_exact_backend`): ``"auto"`` = FAISS where the index is on a GPU, else the
  exact search of :mod:`triplets.index.exact` (FAISS's brute-force candidates re-scored in
  float64: at the CPU's matrix-multiply speed, results equal to the float64 reference, ties by
  ascending row).
- ``"ivf"``: ``faiss.IndexIVFFlat`` over inner product, k-means on a bounded sample
  (:func:`training_rows`); ``nlist`` defaults to ``round(4·sqrt(n))``, capped at ``n // 39``.
- ``"ivfpq"``: ``faiss.IndexIVFPQ``: IVF cells as for ``"ivf"``, each vector stored as
  ``pq_m`` product-quantizer codes of ``pq_bits`` bits (``pq_m·pq_bits/8`` bytes + 8 of id
  instead of ``4·dim``); ``refine_factor`` re-ranks ``refine_factor·k`` candidates by their
  float64 inner product (:func:`~triplets.index.ivf.rerank_exact`), keeping the vectors in RAM.
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` over inner product (``hnsw_m`` links, ``ef_search``).

IVF ``nprobe`` (cells visited per query) defaults to the smallest power of two whose
probed cells hold ≥ ``target_recall`` (0.95) of the exact 10 nearest neighbours of sampled
indexed vectors (their own entry excluded; :func:`calibrate_nprobe_by_cells`); the value
and the end-to-end recall measured there are kept in :attr:`FactIndex.metadata`.

Past RAM: :func:`build_sharded_index` trains one coarse quantizer (+ PQ) on a sample read
chunk by chunk, writes each contiguous id range as its own index file
(``shard-00000-of-00004.faiss``, …) plus ``manifest.json``; :func:`load_sharded_index`
memory-maps the shards and searches them together as a :class:`ShardedFactIndex`.

GPU: with faiss-gpu and a visible GPU, flat and IVF indexes are copied to all GPUs
(``faiss.index_cpu_to_all_gpus``) and searched there; HNSW and re-ranking indexes stay on
the CPU. :meth:`FactIndex.save` always writes the CPU index.

On disk an index is ``PATH`` (``faiss.serialize_index`` bytes) and the sidecar ``PATH.json``
(format version, kind, dimension, count, the model fingerprint, the SHA-256 of ``PATH``,
the row → id mapping, metadata), both written atomically, the index first;
:func:`load_index` refuses a torn pair or another model's index.

Modules: :mod:`.common` (normalisation, fingerprints, checks), :mod:`.exact` (the blocked
GEMM exact search), :mod:`.ivf` (IVF training, calibration, re-ranking), :mod:`.fact_index`
(:class:`FactIndex`), :mod:`.sharded` (shards on disk), :mod:`.persist` (files).
"""
from __future__ import annotations

from .common import (
    DEFAULT_ROWS_PER_SHARD, GPU_MAX_K, INDEX_FORMAT, INDEX_FORMAT_VERSION, IVF_KINDS, KINDS, MANIFEST_NAME,
    SHARDED_FORMAT, SHARDED_FORMAT_VERSION, SHARDED_KINDS, VECTORS_FILE, IndexKind, default_nlist, default_pq_m,
    gpu_available, normalize_rows, pq_m_choices,
)
from .exact import (EXACT_BACKENDS, SCORERS, check_exact_backend, choose_exact_backend, exact_search,
                    multiply_transposed, score_blocks)
from .fact_index import FactIndex, build_index, load_index
from .ivf import calibrate_nprobe_by_cells, calibration_rows, rerank_exact, training_rows
from .persist import sidecar_path
from .sharded import ShardedFactIndex, build_sharded_index, load_sharded_index, shard_bounds, shard_file_name

__all__ = [
    "DEFAULT_ROWS_PER_SHARD", "EXACT_BACKENDS", "SCORERS", "GPU_MAX_K", "INDEX_FORMAT", "INDEX_FORMAT_VERSION", "IVF_KINDS",
    "KINDS", "MANIFEST_NAME", "SHARDED_FORMAT", "SHARDED_FORMAT_VERSION", "SHARDED_KINDS", "VECTORS_FILE",
    "FactIndex", "IndexKind", "ShardedFactIndex", "build_index", "build_sharded_index", "calibrate_nprobe_by_cells",
    "calibration_rows", "check_exact_backend", "choose_exact_backend", "default_nlist", "default_pq_m",
    "exact_search", "gpu_available", "load_index", "load_sharded_index",
    "multiply_transposed",
    "normalize_rows", "pq_m_choices", "rerank_exact", "score_blocks", "shard_bounds", "shard_file_name",
    "sidecar_path", "training_rows",
]
