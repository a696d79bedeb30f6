"""Dividing samples into train/test by image, facts into tasks, and the per-task statistics of a division.

* :func:`split_by_image`: whole images (seeded) to the test split, then
  :func:`cover_both_splits` moves one sample of each fact seen on one side only.

Every fact goes to exactly one task, so all its samples stay together; no fact is
dropped here (the long tail is kept; :func:`filter_rare_facts` is the one place that
drops facts, by a minimum count of training samples).

* :func:`random_split`: a seeded permutation of the facts dealt round-robin into T
  tasks, so task sizes differ by at most one fact.
* :func:`semantic_split`: k-means (scikit-learn, ``n_init`` fixed) on the facts'
  language embeddings into T clusters, so tasks differ in meaning; clusters are
  numbered in order of their smallest fact id, so the labels are reproducible.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import DataPrepError
from .fact_file import fact_to_string

KMEANS_N_INIT = 10
#: default fraction of the images whose samples go to the test split (sources without a split of their own)
TEST_FRACTION = 0.2


def split_by_image(sample_image_id: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Split (int8 [N], 0 train / 1 test) putting ``round(test_fraction * images)`` whole images, chosen with ``seed``, in test."""
    images = np.unique(sample_image_id)
    if not 0.0 <= test_fraction < 1.0:
        raise DataPrepError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    num_test = int(round(test_fraction * len(images)))
    if len(images) >= 2 and test_fraction > 0:
        num_test = min(max(num_test, 1), len(images) - 1)
    test_images = np.random.default_rng(seed).permutation(images)[:num_test]
    return np.isin(sample_image_id, test_images).astype(np.int8)


