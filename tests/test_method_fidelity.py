"""The baselines as their papers define them (issue 11): EBLL's autoencoder loss (Rannen et al.),
LwF's λ_o and T (Li & Hoiem), the "ema" accumulation (Avalanche/FACIL), and hyperparameters saved
with a method's state and checked on load."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mas_core.errors import CheckpointMismatchError
from mas_core.regularizers import EBLL, EWC, MAS, SI, LocalMAS, LwF, TaskInfo
from mas_core.regularizers.ebll import Autoencoder, autoencoder_loss, train_autoencoder
from mas_core.regularizers.lwf import distillation_loss
from mas_core.sequence import MultiHeadNet


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- EBLL

def _three_class_problem() -> tuple[MultiHeadNet, torch.Tensor, torch.Tensor]:
    """20-d features: the classes live in 2 low-variance dimensions, 18 dimensions of loud noise;
    the task head reads the 2 class dimensions only (accuracy 1 on the features themselves)."""
    generator = torch.Generator().manual_seed(0)
    n = 600
    labels = torch.randint(0, 3, (n,), generator=generator)
    means = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    signal = 0.5 * means[labels] + 0.1 * torch.randn(n, 2, generator=generator)
    features = torch.cat([signal, 3.0 * torch.randn(n, 18, generator=generator)], dim=1)
    model = MultiHeadNet(nn.Identity(), 20)
    model.add_head(3)
    with torch.no_grad():
        model.heads[0].weight.zero_()
        model.heads[0].bias.zero_()
        model.heads[0].weight[:, :2] = 10 * means
    return model, features, labels


@pytest.mark.usefixtures("one_torch_thread")
def test_ebll_autoencoder_keeps_what_the_old_task_needs_unlike_a_reconstruction_only_one() -> None:
    model, features, labels = _three_class_problem()

    def accuracy(reconstruction: torch.Tensor) -> float:
        return float((model.heads[0](reconstruction).argmax(1) == labels).double().mean())

    assert accuracy(features) == 1.0
    options = {"epochs": 12, "lr": 2e-2, "batch_size": 64, "seed": 0}
    reconstruction_only, _ = train_autoencoder(features, 4, **options)
    paper, _ = train_autoencoder(features, 4, **options, targets=labels, head=model.heads[0],
                                 reconstruction_weight=1e-6)
    with torch.no_grad():
        plain, with_task = accuracy(reconstruction_only(features)), accuracy(paper(features))
    assert plain < 0.5  # the 4-d code spends itself on the loud noise dimensions
    assert with_task > 0.95
    assert model.heads[0].weight.grad is None  # the head is frozen, not even given a gradient

    # EBLL.after_task trains exactly this autoencoder: the task head (TaskInfo.head) and the labels
    ebll = EBLL(code_dim=4, ae_epochs=12, ae_lr=2e-2, ae_batch_size=64)
    assert ebll.ae_rec_lam == 1e-6 and ebll.after_task_data == "labelled"
    ebll.before_task(model, TaskInfo(index=0, head=0))
    ebll.after_task(model, [(features[i:i + 100], labels[i:i + 100]) for i in range(0, 600, 100)])
    assert torch.equal(ebll.encoders[0]["weight"], paper.encoder.weight.detach())
    assert torch.equal(ebll.encoders[0]["bias"], paper.encoder.bias.detach())


def test_ebll_autoencoder_gradient_contains_the_classification_term() -> None:
    """One Adam-free check of the loss itself: the gradient of the autoencoder's loss with respect
    to its decoder equals the hand formula λ_rec‖r − f‖² + CE(h(r), y), both averaged over the batch."""
    torch.manual_seed(1)
    features = torch.randn(16, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,))
    head = nn.Linear(6, 3).double()
    autoencoder = Autoencoder(6, 2).double()
    reconstruction = autoencoder(features)
    loss = autoencoder_loss(reconstruction, features, head, labels, 0.25)
    (grad,) = torch.autograd.grad(loss, autoencoder.decoder.weight)
    r = autoencoder(features)
    log_p = torch.log_softmax(r @ head.weight.T + head.bias, dim=1)
    hand = 0.25 * ((r - features) ** 2).sum(1).mean() - log_p[torch.arange(16), labels].mean()
    (expected,) = torch.autograd.grad(hand, autoencoder.decoder.weight)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    r = autoencoder(features)
    (without_task,) = torch.autograd.grad(0.25 * ((r - features) ** 2).sum(1).mean(), autoencoder.decoder.weight)
    assert float((grad - without_task).abs().max()) > 1e-3  # the classification term is really there


def test_ebll_needs_labels_for_a_multi_head_model() -> None:
    model, features, _ = _three_class_problem()
    ebll = EBLL(code_dim=4, ae_epochs=1)
    ebll.before_task(model, TaskInfo(index=0, head=0))
    with pytest.raises(ValueError, match="labelled"):
        ebll.after_task(model, [features[:100]])


# --------------------------------------------------------------------------- LwF

def test_lwf_default_gradient_is_li_and_hoiem_lambda_o_1_at_t_2() -> None:
    """L_old = −mean_n Σ_k y'_nk log ŷ'_nk, y' = softmax(z_old/2), ŷ' = softmax(z/2), λ_o = 1:
    gradient (ŷ' − y') / (T·B) with respect to the new logits, without Hinton's T² factor."""
    torch.manual_seed(0)
    new = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    old = torch.randn(8, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(distillation_loss(new, old, 2.0), new)
    hand = (torch.softmax(new.detach() / 2, dim=1) - torch.softmax(old / 2, dim=1)) / (2 * 8)
    torch.testing.assert_close(grad, hand, rtol=1e-12, atol=1e-15)
    (scaled,) = torch.autograd.grad(distillation_loss(new, old, 2.0, t_squared=True), new)
    torch.testing.assert_close(scaled, 4 * hand, rtol=1e-12, atol=1e-15)

    # through the regularizer: LwF() is λ_o = 1, T = 2, no T²
    model = MultiHeadNet(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), 8).double()
    model.add_head(4)
    model.add_head(3)
    x = torch.randn(10, 6, dtype=torch.float64)
    lwf = LwF()
    assert (lwf.lam, lwf.temperature, lwf.t_squared) == (1.0, 2.0, False)
    lwf.before_task(model, TaskInfo(index=1, head=1))
    old_logits = model(x, head=0).detach()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    weight = model.heads[0].weight
    (grad,) = torch.autograd.grad(lwf.penalty(model, x), weight)
    target = torch.softmax(old_logits / 2, dim=1)
    soft_ce = -(target * torch.log_softmax(model(x, head=0) / 2, dim=1)).sum(1).mean()
    (expected,) = torch.autograd.grad(soft_ce, weight)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- accumulate="ema"

