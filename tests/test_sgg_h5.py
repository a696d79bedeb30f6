"""prepare_sgg on a tiny VG-SGG.h5 written by the test, pinning each convention of the format."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from data_prep import open_facts
from data_prep.errors import DataPrepError
from data_prep.sources.sgg_h5 import prepare_sgg
from triplets.facts.data import fact_image_dataset

RED = (220, 20, 20)

# real boxes (x, y, w, h): image 10 is 256x128 (long side 256 -> factor 1024/256 = 4), image 11 is 64x512 (factor 2)
REAL_BOXES = {0: (20, 10, 40, 30), 1: (100, 50, 20, 20), 2: (0, 0, 8, 8), 3: (0, 100, 32, 64)}


def _centre_scaled(box: tuple[int, int, int, int], factor: float) -> list[int]:
    x, y, w, h = box
    return [int((x + w / 2) * factor), int((y + h / 2) * factor), int(w * factor), int(h * factor)]


def write_sgg_fixture(root: Path, *, drop: str | None = None, scale: int = 1024, attributes: bool = True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    factors = {0: 1024 / 256, 1: 1024 / 256, 2: 1024 / 256, 3: 1024 / 512}
    boxes_1024 = np.array([_centre_scaled(REAL_BOXES[i], factors[i]) for i in range(4)], dtype=np.int32)
    datasets = {
        f"boxes_{scale}": boxes_1024 if scale == 1024 else boxes_1024 // 2,
        "labels": np.array([[1], [2], [0], [2]], dtype=np.int64),  # 1-indexed; 0 = no label
        "img_to_first_box": np.array([0, 3], dtype=np.int32),
        "img_to_last_box": np.array([2, 3], dtype=np.int32),  # inclusive
        "relationships": np.array([[0, 1], [1, 0]], dtype=np.int32),  # global box rows
        "predicates": np.array([[1], [2]], dtype=np.int64),
        "img_to_first_rel": np.array([0, -1], dtype=np.int32),  # -1: image 11 has none
        "img_to_last_rel": np.array([1, -1], dtype=np.int32),
        "split": np.array([0, 2], dtype=np.int32),  # 0 train, 2 test
        "active_object_mask": np.ones((4, 1), dtype=bool),
    }
    if attributes:
        datasets["attributes"] = np.array([[1, 0], [0, 0], [0, 0], [0, 0]], dtype=np.int64)
    if drop:
        del datasets[drop]
    with h5py.File(root / "VG-SGG.h5", "w") as handle:
        for name, data in datasets.items():
            handle.create_dataset(name, data=data)
    dicts = {"idx_to_label": {"1": "Man", "2": "horse"}, "label_to_idx": {"man": 1, "horse": 2},
             "idx_to_predicate": {"1": "riding", "2": "near"}, "predicate_to_idx": {"riding": 1, "near": 2},
             "idx_to_attribute": {"1": "tall"}}
    (root / "VG-SGG-dicts.json").write_text(json.dumps(dicts))
    # image 1592 is one of the real dump's undecodable images: listed in image_data.json, absent from the h5
    image_data = [{"image_id": 10, "width": 256, "height": 128}, {"image_id": 1592, "width": 800, "height": 600},
                  {"image_id": 11, "width": 64, "height": 512}]
    (root / "image_data.json").write_text(json.dumps(image_data))
    images = root / "images" / "VG_100K"
    images.mkdir(parents=True, exist_ok=True)
    first = Image.new("RGB", (256, 128), (255, 255, 255))
    first.paste(RED, (20, 10, 60, 40))
    first.save(images / "10.jpg", quality=95)
    Image.new("RGB", (64, 512), (0, 0, 0)).save(images / "11.jpg")
    return {"h5_path": root / "VG-SGG.h5", "dicts_path": root / "VG-SGG-dicts.json",
            "image_data_path": root / "image_data.json", "images_dir": root / "images"}


def _run(tmp_path: Path, fixture: dict, **options: object):
    settings = {"num_tasks": 2, "min_fact_count": 1, "progress": False, "image_size": 8}
    settings.update(options)
    return prepare_sgg(out=tmp_path / "facts.h5", **fixture, **settings)


def _samples(facts) -> dict:
    samples: dict = {}
    for index, fact_id in enumerate(facts.sample_fact.tolist()):
        samples.setdefault(facts.facts[fact_id], []).append(
            (int(facts.sample_image_id[index]), facts.sample_box[index].tolist(), int(facts.sample_split[index])))
    return {fact: sorted(rows) for fact, rows in samples.items()}


@pytest.mark.parametrize("scale", [1024, 512])
def test_conventions_boxes_indices_ranges_split(tmp_path: Path, scale: int) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg", scale=scale)
    report = _run(tmp_path, fixture, no_images=True)
    with open_facts(tmp_path / "facts.h5") as facts:
        assert _samples(facts) == {
            ("man", None, None): [(10, [20, 10, 40, 30], 0)],
            ("horse", None, None): [(10, [100, 50, 20, 20], 0), (11, [0, 100, 32, 64], 1)],
            ("man", "tall", None): [(10, [20, 10, 40, 30], 0)],
            ("man", "riding", "horse"): [(10, [20, 10, 100, 60], 0)],  # union box
            ("horse", "near", "man"): [(10, [20, 10, 100, 60], 0)],
        }
        assert facts.provenance["box_scale"] == scale
    assert report.dropped == {"boxes: unknown or zero label": 1}


def test_without_attributes_there_are_no_order_2_facts(tmp_path: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg", attributes=False)
    _run(tmp_path, fixture, no_images=True)
    with open_facts(tmp_path / "facts.h5") as facts:
        assert 2 not in facts.fact_order.tolist() and len(facts.facts) == 4


def test_crops_come_from_the_rescaled_boxes(tmp_path: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg")
    _run(tmp_path, fixture)
    with open_facts(tmp_path / "facts.h5") as facts:
        man = facts.facts.index(("man", None, None))
        index = int(np.flatnonzero(facts.sample_fact == man)[0])
        np.testing.assert_allclose(facts.pixels([index])[0].reshape(-1, 3).mean(axis=0), RED, atol=25)
        assert len(fact_image_dataset(facts, None, "test")) == 1


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg", drop="img_to_first_box")
    with pytest.raises(DataPrepError, match="no dataset 'img_to_first_box'"):
        _run(tmp_path, fixture, no_images=True)
    assert not (tmp_path / "facts.h5").exists()


def test_image_count_mismatch_is_named(tmp_path: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg")
    (fixture["image_data_path"]).write_text(json.dumps([{"image_id": 10, "width": 256, "height": 128}]))
    with pytest.raises(DataPrepError, match="lists 1 images but the h5 has 2"):
        _run(tmp_path, fixture, no_images=True)
