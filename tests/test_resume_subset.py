"""A searched run started with several methods resumes with a subset of them (`--methods`):
each method's checkpoint records its own search start, not the mapping of every selected method."""
from __future__ import annotations

import dataclasses
import json

import torch
import yaml

from mas_core.hparam_search import SearchSettings
from triplets.run_folder import load_run
from triplets.facts.train import method_search, train_run
from triplets.facts.train_config import MethodConfig, select_methods

from test_train import _config, make_tiny_fact_file


def _searched(tmp_path):
    facts = make_tiny_fact_file(tmp_path / "facts.h5", num_tasks=2, facts_per_task=6, train_per_fact=5,
                                test_per_fact=2)
    config = _config(facts, methods=[MethodConfig("mas", {"lam": 1.0}), MethodConfig("ewc", {"lam": 1.0})],
                     epochs=1)
    config.search = SearchSettings(enabled=True, lr_grid=[0.05], start={"mas": 2.0, "ewc": 4.0}, max_tries=2,
                                   epochs=1)
    return config


def test_a_run_of_two_methods_resumes_with_one_and_equals_an_uninterrupted_run(tmp_path) -> None:
    config = _searched(tmp_path)
    train_run(config, tmp_path / "run", progress=False, stop_after_task=1)     # both methods, task 1 only
    only_mas = select_methods(config, ["mas"])
    assert only_mas.search.start == {"mas": 2.0}                               # the mapping is filtered
    resumed = train_run(only_mas, tmp_path / "run", progress=False, resume=True)
    straight = train_run(only_mas, tmp_path / "straight", progress=False)
    assert resumed["methods"]["mas"]["accuracy_matrix"] == straight["methods"]["mas"]["accuracy_matrix"]
    assert resumed["methods"]["mas"]["final"] == straight["methods"]["mas"]["final"]
    saved = torch.load(tmp_path / "run" / "mas" / "checkpoint.pt", weights_only=False)["config"]["search"]
    assert saved["start"] == 2.0                                               # its own start, not a mapping
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())
    assert recorded["methods"]["mas"]["hparam_search"][1]["tries"][0]["value"] == 2.0
    # the run folder still records ewc's start, and loads (ewc is among its methods)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["search"]["start"] == {"mas": 2.0,
                                                                                              "ewc": 4.0}
    with load_run(tmp_path / "run") as run:
        assert run.methods == ["mas", "ewc"]                   # ewc: its model after task 1 (--stop-after-task)


def test_a_checkpoint_written_with_the_whole_mapping_resumes_with_it(tmp_path) -> None:
    """Checkpoints written before this rule hold the start mapping: resumed with it when it gives
    the method the same start, so they are not refused."""
    config = _searched(tmp_path)
    mas = config.methods[0]
    legacy = dataclasses.replace(config.search, start={"mas": 2.0, "ewc": 4.0}).identity()
    assert method_search(config, mas, legacy).identity() == legacy
    assert method_search(config, mas, None).start == 2.0
    other = dataclasses.replace(config.search, start={"mas": 8.0}).identity()
    assert method_search(config, mas, other).start == 2.0                      # another start: refused later
