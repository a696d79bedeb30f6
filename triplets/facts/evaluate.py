"""Evaluation of fact embeddings: image → fact accuracy (Sherlock's rule) and fact → image mAP.

All scores are cosine similarities: image embeddings and fact (language) embeddings
are L2-normalised here, then compared by inner product.

Image → fact (``image_to_fact_metrics``). For a test image whose ground-truth fact is
g, the candidate facts are ranked by cosine. The ground-truth *group* G depends on
g's order (Sherlock, Elhoseiny et al. AAAI 2017):

- <S>: every candidate with the same subject S;
- <S,P>: every candidate with the same S and the same P;
- <S,P,O>: the fact itself (every candidate with the same S, P and O).

With r = the rank (from 1) of the best-ranked member of G,

    hit@K  ⇔  r ≤ K + |G| − 1          top-K accuracy = mean over images of hit@K
    MRR    = mean over images of 1 / max(1, r − (|G| − 1))

Ties are broken against the ground truth: r = 1 + #{c ∉ G : score_c ≥ max_{g∈G} score_g},
so a model whose scores are all equal scores no better than chance-worst.

Fact → image (``fact_to_image_metrics``). For each fact f with at least one positive
image (an image whose ground-truth fact is f), the images are ranked by cosine with f:

    AP    = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds, highest first
            (precision and recall at each threshold; identical to
            sklearn.metrics.average_precision_score, ties grouped at one threshold)
    AP@k  = (1 / min(k, #positives)) · Σ_{i ≤ k, image i positive} precision@i
            (images sorted by score, ties broken against the positives)

and ``map``, ``map_at_10``, ``map_at_100`` are their means over the facts with ≥ 1 positive.
All metrics are fractions in [0, 1].

Computation. Scores are float32 matrix products computed block by block by the exact search
backend's :func:`triplets.index.score_blocks` (``torch.mm``, at most 128 MiB of scores at a
time for image → fact, 32 MiB for fact → image); fact vectors are divided by their norms on the
scores (:class:`FactTable`, built once per fact file). From those scores everything is exact:
image → fact counts, per image, the candidates scoring ≥ the best group member (the group taken
as slices of the candidates sorted by group key, not a dense mask); fact → image sorts each
fact's row once and reads AP and AP@k off the ranks of its positives. Equal vectors always get
equal scores (their columns are copied from one: a blocked product may round them apart), so
their ties are kept; scores of different vectors closer than float32 rounding (≈ 10⁻⁷) may
compare differently than in float64.

Modes (``evaluate_task``): "standard" ranks the task's own facts; "generalized" ranks
the facts of all tasks. The fact vectors are ``fact_file.fact_embeddings``.

In ``RUN/results.json`` each method's ``"final"`` entry (:func:`final_metrics`) is
``{"standard": [m_0, …, m_{T−1}], "generalized": [m_0, …]}`` with, per task t,
``m_t = {"top1", "top5", "top10", "mrr", "map", "map_at_10", "map_at_100", "num_images",
"num_candidates"}`` measured on task t's test images after the last task, plus the strict
retrieval figures of :mod:`triplets.facts.retrieval_metrics` (``i2f_r1``, ``i2f_r5``, ``i2f_r10``,
``i2f_mrr``, ``f2i_r1``, ``f2i_r5``, ``f2i_r10``). With ``eval.stale_index`` a method also has
``"stale_index"`` (:func:`stale_index_metrics`, :mod:`triplets.facts.stale_index`).
"""
from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from data_prep.facts.fact_file import fact_order
from mas_core.checkpoint import atomic_write_json, read_json
from mas_core.errors import MASCoreError

from ..errors import RunFolderError, TripletsError
from .data import fact_image_dataset
from ..fingerprint import VOCABULARY_KEY, fact_vocabulary_fingerprint
from ..index import normalize_rows, score_blocks
from ..report import render_markdown, write_report
from .retrieval_report import RETRIEVAL_MODES, summary_extras
from .retrieval_metrics import candidate_score_blocks, checked_fact_ids, field_metrics, row_hashes
from .retrieval_metrics import first_equal_rows as _first_equal_rows
from ..run_folder import load_run
from ..runner import method_folder
from .stale_index import check_saved, load_task_embeddings, stale_index_entry

