"""One in-memory index: :class:`FactIndex`, :func:`build_index` and :func:`load_index`."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mas_core import checkpoint

from ..errors import RunFolderError, TripletsError
from . import common
from .common import (
    GPU_MAX_K, INDEX_FORMAT, INDEX_FORMAT_VERSION, IVF_KINDS, KINDS, METRIC, IndexKind, checked_k,
    checked_nlist, checked_nprobe, checked_pq, checked_refine_factor, flat_vectors, jsonable, wants_gpu,
    normalize_rows,
)
from .exact import choose_exact_backend, scorer_of, search_unit_rows
from .ivf import (
    calibrate_ivf, calibration_neighbours, calibration_rows, ivf_metadata, rerank_exact, trained_ivf, training_rows,
    warn_unclustered,
)
from .persist import index_bytes, read_format_file, sidecar_path


class FactIndex:
    """A cosine-similarity index plus its metadata (kind, dimension, fingerprint, ids).

    Build one with :func:`build_index` or read one with :func:`load_index`. Rows are
    numbered 0..count−1 in insertion order; when ``ids`` was given, :meth:`search`
    returns ``ids[row]`` instead of the row. A flat index searches with the exact backend
    :attr:`exact_backend` (``exact_backend="auto"``: FAISS on a GPU, the exact search of
    :mod:`triplets.index.exact` with FAISS's brute-force candidates re-scored in float64 otherwise; see :func:`~triplets.index.exact.choose_exact_backend`).
    """

    def __init__(self, cpu_index: Any, *, kind: str, dim: int, fingerprint: str | None,
                 ids: np.ndarray | None, metadata: dict[str, Any], use_gpu: bool | str = "auto",
                 exact_backend: str = "auto") -> None:
        self.kind = kind
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        self.metadata: dict[str, Any] = dict(metadata)
        self._cpu_index = cpu_index
        self._search_index = cpu_index
        self._candidate_index: Any = None
        self._refine_vectors: Any = None
        self._refine_factor: int | None = None
        self.on_gpu = False
        if self.ids is not None and len(self.ids) != cpu_index.ntotal:
            raise TripletsError(f"index has {cpu_index.ntotal} vectors but {len(self.ids)} ids")
        self._place(use_gpu)
        self.exact_backend = choose_exact_backend(exact_backend, faiss_on_gpu=self.on_gpu) if kind == "flat" else None
        self._scorer = scorer_of(self.exact_backend) if self.exact_backend else None
        self._flat_vectors = flat_vectors(cpu_index) if self._scorer is not None else None
        if kind in IVF_KINDS:
            self.nprobe = int(self.metadata.get("nprobe") or 1)
        elif kind == "hnsw":
            self._cpu_index.hnsw.efSearch = int(self.metadata.get("ef_search") or 64)
        if kind == "ivfpq" and self.metadata.get("refine_factor") and hasattr(cpu_index, "refine_index"):
            faiss = common._faiss()  # IndexRefineFlat: PQ candidates from its base, re-ranked by rerank_exact
            self._candidate_index = faiss.downcast_index(cpu_index.base_index)
            self._refine_vectors = flat_vectors(cpu_index.refine_index)
            self._refine_factor = checked_refine_factor(int(self.metadata["refine_factor"]))

    # -- placement -------------------------------------------------------------------------
    def _place(self, use_gpu: bool | str) -> None:
        if not wants_gpu(use_gpu) or self.kind == "hnsw" or self.metadata.get("refine_factor"):
            return  # FAISS has no GPU HNSW, and its GPU cloner does not take an IndexRefineFlat
        faiss = common._faiss()
        self._search_index = faiss.index_cpu_to_all_gpus(self._cpu_index)
        self.on_gpu = True

    # -- properties ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of indexed vectors."""
        return int(self._cpu_index.ntotal)

    @property
    def index_bytes(self) -> int:
        """Bytes of the CPU index as FAISS serialises it (= its RAM once read back), plus 8·count
        for a row → id table: codes or vectors, ids, per-list headers, coarse centroids, PQ
        codebooks, graph links. Costs one serialisation of the index."""
        faiss = common._faiss()
        extra = 0 if self.ids is None else 8 * len(self.ids)
        return int(faiss.serialize_index(self._cpu_index).size) + extra

    @property
    def bytes_per_vector(self) -> float:
        """:attr:`index_bytes` / :attr:`count` (flat: ≈ 4·dim; ivfpq: ≈ pq_m·pq_bits/8 + 8 + shared
        centroids and codebooks spread over the vectors)."""
        return self.index_bytes / max(1, self.count)

    @property
    def code_bytes_per_vector(self) -> int | None:
        """IVF kinds: bytes an inverted list holds per vector, code_size + 8 (its int64 id); else None."""
        if self.kind not in IVF_KINDS:
            return None
        return int(self.metadata.get("code_size") or 4 * self.dim) + 8

    @property
    def nprobe(self) -> int | None:
        """IVF cells visited per query (None for other kinds)."""
        if self.kind not in IVF_KINDS:
            return None
        return int(self.metadata["nprobe"])

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind not in IVF_KINDS:
            raise TripletsError(f"nprobe applies to an ivf or ivfpq index, this one is {self.kind}")
        faiss = common._faiss()
        nlist = int(self.metadata["nlist"])
        value = int(value)
        if not 1 <= value <= nlist:
            raise TripletsError(f"nprobe must be in 1..nlist={nlist}, got {value}")
        # ParameterSpace reaches the IVF index inside IndexRefineFlat and every shard of IndexShards
        faiss.ParameterSpace().set_index_parameter(self._cpu_index, "nprobe", value)
        if self.on_gpu:
            faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe", value)
        self.metadata["nprobe"] = value

    # -- search ----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most cosine-similar indexed vectors of each query.

        ``queries``: [q, dim] (or [dim]); they are L2-normalised here. Returns
        ``(scores float32 [q, k'], ids int64 [q, k'])`` with k' = min(k, count), best
        first; ``ids`` are rows or the ids given at build time, −1 (score −inf) where an
        approximate index found fewer than k' neighbours. A flat index on the re-scoring backends ("faiss-rescored", "blas", "torch")
        returns the float64 reference's ranking (ties by ascending row; see
        :mod:`triplets.index.exact`); with re-ranking (``refine_factor``) the best k' of
        refine_factor·k' approximate candidates by float64 inner product.
        """
        k = checked_k(k)
        array = np.asarray(queries)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise TripletsError(
                f"queries have shape {array.shape}, the index holds {self.dim}-dimensional vectors; "
                "embed the queries with the model the index was built from"
            )
        normalized = normalize_rows(array, name="queries")
        k_eff = int(min(k, self.count))
        if k_eff == 0 or len(normalized) == 0:
            return np.zeros((len(normalized), k_eff), np.float32), np.zeros((len(normalized), k_eff), np.int64)
        if self._flat_vectors is not None:
            scores, rows = search_unit_rows(normalized, self._flat_vectors, k_eff, scorer=str(self._scorer))
        elif self._refine_factor:
            wide = int(min(self.count, k_eff * self._refine_factor))
            searcher = self._candidate_index if self._candidate_index is not None else self._searcher(wide)
            _, candidates = searcher.search(normalized, wide)
            scores, rows = rerank_exact(normalized, np.asarray(candidates), self._refine_vectors, k_eff)
        else:
            scores, rows = self._searcher(k_eff).search(normalized, k_eff)
        scores = np.asarray(scores, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        missing = rows < 0
        scores[missing] = -np.inf
        if self.ids is not None:
            mapped = self.ids[np.where(missing, 0, rows)]
            rows = np.where(missing, -1, mapped)
        return scores, rows

    def _searcher(self, k: int) -> Any:
        """FAISS GPU indexes return at most 2048 neighbours; larger k searches the CPU copy."""
        return self._cpu_index if self.on_gpu and k > GPU_MAX_K else self._search_index

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the CPU index to ``path`` and its metadata to ``path + ".json"`` (atomically).

        Returns the index path. The sidecar holds the SHA-256 of the index bytes so a
        torn pair of files is refused on load.
        """
        path = Path(path)
        data = index_bytes(self._cpu_index)
        sidecar = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "count": self.count,
            "metric": METRIC,
            "fingerprint": self.fingerprint,
            "index_sha256": hashlib.sha256(data).hexdigest(),
            "ids": None if self.ids is None else [int(i) for i in self.ids],
            "metadata": jsonable(self.metadata),
        }
        checkpoint.atomic_write_bytes(path, data)
        checkpoint.atomic_write_json(sidecar_path(path), sidecar)
        return path

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"FactIndex(kind={self.kind!r}, dim={self.dim}, count={self.count}, fingerprint={self.fingerprint!r}, {where})"


