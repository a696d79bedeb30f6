"""data_prep.image_sets.prepare: conversion to HDF5 and the views read back, on real offline sources."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from data_prep.errors import DataPrepError, MissingDatasetError
from data_prep.image_sets.idx import fashion_mnist_available, load_fashion_mnist
from data_prep.image_sets.prepare import prepare_image_dataset
from data_prep.image_sets.image_file import ImageFormatError, open_image_dataset
from data_prep.image_sets.sources import SOURCES, list_fonts

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_digits_roundtrip_matches_sklearn(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    path = prepare_image_dataset("digits", None, tmp_path / "digits.h5")
    data = open_image_dataset(path)
    assert data.num_classes == 10 and data.image_shape == (8, 8, 1)
    train, test = data.labels("train"), data.labels("test")
    assert train.size + test.size == 1797
    # stratified 2/3 : 1/3 split, every class in both splits
    assert abs(test.size - 599) <= 10 and set(train) == set(test) == set(range(10))
    reference = load_digits()
    expected = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()) for img in reference.images}
    view = data.view("test")
    assert all(tuple(view[i][0].ravel()) in expected for i in range(0, len(view), 37))


def test_view_subset_relabels_and_subsamples_deterministically(tmp_path: Path) -> None:
    data = open_image_dataset(prepare_image_dataset("digits", None, tmp_path / "d.h5", image_size=16))
    assert data.image_shape == (16, 16, 1)
    view = data.view("train", [7, "3"], max_per_class=20, seed=5)
    again = data.view("train", [7, 3], max_per_class=20, seed=5)
    other = data.view("train", [7, 3], max_per_class=20, seed=6)
    assert len(view) == 40 and view.num_classes == 2 and view.class_names == ["7", "3"]
    assert np.bincount(view.labels).tolist() == [20, 20]
    assert np.array_equal(view.images, again.images)
    assert not np.array_equal(view.images, other.images)
    full = data.labels("train")
    assert np.bincount(data.view("train", [7]).labels).tolist() == [int((full == 7).sum())]
    with pytest.raises(DataPrepError, match="not in digits"):
        data.view("train", ["Z"])


def test_font_letters_deterministic_and_test_fonts_held_out(tmp_path: Path) -> None:
    fonts = list_fonts()
    if len(fonts) < 4:
        pytest.skip("fewer than 4 TrueType fonts installed (Debian: fonts-dejavu-core)")
    kwargs = {"characters": "ABC", "renders_per_class": (6, 3)}
    a = open_image_dataset(prepare_image_dataset("font_letters", None, tmp_path / "a.h5", seed=1, **kwargs))
    b = open_image_dataset(prepare_image_dataset("font_letters", None, tmp_path / "b.h5", seed=1, **kwargs))
    c = open_image_dataset(prepare_image_dataset("font_letters", None, tmp_path / "c.h5", seed=2, **kwargs))
    assert a.class_names == ["A", "B", "C"] and a.image_shape == (28, 28, 1)
    assert a.labels("train").tolist() == [0] * 6 + [1] * 6 + [2] * 6 and a.labels("test").size == 9
    assert np.array_equal(a.view("train").images, b.view("train").images)
    assert not np.array_equal(a.view("train").images, c.view("train").images)
    ink = a.view("test").images.astype(float).mean(axis=(1, 2, 3))
    assert (ink > 5).all()  # every rendering has a glyph on it


@pytest.mark.skipif(not fashion_mnist_available(FMNIST), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_test_split_equals_idx_files(tmp_path: Path) -> None:
    path = prepare_image_dataset("fashion_mnist", FMNIST, tmp_path / "f.h5", split=["test"])
    data = open_image_dataset(path)
    images, labels = load_fashion_mnist(FMNIST, "test")
    assert data.splits == ("test",) and data.class_names[0] == "T-shirt/top"
    view = data.view("test")
    assert np.array_equal(view.images[:, :, :, 0], images) and np.array_equal(view.labels, labels)
    assert data.provenance["dataset"] == "fashion_mnist"


def test_image_folder_roundtrip_resizes_and_crops(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    data = open_image_dataset(prepare_image_dataset("image_folder", root, tmp_path / "f.h5", image_size=20))
    assert data.class_names == ["cat", "dog"] and data.image_shape == (20, 20, 3)
    assert data.labels("train").tolist() == [0, 0, 0, 1, 1, 1] and data.labels("test").tolist() == [0, 0, 1, 1]
    source = Image.open(root / "train" / "dog" / "0.png").resize((30, 20), Image.BILINEAR).crop((5, 0, 25, 20))
    assert np.array_equal(data.view("train", ["dog"])[0][0], np.asarray(source))


@pytest.mark.parametrize("name", ["cub200", "mit_indoor67", "voc_actions", "chars74k", "flowers102", "svhn"])
def test_missing_dataset_one_line_message_names_layout(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out.h5"
    with pytest.raises(MissingDatasetError) as info:
        prepare_image_dataset(name, tmp_path / "empty", out)
    message = str(info.value)
    assert "\n" not in message and "expected layout" in message
    assert SOURCES[name].layout.split()[0].split("/")[1] in message
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))


def test_half_downloaded_cub_is_reported(tmp_path: Path) -> None:
    base = tmp_path / "CUB_200_2011"
    (base / "images" / "001.Albatross").mkdir(parents=True)
    (base / "images.txt").write_text("1 001.Albatross/a.jpg\n")
    (base / "image_class_labels.txt").write_text("1 1\n")
    (base / "train_test_split.txt").write_text("1 1\n")
    (base / "classes.txt").write_text("1 001.Albatross\n")
    with pytest.raises(MissingDatasetError, match="a.jpg is missing.*expected layout"):
        prepare_image_dataset("cub200", tmp_path, tmp_path / "cub.h5")


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match="did you mean 'digits'"):
        prepare_image_dataset("digit", None, tmp_path / "x.h5")
    with pytest.raises(DataPrepError, match="image_size"):
        prepare_image_dataset("digits", None, tmp_path / "x.h5", image_size=2)
    with pytest.raises(MissingDatasetError, match="prepare images"):
        open_image_dataset(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.attrs["format"] = "something-else"
    with pytest.raises(ImageFormatError, match="not an image dataset"):
        open_image_dataset(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ImageFormatError):
        open_image_dataset(tmp_path / "junk.h5")
