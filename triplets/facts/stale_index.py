"""Stale-index retrieval: does an index of region embeddings built after task s still serve the
final model's queries, or must every stored region be embedded again?

With ``eval.stale_index: true`` a fact run saves, after every task s (0-based here, 1-based in
file names and reports), the L2-normalised embeddings of the test regions of tasks 0..s computed
by the model the run delivers after task s (for IMM the merged model, for ``ridge`` its solution)::

    RUN/<method>/stale_index/after_task_<s+1>.npz
        embeddings_<j>  float32 [n_j, D]   task j's test regions (fact-file order), j = 0..s
        fact_ids_<j>    int64 [n_j]        their true facts
        after_task      s;  vocabulary: the fact file's vocabulary fingerprint;  format: 1
        sha256          SHA-256 over the arrays above (checked on load)

Each file is written atomically (temporary file, then rename) by the experiment's per-task
evaluation, before the task's checkpoint, so a killed run that resumes writes it again from the
same model: a resumed run's files equal an uninterrupted run's. Disk: 4·D·Σ_{s} Σ_{j≤s} n_j bytes
per method (D = 3·slot size; e.g. 4 tasks of 100 test regions at D = 1152: 4.6 MB).

The stale-index row C[s] (:func:`stale_index_entry`; computed by
:func:`triplets.facts.evaluate.stale_index_metrics`) queries those stored region embeddings with the
fact vectors the final model ranks against, on the facts of the tasks learned by s: per task
j ≤ s the standard-mode metrics of :func:`triplets.facts.evaluate.evaluate_embeddings` (Sherlock's
top-5 and MRR, fact → image mAP@10, the strict R@K of :mod:`triplets.facts.retrieval_metrics`) from
``embeddings_<j>`` of the file after task s, and

    C[s]      = (1/(s+1)) Σ_{j≤s} top5(index after s, task j)
    fresh[s]  = (1/(s+1)) Σ_{j≤s} top5(final model, task j)      (the run's ``final`` entry)

(the same means for every other key). The last row is the final model's own index: C[T−1] =
fresh[T−1] = the run's average standard top-5 of the final model. The fact vectors are the fact
file's language vectors, which no method trains, so the stored embeddings after task s are
queried exactly as the model after task s would be: ``C[s]`` per task equals the accuracy matrix's
``R[s][j]`` (for IMM, ``R_merged[s][j]``), and fresh − stale is the change that re-embedding
with the final model brings (negative where the final model has forgotten the task).
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mas_core.checkpoint import atomic_write_bytes

from ..errors import RunFolderError, TripletsError

STALE_FOLDER = "stale_index"
STALE_FORMAT = 1
STALE_KEYS = ("top5", "mrr", "map_at_10", "i2f_r1", "i2f_r5", "i2f_r10", "f2i_r1", "f2i_r5", "f2i_r10")


def embeddings_path(method_dir: str | Path, task: int) -> Path:
    """``method_dir/stale_index/after_task_<task+1>.npz``."""
    return Path(method_dir) / STALE_FOLDER / f"after_task_{int(task) + 1}.npz"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode("utf-8"))
        digest.update(str(arrays[name].dtype).encode("ascii"))
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def save_task_embeddings(method_dir: str | Path, task: int, embedded: Sequence[tuple[np.ndarray, np.ndarray]],
                         vocabulary: str) -> Path:
    """Write the test-region embeddings of tasks ``0..task`` (``embedded[j] = (vectors [n_j, D],
    fact ids [n_j])``) of the model after ``task`` atomically; return the file's path."""
    if len(embedded) != int(task) + 1:
        raise TripletsError(f"after task {task} the index holds tasks 0..{task}, got {len(embedded)} tasks")
    arrays: dict[str, np.ndarray] = {"format": np.array(STALE_FORMAT, dtype=np.int64),
                                     "after_task": np.array(int(task), dtype=np.int64),
                                     "vocabulary": np.array(str(vocabulary))}
    for j, (vectors, fact_ids) in enumerate(embedded):
        arrays[f"embeddings_{j}"] = np.ascontiguousarray(vectors, dtype=np.float32)
        arrays[f"fact_ids_{j}"] = np.ascontiguousarray(fact_ids, dtype=np.int64)
    arrays["sha256"] = np.array(_digest(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = embeddings_path(method_dir, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def check_saved(method_dir: str | Path, tasks_trained: int) -> None:
    """Refuse (:class:`RunFolderError`, one line) a method without the files of every task it trained."""
    missing = [s + 1 for s in range(int(tasks_trained)) if not embeddings_path(method_dir, s).is_file()]
    if missing:
        raise RunFolderError(
            f"{method_dir} has no stale-index embeddings after task(s) {', '.join(map(str, missing))} "
            f"({embeddings_path(method_dir, missing[0] - 1)}); train the run with eval.stale_index: true "
            "(--set eval.stale_index=true) from its first task to evaluate a stale index")


def check_resume(method_dir: str | Path, last_task: int) -> None:
    """Before a method resumes with ``eval.stale_index`` on: refuse (one line) a checkpoint whose
    finished tasks were trained without it when tasks up to ``last_task`` are still to train (their
    rows could never be reported); a method with nothing left to train is not refused."""
    path = Path(method_dir) / "checkpoint.pt"
    if not path.is_file():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        completed = len(state["accuracy"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by the loop's full load
        return
    if completed >= int(last_task):
        return
    missing = [s + 1 for s in range(completed) if not embeddings_path(method_dir, s).is_file()]
    if missing:
        raise RunFolderError(
            f"{method_dir} finished task(s) {', '.join(map(str, missing))} without eval.stale_index, so its stale "
            "index cannot be reported; resume without eval.stale_index or train the method in a new run folder")


def load_task_embeddings(method_dir: str | Path, task: int, *, vocabulary: str,
                         test_sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The embeddings :func:`save_task_embeddings` wrote after ``task``, checked: its checksum, its
    task, the fact vocabulary and the test-region count of every task (``test_sizes[j]``)."""
    path = embeddings_path(method_dir, task)
    if not path.is_file():
        check_saved(method_dir, int(task) + 1)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise RunFolderError(f"{path} is not a readable stale-index file ({exc}); retrain the method") from None
    recorded = str(arrays.pop("sha256", ""))
    if recorded != _digest(arrays):
        raise RunFolderError(f"{path} fails its checksum (damaged or edited); retrain the method")
    if int(arrays.get("format", -1)) != STALE_FORMAT or int(arrays.get("after_task", -1)) != int(task):
        raise RunFolderError(f"{path} is not the stale-index file of task {int(task) + 1} (format {STALE_FORMAT})")
    if str(arrays.get("vocabulary")) != str(vocabulary):
        raise RunFolderError(f"{path} was written for another fact vocabulary; use the run's own fact file")
    embedded = []
    for j in range(int(task) + 1):
        vectors, fact_ids = arrays.get(f"embeddings_{j}"), arrays.get(f"fact_ids_{j}")
        if vectors is None or fact_ids is None or len(vectors) != len(fact_ids) or len(fact_ids) != int(test_sizes[j]):
            raise RunFolderError(f"{path} does not hold the {int(test_sizes[j])} test regions of task {j + 1}; "
                                 "retrain the method on this fact file")
        embedded.append((vectors, fact_ids))
    return embedded


def _means(per_task: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = [key for key in STALE_KEYS if per_task and all(isinstance(m.get(key), (int, float)) for m in per_task)]
    return {key: float(np.mean([float(m[key]) for m in per_task])) for key in keys}


def stale_index_entry(rows: Sequence[Sequence[dict[str, Any]]], final_standard: Sequence[dict[str, Any]]
                      ) -> dict[str, Any]:
    """The ``stale_index`` entry of a method in results.json from ``rows[s][j]`` (standard metrics
    of task j from the index after task s) and ``final_standard[j]`` (the final model's)::

        {"metric": "standard", "rows": [{"index_after_task": s + 1, "tasks": s + 1,
          "stale": {key: C[s]}, "fresh": {key: fresh[s]},
          "per_task": [{key: value of task j from the index after s}]}]}

    with ``key`` over :data:`STALE_KEYS` (those every task has)."""
    entry_rows = []
    for s, per_task in enumerate(rows):
        kept = [{key: float(m[key]) for key in STALE_KEYS if isinstance(m.get(key), (int, float))} for m in per_task]
        entry_rows.append({"index_after_task": s + 1, "tasks": s + 1, "stale": _means(per_task),
                           "fresh": _means(list(final_standard[: s + 1])), "per_task": kept})
    return {"metric": "standard", "rows": entry_rows}


__all__ = ["STALE_FOLDER", "STALE_FORMAT", "STALE_KEYS", "check_resume", "check_saved", "embeddings_path", "load_task_embeddings",
           "save_task_embeddings", "stale_index_entry"]
