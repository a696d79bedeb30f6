"""Task splits: every fact in one task, tasks non-empty, seeded, semantic clusters follow meaning."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.facts.splits import filter_rare_facts, format_task_table, random_split, semantic_split, task_statistics


def test_random_split_is_balanced_seeded_and_complete() -> None:
    tasks = random_split(103, 4, seed=3)
    assert tasks.shape == (103,) and set(tasks.tolist()) == {0, 1, 2, 3}
    assert sorted(np.bincount(tasks).tolist()) == [25, 26, 26, 26]
    np.testing.assert_array_equal(tasks, random_split(103, 4, seed=3))
    assert not np.array_equal(tasks, random_split(103, 4, seed=4))


def test_more_tasks_than_facts_is_an_error() -> None:
    with pytest.raises(DataPrepError, match="5 tasks but only 4 facts"):
        random_split(4, 5, seed=0)
    with pytest.raises(DataPrepError, match="5 tasks but only 4 facts"):
        semantic_split(np.eye(4), 5, seed=0)


def test_semantic_split_recovers_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    truth = rng.integers(0, 3, 60)
    truth[:3] = [2, 0, 1]
    embeddings = centres[truth] + rng.normal(scale=0.1, size=(60, 3))
    tasks = semantic_split(embeddings, 3, seed=0)
    # same partition as the truth, and tasks numbered by their first fact: fact 0 in task 0, fact 1 in task 1, ...
    assert tasks[:3].tolist() == [0, 1, 2]
    mapping = dict(zip(truth[:3].tolist(), [0, 1, 2]))
    np.testing.assert_array_equal(tasks, [mapping[t] for t in truth.tolist()])
    np.testing.assert_array_equal(tasks, semantic_split(embeddings, 3, seed=0))


def test_semantic_split_with_too_few_distinct_embeddings() -> None:
    with pytest.raises(DataPrepError, match="only 2 distinct fact embeddings"):
        semantic_split(np.array([[0.0, 1], [0, 1], [1, 0], [1, 0]]), 3, seed=0)


def test_filter_and_statistics_count_exactly() -> None:
    facts = [("a", None, None), ("a", "b", None), ("a", "b", "c"), ("d", None, None)]
    sample_fact = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    sample_split = np.array([0, 0, 1, 0, 1, 0, 1, 1], dtype=np.int8)
    np.testing.assert_array_equal(filter_rare_facts(sample_fact, sample_split, 4, 2), [True, False, False, False])
    stats = task_statistics(np.array([0, 1, 1, 0]), np.array([1, 2, 3, 1]), sample_fact, sample_split, facts, top_k=2)
    assert stats[0] == {"task": 0, "facts": 2, "train_samples": 2, "test_samples": 3,
                        "facts_by_order": {"1": 2, "2": 0, "3": 0}, "top_facts": [["<a>", 3], ["<d>", 2]]}
    assert stats[1]["facts_by_order"] == {"1": 0, "2": 1, "3": 1}
    assert stats[1]["top_facts"] == [["<a,b>", 2], ["<a,b,c>", 1]]
    table = format_task_table(stats)
    assert len(table.splitlines()) == 4 and "<a,b> (2)" in table