Mode = Literal["standard", "generalized"]
IMAGE_TO_FACT_KEYS = ("top1", "top5", "top10", "mrr")
FACT_TO_IMAGE_KEYS = ("map", "map_at_10", "map_at_100")
SCORE_BLOCK_BYTES = 1 << 27   # float32 scores of one image → fact block (128 MiB)
SORT_BLOCK_BYTES = 1 << 25    # float32 scores of one fact → image block, sorted (32 MiB + 2× for the sort)


# ----------------------------------------------------------------------------- helpers
def _slot(value: Any) -> str | None:
    """A fact slot as a string, with None / "" meaning absent."""
    if value is None:
        return None
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return text if text != "" else None


def group_keys(facts: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Integer keys per fact for Sherlock's groups, and each fact's order.

    Returns ``(keys int64 [3, F], order int8 [F])``: ``keys[0]`` identifies the subject,
    ``keys[1]`` the (subject, predicate) pair, ``keys[2]`` the whole (S, P, O) triple, so
    candidate c is in the group of ground truth g exactly when
    ``keys[order[g] − 1, c] == keys[order[g] − 1, g]``.
    """
    tables: list[dict[tuple, int]] = [{}, {}, {}]
    keys = np.empty((3, len(facts)), dtype=np.int64)
    order = np.empty(len(facts), dtype=np.int8)
    for index, fact in enumerate(facts):
        if not 1 <= len(fact) <= 3:
            raise TripletsError(f"fact {index} must be a tuple (S, P, O) with 1 to 3 slots, got {fact!r}")
        slots = tuple(_slot(v) for v in fact) + (None,) * (3 - len(fact))
        if slots[0] is None:
            raise TripletsError(f"fact {index} has no subject: {fact!r}")
        for level in range(3):
            key = slots[: level + 1]
            keys[level, index] = tables[level].setdefault(key, len(tables[level]))
        order[index] = fact_order(slots)
    return keys, order


def _group_members(candidate_keys: np.ndarray, level: np.ndarray,
                   truth_key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sherlock's group of each image among the candidates, as slices of one array.

    ``candidate_keys`` [3, C] (:func:`group_keys` of the candidates), ``level`` [n] (order − 1
    of each image's ground truth), ``truth_key`` [n]. Returns ``(start [n], size [n],
    members)``: image i's group is the candidate positions ``members[start[i]:start[i] + size[i]]``
    (the candidates whose key at ``level[i]`` equals ``truth_key[i]``).
    """
    count = candidate_keys.shape[1]
    by_key = np.argsort(candidate_keys, axis=1, kind="stable")          # [3, C] positions sorted by key
    sorted_keys = np.take_along_axis(candidate_keys, by_key, axis=1)
    start = np.empty(len(level), dtype=np.int64)
    stop = np.empty(len(level), dtype=np.int64)
    for depth in range(3):
        chosen = level == depth
        start[chosen] = np.searchsorted(sorted_keys[depth], truth_key[chosen], side="left")
        stop[chosen] = np.searchsorted(sorted_keys[depth], truth_key[chosen], side="right")
    return start + level * count, stop - start, by_key.reshape(-1)


# ----------------------------------------------------------------------------- image → fact
class FactTable:
    """The facts of a fact file prepared once for ranking: float32 vectors [F, D] as given, their
    inverse L2 norms [F] (1/‖v‖, 0 for a zero vector) and Sherlock's group keys (:func:`group_keys`).

    Scores against it are (image · v) / ‖v‖ with unit image rows: the cosine, computed without
    a normalised copy of the fact matrix."""

    def __init__(self, fact_embeddings: np.ndarray, facts: Sequence[Sequence[Any]] | None) -> None:
        vectors = np.asarray(fact_embeddings)
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
            raise TripletsError(f"fact embeddings must be a numeric 2-D array [n, d], got shape {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(self.vectors, axis=1)
        if not np.isfinite(norms).all():
            raise TripletsError("fact embeddings contain NaN or infinite values; check the model that produced them")
        self.inverse_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
        self.keys: np.ndarray | None = None
        self.order: np.ndarray | None = None
        self._hashes: np.ndarray | None = None
        if facts is not None:  # None: fact → image ranking only, no groups needed
            if len(facts) != len(self.vectors):
                raise TripletsError(f"{len(self.vectors)} fact embeddings but {len(facts)} facts; "
                                    "pass both indexed by fact id")
            self.keys, self.order = group_keys(facts)

    def hashes(self) -> np.ndarray:
        """:func:`row_hashes` of the vectors (computed on first use, then kept)."""
        if self._hashes is None:
            self._hashes = row_hashes(self.vectors)
        return self._hashes

    def unit_rows(self, fact_ids: np.ndarray) -> np.ndarray:
        """The unit-norm float32 vectors of ``fact_ids`` [m, D] (a copy)."""
        return self.vectors[fact_ids] * self.inverse_norms[fact_ids, None]


_FACT_TABLES: "weakref.WeakKeyDictionary[Any, FactTable]" = weakref.WeakKeyDictionary()


def fact_table(fact_file: Any) -> FactTable:
    """The :class:`FactTable` of an opened fact file, built on first use and kept as long as the
    fact file object lives (every evaluation of a run ranks the same facts)."""
    try:
        table = _FACT_TABLES.get(fact_file)
    except TypeError:  # not weak-referenceable: no cache
        return FactTable(_fact_vectors(fact_file), fact_file.facts)
    if table is None:
        table = FactTable(_fact_vectors(fact_file), fact_file.facts)
        _FACT_TABLES[fact_file] = table
    return table


def image_to_fact_metrics(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, fact_embeddings: np.ndarray | None,
                          facts: Sequence[Sequence[Any]], candidate_fact_ids: Iterable[int] | np.ndarray,
                          ks: Sequence[int] = (1, 5, 10), *, table: FactTable | None = None) -> dict[str, float]:
    """Top-K accuracy and MRR of ranking candidate facts for each image (see module docstring).

    ``image_embeddings`` [n, D] and ``image_fact_ids`` [n] (ground-truth fact id per image);
    ``fact_embeddings`` [F, D] and ``facts`` (F tuples) are indexed by fact id (or ``table``,
    their :class:`FactTable`, given instead); ``candidate_fact_ids`` the ids ranked (each
    image's ground truth must be among them). Returns {"top{K}": fraction for K in ks, "mrr": fraction}.

    Scores come from :func:`triplets.index.score_blocks` (float32 GEMM, blocks of at most
    128 MiB); the rank of the best group member is counted exactly on those scores.
    """
    images = normalize_rows(image_embeddings, name="image embeddings")
    table = FactTable(fact_embeddings, facts) if table is None else table
    fact_count = len(table.vectors)
    if images.shape[1] != table.vectors.shape[1]:
        raise TripletsError(f"image embeddings are {images.shape[1]}-d but fact embeddings {table.vectors.shape[1]}-d; "
                            "the model's slot size must match the fact file's language vectors")
    truth = checked_fact_ids(image_fact_ids, fact_count, "image fact ids")
    if len(truth) != len(images):
        raise TripletsError(f"{len(images)} image embeddings but {len(truth)} fact ids")
    if len(images) == 0:
        raise TripletsError("no images to evaluate")
    candidates = checked_fact_ids(candidate_fact_ids, fact_count, "candidate fact ids")
    candidates = np.unique(candidates)
    if candidates.size == 0:
        raise TripletsError("no candidate facts to rank")
    missing = np.setdiff1d(np.unique(truth), candidates)
    if missing.size:
        raise TripletsError(f"{missing.size} ground-truth facts (e.g. fact {int(missing[0])}) are not among the "
                            "candidates; use the task's facts or generalized mode")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise TripletsError(f"ks must be positive, got {ks}")
    keys, order = table.keys, table.order
    if keys is None or order is None:
        raise TripletsError("image → fact ranking needs the facts (S, P, O) for Sherlock's groups; pass them")
    level = order[truth].astype(np.int64) - 1                  # [n]
    group_start, group_size, members = _group_members(keys[:, candidates], level, keys[level, truth])
    rank = np.empty(len(images), dtype=np.int64)
    for start, stop, scores in candidate_score_blocks(images, table, candidates, SCORE_BLOCK_BYTES):
        sizes = group_size[start:stop]
        row = np.repeat(np.arange(stop - start), sizes)
        within = np.arange(row.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        column = members[np.repeat(group_start[start:stop], sizes) + within]
        row_t = torch.from_numpy(row)
        member_scores = scores[row_t, torch.from_numpy(column)]
        best = torch.full((stop - start,), -float("inf")).scatter_reduce_(0, row_t, member_scores, "amax")
        best_in_group = torch.zeros(stop - start, dtype=torch.int64).scatter_add_(
            0, row_t, (member_scores >= best[row_t]).long())
        at_least_best = (scores >= best[:, None]).sum(dim=1)
        rank[start:stop] = (1 + at_least_best - best_in_group).numpy()   # best rank of G, ties against G
    hits = {k: int((rank <= k + group_size - 1).sum()) for k in ks}
    reciprocal_sum = float((1.0 / np.maximum(1, rank - (group_size - 1))).sum())
    result = {f"top{k}": hits[k] / len(images) for k in ks}
    result["mrr"] = reciprocal_sum / len(images)
    return result


# ----------------------------------------------------------------------------- fact → image
def fact_to_image_metrics(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, fact_embeddings: np.ndarray | None,
                          fact_ids: Iterable[int] | np.ndarray, *, table: FactTable | None = None) -> dict[str, float]:
    """mAP, mAP@10 and mAP@100 of ranking images for each fact (see module docstring).

    ``fact_embeddings`` [F, D] is indexed by fact id (or ``table``, a :class:`FactTable`, given
    instead); ``fact_ids`` the facts used as queries (those with no positive image are
    skipped). Raises :class:`TripletsError` when no queried fact has a positive image. Scores
    come from :func:`triplets.index.score_blocks` (float32 GEMM, blocks of at most 32 MiB),
    each row then sorted once; AP and AP@k are exact on those scores.
    """
    images = normalize_rows(image_embeddings, name="image embeddings")
    if table is None:
        table = FactTable(fact_embeddings, None)
    fact_count = len(table.vectors)
    if images.shape[1] != table.vectors.shape[1]:
        raise TripletsError(f"image embeddings are {images.shape[1]}-d but fact embeddings {table.vectors.shape[1]}-d")
    truth = checked_fact_ids(image_fact_ids, fact_count, "image fact ids")
    if len(truth) != len(images):
        raise TripletsError(f"{len(images)} image embeddings but {len(truth)} fact ids")
    queries = checked_fact_ids(fact_ids, fact_count, "fact ids")
    queries = np.unique(queries)
    queries = queries[np.isin(queries, truth)]
    if queries.size == 0:
        raise TripletsError("none of the facts has a positive image; evaluate on a split with images of these facts")
    by_fact = np.argsort(truth, kind="stable")                   # images grouped by their fact
    first = np.searchsorted(truth[by_fact], queries, side="left")
    positives = np.searchsorted(truth[by_fact], queries, side="right") - first
    totals = {"map": 0.0, "map_at_10": 0.0, "map_at_100": 0.0}
    image_rows = torch.from_numpy(images)
    query_rows = torch.from_numpy(table.unit_rows(queries))
    equal_images = _first_equal_rows(images)
    for start, stop, scores in score_blocks(query_rows, image_rows, block_bytes=SORT_BLOCK_BYTES):
        if equal_images is not None:
            scores = scores.index_select(1, equal_images)
        ap, ap10, ap100 = _ap_from_positive_ranks(scores, by_fact, first[start:stop], positives[start:stop])
        totals["map"] += ap
        totals["map_at_10"] += ap10
        totals["map_at_100"] += ap100
    return {key: value / len(queries) for key, value in totals.items()}


def _ap_from_positive_ranks(scores: torch.Tensor, by_fact: np.ndarray, first: np.ndarray,
                            positives: np.ndarray) -> tuple[float, float, float]:
    """Sums over the rows of ``scores`` [b, n] of AP, AP@10 and AP@100 (module docstring), from the
    ranks of each row's positives (images ``by_fact[first[r]:first[r] + positives[r]]``) alone.

    With G(s) = #{images scoring ≥ s} and, among the row's P positives sorted ascending, a tie
    group [a, b) of the positive at place t (so t − a + 1 = j is its place in the group):
    AP = (1/P) Σ_positives (P − a) / G (sklearn's, ties at one threshold); with ties against the
    positives, the j-th tied positive sits at position G − (b − a) + j with P − b + j hits above
    or at it, so AP@k = (1 / min(k, P)) Σ_{position ≤ k} hits / position.
    """
    rows, count = scores.shape
    width = int(positives.max())
    row = np.repeat(np.arange(rows), positives)
    within = np.arange(row.size) - np.repeat(np.cumsum(positives) - positives, positives)
    image = by_fact[np.repeat(first, positives) + within]
    values = torch.full((rows, width), -float("inf"))
    values[torch.from_numpy(row), torch.from_numpy(within)] = scores[torch.from_numpy(row), torch.from_numpy(image)]
    values = torch.sort(values, dim=1).values                      # pads (−inf) first
    real = torch.isfinite(values)
    ascending = torch.sort(scores, dim=1).values
    at_least = (count - torch.searchsorted(ascending, values, right=False)).double()   # G(s)
    a = torch.searchsorted(values, values, right=False).double()
    b = torch.searchsorted(values, values, right=True).double()
    place = torch.arange(width, dtype=torch.float64)[None, :]
    total = torch.from_numpy(positives.astype(np.float64))[:, None]
    ap = torch.where(real, (width - a) / at_least, 0.0).sum(1) / total[:, 0]
    position = at_least - (b - a) + (place - a + 1)
    hits = (width - b) + (place - a + 1)
    sums = []
    for k in (10, 100):
        term = torch.where(real & (position <= k), hits / position, 0.0).sum(1)
        sums.append(float((term / torch.clamp(total[:, 0], max=float(k))).sum()))
    return float(ap.sum()), sums[0], sums[1]


# ----------------------------------------------------------------------------- models and fact files
def embed_images(model: Any, dataset: Any, *, batch_size: int = 256, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of ``dataset`` (items ``(image tensor (3,S,S), fact_id)``) with ``model``.

    Uses ``model.embed`` (the L2-normalised S‖P‖O embedding) when present, else
    ``normalize(model(x))``; eval mode, no gradients, the model's previous train/eval mode
    restored. Returns ``(embeddings float32 [n, D] with unit rows, fact ids int64 [n])``.
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    if batch_size < 1:
        raise TripletsError(f"batch_size must be positive, got {batch_size}")
    if len(dataset) == 0:
        raise TripletsError("the dataset holds no images; check the task and split")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    model.to(device)
    embed = getattr(model, "embed", None)
    vectors: list[np.ndarray] = []
    fact_ids: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TripletsError("the dataset must yield (image, fact_id) pairs")
                images, ids = batch[0].to(device), batch[1]
                output = embed(images) if callable(embed) else F.normalize(model(images), dim=1)
                vectors.append(F.normalize(output.float(), dim=1).cpu().numpy())
                fact_ids.append(np.asarray(ids, dtype=np.int64).reshape(-1))
    finally:
        model.train(was_training)
    return np.concatenate(vectors).astype(np.float32), np.concatenate(fact_ids)


def _fact_vectors(fact_file: Any) -> np.ndarray:
    vectors = getattr(fact_file, "fact_embeddings", None)
    if vectors is None:
        raise TripletsError(f"fact file {getattr(fact_file, 'path', '')} holds no language embeddings; "
                            "prepare it with a text encoder")
    return np.asarray(vectors, dtype=np.float32)


def candidate_facts(fact_file: Any, task: int, mode: Mode) -> np.ndarray:
    """The fact ids ranked for ``task``: its own facts ("standard") or every task's ("generalized")."""
    if mode not in RETRIEVAL_MODES:
        raise TripletsError(f"unknown evaluation mode {mode!r}; use 'standard' or 'generalized'")
    num_tasks = int(fact_file.num_tasks)
    if not 0 <= int(task) < num_tasks:
        raise TripletsError(f"task {task} does not exist; the fact file has tasks 0..{num_tasks - 1}")
    if mode == "standard":
        return np.unique(np.asarray(fact_file.facts_of_task(int(task)), dtype=np.int64))
    return np.unique(np.concatenate([np.asarray(fact_file.facts_of_task(t), dtype=np.int64) for t in range(num_tasks)]))


def evaluate_embeddings(image_embeddings: np.ndarray, image_fact_ids: np.ndarray, fact_file: Any, task: int, *,
                        mode: Mode = "standard", field: bool = False) -> dict[str, float]:
    """All metrics of one task from already computed image embeddings (see :func:`evaluate_task`);
    ``field=True`` adds the strict R@K and MRR of :mod:`triplets.facts.retrieval_metrics` (``i2f_r1``, …)."""
    candidates = candidate_facts(fact_file, task, mode)
    table = fact_table(fact_file)
    metrics: dict[str, float] = image_to_fact_metrics(image_embeddings, image_fact_ids, None, fact_file.facts,
                                                      candidates, table=table)
    metrics.update(fact_to_image_metrics(image_embeddings, image_fact_ids, None, candidates, table=table))
    if field:
        metrics.update(field_metrics(image_embeddings, image_fact_ids, table, candidates))
    metrics["num_images"] = int(len(image_fact_ids))
    metrics["num_candidates"] = int(len(candidates))
    return metrics


def evaluate_task(model: Any, fact_file: Any, task: int, *, mode: Mode = "standard", split: int | str = "test",
                  device: str = "cpu", batch_size: int = 256) -> dict[str, float]:
    """Evaluate ``model`` on the ``split`` images of ``task``.

    Returns {"top1", "top5", "top10", "mrr", "map", "map_at_10", "map_at_100"} (fractions)
    plus "num_images" and "num_candidates". Candidates: the task's facts ("standard") or
    the facts of all tasks ("generalized"); fact → image ranks the same images.
    """
    candidate_facts(fact_file, task, mode)  # validates task and mode before any work
    image_embeddings, image_fact_ids = embed_images(model, fact_image_dataset(fact_file, int(task), split),
                                                    batch_size=batch_size, device=device)
    return evaluate_embeddings(image_embeddings, image_fact_ids, fact_file, task, mode=mode)


def final_metrics(model: Any, fact_file: Any, *, split: int | str = "test", device: str = "cpu",
                  batch_size: int = 256) -> dict[str, list[dict[str, float]]]:
    """The ``"final"`` entry of results.json: {"standard": [per task metrics], "generalized": [...]}.

    Each task's images are embedded once and scored in both modes (see :func:`evaluate_task`).
    """
    final: dict[str, list[dict[str, float]]] = {mode: [] for mode in RETRIEVAL_MODES}
    for task in range(int(fact_file.num_tasks)):
        image_embeddings, image_fact_ids = embed_images(model, fact_image_dataset(fact_file, task, split),
                                                        batch_size=batch_size, device=device)
        for mode in RETRIEVAL_MODES:
            final[mode].append(evaluate_embeddings(image_embeddings, image_fact_ids, fact_file, task, mode=mode,
                                                   field=True))
    return final


# ----------------------------------------------------------------------------- runs
def check_run_matches_fact_file(run_dir: Path, method: str, fact_file: Any) -> None:
    """Refuse a model trained on another fact vocabulary than ``fact_file`` (RunFolderError)."""
    from mas_core.checkpoint import load_checkpoint  # noqa: PLC0415

    model_path = Path(run_dir) / method_folder(method) / "model.pt"
    if not model_path.is_file():
        raise RunFolderError(f"run {run_dir} has no final model for method {method!r} ({model_path}); "
                             "finish training with mas-triplets train --resume")
    saved = load_checkpoint(model_path).get(VOCABULARY_KEY)
    current = fact_vocabulary_fingerprint(fact_file)
    if saved is not None and str(saved) != current:
        raise RunFolderError(f"method {method!r} of run {run_dir} was trained on fact vocabulary {saved}, "
                             f"but {getattr(fact_file, 'path', 'the fact file')} has vocabulary {current}; "
                             "use the fact file the run was trained on")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN/results.json`` (RunFolderError when absent or not valid JSON)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no results.json; train the run first (mas-triplets train)")
    try:
        results = read_json(path, what="results document")  # checks its SHA-256
    except MASCoreError as exc:
        raise RunFolderError(str(exc)) from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise RunFolderError(f"{path} has no 'methods' mapping; it was not written by mas-triplets train")
    return results


def stale_index_metrics(method_dir: str | Path, fact_file: Any, final_standard: Sequence[dict[str, Any]],
                        tasks_trained: int) -> dict[str, Any]:
    """The ``stale_index`` entry of a method (:mod:`triplets.facts.stale_index`): for every task s it
    trained, the standard metrics (``field=True``) of tasks 0..s from the test-region embeddings
    saved after task s, against ``final_standard`` (the final model's per-task standard metrics)."""
    check_saved(method_dir, tasks_trained)
    vocabulary = fact_vocabulary_fingerprint(fact_file)
    sizes = [len(fact_file.sample_indices(task=j, split=1)) for j in range(int(tasks_trained))]
    rows = []
    for after in range(int(tasks_trained)):
        embedded = load_task_embeddings(method_dir, after, vocabulary=vocabulary, test_sizes=sizes)
        rows.append([evaluate_embeddings(vectors, fact_ids, fact_file, j, mode="standard", field=True)
                     for j, (vectors, fact_ids) in enumerate(embedded)])
    return stale_index_entry(rows, final_standard)


def evaluate_run(run_dir: str | Path, *, device: str = "cpu", batch_size: int = 256,
                 stale_index: bool | None = None) -> dict[str, Any]:
    """Re-evaluate every trained method of a run on every task, in both modes.

    Replaces each method's ``"final"`` entry of RUN/results.json (see :func:`final_metrics`) and its
    summaries (``diagonal_mean``, ``retrieval``: :func:`triplets.facts.retrieval_report.summary_extras`);
    with ``stale_index`` (None: as the run's ``eval.stale_index``) also its ``"stale_index"`` entry
    (:func:`stale_index_metrics`; a method without the saved embeddings is refused in one line).
    Then rewrites results.json, results.md and the plots. Everything is computed before
    anything is written, so an error leaves the run folder unchanged. Returns the results.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"no run folder at {run_dir}; train one with mas-triplets train --out {run_dir}")
    with load_run(run_dir) as run:
        results = load_results(run_dir)
        fact_file = run.fact_file
        stale = bool(run.config.eval.stale_index) if stale_index is None else bool(stale_index)
        finals: dict[str, Any] = {}
        stales: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for method in run.methods:
            if method not in results["methods"]:
                raise RunFolderError(f"{run_dir}/results.json has no entry for method {method!r}; finish the run "
                                     "with mas-triplets train --resume")
            check_run_matches_fact_file(run_dir, method, fact_file)
            if stale:
                check_saved(run_dir / method_folder(method), len(results["methods"][method].get("accuracy_matrix") or []))
        for method in run.methods:
            started = time.perf_counter()
            model = run.load_model(method, device=device)
            finals[method] = final_metrics(model, fact_file, device=device, batch_size=batch_size)
            if stale:
                stales[method] = stale_index_metrics(run_dir / method_folder(method), fact_file, finals[method]["standard"],
                                                     len(results["methods"][method]["accuracy_matrix"]))
            timings[method] = time.perf_counter() - started
    for method, final in finals.items():
        entry = results["methods"].setdefault(method, {})
        entry["final"] = final
        entry.update(summary_extras(entry))
        if method in stales:
            entry["stale_index"] = stales[method]
        entry["eval_time_s"] = timings[method]
    render_markdown(results)  # validates the results before anything is written
    atomic_write_json(run_dir / "results.json", results, checksum=True)
    write_report(results, run_dir)
    return results
