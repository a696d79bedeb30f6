"""Every importance labelled (issue 23 part 4): the estimator, the samples it read and the accumulation
rule, with λ and the penalty step, in Regularizer.describe(), the loop's result and checkpoint,
results.json and the reports."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mas_core.importance import OnlineImportance
from mas_core.loop import CHECKPOINT_NAME
from mas_core.regularizers import make_regularizer
from mas_core.sequence import run_sequence
from triplets.report import labels_table

from test_sequence import SEED, SETTINGS, _make_model, _tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _batches(n: int, batch: int = 32) -> list[torch.Tensor]:
    inputs = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    return list(inputs.split(batch))


def test_describe_names_the_estimator_the_samples_and_the_rule() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    cases = [("mas", {}, "exact", 80, "sum"), ("mas", {"mode": "batch", "max_samples": 50}, "batch", 50, "sum"),
             ("lmas", {"accumulate": "alpha"}, "hebbian", 80, "consistency"),
             ("mas", {"accumulate": "ema", "ema_alpha": 0.5}, "exact", 80, "average (ema α=0.5)")]
    for name, options, estimator, samples, rule in cases:
        reg = make_regularizer(name, lam=2.0, **options)
        assert reg.describe()["importance"]["samples"] is None  # nothing estimated yet
        reg.after_task(model, _batches(80))
        assert reg.describe() == {"method": name, "strength": {"lam": 2.0}, "penalty_step": "proximal",
                                  "importance": {"estimator": estimator, "samples": samples, "accumulation": rule}}
    ewc = make_regularizer("ewc", online=True, gamma=0.5, penalty_step="gradient")
    labelled = [(x, torch.randint(0, 3, (len(x),))) for x in _batches(70)]
    ewc.after_task(model, labelled)
    assert ewc.describe()["importance"] == {"estimator": "fisher", "samples": 70, "accumulation": "online (γ=0.5)"}
    assert ewc.describe()["penalty_step"] == "gradient"
    assert make_regularizer("si").describe()["importance"]["estimator"] == "path integral"
    assert make_regularizer("imm").describe()["strength"] == {"lam_l2": 1e-4}
    assert make_regularizer("lwf").describe() == {"method": "lwf", "strength": {"lam": 1.0}, "penalty_step": None,
                                                  "importance": None}


def test_counting_the_samples_keeps_the_estimators_refusal_of_a_bare_tensor() -> None:
    """MAS.after_task counts what its estimator reads; a tensor instead of an iterable of batches is
    still refused by the estimator (not read row by row as batches of one sample)."""
    from mas_core.errors import InvalidArgumentError

    model = nn.Sequential(nn.Linear(5, 3))
    for name in ("mas", "lmas"):
        with pytest.raises(InvalidArgumentError, match="iterable of batches"):
            make_regularizer(name).after_task(model, torch.randn(8, 5))


def test_an_online_accumulator_is_labelled_online_with_its_count() -> None:
    model = nn.Sequential(nn.Linear(5, 3))
    accumulator = OnlineImportance(model)
    for batch in _batches(45, batch=15):
        accumulator.update(batch)
    reg = make_regularizer("mas")
    reg.after_task(model, accumulator)
    assert reg.describe()["importance"] == {"estimator": "online", "samples": 45, "accumulation": "sum"}


def test_the_loop_records_the_labels_per_task_in_the_result_and_the_checkpoint(tmp_path) -> None:
    result = run_sequence(_make_model, _tasks(), "mas", SETTINGS, seed=SEED, checkpoint_dir=tmp_path, progress=False,
                          method_options={"lam": 0.5, "max_samples": 100})
    labels = result.summary()["labels"]
    assert [label["importance"] for label in labels] == [{"estimator": "exact", "samples": 100,
                                                          "accumulation": "sum"}] * 3
    assert all(label["strength"] == {"lam": 0.5} and label["penalty_step"] == "proximal" for label in labels)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["labels"] == labels
    table = labels_table({"methods": {"mas": {"labels": labels}, "finetune": {}}})
    assert "| mas | exact | 100/100/100 | sum | 0.5/0.5/0.5 | proximal |" in table and "finetune" not in table


def test_results_json_and_results_md_carry_the_labels(tmp_path) -> None:
    from test_recognition import tiny_digits_config
    from triplets.cli import main

    config = tiny_digits_config(tmp_path, methods=["finetune", "mas", "ewc"])
    assert main(["recognition", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    mas = results["methods"]["mas"]["labels"]
    assert mas[-1]["importance"]["estimator"] == "exact" and mas[-1]["importance"]["samples"] > 0
    assert results["methods"]["ewc"]["labels"][-1]["importance"]["estimator"] == "fisher"
    assert results["methods"]["finetune"]["labels"][-1]["importance"] is None
    report = (tmp_path / "run" / "results.md").read_text()
    assert "| mas | exact |" in report and "| ewc | fisher |" in report and "| proximal |" in report


def test_a_checkpoint_written_under_the_old_gradient_default_is_not_resumed_under_proximal(tmp_path) -> None:
    """The checkpoint's identity holds the resolved penalty step: a run written before issue 23 with no
    penalty_step in its options (then the gradient form) is refused, not continued under proximal."""
    from mas_core.checkpoint import load_checkpoint, save_checkpoint
    from mas_core.errors import CheckpointMismatchError
    from mas_core.loop import train_tasks
    from mas_core.sequence import ClassificationExperiment

    def run(resume: bool):
        return train_tasks(ClassificationExperiment(_make_model, _tasks(), importance_batch_size=32), "mas", SETTINGS,
                           seed=SEED, method_options={"lam": 0.5}, checkpoint_dir=tmp_path, resume=resume,
                           stop_after_task=None if resume else 1)

    run(False)
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    assert state["config"]["method_options"] == {"lam": 0.5, "penalty_step": "proximal"}
    del state["config"]["method_options"]["penalty_step"]  # as the code before issue 23 wrote it
    save_checkpoint(path, state)
    with pytest.raises(CheckpointMismatchError, match="penalty_step"):
        run(True)
