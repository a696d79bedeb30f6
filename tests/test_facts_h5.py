"""The fact HDF5 contract: round trip, atomic writes, and clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data_prep
from data_prep.facts import fact_file as facts_h5
from data_prep.errors import FactFileError
from data_prep.facts.fact_file import FORMAT_VERSION, open_facts, write_fact_file
from triplets.facts.data import fact_image_dataset

FACTS = [("man", None, None), ("man", "tall", None), ("man", "riding", "horse"), ("horse", None, None)]


def _example(num_samples: int = 10, image_size: int | None = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sample_fact = np.arange(num_samples) % len(FACTS)
    return {
        "facts": FACTS,
        "sample_fact": sample_fact,
        "sample_image_id": rng.integers(1, 1000, num_samples),
        "sample_box": rng.uniform(0, 50, (num_samples, 4)).astype(np.float32),
        "sample_split": (np.arange(num_samples) % 3 == 0).astype(np.int8),
        "task_of_fact": np.array([0, 1, 1, 0]),
        "sample_pixels": None if image_size is None else rng.integers(0, 256, (num_samples, image_size, image_size, 3),
                                                                     dtype=np.uint8),
        "provenance": {"source": "unit test", "dropped": {"x": 1}},
        "fact_embeddings": rng.normal(size=(len(FACTS), 6)).astype(np.float32),
        "encoder_name": "toy",
    }


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    example = _example()
    path = write_fact_file(tmp_path / "f.h5", **example)
    with data_prep.open_facts(path) as facts:
        assert facts.facts == FACTS
        assert facts.fact_order.tolist() == [1, 2, 3, 1]
        np.testing.assert_array_equal(facts.slot_masks, [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
        np.testing.assert_array_equal(facts.sample_fact, example["sample_fact"])
        np.testing.assert_array_equal(facts.sample_image_id, example["sample_image_id"])
        np.testing.assert_array_equal(facts.sample_box, example["sample_box"])
        np.testing.assert_array_equal(facts.sample_split, example["sample_split"])
        np.testing.assert_array_equal(facts.task_of_fact, example["task_of_fact"])
        np.testing.assert_array_equal(facts.fact_embeddings, example["fact_embeddings"])
        assert facts.num_tasks == 2 and facts.image_size == 4 and facts.has_pixels
        assert facts.encoder_name == "toy" and facts.provenance == example["provenance"]
        assert facts.vocabulary == ["horse", "man", "riding", "tall"]
        np.testing.assert_array_equal(facts.facts_of_task(1), [1, 2])
        # samples of task 1 (facts 1, 2) in train (split 0)
        expected = [i for i in range(10) if example["sample_fact"][i] in (1, 2) and example["sample_split"][i] == 0]
        np.testing.assert_array_equal(facts.sample_indices(1, "train"), expected)
        np.testing.assert_array_equal(facts.sample_indices(split=1), np.flatnonzero(example["sample_split"] == 1))
        np.testing.assert_array_equal(facts.pixels([5, 2, 5]), example["sample_pixels"][[5, 2, 5]])
        dataset = fact_image_dataset(facts, 1, "train")
        assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == len(expected)
        image, fact_id = dataset[0]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 4, 4)
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, example["sample_pixels"][expected[0]], atol=1e-3)
        assert fact_id == example["sample_fact"][expected[0]]
        loader = torch.utils.data.DataLoader(dataset, batch_size=4)
        assert sum(len(batch[1]) for batch in loader) == len(expected)
        # picklable (DataLoader workers under spawn): each copy opens its own handle
        import pickle

        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[1][0], dataset[1][0]) and copy[1][1] == dataset[1][1]


def test_pixel_blocks_equal_pixel_array(tmp_path: Path) -> None:
    example = _example(num_samples=7)
    pixels = example.pop("sample_pixels")
    blocks = [(0, pixels[:3]), (3, pixels[3:4]), (4, pixels[4:])]
    write_fact_file(tmp_path / "blocks.h5", sample_pixels=iter(blocks), image_size=4, **example)
    with open_facts(tmp_path / "blocks.h5") as facts:
        np.testing.assert_array_equal(facts.pixels(np.arange(7)), pixels)


def test_without_pixels_or_embeddings(tmp_path: Path) -> None:
    example = _example(image_size=None)
    example["fact_embeddings"] = None
    example["encoder_name"] = None
    write_fact_file(tmp_path / "f.h5", **example)
    with open_facts(tmp_path / "f.h5") as facts:
        assert not facts.has_pixels and facts.image_size is None and facts.fact_embeddings is None
        assert facts.encoder_name is None
        with pytest.raises(FactFileError, match="no pixels"):
            fact_image_dataset(facts, 0, "train")


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    example = _example(num_samples=6)
    pixels = example.pop("sample_pixels")

    def blocks_then_crash():
        yield 0, pixels[:3]
        raise KeyboardInterrupt("killed midway")

    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        write_fact_file(out, sample_pixels=blocks_then_crash(), image_size=4, **example)
    assert list(tmp_path.iterdir()) == []
    # an existing file at the output path survives a failed rewrite untouched
    write_fact_file(out, sample_pixels=pixels, **example)
    before = out.read_bytes()
    with pytest.raises(FactFileError, match="without pixels"):
        write_fact_file(out, sample_pixels=iter([(0, pixels[:2])]), image_size=4, **example)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_bad_inputs_to_the_writer(tmp_path: Path) -> None:
    example = _example()
    example["task_of_fact"] = np.array([0, 2, 2, 0])  # task 1 empty
    with pytest.raises(FactFileError, match="every task non-empty"):
        write_fact_file(tmp_path / "f.h5", **example)
    example = _example()
    example["facts"] = [("man", None, "horse")] + FACTS[1:]
    with pytest.raises(FactFileError, match="object but no predicate"):
        write_fact_file(tmp_path / "f.h5", **example)
    assert not (tmp_path / "f.h5").exists()


def test_other_format_version_is_named(tmp_path: Path) -> None:
    path = write_fact_file(tmp_path / "f.h5", **_example())
    with h5py.File(path, "a") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(FactFileError, match=f"format_version {FORMAT_VERSION + 1}"):
        open_facts(path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = write_fact_file(tmp_path / "f.h5", **_example(num_samples=200, image_size=16))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FactFileError, match="truncated"):
        with open_facts(truncated) as facts:
            facts.pixels(np.arange(200))


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    path = write_fact_file(tmp_path / "f.h5", **_example())
    with h5py.File(path, "a") as handle:
        del handle["samples/split"]
    with pytest.raises(FactFileError, match="missing the dataset 'samples/split'"):
        open_facts(path)


def test_incomplete_flag_and_missing_file(tmp_path: Path) -> None:
    path = write_fact_file(tmp_path / "f.h5", **_example())
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = False
    with pytest.raises(FactFileError, match="incomplete"):
        open_facts(path)
    with pytest.raises(FactFileError, match="does not exist"):
        open_facts(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FactFileError, match="truncated or not an HDF5 file"):
        open_facts(tmp_path / "text.h5")


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, data_prep.facts.fact_file, data_prep.sources.visual_genome; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]  # data_prep never imports torch (h5py is a hard dependency)


def test_console_script_prepare_does_not_import_torch() -> None:
    """`prepare` streams Visual Genome in bounded memory; torch alone is ~0.9 GB resident (issue 27:
    an import of mas_core from triplets.language brought it back, 0.08 -> 1.47 of json.load's peak)."""
    import subprocess
    import sys

    code = ("import sys\nfrom triplets import cli\n"
            "for command in (['prepare', 'vg', '--help'], ['prepare', 'lll', '--help'], ['synth', '--help']):\n"
            "    try:\n        cli.main(command)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == "False"
