"""The task-sequence runner on tiny synthetic data: resume, config checks, heads, joint, divergence, checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from mas_core.checkpoint import load_checkpoint
from mas_core.errors import CheckpointMismatchError, DivergenceError
from mas_core.regularizers import METHODS, TaskInfo, make_regularizer
from mas_core.sequence import CHECKPOINT_NAME, MultiHeadNet, OptimSettings, Task, run_sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


IN_DIM = 8


def _tasks(num_tasks: int = 3, train_size: int = 160, test_size: int = 60) -> list[Task]:
    """Each task: two Gaussian blobs along a task-specific direction, labels 0/1."""
    generator = torch.Generator().manual_seed(123)
    tasks = []
    for t in range(num_tasks):
        direction = torch.randn(IN_DIM, generator=generator)
        direction = 2.0 * direction / direction.norm()

        def sample(n: int) -> TensorDataset:
            labels = torch.randint(0, 2, (n,), generator=generator)
            inputs = torch.randn(n, IN_DIM, generator=generator) + (2 * labels[:, None] - 1) * direction
            return TensorDataset(inputs, labels)

        tasks.append(Task(name=f"t{t}", train=sample(train_size), test=sample(test_size), num_classes=2))
    return tasks


def _make_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(IN_DIM, 16), nn.ReLU()), 16)


SETTINGS = OptimSettings(epochs=2, lr=0.05, momentum=0.9, batch_size=32)
SEED = 7


def _run(*args, **kwargs):
    """run_sequence with the tests' seed."""
    return run_sequence(*args, seed=SEED, **kwargs)


# resumed == uninterrupted, bit for bit: tests/test_loop.py (one test over both experiments)


def test_same_seed_same_result_and_resume_after_the_end(tmp_path) -> None:
    tasks = _tasks(2)
    first = _run(_make_model, tasks, "ewc", SETTINGS, checkpoint_dir=tmp_path, progress=False)
    second = _run(_make_model, tasks, "ewc", SETTINGS, progress=False)
    assert first.accuracy == second.accuracy
    finished = _run(_make_model, tasks, "ewc", SETTINGS, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert finished.accuracy == first.accuracy


def test_resume_with_another_config_raises(tmp_path) -> None:
    tasks = _tasks(2)
    _run(_make_model, tasks, "mas", SETTINGS, checkpoint_dir=tmp_path, progress=False)
    other = OptimSettings(epochs=2, lr=0.01, momentum=0.9, batch_size=32)
    with pytest.raises(CheckpointMismatchError, match="lr"):
        _run(_make_model, tasks, "mas", other, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointMismatchError, match="lam"):
        _run(_make_model, tasks, "mas", SETTINGS, method_options={"lam": 2.0}, checkpoint_dir=tmp_path,
                     resume=True, progress=False)


@pytest.mark.parametrize("method", ["mas", "lmas", "ewc", "si", "imm"])
def test_the_new_head_is_not_regularized(method) -> None:
    tasks = _tasks(1)
    torch.manual_seed(0)
    model = _make_model()
    model.add_head(2)
    regularizer = make_regularizer(method, penalty_step="gradient",  # the penalty's gradient is what is checked
                                   **({"lam_l2": 1.0} if method == "imm" else {}))
    regularizer.before_task(model, TaskInfo(index=0, head=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = tasks[0].train.tensors
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        regularizer.after_step(model)
    regularizer.after_task(model, [(inputs[:80], targets[:80]), (inputs[80:], targets[80:])])
    new_head = model.add_head(2)
    model.active_head = new_head
    regularizer.before_task(model, TaskInfo(index=1, head=new_head))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1)
    model.zero_grad()
    regularizer.penalty(model, inputs).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("heads.1."):
            assert parameter.grad is None or float(parameter.grad.abs().max()) == 0.0, name
    assert float(model.trunk[0].weight.grad.abs().sum()) > 0


def test_joint_upper_bound_learns_every_task() -> None:
    tasks = _tasks(3)
    joint = _run(_make_model, tasks, "joint", SETTINGS, progress=False)
    assert joint.method == "joint"
    assert len(joint.accuracy) == 3 and all(value is not None for value in joint.accuracy[2])
    assert min(joint.accuracy[2]) >= 0.9
    assert joint.avg_forgetting <= 0.05


class _Wrapped(Dataset):
    """A non-TensorDataset (exercises the DataLoader path) yielding dict items."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        x, y = self.base[index]
        return {"input": x, "target": y}


def test_generic_datasets_give_the_same_result_as_tensor_datasets() -> None:
    tasks = _tasks(2)
    wrapped = [Task(t.name, _Wrapped(t.train), _Wrapped(t.test), t.num_classes) for t in tasks]
    for method in ("mas", "joint"):
        direct = _run(_make_model, tasks, method, SETTINGS, progress=False)
        generic = _run(_make_model, wrapped, method, SETTINGS, progress=False)
        assert generic.accuracy == direct.accuracy, method


def test_huge_lambda_with_large_lr_raises_divergence_naming_both() -> None:
    tasks = _tasks(2)
    settings = OptimSettings(epochs=2, lr=1.0, momentum=0.9, batch_size=32)
    with pytest.raises(DivergenceError, match=r"lower the learning rate \(optim\.lr, now 1\.0\) or the method's strength \(lam=1000000000\.0\)"):
        _run(_make_model, tasks, "mas", settings, method_options={"lam": 1e9, "penalty_step": "gradient"},
             progress=False)  # the gradient form (the proximal default cannot diverge)


def test_every_method_state_survives_weights_only_checkpoints(tmp_path) -> None:
    tasks = _tasks(2, train_size=64, test_size=20)
    settings = OptimSettings(epochs=1, lr=0.05, batch_size=32)
    cases = [(name, {}) for name in METHODS] + [("imm", {"mode": "mode"}), ("ewc", {"online": True, "gamma": 0.5})]
    for name, options in cases:
        if name == "ebll":
            options = {"code_dim": 4, "ae_epochs": 1}
        folder = tmp_path / f"{name}-{len(options)}"
        _run(_make_model, tasks, name, settings, method_options=options, checkpoint_dir=folder, progress=False)
        state = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
        regularizer = make_regularizer(name, **options)
        regularizer.load_state_dict(state["regularizer"])
        _assert_same(regularizer.state_dict(), state["regularizer"], name)


def _assert_same(left, right, where: str) -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert set(left) == set(right), where
        for key in left:
            _assert_same(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            _assert_same(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


def test_importance_data_is_what_mas_estimates_omega_on(tmp_path) -> None:
    from mas_core.importance import mas_importance
    from mas_core.regularizers import MAS

    task = _tasks(1)[0]
    unlabeled = TensorDataset(task.test.tensors[0])  # inputs only, as in the paper's Table 3
    task = Task(task.name, task.train, task.test, task.num_classes, importance_data=unlabeled)
    regularizer = MAS(lam=1.0)
    _run(_make_model, [task], regularizer, SETTINGS, checkpoint_dir=tmp_path, progress=False)
    model = _make_model()
    model.add_head(2)
    model.load_state_dict(load_checkpoint(tmp_path / CHECKPOINT_NAME)["model"])
    expected = mas_importance(model, [unlabeled.tensors[0]])
    for name, value in expected.items():
        torch.testing.assert_close(regularizer.importance[name], value, rtol=1e-5, atol=1e-7)
    on_train = mas_importance(model, [task.train.tensors[0]])
    assert not torch.allclose(on_train["trunk.0.weight"], expected["trunk.0.weight"])
