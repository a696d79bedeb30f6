"""Atomic writes and safe checkpoints."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mas_core.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from mas_core.errors import CheckpointMismatchError


def test_checkpoint_round_trip_is_weights_only_and_exact(tmp_path):
    model = torch.nn.Linear(4, 3)
    state = {"model": model.state_dict(), "config": {"lr": 0.1, "methods": ["mas"]}, "finished_tasks": 2}
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path, expected_config={"lr": 0.1, "methods": ["mas"]})
    assert loaded["finished_tasks"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_checkpoint_with_other_config_names_the_difference(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": {"optim": {"lr": 0.1}}})
    with pytest.raises(CheckpointMismatchError, match=r"optim\.lr: checkpoint has 0\.1, current is 0\.2"):
        load_checkpoint(path, expected_config={"optim": {"lr": 0.2}})


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
