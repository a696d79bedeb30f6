"""Tests of the real-image world (data_prep.worlds.real, `mas-triplets synth --world real`).

Most tests use a cut of digits + letters (always available); the clothing tests need Debian's
dataset-fashion-mnist (`make test` installs it when it can) and are skipped otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from data_prep import open_facts
from data_prep.errors import DataPrepError, MissingDatasetError
from data_prep.facts.fact_file import fact_order
from data_prep.image_sets.idx import fashion_mnist_available, load_fashion_mnist
from data_prep.worlds.real import COLOURS, PREDICATES, WorldPlanner, generate_real_world, plan_fact_counts
from data_prep.worlds.real_sources import (CLOTHING_NAMES, DIGIT_NAMES, LETTER_NAMES, load_category_pools,
                                         ranked_categories)
from data_prep.sources.visual_genome import prepare_visual_genome
from triplets.cli import main as cli_main

CUT_IMAGES = 90
SEED = 4
NO_CLOTHING = "digits,letters"
needs_fashion_mnist = pytest.mark.skipif(not fashion_mnist_available(),
                                         reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _json(folder: Path, name: str):
    return json.loads((folder / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "vg"
    report = generate_real_world(out, num_images=CUT_IMAGES, seed=SEED, sources=NO_CLOTHING, progress=False)
    return out, report


# --------------------------------------------------------------------------- determinism and cuts
def test_same_seed_identical_files_other_seed_other_files(cut, tmp_path: Path) -> None:
    out, _ = cut
    again = generate_real_world(tmp_path / "again", num_images=CUT_IMAGES, seed=SEED, sources=NO_CLOTHING,
                                progress=False)
    assert _digest(again.out_dir) == _digest(out)
    other = generate_real_world(tmp_path / "other", num_images=CUT_IMAGES, seed=SEED + 1, sources=NO_CLOTHING,
                                progress=False)
    digest, other_digest = _digest(out), _digest(other.out_dir)
    assert digest.keys() == other_digest.keys()
    images = [name for name in digest if name.startswith("VG_100K/")]
    assert sum(digest[name] != other_digest[name] for name in images) == len(images)


def test_a_smaller_cut_is_the_first_images_of_the_larger_world(cut, tmp_path: Path) -> None:
    out, report = cut
    small = generate_real_world(tmp_path / "small", num_images=CUT_IMAGES // 2, seed=SEED, sources=NO_CLOTHING,
                                progress=False)
    special = set(report.missing_image_ids + report.corrupt_image_ids + small.missing_image_ids
                  + small.corrupt_image_ids)
    compared = 0
    for image_id in range(1, CUT_IMAGES // 2 + 1):
        if image_id not in special:
            name = f"{image_id}.jpg"
            assert (small.out_dir / "VG_100K" / name).read_bytes() == (out / "VG_100K" / name).read_bytes()
            compared += 1
    assert compared >= CUT_IMAGES // 2 - 4
    small_instances = _json(small.out_dir, "instances.json")
    assert small_instances == _json(out, "instances.json")[:len(small_instances)]


# --------------------------------------------------------------------------- counts
def test_fact_counts_follow_the_plan_and_the_files(cut) -> None:
    """The recorded counts are the planned facts of the usable images: one <S> per object, one
    <S,A> per attribute of an object whose record lists its attributes (1 in 50 does not: a
    planted quirk), one <S,P,O> per relationship."""
    out, report = cut
    skipped = set(report.missing_image_ids + report.corrupt_image_ids)
    assert skipped
    planner = WorldPlanner([name for name, _ in ranked_categories(NO_CLOTHING)], SEED, 160, 120)
    expected: Counter = Counter()
    without_attributes = 0
    for record in _json(out, "attributes.json"):
        _, objects, relations = planner.plan(record["image_id"])
        assert [o["w"] for o in record["attributes"]] == [obj.size for obj in objects]
        if record["image_id"] in skipped:
            continue
        for obj, written in zip(objects, record["attributes"]):
            expected[(obj.category, None, None)] += 1
            if "attributes" in written:
                assert [w.strip().lower() for w in written["attributes"]] == obj.attributes
                expected.update((obj.category, attribute, None) for attribute in obj.attributes)
            else:
                without_attributes += 1
        expected.update((objects[s].category, predicate, objects[o].category) for s, o, predicate in relations)
    assert expected == report.fact_counts
    assert 0 < without_attributes < report.num_objects / 40
    planned = plan_fact_counts(CUT_IMAGES, SEED, NO_CLOTHING, skip_image_ids=skipped)
    assert all(planned[fact] >= count for fact, count in report.fact_counts.items())
    assert {f: c for f, c in planned.items() if fact_order(f) != 2} == \
        {f: c for f, c in report.fact_counts.items() if fact_order(f) != 2}
    relationships = [r for r in _json(out, "relationships.json") if r["image_id"] not in skipped]
    named = sum(1 for r in relationships for rel in r["relationships"]
                if rel["subject"].get("name", (rel["subject"].get("names") or [""])[0]))
    assert named == sum(c for f, c in report.fact_counts.items() if fact_order(f) == 3)
    assert report.num_objects == sum(len(r["objects"]) for r in _json(out, "objects.json"))


def test_the_full_world_has_over_a_thousand_long_tailed_facts_of_three_orders() -> None:
    counts = plan_fact_counts(20_000, seed=0)
    assert sum(count >= 5 for count in counts.values()) >= 1000
    orders = Counter(fact_order(fact) for fact in counts)
    assert orders[1] == len(CLOTHING_NAMES) + len(DIGIT_NAMES) + len(LETTER_NAMES)
    assert orders[2] > 300 and orders[3] > 1000
    assert {fact[1] for fact in counts if fact_order(fact) == 3} == set(PREDICATES)
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] >= 100 * ranked[len(ranked) // 2]  # Zipf-like: the head is far above the median
    assert ranked[9] >= 10 * ranked[len(ranked) // 10]


# --------------------------------------------------------------------------- the Visual Genome reader
def test_prepare_vg_reads_the_world_unchanged_and_the_fact_file_passes_the_checks(cut, tmp_path: Path) -> None:
    out, report = cut
    fact_file = tmp_path / "facts.h5"
    prepared = prepare_visual_genome(out, fact_file, num_tasks=2, min_fact_count=1, image_size=16,
                                     test_fraction=0.0, progress=False)
    with open_facts(fact_file) as facts:  # open_facts runs data_prep.facts.checks
        counts = dict(zip(facts.facts, np.bincount(facts.sample_fact, minlength=facts.num_facts).tolist()))
        assert counts == report.fact_counts
        assert facts.pixels(np.arange(8)).shape == (8, 16, 16, 3)
    assert prepared.notes["images listed but missing on disk"] == len(report.missing_image_ids)
    assert prepared.notes["images that do not decode"] == len(report.corrupt_image_ids)


# --------------------------------------------------------------------------- real pixels
def _reference_alpha(source: np.ndarray, size: int, angle: float) -> np.ndarray:
    image = Image.fromarray(source).resize((size, size), Image.BILINEAR)
    if angle:
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(image, dtype=np.float32) / 255.0


def _measured_alpha(image: np.ndarray, box: tuple[int, int, int], colour: str) -> np.ndarray:
    """Per pixel of the box, how far it is from the background towards the tint (0-1)."""
    x, y, size = box
    background = np.median(image[0].astype(np.float32), axis=0)
    direction = background - np.asarray(COLOURS[colour], dtype=np.float32)
    crop = image[y:y + size, x:x + size].astype(np.float32)
    return np.clip((background - crop) @ direction / float(direction @ direction), 0.0, 1.0)


def _check_real_pixels(world: Path, image_of: Callable[[dict, int], np.ndarray | None]) -> int:
    """Each unoccluded object's pixels are its source image, scaled, rotated and tinted: its
    measured alpha matches the source ``image_of(instance, 0)`` closely and correlates with it
    better than with another image of the same category, ``image_of(instance, 1)``. Objects whose
    ``image_of`` is None are not checked. Returns the number of objects checked."""
    instances = {r["object_id"]: r for r in _json(world, "instances.json")}
    checked = 0
    for record in _json(world, "objects.json"):
        path = world / "VG_100K" / f"{record['image_id']}.jpg"
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except OSError:
            continue  # the planted missing and corrupt images
        boxes = [(o["x"], o["y"], o["w"]) for o in record["objects"]]
        for obj, box in zip(record["objects"], boxes):
            overlapped = any(other != box and other[0] < box[0] + box[2] and box[0] < other[0] + other[2]
                             and other[1] < box[1] + box[2] and box[1] < other[1] + other[2] for other in boxes)
            instance = instances[obj["object_id"]]
            source = image_of(instance, 0)
            if overlapped or box[2] < 16 or source is None:
                continue
            own = _reference_alpha(source, box[2], instance["angle"])
            another = _reference_alpha(image_of(instance, 1), box[2], instance["angle"])
            measured = _measured_alpha(image, box, instance["colour"])
            assert np.abs(measured - own).mean() < 0.06, (instance, np.abs(measured - own).mean())
            own_corr = np.corrcoef(measured.ravel(), own.ravel())[0, 1]
            assert own_corr > 0.93, (instance, own_corr)
            assert own_corr > np.corrcoef(measured.ravel(), another.ravel())[0, 1], instance
            checked += 1
    return checked


def test_each_instance_is_drawn_from_its_real_source_image(cut) -> None:
    from sklearn.datasets import load_digits

    out, _ = cut
    bunch = load_digits()
    digits = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    letters = {pool.name: pool.images for pool in load_category_pools(["letters"], SEED)}
    instances = _json(out, "instances.json")
    assert {r["source"] for r in instances} == {"sklearn_digits", "dejavu_letters"}
    for record in instances:
        if record["source"] == "sklearn_digits":  # the digit's own class in scikit-learn's data
            assert DIGIT_NAMES[bunch.target[record["source_index"]]] == record["category"]
        else:  # the letter renders are numbered in their pool
            assert record["source_index"] == record["pool_row"]

    def image_of(record: dict, other: int) -> np.ndarray:
        if record["source"] == "sklearn_digits":
            same_class = np.flatnonzero(bunch.target == bunch.target[record["source_index"]])
            position = int(np.searchsorted(same_class, record["source_index"]))
            return digits[same_class[(position + other) % len(same_class)]]
        pool = letters[record["category"]]
        return pool[(record["source_index"] + other) % len(pool)]

    assert _check_real_pixels(out, image_of) >= CUT_IMAGES


def test_each_instance_is_a_different_image_until_its_category_runs_out(cut) -> None:
    out, _ = cut
    pools = {pool.name: len(pool.images) for pool in load_category_pools(NO_CLOTHING, SEED)}
    used: dict[str, list[int]] = {}
    for record in _json(out, "instances.json"):
        used.setdefault(record["category"], []).append(record["source_index"])
    assert len(used) > 20
    for category, indices in used.items():
        assert len(set(indices)) == min(len(indices), pools[category]), category


# --------------------------------------------------------------------------- clothing (Fashion-MNIST)
@needs_fashion_mnist
def test_clothing_world_draws_fashion_mnist_images(tmp_path: Path) -> None:
    report = generate_real_world(tmp_path / "vg", num_images=40, seed=1, progress=False)
    train_images, train_labels = load_fashion_mnist(split="train")
    test_images, test_labels = load_fashion_mnist(split="test")
    clothing = np.concatenate([train_images, test_images])
    labels = np.concatenate([train_labels, test_labels])
    instances = _json(report.out_dir, "instances.json")
    kept = [r for r in instances if r["source"] == "fashion_mnist"]
    assert {r["category"] for r in kept} <= set(CLOTHING_NAMES) and len(kept) >= 20
    assert len({r["source_index"] for r in kept}) == len(kept)  # 7,000 per class: no repeats here

    def image_of(record: dict, other: int) -> np.ndarray | None:
        if record["source"] != "fashion_mnist":
            return None
        same_class = np.flatnonzero(labels == labels[record["source_index"]])
        assert CLOTHING_NAMES[labels[record["source_index"]]] == record["category"]
        position = int(np.searchsorted(same_class, record["source_index"]))
        return clothing[same_class[(position + other) % len(same_class)]]

    assert _check_real_pixels(report.out_dir, image_of) >= 10
    manifest = _json(report.out_dir, "synth_manifest.json")
    assert manifest["sources"] == ["clothing", "digits", "letters"]
    assert [c[0] for c in manifest["categories"][:3]] == ["t shirt", "zero", "letter a"]


# --------------------------------------------------------------------------- configs
def test_realworld8_configs_load_random_and_semantic() -> None:
    from triplets.facts.train_config import load_train_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    random_split = load_train_config(configs / "realworld8.yaml")
    semantic = load_train_config(configs / "realworld8_semantic.yaml")
    assert "extends: realworld8.yaml" in (configs / "realworld8_semantic.yaml").read_text(encoding="utf-8")
    assert random_split.data.fact_file != semantic.data.fact_file
    assert {"--split random", "--tasks 8"} <= set(_flags((configs / "realworld8.yaml").read_text(encoding="utf-8")))
    assert "--split semantic" in _flags((configs / "realworld8_semantic.yaml").read_text(encoding="utf-8"))
    for config in (random_split, semantic):
        assert config.model.backbone == "small_cnn"
        assert [m.key for m in config.methods][:2] == ["finetune", "mas"]
        assert dataclasses.replace(config, data=random_split.data) == random_split


def _flags(text: str) -> list[str]:
    words = text.replace("\\", " ").split()
    return [f"{a} {b}" for a, b in zip(words, words[1:]) if a.startswith("--")]


# --------------------------------------------------------------------------- errors and the command
def test_missing_fashion_mnist_names_the_package(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(MissingDatasetError, match="apt-get install dataset-fashion-mnist"):
        generate_real_world(tmp_path / "vg", num_images=5, fashion_mnist_dir=tmp_path / "nowhere", progress=False)
    assert not (tmp_path / "vg").exists()
    code = cli_main(["synth", "--world", "real", "--out", str(tmp_path / "vg"), "--images", "5",
                     "--fashion-mnist-dir", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]


def test_unknown_object_source_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataPrepError, match="clothing,digits,letters"):
        generate_real_world(tmp_path / "vg", num_images=5, sources="digits,shoes", progress=False)
    code = cli_main(["synth", "--world", "real", "--out", str(tmp_path / "vg"), "--objects", "shoes", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "shoes" in err[0]
    code = cli_main(["synth", "--out", str(tmp_path / "vg"), "--objects", "digits", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--world real only" in err[0]


def test_synth_command_writes_a_real_world_cut(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "vg"
    assert cli_main(["synth", "--world", "real", "--out", str(out), "--images", "12", "--seed", "3",
                     "--objects", NO_CLOTHING]) == 0
    printed = capsys.readouterr().out
    assert "images: 12 (160x120 px), seed 3" in printed and "most frequent facts" in printed
    assert len(_json(out, "image_data.json")) == 12
    assert _json(out, "synth_manifest.json")["generator"] == "data_prep.real_world.generate_real_world"