def build_index(vectors: np.ndarray, *, kind: IndexKind = "flat", nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                use_gpu: bool | str = "auto", ids: Iterable[int] | np.ndarray | None = None,
                fingerprint: str | None = None, metadata: dict[str, Any] | None = None,
                target_recall: float = 0.95, calibration_queries: int = 500, seed: int = 0,
                kmeans_iterations: int = 10, train_points_per_cell: int = 64, pq_m: int | None = None,
                pq_bits: int = 8, train_size: int | None = None, refine_factor: int | None = None,
                exact_backend: str = "auto") -> FactIndex:
    """Index ``vectors`` ([n, d], any scale: rows are L2-normalised here) for cosine search.

    ``kind``: "flat" (exact; searched by ``exact_backend``: "auto", "faiss-rescored", "blas", "torch" or "faiss", see
    :func:`~triplets.index.exact.choose_exact_backend`), "ivf" and "ivfpq" (``nlist`` cells,
    default :func:`default_nlist`, k-means on the :func:`training_rows` sample, at most
    ``train_size`` rows when given, ``kmeans_iterations`` iterations; "ivfpq" stores each
    vector as ``pq_m`` codes of ``pq_bits`` bits; ``nprobe`` default: the smallest power of
    two whose cells hold ≥ ``target_recall`` of the exact 10 nearest neighbours of
    ``calibration_queries`` sampled indexed vectors, :func:`calibrate_nprobe_by_cells`;
    "ivfpq" with ``refine_factor`` re-ranks ``refine_factor·k`` candidates exactly, keeping
    the vectors in RAM) or "hnsw" (``hnsw_m`` links per node, ``ef_search``).
    ``ids``: optional int ids returned by :meth:`FactIndex.search` instead of row numbers.
    ``fingerprint``: identifies the model that produced the vectors (checked by
    :func:`load_index`). ``metadata``: extra JSON-serialisable facts saved with the index.
    """
    faiss = common._faiss()
    if kind not in KINDS:
        raise TripletsError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    data = normalize_rows(vectors)
    count, dim = data.shape
    if count == 0 or dim == 0:
        raise TripletsError(f"cannot index an empty array of shape {data.shape}")
    id_array = None
    if ids is not None:
        id_array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if id_array.shape != (count,):
            raise TripletsError(f"ids must have one entry per vector ({count}), got shape {id_array.shape}")
    meta: dict[str, Any] = dict(metadata or {})
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(data)
    elif kind == "hnsw":
        if hnsw_m < 2:
            raise TripletsError(f"hnsw_m must be at least 2, got {hnsw_m}")
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = int(ef_search)
        index.add(data)
        meta.update(hnsw_m=int(hnsw_m), ef_search=int(ef_search))
    else:
        nlist = checked_nlist(nlist, count)
        bits = pq_bits if kind == "ivfpq" else 0
        if kind == "ivfpq":
            pq_m = checked_pq(dim, pq_m, pq_bits)
            refine_factor = checked_refine_factor(refine_factor)
        else:
            refine_factor = None
        rows = training_rows(count, nlist, pq_bits=bits, train_size=train_size,
                             train_points_per_cell=train_points_per_cell, seed=seed)
        ivf = trained_ivf(data[rows], kind=kind, nlist=nlist, pq_m=pq_m or 0, pq_bits=pq_bits, seed=seed,
                          kmeans_iterations=kmeans_iterations)
        index = ivf
        if refine_factor:
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = float(refine_factor)
        index.add(data)
        meta.update(ivf_metadata(ivf, kind=kind, nlist=nlist, train_rows=len(rows), seed=seed,
                                 kmeans_iterations=kmeans_iterations, train_points_per_cell=train_points_per_cell))
        if refine_factor:
            meta.update(refine_factor=refine_factor)
        if nprobe is None:
            query_rows = calibration_rows(count, calibration_queries, seed)
            neighbours = calibration_neighbours(data[query_rows], min(10, count - 1))
            neighbours.add(0, data)
            meta.update(calibrate_ivf(index, ivf.quantizer, query_rows, neighbours, data.__getitem__, nlist,
                                      target_recall))
            warn_unclustered(int(meta["nprobe"]), nlist, target_recall)
        else:
            meta.update(nprobe=checked_nprobe(nprobe, nlist))
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(meta["nprobe"]))
    return FactIndex(index, kind=kind, dim=dim, fingerprint=fingerprint, ids=id_array, metadata=meta,
                     use_gpu=use_gpu, exact_backend=exact_backend)


