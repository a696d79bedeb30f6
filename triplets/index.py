"""FAISS nearest-neighbour indexes over fact and image embeddings (cosine similarity).

Cosine similarity is computed as the inner product of L2-normalised vectors: every
vector added to an index and every query is divided by its Euclidean norm inside
this module (a zero vector stays zero and scores 0 against everything), so callers
pass raw embeddings and get back scores in [-1, 1].

Three kinds of index:

- ``"flat"`` (default): ``faiss.IndexFlatIP``, exact search.
- ``"ivf"``: ``faiss.IndexIVFFlat`` with the inner-product metric, trained by k-means.
  ``nlist`` (number of cells) defaults to ``round(4·sqrt(n))``, capped at ``n // 39`` so
  each centroid has at least 39 training points. ``nprobe`` (cells visited per query)
  defaults to the smallest power of two (then ``nlist``) whose recall@10 on a sample of
  the indexed vectors used as queries (their own entry excluded) reaches
  ``target_recall`` (0.95); the value chosen and the recall measured are kept in
  :attr:`FactIndex.metadata`.
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (``hnsw_m`` links per
  node, ``efSearch`` = ``ef_search``).

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
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from .errors import RunFolderError, TripletsError

INDEX_FORMAT = "mas-triplets-faiss-index"
INDEX_FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
GPU_MAX_K = 2048
IndexKind = Literal["flat", "ivf", "hnsw"]


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
        if kind == "ivf":
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
        if not available or use_gpu is False or self.kind == "hnsw":
            return
        faiss = _faiss()
        self._search_index = faiss.index_cpu_to_all_gpus(self._cpu_index)
        self.on_gpu = True

    # -- properties ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of indexed vectors."""
        return int(self._cpu_index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """IVF cells visited per query (None for other kinds)."""
        if self.kind != "ivf":
            return None
        return int(self.metadata["nprobe"])

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise TripletsError(f"nprobe applies to an ivf index, this one is {self.kind}")
        faiss = _faiss()
        nlist = int(self.metadata["nlist"])
        value = int(value)
        if not 1 <= value <= nlist:
            raise TripletsError(f"nprobe must be in 1..nlist={nlist}, got {value}")
        faiss.extract_index_ivf(self._cpu_index).nprobe = value
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
        if self.kind == "ivf":
            raise TripletsError("an ivf index keeps no row order to reconstruct from; use a flat index")
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
                kmeans_iterations: int = 10, train_points_per_cell: int = 64) -> FactIndex:
    """Index ``vectors`` ([n, d], any scale: rows are L2-normalised here) for cosine search.

    ``kind``: "flat" (exact), "ivf" (``nlist`` cells, default :func:`default_nlist`; ``nprobe``
    default: calibrated to recall@10 ≥ ``target_recall`` on ``calibration_queries`` sampled
    indexed vectors) or "hnsw" (``hnsw_m`` links per node, ``ef_search``). ``ids``: optional
    int ids returned by :meth:`FactIndex.search` instead of row numbers. IVF k-means runs
    ``kmeans_iterations`` iterations on at most ``train_points_per_cell · nlist`` sampled vectors. ``fingerprint``:
    identifies the model that produced the vectors (checked by :func:`load_index`).
    ``metadata``: extra JSON-serialisable facts saved with the index.
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
    else:
        nlist = default_nlist(count) if nlist is None else int(nlist)
        if not 1 <= nlist <= count:
            raise TripletsError(f"nlist must be in 1..{count} (the number of vectors), got {nlist}")
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
            if nprobe > max(1, nlist // 4):
                warnings.warn(
                    f"IVF needs nprobe={nprobe} of nlist={nlist} cells for recall@10 ≥ {target_recall}: these vectors "
                    "have no cluster structure for IVF to use, and a flat index will be faster", stacklevel=2)
        else:
            if not 1 <= int(nprobe) <= nlist:
                raise TripletsError(f"nprobe must be in 1..nlist={nlist}, got {nprobe}")
            meta.update(nprobe=int(nprobe))
        index.nprobe = int(meta["nprobe"])
    return FactIndex(index, kind=kind, dim=dim, fingerprint=fingerprint, ids=id_array, metadata=meta,
                     use_gpu=use_gpu)


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
    try:
        sidecar = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"index metadata {meta_path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); rebuild the index") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != INDEX_FORMAT:
        raise RunFolderError(f"{meta_path} is not a mas-triplets index metadata file; rebuild the index")
    if sidecar.get("format_version") != INDEX_FORMAT_VERSION:
        raise RunFolderError(
            f"index {path} has format version {sidecar.get('format_version')}, this code reads "
            f"{INDEX_FORMAT_VERSION}; rebuild the index")
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
