"""The one task loop (mas_core.loop) under both experiments: a run killed right after a task's
checkpoint and resumed equals the uninterrupted run bit for bit (the accuracy matrix compared
with ==, every final weight with torch.equal), whichever experiment plugs into the loop."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mas_core.loop as loop_module
from mas_core.checkpoint import load_checkpoint
from mas_core.loop import CHECKPOINT_NAME
from triplets.facts.train import train_run
from triplets.facts.train_config import MethodConfig

from test_sequence import SETTINGS, _make_model, _run, _tasks
from test_train import _config, make_tiny_fact_file


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class _Killed(Exception):
    pass


def _kill_after_checkpoint(monkeypatch, folder_name: str, completed: int) -> None:
    """The loop's checkpoint writer, dying right after ``folder_name``'s checkpoint of ``completed`` tasks."""
    real_save = loop_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).parent.name == folder_name and state["completed_tasks"] == completed:
            raise _Killed(str(path))

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)


def _sequence_case(method: str, options: dict):
    tasks = _tasks()

    def run(folder: Path, resume: bool) -> dict[str, list]:
        result = _run(_make_model, tasks, method, SETTINGS, method_options=options, checkpoint_dir=folder / method,
                      resume=resume, progress=False)
        return {method: result.accuracy}

    def final_weights(folder: Path, key: str) -> dict[str, torch.Tensor]:
        return load_checkpoint(folder / key / CHECKPOINT_NAME)["model"]

    return run, final_weights, method, 2, [method]


def _facts_case(tmp_path_factory):
    facts = make_tiny_fact_file(tmp_path_factory.mktemp("facts") / "facts.h5", num_tasks=3, facts_per_task=6,
                                train_per_fact=4, test_per_fact=2)
    config = _config(facts, methods=[MethodConfig("finetune"), MethodConfig("mas", {"lam": 1.0})])

    def run(folder: Path, resume: bool) -> dict[str, list]:
        results = train_run(config, folder, resume=resume, progress=False)
        return {key: entry["accuracy_matrix"] for key, entry in results["methods"].items()}

    def final_weights(folder: Path, key: str) -> dict[str, torch.Tensor]:
        return torch.load(folder / key / "model.pt", weights_only=True)["model"]

    return run, final_weights, "mas", 1, ["finetune", "mas"]


CASES = ["sequence-mas", "sequence-si", "sequence-ebll", "facts-finetune-mas"]


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_equals_the_uninterrupted_one_bitwise(case, tmp_path, tmp_path_factory, monkeypatch):
    if case.startswith("sequence"):
        method = case.split("-")[1]
        options = {"mas": {"lam": 1.0}, "si": {"lam": 0.5}, "ebll": {"code_dim": 4, "ae_epochs": 2}}[method]
        run, final_weights, killed_key, killed_after, keys = _sequence_case(method, options)
    else:
        run, final_weights, killed_key, killed_after, keys = _facts_case(tmp_path_factory)
    reference = run(tmp_path / "whole", resume=False)

    _kill_after_checkpoint(monkeypatch, killed_key, killed_after)
    with pytest.raises(_Killed):
        run(tmp_path / "killed", resume=False)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "killed" / killed_key / CHECKPOINT_NAME)
    assert state["completed_tasks"] == killed_after and state["format"] == loop_module.CHECKPOINT_FORMAT
    finished_before = {key: (tmp_path / "killed" / key / CHECKPOINT_NAME).read_bytes()
                       for key in keys[:keys.index(killed_key)]}

    torch.manual_seed(999)  # the caller's RNG state must not matter
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed == reference  # every accuracy matrix, floats compared with ==
    for key in keys:
        matrix = reference[key]
        assert matrix[-1][0] is not None and matrix[0][-1] is None
        whole, again = final_weights(tmp_path / "whole", key), final_weights(tmp_path / "killed", key)
        assert whole.keys() == again.keys()
        for name in whole:
            assert torch.equal(whole[name], again[name]), f"{key}: {name} differs after resume"
    for key, data in finished_before.items():  # a method finished before the kill is not retrained
        assert (tmp_path / "killed" / key / CHECKPOINT_NAME).read_bytes() == data
    log = (tmp_path / "killed" / killed_key / "log.txt").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith(f"[{killed_key}] task 1/3")  # one line per task, never doubled


def test_the_facts_run_folder_holds_what_the_contract_says(tmp_path_factory, tmp_path):
    """docs/run_folder.md: the top-level files, and results.json in schema version 1."""
    run, _, _, _, keys = _facts_case(tmp_path_factory)
    run(tmp_path / "run", resume=False)
    for name in ("config.yaml", "versions.json", "results.json", "results.md"):
        assert (tmp_path / "run" / name).is_file()
    versions = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["schema_version"] == 1 and results["experiment"] == "facts" and results["complete"] is True
    assert [task["index"] for task in results["tasks"]] == [0, 1, 2]
    for key in keys:
        entry = results["methods"][key]
        R = entry["accuracy_matrix"]
        assert entry["method"] == key and entry["avg_acc"] == pytest.approx(sum(R[-1]) / 3)
        assert entry["forgetting"] == pytest.approx(sum(max(R[l][j] for l in range(j, 2)) - R[2][j] for j in range(2)) / 2)
        assert entry["bwt"] == pytest.approx(sum(R[2][j] - R[j][j] for j in range(2)) / 2)
        assert entry["avg_drop"] == pytest.approx(sum(R[2][j] - R[j][j] for j in range(3)) / 3)
        for name in ("checkpoint.pt", "log.txt", "model.pt", "result.json"):
            assert (tmp_path / "run" / key / name).is_file()


class _Recorder:
    """A regularizer that records what the loop hands it (no penalty)."""

    def __init__(self, after_task_data: str, uses_step_hook: bool) -> None:
        from mas_core.regularizers.base import Regularizer

        class Recording(Regularizer):
            name = "recording"

        Recording.after_task_data = after_task_data
        Recording.uses_step_hook = uses_step_hook
        self.reg = Recording()
        self.steps = 0
        self.batches: list = []
        self.reg.after_step = self._after_step
        self.reg.after_task = self._after_task

    def _after_step(self, model) -> None:
        self.steps += 1

    def _after_task(self, model, data) -> None:
        self.batches.append(list(data))


@pytest.mark.parametrize("after_task_data, uses_step_hook", [("none", False), ("inputs", True), ("labelled", False)])
def test_the_loop_follows_what_the_method_declares(after_task_data, uses_step_hook):
    """after_step only for a method that uses the step hook; after_task gets nothing, the
    importance inputs (the task's importance_data) or labelled training batches, as declared."""
    from torch.utils.data import TensorDataset

    from mas_core.sequence import Task

    tasks = _tasks(2, train_size=64, test_size=20)
    unlabeled = [TensorDataset(task.test.tensors[0]) for task in tasks]
    tasks = [Task(t.name, t.train, t.test, t.num_classes, importance_data=u) for t, u in zip(tasks, unlabeled)]
    recorder = _Recorder(after_task_data, uses_step_hook)
    _run(_make_model, tasks, recorder.reg, SETTINGS, progress=False)
    steps_per_task = SETTINGS.epochs * (64 // SETTINGS.batch_size)
    assert recorder.steps == (2 * steps_per_task if uses_step_hook else 0)
    assert len(recorder.batches) == 2
    for task, batches in enumerate(recorder.batches):
        if after_task_data == "none":
            assert batches == []
        elif after_task_data == "inputs":  # the unlabelled importance data, in order
            inputs = torch.cat([batch[0] for batch in batches])
            assert torch.equal(inputs, unlabeled[task].tensors[0])
        else:  # labelled: the training set with its labels
            assert torch.equal(torch.cat([batch[1] for batch in batches]), tasks[task].train.tensors[1])


def test_divergence_names_the_methods_declared_strength_and_the_learning_rate():
    from mas_core.errors import DivergenceError
    from mas_core.loop import OptimSettings

    tasks = _tasks(2)
    with pytest.raises(DivergenceError, match=r"optim\.lr, now 5\.0\) or the method's strength \(lam_l2=1e\+20\)"):
        _run(_make_model, tasks, "imm", OptimSettings(epochs=2, lr=5.0, batch_size=32), method_options={"lam_l2": 1e20, "penalty_step": "gradient"},
             progress=False)


@pytest.mark.parametrize("n, batch_size, sizes", [(65, 32, [32, 33]), (64, 32, [32, 32]), (66, 32, [32, 32, 2]),
                                                  (33, 32, [33]), (1, 32, [1]), (10, 32, [10])])
def test_a_trailing_batch_of_one_sample_joins_the_batch_before_it(n, batch_size, sizes):
    shares = loop_module.epoch_shares(n, batch_size, seed=0, task=0, epoch=0, info=None)
    assert [len(index) for index, _ in shares] == sizes
    assert sorted(torch.cat([index for index, _ in shares]).tolist()) == list(range(n))  # every sample once
    assert all(scale == 1.0 for _, scale in shares)


def test_a_batchnorm_model_trains_when_a_task_has_one_sample_past_a_full_batch():
    """A task of 2·B + 1 samples: without the fold its last batch holds one sample and BatchNorm
    (train mode) raises "Expected more than 1 value per channel"."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from mas_core import MultiHeadNet, OptimSettings, Task, run_sequence

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2 * 8 + 1, 4, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    task = Task(name="t", train=TensorDataset(inputs, targets), test=TensorDataset(inputs, targets), num_classes=2)

    def make_model() -> MultiHeadNet:
        return MultiHeadNet(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), 6)

    result = run_sequence(make_model, [task], "finetune", OptimSettings(epochs=2, lr=0.1, batch_size=8), seed=0)
    assert len(result.accuracy) == 1 and 0.0 <= result.accuracy[0][0] <= 1.0
