"""The run comforts (issue 25, part 5): the loop's hooks (mas_core), RUN/metrics.csv, TensorBoard and
a Ctrl-C that stops safely (triplets.run_log), for `mas-triplets train` and `mas-triplets recognition`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from mas_core.errors import TrainingInterrupted
from mas_core.experiment import EpochRecord, LoopHooks, TaskRecord
from mas_core.sequence import MultiHeadNet, Task, run_sequence
from mas_core.loop import OptimSettings
from triplets.cli import main
from triplets.recognition.run import comparable
from triplets.run_log import COLUMNS, METRICS_NAME, MetricsLog, read_metrics, resume_command

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _tasks(count: int = 3, samples: int = 40) -> list[Task]:
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for index in range(count):
        inputs = torch.randn(samples, 6, generator=generator)
        targets = (inputs[:, index] > 0).long()
        tasks.append(Task(name=f"t{index}", train=TensorDataset(inputs, targets),
                          test=TensorDataset(inputs[:20], targets[:20]), num_classes=2))
    return tasks


def _model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), 8)


class Recorder(LoopHooks):
    """Records every event; asks to stop after ``stop_after`` steps (``None``: never)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple] = []
        self.asked, self.stop_after = 0, stop_after

    def run_started(self, method, completed_tasks, num_tasks):
        self.events.append(("start", method, completed_tasks, num_tasks))

    def epoch_ended(self, record):
        self.events.append(("epoch", record))

    def task_ended(self, record):
        self.events.append(("task", record))

    def stop_requested(self):
        self.asked += 1
        return self.stop_after is not None and self.asked > self.stop_after


SETTINGS = OptimSettings(epochs=2, lr=0.1, batch_size=10)


def test_hooks_see_every_epoch_and_task_and_change_no_number() -> None:
    plain = run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0}, progress=False)
    hooks = Recorder()
    hooked = run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0}, progress=False, hooks=hooks)
    assert hooked.accuracy == plain.accuracy
    assert all(torch.equal(a, b) for a, b in zip(hooked.model.state_dict().values(), plain.model.state_dict().values()))
    assert hooks.events[0] == ("start", "mas", 0, 3)
    epochs = [event[1] for event in hooks.events if event[0] == "epoch"]
    assert [(r.task, r.epoch) for r in epochs] == [(t, e) for t in range(3) for e in range(2)]
    assert all(isinstance(r, EpochRecord) and r.loss > 0 and r.seconds >= 0 and r.attempt == 0 for r in epochs)
    # the gradient-form penalty is 0 on task 1 (nothing anchored yet) and positive afterwards
    mas_gradient = Recorder()
    run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0, "penalty_step": "gradient"},
                 progress=False, hooks=mas_gradient)
    penalties = [event[1].penalty for event in mas_gradient.events if event[0] == "epoch"]
    assert penalties[:2] == [0.0, 0.0] and all(value > 0 for value in penalties[2:])
    tasks = [event[1] for event in hooks.events if event[0] == "task"]
    assert [r.row for r in tasks] == plain.accuracy and all(isinstance(r, TaskRecord) for r in tasks)
    assert tasks[0].metric == "accuracy" and tasks[0].merged_row is None


def test_a_stop_mid_task_keeps_the_last_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    reference = run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0}, progress=False)
    stopper = Recorder(stop_after=1 + 8 + 1 + 1)  # asked before each task and after each step: stop at task 2's 2nd step
    with pytest.raises(TrainingInterrupted) as caught:
        run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0}, progress=False,
                     checkpoint_dir=tmp_path, hooks=stopper)
    stop = caught.value
    assert stop.completed_tasks == 1 and stop.task == 1 and stop.checkpoint == str(tmp_path / "checkpoint.pt")
    assert "during task 2/3" in str(stop) and "holds tasks 1..1" in str(stop)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["completed_tasks"] == 1
    resumed_hooks = Recorder()
    resumed = run_sequence(_model, _tasks(), "mas", SETTINGS, method_options={"lam": 1.0}, progress=False,
                           checkpoint_dir=tmp_path, resume=True, hooks=resumed_hooks)
    assert resumed_hooks.events[0] == ("start", "mas", 1, 3)
    assert resumed.accuracy == reference.accuracy
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  reference.model.state_dict().values()))


