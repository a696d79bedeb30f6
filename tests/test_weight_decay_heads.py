"""No weight decay on old tasks' heads (issue 11): the loop decays only the parameters the current
task's loss reaches, so an old head held by its anchor keeps its weights bit for bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mas_core.loop as loop_module
from mas_core.loop import CHECKPOINT_NAME

from test_sequence import SETTINGS, _make_model, _run, _tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("method, options", [("finetune", {}), ("mas", {"lam": 1.0}), ("ewc", {"lam": 1.0})])
def test_old_heads_are_bit_identical_after_the_next_task_with_weight_decay(method, options, tmp_path, monkeypatch):
    heads = []
    real_save = loop_module.save_checkpoint

    def save_and_keep(path, state):
        heads.append({key: value.clone() for key, value in state["model"].items() if key.startswith("heads.0.")})
        real_save(path, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_and_keep)
    settings = dataclasses.replace(SETTINGS, weight_decay=0.01)
    _run(_make_model, _tasks(2), method, settings, method_options=options, checkpoint_dir=tmp_path,
                  progress=False)
    assert (tmp_path / CHECKPOINT_NAME).is_file() and len(heads) == 2
    for key in ("heads.0.weight", "heads.0.bias"):
        assert torch.equal(heads[0][key], heads[1][key]), (method, key)


def test_the_shared_trunk_is_decayed(tmp_path):
    """Weight decay still acts on what the task trains: with a large decay the trunk shrinks."""
    small = _run(_make_model, _tasks(1), "finetune", SETTINGS, progress=False).model
    decayed = _run(_make_model, _tasks(1), "finetune", dataclasses.replace(SETTINGS, weight_decay=0.5),
                   progress=False).model
    assert float(decayed.trunk[0].weight.norm()) < 0.8 * float(small.trunk[0].weight.norm())
    assert float(decayed.heads[0].weight.norm()) < 0.8 * float(small.heads[0].weight.norm())
