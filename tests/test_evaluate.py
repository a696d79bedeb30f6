"""Evaluation metrics pinned to hand computations and brute-force definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import triplets.facts.evaluate
from triplets.errors import TripletsError
from triplets.facts.retrieval_metrics import average_precision, average_precision_at_k
from triplets.facts.evaluate import (
    embed_images,
    evaluate_embeddings,
    evaluate_task,
    fact_to_image_metrics,
    final_metrics,
    group_keys,
    image_to_fact_metrics,
)

# fact ids:         0                      1                          2                         3
HAND_FACTS = [("man", None, None), ("man", "riding", "horse"), ("man", "standing", None), ("dog", None, None),
              # 4                        5                         6
              ("dog", "running", None), ("man", "riding", "bike"), ("man", "riding", None)]


def _scores_image(scores_by_fact: dict[int, float]) -> np.ndarray:
    """An image embedding whose cosine with one-hot fact f is proportional to scores_by_fact[f]."""
    vector = np.full(len(HAND_FACTS), 0.01, dtype=np.float64)
    for fact, score in scores_by_fact.items():
        vector[fact] = score
    return vector


HAND_IMAGES = np.stack([
    # A, truth <man> (G = {0,1,2,5,6}, |G| = 5): order 3,4,2,...: best of G at rank 3 ≤ K + 4 → top-1 hit, RR 1
    _scores_image({3: 0.9, 4: 0.8, 2: 0.7, 0: 0.1, 1: 0.05, 5: 0.04, 6: 0.03}),
    # B, truth <man,riding,horse> (G = {1}): 5, 6, then 1 at rank 3 → top-5 hit, RR 1/3
    _scores_image({5: 0.9, 6: 0.8, 1: 0.7}),
    # C, truth <man,riding> (G = {1,5,6}): best of G is fact 1 at rank 5 ≤ K + 2 → hit for K ≥ 3, RR 1/3
    _scores_image({3: 0.9, 4: 0.8, 0: 0.7, 2: 0.6, 1: 0.5, 5: 0.4, 6: 0.3}),
    # D, truth <dog> (G = {3,4}): best of G is fact 4 at rank 6 ≤ K + 1 → hit for K ≥ 5, RR 1/5
    _scores_image({0: 0.9, 1: 0.8, 2: 0.7, 5: 0.6, 6: 0.5, 4: 0.4, 3: 0.3}),
    # E, truth <man,riding,horse>: fact 1 last (rank 7) → top-10 only, RR 1/7
    _scores_image({0: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4, 1: 0.001}),
])
HAND_TRUTH = np.array([0, 1, 6, 3, 1])


def test_group_keys_follow_the_order_aware_rule():
    keys, order = group_keys(HAND_FACTS)
    assert order.tolist() == [1, 3, 2, 1, 2, 3, 2]

    def group(g):
        return {c for c in range(len(HAND_FACTS)) if keys[order[g] - 1, c] == keys[order[g] - 1, g]}

    assert group(0) == {0, 1, 2, 5, 6}
    assert group(6) == {1, 5, 6}
    assert group(1) == {1}
    assert group(3) == {3, 4}
    assert group(4) == {4}


def test_image_to_fact_hand_computed():
    facts_onehot = np.eye(len(HAND_FACTS))
    metrics = image_to_fact_metrics(HAND_IMAGES, HAND_TRUTH, facts_onehot, HAND_FACTS, range(7))
    assert metrics["top1"] == pytest.approx(1 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    assert metrics["top10"] == pytest.approx(1.0)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 5 + 1 / 7) / 5)


def test_standard_candidates_change_ranks():
    facts_onehot = np.eye(len(HAND_FACTS))
    keep = [0, 1, 3, 4]  # images A, B, D, E (C's truth <man,riding> is not a candidate)
    subset = HAND_IMAGES[keep]
    truth = HAND_TRUTH[keep]
    metrics = image_to_fact_metrics(subset, truth, facts_onehot, HAND_FACTS, [0, 1, 2, 3, 4])
    # A: G = {0,1,2}: order 3,4,2 → rank 3 ≤ K+2 → top-1; B: 5 and 6 gone → rank 1;
    # D: G = {3,4}: order 0,1,2,4,3 → rank 4 ≤ K+1 → K ≥ 3; E: order 0,2,3,4,1 → rank 5.
    assert metrics["top1"] == pytest.approx(2 / 4)
    assert metrics["top5"] == pytest.approx(4 / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 5) / 4)
    with pytest.raises(TripletsError, match="not among the candidates"):
        image_to_fact_metrics(HAND_IMAGES, HAND_TRUTH, facts_onehot, HAND_FACTS, [0, 1, 2, 3, 4])


def _brute_force_image_to_fact(images, truth, fact_vectors, facts, candidates, ks):
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    fact_vectors = fact_vectors / np.linalg.norm(fact_vectors, axis=1, keepdims=True)
    hits = {k: 0 for k in ks}
    reciprocal = 0.0
    for vector, g in zip(images, truth):
        s, p, o = facts[g]
        if o is not None:
            group = {c for c in candidates if facts[c] == facts[g]}
        elif p is not None:
            group = {c for c in candidates if facts[c][0] == s and facts[c][1] == p}
        else:
            group = {c for c in candidates if facts[c][0] == s}
        scores = {c: float(np.float32(vector.astype(np.float32) @ fact_vectors[c].astype(np.float32))) for c in candidates}
        ranked = sorted(candidates, key=lambda c: (-scores[c], c in group))  # ties against the group
        rank = 1 + next(i for i, c in enumerate(ranked) if c in group)
        for k in ks:
            hits[k] += rank <= k + len(group) - 1
        reciprocal += 1.0 / max(1, rank - (len(group) - 1))
    out = {f"top{k}": hits[k] / len(truth) for k in ks}
    out["mrr"] = reciprocal / len(truth)
    return out


def _random_facts(rng, count):
    subjects, predicates, objects = ["a", "b", "c", "d"], ["p", "q", "r"], ["x", "y", "z"]
    facts = set()
    while len(facts) < count:
        order = rng.integers(1, 4)
        s = subjects[rng.integers(4)]
        p = predicates[rng.integers(3)] if order >= 2 else None
        o = objects[rng.integers(3)] if order == 3 else None
        facts.add((s, p, o))
    return sorted(facts, key=lambda f: tuple("" if v is None else v for v in f))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_to_fact_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    facts = _random_facts(rng, 30)
    fact_vectors = rng.normal(size=(len(facts), 6))
    fact_vectors[5] = fact_vectors[4]  # a tie between two facts
    candidates = sorted(rng.choice(len(facts), size=20, replace=False).tolist())
    truth = rng.choice(candidates, size=200)
    images = fact_vectors[truth] + 1.5 * rng.normal(size=(200, 6))
    images[:10] = fact_vectors[3]  # images exactly on a fact: exact score ties
    ks = (1, 3, 5, 10)
    fast = image_to_fact_metrics(images, truth, fact_vectors, facts, candidates, ks=ks)
    slow = _brute_force_image_to_fact(images, truth, fact_vectors, facts, candidates, ks)
    assert fast.keys() == slow.keys()
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key


def test_constant_model_is_not_rewarded_by_ties():
    facts = [("a", None, None), ("b", None, None), ("c", None, None), ("d", None, None)]
    fact_vectors = np.eye(4)
    images = np.ones((8, 4))  # equal cosine with every fact
    metrics = image_to_fact_metrics(images, np.arange(8) % 4, fact_vectors, facts, range(4), ks=(1, 4))
    assert metrics["top1"] == 0.0  # ties broken against the ground truth: rank 4
    assert metrics["top4"] == 1.0
    assert metrics["mrr"] == pytest.approx(0.25)


def test_average_precision_equals_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(40, 60)), 1)  # many ties
    labels = rng.random((40, 60)) < 0.2
    labels[:, 0] = True
    ours = average_precision(scores, labels)
    for row in range(40):
        assert ours[row] == pytest.approx(average_precision_score(labels[row], scores[row]), abs=1e-12)


def _brute_ap_at_k(scores, labels, k):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], labels[i]))
    hits, total = 0, 0.0
    for position, i in enumerate(order[:k], start=1):
        if labels[i]:
            hits += 1
            total += hits / position
    return total / min(k, int(labels.sum()))


def test_average_precision_at_k_definition():
    # positives at ranks 1, 3 and 12: AP@10 = (1/1 + 2/3) / min(10, 3)
    scores = -np.arange(20, dtype=float)
    labels = np.zeros(20, bool)
    labels[[0, 2, 11]] = True
    assert average_precision_at_k(scores, labels, 10)[0] == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k(scores, labels, 100)[0] == pytest.approx((1 + 2 / 3 + 3 / 12) / 3)
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=(25, 150)), 1)
    labels = rng.random((25, 150)) < 0.1
    labels[:, 5] = True
    for k in (1, 10, 100, 200):
        ours = average_precision_at_k(scores, labels, k)
        for row in range(25):
            assert ours[row] == pytest.approx(_brute_ap_at_k(scores[row], labels[row], k), abs=1e-12)


def test_fact_to_image_metrics_equal_sklearn_and_brute_force():
    rng = np.random.default_rng(5)
    fact_vectors = rng.normal(size=(12, 8))
    truth = rng.integers(0, 10, size=300)  # facts 10 and 11 have no image: skipped
    images = fact_vectors[truth] + 2.0 * rng.normal(size=(300, 8))
    metrics = fact_to_image_metrics(images, truth, fact_vectors, range(12))
    unit_images = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float32)
    unit_facts = (fact_vectors / np.linalg.norm(fact_vectors, axis=1, keepdims=True)).astype(np.float32)
    aps, aps10, aps100 = [], [], []
    for fact in range(10):
        scores = unit_images @ unit_facts[fact]
        labels = truth == fact
        aps.append(average_precision_score(labels, scores))
        aps10.append(_brute_ap_at_k(scores, labels, 10))
        aps100.append(_brute_ap_at_k(scores, labels, 100))
    assert metrics["map"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert metrics["map_at_10"] == pytest.approx(np.mean(aps10), abs=1e-9)
    assert metrics["map_at_100"] == pytest.approx(np.mean(aps100), abs=1e-9)
    perfect = fact_to_image_metrics(fact_vectors[truth], truth, fact_vectors, range(12))
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_at_10"] == pytest.approx(1.0)


def test_large_evaluation_is_vectorised():
    import time

    rng = np.random.default_rng(6)
    facts = [(f"s{i % 300}", f"p{i % 7}" if i % 3 else None, f"o{i % 11}" if i % 3 == 2 else None) for i in range(1000)]
    facts = list(dict.fromkeys(facts))
    fact_vectors = rng.normal(size=(len(facts), 64)).astype(np.float32)
    truth = rng.integers(0, len(facts), size=10_000)
    images = fact_vectors[truth] + rng.normal(size=(10_000, 64)).astype(np.float32)
    started = time.perf_counter()
    metrics = image_to_fact_metrics(images, truth, fact_vectors, facts, range(len(facts)))
    metrics.update(fact_to_image_metrics(images, truth, fact_vectors, range(len(facts))))
    elapsed = time.perf_counter() - started
    assert 0.0 < metrics["top1"] <= metrics["top5"] <= metrics["top10"] <= 1.0
    assert 0.0 < metrics["map_at_10"] <= 1.0
    assert elapsed < 30.0, f"10^4 images × 10^3 facts took {elapsed:.1f} s"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TripletsError, match="fact embeddings"):
        image_to_fact_metrics(np.ones((2, 3)), np.array([0, 1]), np.ones((3, 3)), HAND_FACTS, range(7))
    with pytest.raises(TripletsError, match="-d"):
        image_to_fact_metrics(np.ones((2, 3)), np.array([0, 1]), np.eye(7), HAND_FACTS, range(7))
    with pytest.raises(TripletsError, match="outside"):
        fact_to_image_metrics(np.eye(7)[:2], np.array([0, 9]), np.eye(7), range(7))
    with pytest.raises(TripletsError, match="NaN"):
        fact_to_image_metrics(np.full((2, 7), np.nan), np.array([0, 1]), np.eye(7), range(7))


# ----------------------------------------------------------------------------- evaluate_task on a stand-in
class _Images(torch.utils.data.Dataset):
    def __init__(self, pixels, fact_ids):
        self.pixels, self.fact_ids = pixels, fact_ids

    def __len__(self):
        return len(self.fact_ids)

    def __getitem__(self, index):
        return torch.as_tensor(self.pixels[index]), int(self.fact_ids[index])


class _FactFile:
    """The part of data_prep's FactFile that evaluation reads: 2 tasks of the hand-made facts."""

    def __init__(self, rng):
        self.facts = HAND_FACTS
        self.fact_embeddings = np.eye(7, dtype=np.float32) * 3.0
        self.task_of_fact = np.array([0, 0, 1, 1, 0, 1, 1])
        self.num_tasks = 2
        self.path = "stand-in"
        self.truth = {t: rng.choice(self.facts_of_task(t), size=40) for t in range(2)}
        self.images = {t: (np.eye(7)[self.truth[t]] + 0.6 * rng.random((40, 7))).astype(np.float32) for t in range(2)}

    def facts_of_task(self, task):
        return np.flatnonzero(self.task_of_fact == task)

    def dataset(self, task, split):
        assert split in ("test", 1)
        return _Images(self.images[task], self.truth[task])