def test_a_stop_before_any_task_saves_nothing_and_says_so(tmp_path) -> None:
    with pytest.raises(TrainingInterrupted, match="before its first task; no task was finished, nothing is saved"):
        run_sequence(_model, _tasks(), "finetune", SETTINGS, progress=False, checkpoint_dir=tmp_path,
                     hooks=Recorder(stop_after=0))
    assert not (tmp_path / "checkpoint.pt").exists()


def _epoch(method: str, task: int, epoch: int, loss: float = 1.5) -> EpochRecord:
    return EpochRecord(method=method, task=task, task_name=f"t{task}", attempt=0, epoch=epoch, epochs=2, loss=loss,
                       penalty=0.25, seconds=0.1)


def test_metrics_csv_rows_and_resume_without_duplicates(tmp_path) -> None:
    log = MetricsLog(tmp_path)
    log.run_started("finetune", 0, 2)
    for task in range(2):
        for epoch in range(2):
            log.epoch_ended(_epoch("finetune", task, epoch, loss=0.1 + task + epoch / 3))
        log.task_ended(TaskRecord(method="finetune", task=task, task_name=f"t{task}", metric="accuracy",
                                  row=[0.5, 0.75][:task + 1] + [None] * (1 - task), merged_row=None, seconds=1.0))
    log.run_started("imm", 0, 2)
    log.epoch_ended(_epoch("imm", 0, 0))
    log.epoch_ended(_epoch("imm", 0, 1))
    log.task_ended(TaskRecord(method="imm", task=0, task_name="t0", metric="accuracy", row=[0.5, None],
                              merged_row=[0.625, None], seconds=1.0))
    log.epoch_ended(_epoch("imm", 1, 0))  # task 2 interrupted after one epoch ...
    with open(tmp_path / METRICS_NAME, "a") as handle:
        handle.write("imm,2,t1,0,2,0.")  # ... and a row cut by a crash mid-write
    rows = read_metrics(tmp_path / METRICS_NAME)
    assert list(rows[0]) == COLUMNS and len(rows) == 4 + 1 + 2 + 1 + 2 + 1 + 1  # the cut line is no row
    assert rows[0]["loss"] == repr(0.1) and rows[0]["task"] == "1" and rows[0]["epoch"] == "1"
    assert [(r["evaluated_task"], r["value"]) for r in rows if r["task"] == "2" and r["metric"]] == [("1", "0.5"),
                                                                                                   ("2", "0.75")]
    assert [r["metric"] for r in rows if r["method"] == "imm" and r["metric"]] == ["accuracy", "accuracy (merged)"]
    MetricsLog(tmp_path).run_started("imm", 1, 2)  # resumed from imm's checkpoint after task 1
    after = read_metrics(tmp_path / METRICS_NAME)
    assert after == [r for r in rows if not (r["method"] == "imm" and r["task"] == "2")]
    assert (tmp_path / METRICS_NAME).read_text().endswith("\n")


class FakeWriter:
    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_through_the_writer(tmp_path) -> None:
    FakeWriter.instances = []
    log = MetricsLog(tmp_path, writer_class=FakeWriter)
    result = run_sequence(_model, _tasks(2), "mas", SETTINGS, progress=False, hooks=log)
    log.close()
    (writer,) = FakeWriter.instances
    assert writer.log_dir == str(tmp_path / "tensorboard" / "mas") and writer.closed
    tags = [tag for tag, _, _ in writer.scalars]
    assert tags.count("task1/loss") == 2 and tags.count("task2/penalty") == 2
    assert ("accuracy/task1", result.accuracy[1][0], 2) in writer.scalars
    assert ("accuracy/average", pytest.approx(sum(result.accuracy[1]) / 2), 2) in writer.scalars


