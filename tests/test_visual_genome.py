"""prepare_visual_genome on a tiny hand-written Visual Genome dump holding every quirk of the real one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import open_facts
from data_prep.errors import DataPrepError
from data_prep.text_clean import AliasMap, clean_phrase
from data_prep.facts.splits import split_by_image
from data_prep.sources.visual_genome import prepare_visual_genome
from triplets.facts.data import fact_image_dataset

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240)


def _image(path: Path, size: tuple[int, int], fills: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> None:
    image = Image.new("RGB", size, WHITE)
    for (x, y, w, h), colour in fills:
        image.paste(colour, (x, y, x + w, y + h))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


def _obj(object_id: int, box: tuple[int, int, int, int], **fields: object) -> dict:
    x, y, w, h = box
    return {"object_id": object_id, "x": x, "y": y, "w": w, "h": h, **fields}


def write_vg_fixture(root: Path) -> Path:
    """A 4-image dump: image 1 and 2 good (2 listed with ``id`` and a wrong size), 3 absent, 4 corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    _image(root / "VG_100K" / "1.jpg", (40, 30), [((0, 0, 10, 10), RED), ((10, 0, 10, 10), GREEN),
                                                  ((20, 10, 10, 10), BLUE)])
    _image(root / "VG_100K_2" / "2.jpg", (40, 30), [((30, 20, 10, 10), GREEN)])
    (root / "VG_100K" / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    image_data = [
        {"image_id": 1, "width": 40, "height": 30, "url": "https://x/VG_100K/1.jpg"},
        {"id": 2, "width": 100, "height": 100, "url": "https://x/VG_100K_2/2.jpg"},  # wrong size, `id` key
        {"image_id": 3, "width": 40, "height": 30},  # listed, absent on disk
        {"image_id": 4, "width": 40, "height": 30},  # does not decode
    ]
    objects = [
        {"image_id": 1, "objects": [
            _obj(10, (0, 0, 10, 10), names=["Man "], synsets=["man.n.01"]),
            _obj(11, (10, 0, 10, 10), name="Guy."),  # `name`, no synsets, alias of man
            _obj(12, (20, 10, 10, 10), names=["Café"], merged_object_ids=[13]),
            _obj(13, (20, 10, 10, 10), names=["cafe"]),  # merged into 12
            _obj(14, (0, 20, 50, 20), names=["T-Shirt"]),  # clipped to (0, 20, 40, 10)
            _obj(15, (1, 1, 2, 2), names=["!!!"]),  # no name after cleaning
        ]},
        {"id": 2, "objects": [_obj(20, (30, 20, 30, 30), names=["HORSE"])]},  # clipped to the real 40x30
        {"image_id": 3, "objects": [_obj(30, (0, 0, 5, 5), names=["horse"])]},
        {"image_id": 4, "objects": [_obj(40, (0, 0, 5, 5), names=["horse"])]},
    ]
    relationships = [
        {"image_id": 1, "relationships": [
            {"relationship_id": 1, "predicate": "ON TOP OF",
             "subject": _obj(10, (0, 0, 10, 10), name="man"),
             "object": _obj(16, (10, 10, 10, 10), names=["Horse"], synsets=[])},
            {"relationship_id": 2, "predicate": "near",
             "subject": _obj(17, (0, 0, 4, 4), names=[]), "object": _obj(12, (20, 10, 10, 10), name="cafe")},
            {"relationship_id": 3, "predicate": "riding",
             "subject": _obj(11, (10, 0, 10, 10), name="guy"), "object": _obj(18, (0, 0, 3, 3), name="  ")},
        ]},
        {"image_id": 2, "relationships": [
            {"relationship_id": 4, "predicate": "on",
             "subject": _obj(21, (30, 20, 5, 5), name="Gentleman"), "object": _obj(20, (30, 20, 10, 10), name="horse")},
        ]},
    ]
    attributes = [
        {"image_id": 1, "attributes": [
            _obj(10, (0, 0, 10, 10), names=["man"], attributes=["Tall", "tall ", ""]),
            _obj(12, (20, 10, 10, 10), names=["cafe"]),  # no attributes key: no <S,A> fact
        ]},
    ]
    for name, content in (("image_data.json", image_data), ("objects.json", objects),
                          ("relationships.json", relationships), ("attributes.json", attributes)):
        (root / name).write_text(json.dumps(content), encoding="utf-8")
    (root / "object_alias.txt").write_text("man,guy,Gentleman\n\nshirt,tee\n", encoding="utf-8")
    (root / "relationship_alias.txt").write_text("on,on top of\n", encoding="utf-8")
    return root


EXPECTED_FACTS = {
    ("cafe", None, None): 1, ("horse", None, None): 1, ("man", None, None): 2, ("t shirt", None, None): 1,
    ("man", "tall", None): 1, ("man", "on", "horse"): 2,
}


def _prepare(tmp_path: Path, **options: object):
    root = write_vg_fixture(tmp_path / "vg")
    settings = {"num_tasks": 2, "min_fact_count": 1, "progress": False, "image_size": 8, "test_fraction": 0.0}
    settings.update(options)
    out = tmp_path / "facts.h5"
    return prepare_visual_genome(root, out, **settings), out


def test_clean_phrase_rules() -> None:
    assert clean_phrase("  Café ") == "cafe"
    assert clean_phrase("T-Shirt") == "t shirt"
    assert clean_phrase("man's  HAT.") == "mans hat"
    assert clean_phrase("!!!") == ""
    assert clean_phrase(None) == ""
    assert AliasMap({"guy": "man"}).clean("Guy.") == "man"


def test_every_quirk_is_cleaned_counted_and_nothing_crashes(tmp_path: Path) -> None:
    report, out = _prepare(tmp_path)
    with open_facts(out) as facts:
        counts = dict(zip(facts.facts, np.bincount(facts.sample_fact, minlength=len(facts.facts)).tolist()))
        assert counts == EXPECTED_FACTS
        # fact ids are sorted by (order, subject, predicate, object)
        assert facts.facts == sorted(facts.facts, key=lambda f: (f[2] is not None, f[1] is not None, f[0], f[1] or "", f[2] or ""))
        assert facts.fact_order.tolist() == [1, 1, 1, 1, 2, 3]
        assert facts.slot_masks[-1].tolist() == [1.0, 1.0, 1.0] and facts.slot_masks[0].tolist() == [1.0, 0.0, 0.0]
        assert set(facts.sample_image_id.tolist()) == {1, 2}
        assert facts.provenance["dropped"] == report.dropped
    assert report.dropped == {
        "attributes: duplicate on the same object": 1,
        "attributes: empty after cleaning": 1,
        "objects: merged duplicate": 1,
        "objects: no name": 1,
        "relationships: object without name": 1,
        "relationships: subject without name": 1,
        "samples in images missing on disk or that do not decode": 2,
    }
    assert report.notes["images listed but missing on disk"] == 1
    assert report.notes["images that do not decode"] == 1
    assert report.notes["images whose decoded size differs from image_data"] == 1
    assert report.notes["boxes clipped to the image"] == 2  # the t shirt, and the horse of image 2
    assert report.kept["samples"] == 8 and report.kept["images"] == 2
    assert "t shirt" in str(report) and "task" in str(report)


def test_boxes_trust_the_decoded_image_and_crops_match(tmp_path: Path) -> None:
    _, out = _prepare(tmp_path, image_size=8)
    with open_facts(out) as facts:
        by_fact = {facts.facts[f]: i for i, f in enumerate(facts.sample_fact.tolist())}
        horse = by_fact[("horse", None, None)]
        np.testing.assert_allclose(facts.sample_box[horse], [30, 20, 10, 10])  # real 40x30, not the listed 100x100
        shirt = by_fact[("t shirt", None, None)]
        np.testing.assert_allclose(facts.sample_box[shirt], [0, 20, 40, 10])
        relation = [i for i, f in enumerate(facts.sample_fact.tolist()) if facts.facts[f] == ("man", "on", "horse")]
        boxes = {facts.sample_image_id[i]: facts.sample_box[i].tolist() for i in relation}
        assert boxes[1] == [0, 0, 20, 20]  # union of subject and object boxes
        assert boxes[2] == [30, 20, 10, 10]
        assert facts.image_size == 8
        cafe = by_fact[("cafe", None, None)]
        mean_colour = facts.pixels([cafe, horse]).reshape(2, -1, 3).mean(axis=1)
        np.testing.assert_allclose(mean_colour[0], BLUE, atol=25)
        np.testing.assert_allclose(mean_colour[1], GREEN, atol=25)
        image, fact_id = fact_image_dataset(facts, None, "train")[0]
        assert tuple(image.shape) == (3, 8, 8) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert fact_id == int(facts.sample_fact[facts.sample_indices(None, 0)[0]])


def test_no_images_clips_to_image_data_and_keeps_listed_images(tmp_path: Path) -> None:
    report, out = _prepare(tmp_path, no_images=True)
    with open_facts(out) as facts:
        assert not facts.has_pixels and facts.image_size is None
        horse = [i for i, f in enumerate(facts.sample_fact.tolist()) if facts.facts[f] == ("horse", None, None)]
        # without images the listed sizes are used: image 2 is 100x100, images 3 and 4 are kept
        assert sorted(facts.sample_image_id[horse].tolist()) == [2, 3, 4]
        np.testing.assert_allclose(facts.sample_box[[i for i in horse if facts.sample_image_id[i] == 2][0]],
                                   [30, 20, 30, 30])
    assert "samples in images missing on disk or that do not decode" not in report.dropped


def test_orders_min_count_and_split_properties(tmp_path: Path) -> None:
    report, out = _prepare(tmp_path, orders=(1, 3), min_fact_count=2, num_tasks=2)
    with open_facts(out) as facts:
        assert set(facts.facts) == {("man", None, None), ("man", "on", "horse")}
        assert facts.num_tasks == 2 and sorted(facts.task_of_fact.tolist()) == [0, 1]
    assert report.dropped["facts with fewer than 2 training samples"] == 3


def test_split_by_image_keeps_images_whole_and_is_seeded() -> None:
    image_ids = np.repeat(np.arange(50), 3)
    first, second = split_by_image(image_ids, seed=1), split_by_image(image_ids, seed=1)
    np.testing.assert_array_equal(first, second)
    per_image = first.reshape(50, 3)
    assert (per_image == per_image[:, :1]).all()  # every image wholly in train or test
    assert per_image[:, 0].sum() == 10  # 20 % of 50 images
    assert not np.array_equal(first, split_by_image(image_ids, seed=2))


def test_default_split_puts_facts_in_both_splits(tmp_path: Path) -> None:
    _, out = _prepare(tmp_path, test_fraction=0.2, min_fact_count=1)
    with open_facts(out) as facts:
        for fact_id, count in enumerate(np.bincount(facts.sample_fact).tolist()):
            if count >= 2:
                splits = set(facts.sample_split[facts.sample_fact == fact_id].tolist())
                assert splits == {0, 1}, facts.facts[fact_id]


def test_semantic_split_without_encoder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match="semantic split needs fact embeddings"):
        _prepare(tmp_path, split="semantic")


