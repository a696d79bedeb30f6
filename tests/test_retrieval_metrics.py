"""The field's retrieval metrics (triplets.facts.retrieval_metrics, triplets.facts.retrieval_report) against
explicit Python loops over their definitions."""
from __future__ import annotations

import numpy as np
import pytest

from triplets.errors import TripletsError
from triplets.facts.evaluate import FactTable, evaluate_embeddings, fact_to_image_metrics
from triplets.facts.retrieval_metrics import FIELD_KEYS, average_precision_at_k, fact_to_image_recall, field_metrics, image_to_fact_recall
from triplets.facts.retrieval_report import diagonal_mean, retrieval_summary, retrieval_tables, summary_extras


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _brute_image_to_fact(images, truth, facts, candidates, k):
    """R@K and MRR by loops: rank = 1 + #{c ≠ g : s(i, c) ≥ s(i, g)} (ties against the truth)."""
    hits, reciprocal = 0, 0.0
    for image, g in zip(images, truth):
        own = _cos(image, facts[g])
        rank = 1 + sum(1 for c in candidates if c != g and _cos(image, facts[c]) >= own)
        hits += rank <= k
        reciprocal += 1.0 / rank
    return hits / len(images), reciprocal / len(images)


def _brute_fact_to_image(images, truth, facts, queries, k):
    """R@K by loops: a fact is a hit when one of its own regions is among the K best (ties against it)."""
    counted, hits = 0, 0
    for f in queries:
        positives = [i for i in range(len(images)) if truth[i] == f]
        if not positives:
            continue
        counted += 1
        best = max(_cos(facts[f], images[i]) for i in positives)
        rank = 1 + sum(1 for i in range(len(images)) if truth[i] != f and _cos(facts[f], images[i]) >= best)
        hits += rank <= k
    return hits / counted


def _brute_map_at_k(images, truth, facts, queries, k):
    """mAP@K by loops: AP@K = (1/min(K, |P|)) Σ_{k' ≤ K, hit at k'} precision@k', regions sorted by
    score with ties against the positives."""
    values = []
    for f in queries:
        positives = sum(1 for t in truth if t == f)
        if not positives:
            continue
        order = sorted(range(len(images)), key=lambda i: (-_cos(facts[f], images[i]), truth[i] == f))
        found, total = 0, 0.0
        for place, i in enumerate(order[:k], start=1):
            if truth[i] == f:
                found += 1
                total += found / place
        values.append(total / min(k, positives))
    return float(np.mean(values))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_mrr_and_map_at_10_equal_their_brute_force_definitions(seed):
    rng = np.random.default_rng(seed)
    facts = rng.normal(size=(23, 6)).astype(np.float32)
    facts[5] = facts[4]                                         # two facts with one vector: they tie
    truth = rng.integers(0, 23, size=60)
    images = (facts[truth] + rng.normal(0, 1.2, size=(60, 6))).astype(np.float32)
    images[7] = images[3]                                       # two equal regions
    candidates = np.arange(23)
    table = FactTable(facts, None)
    got = field_metrics(images, truth, table, candidates)
    assert set(got) == set(FIELD_KEYS)
    for k in (1, 5, 10):
        recall, mrr = _brute_image_to_fact(images, truth, facts, candidates, k)
        assert got[f"i2f_r{k}"] == pytest.approx(recall, abs=1e-12)
        assert got["i2f_mrr"] == pytest.approx(mrr, abs=1e-12)
        assert got[f"f2i_r{k}"] == pytest.approx(_brute_fact_to_image(images, truth, facts, candidates, k), abs=1e-12)
    map10 = fact_to_image_metrics(images, truth, facts, candidates)["map_at_10"]
    assert map10 == pytest.approx(_brute_map_at_k(images, truth, facts, candidates, 10), abs=1e-9)
    # a subset of candidates (standard mode): only the images whose truth is among them
    subset = np.arange(0, 23, 2)
    keep = np.isin(truth, subset)
    recall, mrr = _brute_image_to_fact(images[keep], truth[keep], facts, subset, 5)
    assert image_to_fact_recall(images[keep], truth[keep], table, subset)["i2f_r5"] == pytest.approx(recall, abs=1e-12)
    assert fact_to_image_recall(images, truth, table, subset)["f2i_r5"] == pytest.approx(
        _brute_fact_to_image(images, truth, facts, subset, 5), abs=1e-12)


