"""mas_core.ridge: accumulated statistics equal ridge on the concatenated tasks; the strength is
chosen on the current task's training data only; the statistics survive a checkpoint."""
from __future__ import annotations

import torch

from mas_core.ridge import (RidgeProblem, RidgeSettings, RidgeStatistics, choose_strength, ridge_settings,
                            squared_error)


def _reference(x: torch.Tensor, y: torch.Tensor, alpha: float, weights: torch.Tensor | None = None):
    """Ridge with an unpenalised bias by the normal equations of [X 1] with penalty diag(α…α, 0)."""
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    w = torch.ones(n, dtype=x.dtype) if weights is None else weights
    penalty = alpha * torch.eye(d + 1, dtype=x.dtype)
    penalty[d, d] = 0.0
    solution = torch.linalg.solve(design.T @ (design * w[:, None]) + penalty, design.T @ (y * w[:, None]))
    return solution[:d], solution[d]


def _tasks(seed: int = 0, sizes=(40, 25, 33), d: int = 7, m: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=generator, dtype=torch.float64) * 3 + 1,
             torch.randn(n, m, generator=generator, dtype=torch.float64)) for n in sizes]


def test_after_every_task_the_solution_is_ridge_on_all_tasks_so_far() -> None:
    tasks = _tasks()
    stats = RidgeStatistics(7, 3)
    for t, (x, y) in enumerate(tasks):
        stats.update(x, y)
        all_x = torch.cat([tx for tx, _ in tasks[:t + 1]])
        all_y = torch.cat([ty for _, ty in tasks[:t + 1]])
        for alpha in (1e-3, 0.7, 50.0):
            weight, bias = stats.solve(alpha)
            ref_w, ref_b = _reference(all_x, all_y, alpha)
            assert torch.allclose(weight, ref_w, atol=1e-8, rtol=0) and torch.allclose(bias, ref_b, atol=1e-8, rtol=0)


def test_the_eigendecomposition_path_equals_the_direct_solution() -> None:
    x, y = _tasks()[0]
    stats = RidgeStatistics(7, 3)
    stats.update(x, y)
    path = stats.path()
    for alpha in (1e-4, 0.3, 80.0):
        direct, through = stats.solve(alpha), path(alpha)
        assert torch.allclose(direct[0], through[0], atol=1e-8, rtol=0)
        assert torch.allclose(direct[1], through[1], atol=1e-8, rtol=0)


def test_weighted_statistics_equal_weighted_ridge_and_zero_weight_drops_a_sample() -> None:
    (x, y), = _tasks(sizes=(50,))
    weights = (torch.arange(50) % 3 != 0).to(torch.float64)
    stats = RidgeStatistics(7, 3)
    stats.update(x[:20], y[:20], weights[:20])
    stats.update(x[20:], y[20:], weights[20:])
    weight, bias = stats.solve(2.0)
    ref_w, ref_b = _reference(x, y, 2.0, weights)
    assert torch.allclose(weight, ref_w, atol=1e-8, rtol=0) and torch.allclose(bias, ref_b, atol=1e-8, rtol=0)
    kept = weights > 0
    only_w, only_b = _reference(x[kept], y[kept], 2.0)
    assert torch.allclose(weight, only_w, atol=1e-8, rtol=0) and torch.allclose(bias, only_b, atol=1e-8, rtol=0)


def test_added_outputs_are_zero_targets_for_the_samples_seen_before() -> None:
    """The recognition sequence's growing label space: outputs added after task 1 have target 0 there."""
    (x1, y1), (x2, y2) = _tasks(sizes=(30, 20))[:2]
    stats = RidgeStatistics(7, 3)
    stats.update(x1, y1)
    stats.add_outputs(2)
    y2_wide = torch.cat([torch.zeros(20, 3, dtype=torch.float64), y2[:, :2]], dim=1)
    stats.update(x2, y2_wide)
    all_y = torch.cat([torch.cat([y1, torch.zeros(30, 2, dtype=torch.float64)], 1), y2_wide])
    weight, bias = stats.solve(0.3)
    ref_w, ref_b = _reference(torch.cat([x1, x2]), all_y, 0.3)
    assert weight.shape == (7, 5)
    assert torch.allclose(weight, ref_w, atol=1e-8, rtol=0) and torch.allclose(bias, ref_b, atol=1e-8, rtol=0)


