"""The fault suite: bad inputs and faults a user can cause, across synth, train, evaluate, query,
recognition and the Python API (evaluate, query, recognition: tests/test_faults_runs.py; prepare's
cases: the data_prep fault tests).

Every case asserts exit code 2 (an exception of the packages' error types for the API), exactly
one line on stderr (argparse's usage line aside) and that no existing file changed: every file
of the folders involved is hashed before and after. One tiny fact file, one finished run, one
killed run and one recognition run are built once for the module; cases that damage a run work
on a copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mas_core.checkpoint import load_checkpoint, read_json, remove_stale_temporaries
from mas_core.errors import CheckpointMismatchError, MASCoreError, did_you_mean
from mas_core.loop import OptimSettings
from triplets.cli import main
from triplets.errors import ConfigError, RunFolderError, TripletsError

from test_recognition import tiny_digits_config
from test_train import make_tiny_fact_file

MODEL = {"trunk_channels": [4, 8], "branch_channels": 8, "hidden_dim": 16}


# --------------------------------------------------------------------------- helpers

def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (or of ``roots`` themselves when files)."""
    found: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in paths:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(capsys, argv: list[str], pattern: str, *watch: Path) -> str:
    """Run the CLI in-process: exit 2, one line on stderr matching ``pattern`` (a regex), no file
    under ``watch`` changed (none added, none removed)."""
    capsys.readouterr()
    before = snapshot(*watch)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a usage line, then the error line
        code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err and err[0].startswith("usage:"), err
        lines = err[1:] if len(err) > 1 and not err[1].startswith(" ") else err
        lines = [line for line in lines if not line.startswith(("usage:", " "))]
    else:
        lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(*watch) == before, "a file changed"
    return lines[0]


def raises_one_line(exc_type, pattern: str, call, *watch: Path) -> str:
    before = snapshot(*watch)
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and re.search(pattern, message), message
    assert snapshot(*watch) == before, "a file changed"
    return message


def write_config(path: Path, fact_file: Path, **changes) -> Path:
    config = {"data": {"fact_file": str(fact_file)}, "model": MODEL,
              "optim": {"epochs": 1, "batch_size": 16, "lr": 0.05}, "methods": [{"name": "finetune"}],
              "eval": {"index": "flat"}, "device": "cpu", "num_threads": 1, "seed": 0}
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def flip_byte(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x10
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- fixtures (built once)

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny fact file, a finished run of it (train CLI) and a run killed after its first task."""
    root = tmp_path_factory.mktemp("faults")
    facts = make_tiny_fact_file(root / "facts.h5", num_tasks=2, facts_per_task=4, train_per_fact=3,
                                test_per_fact=2, image_size=8, slot_dim=4)
    config = write_config(root / "train.yaml", facts)
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--no-progress"]) == 0
    import mas_core.loop as loop_module

    real_save = loop_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_then_die)
        assert main(["train", "--config", str(config), "--out", str(root / "partial"), "--no-progress"]) == 130
    assert (root / "partial" / "finetune" / "checkpoint.pt").is_file()
    assert not (root / "partial" / "finetune" / "result.json").exists()
    return {"root": root, "facts": facts, "config": config, "run": root / "run", "partial": root / "partial"}


@pytest.fixture
def own(world, tmp_path):
    """A copy of the fact file, of the finished run and of the killed run, pointing at the copy."""
    facts = tmp_path / "facts.h5"
    shutil.copyfile(world["facts"], facts)
    copies = {}
    for name in ("run", "partial"):
        shutil.copytree(world[name], tmp_path / name)
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        saved["data"]["fact_file"] = str(facts)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        copies[name] = tmp_path / name
    config = write_config(tmp_path / "train.yaml", facts)
    return {"facts": facts, "config": config, **copies}


@pytest.fixture(scope="module")
def recognition_run(tmp_path_factory):
    """A finished two-task recognition run on the bundled digits (a second of training)."""
    root = tmp_path_factory.mktemp("recognition")
    config = tiny_digits_config(root, ["finetune"], name="faults", train_per_class=8, epochs=1)
    assert main(["recognition", "--config", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return {"root": root, "config": config, "run": root / "run", "data": root / "data"}


@pytest.fixture
def rec_copy(recognition_run, tmp_path):
    shutil.copytree(recognition_run["run"], tmp_path / "rec")
    return tmp_path / "rec"


def users_folder(tmp_path: Path) -> Path:
    """A folder of the user's own results (not a run)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.md").write_text("# my notes\n")
    (folder / "results.json").write_text('{"mine": true}\n')
    return folder


# --------------------------------------------------------------------------- synth

def test_synth_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    refused(capsys, ["synth", "--out", str(target), "--images", "3", "--quiet"], str(target), tmp_path)


def test_synth_out_not_empty_without_force(tmp_path, capsys):
    folder = users_folder(tmp_path)
    refused(capsys, ["synth", "--out", str(folder), "--images", "3", "--quiet"], "not empty|force", folder)


def test_synth_bad_image_size(tmp_path, capsys):
    refused(capsys, ["synth", "--out", str(tmp_path / "w"), "--image-size", "160x"], "WIDTHxHEIGHT", tmp_path)


@pytest.mark.parametrize("images", ["0", "-3"])
def test_synth_no_images(tmp_path, capsys, images):
    refused(capsys, ["synth", "--out", str(tmp_path / "w"), "--images", images, "--quiet"], "images", tmp_path)
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- train: config and options

def test_train_config_missing(tmp_path, capsys):
    refused(capsys, ["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")], "not found",
            tmp_path)


