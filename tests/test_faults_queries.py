"""The fault suite, queries and online importance (issue 28): an accumulator that cannot apply
is refused before training; ``query`` checks its picture's path before the query, records
importance last, caps the panels it draws and cleans its leftovers (the rules every case
follows: tests/test_faults.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mas_core.checkpoint import load_checkpoint, save_checkpoint
from triplets.cli import main
from triplets.query.online_resume import ACCUMULATOR_NAME
from triplets.facts.train import train_run

from test_faults import refused
from test_query_importance import _config, _query, run, stopped_run  # noqa: F401 - fixtures are found by name


def resume_with(run: Path, use: str = "queries") -> list[str]:
    config = run / "resume.yaml"
    config.write_text((run / "run" / "config.yaml").read_text())
    return ["train", "--config", str(config), "--out", str(run / "run"), "--resume", "--no-progress",
            "--set", f"online_importance.use={use}"]


# --------------------------------------------------------------------------- online_importance.use that cannot apply

def test_resume_with_an_accumulator_recorded_after_another_task_is_refused(run, capsys):
    assert _query(run, run / "query0.png") == 0  # answered by the model after task 1
    train_run(_config(run / "facts.h5"), run / "run", resume=True, progress=False, stop_after_task=2)
    refused(capsys, resume_with(run), "online_importance.use=queries: .*online_importance.pt cannot be used: it was "
            "accumulated on the model after task 1, and the run resumes after task 2", run / "run")


def test_resume_with_an_accumulator_of_another_model_is_refused(run, capsys):
    assert _query(run, run / "query0.png") == 0
    path = run / "run" / "mas" / ACCUMULATOR_NAME
    state = load_checkpoint(path)
    name = next(iter(state["accumulator"]["fingerprint"]))
    state["accumulator"]["fingerprint"][name] = [value * 1.5 for value in state["accumulator"]["fingerprint"][name]]
    save_checkpoint(path, state)  # a well-formed file of another model's queries
    refused(capsys, resume_with(run, "mixed"), f"cannot be used: it was accumulated on another model .*{name}",
            run / "run")


def test_resume_with_an_accumulator_that_applies_goes_on(run):
    assert _query(run, run / "query0.png") == 0
    assert main(resume_with(run) + ["--stop-after-task", "2"]) == 0


# --------------------------------------------------------------------------- query: side effects, bounds, messages

def image_query(run: Path, *extra: str) -> list[str]:
    return ["query", "--run", str(run / "run"), "--image", str(run / "query0.png"), "--method", "mas", "--k", "2",
            *extra]


def test_show_with_a_bad_path_records_no_importance(run, capsys):
    refused(capsys, image_query(run, "--accumulate-importance", "--show", str(run / "picture.jpg")), r"\.png",
            run / "run")
    assert not (run / "run" / "mas" / ACCUMULATOR_NAME).exists()


def test_importance_is_recorded_only_after_the_picture_is_written(run, capsys, monkeypatch):
    import triplets.query.show as query_show
    from triplets.errors import TripletsError

    def cannot_draw(*args, **kwargs):
        raise TripletsError("cannot draw the picture")

    monkeypatch.setattr(query_show, "image_facts_png", cannot_draw)
    refused(capsys, image_query(run, "--accumulate-importance", "--show", str(run / "picture.png")), "cannot draw",
            run / "run")
    assert not (run / "run" / "mas" / ACCUMULATOR_NAME).exists()
    monkeypatch.undo()
    assert main(image_query(run, "--accumulate-importance", "--show", str(run / "picture.png"))) == 0
    assert load_checkpoint(run / "run" / "mas" / ACCUMULATOR_NAME)["accumulator"]["count"] == 1  # counted once


def test_show_into_a_folder_that_cannot_be_written_is_refused_before_the_query(run, capsys, monkeypatch):
    """As root, chmod does not stop a write: the probe fails as on a read-only file system."""
    import triplets.query.engine as query_module
    import triplets.query.show as query_show

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    def no_query(*args, **kwargs):
        raise AssertionError("the query ran")

    monkeypatch.setattr(query_show.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(query_module, "open_query", no_query)
    refused(capsys, image_query(run, "--accumulate-importance", "--show", str(run / "picture.png")),
            "cannot write into .*Read-only file system", run / "run")
    assert not (run / "picture.png").exists() and not (run / "run" / "mas" / ACCUMULATOR_NAME).exists()


def test_show_draws_at_most_the_capped_number_of_panels(run, monkeypatch):
    import triplets.query.show as query_show
    from PIL import Image

    monkeypatch.setattr(query_show, "MAX_PANELS", 2, raising=False)
    sheet = run / "sheet.png"
    assert main(["query", "--run", str(run / "run"), "--text", "subj0_0", "--k", "5", "--show", str(sheet)]) == 0
    with Image.open(sheet) as picture:
        assert picture.size == query_show.sheet_size_pixels(2)


def test_show_cap_is_fifty_panels():
    import triplets.query.show as query_show

    assert query_show.MAX_PANELS == 50 and query_show.MAX_FACT_LINES == 40


def huge_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_query_of_a_too_large_image_does_not_advise_an_option_query_lacks(run, capsys):
    bomb = huge_png_header(run / "bomb.png", 40_000, 40_000)
    err = refused(capsys, ["query", "--run", str(run / "run"), "--image", str(bomb)], "scale the image down",
                  run / "run", bomb)
    assert "--max-image-pixels" not in err and "40000 x 40000" in err


def test_a_text_encoder_typo_names_native(run, capsys):
    from triplets.errors import TripletsError
    from triplets.facts.language import load_text_encoder

    with pytest.raises(TripletsError, match="did you mean 'native'"):
        load_text_encoder("nativ")
    refused(capsys, ["query", "--run", str(run / "run"), "--text", "never|seen|fact", "--encoder", "natve"],
            "did you mean 'native'", run / "run")


def test_accumulating_removes_the_temporary_files_a_killed_call_left(run):
    method_dir = run / "run" / "mas"
    left = [method_dir / f".{ACCUMULATOR_NAME}.k2j9.tmp", method_dir / ".online_importance.json.x1.tmp"]
    kept = method_dir / ".keep.tmp"  # not the accumulator's: another writer's, left alone
    for path in left + [kept]:
        path.write_bytes(b"half a file")
    assert _query(run, run / "query0.png") == 0
    assert not any(path.exists() for path in left) and kept.exists()
