"""The proximal penalty step and the relative λ of the quadratic-anchor methods (docs/method.md §13).

penalty_step="proximal": after each optimizer step θ ← (θ + c θ*) / (1 + c), c = 2 η λ Ω, checked
against its formula (two param groups with their own η, Adam's state untouched), against the gradient
form (the one-step difference shrinks as η², a fixed-horizon trajectory's as η), for unconditional
stability, for SI's path integral and for resume. lam_scale="mean": λ / mean Ω, for every method,
saved and checked on load; both options from the Python API and the configs, with did-you-mean.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import mas_core.loop as loop_module
from mas_core.checkpoint import load_checkpoint
from mas_core.errors import CheckpointMismatchError, DivergenceError, InvalidArgumentError, UnknownOptionError
from mas_core.loop import CHECKPOINT_NAME, OptimSettings
from mas_core.regularizers import EWC, IMM, MAS, SI, LocalMAS, make_regularizer
from mas_core.regularizers.base import TaskInfo

from test_loop import _kill_after_checkpoint, _Killed
from test_sequence import _make_model, _run, _tasks


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _anchored_mas(model: nn.Module, lam: float, **options) -> MAS:
    """MAS with a given positive Ω (not estimated) anchored at the model's current parameters (the
    gradient form unless ``penalty_step`` is given)."""
    options.setdefault("penalty_step", "gradient")
    reg = MAS(lam=lam, **options)
    generator = torch.Generator().manual_seed(3)
    importance = {name: torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.1
                  for name, p in model.named_parameters()}
    reg.add_task_importance(model, importance)
    return reg


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def _move(model: nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


# --------------------------------------------------------------------------- the formula


def test_one_proximal_step_is_the_closed_form_with_each_groups_learning_rate():
    model = _model()
    reg = _anchored_mas(model, lam=0.7, penalty_step="proximal")
    _move(model)
    first, second = model[0], model[2]
    optimizer = torch.optim.SGD([{"params": first.parameters(), "lr": 0.1},
                                 {"params": second.parameters(), "lr": 0.02}], lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reg.after_optimizer_step(model, optimizer)
    for name, p in model.named_parameters():
        eta = 0.1 if name.startswith("0.") else 0.02
        c = 2 * eta * 0.7 * reg.importance[name]
        expected = (before[name] + c * reg.anchors[name]) / (1 + c)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    # the penalty itself contributes nothing to the loss under the proximal step
    assert float(reg.penalty(model)) == 0.0 and reg.uses_optimizer_step_hook


def test_a_learning_rate_change_recomputes_the_cached_factors():
    model = _model()
    reg = _anchored_mas(model, lam=2.0, penalty_step="proximal")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for eta in (0.1, 0.1, 0.03):
        optimizer.param_groups[0]["lr"] = eta
        _move(model, seed=int(eta * 100))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        reg.after_optimizer_step(model, optimizer)
        for name, p in model.named_parameters():
            c = 2 * eta * 2.0 * reg.importance[name]
            torch.testing.assert_close(p.detach(), (before[name] + c * reg.anchors[name]) / (1 + c))


def test_the_gradient_form_is_unchanged_and_has_no_hook():
    model = _model()
    reg = _anchored_mas(model, lam=0.7)
    _move(model)
    expected = sum((0.7 * reg.importance[n] * (p - reg.anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(reg.penalty(model), expected)
    assert not reg.uses_optimizer_step_hook
    before = [p.detach().clone() for p in model.parameters()]
    reg.after_optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1))  # a no-op
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_imm_transfer_penalty_proximal_uses_omega_one():
    model = _model()
    reg = IMM("mean", lam_l2=0.5, penalty_step="proximal")
    reg.after_task(model, ())
    anchors = {name: value.clone() for name, value in reg.anchors.items()}
    _move(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reg.after_optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.2))
    c = 2 * 0.2 * 0.5
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), (before[name] + c * anchors[name]) / (1 + c))


def test_adam_moments_never_see_the_proximal_step():
    model = _model()
    reg = _anchored_mas(model, lam=1.0, penalty_step="proximal")
    _move(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 5, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reg.after_optimizer_step(model, optimizer)
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, moments[id(p)][key]), f"{name}: Adam's {key} changed"
        c = 2 * 0.01 * reg.importance[name]
        torch.testing.assert_close(p.detach(), (before[name] + c * reg.anchors[name]) / (1 + c))


# --------------------------------------------------------------------------- against the gradient form


def _one_step(form: str, eta: float, lam: float = 0.5) -> dict[str, torch.Tensor]:
    """One plain-SGD step of task loss + penalty from a fixed point, in the given penalty form."""
    model = _model()
    reg = _anchored_mas(model, lam=lam, penalty_step=form)
    _move(model, scale=0.3)
    inputs = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=eta, momentum=0.0)
    loss = model(inputs).square().mean() + reg.penalty(model)
    loss.backward()
    optimizer.step()
    reg.after_optimizer_step(model, optimizer)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))


def test_one_step_agrees_with_the_gradient_form_to_first_order():
    """The one-step difference is O(η²): halving η divides it by 4 (measured ratios 3.94 and 3.97)."""
    differences = [_distance(_one_step("gradient", eta), _one_step("proximal", eta)) for eta in (0.04, 0.02, 0.01)]
    for larger, smaller in zip(differences, differences[1:]):
        assert 3.6 < larger / smaller < 4.4
    # pure penalty (no task loss), exact: gradient θ* + (1 − c) d, proximal θ* + d / (1 + c): gap c² d / (1 + c)
    model = _model()
    reg = _anchored_mas(model, lam=0.5)
    _move(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reg.penalty(model).backward()
    optimizer.step()
    after_gradient = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    reg.penalty_step = "proximal"
    reg.after_optimizer_step(model, optimizer)
    for name, p in model.named_parameters():
        c = 2 * 0.01 * 0.5 * reg.importance[name]
        d = start[name] - reg.anchors[name]
        torch.testing.assert_close(p.detach() - after_gradient[name], c * c * d / (1 + c), rtol=1e-7, atol=1e-15)


def _trajectory(form: str, eta: float, horizon: float = 1.0, lam: float = 0.5) -> dict[str, torch.Tensor]:
    model = _model()
    reg = _anchored_mas(model, lam=lam, penalty_step=form)
    _move(model, scale=0.3)
    inputs = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=eta, momentum=0.0)
    for _ in range(round(horizon / eta)):
        optimizer.zero_grad()
        (model(inputs).square().mean() + reg.penalty(model)).backward()
        optimizer.step()
        reg.after_optimizer_step(model, optimizer)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trajectories_over_a_fixed_horizon_converge_together_as_eta_shrinks():
    """Both forms discretise the same gradient flow: over t = Kη = 1 their gap is O(η) (measured ratios 2.00)."""
    gaps = [_distance(_trajectory("gradient", eta), _trajectory("proximal", eta)) for eta in (0.04, 0.02, 0.01)]
    for larger, smaller in zip(gaps, gaps[1:]):
        assert 1.8 < larger / smaller < 2.2
    assert gaps[-1] < 1e-2


# --------------------------------------------------------------------------- stability


def test_proximal_is_finite_and_between_theta_and_the_anchor_where_the_gradient_form_explodes():
    model = _model()
    reg = _anchored_mas(model, lam=1000.0)  # c = 2ηλΩ ≥ 20: the gradient step multiplies θ − θ* by (1 − c)
    _move(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        reg.penalty(model).backward()
        optimizer.step()
    grown = max(float((p.detach() - reg.anchors[n]).abs().max()) for n, p in model.named_parameters())
    assert grown > 1e20 or grown != grown  # exploded (or NaN)

    model = _model()
    reg = _anchored_mas(model, lam=1000.0, penalty_step="proximal")
    _move(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    previous = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(30):
        optimizer.zero_grad()
        model(torch.randn(4, 5, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
        produced = {name: p.detach().clone() for name, p in model.named_parameters()}
        reg.after_optimizer_step(model, optimizer)
        for name, p in model.named_parameters():
            low = torch.minimum(produced[name], reg.anchors[name])
            high = torch.maximum(produced[name], reg.anchors[name])
            assert bool(torch.isfinite(p).all()) and bool(((p >= low) & (p <= high)).all())
        previous = produced
    assert previous and all(float((p.detach() - reg.anchors[n]).abs().max()) <= float((start[n] - reg.anchors[n]).abs().max())
                            for n, p in model.named_parameters())


def test_the_loop_diverges_with_the_gradient_form_and_not_with_the_proximal_one():
    tasks = _tasks(2)
    settings = OptimSettings(epochs=2, lr=0.5, momentum=0.9, batch_size=32)
    with pytest.raises(DivergenceError):
        _run(_make_model, tasks, "mas", settings, method_options={"lam": 1000.0, "penalty_step": "gradient"},
             progress=False)
    result = _run(_make_model, tasks, "mas", settings, method_options={"lam": 1000.0, "penalty_step": "proximal"},
                  progress=False)
    assert all(value is not None and 0.0 <= value <= 1.0 for value in result.accuracy[-1])
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())


# --------------------------------------------------------------------------- SI and resume


def test_si_path_integral_sees_the_task_gradient_under_the_proximal_step():
    """Plain SGD: Δθ = −η (g_task + 2λΩ(θ_new − θ*)) exactly, and ω integrates the task loss's
    gradient alone (Zenke et al.'s reference), so ω = η g_task (g_task + 2λΩ(θ_new − θ*))."""
    model = _model()
    reg = SI(lam=0.8, penalty_step="proximal")
    reg.before_task(model, TaskInfo(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
        reg.after_step(model)
    reg.after_task(model, ())
    reg.before_task(model, TaskInfo(1))
    optimizer.zero_grad()
    (model(inputs) + 1).square().mean().backward()
    task_gradient = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    reg.after_optimizer_step(model, optimizer)
    reg.after_step(model)
    for name, p in model.named_parameters():
        full = task_gradient[name] + 2 * 0.8 * reg.importance[name].clamp(min=0) * (p.detach() - reg.anchors[name])
        torch.testing.assert_close(reg.path[name], 0.05 * task_gradient[name] * full, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("method", ["mas", "si"])
def test_a_resumed_proximal_run_equals_the_uninterrupted_one(method, tmp_path, monkeypatch):
    tasks = _tasks()
    settings = OptimSettings(epochs=2, lr=0.05, momentum=0.9, batch_size=32)
    options = {"lam": 5.0, "penalty_step": "proximal", "lam_scale": "mean"}

    def run(folder: Path, resume: bool):
        return _run(_make_model, tasks, method, settings, method_options=options, checkpoint_dir=folder / method,
                    resume=resume, progress=False)

    whole = run(tmp_path / "whole", resume=False)
    _kill_after_checkpoint(monkeypatch, method, 1)
    with pytest.raises(_Killed):
        run(tmp_path / "killed", resume=False)
    monkeypatch.undo()
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.accuracy == whole.accuracy
    first = load_checkpoint(tmp_path / "whole" / method / CHECKPOINT_NAME)
    again = load_checkpoint(tmp_path / "killed" / method / CHECKPOINT_NAME)
    for name, value in first["model"].items():
        assert torch.equal(value, again["model"][name])
    assert first["regularizer"]["penalty_step"] == "proximal" and first["regularizer"]["lam_scale"] == "mean"


def test_a_proximal_run_differs_from_the_gradient_run():
    """The loop really calls the hook: the same λ in the two forms trains different weights."""
    tasks = _tasks(2)
    gradient = _run(_make_model, tasks, "mas", OptimSettings(epochs=1, lr=0.05, momentum=0.0, batch_size=32),
                    method_options={"lam": 5.0, "penalty_step": "gradient"}, progress=False)
    proximal = _run(_make_model, tasks, "mas", OptimSettings(epochs=1, lr=0.05, momentum=0.0, batch_size=32),
                    method_options={"lam": 5.0, "penalty_step": "proximal"}, progress=False)
    zero = _run(_make_model, tasks, "mas", OptimSettings(epochs=1, lr=0.05, momentum=0.0, batch_size=32),
                method_options={"lam": 0.0, "penalty_step": "proximal"}, progress=False)
    weights = [dict(result.model.named_parameters())["trunk.0.weight"] for result in (gradient, proximal, zero)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    # small step: the two forms stay close (first-order agreement, momentum 0)
    assert float((weights[0] - weights[1]).abs().max()) < 0.1 * float((weights[1] - weights[2]).abs().max()) + 1e-3


# --------------------------------------------------------------------------- lam_scale


def _fit(reg, model: nn.Module) -> None:
    data = [(torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,)))]
    if isinstance(reg, SI):
        reg.before_task(model, TaskInfo(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
            optimizer.step()
            reg.after_step(model)
        reg.after_task(model, ())
    elif isinstance(reg, EWC):
        reg.after_task(model, data)
    else:
        reg.after_task(model, [data[0][0]])


@pytest.mark.parametrize("factory", [MAS, LocalMAS, EWC, SI], ids=["mas", "lmas", "ewc", "si"])
def test_lam_scale_mean_divides_lambda_by_the_mean_importance(factory):
    model = _model()
    reg = factory(lam=3.0, lam_scale="mean", penalty_step="gradient")  # the penalty's value is checked
    _fit(reg, model)
    omega = reg.importance
    mean = float(sum(v.sum() for v in omega.values()) / sum(v.numel() for v in omega.values()))
    assert reg.effective_lam == pytest.approx(3.0 / mean, rel=1e-9)
    _move(model, scale=0.1)
    expected = sum((3.0 / mean * omega[n] * (p - reg.anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(reg.penalty(model), expected)
    # without the scale λ is used as given
    plain = factory(lam=3.0)
    _fit(plain, _model())
    assert plain.effective_lam == 3.0


def test_lam_scale_mean_is_recomputed_when_omega_changes():
    model = _model()
    reg = _anchored_mas(model, lam=1.0, lam_scale="mean")
    first = reg.effective_lam
    reg.add_task_importance(model, {name: 9 * torch.ones_like(p) for name, p in model.named_parameters()})
    omega = reg.importance
    mean = float(sum(v.sum() for v in omega.values()) / sum(v.numel() for v in omega.values()))
    assert reg.effective_lam == pytest.approx(1.0 / mean) and reg.effective_lam < first


def test_a_proportional_omega_gives_the_same_penalty_under_lam_scale_mean():
    model = _model()
    small, large = MAS(lam=2.0, lam_scale="mean"), MAS(lam=2.0, lam_scale="mean")
    importance = {name: torch.rand_like(p) + 0.1 for name, p in model.named_parameters()}
    small.add_task_importance(model, importance)
    large.add_task_importance(model, {name: 6000.0 * value for name, value in importance.items()})
    _move(model)
    torch.testing.assert_close(small.penalty(model), large.penalty(model))


def test_lam_scale_is_saved_and_checked_on_load():
    model = _model()
    reg = _anchored_mas(model, lam=1.0, lam_scale="mean", penalty_step="proximal")
    state = reg.state_dict()
    assert state["lam_scale"] == "mean" and state["penalty_step"] == "proximal"
    again = MAS(lam=1.0, lam_scale="mean")
    again.load_state_dict(state)  # the penalty step may differ: Ω and θ* mean the same
    assert again.effective_lam == pytest.approx(reg.effective_lam)
    with pytest.raises(CheckpointMismatchError, match="lam_scale"):
        MAS(lam=1.0).load_state_dict(state)
    old = {key: value for key, value in MAS(lam=1.0).state_dict().items() if key not in ("lam_scale", "penalty_step")}
    MAS(lam=1.0).load_state_dict(old)  # a state written before the options: λ as given
    with pytest.raises(CheckpointMismatchError, match="lam_scale"):
        MAS(lam=1.0, lam_scale="mean").load_state_dict(old)


def test_a_zero_importance_cannot_be_scaled():
    model = _model()
    reg = MAS(lam=1.0, lam_scale="mean")
    with pytest.raises(Exception, match="positive finite mean"):
        reg.add_task_importance(model, {name: torch.zeros_like(p) for name, p in model.named_parameters()})


# --------------------------------------------------------------------------- API and configs


def test_options_from_the_python_api_with_did_you_mean():
    reg = make_regularizer("mas", lam=1, penalty_step="proximal", lam_scale="mean")
    assert (reg.penalty_step, reg.lam_scale) == ("proximal", "mean")
    for name in ("lmas", "ewc", "si"):
        assert make_regularizer(name, penalty_step="proximal", lam_scale="mean").uses_optimizer_step_hook
    assert make_regularizer("imm", penalty_step="proximal").uses_optimizer_step_hook
    with pytest.raises(InvalidArgumentError, match="did you mean 'proximal'"):
        make_regularizer("mas", penalty_step="proximl")
    with pytest.raises(InvalidArgumentError, match="did you mean 'mean'"):
        make_regularizer("ewc", lam_scale="maen")
    with pytest.raises(UnknownOptionError, match="did you mean 'penalty_step'"):
        make_regularizer("si", penalty_stp="proximal")
    with pytest.raises(UnknownOptionError):
        make_regularizer("imm", lam_scale="mean")  # Ω ≡ 1: nothing to scale


def test_proximal_is_the_default_everywhere_and_gradient_stays_selectable():
    """Issue 23: MAS, l-MAS, EWC, SI and IMM's transfer penalty default to the proximal step, in the API and
    in every shipped config (no config names the gradient form); `gradient` is still accepted."""
    import yaml

    for name in ("mas", "lmas", "ewc", "si", "imm"):
        reg = make_regularizer(name)
        assert reg.penalty_step == "proximal" and reg.uses_optimizer_step_hook, name
        assert make_regularizer(name, penalty_step="gradient").uses_optimizer_step_hook is False
    for path in sorted(Path("configs").glob("*.yaml")):
        text = yaml.safe_load(path.read_text(encoding="utf-8"))
        options = [m.get("options", {}) for m in text.get("methods", []) if isinstance(m, dict)]
        options += list((text.get("method_options") or {}).values())
        assert all(o.get("penalty_step", "proximal") == "proximal" for o in options), path


def test_the_fact_config_refuses_a_bad_value_before_training():
    from triplets.facts.train_config import MethodConfig
    from triplets.runner import check_methods

    check_methods([MethodConfig("mas", {"lam": 1.0, "penalty_step": "proximal", "lam_scale": "mean"})])
    with pytest.raises(ValueError, match="method 'mas': .*did you mean 'proximal'"):
        check_methods([MethodConfig("mas", {"penalty_step": "proximel"})])


def test_the_recognition_config_carries_the_options_to_the_loop(tmp_path):
    from triplets.recognition.config import load_recognition_config

    path = tmp_path / "r.yaml"
    path.write_text(Path("configs/recognition_offline.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    config = load_recognition_config(path, ["method_options.mas.penalty_step=proximal",
                                            "method_options.mas.lam_scale=mean"])
    options = config.method_options["mas"]
    assert options["penalty_step"] == "proximal" and options["lam_scale"] == "mean"
    assert make_regularizer("mas", **options).uses_optimizer_step_hook


def test_the_recognition_config_refuses_a_bad_value_when_loaded(tmp_path):
    from triplets.errors import ConfigError
    from triplets.recognition.config import load_recognition_config

    path = tmp_path / "r.yaml"
    path.write_text(Path("configs/recognition_offline.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises((ConfigError, ValueError), match="did you mean 'proximal'"):
        load_recognition_config(path, ["method_options.mas.penalty_step=proximl"])
    with pytest.raises((ConfigError, ValueError), match="did you mean 'lam_scale'"):
        load_recognition_config(path, ["method_options.ewc.lam_scal=mean"])