def test_train_config_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    refused(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "r")], "not valid YAML", tmp_path)


def test_train_misspelt_key_suggests_lr(world, tmp_path, capsys):
    err = refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set",
                           "optim.lerning_rate=0.1"], "did you mean 'lr'", tmp_path)
    assert "weight_decay'?" not in err


@pytest.mark.parametrize("value", [".nan", "nan", "inf", "-.inf", "-1", "0"])
def test_train_learning_rate_not_finite_or_positive(world, tmp_path, capsys, value):
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set",
                     f"optim.lr={value}"], "optim.lr", tmp_path)
    assert not (tmp_path / "r").exists()


def test_train_set_without_value(world, tmp_path, capsys):
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set", "optim.lr"],
            "key=value", tmp_path)


def test_train_unknown_method(world, tmp_path, capsys):
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--methods", "finetun"],
            "did you mean 'finetune'", tmp_path)


def test_train_fact_file_missing(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "absent.h5")
    refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "absent.h5", tmp_path)


def test_train_fact_file_not_hdf5(tmp_path, capsys):
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 10)
    config = write_config(tmp_path / "c.yaml", tmp_path / "junk.h5")
    refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "HDF5|fact file", tmp_path)


# --------------------------------------------------------------------------- train: the output folder

def test_train_out_is_a_file(world, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(target)], "is a file", tmp_path)


def test_train_out_below_a_file(world, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "file" / "run")],
            "is a file", tmp_path)


def test_train_out_folder_of_other_files(world, tmp_path, capsys):
    folder = users_folder(tmp_path)
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(folder)], "not empty", folder)


def test_train_resume_into_a_folder_that_is_not_a_run(world, tmp_path, capsys):
    folder = users_folder(tmp_path)
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(folder), "--resume"],
            "not a run folder", folder)


def test_train_into_a_finished_run_without_resume(own, capsys):
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["run"])], "--resume", own["run"])


def test_train_into_a_recognition_run(world, rec_copy, capsys):
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(rec_copy), "--resume"],
            "recognition run", rec_copy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_out_read_only(world, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(capsys, ["train", "--config", str(world["config"]), "--out", str(folder / "run")], "cannot write",
                tmp_path)
    finally:
        folder.chmod(0o755)


def test_train_out_not_writable_as_root_too(world, tmp_path, capsys, monkeypatch):
    """Root writes through chmod, so the refusal is shown with the write probe failing as a
    read-only file system makes it fail (EROFS)."""
    import triplets.run_folder as run_folder

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", read_only)
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "run")],
            "cannot write into .*Read-only file system", tmp_path)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- train --resume: damaged runs

def test_resume_config_yaml_not_utf8(own, capsys):
    (own["partial"] / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
            "not a readable run config", own["partial"])


def test_resume_config_yaml_not_yaml(own, capsys):
    (own["partial"] / "config.yaml").write_text("data: {fact_file: [\n")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
            "not a readable run config", own["partial"])


def test_resume_config_yaml_unknown_key(own, capsys):
    (own["partial"] / "config.yaml").write_text("dta: {}\n")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
            "not a valid run config", own["partial"])


def test_resume_checkpoint_with_flipped_bytes(own, capsys):
    flip_byte(own["partial"] / "finetune" / "checkpoint.pt")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume",
                     "--no-progress"], "is damaged", own["partial"])


def test_resume_checkpoint_truncated(own, capsys):
    path = own["partial"] / "finetune" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume",
                     "--no-progress"], "checkpoint", own["partial"])


def test_resume_fact_file_prepared_again_at_the_same_path(own, capsys):
    make_tiny_fact_file(own["facts"], num_tasks=2, facts_per_task=4, train_per_fact=3, test_per_fact=2,
                        image_size=8, slot_dim=4, seed=7)
    err = refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
                  "not the one .* was trained on", own["partial"], own["facts"])
    recorded = json.loads((own["partial"] / "data.json").read_text())["fact_file"]["sha256"]
    assert recorded[:16] in err and str(own["facts"]) in err


