"""Online importance in the application (docs/method.md §12): `query --accumulate-importance` adds
the queries' MAS importance to the run folder, and `train --resume` with `online_importance`
replaces (or mixes) the last task's Ω with it."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mas_core import MAS, mas_importance, mix_importance
from mas_core.checkpoint import load_checkpoint, read_json
from mas_core.errors import MASStateError
from triplets.cli import main
from triplets.config import from_dict
from triplets.errors import ConfigError
from triplets.facts.data import open_fact_file
from triplets.query.online_resume import ACCUMULATOR_NAME, SIDECAR_NAME, OnlineImportanceOnResume
from triplets.query.engine import crop_and_resize, load_image
from triplets.query.online_importance import record_query_pixels
from triplets.run_folder import load_run
from triplets.facts.train import train_run
from triplets.facts.train_config import TrainConfig

from test_train import make_tiny_fact_file

ROOT = Path(__file__).resolve().parents[1]


def _config(fact_path: Path, **online) -> TrainConfig:
    raw = {
        "data": {"fact_file": str(fact_path)},
        "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32},
        "optim": {"epochs": 1, "lr": 0.01, "batch_size": 16},
        "methods": [{"name": "mas", "options": {"lam": 1.0}}, {"name": "finetune"}],
        "seed": 0, "device": "cpu", "num_threads": 1, "eval": {"index": "none"},
    }
    if online:
        raw["online_importance"] = online
    return from_dict(TrainConfig, raw)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run of three tasks stopped after task 1, and two query images (PNG regions of task 1's test set)."""
    root = tmp_path_factory.mktemp("online")
    fact_path = make_tiny_fact_file(root / "facts.h5", num_tasks=3, facts_per_task=6, train_per_fact=6,
                                    test_per_fact=2)
    results = train_run(_config(fact_path), root / "run", progress=False, stop_after_task=1)
    assert len(results["methods"]["mas"]["accuracy_matrix"]) == 1 and results["complete"] is False
    facts = open_fact_file(fact_path)
    try:
        samples = facts.sample_indices(0, "test")[:3]
        pixels = facts.pixels(samples)
    finally:
        facts.close()
    for i, region in enumerate(pixels):
        Image.fromarray(region).save(root / f"query{i}.png")
    return root


@pytest.fixture()
def run(stopped_run, tmp_path) -> Path:
    """A private copy of the stopped run folder and the query images; the fact file is the shared
    one (linked: a checkpoint records the fact file's resolved path)."""
    shutil.copytree(stopped_run / "run", tmp_path / "run")
    for image in stopped_run.glob("query*.png"):
        shutil.copy(image, tmp_path / image.name)
    (tmp_path / "facts.h5").symlink_to(stopped_run / "facts.h5")
    return tmp_path


def _query(run: Path, image: Path, *extra: str) -> int:
    return main(["query", "--run", str(run / "run"), "--image", str(image), "--method", "mas", "--k", "2",
                 "--accumulate-importance", *extra])


def _pixels(run: Path, names: list[str]) -> np.ndarray:
    return np.stack([crop_and_resize(load_image(run / name), None, 16) for name in names])


def _images(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _relative_error(a: dict, b: dict) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max().clamp_min(1e-30))
               for n in b)