def cover_both_splits(sample_fact: np.ndarray, sample_split: np.ndarray, num_facts: int) -> int:
    """Move one sample of every fact with >= 2 samples all on one side to the other side (in place);
    return how many moved."""
    order = np.argsort(sample_fact, kind="stable")
    counts = np.bincount(sample_fact, minlength=num_facts)
    train_counts = np.bincount(sample_fact[sample_split == 0], minlength=num_facts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    moved = 0
    for fact in np.flatnonzero(counts >= 2).tolist():
        if train_counts[fact] == counts[fact]:
            sample_split[order[starts[fact] + counts[fact] - 1]] = 1  # last sample of the fact -> test
            moved += 1
        elif train_counts[fact] == 0:
            sample_split[order[starts[fact]]] = 0  # first sample of the fact -> train
            moved += 1
    return moved


def _check_task_count(num_facts: int, num_tasks: int) -> None:
    if num_tasks < 1:
        raise DataPrepError(f"the number of tasks must be at least 1, got {num_tasks}")
    if num_tasks > num_facts:
        raise DataPrepError(
            f"{num_tasks} tasks but only {num_facts} facts; lower --tasks or --min-fact-count"
        )


def random_split(num_facts: int, num_tasks: int, seed: int) -> np.ndarray:
    """Task id (int64 [F]) of each fact: a permutation with ``seed`` dealt round-robin into ``num_tasks`` tasks."""
    _check_task_count(num_facts, num_tasks)
    permutation = np.random.default_rng(seed).permutation(num_facts)
    task_of_fact = np.empty(num_facts, dtype=np.int64)
    task_of_fact[permutation] = np.arange(num_facts) % num_tasks
    return task_of_fact


def semantic_split(fact_embeddings: np.ndarray, num_tasks: int, seed: int) -> np.ndarray:
    """Task id (int64 [F]) of each fact from k-means on ``fact_embeddings`` (float [F, D]).

    ``KMeans(n_clusters=num_tasks, n_init=10, random_state=seed)``; clusters renumbered
    by their smallest fact id. Raises :class:`DataPrepError` if fewer distinct
    embeddings than tasks make a cluster empty.
    """
    embeddings = np.asarray(fact_embeddings, dtype=np.float64)
    if embeddings.ndim != 2:
        raise DataPrepError(f"fact embeddings must be a 2-d array [F, D], got shape {embeddings.shape}")
    num_facts = embeddings.shape[0]
    _check_task_count(num_facts, num_tasks)
    if not np.isfinite(embeddings).all():
        raise DataPrepError("fact embeddings contain NaN or infinity; check the text encoder")
    distinct = len(np.unique(embeddings, axis=0))
    if distinct < num_tasks:
        raise DataPrepError(
            f"only {distinct} distinct fact embeddings for {num_tasks} tasks; lower --tasks or use --split random"
        )
    from sklearn.cluster import KMeans  # heavy (1.5 s to import): only the semantic split needs it

    labels = KMeans(n_clusters=num_tasks, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(embeddings)
    first_fact = {int(label): int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)}
    if len(first_fact) != num_tasks:
        raise DataPrepError(f"k-means left {num_tasks - len(first_fact)} empty tasks; lower --tasks")
    renumber = {label: rank for rank, label in enumerate(sorted(first_fact, key=first_fact.get))}
    return np.array([renumber[int(label)] for label in labels], dtype=np.int64)


def filter_rare_facts(sample_fact: np.ndarray, sample_split: np.ndarray, num_facts: int,
                      min_fact_count: int) -> np.ndarray:
    """Boolean mask [F] of the facts with at least ``min_fact_count`` training samples (split 0)."""
    train_counts = np.bincount(np.asarray(sample_fact)[np.asarray(sample_split) == 0], minlength=num_facts)
    return train_counts >= int(min_fact_count)


def task_statistics(
    task_of_fact: np.ndarray,
    fact_order: np.ndarray,
    sample_fact: np.ndarray,
    sample_split: np.ndarray,
    facts: Sequence[Sequence[str | None]],
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """Per-task statistics: facts, train/test samples, order mix (facts of order 1/2/3) and the top facts.

    Returns one dict per task: ``{"task", "facts", "train_samples", "test_samples",
    "facts_by_order": {"1","2","3"}, "top_facts": [[fact string, samples], ...]}``
    (top facts by their number of samples, ties by fact id).
    """
    task_of_fact = np.asarray(task_of_fact)
    fact_order = np.asarray(fact_order)
    sample_fact = np.asarray(sample_fact)
    sample_split = np.asarray(sample_split)
    num_facts = len(task_of_fact)
    num_tasks = int(task_of_fact.max()) + 1 if num_facts else 0
    samples_per_fact = np.bincount(sample_fact, minlength=num_facts)
    train_per_fact = np.bincount(sample_fact[sample_split == 0], minlength=num_facts)
    statistics: list[dict[str, Any]] = []
    for task in range(num_tasks):
        members = np.flatnonzero(task_of_fact == task)
        ranked = members[np.lexsort((members, -samples_per_fact[members]))][:top_k]
        statistics.append({
            "task": task,
            "facts": int(len(members)),
            "train_samples": int(train_per_fact[members].sum()),
            "test_samples": int(samples_per_fact[members].sum() - train_per_fact[members].sum()),
            "facts_by_order": {str(order): int((fact_order[members] == order).sum()) for order in (1, 2, 3)},
            "top_facts": [[fact_to_string(facts[i]), int(samples_per_fact[i])] for i in ranked],
        })
    return statistics


def format_task_table(statistics: Sequence[dict[str, Any]], top_shown: int = 3) -> str:
    """The statistics of :func:`task_statistics` as a fixed-width text table."""
    header = f"{'task':>4} {'facts':>7} {'<S>':>6} {'<S,P>':>6} {'<S,P,O>':>8} {'train':>9} {'test':>8}  top facts"
    lines = [header, "-" * len(header)]
    for row in statistics:
        by_order = row["facts_by_order"]
        top = ", ".join(f"{name} ({count})" for name, count in row["top_facts"][:top_shown])
        lines.append(
            f"{row['task']:>4} {row['facts']:>7} {by_order['1']:>6} {by_order['2']:>6} {by_order['3']:>8} "
            f"{row['train_samples']:>9} {row['test_samples']:>8}  {top}"
        )
    return "\n".join(lines)
