"""The per-task hyperparameter search (mas_core.hparam_search): the learning rate is the argmax of
the validation accuracy over the grid, the decay stops at the first strength within tolerance, the
search is deterministic and leaves the real training's random streams alone, it never reads old
tasks' data or the test sets, resume keeps its records, and both commands record what it chose."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import mas_core.loop as loop_module
from mas_core.experiment import LoopHooks
from mas_core.errors import InvalidArgumentError, MASCoreError
from mas_core.hparam_search import (
    SearchSettings,
    best_learning_rate,
    chance_level,
    describe_choice,
    search_bracket,
    split_positions,
    stability_decay,
)
from mas_core.loop import train_tasks
from mas_core.regularizers import MAS, Finetune, Regularizer, make_regularizer
from mas_core.sequence import ClassificationExperiment, run_sequence
from triplets.cli import main
from triplets.errors import ConfigError
from triplets.recognition.config import load_recognition_config
from triplets.facts.train import train_run
from triplets.facts.train_config import MethodConfig

from test_sequence import SETTINGS, _make_model, _tasks
from test_recognition import tiny_digits_config
from test_train import _config, make_tiny_fact_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SEED = 7
GRID = [0.1, 0.02, 0.002]
GRADIENT = {"penalty_step": "gradient"}  # the penalty's form that can diverge (the default, proximal, cannot)


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


class _Gate(Regularizer):
    """A method whose strength decides everything: with ``lam > 1`` it zeroes the active head after
    every step (the model cannot learn the new task: it predicts class 0), with ``lam ≤ 1`` it does
    nothing (plain fine-tuning). So the answer of the decay is known: the first value ≤ 1."""

    name = "gate"
    uses_optimizer_step_hook = True

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = lam

    def after_optimizer_step(self, model: nn.Module, optimizer) -> None:
        if self.lam > 1.0:
            with torch.no_grad():
                for parameter in model.heads[model.active_head].parameters():
                    parameter.zero_()


# ------------------------------------------------------------------ the two phases, as pure functions

def test_the_learning_rate_is_the_first_argmax_and_a_diverged_run_never_wins() -> None:
    assert best_learning_rate([0.5, 0.9, 0.7]) == 1
    assert best_learning_rate([0.9, 0.9, 0.7]) == 0  # ties: the first of the grid
    assert best_learning_rate([None, 0.1, None]) == 1
    assert best_learning_rate([None, None]) == -1


def test_the_decay_stops_at_the_first_value_within_tolerance() -> None:
    accuracy = {8.0: 0.30, 4.0: 0.60, 2.0: 0.85, 1.0: 0.95, 0.5: 0.99}
    asked: list[float] = []

    def score(value: float) -> float:
        asked.append(value)
        return accuracy[value]

    tries, chosen = stability_decay(score, 8.0, 0.5, 0.2, 1.0, max_tries=5)  # threshold 0.8
    assert asked == [8.0, 4.0, 2.0] and tries == [(8.0, 0.30), (4.0, 0.60), (2.0, 0.85)] and chosen == 2
    tries, chosen = stability_decay(lambda value: None if value > 3 else 0.5, 8.0, 0.5, 0.2, 1.0, max_tries=4)
    assert [v for v, _ in tries] == [8.0, 4.0, 2.0, 1.0] and chosen == 3  # none within: the last (smallest)
    assert tries[0][1] is None


def test_a_start_that_passes_is_grown_until_the_first_rejection() -> None:
    """The start passes: λ is doubled (decay 0.5) until the first value that fails, and the last that
    passed is chosen; every try counts against max_tries; a diverged try is a rejection."""
    accuracy = {1.0: 0.95, 2.0: 0.9, 4.0: 0.85, 8.0: 0.7, 16.0: 0.2}
    asked: list[float] = []

    def score(value: float) -> float:
        asked.append(value)
        return accuracy[value]

    tries, chosen = stability_decay(score, 1.0, 0.5, 0.2, 1.0, max_tries=6)  # threshold 0.8
    assert asked == [1.0, 2.0, 4.0, 8.0] and chosen == 2 and tries[chosen] == (4.0, 0.85)
    tries, chosen = stability_decay(lambda value: 0.9, 1.0, 0.5, 0.2, 1.0, max_tries=3)  # never rejected
    assert [v for v, _ in tries] == [1.0, 2.0, 4.0] and chosen == 2
    tries, chosen = stability_decay(lambda value: None if value > 3 else 0.9, 1.0, 0.25, 0.2, 1.0, max_tries=5)
    assert [v for v, _ in tries] == [1.0, 4.0] and chosen == 0  # 4 diverged: 1 is the limit found (grown ×1/decay)
    tries, chosen = stability_decay(lambda value: 0.9, 1.0, 0.5, 0.2, 1.0, max_tries=1)
    assert tries == [(1.0, 0.9)] and chosen == 0  # max_tries 1: no room to grow


def test_the_bracket_names_the_limit_and_no_choice_says_start() -> None:
    """The record's bracket (the strongest value accepted, the weakest rejected above it) is what the
    reports print beside the choice; "(start)" is gone."""
    grown = {"task": 1, "lr": 0.05, "strength_name": "lam", "strength": {"lam": 4.0}, "threshold": 0.6,
             "tries": [{"value": 1.0, "val_acc": 0.7}, {"value": 2.0, "val_acc": 0.7}, {"value": 4.0, "val_acc": 0.65},
                       {"value": 8.0, "val_acc": 0.5}], "backoff": []}
    assert search_bracket(grown) == {"accepted": 4.0, "rejected": 8.0}
    assert describe_choice(grown) == "lr 0.05, lam=4 (8 rejected)"
    decayed = dict(grown, strength={"lam": 2.0}, tries=[{"value": 8.0, "val_acc": 0.5}, {"value": 4.0, "val_acc": None},
                                                        {"value": 2.0, "val_acc": 0.7}])
    assert search_bracket(decayed) == {"accepted": 2.0, "rejected": 4.0}
    assert describe_choice(decayed) == "lr 0.05, lam=2 (4 rejected)"
    saturated = dict(grown, tries=[{"value": v, "val_acc": 0.7} for v in (1.0, 2.0, 4.0)])
    assert describe_choice(saturated) == "lr 0.05, lam=4 (none rejected up to 4)"
    failed = dict(grown, strength={"lam": 0.5}, tries=[{"value": 1.0, "val_acc": 0.5}, {"value": 0.5, "val_acc": 0.5}])
    assert search_bracket(failed) == {"accepted": None, "rejected": 0.5} and describe_choice(failed).endswith("(none accepted)")
    backed_off = dict(grown, strength={"lam": 2.0}, backoff=[{"strength": {"lam": 4.0}, "error": "diverged"}])
    assert describe_choice(backed_off) == "lr 0.05, lam=2 (backed off)"
    stored = dict(grown, bracket={"accepted": 4.0, "rejected": 8.0}, tries=grown["tries"][:1])
    assert search_bracket(stored) == {"accepted": 4.0, "rejected": 8.0}  # the record's own bracket wins
    for record in (grown, decayed, saturated, failed, backed_off):
        assert "(start)" not in describe_choice(record)
    assert search_bracket({"task": 0, "tries": [], "threshold": None}) is None


def test_a_grown_strength_backs_off_down_to_the_floor_of_the_start() -> None:
    """A value the search grew to has that many more decay steps before the floor start·decay^(max_tries−1)."""
    settings = SearchSettings(enabled=True, start=1.0, decay=0.5, max_tries=3)
    record = {"strength_name": "lam", "strength": {"lam": 4.0}, "backoff": [], "reason": "",
              "tries": [{"value": 1.0}, {"value": 2.0}, {"value": 4.0}]}
    values = []
    while (strength := settings.back_off(record, "diverged")) is not None:
        values.append(strength["lam"])
    assert values == [2.0, 1.0, 0.5, 0.25] and record["strength"] == {"lam": 0.25}  # floor 1·0.5² = 0.25


def test_the_split_holds_out_a_fixed_share_of_the_task_only() -> None:
    train, val = split_positions(100, 0.2, SEED, 3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = split_positions(100, 0.2, SEED, 3)
    assert torch.equal(again[1], val) and not torch.equal(split_positions(100, 0.2, SEED, 4)[1], val)


def test_set_strength_sets_lambda_and_refreshes_what_the_penalty_caches() -> None:
    model = nn.Linear(3, 2)
    mas = MAS(lam=1.0)
    mas.after_task(model, [torch.randn(8, 3)])
    with torch.no_grad():
        model.weight.add_(0.5)
    before = float(mas.penalty(model).detach())
    mas.set_strength(lam=2.5)
    assert mas.strength == {"lam": 2.5} and float(mas.penalty(model).detach()) == pytest.approx(2.5 * before, rel=1e-6)
    imm = make_regularizer("imm")
    imm.set_strength(lam_l2=0.25)
    assert imm.strength == {"lam_l2": 0.25}
    for name in ("lmas", "ewc", "si", "lwf", "ebll"):
        reg = make_regularizer(name)
        reg.set_strength(lam=0.125)
        assert reg.strength == {"lam": 0.125}
    with pytest.raises(InvalidArgumentError, match="did you mean 'lam_l2'"):
        imm.set_strength(lam_l3=1.0)
    with pytest.raises(InvalidArgumentError, match="finite number >= 0"):
        mas.set_strength(lam=-1.0)
    with pytest.raises(InvalidArgumentError, match="has: none"):
        Finetune().set_strength(lam=1.0)


# ------------------------------------------------------------------ the search on the task loop

def test_the_search_picks_the_argmax_lr_and_the_known_strength() -> None:
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=8.0, decay=0.5, max_tries=6, epochs=2)
    result = run_sequence(_make_model, _tasks(), _Gate(lam=1.0), SETTINGS, seed=SEED, search=settings, progress=False)
    records = result.hparam_search
    assert [record["task"] for record in records] == [0, 1, 2]
    for record in records:
        scores = [entry["val_acc"] for entry in record["lr_grid"]]
        assert [entry["lr"] for entry in record["lr_grid"]] == GRID
        assert record["lr"] == GRID[scores.index(max(scores))] and record["reference_acc"] == max(scores)
        assert record["train_samples"] == 128 and record["val_samples"] == 32 and record["epochs"] == 2
    assert records[0]["tries"] == [] and records[0]["strength"] == {"lam": 1.0}
    assert "first task" in records[0]["reason"]
    for record in records[1:]:
        assert [t["value"] for t in record["tries"]] == [8.0, 4.0, 2.0, 1.0]  # gated above 1, free at 1
        assert record["strength"] == {"lam": 1.0} and record["threshold"] == pytest.approx(0.8 * record["reference_acc"])
        assert all(t["val_acc"] < record["threshold"] for t in record["tries"][:-1])
        assert record["tries"][-1]["val_acc"] == record["reference_acc"]  # at λ=1 the gate is fine-tuning
        assert "lam=1: val acc" in record["reason"] and "the strongest accepted of 4 tried from 8" in record["reason"]
        assert record["bracket"] == {"accepted": 1.0, "rejected": 2.0}
    assert result.summary()["hparam_search"] == records
    assert describe_choice(records[0]) == f"lr {records[0]['lr']:g}"  # task 1: λ was not searched
    assert describe_choice(records[1]) == f"lr {records[1]['lr']:g}, lam=1 (2 rejected)"


def test_the_search_grows_a_start_that_passes_to_the_known_limit() -> None:
    """With the gate (free at λ ≤ 1, blocking above) and a start of 0.25, the search doubles 0.25 → 0.5
    → 1 → 2, rejects 2 and keeps 1, the limit; the record holds the bracket [1, 2)."""
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=0.25, decay=0.5, max_tries=6, epochs=2)
    result = run_sequence(_make_model, _tasks(), _Gate(lam=1.0), SETTINGS, seed=SEED, search=settings, progress=False)
    for record in result.hparam_search[1:]:
        assert [t["value"] for t in record["tries"]] == [0.25, 0.5, 1.0, 2.0]
        assert record["strength"] == {"lam": 1.0} and record["bracket"] == {"accepted": 1.0, "rejected": 2.0}
        assert record["tries"][-1]["val_acc"] < record["threshold"] <= record["tries"][-2]["val_acc"]
        assert "lam=2 above it was rejected" in record["reason"]
        assert describe_choice(record) == f"lr {record['lr']:g}, lam=1 (2 rejected)"
    assert result.hparam_search[0]["bracket"] is None  # task 1: λ not searched


def test_the_search_is_deterministic_and_leaves_the_real_training_alone() -> None:
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=4.0, max_tries=3, epochs=1)
    first = run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, search=settings, progress=False)
    torch.manual_seed(12345)  # the caller's random state must not matter
    second = run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, search=settings, progress=False)
    assert _without_seconds(first.hparam_search) == _without_seconds(second.hparam_search)
    assert first.accuracy == second.accuracy


@pytest.mark.parametrize("method, options", [("finetune", {}), ("mas", {"lam": 1.0}), ("ewc", {"lam": 2.0}),
                                             ("si", {"lam": 0.5}), ("lwf", {"lam": 1.0}), ("imm", {"lam_l2": 0.01}),
                                             ("ebll", {"lam": 1.0, "code_dim": 4, "ae_epochs": 2})])
def test_a_search_that_picks_the_configured_values_changes_nothing(method: str, options: dict) -> None:
    """One lr in the grid and one try at the configured λ: the run equals the run without a search,
    bit for bit (the copies never touch the real model or method; the RNG draws are restored)."""
    strength = {key: value for key, value in options.items() if key in ("lam", "lam_l2")}
    only = SearchSettings(enabled=True, lr_grid=[SETTINGS.lr], start=next(iter(strength.values()), 1.0),
                          max_tries=1, epochs=1)
    searched = run_sequence(_make_model, _tasks(), method, SETTINGS, seed=SEED, method_options=options, search=only,
                            progress=False)
    plain = run_sequence(_make_model, _tasks(), method, SETTINGS, seed=SEED, method_options=options, progress=False)
    assert [record["strength"] for record in searched.hparam_search] == [strength] * 3
    assert searched.accuracy == plain.accuracy and plain.hparam_search is None
    assert all(torch.equal(a, b) for a, b in zip(searched.model.state_dict().values(), plain.model.state_dict().values()))


class _Guarded(ClassificationExperiment):
    """Raises when the search reads anything but the current task's training samples; records the
    positions it trains on and the ones it validates on."""

    searching: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained_on: dict[int, set[int]] = {}
        self.validated_on: dict[int, set[int]] = {}

    def _refuse(self, what: str) -> None:
        if self.searching is not None:
            raise AssertionError(f"the search of task {self.searching} read {what}")

    def train_data(self, tasks):
        if self.searching is not None and list(tasks) != [self.searching]:
            self._refuse(f"the training data of tasks {list(tasks)}")
        data, experiment, task = super().train_data(tasks), self, self.searching

        class Watched:
            def __len__(self) -> int:
                return len(data)

            def batches(self, index_batches):
                if task is not None:
                    experiment.trained_on.setdefault(task, set()).update(int(i) for b in index_batches for i in b)
                return data.batches(index_batches)

        return Watched()

    def importance_data(self, model, task, kind):
        self._refuse("importance data")
        return super().importance_data(model, task, kind)

    def evaluate(self, model, task):
        self._refuse("a test set")
        return super().evaluate(model, task)

    def validation_score(self, module, task, positions):
        if task != self.searching:
            self._refuse(f"task {task}'s samples")
        self.validated_on.setdefault(task, set()).update(positions.tolist())
        return super().validation_score(module, task, positions)


class _Watching(SearchSettings):
    def choose(self, experiment, *args, task, **kwargs):
        experiment.searching = task
        try:
            return super().choose(experiment, *args, task=task, **kwargs)
        finally:
            experiment.searching = None


@pytest.mark.parametrize("method", ["mas", "lwf", "ewc"])
def test_the_search_never_reads_old_tasks_or_test_data(method: str) -> None:
    tasks = _tasks()
    experiment = _Guarded(_make_model, tasks, importance_batch_size=32)
    settings = _Watching(enabled=True, lr_grid=[0.05, 0.01], start=2.0, max_tries=2, epochs=1)
    result = train_tasks(experiment, method, SETTINGS, seed=SEED, search=settings)
    assert len(result.hparam_search) == 3 and result.accuracy[-1][0] is not None
    for task in range(3):  # trained on S_t, validated on V_t: disjoint, together the task's training set
        assert experiment.trained_on[task].isdisjoint(experiment.validated_on[task])
        assert experiment.trained_on[task] | experiment.validated_on[task] == set(range(len(tasks[task].train)))


def test_a_resumed_search_run_equals_the_uninterrupted_one(tmp_path, monkeypatch) -> None:
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=4.0, max_tries=3, epochs=1)

    def run(folder: Path, resume: bool):
        return run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, search=settings,
                            checkpoint_dir=folder, resume=resume, progress=False)

    whole = run(tmp_path / "whole", False)
    real_save = loop_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["completed_tasks"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", False)
    monkeypatch.undo()
    resumed = run(tmp_path / "killed", True)
    assert resumed.trained_tasks == 1 and resumed.accuracy == whole.accuracy
    assert _without_seconds(resumed.hparam_search) == _without_seconds(whole.hparam_search)
    with pytest.raises(MASCoreError, match="search"):  # another search's checkpoint is refused
        run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, checkpoint_dir=tmp_path / "whole",
                     resume=True, progress=False,
                     search=SearchSettings(enabled=True, lr_grid=[0.1], start=4.0, max_tries=3, epochs=1))


def test_an_experiment_without_validation_score_is_told_what_to_add() -> None:
    class Plain(ClassificationExperiment):
        validation_score = None

    with pytest.raises(MASCoreError, match="validation_score"):
        train_tasks(Plain(_make_model, _tasks(1), importance_batch_size=32), "finetune", SETTINGS,
                    search=SearchSettings(enabled=True))


# ------------------------------------------------------------------ the config section and the commands

def _recognition_yaml(root: Path, search: dict) -> Path:
    return tiny_digits_config(root, ["finetune", "mas", "mas@test"], {"mas": {"max_samples": 20}}, search=search,
                              name="search")


def test_the_recognition_command_records_and_prints_the_choices(tmp_path, capsys) -> None:
    config = _recognition_yaml(tmp_path, {"enabled": True, "lr_grid": [0.03, 0.01],
                                          "start": {"mas": 4.0, "mas@test": 2.0}, "max_tries": 3, "epochs": 1})
    assert main(["recognition", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["search"]["enabled"] is True
    for method in ("finetune", "mas", "mas@test"):
        records = results["methods"][method]["hparam_search"]
        assert [r["task"] for r in records] == [0, 1] and all(r["lr"] in (0.03, 0.01) for r in records)
        assert all(r["train_samples"] == 24 and r["val_samples"] == 6 for r in records)
    mas = results["methods"]["mas"]["hparam_search"][1]
    assert mas["strength"]["lam"] in [t["value"] for t in mas["tries"]] and mas["reason"]
    assert [t["value"] for t in mas["tries"]][0] == 4.0
    assert results["methods"]["mas@test"]["hparam_search"][1]["tries"][0]["value"] == 2.0  # its own start
    cell = f"lr {mas['lr']:g}, lam={mas['strength']['lam']:g}"
    assert "Hyperparameters chosen per task" in printed and f"| mas | " in printed and cell in printed
    assert cell in (tmp_path / "run" / "results.md").read_text()


def test_the_search_section_is_validated(tmp_path) -> None:
    good = {"enabled": True, "start": {"mas": 4.0}}
    assert load_recognition_config(_recognition_yaml(tmp_path, good)).search.start == {"mas": 4.0}
    for bad, message in (({"enabled": True, "start": {"mass": 4.0, "default": 1.0}}, "did you mean 'mas'"),
                         ({"enabled": True, "decay": 1.5, "start": 1.0}, "search.decay"),
                         ({"enabled": True, "lr_grid": [], "start": 1.0}, "search.lr_grid"),
                         ({"enabled": True, "val_fraction": 1.0, "start": 1.0}, "search.val_fraction"),
                         ({"enabled": True, "tolerence": 0.1}, "did you mean 'tolerance'")):
        with pytest.raises(ConfigError, match=message):
            load_recognition_config(_recognition_yaml(tmp_path, bad))
    with pytest.raises(ConfigError, match="no value for method 'mas'"):
        load_recognition_config(_recognition_yaml(tmp_path, {"enabled": True, "start": {"finetune": 1.0}}))


def test_the_search_config_extends_the_offline_one() -> None:
    config = load_recognition_config(Path(__file__).resolve().parents[1] / "configs" / "recognition_offline_search.yaml")
    base = load_recognition_config(Path(__file__).resolve().parents[1] / "configs" / "recognition_offline.yaml")
    assert config.search.enabled and not base.search.enabled
    assert config.tasks == base.tasks and config.methods == base.methods and config.train == base.train
    for method in config.methods:  # every method with a strength has its start
        if method.name != "joint" and make_regularizer(method.name).strength:
            assert config.search.start_for(method.name, method.key) > 0


@pytest.mark.parametrize("method", ["mas", "ewc"])  # EWC holds the experiment's importance_loss (an open HDF5 file)
def test_the_train_command_records_the_choices(tmp_path, method: str) -> None:
    facts = make_tiny_fact_file(tmp_path / "facts.h5", num_tasks=2, facts_per_task=6, train_per_fact=5,
                                test_per_fact=2)
    config = _config(facts, methods=[MethodConfig(method, {"lam": 1.0})], epochs=1)
    config.search = SearchSettings(enabled=True, lr_grid=[0.05, 0.01], start=2.0, max_tries=2, epochs=1)
    results = train_run(config, tmp_path / "run", progress=False)
    records = results["methods"][method]["hparam_search"]
    assert [r["task"] for r in records] == [0, 1] and records[1]["val_samples"] == 6
    assert records[1]["strength"]["lam"] in (4.0, 2.0, 1.0) and 0.0 <= records[1]["reference_acc"] <= 1.0  # grown, kept or decayed
    assert "Hyperparameters chosen per task" in (tmp_path / "run" / "results.md").read_text()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["search"]["enabled"] is True


def test_a_divergence_after_the_search_names_what_the_search_chose(monkeypatch) -> None:
    """The real training of a task diverges with the values the search chose (it trained on 80 %
    of the task, in another order): the error says so and points at the search's settings."""
    from mas_core.errors import DivergenceError

    original = loop_module.train_task_epochs

    def diverging_outside_the_search(experiment, trained, model, data, task, reg, settings):
        if settings.seed == SEED and task == 1:   # the loop's own training of task 2; the search uses derived seeds
            raise DivergenceError(f"training diverged at task {task + 1}: the loss is nan; lower the learning "
                                  f"rate (optim.lr, now {settings.optim.lr})")
        return original(experiment, trained, model, data, task, reg, settings)

    monkeypatch.setattr(loop_module, "train_task_epochs", diverging_outside_the_search)
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=4.0, max_tries=2, epochs=1)
    with pytest.raises(DivergenceError, match=r"chosen by the hyperparameter search.*lr=0\.\d+.*lam.*search\.start"):
        run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, search=settings, progress=False)
    with pytest.raises(DivergenceError) as plain:  # without a search the message is the loop's own
        run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, progress=False)
    assert "search" not in str(plain.value)


