"""The MAS regularizer: penalty, gradient, accumulation rules, new heads, checkpoints (docs/method.md §2, §3)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mas_core.errors import CheckpointMismatchError, NonFiniteError
from mas_core.importance import InvalidArgumentError, hebbian_importance, mas_importance
from mas_core.regularizers.mas import MAS, MASStateError

DTYPE = torch.float64


class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(6, 2)])

    def forward(self, x, head: int = 0):
        return self.heads[head](self.trunk(x))


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHead().to(DTYPE)
    data = [torch.randn(7, 5, dtype=DTYPE) for _ in range(3)]
    return model, data


def perturb(model, scale=0.1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def expected_penalty(lam, importance, anchors, model):
    params = dict(model.named_parameters())
    return sum(lam * (importance[n] * (params[n] - anchors[n]) ** 2).sum() for n in importance)


def test_penalty_and_gradient_match_the_formula():
    model, data = setup()
    reg = MAS(penalty_step="gradient", lam=0.7)
    assert reg.penalty(model).item() == 0.0  # before the first after_task
    reg.after_task(model, data)
    assert reg.penalty(model).item() == 0.0  # θ = θ*
    omega = mas_importance(model, data)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in omega:
        assert torch.equal(reg.importance[name], omega[name]) and torch.equal(reg.anchors[name], anchors[name])
    perturb(model)
    value = reg.penalty(model)
    assert torch.allclose(value, expected_penalty(0.7, omega, anchors, model), rtol=1e-12)
    value.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * 0.7 * omega[name] * (p.detach() - anchors[name]), rtol=1e-12), name


def test_gradient_scales_with_the_incoming_gradient_and_survives_retain_graph():
    model, data = setup()
    reg = MAS(penalty_step="gradient", lam=0.3)
    reg.after_task(model, data)
    perturb(model)
    omega, anchors = reg.importance, reg.anchors
    task_loss = model(data[0]).square().mean()
    loss = task_loss + 3.0 * reg.penalty(model)
    loss.backward(retain_graph=True)
    loss.backward()  # second pass through the same graph: gradients double
    task_grads = torch.autograd.grad(model(data[0]).square().mean(), list(model.parameters()))
    for (name, p), task_grad in zip(model.named_parameters(), task_grads):
        expected = 2 * (task_grad + 3.0 * 2 * 0.3 * omega[name] * (p.detach() - anchors[name]))
        assert torch.allclose(p.grad, expected, rtol=1e-10, atol=1e-14), name


def test_penalty_alone_backward_twice_with_retain_graph():
    model, data = setup()
    reg = MAS(penalty_step="gradient", lam=0.3)
    reg.after_task(model, data)
    perturb(model)
    omega, anchors = reg.importance, reg.anchors
    value = reg.penalty(model)
    value.backward(retain_graph=True)
    value.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * 2 * 0.3 * omega[name] * (p.detach() - anchors[name]), rtol=1e-12), name


def test_new_head_is_not_regularized_and_shape_changes_are_errors():
    model, data = setup()
    reg = MAS(penalty_step="gradient", lam=1.0)
    reg.after_task(model, data)
    perturb(model)
    before = reg.penalty(model).item()
    model.heads.append(nn.Linear(6, 2).to(DTYPE))
    with torch.no_grad():
        model.heads[1].weight.add_(5.0)
    value = reg.penalty(model)
    assert value.item() == pytest.approx(before, rel=1e-12)
    value.backward()
    assert model.heads[1].weight.grad is None
    model.heads[0] = nn.Linear(6, 3).to(DTYPE)
    with pytest.raises(MASStateError, match="heads.0.weight"):
        reg.penalty(model)
    with pytest.raises(MASStateError, match="no such parameter"):
        reg.penalty(nn.Linear(5, 2))


def two_tasks(reg):
    """Task 1 on model A's data, then change the model and estimate on other data."""
    model, data = setup()
    reg.after_task(model, data)
    omega1 = mas_importance(model, data)
    perturb(model, scale=0.3, seed=5)
    model.heads.append(nn.Linear(6, 2).to(DTYPE))
    data2 = [2.0 * torch.randn(9, 5, dtype=DTYPE)]
    output_fn = reg.output_fn
    reg.output_fn = lambda m, batch: m(batch, head=1)
    reg.after_task(model, data2)
    omega2 = mas_importance(model, data2, output_fn=reg.output_fn)
    reg.output_fn = output_fn
    return model, omega1, omega2


def test_sum_accumulation_over_two_tasks():
    reg = MAS(penalty_step="gradient", lam=2.0)
    model, omega1, omega2 = two_tasks(reg)
    for name, value in omega2.items():
        expected = value + omega1.get(name, torch.zeros_like(value))
        assert torch.allclose(reg.importance[name], expected, rtol=1e-12), name
    assert reg.tasks_seen == 2
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, seed=9)
    assert torch.allclose(reg.penalty(model), expected_penalty(2.0, reg.importance, anchors, model), rtol=1e-12)