def test_resume_with_another_learning_rate(own, capsys):
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume",
                     "--set", "optim.lr=0.01"], "optim", own["partial"])


def test_resume_result_json_not_json(own, capsys):
    (own["run"] / "finetune" / "result.json").write_text("{not json")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["run"]), "--resume",
                     "--no-progress"], "cannot read the method result", own["run"])


def test_resume_result_json_edited(own, capsys):
    path = own["run"] / "finetune" / "result.json"
    result = json.loads(path.read_text())
    result["avg_acc"] = 0.123456
    path.write_text(json.dumps(result))
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["run"]), "--resume",
                     "--no-progress"], "changed after it was written", own["run"])


def test_resume_data_record_edited(own, capsys):
    path = own["partial"] / "data.json"
    record = json.loads(path.read_text())
    record["fact_file"]["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
            "changed after it was written", own["partial"])


def test_resume_cleans_the_temporary_files_a_kill_left(world, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(world["partial"], partial)
    left = [partial / "finetune" / ".checkpoint.pt.abc123.tmp", partial / ".results.json.x1.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    assert main(["train", "--config", str(world["config"]), "--out", str(partial), "--resume", "--no-progress"]) == 0
    assert not any(path.exists() for path in left)
    assert read_json(partial / "results.json")["complete"] is True


# --------------------------------------------------------------------------- the Python API

def test_api_train_run_into_a_file(world, tmp_path):
    from triplets.facts.train import train_run
    from triplets.facts.train_config import load_train_config

    target = tmp_path / "out"
    target.write_text("mine")
    raises_one_line(RunFolderError, "is a file",
                    lambda: train_run(load_train_config(world["config"]), target, progress=False), tmp_path)


def test_api_load_run_of_a_user_folder(tmp_path):
    from triplets.run_folder import load_run

    folder = users_folder(tmp_path)
    raises_one_line(RunFolderError, "not a run folder", lambda: load_run(folder), folder)


def test_api_load_checkpoint_with_flipped_bytes(own):
    path = own["partial"] / "finetune" / "checkpoint.pt"
    assert load_checkpoint(path)["completed_tasks"] == 1
    assert torch.load(path, weights_only=True)["completed_tasks"] == 1  # still an ordinary torch file
    flip_byte(path, 0.4)
    raises_one_line(CheckpointMismatchError, "is damaged", lambda: load_checkpoint(path), path)


def test_api_read_json_edited(own):
    path = own["run"] / "results.json"
    assert read_json(path)["complete"] is True
    path.write_text(path.read_text().replace('"complete": true', '"complete": false'))
    raises_one_line(CheckpointMismatchError, "changed after it was written", lambda: read_json(path), path)


def test_api_open_query_with_an_unknown_method(world):
    from triplets.query.engine import open_query

    raises_one_line(RunFolderError, "did you mean 'finetune'", lambda: open_query(world["run"], method="finetuned"),
                    world["run"])


def test_api_optimizer_settings_refuse_non_finite_rates():
    for lr in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="optim.lr"):
            OptimSettings(lr=lr).validate()


def test_api_errors_are_the_packages_types():
    assert issubclass(CheckpointMismatchError, MASCoreError) and issubclass(RunFolderError, TripletsError)
    assert issubclass(ConfigError, TripletsError)


def test_did_you_mean_prefers_abbreviations_edit_distance_and_prefixes():
    optim = ["epochs", "first_task_epochs", "lr", "momentum", "batch_size", "weight_decay", "clip_grad_norm"]
    assert did_you_mean("lerning_rate", optim) == "; did you mean 'lr'?"
    assert did_you_mean("learning_rate", optim) == "; did you mean 'lr'?"
    assert did_you_mean("lrr", optim) == "; did you mean 'lr'?"
    assert did_you_mean("wd", optim) == "; did you mean 'weight_decay'?"
    assert did_you_mean("batchsize", optim) == "; did you mean 'batch_size'?"
    assert did_you_mean("Momentum", optim) == "; did you mean 'momentum'?"
    assert did_you_mean("clip", optim) == "; did you mean 'clip_grad_norm'?"
    assert did_you_mean("ewk", ["mas", "ewc", "si"]) == "; did you mean 'ewc'?"
    assert did_you_mean("xyz", ["abc"]) == "" and did_you_mean("x", []) == ""


def test_remove_stale_temporaries_leaves_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".results.json.k2j.tmp", tmp_path / "sub" / ".checkpoint.pt.abc.tmp"]
    kept = [tmp_path / "results.json", tmp_path / ".hidden", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in kept)
