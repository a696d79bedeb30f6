"""The fault suite, part two: evaluate, query and recognition (the helpers, the fixtures and
the rules every case follows: tests/test_faults.py)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from test_faults import (  # noqa: F401 - fixtures are found by name
    flip_byte,
    make_tiny_fact_file,
    own,
    rec_copy,
    recognition_run,
    refused,
    users_folder,
    world,
)


# --------------------------------------------------------------------------- evaluate

def test_evaluate_no_run_folder(tmp_path, capsys):
    refused(capsys, ["evaluate", "--run", str(tmp_path / "nowhere")], "no run folder", tmp_path)


def test_evaluate_folder_that_is_not_a_run(tmp_path, capsys):
    folder = users_folder(tmp_path)
    refused(capsys, ["evaluate", "--run", str(folder)], "not a run folder", folder)


def test_evaluate_model_with_flipped_bytes(own, capsys):
    flip_byte(own["run"] / "finetune" / "model.pt", 0.3)
    refused(capsys, ["evaluate", "--run", str(own["run"])], "damaged", own["run"])


def test_evaluate_results_json_edited(own, capsys):
    path = own["run"] / "results.json"
    results = json.loads(path.read_text())
    results["methods"]["finetune"]["avg_acc"] = 0.123456
    path.write_text(json.dumps(results, indent=2))
    refused(capsys, ["evaluate", "--run", str(own["run"])], "changed after it was written", own["run"])


def test_evaluate_results_json_not_json(own, capsys):
    (own["run"] / "results.json").write_bytes(b"\x00\x01binary")
    refused(capsys, ["evaluate", "--run", str(own["run"])], "cannot read the results document", own["run"])


def test_evaluate_fact_file_changed_same_vocabulary(own, capsys):
    # the same facts, other pixels: the vocabulary fingerprint agrees, the content does not
    make_tiny_fact_file(own["facts"], num_tasks=2, facts_per_task=4, train_per_fact=3, test_per_fact=2,
                        image_size=8, slot_dim=4, seed=5)
    refused(capsys, ["evaluate", "--run", str(own["run"])], "not the one .* was trained on", own["run"], own["facts"])


def test_evaluate_fact_file_gone(own, capsys):
    own["facts"].unlink()
    refused(capsys, ["evaluate", "--run", str(own["run"])], "is gone", own["run"])


def test_evaluate_config_yaml_not_utf8(own, capsys):
    (own["run"] / "config.yaml").write_bytes(b"\xff\xff\xff")
    refused(capsys, ["evaluate", "--run", str(own["run"])], "not a readable run config", own["run"])


def test_evaluate_bad_batch_size(world, capsys):
    refused(capsys, ["evaluate", "--run", str(world["run"]), "--batch-size", "0"], "batch-size", world["run"])


# --------------------------------------------------------------------------- query

def test_query_fact_file_changed(own, capsys):
    make_tiny_fact_file(own["facts"], num_tasks=2, facts_per_task=4, train_per_fact=3, test_per_fact=2,
                        image_size=8, slot_dim=4, seed=3)
    refused(capsys, ["query", "--run", str(own["run"]), "--text", "subj0_0"], "not the one .* was trained on",
            own["run"], own["facts"])


def test_query_model_with_flipped_bytes(own, capsys):
    flip_byte(own["run"] / "finetune" / "model.pt", 0.7)
    refused(capsys, ["query", "--run", str(own["run"]), "--text", "subj0_0"], "damaged", own["run"])


def test_query_image_missing(world, tmp_path, capsys):
    refused(capsys, ["query", "--run", str(world["run"]), "--image", str(tmp_path / "absent.png")], "not found",
            world["run"])


def test_query_image_not_an_image(world, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    refused(capsys, ["query", "--run", str(world["run"]), "--image", str(tmp_path / "x.png")], "decode",
            world["run"])


@pytest.mark.parametrize("argv, pattern", [
    (["--text", "subj0_0", "--k", "0"], "--k"),
    (["--text", "subj0_0", "--box", "1,2,3,4"], "--box applies to --image"),
    (["--text", "subj0_0", "--method", "finetun"], "did you mean 'finetune'"),
    (["--text", ""], "."),
])
def test_query_bad_options(world, capsys, argv, pattern):
    refused(capsys, ["query", "--run", str(world["run"]), *argv], pattern, world["run"])


def test_query_encoder_folder_with_unsafe_weights(world, tmp_path, capsys):
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "intermediate_size": 8, "vocab_size": 8}))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))

    class RunsCode:
        def __reduce__(self):
            return (os.getpid, ())

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    refused(capsys, ["query", "--run", str(world["run"]), "--text", "an unseen phrase", "--encoder", str(folder)],
            "refused the weights", world["run"], folder)


def test_query_forged_index_with_its_checksum_updated(own, capsys):
    import numpy as np

    from triplets.index import load_index, sidecar_path

    path = own["run"] / "finetune" / "index" / "images.faiss"
    index = load_index(path)
    vectors = np.random.default_rng(0).normal(size=(index.count, index.dim)).astype(np.float32)
    from triplets.index import build_index

    forged = build_index(vectors, ids=index.ids, fingerprint=index.fingerprint, metadata=index.metadata)
    forged.save(path)  # a consistent checksum and the right model fingerprint, other vectors
    assert json.loads(sidecar_path(path).read_text())["fingerprint"] == index.fingerprint
    refused(capsys, ["query", "--run", str(own["run"]), "--text", "subj0_0"], "does not hold the vectors", own["run"])


def test_query_index_with_flipped_bytes(own, capsys):
    flip_byte(own["run"] / "finetune" / "index" / "facts.faiss", 0.9)
    refused(capsys, ["query", "--run", str(own["run"]), "--text", "subj0_0"], "checksum", own["run"])


# --------------------------------------------------------------------------- recognition

def test_recognition_out_is_a_file(recognition_run, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "f")],
            "is a file", tmp_path)


def test_recognition_resume_into_a_folder_that_is_not_a_run(recognition_run, tmp_path, capsys):
    folder = users_folder(tmp_path)
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(folder), "--resume"],
            "not a run folder", folder)


def test_recognition_does_not_replace_a_finished_run(recognition_run, rec_copy, capsys):
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(rec_copy)],
            "--resume", rec_copy)


def test_recognition_into_a_facts_run(recognition_run, world, tmp_path, capsys):
    shutil.copytree(world["run"], tmp_path / "facts_run")
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "facts_run"),
                     "--resume"], "facts run", tmp_path / "facts_run")


def test_recognition_resume_result_json_edited(recognition_run, rec_copy, capsys):
    path = rec_copy / "finetune" / "result.json"
    saved = json.loads(path.read_text())
    saved["avg_acc"] = 0.123456
    path.write_text(json.dumps(saved))
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(rec_copy), "--resume",
                     "--quiet"], "changed after it was written", rec_copy)


def test_recognition_resume_checkpoint_with_flipped_bytes(recognition_run, rec_copy, capsys):
    (rec_copy / "finetune" / "result.json").unlink()  # not finished: resumed from its checkpoint
    flip_byte(rec_copy / "finetune" / "checkpoint.pt")
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(rec_copy), "--resume",
                     "--quiet"], "is damaged", rec_copy)


def test_recognition_resume_prepared_data_changed(recognition_run, rec_copy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(recognition_run["data"], data)
    record = json.loads((rec_copy / "data.json").read_text())
    prepared = Path(record["tasks"]["low"]["path"])
    moved = data / prepared.name
    # the run, pointed at the copied data, is accepted (same bytes) ...
    config = tmp_path / "r.yaml"
    raw = yaml.safe_load(recognition_run["config"].read_text())
    raw["data_dir"] = str(data)
    config.write_text(yaml.safe_dump(raw))
    # ... the same file with other bytes is not
    flip_byte(moved, 0.99)
    refused(capsys, ["recognition", "--config", str(config), "--out", str(rec_copy), "--resume", "--quiet"],
            "not the one .* was trained on", rec_copy, data)


def test_recognition_misspelt_method(recognition_run, tmp_path, capsys):
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "r"),
                     "--methods", "finetunee"], "did you mean 'finetune'", tmp_path)


def test_recognition_learning_rate_nan(recognition_run, tmp_path, capsys):
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "r"),
                     "--set", "train.lr=.nan"], "lr", tmp_path)


def test_recognition_unknown_key(recognition_run, tmp_path, capsys):
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "r"),
                     "--set", "train.lerning_rate=0.1"], "did you mean 'lr'", tmp_path)


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_during_training_is_one_line_and_resume_finishes_the_run(world, tmp_path, capsys):
    """The second checkpoint meets a full disk (a real ENOSPC from /dev/full): exit 2 with one line,
    no temporary file left, the first task's checkpoint kept; ``--resume`` with space again gives
    the uninterrupted run's figures."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    from triplets.cli import main
    import mas_core.loop as loop_module

    real_save = loop_module.save_checkpoint
    calls: list[Path] = []

    def save_until_the_disk_fills(path, state):
        calls.append(Path(path))
        if len(calls) == 2:
            with open("/dev/full", "wb") as full:  # the kernel's own "No space left on device"
                full.write(b"\0" * (1 << 16))
        real_save(path, state)

    run = tmp_path / "run"
    argv = ["train", "--config", str(world["config"]), "--out", str(run), "--no-progress"]
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_until_the_disk_fills)
        code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "no space left on the device" in lines[0] and "--resume" in lines[0], lines
    assert len(calls) == 2 and calls[0].is_file()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert main(argv + ["--resume"]) == 0
    resumed = json.loads((run / "results.json").read_text())["methods"]
    uninterrupted = json.loads((world["run"] / "results.json").read_text())["methods"]
    assert resumed.keys() == uninterrupted.keys()
    for method in resumed:
        assert resumed[method]["accuracy_matrix"] == uninterrupted[method]["accuracy_matrix"], method


def test_disk_full_error_reads_errno_text_and_causes():
    import errno

    from triplets.cli import disk_full_error

    assert "writing /data/run/x.pt" in disk_full_error(OSError(errno.ENOSPC, "No space left on device", "/data/run/x.pt"))
    assert disk_full_error(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    h5py_text = ("Can't synchronously write data (file write failed: time = Mon Dec 7, filename = "
                 "'/tmp/run/.facts.h5.tmp', file descriptor = 11, errno = 28, error message = 'No space left')")
    assert "writing /tmp/run/.facts.h5.tmp" in disk_full_error(OSError(h5py_text))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as outer:
        assert disk_full_error(outer) is not None
    assert disk_full_error(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert disk_full_error(RuntimeError("errno = 280 in some other text")) is None
    assert disk_full_error(RuntimeError("shape mismatch")) is None
