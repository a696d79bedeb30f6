"""Indexes past RAM: IVF / IVF-PQ shards on disk (:func:`build_sharded_index`), searched together
from memory-mapped files (:func:`load_sharded_index`, :class:`ShardedFactIndex`)."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from mas_core import checkpoint

from ..errors import RunFolderError, TripletsError
from ..fingerprint import file_sha256
from . import common
from .common import (
    DEFAULT_ROWS_PER_SHARD, MANIFEST_NAME, METRIC, SHARDED_FORMAT, SHARDED_FORMAT_VERSION, SHARDED_KINDS, VECTORS_FILE,
    checked_nlist, checked_nprobe, checked_pq, checked_refine_factor, jsonable, wants_gpu,
    normalize_rows,
)
from .fact_index import FactIndex
from .ivf import (
    calibrate_ivf, calibration_neighbours, calibration_rows, ivf_metadata, trained_ivf, training_rows, warn_unclustered,
)
from .persist import read_format_file, read_shard, remove_previous_index, write_index_file


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
    faiss = common._faiss()
    if kind not in SHARDED_KINDS:
        raise TripletsError(f"a sharded index is one of {', '.join(SHARDED_KINDS)}, got kind {kind!r}")
    if isinstance(chunk_rows, bool) or int(chunk_rows) < 1:
        raise TripletsError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    refine_factor = checked_refine_factor(refine_factor)
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
        nlist = checked_nlist(nlist, count)
        if kind == "ivfpq":
            pq_m = checked_pq(dim, pq_m, pq_bits)
        if nprobe is not None:
            nprobe = checked_nprobe(nprobe, nlist)
        remove_previous_index(folder)

        rows = training_rows(count, nlist, pq_bits=pq_bits if kind == "ivfpq" else 0, train_size=train_size,
                             train_points_per_cell=train_points_per_cell, seed=seed)
        trained = trained_ivf(normalize_rows(source.rows(rows)), kind=kind, nlist=nlist, pq_m=pq_m or 0,
                               pq_bits=pq_bits, seed=seed, kmeans_iterations=kmeans_iterations)
        meta: dict[str, Any] = dict(metadata or {})
        meta.update(ivf_metadata(trained, kind=kind, nlist=nlist, train_rows=len(rows), seed=seed,
                                  kmeans_iterations=kmeans_iterations, train_points_per_cell=train_points_per_cell))
        neighbours = None
        if nprobe is None:
            query_rows = calibration_rows(count, calibration_queries, seed)
            neighbours = calibration_neighbours(normalize_rows(source.rows(query_rows)), min(10, count - 1))

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
                if neighbours is not None:
                    neighbours.add(start, chunk)
                if store is not None:
                    store[start:stop] = chunk
            path = folder / shard_file_name(number, num_shards)
            written.append(path)
            size, digest = write_index_file(path, shard)
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

        if neighbours is not None:
            opened = [read_shard(folder / shard["file"], mmap=True) for shard in shards]
            combined = faiss.IndexShards(dim, False, False)
            for shard in opened:
                combined.add_shard(shard)
            meta.update(calibrate_ivf(combined, trained.quantizer, query_rows, neighbours, source.rows, nlist,
                                      target_recall))
            del combined, opened
            warn_unclustered(int(meta["nprobe"]), nlist, target_recall)
        else:
            meta.update(nprobe=int(nprobe))
        manifest = {
            "format": SHARDED_FORMAT,
            "format_version": SHARDED_FORMAT_VERSION,
            "kind": kind,
            "dim": int(dim),
            "count": int(count),
            "metric": METRIC,
            "fingerprint": fingerprint,
            "ids": "global row of the input, 0..count-1",
            "shards": shards,
            "vectors_file": vectors_file,
            "metadata": jsonable(meta),
        }
        manifest_path = folder / MANIFEST_NAME
        checkpoint.atomic_write_json(manifest_path, manifest)
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
    :meth:`search` takes ``refine_factor·k`` candidates and re-ranks them by their float64
    inner product read from that memory-mapped file (:func:`triplets.index.ivf.rerank_exact`, the
    same re-ranking as an in-memory IVF-PQ index with ``refine_factor``); otherwise scores are
    PQ estimates.
    FAISS's GPU IVF-PQ takes only some code sizes (at 8 bits: 1–4, 8, 12, …, 64, 96 bytes per
    vector, per the FAISS wiki), so e.g. ``default_pq_m(1152) = 144`` would need ``pq_m=96``
    or 48 there.
    """

    def __init__(self, shards: Sequence[Any], *, folder: Path, manifest: dict[str, Any],
                 vectors: np.ndarray | None = None, refine_factor: int | None = None,
                 use_gpu: bool | str = "auto") -> None:
        faiss = common._faiss()
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
        if not wants_gpu(use_gpu):
            return
        # Untested on hardware: one CPU IVF index holding every shard's lists, split over the GPUs.
        faiss = common._faiss()
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
        value = checked_refine_factor(value)
        if value and self._vectors is None:
            raise TripletsError(f"the index in {self.folder} has no {VECTORS_FILE} to re-rank from; "
                                "build it with build_sharded_index(..., refine_factor=N)")
        self._refine_factor = value
        self._refine_vectors = self._vectors if value else None

    @property
    def index_bytes(self) -> int:
        """Bytes of the shard files (= RAM of the shards read without mmap): codes, ids, list headers,
        and each shard's copy of the coarse centroids and PQ codebooks. ``vectors.npy`` is not counted."""
        return int(sum(int(shard["bytes"]) for shard in self.manifest["shards"]))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Copy the shard files (and ``vectors.npy``) and then the manifest to ``out_dir``, each
        atomically (temporary file + rename). Returns the new manifest's path."""
        target = Path(out_dir)
        if target.resolve() == self.folder.resolve():
            return target / MANIFEST_NAME
        target.mkdir(parents=True, exist_ok=True)
        remove_previous_index(target)
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
        manifest = dict(self.manifest, metadata=jsonable(self.metadata))
        checkpoint.atomic_write_json(target / MANIFEST_NAME, manifest)
        return target / MANIFEST_NAME

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return (f"ShardedFactIndex(kind={self.kind!r}, dim={self.dim}, count={self.count}, "
                f"shards={len(self.shard_paths)}, folder={str(self.folder)!r}, {where})")


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
    manifest = read_format_file(manifest_path, SHARDED_FORMAT, SHARDED_FORMAT_VERSION,
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
        if verify_checksums and file_sha256(shard_path) != entry["sha256"]:
            raise RunFolderError(f"shard file {shard_path} does not match its manifest checksum; rebuild the index")
        shard = read_shard(shard_path, mmap)
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