# ------------------------------------------------------------------ back-off when the real run diverges

@dataclasses.dataclass
class _Forced(SearchSettings):
    """The search, except that the strength of the tasks in ``forced`` is replaced by the given value,
    as if the stability phase had accepted it as its start on the validation split."""

    forced: dict = dataclasses.field(default_factory=dict)

    def choose(self, *args, task, **kwargs):
        record = super().choose(*args, task=task, **kwargs)
        if task in self.forced:
            value = self.forced[task]
            record.update(strength={record["strength_name"]: value},
                          tries=[{"value": value, "val_acc": record["reference_acc"]}])
        return record


@pytest.mark.parametrize("method, diverging", [("mas", 3), ("si", 2)])
def test_a_searched_strength_that_diverges_is_backed_off_and_equals_the_direct_run(method: str, diverging: int,
                                                                                    tmp_path) -> None:
    """λ = 1e6 diverges in the real training of task 2 (MAS also at 1e4, and collapses at a finite loss at
    1e2, caught since issue 23; SI collapses at 1e4); the task is restored
    and retrained at λ·decay^k, and the run equals one given that λ directly (bit for bit: the restore
    of the model, the method and the random state is exact). The gradient form: the proximal default
    cannot diverge."""
    big, decay = 1e6, 0.01
    settings = dict(enabled=True, lr_grid=[SETTINGS.lr], start=1.0, decay=decay, max_tries=4, epochs=1)
    lines: list[str] = []
    epochs: list = []

    class Epochs(LoopHooks):
        def epoch_ended(self, record):
            epochs.append(record)

    backed = train_tasks(ClassificationExperiment(_make_model, _tasks(), importance_batch_size=32), method, SETTINGS,
                         seed=SEED, search=_Forced(**settings, forced={1: big}), log=lines.append, method_options=GRADIENT,
                         checkpoint_dir=tmp_path, hooks=Epochs())
    # the epoch records say which attempt they belong to (a diverged attempt may end before its first epoch)
    attempts = [record.attempt for record in epochs if record.task == 1]
    assert attempts == sorted(attempts) and attempts[-SETTINGS.epochs:] == [diverging] * SETTINGS.epochs
    assert {record.attempt for record in epochs if record.task != 1} == {0}
    final = big
    for _ in range(diverging):
        final *= decay
    record = backed.hparam_search[1]
    assert [entry["strength"] for entry in record["backoff"]] == [{"lam": big * decay ** k} for k in range(diverging)]
    assert all("diverged" in entry["error"] for entry in record["backoff"])
    assert record["strength"] == {"lam": final} and f"retrained with lam={final:g}" in record["reason"]
    assert backed.hparam_search[0]["backoff"] == [] and backed.hparam_search[2]["backoff"] == []
    told = [line for line in lines if "training it again" in line]
    assert len(told) == diverging and f"with lam={final:g}" in told[-1]
    saved = torch.load(tmp_path / loop_module.CHECKPOINT_NAME, weights_only=False)
    assert saved["hparam_search"][1]["strength"] == {"lam": final}  # the checkpoint holds the final record
    direct = train_tasks(ClassificationExperiment(_make_model, _tasks(), importance_batch_size=32), method, SETTINGS,
                         seed=SEED, search=_Forced(**settings, forced={1: final}), method_options=GRADIENT)
    assert direct.hparam_search[1]["backoff"] == [] and direct.hparam_search[1]["strength"] == {"lam": final}
    assert backed.accuracy == direct.accuracy
    assert all(torch.equal(a, b) for a, b in zip(backed.model.state_dict().values(), direct.model.state_dict().values()))


