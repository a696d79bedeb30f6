"""What every index module shares: the faiss handle, row normalisation (fingerprints and checksums:
:mod:`triplets.fingerprint`), recall, JSON conversion and the checks of the IVF / PQ parameters."""
from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np

from ..errors import TripletsError

INDEX_FORMAT = "mas-triplets-faiss-index"
INDEX_FORMAT_VERSION = 1
SHARDED_FORMAT = "mas-triplets-sharded-faiss-index"
SHARDED_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VECTORS_FILE = "vectors.npy"
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
SHARDED_KINDS = ("ivfpq", "ivf")
GPU_MAX_K = 2048
DEFAULT_ROWS_PER_SHARD = 1_000_000
METRIC = "inner product of L2-normalised vectors (cosine)"
IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw"]


def _faiss() -> Any:
    """The faiss module (one accessor, so tests can stand in a faiss that reports GPUs)."""
    return faiss


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    module = _faiss()
    return bool(hasattr(module, "StandardGpuResources") and module.get_num_gpus() > 0)


def wants_gpu(use_gpu: bool | str) -> bool:
    """Whether an index should move to the GPUs for ``use_gpu`` (``"auto"``: when faiss sees one;
    ``True``: it must, else a one-line error; ``False``: never)."""
    if use_gpu not in ("auto", True, False):
        raise TripletsError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    available = gpu_available()
    if use_gpu is True and not available:
        raise TripletsError("use_gpu=True but faiss sees no GPU; install faiss-gpu or pass use_gpu='auto'")
    return available and use_gpu is not False


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


def default_nlist(count: int) -> int:
    """IVF cells for ``count`` vectors: round(4·sqrt(count)), at most count // 39, at least 1."""
    if count <= 0:
        return 1
    return int(max(1, min(round(4.0 * math.sqrt(count)), count // 39)))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (ids, −1 entries ignored)."""
    total = 0.0
    for found_row, truth_row in zip(found, truth):
        truth_set = {int(i) for i in truth_row if i >= 0}
        if truth_set:
            total += len(truth_set & {int(i) for i in found_row if i >= 0}) / len(truth_set)
        else:
            total += 1.0
    return total / max(1, len(truth))


def drop_self(neighbours: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` ids of each row of ``neighbours`` other than the row's own id (−1 padded)."""
    out = np.full((len(neighbours), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(neighbours, self_rows)):
        kept = [int(i) for i in found if i != own][:k]
        out[row, : len(kept)] = kept
    return out


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (for JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def checked_k(k: Any) -> int:
    """``k`` as an int ≥ 1, else a :class:`TripletsError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise TripletsError(f"k must be a positive integer, got {k!r}")
    return int(k)


def checked_nlist(nlist: int | None, count: int) -> int:
    """``nlist`` (default :func:`default_nlist`) checked to lie in 1..count."""
    nlist = default_nlist(count) if nlist is None else int(nlist)
    if not 1 <= nlist <= count:
        raise TripletsError(f"nlist must be in 1..{count} (the number of vectors), got {nlist}")
    return nlist


def checked_nprobe(nprobe: int, nlist: int) -> int:
    """``nprobe`` checked to lie in 1..nlist."""
    if isinstance(nprobe, bool) or not 1 <= int(nprobe) <= nlist:
        raise TripletsError(f"nprobe must be in 1..nlist={nlist}, got {nprobe}")
    return int(nprobe)


def checked_refine_factor(refine_factor: int | None) -> int | None:
    """``refine_factor`` as an int ≥ 1, or None for 0 / None (no re-ranking)."""
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


def checked_pq(dim: int, pq_m: int | None, pq_bits: int) -> int:
    """``pq_m`` (default :func:`default_pq_m`) checked to divide ``dim``, and ``pq_bits`` in 1..16."""
    pq_m = default_pq_m(dim) if pq_m is None else pq_m
    if isinstance(pq_m, bool) or not isinstance(pq_m, (int, np.integer)) or pq_m < 1 or dim % int(pq_m) != 0:
        choices = pq_m_choices(dim)
        shown = ", ".join(str(m) for m in choices[:24]) + (", …" if len(choices) > 24 else "")
        raise TripletsError(f"pq_m={pq_m!r} does not divide the dimension {dim}; use one of its divisors: {shown}")
    if isinstance(pq_bits, bool) or not isinstance(pq_bits, (int, np.integer)) or not 1 <= pq_bits <= 16:
        raise TripletsError(f"pq_bits must be an integer in 1..16 (8 is the fast, usual choice), got {pq_bits!r}")
    return int(pq_m)


def flat_vectors(flat_index: Any) -> np.ndarray:
    """The float32 [ntotal, d] vectors stored in a ``faiss.IndexFlat``, as a view of FAISS's own
    memory (no copy; valid while ``flat_index`` lives)."""
    flat = _faiss().downcast_index(flat_index)
    count, dim = int(flat.ntotal), int(flat.d)
    if count == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return _faiss().rev_swig_ptr(flat.get_xb(), count * dim).reshape(count, dim)