class _Identity(torch.nn.Module):
    """A 'model' whose pre-normalisation embedding is its (7-d) input, with one BatchNorm to check the mode."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(7, affine=False)

    def forward(self, x):
        return x + 0.0 * self.norm(x)

    def embed(self, x):
        return torch.nn.functional.normalize(self.forward(x), dim=1)


def test_evaluate_task_standard_and_generalized(monkeypatch):
    monkeypatch.setattr(triplets.facts.evaluate, "fact_image_dataset", lambda fact_file, task, split: fact_file.dataset(task, split))
    fact_file = _FactFile(np.random.default_rng(7))
    model = _Identity().train()
    running_mean = model.norm.running_mean.clone()
    standard = evaluate_task(model, fact_file, 1, mode="standard", batch_size=16)
    generalized = evaluate_task(model, fact_file, 1, mode="generalized", batch_size=16)
    assert model.training and torch.equal(model.norm.running_mean, running_mean)  # mode restored, stats untouched
    images, truth = fact_file.images[1], fact_file.truth[1]
    expected_standard = image_to_fact_metrics(images, truth, fact_file.fact_embeddings, HAND_FACTS, [2, 3, 5, 6])
    expected_general = image_to_fact_metrics(images, truth, fact_file.fact_embeddings, HAND_FACTS, range(7))
    for key in ("top1", "top5", "top10", "mrr"):
        assert standard[key] == pytest.approx(expected_standard[key])
        assert generalized[key] == pytest.approx(expected_general[key])
    assert standard["num_candidates"] == 4 and generalized["num_candidates"] == 7
    assert generalized["top1"] <= standard["top1"] + 1e-12  # more candidates never help
    assert standard["map"] == pytest.approx(
        fact_to_image_metrics(images, truth, fact_file.fact_embeddings, [2, 3, 5, 6])["map"])
    final = final_metrics(model, fact_file, batch_size=16)
    assert [len(final["standard"]), len(final["generalized"])] == [2, 2]
    assert final["standard"][1]["top5"] == pytest.approx(standard["top5"])
    assert final["generalized"][1]["mrr"] == pytest.approx(generalized["mrr"])
    embeddings, ids = embed_images(model, fact_file.dataset(0, "test"), batch_size=7)
    assert embeddings.dtype == np.float32 and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert ids.tolist() == fact_file.truth[0].tolist()
    assert evaluate_embeddings(embeddings, ids, fact_file, 0)["num_images"] == 40
    with pytest.raises(TripletsError, match="task 5"):
        evaluate_task(model, fact_file, 5)
    with pytest.raises(TripletsError, match="mode"):
        evaluate_task(model, fact_file, 0, mode="other")


def test_blocked_rankings_equal_dense_float64_reference_with_exact_ties():
    """Vectors of 0 / 0.5 entries (4 non-zero: unit norm) make every float32 product exact, so many
    images and facts tie exactly; both rankings equal the dense float64 definitions, across
    score blocks of a few rows."""
    import triplets.facts.evaluate as evaluate_module

    rng = np.random.default_rng(8)
    patterns = np.zeros((6, 8))
    for row in range(6):
        patterns[row, rng.choice(8, 4, replace=False)] = 0.5
    facts = [(f"s{i % 4}", f"p{i % 3}" if i % 2 else None, None) for i in range(12)]
    facts = list(dict.fromkeys(facts))
    fact_vectors = patterns[rng.integers(0, 6, len(facts))]
    truth = rng.integers(0, len(facts), 90)
    images = patterns[rng.integers(0, 6, 90)]
    expected_i2f = _brute_force_image_to_fact(images, truth, fact_vectors, facts, np.arange(len(facts)), (1, 5, 10))
    scores = images @ fact_vectors.T
    queries = np.unique(truth)
    expected_ap = average_precision(scores.T[queries], truth[None, :] == queries[:, None]).mean()
    expected_ap10 = average_precision_at_k(scores.T[queries], truth[None, :] == queries[:, None], 10).mean()
    for block_bytes in (1 << 27, 4 * 3 * len(facts)):
        old = evaluate_module.SCORE_BLOCK_BYTES, evaluate_module.SORT_BLOCK_BYTES
        evaluate_module.SCORE_BLOCK_BYTES = evaluate_module.SORT_BLOCK_BYTES = block_bytes
        try:
            i2f = image_to_fact_metrics(images, truth, fact_vectors, facts, range(len(facts)), ks=(1, 5, 10))
            f2i = fact_to_image_metrics(images, truth, fact_vectors, range(len(facts)))
        finally:
            evaluate_module.SCORE_BLOCK_BYTES, evaluate_module.SORT_BLOCK_BYTES = old
        for key, value in expected_i2f.items():
            assert i2f[key] == pytest.approx(value, abs=1e-12), key
        assert f2i["map"] == pytest.approx(expected_ap, abs=1e-12)
        assert f2i["map_at_10"] == pytest.approx(expected_ap10, abs=1e-12)


def test_equal_image_vectors_keep_their_ties_in_fact_to_image():
    """Many images share one embedding (as equal crops do): a blocked product may round equal
    columns apart, so their scores are copied from one; mAP then equals the float64 reference."""
    rng = np.random.default_rng(9)
    fact_vectors = rng.normal(size=(30, 1152))
    truth = rng.integers(0, 30, size=2000)
    images = fact_vectors[truth] + 1.5 * rng.normal(size=(2000, 1152))
    images[rng.integers(0, 2000, 1500)] = images[rng.integers(0, 2000, 1500)]  # duplicated embeddings
    metrics = fact_to_image_metrics(images, truth, fact_vectors, range(30))
    unit_facts = (fact_vectors / np.linalg.norm(fact_vectors, axis=1, keepdims=True)).astype(np.float32)
    unit_images = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float32)
    queries = np.unique(truth)
    scores = unit_facts[queries].astype(np.float64) @ unit_images.astype(np.float64).T
    labels = truth[None, :] == queries[:, None]
    assert metrics["map"] == pytest.approx(average_precision(scores, labels).mean(), abs=1e-12)
    assert metrics["map_at_100"] == pytest.approx(average_precision_at_k(scores, labels, 100).mean(), abs=1e-12)