def test_ema_accumulation():
    reg = MAS(penalty_step="gradient", lam=1.0, accumulate="ema", ema_alpha=0.3)
    _, omega1, omega2 = two_tasks(reg)
    for name, value in omega2.items():
        expected = 0.3 * 0.7 * omega1.get(name, torch.zeros_like(value)) + 0.7 * value  # from Ω = 0
        assert torch.allclose(reg.importance[name], expected, rtol=1e-12), name


def test_alpha_accumulation_equalises_task_mass_and_applies_lambda_once():
    reg = MAS(penalty_step="gradient", lam=3.0, accumulate="alpha")
    model, omega1, omega2 = two_tasks(reg)
    s1 = sum(v.sum() for v in omega1.values())
    s2 = sum(v.sum() for v in omega2.values())
    a1, a2 = 3.0 * (1 / s1) / (1 / s1 + 1 / s2), 3.0 * (1 / s2) / (1 / s1 + 1 / s2)
    assert float(a1 + a2) == pytest.approx(3.0)
    # each task's weighted mass is the same: α_1 S_1 = α_2 S_2
    assert float(a1 * s1) == pytest.approx(float(a2 * s2))
    for name, value in omega2.items():
        weighted = a1 * omega1.get(name, torch.zeros_like(value)) + a2 * value
        assert torch.allclose(3.0 * reg.importance[name], weighted, rtol=1e-10), name
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, seed=9)
    direct = sum(((a1 * omega1.get(n, 0) + a2 * omega2[n]) * (p - anchors[n]) ** 2).sum()
                 for n, p in model.named_parameters())
    assert torch.allclose(reg.penalty(model), direct, rtol=1e-10)


def test_alpha_accumulation_is_invariant_to_rescaling_a_task():
    """Scaling task 2's importance by c (its output by √c) leaves the relative weighting of the
    tasks, hence Ω normalised to unit mass, unchanged; under "sum" it does not."""
    model, data = setup()
    data2 = [torch.randn(8, 5, dtype=DTYPE)]
    normalised = {"alpha": [], "sum": []}
    for accumulate in normalised:
        for scale in (1.0, 10.0):
            reg = MAS(penalty_step="gradient", lam=1.0, accumulate=accumulate)
            reg.after_task(model, data)
            reg.output_fn = lambda m, b, s=scale: s * torch.sin(m(b))
            reg.after_task(model, data2)
            mass = sum(v.sum() for v in reg.importance.values())
            normalised[accumulate].append({n: v / mass for n, v in reg.importance.items()})
    for name in normalised["alpha"][0]:
        assert torch.allclose(normalised["alpha"][0][name], normalised["alpha"][1][name], rtol=1e-10)
    assert not torch.allclose(normalised["sum"][0]["trunk.0.weight"], normalised["sum"][1]["trunk.0.weight"])


def test_state_dict_round_trip_weights_only_gives_the_same_penalty_and_continuation():
    model, data = setup()
    reg = MAS(penalty_step="gradient", lam=0.5, accumulate="alpha")
    reg.after_task(model, data)
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    restored = MAS(penalty_step="gradient", lam=0.5, accumulate="alpha")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    perturb(model)
    assert torch.equal(restored.penalty(model), reg.penalty(model))
    reg.after_task(model, data[:2])
    restored.after_task(model, data[:2])
    perturb(model, seed=3)
    assert torch.equal(restored.penalty(model), reg.penalty(model))
    with pytest.raises(CheckpointMismatchError, match="accumulate"):
        MAS(penalty_step="gradient", lam=0.5, accumulate="sum").load_state_dict(reg.state_dict())
    with pytest.raises(CheckpointMismatchError, match="missing"):
        MAS().load_state_dict({"lam": 1.0})


def test_loaded_state_follows_the_model_dtype():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reg = MAS(penalty_step="gradient", lam=1.0)
    reg.after_task(model, [torch.randn(6, 4)])
    state = reg.state_dict()
    model = model.double()
    perturb(model)
    restored = MAS(penalty_step="gradient", lam=1.0)
    restored.load_state_dict(state)
    value = restored.penalty(model)
    assert value.dtype == torch.float64
    expected = sum((state["accumulated"][n].double() * (p - state["anchors"][n].double()) ** 2).sum()
                   for n, p in model.named_parameters())
    assert torch.allclose(value, expected, rtol=1e-6)


def test_modes_use_their_estimators_and_max_samples():
    model, data = setup()
    for mode, estimator in (("batch", lambda: mas_importance(model, data, mode="batch", max_samples=10)),
                            ("hebbian", lambda: hebbian_importance(model, data, max_samples=10))):
        reg = MAS(mode=mode, max_samples=10)
        reg.after_task(model, data)
        expected = estimator()
        for name in expected:
            assert torch.equal(reg.importance[name], expected[name]), (mode, name)


def test_non_finite_penalty_and_bad_arguments():
    model, data = setup()
    reg = MAS(penalty_step="gradient")  # the penalty in the loss is what is checked
    reg.after_task(model, data)
    with torch.no_grad():
        model.trunk[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="penalty"):
        reg.penalty(model)
    for kwargs in ({"lam": -1.0}, {"lam": float("nan")}, {"mode": "sum"}, {"accumulate": "mean"},
                   {"ema_alpha": 1.5}, {"max_samples": 0}):
        with pytest.raises(InvalidArgumentError):
            MAS(**kwargs)