def test_semantic_split_with_an_encoder_stores_embeddings(tmp_path: Path) -> None:
    def embed(facts):
        # one-hot per subject word in the S slot, per predicate in the P slot: 3 slots of 4 dims
        vocab = {"cafe": 0, "horse": 1, "man": 2, "t shirt": 3, "tall": 0, "on": 1}
        vectors = np.zeros((len(facts), 12), dtype=np.float32)
        for row, fact in enumerate(facts):
            for slot, phrase in enumerate(fact):
                if phrase is not None:
                    vectors[row, slot * 4 + vocab[phrase]] = 1.0
        return vectors

    embed.calls = 0
    _, out = _prepare(tmp_path, split="semantic", text_encoder=embed, encoder_name="one-hot", num_tasks=2)
    with open_facts(out) as facts:
        assert facts.encoder_name == "one-hot"
        np.testing.assert_array_equal(facts.fact_embeddings, embed(facts.facts))
        assert sorted(set(facts.task_of_fact.tolist())) == [0, 1]


def test_malformed_json_is_a_clear_error(tmp_path: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    text = (root / "relationships.json").read_text()
    (root / "relationships.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataPrepError, match="malformed JSON"):
        prepare_visual_genome(root, tmp_path / "out.h5", num_tasks=1, min_fact_count=1, progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_malformed_records_are_counted_not_fatal(tmp_path: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    relationships = json.loads((root / "relationships.json").read_text())
    good = relationships[0]["relationships"][0]
    relationships[0]["relationships"] += [
        "not a relationship",
        {**good, "subject": {**good["subject"], "x": "ten"}},  # non-numeric coordinate
        {**good, "object": {k: v for k, v in good["object"].items() if k != "h"}},  # no height
        {"predicate": "on", "subject": good["subject"]},  # no object
        {**good, "predicate": "..."},  # no predicate left after cleaning
    ]
    relationships.append({"relationships": [good]})  # image record without any id
    (root / "relationships.json").write_text(json.dumps(relationships))
    report = prepare_visual_genome(root, tmp_path / "f.h5", num_tasks=1, min_fact_count=1, progress=False,
                                   test_fraction=0.0, orders=(3,), no_images=True)
    assert report.dropped["relationships: malformed or missing subject, object or predicate"] == 2
    assert report.dropped["relationships: missing or malformed box"] == 2
    assert report.dropped["relationships: no predicate"] == 1
    assert report.dropped["relationships.json: image records without image id or relationships list"] == 1
    with open_facts(tmp_path / "f.h5") as facts:
        assert facts.facts == [("man", "on", "horse")]
        np.testing.assert_allclose(facts.sample_box[facts.sample_image_id == 1], [[0, 0, 20, 20]])
        assert len(facts.sample_fact) == len(facts.sample_box) == 2