def test_ema_starts_from_zero_as_avalanche_and_facil_weights_for_three_tasks() -> None:
    """Ω ← α Ω + (1 − α) Ω_t from Ω = 0: with α = 0.5 and three tasks the weights are exactly
    0.125, 0.25, 0.5 (each task's Ω_t is one indicator vector, so Ω lists the weights)."""
    model = nn.Linear(3, 1, bias=False).double()
    for alpha, expected in ((0.5, [0.125, 0.25, 0.5]), (0.25, [0.75 * 0.25 ** 2, 0.75 * 0.25, 0.75])):
        reg = MAS(accumulate="ema", ema_alpha=alpha)
        for task in range(3):
            indicator = torch.zeros(1, 3, dtype=torch.float64)
            indicator[0, task] = 1.0
            reg.add_task_importance(model, {"weight": indicator})
        assert reg.importance["weight"].flatten().tolist() == expected
    with pytest.raises(ValueError, match="ema_alpha=1"):
        MAS(accumulate="ema", ema_alpha=1.0)


# --------------------------------------------------------------------------- hyperparameters in the state

def _trained(method, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    method.before_task(model, TaskInfo(index=0, head=0))
    if method.uses_step_hook:
        method.after_step(model)
    data = [(x, y)] if method.after_task_data == "labelled" else [x]
    method.after_task(model, data)
    return method


@pytest.mark.parametrize("saved, given, field", ids=lambda value: value if isinstance(value, str) else "", argvalues=[
    (lambda: MAS(lam=2.0), lambda: MAS(lam=5.0), "lam=2.0"),
    (lambda: MAS(mode="batch"), lambda: MAS(mode="exact"), "mode='batch'"),
    (lambda: MAS(accumulate="ema", ema_alpha=0.5), lambda: MAS(accumulate="ema", ema_alpha=0.9), "ema_alpha=0.5"),
    (lambda: MAS(accumulate="alpha"), lambda: MAS(accumulate="sum"), "accumulate='alpha'"),
    (lambda: LocalMAS(lam=1.0), lambda: LocalMAS(lam=3.0), "lam=1.0"),
    (lambda: EWC(lam=1.0, online=True, gamma=0.9), lambda: EWC(lam=1.0, online=True, gamma=0.5), "gamma=0.9"),
    (lambda: SI(lam=1.0, damping=0.1), lambda: SI(lam=1.0, damping=0.01), "damping=0.1"),
    (lambda: LwF(lam=1.0, temperature=2.0), lambda: LwF(lam=1.0, temperature=4.0), "temperature=2.0"),
    (lambda: LwF(), lambda: LwF(t_squared=True), "t_squared=False"),
    (lambda: EBLL(code_dim=3, ae_epochs=1), lambda: EBLL(code_dim=3, ae_epochs=1, ae_rec_lam=1.0), "ae_rec_lam=1e-06"),
])
def test_a_state_loads_only_into_a_method_with_its_hyperparameters(saved, given, field) -> None:
    """No silent ×2.5: a λ = 2 state loaded into MAS(lam=5) is refused with one line naming the
    field, the saved and the given value; the same hyperparameters load and give the same penalty."""
    torch.manual_seed(0)
    model = MultiHeadNet(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), 6)
    model.add_head(3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    state = _roundtrip(_trained(saved(), model, x, y).state_dict())
    with pytest.raises(CheckpointMismatchError, match="saved with " + field.replace("(", r"\(")) as error:
        given().load_state_dict(state)
    assert "\n" not in str(error.value) and isinstance(error.value, ValueError)
    same = saved()
    same.load_state_dict(state)
    assert same.state_dict()["hyperparameters"] == state["hyperparameters"]


def test_states_saved_before_the_hyperparameters_still_load() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    for method in (MAS(lam=2.0), EWC(lam=2.0), SI(lam=2.0), LwF(lam=2.0)):
        state = _trained(method, model, x, y).state_dict()
        del state["hyperparameters"]
        fresh = type(method)(lam=2.0)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.penalty(model, x), method.penalty(model, x))
    # an old MAS state kept lam, mode, accumulate and ema_alpha at its top level: they are checked
    state = MAS(lam=2.0).state_dict()
    del state["hyperparameters"]
    with pytest.raises(CheckpointMismatchError, match="lam=2.0 but this regularizer has lam=5.0"):
        MAS(lam=5.0).load_state_dict(state)
    # penalty_step may differ (Ω and θ* mean the same under both steps)
    MAS(lam=2.0, penalty_step="proximal").load_state_dict(MAS(lam=2.0).state_dict())