def test_log_tensorboard_without_the_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "tasks": [{"name": "a", "dataset": "fashion_mnist"}]}))
    code = main(["recognition", "--config", str(config), "--out", str(tmp_path / "run"), "--log", "tensorboard"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "mas-triplets[tensorboard]" in err and "--log tensorboard" in err
    assert not (tmp_path / "run").exists()


def test_the_resume_command_adds_resume_once() -> None:
    assert resume_command("mas-triplets train --config 'a b.yaml' --out r") == \
        "mas-triplets train --config 'a b.yaml' --out r --resume"
    assert resume_command("mas-triplets train --out r --resume") == "mas-triplets train --out r --resume"


# ------------------------------------------------------------------ a real Ctrl-C, then --resume

def _fact_config(tmp_path: Path) -> Path:
    from tests.test_train import make_tiny_fact_file

    facts = make_tiny_fact_file(tmp_path / "facts.h5", num_tasks=3, facts_per_task=6, train_per_fact=4,
                                test_per_fact=2)
    config = {"data": {"fact_file": str(facts)},
              "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32},
              "optim": {"epochs": 20, "batch_size": 16},
              "methods": [{"name": "finetune"}, {"name": "mas", "options": {"lam": 1.0}}],
              "eval": {"index": "none"}, "num_threads": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


@pytest.mark.slow
def test_ctrl_c_mid_task_exits_130_and_resume_equals_an_uninterrupted_run(tmp_path, capsys) -> None:
    """SIGINT, sent to `mas-triplets train` once MAS's second task has logged an epoch: exit 130, the
    printed --resume command finishes the run, and results.json and metrics.csv (wall times aside)
    equal an uninterrupted run's."""
    config = _fact_config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "triplets.cli", "train", "--config", str(config), "--no-progress"]
    assert main(["train", "--config", str(config), "--no-progress", "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "stopped"
    process = subprocess.Popen(command + ["--out", str(out)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if any(row["method"] == "mas" and row["task"] == "2" and row["epoch"] for row in read_metrics(out / METRICS_NAME)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "[mas] interrupted during task 2/3" in err and f"{out / 'mas' / 'checkpoint.pt'} holds tasks 1..1" in err
    resume_line = next(line for line in err.splitlines() if line.startswith("continue with: "))
    words = resume_line.removeprefix("continue with: ").split()
    assert words[:2] == ["mas-triplets", "train"] and words[-1] == "--resume"
    assert (out / "finetune" / "result.json").is_file()
    partial = json.loads((out / "results.json").read_text())  # rewritten after every finished method
    assert partial["complete"] is False and list(partial["methods"]) == ["finetune"]
    assert main(words[1:]) == 0  # the printed command, as a user would paste it (in this process)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((out / "results.json").read_text())
    for document in (whole, again):
        document.pop("sha256")  # covers the wall times
        document.pop("name")  # the run folder's name
    assert comparable(again) == comparable(whole)
    reference_rows = _without_seconds(read_metrics(tmp_path / "whole" / METRICS_NAME))
    assert _without_seconds(read_metrics(out / METRICS_NAME)) == reference_rows
    assert len(reference_rows) == 2 * 3 * 20 + 2 * (1 + 2 + 3)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian dataset-fashion-mnist not installed (make test-data)")
def test_recognition_writes_the_same_metrics_log(tmp_path, capsys) -> None:
    """`mas-triplets recognition` goes through the same comforts: rows per epoch and per evaluation,
    IMM's merged rows, none for ridge (no epochs)."""
    config = {"name": "r", "seed": 0, "data_dir": str(tmp_path / "data"),
              "tasks": [{"name": "a", "dataset": "fashion_mnist", "classes": [0, 2], "max_train_per_class": 20,
                         "max_test_per_class": 10},
                        {"name": "b", "dataset": "fashion_mnist", "classes": [1, 3], "max_train_per_class": 20,
                         "max_test_per_class": 10}],
              "model": {"arch": "small_cnn", "input_size": 28, "channels": 1, "width": 4, "feature_dim": 16},
              "train": {"epochs": 2, "lr": 0.05, "momentum": 0.9, "batch_size": 16},
              "methods": ["finetune", "imm", "ridge"]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["recognition", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rows = read_metrics(tmp_path / "run" / METRICS_NAME)
    epochs = [(r["method"], r["task"], r["epoch"]) for r in rows if r["epoch"]]
    assert epochs == [(m, t, e) for m in ("finetune", "imm") for t in "12" for e in "12"]
    evaluations = [(r["method"], r["task"], r["evaluated_task"], r["metric"]) for r in rows if r["metric"]]
    assert ("finetune", "2", "2", "accuracy") in evaluations and ("imm", "2", "1", "accuracy (merged)") in evaluations
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    final = {(r["method"], r["evaluated_task"]): float(r["value"]) for r in rows if r["task"] == "2" and r["metric"] == "accuracy"}
    assert final[("finetune", "1")] == results["methods"]["finetune"]["accuracy_matrix"][1][0]
    assert not any(r["method"] == "ridge" for r in rows)
