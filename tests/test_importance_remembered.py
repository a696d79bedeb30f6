"""The per-sample verdicts remembered across estimates (issue 27): verified once per model structure,
objective and batch structure, verified again when any of them changes, and the estimate unchanged."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from mas_core.importance import checks, fisher_importance, mas_importance
from mas_core.importance import per_sample

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def verifications(monkeypatch):
    """The batch sizes :func:`verify_batch` was run for, in order."""
    sizes: list[int] = []
    original = per_sample.verify_batch

    def counting(model, batch, size, *rest):
        sizes.append(size)
        return original(model, batch, size, *rest)

    monkeypatch.setattr(per_sample, "verify_batch", counting)
    return sizes


def brute_force(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n |∂‖F(x_n)‖²/∂θ|, one sample at a time."""
    model.eval()
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[n:n + 1]).square().sum(), list(parameters.values()))
        for name, grad in zip(parameters, grads):
            sums[name] += grad.abs()
    return {name: value / x.shape[0] for name, value in sums.items()}


def largest_relative_error(actual: dict, expected: dict) -> float:
    return max(float((actual[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
                         nn.LayerNorm(4)).to(DTYPE)


def test_a_second_estimate_on_the_same_model_and_batches_verifies_nothing(verifications) -> None:
    model = make_model()
    x = torch.randn(11, 2, 5, 5, dtype=DTYPE)
    batches = [x[:4], x[4:8], x[8:]]  # sizes 4, 4, 3
    expected = brute_force(model, x)
    first = mas_importance(model, batches)
    assert verifications == [4, 3]
    second = mas_importance(model, batches)
    assert verifications == [4, 3]  # remembered
    assert largest_relative_error(first, expected) <= 1e-10
    for name in first:
        assert torch.equal(first[name], second[name])
    with torch.no_grad():  # new weights, same structure: still remembered, and still exact
        for parameter in model.parameters():
            parameter.mul_(1.5)
    assert largest_relative_error(mas_importance(model, batches), brute_force(model, x)) <= 1e-10
    assert verifications == [4, 3]


def test_a_changed_structure_objective_or_batch_is_verified_again(verifications) -> None:
    model = make_model()
    x = torch.randn(8, 2, 5, 5, dtype=DTYPE)
    mas_importance(model, [x[:4], x[4:]])
    assert verifications == [4]
    mas_importance(model, [x[:4].float().double()])  # another tensor, same structure
    assert verifications == [4]
    mas_importance(model, [x[:5]])  # another batch shape
    assert verifications == [4, 5]
    mas_importance(model, [(x[:4], torch.zeros(4))])  # another batch layout
    assert verifications == [4, 5, 4]

    def output_fn(module, batch):
        return module(batch)

    mas_importance(model, [x[:4]], output_fn=output_fn)  # another objective
    mas_importance(model, [x[:4]], output_fn=output_fn)
    assert verifications == [4, 5, 4, 4]
    fisher_importance(model, [(x[:4], torch.tensor([0, 1, 2, 3]))])  # another estimator
    assert verifications == [4, 5, 4, 4, 4]
    model[0].weight.requires_grad_(False)  # another set of trainable parameters
    mas_importance(model, [x[:4]])
    assert verifications == [4, 5, 4, 4, 4, 4]
    model[3] = nn.Linear(3 * 5 * 5, 4).to(DTYPE)  # another module
    mas_importance(model, [x[:4]])
    assert verifications == [4, 5, 4, 4, 4, 4, 4]


def test_a_cut_batch_keeps_its_own_verification_and_a_freed_model_its_memory(verifications) -> None:
    model = make_model()
    x = torch.randn(8, 2, 5, 5, dtype=DTYPE)
    mas_importance(model, [x[:4], x[4:]], max_samples=6)  # the crossing batch is verified on its own
    assert verifications == [4, 4]
    mas_importance(model, [x[:4], x[4:]], max_samples=6)
    assert verifications == [4, 4, 4]
    assert model in checks._REMEMBERED
    remembered = len(checks._REMEMBERED)
    del model
    gc.collect()
    assert len(checks._REMEMBERED) == remembered - 1


def test_a_freed_output_fn_is_never_taken_for_a_new_one(verifications) -> None:
    model = make_model()
    x = torch.randn(4, 2, 5, 5, dtype=DTYPE)
    for scale in (1.0, 2.0, 3.0):  # each a new function object (its id may be reused once freed)
        mas_importance(model, [x], output_fn=lambda module, batch, scale=scale: scale * module(batch))
    assert verifications == [4, 4, 4]