def test_a_divergence_at_the_floor_of_the_search_stands() -> None:
    """λ = 1e6 with a floor of 1e4 (max_tries 2, decay 0.01): MAS diverges at both, the error says so."""
    from mas_core.errors import DivergenceError

    settings = _Forced(enabled=True, lr_grid=[SETTINGS.lr], start=1.0, decay=0.01, max_tries=2, epochs=1,
                       forced={1: 1e6})
    with pytest.raises(DivergenceError, match=r"chosen by the hyperparameter search.*lam.*backed off 1 time\(s\) "
                                              r"from lam=1e\+06, down to the search's floor"):
        run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, search=settings, progress=False,
                     method_options=GRADIENT)
    record = {"strength_name": "lam", "strength": {"lam": 1e4}, "tries": [{"value": 1e6}, {"value": 1e4}],
              "backoff": [], "reason": ""}  # phase 2 ended at the floor
    assert settings.back_off(record, "nan") is None and record["backoff"] == []  # nothing recorded
    assert settings.back_off({"strength_name": None, "tries": [], "strength": {}}, "nan") is None  # no strength


# ------------------------------------------------------------------ a plasticity reference no better than chance

class _HalfScored(ClassificationExperiment):
    """Validation scores halved: every A* is ≤ 0.5, the chance level of these two-class tasks."""

    def validation_score(self, module, task, positions):
        return 0.5 * super().validation_score(module, task, positions)


