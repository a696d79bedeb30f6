"""The fault suite of `prepare vg|sgg|lll|images` and `synth` (issue 28): what a benchmark's own files may
point at, how much of a file is read at once, where the output goes and what the arguments may be.

Every case runs the CLI in-process and asserts exit code 2, exactly one line on stderr (argparse's
usage line aside) and that no file changed: every file of the dataset, of the folder outside it that
a hostile link points at, and of the output folder is hashed before and after (hidden files
included).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from data_prep import open_facts
from triplets.cli import main

from test_faults import refused as faults_refused
from test_faults import snapshot
from test_hostile_inputs import prepare_commands
from test_lll_benchmark import SPLIT, write_lll_fixture

SECRET = "SECRET-TOKEN-123"


# --------------------------------------------------------------------------- helpers

def refused(capsys, argv: list[str], pattern: str, *watch: Path) -> str:
    """:func:`test_faults.refused` (exit 2, one line matching ``pattern``, no file under ``watch``
    changed), the line also short."""
    line = faults_refused(capsys, argv, pattern, *watch)
    assert len(line) < 600, len(line)
    return line


@pytest.fixture()
def lll(tmp_path: Path) -> dict[str, Path]:
    """The two-task benchmark fixture, a folder beside it holding a secret, and an output folder with a file."""
    root = write_lll_fixture(tmp_path / "data")
    outside = tmp_path / "data" / "outside"
    outside.mkdir()
    (outside / "secret_vector.txt").write_text(f"{SECRET}\n")
    shutil.copyfile(root / "images" / "train" / "img1.png", outside / "secret.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "facts.h5").write_bytes(b"an earlier fact file the user keeps")
    return {"root": root, "outside": outside, "out_dir": out_dir, "out": out_dir / "facts.h5",
            "train": root / "splits" / SPLIT / "B1_train.csv", "vectors": root / "NLP_feat" / "unique_facts"}


def lll_argv(lll: dict[str, Path], out: Path | None = None) -> list[str]:
    return ["prepare", "lll", "--root", str(lll["root"]), "--split", SPLIT, "--out", str(out or lll["out"]),
            "--image-size", "8", "--no-progress", "--text-encoder", "native"]


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def watched(lll: dict[str, Path]) -> tuple[Path, ...]:
    return lll["root"].parent, lll["out_dir"]


# --------------------------------------------------------------------------- prepare lll: links leave the dataset

@pytest.mark.parametrize("link, reason", [
    ("../outside/secret_vector.txt", "leads outside the dataset"),
    ("NLP_feat/../../outside/secret_vector.txt", "leads outside the dataset"),
    ("/etc/hostname", "absolute path"),
])
def test_lll_vector_link_outside_the_dataset_is_refused_unread(lll, capsys, link, reason) -> None:
    rewrite(lll["train"], "NLP_feat/unique_facts/f10.txt", link)
    line = refused(capsys, lll_argv(lll), rf"B1_train.csv, line 2: language vector link .*{reason}", *watched(lll))
    assert SECRET not in line


def test_lll_vector_symlink_out_of_the_dataset_is_refused(lll, capsys) -> None:
    link = lll["vectors"] / "f10.txt"
    link.unlink()
    link.symlink_to(lll["outside"] / "secret_vector.txt")
    line = refused(capsys, lll_argv(lll), "language vector link 'NLP_feat/unique_facts/f10.txt' leads outside",
                   *watched(lll))
    assert SECRET not in line


def test_lll_image_link_outside_the_dataset_is_refused(lll, capsys) -> None:
    rewrite(lll["train"], "train/img1.png", "../../outside/secret.png")
    refused(capsys, lll_argv(lll), r"B1_train.csv, line 2: image link '\.\./\.\./outside/secret.png' leads outside",
            *watched(lll))
    rewrite(lll["train"], "../../outside/secret.png", str(lll["outside"] / "secret.png"))
    refused(capsys, lll_argv(lll), "image link .* is an absolute path", *watched(lll))


def test_lll_image_symlink_out_of_the_dataset_is_refused(lll, capsys) -> None:
    image = lll["root"] / "images" / "train" / "img2.png"
    image.unlink()
    image.symlink_to(lll["outside"] / "secret.png")
    refused(capsys, lll_argv(lll), "line 3: image link 'train/img2.png' leads outside", *watched(lll))


def test_lll_folder_inside_images_linking_out_is_refused(lll, capsys) -> None:
    test_images = lll["root"] / "images" / "test"
    shutil.move(str(test_images), lll["outside"] / "test")
    test_images.symlink_to(lll["outside"] / "test")
    refused(capsys, lll_argv(lll), "B1_test.csv, line 2: image link 'test/img5.png' leads outside", *watched(lll))


def test_lll_images_folder_linked_in_from_elsewhere_is_the_dataset(lll, tmp_path) -> None:
    """A user's images/ (or NLP_feat/) folder may itself be a link to another disk: its files are the dataset's."""
    elsewhere = tmp_path / "bigdisk"
    shutil.move(str(lll["root"] / "images"), elsewhere / "images")
    (lll["root"] / "images").symlink_to(elsewhere / "images")
    shutil.move(str(lll["root"] / "NLP_feat"), elsewhere / "NLP_feat")
    (lll["root"] / "NLP_feat").symlink_to(elsewhere / "NLP_feat")
    out = tmp_path / "ok.h5"
    assert main(lll_argv(lll, out)) == 0
    with open_facts(out) as facts:
        assert facts.num_samples == 13


# --------------------------------------------------------------------------- prepare lll: sizes and bytes

def test_lll_vector_file_of_one_huge_line_is_refused_at_the_bound(lll, capsys) -> None:
    (lll["vectors"] / "f11.txt").write_text("0.5 " * 600_000)  # 2.4 MB on one line
    refused(capsys, lll_argv(lll), "f11.txt, line 1: a language-vector line longer than 131,072 bytes", *watched(lll))


def test_lll_vector_file_with_a_million_numbers_stops_at_the_901st(lll, capsys) -> None:
    (lll["vectors"] / "f11.txt").write_text("0.25\n" * 1_000_000)
    refused(capsys, lll_argv(lll), "f11.txt holds more than 900 numbers", *watched(lll))


def test_lll_vector_file_of_nul_bytes_is_not_echoed(lll, capsys) -> None:
    (lll["vectors"] / "f10.txt").write_bytes(b"\0" * 5000)
    line = refused(capsys, lll_argv(lll), "f10.txt, line 1, holds NUL bytes", *watched(lll))
    assert "\0" not in line and "\\x00" not in line


def test_lll_non_number_is_quoted_as_a_short_printable_excerpt(lll, capsys) -> None:
    (lll["vectors"] / "f10.txt").write_text("\x1b[31m" + "A" * 500 + "\n")
    line = refused(capsys, lll_argv(lll), r"holds the non-number '\\x1b\[31mAAAA", *watched(lll))
    assert "\x1b" not in line and "A" * 41 not in line and "'..." in line


def test_lll_csv_line_past_the_bound_is_refused(lll, capsys) -> None:
    with open(lll["train"], "a") as handle:
        handle.write("train/img1.png," + "x" * (2 << 20) + ",man,10,1,0,0\n")
    line = refused(capsys, lll_argv(lll), "B1_train.csv, line 10: a line longer than 1,048,576 bytes", *watched(lll))
    assert "xxxx" not in line


def test_lll_csv_record_spanning_lines_past_the_bound_is_refused(lll, capsys) -> None:
    with open(lll["train"], "a") as handle:
        field = '"' + ("y" * 999 + "\n") * 100 + '"'  # 100 KB, under csv's own field limit
        handle.write(",".join([field] * 20) + "\n")
    refused(capsys, lll_argv(lll), "B1_train.csv, line .*: a record longer than 1,048,576 bytes", *watched(lll))


def test_lll_csv_of_nul_bytes_is_one_clean_line(lll, capsys) -> None:
    lll["train"].write_bytes(b"\0" * 4096)
    line = refused(capsys, lll_argv(lll), "B1_train.csv, line 1: holds NUL bytes", *watched(lll))
    assert "\0" not in line


def test_lll_csv_with_header_and_no_rows_says_no_rows(lll, capsys) -> None:
    original = lll["train"].read_text()
    lll["train"].write_text(original.splitlines()[0] + "\n")
    line = refused(capsys, lll_argv(lll), "B1_train.csv has a header and no rows", *watched(lll))
    assert "missing" not in line
    lll["train"].write_text(original)
    facts = lll["root"] / "splits" / SPLIT / "B2_facts.csv"
    facts.write_text(facts.read_text().splitlines()[0] + "\n")
    refused(capsys, lll_argv(lll), "B2_facts.csv has a header and no rows", *watched(lll))


def test_lll_header_quoted_as_an_excerpt(lll, capsys) -> None:
    text = lll["train"].read_text()
    lll["train"].write_text(text.replace(",w_o\n", "," + "Z" * 5000 + "\n", 1))
    line = refused(capsys, lll_argv(lll), "missing column.s. w_o", *watched(lll))
    assert "Z" * 200 not in line


def test_lll_23_digit_fact_id_stays_exact(lll, tmp_path) -> None:
    big = 99999999999999999999999
    folder = lll["root"] / "splits" / SPLIT
    for name in ("B1_facts.csv", "B1_train.csv", "B1_test.csv"):
        path = folder / name
        text = path.read_text()
        path.write_text(text.replace(",man,10,", f",man,{big},") if name != "B1_facts.csv"
                        else text.replace("10,1,man,,", f"{big},1,man,,"))
    out = tmp_path / "big.h5"
    assert main(lll_argv(lll, out)) == 0
    with open_facts(out) as facts:
        ids = facts.provenance["source_fact_ids"]
    assert big in ids and 99999999999999991611392 not in ids


@pytest.mark.parametrize("text", ["1e3", "0x10", "12.5", "nan", "9" * 41])
def test_lll_id_that_is_not_an_exact_integer_is_refused(lll, capsys, text) -> None:
    rewrite(lll["train"], ",man,10,", f",man,{text},")
    refused(capsys, lll_argv(lll), r"B1_train.csv, line 2: column id holds '.*'(\.\.\.)?; expected an integer",
            *watched(lll))


# --------------------------------------------------------------------------- output targets, before any work

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    return prepare_commands(tmp_path_factory.mktemp("sources"))


def _no_reading(monkeypatch) -> None:
    """Any attempt to read a source fails loudly: the output check must come first."""
    import data_prep.image_sets.prepare as images
    import data_prep.sources.lll_benchmark as lll_benchmark
    import data_prep.sources.sgg_h5 as sgg_h5
    import data_prep.sources.visual_genome as visual_genome

    def boom(*args, **kwargs):
        raise AssertionError("a source was read before the output was checked")

    monkeypatch.setattr(visual_genome, "stream_json_array", boom, raising=False)
    monkeypatch.setattr(sgg_h5, "h5py", None, raising=False)
    monkeypatch.setattr(lll_benchmark, "find_task_files", boom)
    monkeypatch.setattr(images, "READERS", {}, raising=False)


@pytest.mark.parametrize("command", ["vg", "sgg", "lll", "images"])
def test_prepare_out_naming_a_folder_is_refused_before_any_work(sources, tmp_path, capsys, monkeypatch, command):
    target = tmp_path / "existing_folder"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    _no_reading(monkeypatch)
    refused(capsys, [*sources[command], "--out", str(target)], f"--out {re.escape(str(target))} is a folder", tmp_path)


@pytest.mark.parametrize("command", ["vg", "sgg", "lll", "images"])
def test_prepare_out_below_a_file_is_refused(sources, tmp_path, capsys, monkeypatch, command):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _no_reading(monkeypatch)
    refused(capsys, [*sources[command], "--out", str(blocker / "sub" / "facts.h5")], "afile is not a folder", tmp_path)


def read_only_folder(path: Path, monkeypatch) -> Path:
    """A folder this process may not write into: mode 0555, and for root (whom modes do not stop)
    ``os.access`` answering as it would for another user."""
    path.mkdir()
    (path / "keep.txt").write_text("mine\n")
    path.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(target, mode, *args, **kwargs):
            if Path(target) == path and mode & os.W_OK:
                return False
            return real_access(target, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return path


@pytest.mark.parametrize("command", ["vg", "sgg", "lll", "images"])
def test_prepare_out_in_a_read_only_folder_is_refused_before_any_work(sources, tmp_path, capsys, monkeypatch, command):
    folder = read_only_folder(tmp_path / "readonly", monkeypatch)
    _no_reading(monkeypatch)
    try:
        refused(capsys, [*sources[command], "--out", str(folder / "facts.h5")],
                "cannot write into the folder .*readonly", tmp_path)
    finally:
        folder.chmod(0o755)


def test_synth_out_in_a_read_only_folder_is_refused(tmp_path, capsys, monkeypatch):
    folder = read_only_folder(tmp_path / "readonly", monkeypatch)
    try:
        refused(capsys, ["synth", "--out", str(folder / "world"), "--images", "3", "--quiet"],
                "cannot write into the folder .*readonly", tmp_path)
        refused(capsys, ["synth", "--out", str(folder), "--images", "3", "--quiet", "--force"],
                "cannot write into the folder", tmp_path)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("option, value, pattern", [
    ("--images", "1000000000", "at most 1,000,000"),
    ("--image-size", "100000x100000", "at most 4096 pixels a side"),
    ("--image-size", "5000x100", "at most 4096 pixels a side"),
    ("--seed", "-1", "seed .* from 0 to 4,294,967,295"),
    ("--seed", "99999999999999999999", "seed .* from 0 to 4,294,967,295"),
])
def test_synth_sizes_counts_and_seed_in_range_before_any_allocation(tmp_path, capsys, monkeypatch, option, value,
                                                                    pattern):
    import data_prep.worlds.synthetic as synthetic

    def boom(*args, **kwargs):
        raise AssertionError("rendering started before the arguments were checked")

    monkeypatch.setattr(synthetic, "_write_world", boom)
    for world in ("shapes", "real"):
        refused(capsys, ["synth", "--world", world, "--out", str(tmp_path / "w"), option, value, "--quiet"], pattern,
                tmp_path)
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- leftovers and Ctrl-C during the write

@pytest.mark.parametrize("command", ["lll", "images"])
def test_prepare_removes_the_leftover_temporaries_of_its_output(sources, tmp_path, command):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = [out_dir / ".facts.h5.ab12cd_4.tmp", out_dir / ".facts.h5.zzzzzzzz.tmp"]
    kept = [out_dir / ".other.h5.ab12cd34.tmp", out_dir / ".facts.h5.notes.tmp", out_dir / "notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"half a file")
    (out_dir / ".facts.h5.folder00.tmp").mkdir()  # not a file: left alone
    assert main([*sources[command], "--out", str(out_dir / "facts.h5")]) == 0
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and (out_dir / ".facts.h5.folder00.tmp").is_dir()
    assert (out_dir / "facts.h5").is_file()


INTERRUPT_DURING_WRITE = """
import signal, sys, weakref
import h5py
from triplets.cli import main