def test_query_flag_accumulates_exactly_mas_importance(run, capsys):
    assert _query(run, run / "query0.png") == 0
    assert _query(run, run / "query1.png", "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out[out.out.index("{"):])["method"] == "mas"  # --json: stdout stays pure JSON
    assert "online importance: added 1 sample(s)" in out.err and "2 samples from 2 query call(s)" in out.err
    state = load_checkpoint(run / "run" / "mas" / ACCUMULATOR_NAME)
    assert state["accumulator"]["count"] == 2 and state["query_calls"] == 2 and state["after_task"] == 1
    sidecar = read_json(run / "run" / "mas" / SIDECAR_NAME)
    assert sidecar["samples"] == 2 and sidecar["query_calls"] == 2 and sidecar["estimator"] == "mas"
    with load_run(run / "run") as opened:
        model = opened.load_model("mas")
    from triplets.query.online_importance import new_accumulator

    accumulator = new_accumulator(model, "mas")
    accumulator.load_state_dict(state["accumulator"])
    expected = mas_importance(model, [_images(_pixels(run, ["query0.png", "query1.png"]))])
    assert set(expected) == set(accumulator.importance())
    assert _relative_error(accumulator.importance(), expected) <= 1e-6


def test_two_calls_equal_one_call_with_both_inputs(run, tmp_path):
    with load_run(run / "run") as opened:
        model = opened.load_model("mas")
        method = next(m for m in opened.config.methods if m.key == "mas")
    pixels = _pixels(run, ["query0.png", "query1.png", "query2.png"])
    other = tmp_path / "other"
    (other / "mas").mkdir(parents=True)
    record_query_pixels(run / "run", method, model, pixels[:1])
    record = record_query_pixels(run / "run", method, model, pixels[1:])
    together = record_query_pixels(other, method, model, pixels)
    assert record.samples == together.samples == 3 and record.query_calls == 2 and together.query_calls == 1
    split = load_checkpoint(run / "run" / "mas" / ACCUMULATOR_NAME)["accumulator"]
    joint = load_checkpoint(other / "mas" / ACCUMULATOR_NAME)["accumulator"]
    assert split["count"] == joint["count"] == 3
    # the per-batch terms are float32 (the model's dtype): batching changes only their rounding
    assert _relative_error(split["sums"], joint["sums"]) <= 1e-6


def _resume_capturing(run: Path, monkeypatch, **online) -> tuple[dict, dict]:
    """Resume the run for task 2 with ``online_importance`` set; return the MAS regularizer's Ω right
    after the resume hook and the results."""
    captured: dict = {}
    original = OnlineImportanceOnResume.__call__

    def spy(self, model, trained, reg, completed):
        original(self, model, trained, reg, completed)
        if self.method_key == "mas":
            captured["omega"] = {name: value.clone() for name, value in reg.importance.items()}
            captured["trained"] = copy.deepcopy(trained)  # θ as resumed (training moves it afterwards)

    monkeypatch.setattr(OnlineImportanceOnResume, "__call__", spy)
    config = _config(run / "facts.h5", **online)
    results = train_run(config, run / "run", resume=True, progress=False, stop_after_task=2)
    return captured, results


def _online_importance(run: Path) -> dict:
    with load_run(run / "run") as opened:
        model = opened.load_model("mas")
    from triplets.query.online_importance import new_accumulator

    accumulator = new_accumulator(model, "mas")
    accumulator.load_state_dict(load_checkpoint(run / "run" / "mas" / ACCUMULATOR_NAME)["accumulator"])
    return accumulator.importance()


def test_resume_with_queries_uses_exactly_the_online_importance(run, monkeypatch):
    assert _query(run, run / "query0.png") == 0 and _query(run, run / "query2.png") == 0
    queried = _online_importance(run)
    captured, results = _resume_capturing(run, monkeypatch, use="queries")
    assert set(captured["omega"]) == set(queried)
    for name, value in queried.items():
        assert torch.equal(captured["omega"][name], value), name
    entry = results["methods"]["mas"]
    assert len(entry["accuracy_matrix"]) == 2
    assert entry["online_importance"] == [{"after_task": 1, "use": "queries", "query_weight": 1.0, "query_samples": 2,
                                           "query_calls": 2, "train_samples": None, "estimator": "mas"}]
    assert "online_importance" not in results["methods"]["finetune"]
    assert results["config"]["online_importance"] == {"use": "queries", "query_weight": 0.5}


def test_resume_mixed_uses_the_stated_mix(run, monkeypatch):
    assert _query(run, run / "query1.png") == 0
    queried = _online_importance(run)
    captured, results = _resume_capturing(run, monkeypatch, use="mixed", query_weight=0.3)
    facts = open_fact_file(run / "facts.h5")
    try:
        train_images = facts.pixels(facts.sample_indices(0, "train"))
    finally:
        facts.close()
    trained_omega = mas_importance(captured["trained"], [_images(train_images)])
    expected = mix_importance(trained_omega, queried, 0.3)
    assert _relative_error(captured["omega"], expected) <= 1e-6
    record = results["methods"]["mas"]["online_importance"][0]
    assert record["use"] == "mixed" and record["query_weight"] == 0.3 and record["query_samples"] == 1
    assert record["train_samples"] == len(train_images)


def test_killed_query_leaves_no_half_written_file(run):
    assert _query(run, run / "query0.png") == 0
    path = run / "run" / "mas" / ACCUMULATOR_NAME
    before = path.read_bytes()
    script = f"""
import os, sys, torch
def half_then_die(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04 half an archive")
    handle.flush()
    os._exit(137)
torch.save = half_then_die
from triplets.cli import main
main(["query", "--run", {str(run / 'run')!r}, "--image", {str(run / 'query1.png')!r}, "--method", "mas",
      "--accumulate-importance"])
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    assert path.read_bytes() == before  # the accumulator is the one before the killed call
    visible = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
    assert all(not name.endswith(".tmp") for name in visible)
    assert read_json(path.parent / SIDECAR_NAME)["samples"] == 1
    assert _query(run, run / "query1.png") == 0  # and the next call adds to it
    assert load_checkpoint(path)["accumulator"]["count"] == 2


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err, err


def test_bad_flag_combinations_are_one_line_errors(run, capsys, tmp_path):
    base = ["query", "--run", str(run / "run")]
    _one_line_error(capsys, base + ["--text", "subj0_0", "--accumulate-importance"], "image queries only")
    _one_line_error(capsys, base + ["--image", str(run / "query0.png"), "--method", "finetune",
                                    "--accumulate-importance"], "does not take its importance from unlabelled")
    assert not (run / "run" / "finetune" / ACCUMULATOR_NAME).exists()
    config = tmp_path / "c.yaml"
    config.write_text((run / "run" / "config.yaml").read_text() + "")
    for override, pattern in (("online_importance.query_weight=1.5", "query_weight must be a number in [0, 1]"),
                              ("online_importance.use=always", "online_importance")):
        _one_line_error(capsys, ["train", "--config", str(config), "--out", str(run / "run"), "--resume",
                                 "--set", override], pattern)
    _one_line_error(capsys, ["train", "--config", str(config), "--out", str(run / "run"), "--resume",
                             "--set", "online_importance.use=queries"], "no method of")
    _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "new"),
                             "--stop-after-task", "0"], "--stop-after-task must be a positive")
    assert main(["query", "--run", str(run / "run"), "--text", "subj0_0", "--method", "mas"]) == 0


def test_stale_accumulator_is_refused_and_is_replaced_by_a_new_query(run, monkeypatch, capsys):
    assert _query(run, run / "query0.png") == 0
    train_run(_config(run / "facts.h5"), run / "run", resume=True, progress=False, stop_after_task=2)
    captured, results = _resume_capturing(run, monkeypatch, use="queries")  # nothing left to train up to task 2
    assert captured == {} and "online_importance" not in results["methods"]["mas"]
    lines: list[str] = []
    hook = OnlineImportanceOnResume(_config(run / "facts.h5", use="queries").online_importance, "mas",
                                     run / "run" / "mas", lambda *a: None, torch.device("cpu"), lines.append)
    state = load_checkpoint(run / "run" / "mas" / "checkpoint.pt")
    with load_run(run / "run") as opened:
        model = opened.load_model("mas")
    reg = MAS(1.0)
    reg.load_state_dict(state["regularizer"])
    before = {name: value.clone() for name, value in reg.importance.items()}
    with pytest.raises(ConfigError, match="cannot be used: it was accumulated on another model"):
        hook(model, model, reg, 2)
    assert not lines and not hook.records
    assert all(torch.equal(before[name], value) for name, value in reg.importance.items())
    capsys.readouterr()
    assert _query(run, run / "query1.png") == 0
    assert "replaced an accumulator of 1 samples" in capsys.readouterr().err
    assert read_json(run / "run" / "mas" / SIDECAR_NAME)["after_task"] == 2


# --------------------------------------------------------------------------- MAS.replace_last_task_importance


@pytest.mark.parametrize("accumulate", ["sum", "ema", "alpha"])
def test_replacing_the_last_task_equals_accumulating_the_replacement(accumulate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    first, second = torch.randn(20, 4, dtype=torch.float64), torch.randn(15, 4, dtype=torch.float64)
    replacement = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    reg = MAS(1.0, accumulate=accumulate, ema_alpha=0.3)
    reg.after_task(model, [first])
    reg.replace_last_task_importance(model, None, replacement)  # the first task: exact
    direct = MAS(1.0, accumulate=accumulate, ema_alpha=0.3)
    direct.add_task_importance(model, replacement)
    assert all(torch.equal(reg.importance[n], direct.importance[n]) for n in direct.importance)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    reg.after_task(model, [second])
    reg.replace_last_task_importance(model, mas_importance(model, [second]), replacement)
    direct.add_task_importance(model, replacement)
    assert reg.tasks_seen == direct.tasks_seen == 2
    assert _relative_error(reg.importance, direct.importance) <= 1e-12
    assert all(torch.equal(reg.anchors[n], direct.anchors[n]) for n in direct.anchors)


def test_replacing_with_a_foreign_last_task_importance_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    reg = MAS(1.0)
    with pytest.raises(MASStateError, match="no task's importance"):
        reg.replace_last_task_importance(model, None, {})
    reg.after_task(model, [torch.randn(10, 4, dtype=torch.float64)])
    reg.after_task(model, [torch.randn(10, 4, dtype=torch.float64)])
    before = {name: value.clone() for name, value in reg.importance.items()}
    huge = {name: value * 10 for name, value in before.items()}
    with pytest.raises(MASStateError, match="exceeds what MAS accumulated"):
        reg.replace_last_task_importance(model, huge, before)
    with pytest.raises(MASStateError, match="needs its own importance"):
        reg.replace_last_task_importance(model, None, before)
    assert all(torch.equal(before[n], reg.importance[n]) for n in before) and reg.tasks_seen == 2


def test_config_rejects_bad_online_importance():
    with pytest.raises(ConfigError, match="query_weight"):
        from_dict(TrainConfig, {"data": {"fact_file": "x"}, "online_importance": {"use": "mixed", "query_weight": -0.1}})
    with pytest.raises(ConfigError, match="use"):
        from_dict(TrainConfig, {"data": {"fact_file": "x"}, "online_importance": {"use": "sometimes"}})


def test_script_query_accumulates_a_stored_test_region(run, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import query as query_script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert query_script.main([str(run / "run"), "--sample", "0", "--method", "mas", "--accumulate-importance"]) == 0
    assert "1 samples from 1 query call(s)" in capsys.readouterr().out
    assert read_json(run / "run" / "mas" / SIDECAR_NAME)["samples"] == 1
    assert query_script.main([str(run / "run"), "--text", "subj0_0", "--accumulate-importance"]) == 2
    assert "image queries only" in capsys.readouterr().err


def test_cached_features_run_takes_the_online_importance_of_its_branches(tmp_path, monkeypatch):
    """With model.cache_features the loop trains the branches on cached trunk features; the query
    side measures the full network on images. Both give Ω over the same (branch) parameters."""
    from triplets.facts.model import ModelConfig
    from triplets.query.online_importance import new_accumulator
    from mas_core.loop import OptimSettings
    from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig

    fact_path = make_tiny_fact_file(tmp_path / "facts.h5", num_tasks=2, facts_per_task=4, train_per_fact=4,
                                    test_per_fact=2, image_size=32, slot_dim=8)
    config = TrainConfig(data=DataConfig(fact_file=str(fact_path)),
                         model=ModelConfig(backbone="resnet18", hidden_dim=16, cache_features=True),
                         optim=OptimSettings(epochs=1, batch_size=8, lr=0.01),
                         methods=[MethodConfig("mas", {"lam": 1.0})], eval=EvalConfig(index="none", batch_size=16),
                         num_threads=1)
    train_run(config, tmp_path / "run", progress=False, stop_after_task=1)
    facts = open_fact_file(fact_path)
    try:
        pixels = facts.pixels(facts.sample_indices(0, "test")[:3])
    finally:
        facts.close()
    with load_run(tmp_path / "run") as opened:
        model = opened.load_model("mas")
    record_query_pixels(tmp_path / "run", config.methods[0], model, pixels)
    accumulator = new_accumulator(model, "mas")
    accumulator.load_state_dict(load_checkpoint(tmp_path / "run" / "mas" / ACCUMULATOR_NAME)["accumulator"])
    assert all(name.startswith(("subject_branch.", "predicate_object_branch.")) for name in accumulator.importance())
    assert _relative_error(accumulator.importance(), mas_importance(model, [_images(pixels)])) <= 1e-6
    captured: dict = {}
    original = OnlineImportanceOnResume.__call__

    def spy(self, model, trained, reg, completed):
        original(self, model, trained, reg, completed)
        captured["omega"] = {name: value.clone() for name, value in reg.importance.items()}

    monkeypatch.setattr(OnlineImportanceOnResume, "__call__", spy)
    resumed = dataclasses.replace(config, online_importance=dataclasses.replace(config.online_importance, use="queries"))
    results = train_run(resumed, tmp_path / "run", resume=True, progress=False)
    assert results["methods"]["mas"]["online_importance"][0]["query_samples"] == 3
    assert set(captured["omega"]) == set(accumulator.importance())
    assert all(torch.equal(captured["omega"][n], v) for n, v in accumulator.importance().items())
