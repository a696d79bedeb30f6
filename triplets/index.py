"""FAISS nearest-neighbour indexes over fact and image embeddings (cosine similarity).

Cosine similarity is computed as the inner product of L2-normalised vectors: every
vector added to an index and every query is divided by its Euclidean norm inside
this module (a zero vector stays zero and scores 0 against everything), so callers
pass raw embeddings and get back scores in [-1, 1].

Four kinds of index:

- ``"flat"`` (default): ``faiss.IndexFlatIP``, exact search.
- ``"ivf"``: ``faiss.IndexIVFFlat`` with the inner-product metric, trained by k-means.
  ``nlist`` (number of cells) defaults to ``round(4·sqrt(n))``, capped at ``n // 39`` so
  each centroid has at least 39 training points. ``nprobe`` (cells visited per query)
  defaults to the smallest power of two (then ``nlist``) whose recall@10 on a sample of
  the indexed vectors used as queries (their own entry excluded) reaches
  ``target_recall`` (0.95); the value chosen and the recall measured are kept in
  :attr:`FactIndex.metadata`.
- ``"ivfpq"``: ``faiss.IndexIVFPQ`` with the inner-product metric: IVF cells as for
  ``"ivf"``, each vector stored as the product-quantizer code of its residual to the cell
  centre: ``pq_m`` sub-quantizers (``pq_m`` must divide the dimension; default
  :func:`default_pq_m`, about 8 dimensions each) of ``pq_bits`` bits (default 8), so a
  vector costs ``pq_m·pq_bits/8`` bytes of code + 8 bytes of id instead of ``4·dim``.
  k-means and the PQ codebooks are trained on a bounded sample (:func:`training_rows`),
  so a million-vector build holds at most that sample in memory besides the codes.
  ``nprobe`` defaults to the smallest power of two whose probed cells hold ≥
  ``target_recall`` of the exact 10 nearest neighbours of sampled indexed vectors (the
  recall of the IVF stage alone, :func:`calibrate_nprobe_by_cells`): PQ's coding error
  comes on top and no nprobe removes it, so the end-to-end recall measured at that
  nprobe is kept beside it in :attr:`FactIndex.metadata`. ``refine_factor`` (optional)
  re-ranks ``refine_factor·k`` PQ candidates by their exact inner product
  (``faiss.IndexRefineFlat``), which keeps the full vectors in RAM (+4·dim bytes per vector).
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (``hnsw_m`` links per
  node, ``efSearch`` = ``ef_search``).

Past RAM: :func:`build_sharded_index` trains one coarse quantizer (+ PQ) on a sample of
vectors read chunk by chunk (an array, ``np.memmap``, h5py dataset, or any iterable of
chunks), writes each contiguous id range as its own index file plus a JSON manifest,
and :func:`load_sharded_index` memory-maps the shards (``faiss.IO_FLAG_MMAP``: the
inverted lists stay in the page cache) and searches them together
(``faiss.IndexShards``) returning global ids, as a :class:`ShardedFactIndex`.

GPU: when faiss was built with GPU support and sees a GPU
(``hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0``) flat and
IVF indexes are copied to all GPUs with ``faiss.index_cpu_to_all_gpus`` and searched
there; otherwise the CPU index is used. Nothing changes in the caller's code. FAISS has
no GPU HNSW, so an HNSW index always searches on the CPU. :meth:`FactIndex.save`
always writes the CPU index.

On disk an index is two files: ``PATH`` (``faiss.serialize_index`` bytes) and the
sidecar ``PATH.json`` (format version, kind, dimension, count, the fingerprint of the
model that produced the vectors, the SHA-256 of ``PATH``, the row → id mapping if
any, and free-form ``extra`` metadata). Both are written atomically (temporary file +
rename), the index first, so an interrupted save is detected on load by the checksum.
:func:`load_index` with ``expected_fingerprint`` refuses an index built from another
model's vectors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .errors import RunFolderError, TripletsError

INDEX_FORMAT = "mas-triplets-faiss-index"
INDEX_FORMAT_VERSION = 1
SHARDED_FORMAT = "mas-triplets-sharded-faiss-index"
SHARDED_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
SHARDED_KINDS = ("ivfpq", "ivf")
GPU_MAX_K = 2048
DEFAULT_ROWS_PER_SHARD = 1_000_000
IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw"]


def _faiss():
    try:
        import faiss  # noqa: PLC0415  (heavy import kept out of module import time)
    except ImportError as exc:  # pragma: no cover - faiss is a declared dependency
        raise TripletsError("faiss is not installed; pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = _faiss()
    return bool(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def normalize_rows(vectors: np.ndarray, *, name: str = "vectors") -> np.ndarray:
    """Return ``vectors`` as a C-contiguous float32 [n, d] copy with unit-L2-norm rows.

    v ← v / ‖v‖₂; rows of norm 0 stay 0. Raises :class:`TripletsError` for a non-2-D
    or non-finite input.
    """
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise TripletsError(f"{name} must be a 2-D array [n, d], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise TripletsError(f"{name} must be numeric, got dtype {array.dtype}")
    out = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise TripletsError(f"{name} contain NaN or infinite values; check the model that produced them")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def vectors_fingerprint(vectors: np.ndarray, *, salt: str = "") -> str:
    """A short SHA-256 fingerprint (16 hex digits) of an array's shape, dtype and bytes, plus ``salt``."""
    array = np.ascontiguousarray(vectors)
    digest = hashlib.sha256()
    digest.update(salt.encode("utf-8"))
    digest.update(str(array.dtype).encode("ascii"))
    digest.update(repr(tuple(array.shape)).encode("ascii"))
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: Any) -> str:
    """A short SHA-256 fingerprint (16 hex digits) of a torch module's ``state_dict``.

    Hashes every entry's name, dtype, shape and values in name order, so two models give
    the same fingerprint exactly when their weights and buffers are identical.
    """
    import torch  # noqa: PLC0415

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        digest.update(tensor.reshape(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def default_nlist(count: int) -> int:
    """IVF cells for ``count`` vectors: round(4·sqrt(count)), at most count // 39, at least 1."""
    if count <= 0:
        return 1
    return int(max(1, min(round(4.0 * math.sqrt(count)), count // 39)))


def _recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (ids, -1 entries ignored)."""
    total = 0.0
    for found_row, truth_row in zip(found, truth):
        truth_set = {int(i) for i in truth_row if i >= 0}
        if truth_set:
            total += len(truth_set & {int(i) for i in found_row if i >= 0}) / len(truth_set)
        else:
            total += 1.0
    return total / max(1, len(truth))


class FactIndex:
    """A FAISS cosine-similarity index plus its metadata (kind, dimension, fingerprint, ids).

    Build one with :func:`build_index` or read one with :func:`load_index`. Rows are
    numbered 0..count−1 in insertion order; when ``ids`` was given, :meth:`search`
    returns ``ids[row]`` instead of the row.
    """

    def __init__(self, cpu_index: Any, *, kind: str, dim: int, fingerprint: str | None,
                 ids: np.ndarray | None, metadata: dict[str, Any], use_gpu: bool | str = "auto") -> None:
        self.kind = kind
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        self.metadata: dict[str, Any] = dict(metadata)
        self._cpu_index = cpu_index
        self._search_index = cpu_index
        self.on_gpu = False
        if self.ids is not None and len(self.ids) != cpu_index.ntotal:
            raise TripletsError(f"index has {cpu_index.ntotal} vectors but {len(self.ids)} ids")
        self._place(use_gpu)
        if kind in IVF_KINDS:
            self.nprobe = int(self.metadata.get("nprobe") or 1)
        elif kind == "hnsw":
            self._cpu_index.hnsw.efSearch = int(self.metadata.get("ef_search") or 64)

    # -- placement -------------------------------------------------------------------------
    def _place(self, use_gpu: bool | str) -> None:
        if use_gpu not in ("auto", True, False):
            raise TripletsError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        available = gpu_available()
        if use_gpu is True and not available:
            raise TripletsError("use_gpu=True but faiss sees no GPU; install faiss-gpu or pass use_gpu='auto'")
        if not available or use_gpu is False or self.kind == "hnsw" or self.metadata.get("refine_factor"):
            return  # FAISS has no GPU HNSW, and its GPU cloner does not take an IndexRefineFlat
        faiss = _faiss()
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
        faiss = _faiss()
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
        faiss = _faiss()
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
        approximate index found fewer than k' neighbours.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TripletsError(f"k must be a positive integer, got {k!r}")
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
        if k_eff == 0:
            return np.zeros((len(normalized), 0), np.float32), np.zeros((len(normalized), 0), np.int64)
        # FAISS GPU indexes return at most 2048 neighbours; larger k searches the CPU copy
        searcher = self._cpu_index if self.on_gpu and k_eff > GPU_MAX_K else self._search_index
        scores, rows = searcher.search(normalized, k_eff)
        scores = np.asarray(scores, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        missing = rows < 0
        scores[missing] = -np.inf
        if self.ids is not None:
            mapped = self.ids[np.where(missing, 0, rows)]
            rows = np.where(missing, -1, mapped)
        return scores, rows

    def reconstruct_all(self) -> np.ndarray:
        """The indexed (normalised) vectors, float32 [count, dim] (flat and hnsw kinds)."""
        if self.kind in IVF_KINDS:
            raise TripletsError(f"an {self.kind} index keeps no row order to reconstruct from; use a flat index")
        return np.asarray(self._cpu_index.reconstruct_n(0, self.count), dtype=np.float32)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the CPU index to ``path`` and its metadata to ``path + ".json"`` (atomically).

        Returns the index path. The sidecar holds the SHA-256 of the index bytes so a
        torn pair of files is refused on load.
        """
        from mas_core.checkpoint import atomic_write_bytes, atomic_write_json

        faiss = _faiss()
        path = Path(path)
        data = np.asarray(faiss.serialize_index(self._cpu_index), dtype=np.uint8).tobytes()
        sidecar = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "count": self.count,
            "metric": "inner product of L2-normalised vectors (cosine)",
            "fingerprint": self.fingerprint,
            "index_sha256": hashlib.sha256(data).hexdigest(),
            "ids": None if self.ids is None else [int(i) for i in self.ids],
            "metadata": _jsonable(self.metadata),
        }
        atomic_write_bytes(path, data)
        atomic_write_json(sidecar_path(path), sidecar)
        return path

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"FactIndex(kind={self.kind!r}, dim={self.dim}, count={self.count}, fingerprint={self.fingerprint!r}, {where})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def sidecar_path(path: str | os.PathLike) -> Path:
    """The metadata file of the index at ``path``: ``path + ".json"``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def build_index(vectors: np.ndarray, *, kind: IndexKind = "flat", nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                use_gpu: bool | str = "auto", ids: Iterable[int] | np.ndarray | None = None,
                fingerprint: str | None = None, metadata: dict[str, Any] | None = None,
                target_recall: float = 0.95, calibration_queries: int = 500, seed: int = 0,
                kmeans_iterations: int = 10, train_points_per_cell: int = 64, pq_m: int | None = None,
                pq_bits: int = 8, train_size: int | None = None, refine_factor: int | None = None) -> FactIndex:
    """Index ``vectors`` ([n, d], any scale: rows are L2-normalised here) for cosine search.

    ``kind``: "flat" (exact), "ivf" (``nlist`` cells, default :func:`default_nlist`; ``nprobe``
    default: calibrated to recall@10 ≥ ``target_recall`` on ``calibration_queries`` sampled
    indexed vectors), "ivfpq" (IVF cells as for "ivf", vectors stored as ``pq_m`` codes of
    ``pq_bits`` bits, see the module docstring; ``nprobe`` default calibrated by
    :func:`calibrate_nprobe_by_cells`; trained on the :func:`training_rows` sample, at most
    ``train_size`` rows when given; ``refine_factor`` re-ranks ``refine_factor·k`` candidates
    exactly, keeping the vectors in RAM) or "hnsw" (``hnsw_m`` links per node, ``ef_search``).
    ``ids``: optional int ids returned by :meth:`FactIndex.search` instead of row numbers. IVF
    k-means runs ``kmeans_iterations`` iterations on at most ``train_points_per_cell · nlist``
    sampled vectors. ``fingerprint``: identifies the model that produced the vectors (checked
    by :func:`load_index`). ``metadata``: extra JSON-serialisable facts saved with the index.
    """
    faiss = _faiss()
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
    elif kind == "ivfpq":
        nlist = _checked_nlist(nlist, count)
        pq_m = _checked_pq(dim, pq_m, pq_bits)
        refine_factor = _checked_refine_factor(refine_factor)
        rows = training_rows(count, nlist, pq_bits=pq_bits, train_size=train_size,
                             train_points_per_cell=train_points_per_cell, seed=seed)
        ivfpq = _trained_ivf(data[rows], kind="ivfpq", nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, seed=seed,
                             kmeans_iterations=kmeans_iterations)
        index = ivfpq
        if refine_factor:
            index = faiss.IndexRefineFlat(ivfpq)
            index.k_factor = float(refine_factor)
        index.add(data)
        meta.update(_ivf_metadata(ivfpq, kind="ivfpq", nlist=nlist, train_rows=len(rows), seed=seed,
                                  kmeans_iterations=kmeans_iterations, train_points_per_cell=train_points_per_cell))
        if refine_factor:
            meta.update(refine_factor=refine_factor)
        if nprobe is None:
            query_rows = calibration_rows(count, calibration_queries, seed)
            running = _RunningTopK(data[query_rows], min(10, count - 1) + 1)
            running.update(0, data)
            meta.update(_calibrate_ivf(index, ivfpq.quantizer, data[query_rows], query_rows, running, data.__getitem__,
                                       nlist, target_recall))
            _warn_unclustered(int(meta["nprobe"]), nlist, target_recall)
        else:
            meta.update(nprobe=_checked_nprobe(nprobe, nlist))
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(meta["nprobe"]))
    else:
        nlist = _checked_nlist(nlist, count)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        index.cp.niter = int(kmeans_iterations)
        index.cp.max_points_per_centroid = int(train_points_per_cell)
        index.train(data)
        index.add(data)
        meta.update(nlist=nlist, kmeans_iterations=int(kmeans_iterations), train_points_per_cell=int(train_points_per_cell))
        if nprobe is None:
            nprobe, recall = _calibrate_nprobe(index, data, nlist, target_recall, calibration_queries, seed)
            meta.update(nprobe=nprobe, calibrated_recall_at_10=recall, target_recall=target_recall)
            _warn_unclustered(nprobe, nlist, target_recall)
        else:
            meta.update(nprobe=_checked_nprobe(nprobe, nlist))
        index.nprobe = int(meta["nprobe"])
    return FactIndex(index, kind=kind, dim=dim, fingerprint=fingerprint, ids=id_array, metadata=meta,
                     use_gpu=use_gpu)


def _warn_unclustered(nprobe: int, nlist: int, target_recall: float) -> None:
    if nprobe > max(1, nlist // 4):
        warnings.warn(
            f"IVF needs nprobe={nprobe} of nlist={nlist} cells for recall@10 ≥ {target_recall}: these vectors "
            "have no cluster structure for IVF to use, and a flat index will be faster", stacklevel=3)


def _checked_nlist(nlist: int | None, count: int) -> int:
    nlist = default_nlist(count) if nlist is None else int(nlist)
    if not 1 <= nlist <= count:
        raise TripletsError(f"nlist must be in 1..{count} (the number of vectors), got {nlist}")
    return nlist


def _checked_nprobe(nprobe: int, nlist: int) -> int:
    if isinstance(nprobe, bool) or not 1 <= int(nprobe) <= nlist:
        raise TripletsError(f"nprobe must be in 1..nlist={nlist}, got {nprobe}")
    return int(nprobe)


def _checked_refine_factor(refine_factor: int | None) -> int | None:
    if refine_factor is None or refine_factor == 0:
        return None
    if isinstance(refine_factor, bool) or not isinstance(refine_factor, (int, np.integer)) or refine_factor < 1:
        raise TripletsError(f"refine_factor must be a positive integer (or None for no re-ranking), got {refine_factor!r}")
    return int(refine_factor)


def pq_m_choices(dim: int) -> list[int]:
    """The valid ``pq_m`` (product-quantizer sub-quantizers) for ``dim``: the divisors of ``dim``."""
    return [m for m in range(1, int(dim) + 1) if dim % m == 0]


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for ``dim`` dimensions: the divisor of ``dim`` nearest to dim / 8 (the larger on a
    tie), i.e. about 8 dimensions per 8-bit code byte: a code of ≈ dim/8 bytes, 1/32 of flat's 4·dim
    (384 → 48, 1152 → 144, 64 → 8)."""
    return min(pq_m_choices(dim), key=lambda m: (abs(dim / m - 8.0), -m))


def _checked_pq(dim: int, pq_m: int | None, pq_bits: int) -> int:
    pq_m = default_pq_m(dim) if pq_m is None else pq_m
    if isinstance(pq_m, bool) or not isinstance(pq_m, (int, np.integer)) or pq_m < 1 or dim % int(pq_m) != 0:
        choices = pq_m_choices(dim)
        shown = ", ".join(str(m) for m in choices[:24]) + (", …" if len(choices) > 24 else "")
        raise TripletsError(f"pq_m={pq_m!r} does not divide the dimension {dim}; use one of its divisors: {shown}")
    if isinstance(pq_bits, bool) or not isinstance(pq_bits, (int, np.integer)) or not 1 <= pq_bits <= 16:
        raise TripletsError(f"pq_bits must be an integer in 1..16 (8 is the fast, usual choice), got {pq_bits!r}")
    return int(pq_m)


def training_rows(count: int, nlist: int, *, pq_bits: int = 8, train_size: int | None = None,
                  train_points_per_cell: int = 64, seed: int = 0) -> np.ndarray:
    """Sorted rows (int64) of the sample an IVF / IVF-PQ index is trained on.

    Size: ``min(count, train_size)`` when ``train_size`` is given, else
    ``min(count, max(train_points_per_cell·nlist, 64·2**pq_bits))`` (enough points per
    k-means centre for the cells and for each sub-quantizer's 2**pq_bits centroids),
    drawn without replacement by ``numpy.random.default_rng(seed)``. Bounding the sample
    bounds the build's memory: the sample is the only float32 block held besides one chunk.
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


def _trained_ivf(sample: np.ndarray, *, kind: str, nlist: int, pq_m: int = 0, pq_bits: int = 8, seed: int = 0,
                 kmeans_iterations: int = 10) -> Any:
    """An empty IndexIVFPQ ("ivfpq") or IndexIVFFlat ("ivf") over inner product, trained on ``sample``
    (unit rows): k-means (``kmeans_iterations`` iterations, seed ``seed``) on the whole sample for
    the ``nlist`` cells, then for "ivfpq" the PQ codebooks on the sample's residuals."""
    faiss = _faiss()
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


def _ivf_metadata(ivf: Any, *, kind: str, nlist: int, train_rows: int, seed: int, kmeans_iterations: int,
                  train_points_per_cell: int) -> dict[str, Any]:
    meta: dict[str, Any] = dict(nlist=int(nlist), kmeans_iterations=int(kmeans_iterations),
                                train_points_per_cell=int(train_points_per_cell), train_rows=int(train_rows),
                                seed=int(seed), code_size=int(ivf.code_size))
    if kind == "ivfpq":
        meta.update(pq_m=int(ivf.pq.M), pq_bits=int(ivf.pq.nbits))
    return meta


class _RunningTopK:
    """The ``k`` largest inner products of each query with the database rows seen so far.

    :meth:`update` takes database chunks (unit rows) with the global row of their first
    vector; scores are float32 matrix products, so memory is q·(k + block) floats.
    """

    def __init__(self, queries: np.ndarray, k: int, block_rows: int = 16384) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        self.block_rows = int(block_rows)
        self.scores = np.full((len(queries), self.k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), self.k), -1, dtype=np.int64)

    def update(self, first_row: int, chunk: np.ndarray) -> None:
        for start in range(0, len(chunk), self.block_rows):
            block = chunk[start:start + self.block_rows]
            scores = np.concatenate([self.scores, self.queries @ block.T], axis=1)
            rows = np.arange(first_row + start, first_row + start + len(block), dtype=np.int64)
            ids = np.concatenate([self.ids, np.broadcast_to(rows, (len(scores), len(rows)))], axis=1)
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            self.scores = np.take_along_axis(scores, keep, axis=1)
            self.ids = np.take_along_axis(ids, keep, axis=1)

    def best_ids(self) -> np.ndarray:
        """int64 [q, k]: the ids found so far, best first (equal scores: lower id first)."""
        order = np.lexsort((self.ids, -self.scores), axis=1)
        return np.take_along_axis(self.ids, order, axis=1)


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


def _calibrate_ivf(index: Any, quantizer: Any, queries: np.ndarray, query_rows: np.ndarray, running: _RunningTopK,
                   read_rows: Any, nlist: int, target_recall: float) -> dict[str, Any]:
    """nprobe by :func:`calibrate_nprobe_by_cells`, then the end-to-end recall@10 of ``index`` there.

    ``running``: exact top k+1 of ``queries`` (which are the indexed rows ``query_rows``)
    over every indexed vector; ``read_rows(sorted rows)`` returns those indexed vectors
    (normalised) so their cells can be looked up. Self matches are excluded throughout.
    """
    faiss = _faiss()
    k = running.k - 1
    if k < 1:
        return dict(nprobe=nlist, calibrated_cell_recall_at_10=1.0, calibrated_recall_at_10=1.0,
                    target_recall=target_recall)
    truth = _drop_self(running.best_ids(), query_rows, k)
    wanted = np.unique(truth[truth >= 0])
    cells_of_wanted = quantizer.assign(normalize_rows(np.asarray(read_rows(wanted))), 1)[:, 0]
    neighbour_cells = np.where(truth >= 0, cells_of_wanted[np.searchsorted(wanted, np.where(truth >= 0, truth, wanted[0]))], -1)
    nprobe, cell_recall = calibrate_nprobe_by_cells(quantizer, queries, neighbour_cells, nlist, target_recall)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
    recall = _recall_at_k(_drop_self(np.asarray(found), query_rows, k), truth)
    return dict(nprobe=int(nprobe), calibrated_cell_recall_at_10=cell_recall, calibrated_recall_at_10=recall,
                target_recall=target_recall)


def _calibrate_nprobe(index: Any, data: np.ndarray, nlist: int, target_recall: float,
                      calibration_queries: int, seed: int) -> tuple[int, float]:
    """Smallest nprobe in (1, 2, 4, …, nlist) with recall@10 ≥ target on sampled indexed vectors.

    Each sampled vector is a query; its own row is removed from both the exact and the
    approximate neighbour lists, so the calibration measures real neighbours.
    """
    faiss = _faiss()
    count, dim = data.shape
    rng = np.random.default_rng(seed)
    sample = rng.choice(count, size=min(calibration_queries, count), replace=False)
    queries = data[sample]
    k = min(10, count - 1)
    if k < 1:
        return nlist, 1.0
    exact = faiss.IndexFlatIP(dim)
    exact.add(data)
    _, truth = exact.search(queries, k + 1)
    truth = _drop_self(truth, sample, k)
    candidates = sorted({min(nlist, 2 ** p) for p in range(0, int(math.ceil(math.log2(nlist))) + 1)} | {nlist})
    recall = 0.0
    for nprobe in candidates:
        index.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        recall = _recall_at_k(_drop_self(found, sample, k), truth)
        if recall >= target_recall:
            return int(nprobe), float(recall)
    return int(nlist), float(recall)


def _drop_self(neighbours: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(neighbours), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(neighbours, self_rows)):
        kept = [int(i) for i in found if i != own][:k]
        out[row, : len(kept)] = kept
    return out


def load_index(path: str | os.PathLike, expected_fingerprint: str | None = None, *,
               use_gpu: bool | str = "auto") -> FactIndex:
    """Read an index written by :meth:`FactIndex.save`.

    Raises :class:`RunFolderError` when ``path`` or its ``.json`` sidecar is missing, when
    the index bytes do not match the sidecar's checksum (an interrupted save), or when
    ``expected_fingerprint`` is given and differs from the fingerprint the index was built
    with (the message names both).
    """
    faiss = _faiss()
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise RunFolderError(f"no index at {path}; build it with triplets.index.build_index(...).save()")
    if not meta_path.is_file():
        raise RunFolderError(f"index {path} has no metadata file {meta_path.name}; rebuild the index")
    sidecar = _read_format_file(meta_path, INDEX_FORMAT, INDEX_FORMAT_VERSION, what="index metadata file",
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
                     metadata=dict(sidecar.get("metadata") or {}), use_gpu=use_gpu)


# -- indexes past RAM: IVF shards on disk ---------------------------------------------------

VECTORS_FILE = "vectors.npy"


def shard_file_name(number: int, num_shards: int) -> str:
    """The file of shard ``number`` (0-based) of ``num_shards``: ``shard-00000-of-00004.faiss``."""
    return f"shard-{number:05d}-of-{num_shards:05d}.faiss"


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [first, end) global-id ranges of ``num_shards`` shards of ``count`` vectors
    (shard i: ⌊i·count/num_shards⌋ ≤ id < ⌊(i+1)·count/num_shards⌋, sizes differing by at most 1)."""
    edges = [number * count // num_shards for number in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _RowSource:
    """Row-range and row-set reads of float32 vectors from a 2-D array-like (numpy array,
    ``np.memmap``, h5py dataset, zarr array: anything with ``.shape`` and slicing)."""

    def __init__(self, array: Any) -> None:
        shape = tuple(getattr(array, "shape", ()))
        if len(shape) != 2:
            raise TripletsError(f"vectors must be 2-D [n, d], got shape {shape}")
        self.array = array
        self.count, self.dim = int(shape[0]), int(shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop−1 as float32 [stop − start, dim]."""
        return np.asarray(self.array[start:stop], dtype=np.float32)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The given sorted, distinct rows as float32 [len(rows), dim] (h5py needs them increasing)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if isinstance(self.array, np.ndarray):
            return np.asarray(self.array[rows], dtype=np.float32)
        return np.asarray(self.array[rows.tolist()], dtype=np.float32)


def _spill_chunks(chunks: Iterable[Any], folder: Path) -> tuple[np.memmap, Path]:
    """Write an iterable of 2-D chunks as raw float32 rows to a temporary file in ``folder``,
    one chunk in memory at a time; return (a read-only memmap [n, d] of it, its path)."""
    fd, name = tempfile.mkstemp(prefix=".spill-", suffix=".f32.tmp", dir=folder)
    path = Path(name)
    dim: int | None = None
    count = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for number, chunk in enumerate(chunks):
                array = np.asarray(chunk)
                if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
                    raise TripletsError(
                        f"vector chunk {number} must be a numeric 2-D array [rows, d], got shape {array.shape} "
                        f"and dtype {array.dtype}")
                if dim is None:
                    dim = int(array.shape[1])
                elif array.shape[1] != dim:
                    raise TripletsError(f"vector chunk {number} has {array.shape[1]} columns, the first had {dim}")
                handle.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
                count += len(array)
        if dim is None or count == 0:
            raise TripletsError("the vector chunks are empty: nothing to index")
        return np.memmap(path, dtype=np.float32, mode="r", shape=(count, dim)), path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _remove_previous_index(folder: Path) -> None:
    """Remove a previous sharded index from ``folder``: its manifest first (so the folder never
    looks complete meanwhile), then shard and vector files and leftover temporary files."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for pattern in ("shard-*-of-*.faiss", VECTORS_FILE, ".shard-*.tmp", ".vectors-*.tmp", ".spill-*.tmp",
                    f".{MANIFEST_NAME}.*.tmp"):
        for stale in folder.glob(pattern):
            if stale.is_file():
                stale.unlink()


def _write_index_file(path: Path, cpu_index: Any) -> tuple[int, str]:
    """Serialise ``cpu_index`` to ``path`` atomically (temporary file + rename); return (bytes, SHA-256)."""
    from mas_core.checkpoint import atomic_write_bytes  # noqa: PLC0415

    faiss = _faiss()
    data = np.asarray(faiss.serialize_index(cpu_index), dtype=np.uint8).tobytes()
    atomic_write_bytes(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def build_sharded_index(vectors: Any, out_dir: str | os.PathLike, *, kind: str = "ivfpq",
                        num_shards: int | None = None, nlist: int | None = None, nprobe: int | None = None,
                        pq_m: int | None = None, pq_bits: int = 8, train_size: int | None = None,
                        train_points_per_cell: int = 64, kmeans_iterations: int = 10,
                        target_recall: float = 0.95, calibration_queries: int = 500,
                        refine_factor: int | None = None, chunk_rows: int = 65536, seed: int = 0,
                        fingerprint: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Build an IVF-PQ (or IVF-Flat, ``kind="ivf"``) index too large for RAM as shard files in ``out_dir``.

    ``vectors``: a 2-D array-like [n, d] read by row ranges (numpy array, ``np.memmap``,
    h5py dataset), or any iterable of 2-D chunks, which is first spilled to a temporary
    float32 file in ``out_dir`` (4·n·d bytes of disk, removed afterwards). Rows are
    L2-normalised chunk by chunk; the id of a vector is its global row 0..n−1.

    Steps: one coarse quantizer (+ PQ codebooks) trained on the :func:`training_rows` sample
    (the same sample, seed and code as :func:`build_index`, so both give the same trained
    index); ``num_shards`` (default ⌈n / 1,000,000⌉) contiguous id ranges
    (:func:`shard_bounds`), each added ``chunk_rows`` rows at a time with its global ids
    to a copy of the trained index and written atomically (``shard-00000-of-00004.faiss``, …);
    ``nprobe`` (when None) calibrated as in :func:`build_index` for "ivfpq" (the exact
    neighbours of the calibration queries are found in the same pass); with
    ``refine_factor`` the normalised vectors also go to ``vectors.npy`` (4·d bytes per
    vector on disk) for exact re-ranking of ``refine_factor·k`` candidates at search time;
    last, ``manifest.json`` (format, kind, dim, count, fingerprint, metadata, and per shard
    its file, id range, byte size and SHA-256). Peak memory: the training sample, one chunk
    and one shard's codes (≈ (code_size + 8) bytes per vector of the shard).

    A previous index in ``out_dir`` is removed first (manifest first). If the build fails or
    is interrupted, the files it wrote are removed and no manifest exists, so
    :func:`load_sharded_index` refuses the folder. Returns the manifest's path.
    """
    from mas_core.checkpoint import atomic_write_json  # noqa: PLC0415

    faiss = _faiss()
    if kind not in SHARDED_KINDS:
        raise TripletsError(f"a sharded index is one of {', '.join(SHARDED_KINDS)}, got kind {kind!r}")
    if isinstance(chunk_rows, bool) or int(chunk_rows) < 1:
        raise TripletsError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    refine_factor = _checked_refine_factor(refine_factor)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise TripletsError(f"{folder} exists and is not a folder; give build_sharded_index a folder for the shards")
    folder.mkdir(parents=True, exist_ok=True)
    spill_path: Path | None = None
    written: list[Path] = []
    try:
        if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__"):
            source = _RowSource(vectors)
        elif isinstance(vectors, (str, bytes)) or not isinstance(vectors, Iterable):
            raise TripletsError("vectors must be a 2-D array-like (numpy array, np.memmap, h5py dataset) "
                                f"or an iterable of 2-D chunks, got {type(vectors).__name__}")
        else:
            spilled, spill_path = _spill_chunks(vectors, folder)
            source = _RowSource(spilled)
        count, dim = source.count, source.dim
        if count == 0 or dim == 0:
            raise TripletsError(f"cannot index an empty array of shape {(count, dim)}")
        if num_shards is None:
            num_shards = max(1, math.ceil(count / DEFAULT_ROWS_PER_SHARD))
        if isinstance(num_shards, bool) or not 1 <= int(num_shards) <= count:
            raise TripletsError(f"num_shards must be in 1..{count} (the number of vectors), got {num_shards!r}")
        num_shards = int(num_shards)
        nlist = _checked_nlist(nlist, count)
        if kind == "ivfpq":
            pq_m = _checked_pq(dim, pq_m, pq_bits)
        if nprobe is not None:
            nprobe = _checked_nprobe(nprobe, nlist)
        _remove_previous_index(folder)

        rows = training_rows(count, nlist, pq_bits=pq_bits if kind == "ivfpq" else 0, train_size=train_size,
                             train_points_per_cell=train_points_per_cell, seed=seed)
        trained = _trained_ivf(normalize_rows(source.rows(rows)), kind=kind, nlist=nlist, pq_m=pq_m or 0,
                               pq_bits=pq_bits, seed=seed, kmeans_iterations=kmeans_iterations)
        meta: dict[str, Any] = dict(metadata or {})
        meta.update(_ivf_metadata(trained, kind=kind, nlist=nlist, train_rows=len(rows), seed=seed,
                                  kmeans_iterations=kmeans_iterations, train_points_per_cell=train_points_per_cell))
        running: _RunningTopK | None = None
        if nprobe is None:
            query_rows = calibration_rows(count, calibration_queries, seed)
            queries = normalize_rows(source.rows(query_rows))
            running = _RunningTopK(queries, min(10, count - 1) + 1)

        store = None
        if refine_factor:
            fd, store_name = tempfile.mkstemp(prefix=".vectors-", suffix=".npy.tmp", dir=folder)
            os.close(fd)
            store_path = Path(store_name)
            written.append(store_path)
            store = np.lib.format.open_memmap(store_path, mode="w+", dtype=np.float32, shape=(count, dim))

        shards: list[dict[str, Any]] = []
        for number, (first, end) in enumerate(shard_bounds(count, num_shards)):
            shard = faiss.clone_index(trained)
            for start in range(first, end, int(chunk_rows)):
                stop = min(end, start + int(chunk_rows))
                chunk = normalize_rows(source.read(start, stop))
                shard.add_with_ids(chunk, np.arange(start, stop, dtype=np.int64))
                if running is not None:
                    running.update(start, chunk)
                if store is not None:
                    store[start:stop] = chunk
            path = folder / shard_file_name(number, num_shards)
            written.append(path)
            size, digest = _write_index_file(path, shard)
            shards.append({"file": path.name, "first_id": int(first), "end_id": int(end), "count": int(end - first),
                           "bytes": int(size), "sha256": digest})
            del shard

        vectors_file = None
        if store is not None:
            store.flush()
            del store
            final = folder / VECTORS_FILE
            os.replace(store_path, final)
            written.append(final)
            vectors_file = final.name
            meta.update(refine_factor=refine_factor)

        if running is not None:
            opened = [_read_shard(folder / shard["file"], mmap=True) for shard in shards]
            combined = faiss.IndexShards(dim, False, False)
            for shard in opened:
                combined.add_shard(shard)
            meta.update(_calibrate_ivf(combined, trained.quantizer, running.queries, query_rows, running,
                                       lambda wanted: source.rows(wanted), nlist, target_recall))
            del combined, opened
            _warn_unclustered(int(meta["nprobe"]), nlist, target_recall)
        else:
            meta.update(nprobe=int(nprobe))
        manifest = {
            "format": SHARDED_FORMAT,
            "format_version": SHARDED_FORMAT_VERSION,
            "kind": kind,
            "dim": int(dim),
            "count": int(count),
            "metric": "inner product of L2-normalised vectors (cosine)",
            "fingerprint": fingerprint,
            "ids": "global row of the input, 0..count-1",
            "shards": shards,
            "vectors_file": vectors_file,
            "metadata": _jsonable(meta),
        }
        manifest_path = folder / MANIFEST_NAME
        atomic_write_json(manifest_path, manifest)
        return manifest_path
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        if spill_path is not None:
            spill_path.unlink(missing_ok=True)


class ShardedFactIndex(FactIndex):
    """A :class:`FactIndex` over the IVF shard files written by :func:`build_sharded_index`.

    The shards are searched together by ``faiss.IndexShards(successive_ids=False)`` on the
    CPU, so :meth:`search` returns global ids (the input rows); ``nprobe`` is set on every
    shard. With a GPU (faiss-gpu), the shards are merged in RAM and spread over all GPUs
    with ``index_cpu_to_all_gpus(..., GpuMultipleClonerOptions(shard=True))``: that path is
    untested on hardware. With ``refine_factor`` and a ``vectors.npy`` beside the shards,
    :meth:`search` takes ``refine_factor·k`` candidates and re-ranks them by their exact
    inner product read from that memory-mapped file; otherwise scores are PQ estimates.
    FAISS's GPU IVF-PQ takes only some code sizes (at 8 bits: 1–4, 8, 12, …, 64, 96 bytes per
    vector, per the FAISS wiki), so e.g. ``default_pq_m(1152) = 144`` would need ``pq_m=96``
    or 48 there.
    """

    def __init__(self, shards: Sequence[Any], *, folder: Path, manifest: dict[str, Any],
                 vectors: np.ndarray | None = None, refine_factor: int | None = None,
                 use_gpu: bool | str = "auto") -> None:
        faiss = _faiss()
        self.folder = Path(folder)
        self.manifest = manifest
        self.shard_paths = [self.folder / shard["file"] for shard in manifest["shards"]]
        self._shards = list(shards)
        self._vectors = vectors
        combined = faiss.IndexShards(int(manifest["dim"]), False, False)  # sequential shards, ids as stored
        for shard in self._shards:
            combined.add_shard(shard)
        super().__init__(combined, kind=manifest["kind"], dim=int(manifest["dim"]),
                         fingerprint=manifest.get("fingerprint"), ids=None,
                         metadata=dict(manifest.get("metadata") or {}), use_gpu=use_gpu)
        self.refine_factor = refine_factor

    def _place(self, use_gpu: bool | str) -> None:
        if use_gpu not in ("auto", True, False):
            raise TripletsError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        available = gpu_available()
        if use_gpu is True and not available:
            raise TripletsError("use_gpu=True but faiss sees no GPU; install faiss-gpu or pass use_gpu='auto'")
        if not available or use_gpu is False:
            return
        # Untested on hardware: one CPU IVF index holding every shard's lists, split over the GPUs.
        faiss = _faiss()
        merged = faiss.read_index(str(self.shard_paths[0]))
        for path in self.shard_paths[1:]:
            merged.merge_from(faiss.read_index(str(path)), 0)
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        self._search_index = faiss.index_cpu_to_all_gpus(merged, co=options)
        self.on_gpu = True

    @property
    def refine_factor(self) -> int | None:
        """Candidates re-ranked exactly per result (refine_factor·k), None when off or no vectors file."""
        return self._refine_factor

    @refine_factor.setter
    def refine_factor(self, value: int | None) -> None:
        value = _checked_refine_factor(value)
        if value and self._vectors is None:
            raise TripletsError(f"the index in {self.folder} has no {VECTORS_FILE} to re-rank from; "
                                "build it with build_sharded_index(..., refine_factor=N)")
        self._refine_factor = value

    @property
    def index_bytes(self) -> int:
        """Bytes of the shard files (= RAM of the shards read without mmap): codes, ids, list headers,
        and each shard's copy of the coarse centroids and PQ codebooks. ``vectors.npy`` is not counted."""
        return int(sum(int(shard["bytes"]) for shard in self.manifest["shards"]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`FactIndex.search`; ids are global. With :attr:`refine_factor`, the best k of
        refine_factor·k candidates by exact inner product (scores exact cosines), else PQ scores."""
        if not self._refine_factor:
            return super().search(queries, k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TripletsError(f"k must be a positive integer, got {k!r}")
        k_eff = int(min(k, self.count))
        _, candidates = super().search(queries, int(min(self.count, k_eff * self._refine_factor)))
        array = np.asarray(queries)
        normalized = normalize_rows(array[None, :] if array.ndim == 1 else array, name="queries")
        scores_out = np.full((len(normalized), k_eff), -np.inf, dtype=np.float32)
        ids_out = np.full((len(normalized), k_eff), -1, dtype=np.int64)
        for start in range(0, len(normalized), 256):
            block = candidates[start:start + 256]
            found = block >= 0
            wanted = np.unique(block[found])
            if len(wanted) == 0:
                continue
            rows = np.asarray(self._vectors[wanted], dtype=np.float32)  # sorted reads from the memmap
            exact = normalized[start:start + 256] @ rows.T  # [queries, distinct candidates]
            position = np.searchsorted(wanted, np.where(found, block, wanted[0]))
            scores = np.where(found, np.take_along_axis(exact, position, axis=1), -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
            best = np.take_along_axis(scores, order, axis=1)
            scores_out[start:start + 256] = best
            ids_out[start:start + 256] = np.where(np.isfinite(best), np.take_along_axis(block, order, axis=1), -1)
        return scores_out, ids_out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Copy the shard files (and ``vectors.npy``) and then the manifest to ``out_dir``, each
        atomically (temporary file + rename). Returns the new manifest's path."""
        from mas_core.checkpoint import atomic_write_json  # noqa: PLC0415

        target = Path(out_dir)
        if target.resolve() == self.folder.resolve():
            return target / MANIFEST_NAME
        target.mkdir(parents=True, exist_ok=True)
        _remove_previous_index(target)
        names = [shard["file"] for shard in self.manifest["shards"]]
        if self.manifest.get("vectors_file"):
            names.append(self.manifest["vectors_file"])
        for name in names:
            fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
            os.close(fd)
            try:
                shutil.copyfile(self.folder / name, temporary)
                os.replace(temporary, target / name)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        manifest = dict(self.manifest, metadata=_jsonable(self.metadata))
        atomic_write_json(target / MANIFEST_NAME, manifest)
        return target / MANIFEST_NAME

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return (f"ShardedFactIndex(kind={self.kind!r}, dim={self.dim}, count={self.count}, "
                f"shards={len(self.shard_paths)}, folder={str(self.folder)!r}, {where})")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_shard(path: Path, mmap: bool) -> Any:
    """``faiss.read_index`` with ``IO_FLAG_MMAP`` (inverted lists memory-mapped, not copied) when
    ``mmap`` and the installed faiss supports it for this file; a plain read otherwise."""
    faiss = _faiss()
    if mmap and hasattr(faiss, "IO_FLAG_MMAP"):
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:
            warnings.warn(f"faiss cannot memory-map {path.name} ({str(exc).splitlines()[0]}); reading it into RAM",
                          stacklevel=3)
    return faiss.read_index(str(path))


def _read_format_file(path: Path, expected_format: str, expected_version: int, *, what: str,
                      owner: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format``/``format_version`` must be the given ones;
    a :class:`RunFolderError` saying "rebuild the index" otherwise."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{what} {path} is not valid JSON ({getattr(exc, 'msg', exc)}); rebuild the index") from None
    if not isinstance(content, dict) or content.get("format") != expected_format:
        raise RunFolderError(f"{path} is not a mas-triplets {what}; rebuild the index")
    if content.get("format_version") != expected_version:
        raise RunFolderError(f"{owner} has format version {content.get('format_version')}, this code reads "
                             f"{expected_version}; rebuild the index")
    return content


def load_sharded_index(path: str | os.PathLike, expected_fingerprint: str | None = None, *, mmap: bool = True,
                       use_gpu: bool | str = "auto", verify_checksums: bool = True,
                       refine_factor: int | None | Literal["manifest"] = "manifest") -> ShardedFactIndex:
    """Open the sharded index in folder ``path`` (or at its ``manifest.json``) for search.

    ``mmap``: open each shard with ``faiss.IO_FLAG_MMAP`` (the inverted lists are memory-mapped
    from the file, so they cost page cache, not process memory; falls back to reading into
    RAM, with a warning, where faiss cannot). ``verify_checksums`` streams every shard file
    through SHA-256 against the manifest (byte sizes are always checked). ``refine_factor``:
    the manifest's value by default (``"manifest"``), None/0 for PQ scores only, or N ≥ 1 to re-rank
    N·k candidates from ``vectors.npy``. ``use_gpu`` as for :class:`FactIndex`.

    Raises :class:`RunFolderError` (one line saying what to do) when the manifest is missing or
    not a manifest, a shard file is missing, truncated or altered, a shard's dimension or size
    disagrees with the manifest, or ``expected_fingerprint`` differs from the manifest's.
    """
    location = Path(path)
    manifest_path = location / MANIFEST_NAME if location.is_dir() or location.suffix != ".json" else location
    folder = manifest_path.parent
    if not manifest_path.is_file():
        raise RunFolderError(f"no sharded index manifest at {manifest_path}; build the index with "
                             "triplets.index.build_sharded_index(vectors, folder)")
    manifest = _read_format_file(manifest_path, SHARDED_FORMAT, SHARDED_FORMAT_VERSION,
                                 what="sharded index manifest", owner=f"sharded index {folder}")
    if expected_fingerprint is not None and manifest.get("fingerprint") != expected_fingerprint:
        raise RunFolderError(
            f"sharded index {folder} was built from model {manifest.get('fingerprint')}, but the model in use is "
            f"{expected_fingerprint}; delete the index and rebuild it with this model")
    dim, count = int(manifest["dim"]), int(manifest["count"])
    shards = []
    for entry in manifest["shards"]:
        shard_path = folder / entry["file"]
        if not shard_path.is_file():
            raise RunFolderError(f"shard file {shard_path} listed in {manifest_path.name} is missing; rebuild the index")
        if shard_path.stat().st_size != int(entry["bytes"]):
            raise RunFolderError(f"shard file {shard_path} has {shard_path.stat().st_size} bytes, the manifest says "
                                 f"{entry['bytes']} (interrupted copy or another build's file); rebuild the index")
        if verify_checksums and _file_sha256(shard_path) != entry["sha256"]:
            raise RunFolderError(f"shard file {shard_path} does not match its manifest checksum; rebuild the index")
        shard = _read_shard(shard_path, mmap)
        if shard.d != dim:
            raise RunFolderError(f"shard file {shard_path} holds {shard.d}-dimensional vectors, the manifest says {dim}; "
                                 "rebuild the index")
        if shard.ntotal != int(entry["count"]):
            raise RunFolderError(f"shard file {shard_path} holds {shard.ntotal} vectors, the manifest says "
                                 f"{entry['count']}; rebuild the index")
        shards.append(shard)
    if sum(int(entry["count"]) for entry in manifest["shards"]) != count:
        raise RunFolderError(f"the shards in {folder} hold {sum(int(e['count']) for e in manifest['shards'])} vectors, "
                             f"the manifest says {count}; rebuild the index")
    vectors = None
    if manifest.get("vectors_file"):
        vectors_path = folder / manifest["vectors_file"]
        if not vectors_path.is_file():
            raise RunFolderError(f"{vectors_path} listed in {manifest_path.name} is missing; rebuild the index")
        try:
            vectors = np.load(vectors_path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise RunFolderError(f"{vectors_path} is not a readable .npy file ({exc}); rebuild the index") from None
        if vectors.shape != (count, dim):
            raise RunFolderError(f"{vectors_path} holds {vectors.shape}, the manifest says {(count, dim)}; rebuild the index")
    if refine_factor != "manifest" and refine_factor is not None and (
            isinstance(refine_factor, bool) or not isinstance(refine_factor, (int, np.integer)) or refine_factor < 0):
        raise TripletsError(f"refine_factor must be 'manifest', None or an integer ≥ 0, got {refine_factor!r}")
    if refine_factor == "manifest":
        refine_factor = (manifest.get("metadata") or {}).get("refine_factor") if vectors is not None else None
    elif refine_factor and vectors is None:
        raise RunFolderError(f"refine_factor={refine_factor} needs the vectors file, and the index in {folder} has none; "
                             "build it with build_sharded_index(..., refine_factor=N)")
    return ShardedFactIndex(shards, folder=folder, manifest=manifest, vectors=vectors, refine_factor=refine_factor,
                            use_gpu=use_gpu)