real_create = h5py.Group.create_dataset
fired = []

class Probe:
    pass

def create_dataset(self, *args, **kwargs):
    if not fired:  # Ctrl-C lands while a weak-reference callback runs, as in h5py's object registry
        fired.append(True)
        probe = Probe()

        def callback(ref):
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):
                pass

        ref = weakref.ref(probe, callback)
        del probe
    return real_create(self, *args, **kwargs)

h5py.Group.create_dataset = create_dataset
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_inside_hdf5_clean_up_during_the_write_is_honoured(lll, tmp_path):
    """Ctrl-C while the fact file is written: exit 130, one line, no "Exception ignored", no file left."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "new" / "facts.h5"
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = snapshot(*watched(lll))
    # a shell's background job (`cmd &` without job control) runs with SIGINT ignored, and a child
    # inherits that: give the child Ctrl-C's default disposition, as a terminal's command has
    result = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_WRITE, *lll_argv(lll, out)], capture_output=True,
                            text=True, env=env, cwd=repo, timeout=300,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, (result.returncode, result.stderr[-2000:])
    assert "Exception ignored" not in result.stderr
    assert result.stderr.strip().splitlines() == ["mas-triplets prepare: interrupted; finished work is checkpointed"]
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert snapshot(*watched(lll)) == before


def test_library_entry_points_check_their_output_first(lll, tmp_path) -> None:
    """The Python API refuses as the commands do (the check lives in data_prep, not only in the CLI)."""
    from data_prep.errors import DataPrepError
    from data_prep.image_sets.prepare import prepare_image_dataset
    from data_prep.sources.lll_benchmark import prepare_lll
    from data_prep.worlds.synthetic import generate_world

    folder = tmp_path / "a_folder"
    folder.mkdir()
    before = snapshot(*watched(lll), folder)
    with pytest.raises(DataPrepError, match="out .*a_folder is a folder"):
        prepare_lll(lll["root"], SPLIT, folder, progress=False)
    with pytest.raises(DataPrepError, match="out .*a_folder is a folder"):
        prepare_image_dataset("digits", None, folder)
    with pytest.raises(DataPrepError, match="seed"):
        generate_world(tmp_path / "world", num_images=3, seed=-1, progress=False)
    assert snapshot(*watched(lll), folder) == before and not (tmp_path / "world").exists()