def load_index(path: str | os.PathLike, expected_fingerprint: str | None = None, *,
               use_gpu: bool | str = "auto", exact_backend: str = "auto") -> FactIndex:
    """Read an index written by :meth:`FactIndex.save` (``exact_backend`` as for :func:`build_index`).

    Raises :class:`RunFolderError` when ``path`` or its ``.json`` sidecar is missing, when
    the index bytes do not match the sidecar's checksum (an interrupted save), or when
    ``expected_fingerprint`` is given and differs from the fingerprint the index was built
    with (the message names both).
    """
    faiss = common._faiss()
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise RunFolderError(f"no index at {path}; build it with triplets.index.build_index(...).save()")
    if not meta_path.is_file():
        raise RunFolderError(f"index {path} has no metadata file {meta_path.name}; rebuild the index")
    sidecar = read_format_file(meta_path, INDEX_FORMAT, INDEX_FORMAT_VERSION, what="index metadata file",
                               owner=f"index {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.get("index_sha256"):
        raise RunFolderError(f"index {path} does not match its metadata checksum (interrupted save?); rebuild the index")
    if expected_fingerprint is not None and sidecar.get("fingerprint") != expected_fingerprint:
        raise RunFolderError(
            f"index {path} was built from model {sidecar.get('fingerprint')}, but the model in use is "
            f"{expected_fingerprint}; delete the index and rebuild it with this model")
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.d != sidecar.get("dim") or index.ntotal != sidecar.get("count"):
        raise RunFolderError(f"index {path} holds {index.ntotal}×{index.d} vectors, its metadata says "
                             f"{sidecar.get('count')}×{sidecar.get('dim')}; rebuild the index")
    ids = sidecar.get("ids")
    return FactIndex(index, kind=sidecar["kind"], dim=int(sidecar["dim"]), fingerprint=sidecar.get("fingerprint"),
                     ids=None if ids is None else np.asarray(ids, dtype=np.int64),
                     metadata=dict(sidecar.get("metadata") or {}), use_gpu=use_gpu, exact_backend=exact_backend)