def test_state_dict_round_trip_and_merge_are_exact() -> None:
    (x1, y1), (x2, y2) = _tasks(sizes=(30, 20))[:2]
    first, second, both = RidgeStatistics(7, 3), RidgeStatistics(7, 3), RidgeStatistics(7, 3)
    first.update(x1, y1)
    second.update(x2, y2)
    both.update(torch.cat([x1, x2]), torch.cat([y1, y2]))
    merged = first.merged(second)
    restored = RidgeStatistics(7, 3)
    restored.load_state_dict(merged.state_dict())
    for key, value in both.state_dict().items():
        assert torch.allclose(restored.state_dict()[key], value, atol=1e-10, rtol=0)
    assert float(restored.count) == 50.0


def test_alpha_is_relative_to_the_mean_feature_variance_times_n() -> None:
    (x, y), = _tasks(sizes=(60,))
    stats = RidgeStatistics(7, 3)
    stats.update(x, y)
    centred = x - x.mean(0)
    assert abs(stats.alpha(0.5) - 0.5 * float((centred ** 2).sum()) / 7) < 1e-9
    scaled = RidgeStatistics(7, 3)
    scaled.update(10 * x, y)
    assert abs(scaled.alpha(0.5) / stats.alpha(0.5) - 100.0) < 1e-9


def test_the_chosen_strength_reads_the_current_tasks_training_data_only() -> None:
    """The choice depends on the previous statistics and the current task's training samples:
    the same inputs give the same λ and tries whatever else exists (a test set is never passed),
    a noisier task chooses a stronger penalty, and the MSE of the chosen λ is the smallest tried."""
    generator = torch.Generator().manual_seed(3)
    d = 20
    truth = torch.randn(d, 2, generator=generator, dtype=torch.float64)
    x_prev = torch.randn(30, d, generator=generator, dtype=torch.float64)
    previous = RidgeStatistics(d, 2)
    previous.update(x_prev, x_prev @ truth)
    x = torch.randn(40, d, generator=generator, dtype=torch.float64)
    clean = RidgeProblem(x, x @ truth + 0.01 * torch.randn(40, 2, generator=generator, dtype=torch.float64))
    noisy = RidgeProblem(x, x @ truth + 30.0 * torch.randn(40, 2, generator=generator, dtype=torch.float64))
    settings = RidgeSettings(strengths=[1e-4, 1e-2, 1.0, 100.0], val_fraction=0.25)
    first = choose_strength([previous], [clean], settings, seed=0, task=1)
    again = choose_strength([previous], [clean], settings, seed=0, task=1)
    assert first == again and first["val_samples"] == 10 and first["train_samples"] == 30
    assert first["strength"] == min(first["tries"], key=lambda t: t["val_mse"])["value"]
    assert first["strength"] <= 1e-2
    assert choose_strength([previous], [noisy], settings, seed=0, task=1)["strength"] >= 1.0
    assert previous.count.item() == 30.0  # the previous statistics are not modified by the choice


def test_squared_error_and_options() -> None:
    weight = torch.eye(2, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert squared_error(weight, torch.zeros(2, dtype=torch.float64), x, y) == 4.0 + 2.0
    assert squared_error(weight, torch.zeros(2, dtype=torch.float64), x, y, torch.tensor([0.5, 2.0])) == 2.0 + 4.0
    assert ridge_settings({"strengths": [1, 2], "val_fraction": 0.1}).strengths == [1.0, 2.0]
    for bad in ({"lam": 1.0}, {"strengths": []}, {"val_fraction": 1.0}):
        try:
            ridge_settings(bad)
        except Exception as exc:  # noqa: BLE001 - the one error type is checked below
            assert type(exc).__name__ == "MASCoreError"
        else:
            raise AssertionError(f"{bad} accepted")
