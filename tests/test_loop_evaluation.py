"""What the accuracy matrix measures: the model as trained on each task (IMM's merge reported
apart), rows measured before a weight-changing ``after_task``, and ``evaluate`` in eval mode."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mas_core.checkpoint import load_checkpoint, save_checkpoint
from mas_core.errors import MASCoreError
from mas_core.regularizers import IMM
from mas_core.regularizers.base import Regularizer
from mas_core.sequence import CHECKPOINT_NAME, MultiHeadNet, evaluate

from test_sequence import SETTINGS, _make_model, _run, _tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _accuracies(model: nn.Module, tasks, upto: int) -> list[float]:
    """Each task's test accuracy with its own head, measured here and not by the loop."""
    return [evaluate(model, tasks[j].test, j) for j in range(upto + 1)]


class _SnapshotIMM(IMM):
    """IMM that keeps a copy of the model as trained (before its merge) and as merged, per task."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.trained: list[nn.Module] = []
        self.merged: list[nn.Module] = []

    def after_task(self, model, data) -> None:
        self.trained.append(copy.deepcopy(model))
        super().after_task(model, data)
        self.merged.append(copy.deepcopy(model))


def test_imm_diagonal_is_the_model_trained_on_the_task_and_the_merge_has_its_own_rows(tmp_path) -> None:
    tasks = _tasks(3)
    imm = _SnapshotIMM(mode="mean", lam_l2=1e-3)
    result = _run(_make_model, tasks, imm, SETTINGS, checkpoint_dir=tmp_path, progress=False)
    assert result.merged_accuracy is not None and len(result.merged_accuracy) == 3
    for t in range(3):
        trained = _accuracies(imm.trained[t], tasks, t)
        merged = _accuracies(imm.merged[t], tasks, t)
        assert result.accuracy[t][:t + 1] == trained, t
        assert result.merged_accuracy[t][:t + 1] == merged, t
        assert result.accuracy[t][t + 1:] == result.merged_accuracy[t][t + 1:] == [None] * (2 - t)
    # the merge changes what is measured, so the two matrices can be told apart
    assert any(result.accuracy[t][t] != result.merged_accuracy[t][t] for t in (1, 2))
    summary = result.summary()
    assert summary["accuracy_matrix_merged"] == result.merged_accuracy
    R, final = result.accuracy, result.merged_accuracy[2]
    assert summary["merged"]["avg_acc"] == pytest.approx(sum(final) / 3)
    assert summary["merged"]["avg_drop"] == pytest.approx(sum(final[j] - R[j][j] for j in range(3)) / 3)
    assert summary["merged"]["forgetting"] == pytest.approx(sum(max(R[l][j] for l in range(j, 2)) - final[j]
                                                                for j in range(2)) / 2)
    assert summary["avg_acc"] == pytest.approx(sum(result.accuracy[2]) / 3)  # the trained model's, as for any method
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint["merged_accuracy"] == result.merged_accuracy and checkpoint["accuracy"] == result.accuracy


def test_an_imm_checkpoint_from_before_the_merged_rows_is_refused_with_a_clear_message(tmp_path) -> None:
    tasks = _tasks(2)
    _run(_make_model, tasks, "imm", SETTINGS, method_options={"lam_l2": 1e-3}, checkpoint_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    del state["merged_accuracy"]  # what the loop wrote before R held the trained model
    save_checkpoint(tmp_path / CHECKPOINT_NAME, state)
    with pytest.raises(MASCoreError, match="cannot be resumed; start a new output folder"):
        _run(_make_model, tasks, "imm", SETTINGS, method_options={"lam_l2": 1e-3}, checkpoint_dir=tmp_path,
             resume=True, progress=False)


def test_other_methods_keep_one_matrix_and_the_checkpoint_keys() -> None:
    result = _run(_make_model, _tasks(2), "mas", SETTINGS, progress=False)
    assert result.merged_accuracy is None and "accuracy_matrix_merged" not in result.summary()


class _Scrambler(Regularizer):
    """A method whose after_task zeroes the trunk (every input then gets the same logits) and
    whose before_task restores the trained trunk (as IMM's weight transfer does)."""

    name = "scrambler"
    after_task_changes_model = True

    def __init__(self) -> None:
        self.trained: list[nn.Module] = []

    def before_task(self, model, task) -> None:
        if self.trained:
            model.trunk.load_state_dict(self.trained[-1].trunk.state_dict())

    def after_task(self, model, data) -> None:
        self.trained.append(copy.deepcopy(model))
        with torch.no_grad():
            for parameter in model.trunk.parameters():
                parameter.zero_()


def test_rows_are_measured_before_a_weight_changing_after_task() -> None:
    tasks = _tasks(2)
    scrambler = _Scrambler()
    result = _run(_make_model, tasks, scrambler, SETTINGS, progress=False)
    for t in range(2):
        assert result.accuracy[t][:t + 1] == _accuracies(scrambler.trained[t], tasks, t)
        assert result.accuracy[t][t] > 0.8  # the trained model separates the blobs
    # after the trunk is zeroed every sample gets one class: the accuracy of a constant guess
    for t in range(2):
        for j in range(t + 1):
            labels = tasks[j].test.tensors[1]
            shares = [int((labels == label).sum()) / len(labels) for label in (0, 1)]
            assert result.merged_accuracy[t][j] in shares


def test_evaluate_is_in_eval_mode_and_restores_the_mode() -> None:
    torch.manual_seed(0)
    model = MultiHeadNet(nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5)), 32)
    model.add_head(2)
    inputs = torch.randn(200, 8)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    model.train()
    with torch.no_grad():  # give BatchNorm running statistics other than its initial ones
        for _ in range(5):
            model(inputs * 3 + 1)
    before = copy.deepcopy(model.state_dict())
    first = evaluate(model, data, 0, batch_size=50)
    second = evaluate(model, data, 0, batch_size=50)
    assert first == second
    assert model.training  # restored
    for key, value in model.state_dict().items():  # no BatchNorm statistics updated
        assert torch.equal(value, before[key]), key
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = int((reference(inputs).argmax(1) == data.tensors[1]).sum()) / len(inputs)
    assert first == expected
