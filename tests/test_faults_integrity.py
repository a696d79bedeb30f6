"""The fault suite, integrity that cannot be deleted away (issue 28): the fact file's SHA-256 and
the checksum live inside every checkpoint's own payload, so deleting ``data.json`` or stripping a
checkpoint's zip comment switches nothing off; a recorded hash is reused only when a content
sample still matches (the rules every case follows: tests/test_faults.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import triplets.fingerprint as fingerprint
from mas_core.checkpoint import json_checksum, load_checkpoint, save_checkpoint
from triplets.cli import main

from test_faults import (  # noqa: F401 - fixtures are found by name
    make_tiny_fact_file,
    own,
    refused,
    world,
)


def prepare_again(facts: Path) -> None:
    """The fact file prepared once more at the same path, with other pixels."""
    make_tiny_fact_file(facts, num_tasks=2, facts_per_task=4, train_per_fact=3, test_per_fact=2, image_size=8,
                        slot_dim=4, seed=7)


def strip_comment_and_corrupt_weights(path: Path) -> None:
    """Remove the checksum from the archive's zip comment, then change one weight's bytes in place."""
    state = torch.load(path, weights_only=True)
    weights = next(value for value in state["model"].values() if value.numel() >= 4)
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data = data[:end + 20] + b"\x00\x00"  # comment length 0, comment gone
    position = data.find(weights.reshape(-1)[:4].numpy().tobytes())
    assert position > 0
    data[position + 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"] is not None  # torch itself reads it without a word


def damage_in_place(path: Path, position: float = 0.5) -> None:
    """Flip a byte of ``path`` keeping its size, inode and modification time."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(int(stat.st_size * position))
        byte = handle.read(1)
        handle.seek(int(stat.st_size * position))
        handle.write(bytes([byte[0] ^ 0x55]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (stat.st_size, stat.st_ino, stat.st_mtime_ns)


def forge_data_record(run: Path, facts: Path) -> None:
    """``data.json`` rewritten for the fact file as it is now, with its checksum updated."""
    record = {"fact_file": {"path": str(facts), "sha256": fingerprint.file_sha256(facts),
                            **{k: v for k, v in fingerprint.file_identity(facts).items() if k not in ("path", "sha256")}}}
    record["sha256"] = json_checksum(record)
    (run / "data.json").write_text(json.dumps(record))


def train_resume(own) -> list[str]:
    return ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume", "--no-progress"]


# --------------------------------------------------------------------------- the data record

def test_resume_without_data_json_on_a_fact_file_prepared_again(own, capsys):
    (own["partial"] / "data.json").unlink()
    prepare_again(own["facts"])
    refused(capsys, train_resume(own), "not the one .* was trained on.*checkpoint.pt records", own["partial"],
            own["facts"])


def test_resume_with_a_forged_data_json_on_a_fact_file_prepared_again(own, capsys):
    prepare_again(own["facts"])
    forge_data_record(own["partial"], own["facts"])
    refused(capsys, train_resume(own), "checkpoint.pt records", own["partial"], own["facts"])


def test_evaluate_and_query_without_data_json_on_a_fact_file_prepared_again(own, capsys):
    (own["run"] / "data.json").unlink()
    prepare_again(own["facts"])
    refused(capsys, ["evaluate", "--run", str(own["run"])], "model.pt records", own["run"], own["facts"])
    refused(capsys, ["query", "--run", str(own["run"]), "--text", "a|b|c"], "model.pt records", own["run"],
            own["facts"])


def copy_of_the_killed_run(world, tmp_path) -> Path:
    """A copy of the killed run, on the module's own fact file (unchanged: these runs go on)."""
    partial = tmp_path / "partial"
    shutil.copytree(world["partial"], partial)
    return partial


def test_resume_without_data_json_on_the_same_fact_file_goes_on(world, tmp_path):
    partial = copy_of_the_killed_run(world, tmp_path)
    (partial / "data.json").unlink()
    assert main(["train", "--config", str(world["config"]), "--out", str(partial), "--resume", "--no-progress"]) == 0
    record = json.loads((partial / "data.json").read_text())
    assert record["fact_file"]["sha256"] == fingerprint.file_sha256(world["facts"])


def test_a_checkpoint_of_an_earlier_version_without_the_data_record_still_resumes(world, tmp_path):
    partial = copy_of_the_killed_run(world, tmp_path)
    path = partial / "finetune" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert state["config"]["experiment"]["fact_file_sha256"] == fingerprint.file_sha256(world["facts"])
    del state["config"]["experiment"]["fact_file_sha256"]
    save_checkpoint(path, state)
    assert main(["train", "--config", str(world["config"]), "--out", str(partial), "--resume", "--no-progress"]) == 0
    assert json.loads((partial / "results.json").read_text())["complete"] is True
    assert "fact_file_sha256" in load_checkpoint(partial / "finetune" / "model.pt")  # the new model records it


# --------------------------------------------------------------------------- the checksum inside the payload

def test_resume_checkpoint_without_its_zip_checksum_and_with_corrupt_weights(own, capsys):
    strip_comment_and_corrupt_weights(own["partial"] / "finetune" / "checkpoint.pt")
    refused(capsys, train_resume(own), "checkpoint.pt is damaged", own["partial"])


def test_evaluate_model_without_its_zip_checksum_and_with_corrupt_weights(own, capsys):
    strip_comment_and_corrupt_weights(own["run"] / "finetune" / "model.pt")
    refused(capsys, ["evaluate", "--run", str(own["run"])], "model.pt is damaged", own["run"])


def test_resume_of_a_finished_run_refuses_a_corrupt_model_before_writing(own, capsys):
    strip_comment_and_corrupt_weights(own["run"] / "finetune" / "model.pt")
    refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["run"]), "--resume", "--no-progress"],
            "model.pt is damaged", own["run"])


