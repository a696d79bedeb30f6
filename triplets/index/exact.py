"""Exact cosine k-NN at the matrix-multiply limit: blocked float32 products, a top-k per block.

Cosine similarity of unit rows is their inner product, so exact search of ``queries`` Q [q, d]
in a database X [n, d] is the matrix product Q·Xᵀ (2·q·n·d floating-point operations) followed
by a selection. :func:`exact_search` does it in blocks:

1. Float32 candidates (``scorer="blas"`` or ``"torch"``; ``"faiss"`` has FAISS's brute force do
   this step): for each block of at most ``query_block`` queries and ``bn`` database rows,
   S = Q_b·X_bᵀ in float32 by the machine's GEMM (:func:`multiply_transposed`), and the c largest scores of
   each row by ``torch.topk`` (c = min(n, k' + margin), k' = min(k, n)); where the c-th and
   (c+1)-th scores are equal, that row is re-selected by a stable sort so that the lower ids win
   the tie. Each block's candidates are merged with the best c so far (order: score descending,
   then id ascending).
2. Completeness check: a float32 product of unit vectors is within ε = γ_d of the exact one
   (:func:`float32_dot_error_bound`, 6.9·10⁻⁵ at d = 1152), so a vector left out (float32 score
   ≤ the c-th kept) can belong to the exact top k' only if the c-th kept float32 score is within
   2ε of the k'-th. Rows where it is are searched again with 4× more candidates, until the check
   passes or every row is a candidate (e.g. many exact duplicates).
3. The c candidates of each query are re-scored in float64 (``torch.bmm``: s = Σ_j q_j·x_j,
   j = 1..d) and the best k' by (float64 score descending, id ascending) are returned with those
   scores (rounded to float32).

Memory bound: one float32 score block of ``query_block``·``bn`` entries, with
``bn = max(c, block_bytes // (4·query_block))``, so at most ``block_bytes`` (default 128 MiB)
unless c alone exceeds it, plus the candidates (12·2c bytes per query of the block) and the
float64 re-scoring of 256 queries at a time (12·c·d bytes per query). Queries and database
are used in place when they are C-contiguous float32 unit rows (``normalized=True``); otherwise
one normalised float32 copy of each is made (:func:`normalize_rows`).

What is guaranteed: the ids returned, and their order, are those of the float64 reference
(Q·Xᵀ computed in float64 on the same float32 unit vectors, each row sorted by score
descending, then id ascending), up to float64 rounding (≈ 10⁻¹⁶: two different vectors whose
exact scores differ by less may come out in either order). Exactly equal scores (duplicate
vectors, zero vectors) come out in ascending id order, also across the cut at k'. The margin
(default 8) only sets how much is re-scored at first, not the result.

:func:`score_blocks` gives the full score matrix one bounded block of query rows at a time, for
callers that need every score (the evaluation's rankings).

Which exact backend runs (:func:`choose_exact_backend`): ``"auto"`` picks FAISS's flat search
when the flat index lives on a GPU (faiss-gpu sees one; FAISS's GPU brute force is the fast
path there) and ``"faiss-rescored"`` otherwise: this search with the float32 candidates of
step 1 taken from FAISS's brute force (``faiss.knn``: its BLAS ``sgemm`` in blocks and a heap
per query, one OpenMP thread pool), then steps 2–3 as above, so the result is exact as stated
below. ``"blas"`` computes step 1 with numpy's BLAS ``sgemm`` and ``torch.topk``, ``"torch"``
with ``torch.mm`` and ``torch.topk``; ``"faiss"`` returns ``faiss.IndexFlatIP``'s own float32
ranking (no re-scoring). The rule is fixed, not timed per process, so that what runs never
depends on a timing; it comes from ``benchmarks/bench_retrieval.py`` on the machine this
project is developed on (AMD EPYC, AVX2, 2 cores; ``docs/benchmarks.md``): FAISS's brute force
runs at the machine's GEMM limit (182 of 185 GFLOP/s) and stays there when other processes
load the machine, while ``"blas"`` mixes two thread pools (OpenBLAS's and torch's) that slow
each other down under load (25–49 s for the same search) and ``torch.mm`` reaches 159.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mas_core.errors import did_you_mean

from ..errors import TripletsError
from .common import _faiss, checked_k, normalize_rows

EXACT_BACKENDS = ("auto", "faiss-rescored", "blas", "torch", "faiss")
SCORERS = ("faiss", "blas", "torch")   # who computes the float32 candidates of the exact search
SCORE_BLOCK_BYTES = 1 << 27   # 128 MiB of float32 scores per block
QUERY_BLOCK = 1024            # queries per block: enough rows for the GEMM to reach its speed
RESCORE_MARGIN = 8            # float32 candidates kept beyond k for the float64 re-scoring
_RESCORE_ROWS = 256


def check_exact_backend(name: str) -> str:
    """``name`` if it is one of :data:`EXACT_BACKENDS`, else a one-line :class:`TripletsError`."""
    if name not in EXACT_BACKENDS:
        raise TripletsError(f"unknown exact search backend {name!r}{did_you_mean(str(name), EXACT_BACKENDS)} "
                            f"(use one of {', '.join(EXACT_BACKENDS)})")
    return name


def choose_exact_backend(name: str = "auto", *, faiss_on_gpu: bool = False) -> str:
    """The exact backend that runs: ``"faiss"`` or ``"torch"``.

    ``"auto"``: ``"faiss"`` when the FAISS flat index is on a GPU (``faiss_on_gpu``), else
    ``"faiss-rescored"`` (FAISS's brute force for the float32 candidates, re-scored in float64:
    the fastest exact search measured on CPUs; module docstring). Any other name: as named.
    """
    name = check_exact_backend(name)
    if name == "auto":
        return "faiss" if faiss_on_gpu else "faiss-rescored"
    return name


def scorer_of(backend: str) -> str | None:
    """The float32 candidate scorer (:data:`SCORERS`) of an exact backend that re-scores in float64;
    ``None`` for ``"faiss"`` (FAISS's own ranking) and ``"auto"`` (choose first)."""
    return {"faiss-rescored": "faiss", "blas": "blas", "torch": "torch"}.get(backend)


def multiply_transposed(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, gemm: str = "blas") -> torch.Tensor:
    """``out ← a · bᵀ`` in float32 (``a`` [m, d], ``b`` [n, d], ``out`` [m, n] contiguous).

    ``gemm="blas"`` multiplies CPU tensors with numpy's BLAS ``sgemm`` (in place, through
    shared-memory views; ``bᵀ`` is a transposed view, not a copy); ``"torch"``, and any tensor
    on a GPU, use ``torch.mm``. Returns ``out``.
    """
    if gemm == "blas" and out.device.type == "cpu" and a.device.type == "cpu" and b.device.type == "cpu":
        np.matmul(a.numpy(), b.numpy().T, out=out.numpy())
    else:
        torch.mm(a, b.t(), out=out)
    return out


def _unit_rows(vectors: np.ndarray, name: str, normalized: bool) -> np.ndarray:
    """``vectors`` as C-contiguous float32 unit rows: used in place when ``normalized`` and already
    float32 C-contiguous, else :func:`normalize_rows` (which also refuses NaN/inf and non-2-D input)."""
    if normalized:
        array = np.asarray(vectors)
        if array.ndim == 2 and array.dtype == np.float32 and array.flags.c_contiguous:
            if not np.isfinite(array).all():
                raise TripletsError(f"{name} contain NaN or infinite values; check the model that produced them")
            return array
    return normalize_rows(vectors, name=name)


def _best_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``count`` entries with the highest score, equal scores by ascending id, in that order."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :count]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def _block_top(scores: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` largest entries of each row of ``scores`` and their columns; on a tie at the cut,
    the lower columns (rows with such a tie are re-selected by a stable sort)."""
    width = scores.shape[1]
    probe = min(take + 1, width)
    values, columns = torch.topk(scores, probe, dim=1, largest=True, sorted=True)
    if probe > take:
        tied = (values[:, take - 1] == values[:, take]).nonzero().flatten()
        if len(tied):
            sorted_values, sorted_columns = torch.sort(scores[tied], dim=1, descending=True, stable=True)
            values[tied] = sorted_values[:, :probe]
            columns[tied] = sorted_columns[:, :probe]
        values, columns = values[:, :take], columns[:, :take]
    return values, columns


class TopKAccumulator:
    """The best ``keep`` database rows of each query (float32 scores) over database blocks added in
    any order: :meth:`add` scores one block (:func:`multiply_transposed`, ``gemm``) and merges its per-row top ``keep``
    (ties at the cut: lower ids) into the running best, ordered by score descending, id ascending.
    ``queries``: float32 unit rows [q, d] (a tensor, used in place)."""

    def __init__(self, queries: torch.Tensor, keep: int, buffer: torch.Tensor | None = None,
                 block_bytes: int = SCORE_BLOCK_BYTES, gemm: str = "torch") -> None:
        self.queries = queries
        self.gemm = gemm
        self.keep = int(keep)
        self.scores: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self._buffer = buffer
        self._block_rows = max(self.keep, int(block_bytes) // (4 * max(1, len(queries))))

    def add(self, first_row: int, block: torch.Tensor | np.ndarray) -> None:
        """Score ``block`` (database rows ``first_row``…, float32 unit rows) and merge its best,
        in sub-blocks whose scores take at most ``block_bytes``."""
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        for start in range(0, len(block), self._block_rows):
            self._add(int(first_row) + start, block[start:start + self._block_rows])

    def _add(self, first_row: int, block: torch.Tensor) -> None:
        size = len(self.queries) * len(block)
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.float32)
        scores = self._buffer[:size].view(len(self.queries), len(block))
        multiply_transposed(self.queries, block, scores, gemm=self.gemm)
        values, columns = _block_top(scores, min(self.keep, len(block)))
        ids = columns + int(first_row)
        if self.scores is None or self.ids is None:
            self.scores, self.ids = values, ids
            return
        scores, ids = torch.cat([self.scores, values], 1), torch.cat([self.ids, ids], 1)
        if scores.shape[1] <= self.keep:
            self.scores, self.ids = scores, ids
            return
        probe = torch.topk(scores, self.keep + 1, dim=1, sorted=True)
        if bool((probe.values[:, self.keep - 1] == probe.values[:, self.keep]).any()):
            self.scores, self.ids = _best_by_score_then_id(scores, ids, self.keep)  # a tie at the cut: lower ids win
        else:
            self.scores = probe.values[:, : self.keep]
            self.ids = ids.gather(1, probe.indices[:, : self.keep])

    def best_ids(self, count: int | None = None) -> np.ndarray:
        """int64 [q, count]: the best ids so far by float32 score (equal scores: lower id first)."""
        if self.ids is None or self.scores is None:
            return np.full((len(self.queries), 0), -1, dtype=np.int64)
        _, ids = _best_by_score_then_id(self.scores, self.ids, self.keep if count is None else int(count))
        return ids.numpy()


def rescore(queries: torch.Tensor, candidates: torch.Tensor, vectors: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 re-scoring: per query, s = Σ_j q_j·x_j (float64) of its ``candidates`` (database
    rows, [q, c], −1 = none) and the best ``k`` by (s descending, id ascending). Returns
    (scores float64 [q, k], ids int64 [q, k]); missing candidates give score −inf and id −1.
    Works on 256 queries at a time (12·c·d bytes each)."""
    out_scores, out_ids = [], []
    for start in range(0, len(queries), _RESCORE_ROWS):
        block = candidates[start:start + _RESCORE_ROWS]
        found = block >= 0
        picked = torch.where(found, block, torch.zeros_like(block))
        rows = torch.index_select(vectors, 0, picked.reshape(-1)).to(torch.float64).view(*picked.shape, -1)  # [b, c, d]
        exact = torch.bmm(rows, queries[start:start + _RESCORE_ROWS, :, None].to(torch.float64))[:, :, 0]
        exact = torch.where(found, exact, torch.full_like(exact, -float("inf")))
        ids = torch.where(found, block, torch.full_like(block, torch.iinfo(torch.int64).max))
        top_scores, top_ids = _best_by_score_then_id(exact, ids, k)
        out_scores.append(top_scores)
        out_ids.append(torch.where(torch.isfinite(top_scores), top_ids, torch.full_like(top_ids, -1)))
    return torch.cat(out_scores), torch.cat(out_ids)


def exact_search(queries: np.ndarray, database: np.ndarray, k: int, *, normalized: bool = False,
                 block_bytes: int = SCORE_BLOCK_BYTES, query_block: int = QUERY_BLOCK,
                 margin: int = RESCORE_MARGIN, scorer: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar database rows of each query, exactly (see the module docstring).

    ``queries`` [q, d] (or [d]) and ``database`` [n, d]: any scale (rows are L2-normalised
    here) unless ``normalized``, which promises unit rows and, for float32 C-contiguous
    arrays, skips the copy. Returns ``(scores float32 [q, k'], ids int64 [q, k'])`` with
    k' = min(k, n), best first; ids are database rows. ``scorer``: who computes the float32
    candidates, ``"faiss"`` (``faiss.knn``), ``"blas"`` (numpy's BLAS, blocks) or ``"torch"``
    (``torch.mm``, blocks); the same ids either way (the module docstring). Raises
    :class:`TripletsError` for an empty query set or database, k < 1, mismatched dimensions, or
    NaN/inf values.
    """
    k = checked_k(k)
    if int(block_bytes) < 4 or int(query_block) < 1 or int(margin) < 0:
        raise TripletsError(f"block_bytes ≥ 4, query_block ≥ 1 and margin ≥ 0 are needed, got {block_bytes}, "
                            f"{query_block}, {margin}")
    array = np.asarray(queries)
    query_rows = _unit_rows(array[None, :] if array.ndim == 1 else array, "queries", normalized)
    rows = _unit_rows(database, "database vectors", normalized)
    if len(query_rows) == 0:
        raise TripletsError("the query set is empty: pass at least one query vector")
    if len(rows) == 0:
        raise TripletsError("the database is empty: there is nothing to search")
    if query_rows.shape[1] != rows.shape[1]:
        raise TripletsError(f"queries are {query_rows.shape[1]}-dimensional but the database is "
                            f"{rows.shape[1]}-dimensional; embed both with the same model")
    if scorer not in SCORERS:
        raise TripletsError(f"unknown scorer {scorer!r}{did_you_mean(str(scorer), SCORERS)} "
                            f"(use one of {', '.join(SCORERS)})")
    return search_unit_rows(query_rows, rows, k, block_bytes=block_bytes, query_block=query_block, margin=margin,
                            scorer=scorer)


def search_unit_rows(query_rows: np.ndarray, rows: np.ndarray, k: int, *, block_bytes: int = SCORE_BLOCK_BYTES,
                     query_block: int = QUERY_BLOCK, margin: int = RESCORE_MARGIN,
                     scorer: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` without the checks: ``query_rows`` [q, d] and ``rows`` [n, d] must be
    finite float32 C-contiguous unit rows (q, n ≥ 1) and ``k`` ≥ 1 (what a :class:`FactIndex`
    already guarantees for its normalised queries and stored vectors)."""
    count, dim = rows.shape
    k_eff = min(int(k), count)
    slack = 2.0 * float32_dot_error_bound(dim)
    q_all, x_all = torch.from_numpy(query_rows), torch.from_numpy(rows)
    out_scores = np.empty((len(query_rows), k_eff), dtype=np.float32)
    out_ids = np.empty((len(query_rows), k_eff), dtype=np.int64)
    pending = np.arange(len(query_rows))
    keep = min(count, k_eff + int(margin))
    while len(pending):
        widen = []
        block_q = min(len(pending), int(query_block))
        block_n = min(count, max(keep, int(block_bytes) // (4 * block_q)))
        buffer = torch.empty(block_q * block_n if scorer != "faiss" else 0, dtype=torch.float32)
        for start in range(0, len(pending), block_q):
            wanted = pending[start:start + block_q]
            contiguous = wanted[-1] - wanted[0] == len(wanted) - 1
            q_block = q_all[int(wanted[0]):int(wanted[-1]) + 1] if contiguous else q_all[torch.from_numpy(wanted)]
            if scorer == "faiss":
                kept_scores, kept_ids = _faiss_candidates(q_block, rows, keep)
            else:
                best = TopKAccumulator(q_block, keep, buffer, block_bytes=block_q * block_n * 4, gemm=scorer)
                for x_start in range(0, count, block_n):
                    best.add(x_start, x_all[x_start:x_start + block_n])
                assert best.ids is not None and best.scores is not None
                kept_scores, kept_ids = best.scores, best.ids
            done = np.ones(len(wanted), dtype=bool)
            if keep < count:  # a vector left out scores ≤ the last kept: harmless unless within slack of the k-th
                kth = torch.topk(kept_scores, k_eff, dim=1).values[:, -1]
                done = (kept_scores.min(dim=1).values < kth - slack).numpy()
                widen.append(wanted[~done])
            scores, ids = rescore(q_block, kept_ids, x_all, k_eff)
            out_scores[wanted[done]] = scores.numpy()[done]
            out_ids[wanted[done]] = ids.numpy()[done]
        pending = np.concatenate(widen) if widen else pending[:0]
        keep = min(count, 4 * keep)
    return out_scores, out_ids


def _faiss_candidates(queries: torch.Tensor, rows: np.ndarray, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best rows of each query by FAISS's brute-force inner product (``faiss.knn``, no
    index built): float32 scores [q, keep] and ids [q, keep] (ties at the cut in FAISS's order;
    the completeness check of :func:`search_unit_rows` does not rely on it)."""
    faiss = _faiss()
    scores, ids = faiss.knn(np.ascontiguousarray(queries.numpy()), rows, int(keep), metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))


def float32_dot_error_bound(dim: int) -> float:
    """A bound on |fl32(x·y) − x·y| for unit vectors x, y of ``dim`` entries, in any summation order:
    γ_d = d·u / (1 − d·u) with u = 2⁻²⁴ (Higham, Accuracy and Stability of Numerical Algorithms,
    §3.1), times 1.01 for rows whose float32 norms differ from 1 by rounding."""
    unit = 2.0 ** -24
    return 1.01 * dim * unit / max(1e-12, 1.0 - dim * unit)


def score_blocks(queries: torch.Tensor, database: torch.Tensor, *, block_bytes: int = SCORE_BLOCK_BYTES,
                 gemm: str = "torch") -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, queries[start:stop] @ databaseᵀ)`` for consecutive query rows, float32
    by :func:`multiply_transposed` (``gemm``: numpy's BLAS or ``torch.mm``), each block of at most
    max(1, block_bytes // (4·n)) rows, so at most ``block_bytes`` (or one row of n scores) of
    scores at a time. The yielded tensor is a view of
    one reused buffer: it is overwritten by the next block (copy what must be kept)."""
    count = int(database.shape[0])
    rows = max(1, min(int(queries.shape[0]), int(block_bytes) // (4 * max(1, count))))
    buffer = torch.empty(rows * count, dtype=torch.float32, device=database.device)
    for start in range(0, int(queries.shape[0]), rows):
        block = queries[start:start + rows]
        scores = buffer[: len(block) * count].view(len(block), count)
        multiply_transposed(block, database, scores, gemm=gemm)
        yield start, start + len(block), scores
