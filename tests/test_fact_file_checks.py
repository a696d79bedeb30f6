"""open_facts refuses a fact file whose version, dtypes, shapes or ids are wrong, naming the dataset and
what it expected (data_prep.facts.checks); valid files of every writer still open. The CLI case
(`mas-triplets train` on a tampered file) is one line, exit 2, and writes nothing."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import yaml

from data_prep.errors import DataPrepError, FactFileError
from data_prep.facts.fact_file import FORMAT_VERSION, open_facts, write_fact_file

REPO = Path(__file__).resolve().parent.parent
FACTS = [("man", None, None), ("man", "tall", None), ("man", "riding", "horse"), ("horse", None, None)]


def write_valid(path: Path, num_samples: int = 12, image_size: int = 4) -> Path:
    rng = np.random.default_rng(0)
    return write_fact_file(
        path, facts=FACTS, sample_fact=np.arange(num_samples) % len(FACTS),
        sample_image_id=rng.integers(1, 1000, num_samples),
        sample_box=rng.uniform(0, 50, (num_samples, 4)).astype(np.float32),
        sample_split=(np.arange(num_samples) % 3 == 0).astype(np.int8), task_of_fact=np.array([0, 1, 1, 0]),
        sample_pixels=rng.integers(0, 256, (num_samples, image_size, image_size, 3), dtype=np.uint8),
        provenance={"source": "unit test"}, fact_embeddings=rng.normal(size=(len(FACTS), 6)).astype(np.float32),
        encoder_name="toy")


def _replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def tamper(handle: h5py.File) -> None:
        del handle[name]
        handle.create_dataset(name, data=data)
    return tamper


def _set_attr(name: str, value: object) -> Callable[[h5py.File], None]:
    def tamper(handle: h5py.File) -> None:
        handle.attrs[name] = value
    return tamper


def _edit(name: str, index: int | tuple, value: object) -> Callable[[h5py.File], None]:
    def tamper(handle: h5py.File) -> None:
        data = handle[name][()]
        data[index] = value
        del handle[name]
        handle.create_dataset(name, data=data)
    return tamper


CASES: dict[str, tuple[Callable[[h5py.File], None], tuple[str, ...]]] = {
    "version as a string": (_set_attr("format_version", str(FORMAT_VERSION)), ("format_version '1'", "integer")),
    "version as an array": (_set_attr("format_version", np.array([FORMAT_VERSION, FORMAT_VERSION])),
                            ("format_version", "expected the integer")),
    "version as a float": (_set_attr("format_version", float(FORMAT_VERSION)), ("format_version 1.0",)),
    "another version": (_set_attr("format_version", FORMAT_VERSION + 1), (f"format_version {FORMAT_VERSION + 1}",)),
    "complete as a string": (_set_attr("complete", "yes"), ("incomplete",)),
    "float pixels": (_replace("samples/pixels", np.zeros((12, 4, 4, 3), np.float32)),
                     ("'samples/pixels'", "float32", "expected uint8 [N, S, S, 3]")),
    "one-channel pixels": (_replace("samples/pixels", np.zeros((12, 4, 4, 1), np.uint8)),
                           ("'samples/pixels'", "shape [12, 4, 4, 1]", "[N, S, S, 3]")),
    "non-square pixels": (_replace("samples/pixels", np.zeros((12, 4, 5, 3), np.uint8)), ("'samples/pixels'",)),
    "pixels of fewer samples": (_replace("samples/pixels", np.zeros((11, 4, 4, 3), np.uint8)),
                                ("'samples/pixels'", "N = 12 samples")),
    "negative task id": (_edit("facts/task", 0, -1), ("'facts/task'", "-1", "task ids in 0..1")),
    "task id beyond num_tasks": (_edit("facts/task", 3, 2), ("'facts/task'", "task ids in 0..1")),
    "an empty task": (_edit("facts/task", slice(None), 0), ("task 1", "no fact")),
    "num_tasks as a string": (_set_attr("num_tasks", "2"), ("'num_tasks'", "expected an integer")),
    "negative fact id": (_edit("samples/fact", 5, -3), ("'samples/fact'", "-3", "fact ids in 0..3")),
    "fact id beyond the facts": (_edit("samples/fact", 5, 4), ("'samples/fact'", "fact ids in 0..3")),
    "fact id that wraps in int32": (_replace("samples/fact", np.full(12, 2**32 + 1, np.uint64)),
                                    ("'samples/fact'", "4294967297")),
    "float task ids": (_replace("facts/task", np.array([0.0, 1.5, 1.0, 0.0])),
                       ("'facts/task'", "float64", "expected integers")),
    "string fact ids": (_replace("samples/fact", np.array([b"0"] * 12)), ("'samples/fact'", "expected integers")),
    "split code 2": (_edit("samples/split", 0, 2), ("'samples/split'", "0..1")),
    "negative image id": (_edit("samples/image_id", 0, -5), ("'samples/image_id'", "-5")),
    "NaN box": (_edit("samples/box", (0, 0), np.nan), ("'samples/box'", "NaN")),
    "negative box": (_edit("samples/box", (0, 2), -4.0), ("'samples/box'", "negative")),
    "box of three columns": (_replace("samples/box", np.zeros((12, 3), np.float32)), ("'samples/box'", "[N, 4]")),
    "order that contradicts the slots": (_edit("facts/order", 2, 1), ("'facts/order'", "fact 2")),
    "order 4": (_edit("facts/order", 2, 4), ("'facts/order'", "1..3")),
    "slot mask of 0.5": (_edit("facts/slot_mask", (0, 0), 0.5), ("'facts/slot_mask'",)),
    "embedding width not 3*d": (_replace("facts/embedding", np.zeros((4, 5), np.float32)),
                                ("'facts/embedding'", "[F, 3*d]")),
    "infinite embedding": (_edit("facts/embedding", (0, 0), np.inf), ("'facts/embedding'", "infinite")),
    "fewer task rows than facts": (_replace("facts/task", np.array([0, 1, 1])), ("'facts/task'", "[F]")),
    "image_size attribute disagrees": (_set_attr("image_size", 8), ("'image_size'",)),
    "num_samples attribute disagrees": (_set_attr("num_samples", 13), ("'num_samples'",)),
    "empty subject": (_edit("facts/subject", 0, ""), ("empty subject",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_file_is_refused_naming_the_dataset(tmp_path: Path, case: str) -> None:
    path = write_valid(tmp_path / "facts.h5")
    tamper, fragments = CASES[case]
    with h5py.File(path, "a") as handle:
        tamper(handle)
    with pytest.raises(FactFileError) as caught:
        open_facts(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(caught.value, DataPrepError)


def test_valid_files_of_every_shape_still_open(tmp_path: Path) -> None:
    with open_facts(write_valid(tmp_path / "a.h5")) as facts:
        assert facts.num_tasks == 2 and facts.image_size == 4 and facts.num_samples == 12
    no_pixels = write_fact_file(
        tmp_path / "b.h5", facts=FACTS[:1], sample_fact=np.zeros(2, np.int64), sample_image_id=np.array([0, 3]),
        sample_box=np.zeros((2, 4), np.float32), sample_split=np.array([0, 1], np.int8),
        task_of_fact=np.array([0]), sample_pixels=None, provenance={})
    with open_facts(no_pixels) as facts:
        assert not facts.has_pixels and facts.num_tasks == 1
    empty = write_fact_file(
        tmp_path / "c.h5", facts=[], sample_fact=np.zeros(0, np.int64), sample_image_id=np.zeros(0, np.int64),
        sample_box=np.zeros((0, 4), np.float32), sample_split=np.zeros(0, np.int8),
        task_of_fact=np.zeros(0, np.int64), sample_pixels=None, provenance={})
    with open_facts(empty) as facts:
        assert facts.num_facts == 0 and facts.num_tasks == 0


def test_checks_read_no_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation cost stays bounded: the pixel dataset is checked by its metadata, never read."""
    path = write_valid(tmp_path / "facts.h5", num_samples=64, image_size=16)
    read: list[str] = []
    original = h5py.Dataset.__getitem__

    def recording(self: h5py.Dataset, key: object) -> object:
        read.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    with open_facts(path):
        pass
    assert "/samples/pixels" not in read


def test_train_on_a_tampered_file_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write_valid(tmp_path / "facts.h5")
    with h5py.File(path, "a") as handle:
        _edit("facts/task", 0, -1)(handle)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"fact_file": str(path)}}))
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.md").write_text("earlier results\n")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "triplets.cli", "train", "--config", str(config), "--out",
                             str(out / "run"), "--no-progress"], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'facts/task'" in lines[0] and "-1" in lines[0], result.stderr[-2000:]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert after == before