def test_save_checkpoint_records_the_payload_checksum_and_removes_it_on_load(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "mask": torch.tensor([True, False])},
             "rows": [[0.5, None]], "name": "x", "half": torch.ones(3, dtype=torch.bfloat16)}
    save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert isinstance(raw["payload_sha256"], str) and len(raw["payload_sha256"]) == 64
    back = load_checkpoint(tmp_path / "c.pt")
    assert "payload_sha256" not in back and torch.equal(back["model"]["w"], state["model"]["w"])


# --------------------------------------------------------------------------- a recorded hash and the content sample

def test_evaluate_fact_file_damaged_in_place_with_its_time_restored(own, capsys):
    forge_data_record(own["run"], own["facts"])  # the record of this very file: its size, time and inode
    damage_in_place(own["facts"], 0.6)
    refused(capsys, ["evaluate", "--run", str(own["run"])], "not the one .* was trained on", own["run"], own["facts"])


def test_resume_fact_file_damaged_in_place_with_its_time_restored(own, capsys):
    forge_data_record(own["partial"], own["facts"])
    damage_in_place(own["facts"], 0.6)
    refused(capsys, train_resume(own), "not the one .* was trained on", own["partial"], own["facts"])


def test_a_large_file_reuses_its_hash_only_while_the_sample_matches(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1 << 20))
    recorded = fingerprint.file_identity(path)
    monkeypatch.setattr(fingerprint, "FULL_HASH_BELOW", 0)  # as for a file of gigabytes
    hashed = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert fingerprint.file_identity(path, recorded)["sha256"] == recorded["sha256"] and not hashed  # unchanged
    damage_in_place(path, 0.5)  # a sampled block: the middle one
    assert fingerprint.file_identity(path, recorded)["sha256"] != recorded["sha256"] and hashed


# --------------------------------------------------------------------------- damaged fact files the records do not see

def as_an_earlier_version(run: Path, facts: Path) -> None:
    """The run as a version before this one wrote it (no data record in its payloads), with a
    ``data.json`` forged for the fact file as it is now: nothing left to tell the damage."""
    for path in run.glob("*/*.pt"):
        state = load_checkpoint(path)
        state.pop("fact_file_sha256", None)
        state.get("config", {}).get("experiment", {}).pop("fact_file_sha256", None)
        save_checkpoint(path, state)
    forge_data_record(run, facts)


def test_evaluate_a_damaged_fact_file_no_record_sees_is_one_line(own, capsys):
    damage_in_place(own["facts"], 0.95)  # inside a compressed chunk of pixels
    as_an_earlier_version(own["run"], own["facts"])
    refused(capsys, ["evaluate", "--run", str(own["run"])], "cannot read the HDF5 file .*facts.h5.*damaged",
            own["run"], own["facts"])


def test_resume_on_a_damaged_fact_file_no_record_sees_is_one_line(world, tmp_path, capsys):
    facts = tmp_path / "facts.h5"
    shutil.copyfile(world["facts"], facts)
    config = tmp_path / "train.yaml"
    config.write_text(world["config"].read_text().replace(str(world["facts"]), str(facts)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", "--stop-after-task", "1"]) == 0
    damage_in_place(facts, 0.95)
    as_an_earlier_version(run, facts)
    refused(capsys, ["train", "--config", str(config), "--out", str(run), "--resume", "--no-progress"],
            "facts.h5.*(damaged|unreadable)", facts)
