"""One test per method, pinning its numbers; and the registry's errors."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mas_core.errors import MASStateError, UnknownMethodError
from mas_core.importance import fisher_importance
from mas_core.regularizers import (
    EBLL, EWC, IMM, MAS, METHODS, SI, LocalMAS, LwF, TaskInfo, UnknownOptionError, make_regularizer,
    method_options,
)
from mas_core.regularizers.ebll import train_autoencoder
from mas_core.sequence import MultiHeadNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _multihead(seed: int = 0, heads: int = 1, in_dim: int = 6, width: int = 5) -> MultiHeadNet:
    torch.manual_seed(seed)
    model = MultiHeadNet(nn.Sequential(nn.Linear(in_dim, width), nn.Tanh()), width)
    for _ in range(heads):
        model.add_head(3)
    return model


def _perturb(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- EWC

def test_ewc_penalty_equals_lambda_fisher_distance_with_hand_fisher() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 1, 0, 1])
    # Hand-computed Fisher of the CE loss of a linear classifier: ∂ℓ_k/∂W = (softmax(W x_k) − e_{y_k}) x_kᵀ.
    with torch.no_grad():
        residual = torch.softmax(x @ model.weight.T, dim=1) - torch.nn.functional.one_hot(y, 2).float()
        fisher = torch.stack([torch.outer(residual[k], x[k]) ** 2 for k in range(5)]).mean(0)
    ewc = EWC(lam=0.7, penalty_step="gradient")
    ewc.after_task(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    torch.testing.assert_close(ewc.fisher["weight"], fisher, rtol=1e-5, atol=1e-7)
    anchor = model.weight.detach().clone()
    _perturb(model, 0.3)
    perturbed = model.weight.detach().clone()
    expected = 0.7 * (fisher * (model.weight.detach() - anchor) ** 2).sum()
    penalty = ewc.penalty(model)
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-8)
    penalty.backward()
    torch.testing.assert_close(model.weight.grad, 2 * 0.7 * fisher * (model.weight.detach() - anchor), rtol=1e-5, atol=1e-8)

    # offline EWC sums Fishers and anchors at the latest parameters; online decays by gamma
    second = fisher_importance(model, [(x, y)])["weight"]
    offline, online = EWC(lam=0.7), EWC(lam=0.7, online=True, gamma=0.5)
    offline.load_state_dict(_roundtrip(ewc.state_dict()))
    with torch.no_grad():
        model.weight.copy_(anchor)
    online.after_task(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        model.weight.copy_(perturbed)
    for method in (offline, online):
        method.after_task(model, [(x, y)])
        torch.testing.assert_close(method.anchors["weight"], model.weight.detach())
    torch.testing.assert_close(offline.fisher["weight"], fisher + second, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(online.fisher["weight"], 0.5 * fisher + second, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- SI

class _Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(value, dtype=torch.float64))


def test_si_path_integral_on_a_quadratic_matches_the_closed_form() -> None:
    # L(θ) = a/2 (θ − c)², plain gradient descent with step η: θ_k − c = (θ_0 − c) r^k, r = 1 − ηa,
    # g_k = a (θ_k − c), Δθ_k = −η g_k, so ω = Σ_k −g_k Δθ_k = η a² (θ_0 − c)² Σ_{k<n} r^{2k}.
    a, c, theta0, eta, steps, damping = 2.0, 1.0, 3.0, 0.1, 25, 0.1
    model = _Scalar(theta0)
    si = SI(lam=0.5, damping=damping, penalty_step="gradient")
    si.before_task(model, TaskInfo(index=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * a * (model.theta - c) ** 2).backward()
        optimizer.step()
        si.after_step(model)
    r = 1 - eta * a
    omega = eta * a ** 2 * (theta0 - c) ** 2 * sum(r ** (2 * k) for k in range(steps))
    torch.testing.assert_close(si.path["theta"], torch.tensor(omega, dtype=torch.float64), rtol=1e-10, atol=0)
    si.after_task(model, [])
    theta_n = c + (theta0 - c) * r ** steps
    importance = omega / ((theta_n - theta0) ** 2 + damping)
    torch.testing.assert_close(si.importance["theta"], torch.tensor(importance, dtype=torch.float64), rtol=1e-10, atol=0)
    # gradient flow: ω approaches the loss decrease L(θ_0) − L(θ_n) as η → 0 (here within 12 %)
    decrease = 0.5 * a * ((theta0 - c) ** 2 - (theta_n - c) ** 2)
    assert omega == pytest.approx(decrease, rel=0.12)
    with torch.no_grad():
        model.theta.add_(0.5)
    torch.testing.assert_close(si.penalty(model), torch.tensor(0.5 * importance * 0.25, dtype=torch.float64))


def test_si_handles_parameters_added_during_a_task() -> None:
    model = _multihead(heads=1)
    si = SI(lam=1.0)
    si.before_task(model, TaskInfo(index=0, head=0))
    model.add_head(3)  # appears after before_task
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for head in (0, 1, 1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x, head=head), y).backward()
        optimizer.step()
        si.after_step(model)
    si.after_task(model, [])
    assert set(si.importance) == {name for name, _ in model.named_parameters()}
    assert float(si.importance["heads.1.weight"].abs().sum()) > 0


# --------------------------------------------------------------------------- LwF

def test_lwf_penalty_is_zero_at_the_snapshot_and_positive_after_perturbing() -> None:
    model = _multihead(heads=2)
    x = torch.randn(16, 6)
    lwf = LwF(lam=2.0, temperature=2.0)
    lwf.before_task(model, TaskInfo(index=0, head=0))
    assert lwf.penalty(model, x).item() == 0.0  # nothing to distill on the first task
    model.add_head(3)
    lwf.before_task(model, TaskInfo(index=2, head=2))
    assert lwf.old_heads == [0, 1]
    assert lwf.penalty(model, x).item() == pytest.approx(0.0, abs=1e-7)
    old_logits = [model(x, head=j).detach() for j in (0, 1)]
    _perturb(model, 0.5)
    expected = 0.0
    for j in (0, 1):
        p_old = torch.softmax(old_logits[j] / 2, dim=1)
        log_p_new = torch.log_softmax(model(x, head=j) / 2, dim=1)
        expected += (p_old * (p_old.log() - log_p_new)).sum(1).mean()  # Li & Hoiem: no T² factor
    penalty = lwf.penalty(model, x)
    assert penalty.item() > 1e-3
    torch.testing.assert_close(penalty, 2.0 * expected, rtol=1e-5, atol=1e-7)
    # a resumed regularizer (state_dict through weights_only) distills from the same snapshot
    restored = LwF(lam=2.0, temperature=2.0)
    restored.load_state_dict(_roundtrip(lwf.state_dict()))
    torch.testing.assert_close(restored.penalty(model, x), penalty)


def test_lwf_single_output_model_uses_mse() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    lwf = LwF(lam=3.0)
    lwf.before_task(model, TaskInfo(index=1))
    assert lwf.penalty(model, x).item() == 0.0
    before = model(x).detach()
    _perturb(model, 0.2)
    torch.testing.assert_close(lwf.penalty(model, x), 3.0 * ((model(x) - before) ** 2).mean())


# --------------------------------------------------------------------------- IMM

def _set_parameters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_mean_imm_merge_is_the_arithmetic_mean_and_heads_are_not_merged() -> None:
    model = _multihead(heads=1)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    imm = IMM("mean", lam_l2=0.0)
    imm.before_task(model, TaskInfo(index=0, head=0))
    first = _set_parameters(model, 10)
    imm.after_task(model, [(x, y)])
    model.add_head(3)
    imm.before_task(model, TaskInfo(index=1, head=1))
    torch.testing.assert_close(model.trunk[0].weight.detach(), first["trunk.0.weight"])  # weight transfer
    second = _set_parameters(model, 11)
    imm.after_task(model, [(x, y)])
    for name in ("trunk.0.weight", "trunk.0.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), (first[name] + second[name]) / 2)
    for name in ("heads.0.weight", "heads.1.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), second[name])


def test_mode_imm_merge_is_the_fisher_weighted_mean() -> None:
    model = _multihead(heads=1)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    imm = IMM("mode", lam_l2=0.0)
    thetas, fishers = [], []
    for t in range(3):
        if t:
            model.add_head(3)
        imm.before_task(model, TaskInfo(index=t, head=t))
        thetas.append(_set_parameters(model, 20 + t))
        model.active_head = t
        fishers.append(fisher_importance(model, [(x, y)]))
        imm.after_task(model, [(x, y)])
    for name in ("trunk.0.weight", "trunk.0.bias"):
        expected = sum(f[name] * th[name] for f, th in zip(fishers, thetas)) / sum(f[name] for f in fishers)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-4, atol=1e-5)
    # mode-IMM differs from mean-IMM here
    mean = sum(th["trunk.0.weight"] for th in thetas) / 3
    assert float((model.trunk[0].weight.detach() - mean).abs().max()) > 1e-2


def test_imm_l2_transfer_penalty() -> None:
    model = _multihead(heads=1)
    imm = IMM("mean", lam_l2=0.3, penalty_step="gradient")
    imm.before_task(model, TaskInfo(index=0, head=0))
    assert imm.penalty(model).item() == 0.0
    imm.after_task(model, [])
    previous = imm.task_parameters[-1]
    _perturb(model, 0.2)
    expected = 0.3 * sum(((dict(model.named_parameters())[n] - v) ** 2).sum() for n, v in previous.items())
    torch.testing.assert_close(imm.penalty(model), expected)


# --------------------------------------------------------------------------- EBLL

def test_ebll_autoencoder_reduces_reconstruction_error_and_codes_are_preserved() -> None:
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 20, generator=generator)
    features = torch.relu(torch.randn(400, 3, generator=generator) @ basis)  # rank-3 structure in 20-d
    autoencoder, errors = train_autoencoder(features, 8, epochs=30, lr=1e-2, seed=0)
    assert len(errors) == 31
    assert errors[-1] < 0.2 * errors[0]
    _, again = train_autoencoder(features, 8, epochs=30, lr=1e-2, seed=0)
    assert again == errors  # deterministic given the seed

    torch.manual_seed(0)
    model = MultiHeadNet(nn.Sequential(nn.Linear(6, 12), nn.ReLU()), 12)
    model.add_head(3)
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    ebll = EBLL(lam=1.0, code_dim=4, ae_lam=5.0, ae_rec_lam=1.0, ae_epochs=5)
    ebll.before_task(model, TaskInfo(index=0, head=0))
    ebll.after_task(model, [(x[:32], y[:32]), (x[32:], y[32:])])
    assert len(ebll.encoders) == 1 and ebll.encoders[0]["weight"].shape == (4, 12)
    assert ebll.reconstruction_errors[0][-1] < ebll.reconstruction_errors[0][0]
    model.add_head(3)
    ebll.before_task(model, TaskInfo(index=1, head=1))
    assert ebll.penalty(model, x).item() == pytest.approx(0.0, abs=1e-7)
    _perturb(model, 0.3)
    features_old = ebll.old_model(model).features(x)
    weight, bias = ebll.encoders[0]["weight"], ebll.encoders[0]["bias"]
    code_term = (torch.sigmoid(model.features(x) @ weight.T + bias)
                 - torch.sigmoid(features_old @ weight.T + bias)).pow(2).sum(1).mean()
    lwf = LwF(lam=1.0)
    lwf.load_state_dict(ebll.state_dict())
    torch.testing.assert_close(ebll.penalty(model, x), lwf.penalty(model, x) + 5.0 * code_term, rtol=1e-5, atol=1e-7)
    assert code_term.item() > 0


def test_ebll_requires_features() -> None:
    with pytest.raises(Exception, match="features"):
        EBLL().before_task(nn.Linear(2, 2), TaskInfo(index=0))


# --------------------------------------------------------------------------- registry

def test_registry_builds_every_method_and_rejects_bad_names_and_options() -> None:
    assert set(METHODS) == {"finetune", "mas", "lmas", "ewc", "si", "lwf", "imm", "ebll"}
    for name in METHODS:
        assert make_regularizer(name).name == name
    assert isinstance(make_regularizer("l-MAS"), LocalMAS)
    assert isinstance(make_regularizer("lmas"), MAS)
    assert make_regularizer("imm", mode="mode").mode == "mode"
    assert make_regularizer("ewc", lam=3.0, online=True, gamma=0.9).gamma == 0.9
    with pytest.raises(UnknownMethodError, match="did you mean 'mas'"):
        make_regularizer("mass")
    with pytest.raises(UnknownMethodError, match="did you mean 'ewc'"):
        make_regularizer("ewk")
    with pytest.raises(UnknownMethodError, match="upper bound.*run_sequence"):
        make_regularizer("joint")
    with pytest.raises(UnknownOptionError, match=r"no option 'lamda'; did you mean 'lam'.*valid options: lam, damping"):
        make_regularizer("si", lamda=1.0)
    with pytest.raises(UnknownOptionError, match="mode"):
        make_regularizer("lmas", mode="exact")
    assert "mode" not in method_options("lmas") and "lam" in method_options("lmas")
    with pytest.raises(UnknownOptionError, match="valid options: none"):
        make_regularizer("finetune", lam=1.0)


# --------------------------------------------------------------------------- declared needs

def test_each_method_declares_what_it_needs_and_its_strength_by_name() -> None:
    expected = {  # name: (after_task_data, importance_from_inputs, uses_step_hook, strength)
        "finetune": ("none", False, False, {}),
        "mas": ("inputs", True, False, {"lam": 5.0}),
        "lmas": ("inputs", True, False, {"lam": 5.0}),
        "ewc": ("labelled", False, False, {"lam": 5.0}),
        "si": ("none", False, True, {"lam": 5.0}),
        "lwf": ("none", False, False, {"lam": 5.0}),
        "ebll": ("labelled", False, False, {"lam": 5.0}),  # its autoencoder reads the labels
        "imm": ("none", False, False, {"lam_l2": 5.0}),
    }
    assert set(expected) == set(METHODS)
    for name, (data, from_inputs, step_hook, strength) in expected.items():
        options = {} if name == "finetune" else {"lam_l2": 5.0} if name == "imm" else {"lam": 5.0}
        method = make_regularizer(name, **options)
        assert (method.after_task_data, method.importance_from_inputs, method.uses_step_hook) == (data, from_inputs,
                                                                                                   step_hook), name
        assert method.strength == strength, name
    assert make_regularizer("imm", mode="mode").after_task_data == "labelled"  # its Fisher reads the labels
    assert make_regularizer("mas", lam=5.0).describe_strength() == "lam=5"
    assert make_regularizer("imm", lam_l2=1e-4).describe_strength() == "lam_l2=0.0001"
    assert make_regularizer("finetune").describe_strength() == "no strength hyperparameter"


def test_states_written_before_the_version_field_load_and_other_versions_are_refused() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    anchors = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    fisher = {name: torch.rand_like(value) for name, value in anchors.items()}
    _perturb(model, 0.2)
    expected = 0.5 * sum((fisher[n] * (p.detach() - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    ewc = EWC(lam=0.5, penalty_step="gradient")
    ewc.load_state_dict({"fisher": fisher, "anchors": anchors, "tasks_seen": 1})  # the layout of earlier releases
    torch.testing.assert_close(ewc.penalty(model), expected)
    si = SI(lam=0.5, penalty_step="gradient")
    si.load_state_dict({"importance": fisher, "anchors": anchors, "path": {}, "start": {}, "previous": {}})
    torch.testing.assert_close(si.penalty(model), expected)
    with pytest.raises(Exception, match="EWC state version 2 is not 1"):
        EWC().load_state_dict({**ewc.state_dict(), "version": 2})
    with pytest.raises(Exception, match="not a SI state: missing"):
        SI().load_state_dict(ewc.state_dict())


@pytest.mark.parametrize("name", ["mas", "lmas", "ewc", "si", "imm"])
def test_quadratic_anchor_methods_share_one_penalty_with_free_new_heads(name: str) -> None:
    """Every quadratic-anchor method: penalty λ Σ Ω (θ − θ*)², gradient 2λΩ(θ − θ*), a head added
    after the anchoring is free, a resumed state gives the same penalty, a rebuilt layer is an error."""
    model = _multihead(heads=1)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    method = make_regularizer(name, penalty_step="gradient",  # the penalty in the loss is what is checked
                              **({"lam_l2": 0.3} if name == "imm" else {"lam": 0.3}))
    method.before_task(model, TaskInfo(index=0, head=0))
    if name == "si":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            method.after_step(model)
    method.after_task(model, [(x, y)] if method.after_task_data == "labelled" else [x])
    model.add_head(3)
    _perturb(model, 0.2)
    anchors = method.anchors
    importance = ({n: torch.ones_like(a) for n, a in anchors.items()} if name == "imm" else method.importance)
    assert anchors and "heads.1.weight" not in anchors
    parameters = dict(model.named_parameters())
    expected = 0.3 * sum((importance[n] * (parameters[n].detach() - anchors[n]) ** 2).sum() for n in anchors)
    model.zero_grad(set_to_none=True)
    penalty = method.penalty(model)
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-9)
    penalty.backward()
    for n, parameter in parameters.items():
        if n in anchors:
            torch.testing.assert_close(parameter.grad, 2 * 0.3 * importance[n] * (parameter.detach() - anchors[n]),
                                       rtol=1e-5, atol=1e-9)
        else:
            assert parameter.grad is None, n  # the new head is free
    restored = make_regularizer(name, penalty_step="gradient", **({"lam_l2": 0.3} if name == "imm" else {"lam": 0.3}))
    restored.load_state_dict(_roundtrip(method.state_dict()))
    assert torch.equal(restored.penalty(model), method.penalty(model))
    model.trunk[0] = nn.Linear(6, 4)
    with pytest.raises(MASStateError, match="trunk.0.weight"):
        method.penalty(model)