def test_a_reference_no_better_than_chance_keeps_the_start_and_says_so() -> None:
    """With the gate, the decay would go 8 → 4 → 2 → 1 (as in the test above); with A* at or below
    chance the threshold means nothing, so λ stays at the start 8, nothing is tried, and it is said."""
    lines: list[str] = []
    settings = SearchSettings(enabled=True, lr_grid=GRID, start=8.0, decay=0.5, max_tries=6, epochs=2)
    result = train_tasks(_HalfScored(_make_model, _tasks(), importance_batch_size=32), _Gate(lam=1.0), SETTINGS,
                         seed=SEED, search=settings, log=lines.append)
    records = result.hparam_search
    assert all(r["reference_collapsed"] and r["chance_level"] == 0.5 and r["reference_acc"] <= 0.5 for r in records)
    assert records[0]["strength"] == {"lam": 1.0} and "no better than chance (0.500)" in records[0]["reason"]
    for record in records[1:]:
        assert record["strength"] == {"lam": 8.0} and record["tries"] == [] and record["threshold"] is None
        assert "kept at the most stable value, the start 8, not decayed" in record["reason"]
        assert describe_choice(record) == f"lr {record['lr']:g}, lam=8"
    warnings = [line for line in lines if "warning: the plasticity reference" in line]
    assert len(warnings) == 3 and "no better than chance (0.500)" in warnings[1]
    # min_reference replaces the chance level: 0.1 is below every A* here, so the decay runs as usual
    lower = SearchSettings(enabled=True, lr_grid=GRID, start=8.0, decay=0.5, max_tries=6, epochs=2, min_reference=0.1)
    decayed = train_tasks(_HalfScored(_make_model, _tasks(), importance_batch_size=32), _Gate(lam=1.0), SETTINGS,
                          seed=SEED, search=lower).hparam_search
    assert all(not r["reference_collapsed"] and r["chance_level"] == 0.1 for r in decayed)
    assert [t["value"] for t in decayed[1]["tries"]] == [8.0, 4.0, 2.0, 1.0] and decayed[1]["strength"] == {"lam": 1.0}