def test_hand_case_and_ties_against_the_truth():
    facts = np.eye(3, dtype=np.float32)
    images = np.array([[1.0, 0.5, 0.0],     # truth 0 first                      → rank 1
                       [0.6, 0.3, 0.6],     # truth 1 third (0 and 2 above)       → rank 3
                       [0.5, 0.0, 0.5]],    # truth 2 tied with 0: tie against it → rank 2
                      dtype=np.float32)
    truth = np.array([0, 1, 2])
    got = image_to_fact_recall(images, truth, FactTable(facts, None), [0, 1, 2])
    assert got == pytest.approx({"i2f_r1": 1 / 3, "i2f_r5": 1.0, "i2f_r10": 1.0, "i2f_mrr": (1 + 1 / 3 + 1 / 2) / 3})
    # fact → image: fact 0 ranks images 0 (1/‖·‖), 1, 2: its own region 0 first; fact 1: region 0
    # (0.447) above its own region 1 (0.333); fact 2: region 2 (0.707) first
    f2i = fact_to_image_recall(images, truth, FactTable(facts, None), [0, 1, 2], ks=(1, 2))
    assert f2i == pytest.approx({"f2i_r1": 2 / 3, "f2i_r2": 1.0})
    constant = np.ones((3, 3), dtype=np.float32)                # every score equal: the worst rank
    assert image_to_fact_recall(constant, truth, FactTable(facts, None), [0, 1, 2])["i2f_r1"] == 0.0
    with pytest.raises(TripletsError, match="candidates"):
        image_to_fact_recall(images, truth, FactTable(facts, None), [0, 1])


class _Facts:
    """A fact file's evaluation view: 8 <S,P,O> facts with distinct triples, 2 tasks."""

    def __init__(self, vectors):
        self.fact_embeddings = vectors
        self.facts = [(f"s{f}", "p", f"o{f}") for f in range(len(vectors))]
        self.num_tasks = 2

    def facts_of_task(self, task):
        return list(range(4 * task, 4 * task + 4))


def test_strict_recall_is_sherlocks_top_k_on_unique_triples_and_the_final_entry_has_it():
    rng = np.random.default_rng(3)
    fact_file = _Facts(rng.normal(size=(8, 6)).astype(np.float32))
    truth = rng.integers(4, 8, size=30)
    images = fact_file.fact_embeddings[truth] + rng.normal(0, 1.0, size=(30, 6)).astype(np.float32)
    measured = {}
    for mode in ("standard", "generalized"):
        metrics = measured[mode] = evaluate_embeddings(images, truth, fact_file, 1, mode=mode, field=True)
        for k in (1, 5, 10):  # an <S,P,O> fact with a unique triple is its own group: the same ranks
            assert metrics[f"i2f_r{k}"] == metrics[f"top{k}"]
        assert metrics["i2f_mrr"] == pytest.approx(metrics["mrr"], abs=1e-12)
    plain = evaluate_embeddings(images, truth, fact_file, 1)
    assert not set(FIELD_KEYS) & set(plain)                     # the old keys alone unless asked
    assert all(plain[key] == measured["standard"][key] for key in plain)     # and their values unchanged


def test_map_at_10_is_the_usual_ap_at_k():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    labels = np.array([[False, True, False, True, False]])
    # hits at 2 and 4: (1/2 + 2/4) / min(10, 2)
    assert average_precision_at_k(scores, labels, 10)[0] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_diagonal_mean_summary_and_tables():
    matrix = [[0.8, None, None], [0.6, 0.7, None], [0.5, 0.55, 0.75]]
    assert diagonal_mean(matrix) == pytest.approx((0.8 + 0.7 + 0.75) / 3)
    assert diagonal_mean([[0.8, None], [0.6, None]]) is None
    task = {key: 0.5 for key in FIELD_KEYS} | {"map_at_10": 0.25, "top5": 0.9}
    final = {"standard": [task, dict(task, i2f_r1=0.7)], "generalized": [task, task]}
    summary = retrieval_summary(final)
    assert summary["standard"]["i2f_r1"] == pytest.approx(0.6) and summary["generalized"]["map_at_10"] == 0.25
    assert retrieval_summary({"standard": [{"top5": 0.5}]}) is None   # a final written before these keys
    extras = summary_extras({"accuracy_matrix": matrix, "final": final})
    assert extras["diagonal_mean"] == pytest.approx(0.75) and extras["retrieval"] == summary
    results = {"methods": {"mas": {"accuracy_matrix": matrix, "final": final},
                           "old": {"accuracy_matrix": matrix, "final": {"standard": [{"top5": 0.5}] * 3}}}}
    rows = [{"method": "mas", "forgetting": 0.1, "bwt": -0.2}, {"method": "old", "forgetting": 0.1, "bwt": -0.2}]
    tables = retrieval_tables(results, rows)
    assert "| mas | 75.00 | 10.00 | -20.00 | 60.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 25.00 |" in tables
    assert "| old | 75.00 | 10.00 | -20.00 | — | — |" in tables
    assert "| mas | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 25.00 |" in tables   # generalized
