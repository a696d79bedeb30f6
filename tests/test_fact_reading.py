"""Reading rows of a fact file by slices (data_prep.facts.fact_file.read_rows) gives exactly what h5py's
point selection gives, for FactFile.pixels, the torch dataset's batched reads and streamed training batches."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.facts import fact_file as facts_h5
from data_prep.facts.fact_file import open_facts, read_rows, write_fact_file
from triplets.facts.data import FactSamples, fact_image_dataset


@pytest.fixture(scope="module")
def fact_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    count = 403
    facts = [("a", None, None), ("b", None, None), ("a", "on", "b"), ("b", "red", None)]
    return write_fact_file(
        tmp_path_factory.mktemp("reading") / "facts.h5", facts=facts,
        sample_fact=rng.integers(0, len(facts), count), sample_image_id=np.arange(count),
        sample_box=np.tile(np.array([0, 0, 8, 8], np.float32), (count, 1)),
        sample_split=(rng.random(count) < 0.3).astype(np.int8), task_of_fact=np.array([0, 1, 0, 1]),
        sample_pixels=rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8), provenance={"source": "test"},
        fact_embeddings=rng.normal(size=(len(facts), 6)).astype(np.float32), encoder_name="test")


@pytest.mark.parametrize("per_slice", [facts_h5.READ_ROWS_PER_SLICE, 3])
def test_read_rows_equals_point_selection(fact_path: Path, monkeypatch, per_slice: int) -> None:
    monkeypatch.setattr(facts_h5, "READ_ROWS_PER_SLICE", per_slice)
    rng = np.random.default_rng(1)
    with h5py.File(fact_path, "r") as handle:
        pixels = handle["samples/pixels"]
        assert pixels.chunks is not None and pixels.chunks[0] > 1
        everything = pixels[:]
        for size in (0, 1, 2, 17, 150, 403):
            rows = np.sort(rng.choice(403, size, replace=False))
            got = read_rows(pixels, rows)
            assert got.shape == (size, 8, 8, 3) and np.array_equal(got, everything[rows])
        assert np.array_equal(read_rows(handle["samples/fact"], np.array([0, 5, 402])),
                              handle["samples/fact"][[0, 5, 402]])


def test_pixels_dataset_batches_and_streamed_samples_agree(fact_path: Path) -> None:
    with open_facts(fact_path) as facts:
        wanted = np.array([400, 3, 3, 250, 0, 17])
        everything = facts._handle["samples/pixels"][:]
        assert np.array_equal(facts.pixels(wanted), everything[wanted])
        dataset = fact_image_dataset(facts, None, "train")
        batched = next(iter(DataLoader(dataset, batch_size=len(dataset))))
        one_by_one = [dataset[i] for i in range(len(dataset))]
        assert torch.equal(batched[0], torch.stack([image for image, _ in one_by_one]))
        assert batched[1].tolist() == [fact for _, fact in one_by_one]
        parts = [(0, 0), (1, None)]
        memory = FactSamples(facts, parts, in_memory=True)
        streamed = FactSamples(facts, parts, in_memory=False)
        order = [torch.randperm(len(memory), generator=torch.Generator().manual_seed(2)).split(7)][0]
        for (a_images, a_ids), (b_images, b_ids) in zip(memory.batches(order), streamed.batches(order), strict=True):
            assert torch.equal(a_images, b_images) and torch.equal(a_ids, b_ids)