def test_the_chance_level_is_one_over_the_classes_and_optional() -> None:
    tasks = _tasks(2)
    tasks[1].num_classes = 5
    experiment = ClassificationExperiment(_make_model, tasks, importance_batch_size=32)
    assert chance_level(experiment, 0) == 0.5 and chance_level(experiment, 1) == pytest.approx(0.2)

    class NoChance(ClassificationExperiment):
        chance_score = None

    assert chance_level(NoChance(_make_model, tasks, importance_batch_size=32), 0) is None
    record = train_tasks(NoChance(_make_model, _tasks(1), importance_batch_size=32), "mas", SETTINGS, seed=SEED,
                         search=SearchSettings(enabled=True, lr_grid=[0.05], epochs=1)).hparam_search[0]
    assert record["chance_level"] is None and record["reference_collapsed"] is False
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="search.min_reference"):
            SearchSettings(min_reference=bad).validate()
    assert "min_reference" not in SearchSettings().identity()  # checkpoints written before it still resume
    assert SearchSettings().identity()["stability"] == "two-sided"  # a one-sided search's checkpoint is refused
    assert SearchSettings(min_reference=0.3).identity()["min_reference"] == 0.3


def test_methods_filter_keeps_the_search_starts_of_the_kept_methods(tmp_path) -> None:
    """`train --methods` on a config whose search.start names other methods too: the filtered
    config is valid and keeps the kept methods' starts (configs/synth4_search.yaml with --methods)."""
    from triplets.facts.train_config import select_methods

    facts = make_tiny_fact_file(tmp_path / "facts.h5", num_tasks=2, facts_per_task=6, train_per_fact=5,
                                test_per_fact=2)
    config = _config(facts, methods=[MethodConfig("finetune", {}), MethodConfig("mas", {"lam": 1.0}),
                                     MethodConfig("ewc", {"lam": 1.0})], epochs=1)
    config.search = SearchSettings(enabled=True, start={"mas": 2.0, "ewc": 4.0}, lr_grid=[0.05], epochs=1)
    config.validate()
    chosen = select_methods(config, ["finetune", "mas"])
    chosen.validate()
    assert chosen.search.start == {"mas": 2.0} and [m.key for m in chosen.methods] == ["finetune", "mas"]
