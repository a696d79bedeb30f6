"""Images with transparent pixels (issue 28): composited over white (data_prep.image_decode.ALPHA_BACKGROUND),
and the images this touched counted in the summary of `prepare vg`, `prepare lll` and `prepare images`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import open_facts
from data_prep.image_decode import (PARTLY_TRANSPARENT, WHOLLY_TRANSPARENT, decode_rgb, transparency_note,
                                    transparency_tally)
from triplets.cli import main

from test_lll_benchmark import SPLIT, write_lll_fixture
from test_visual_genome import write_vg_fixture


def rgba(path: Path, size: tuple[int, int], colour: tuple[int, int, int], alpha: int | np.ndarray) -> Path:
    """An RGBA PNG of one colour; ``alpha`` one value or an [H, W] array."""
    width, height = size
    values = np.zeros((height, width, 4), dtype=np.uint8)
    values[..., :3] = colour
    values[..., 3] = alpha
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values, mode="RGBA").save(path)
    return path


def left_half_clear(size: tuple[int, int]) -> np.ndarray:
    alpha = np.full((size[1], size[0]), 255, dtype=np.uint8)
    alpha[:, : size[0] // 2] = 0
    return alpha


def test_transparency_note_per_kind_of_image(tmp_path: Path) -> None:
    partly = rgba(tmp_path / "partly.png", (8, 6), (200, 10, 10), left_half_clear((8, 6)))
    wholly = rgba(tmp_path / "wholly.png", (8, 6), (200, 10, 10), 0)
    opaque = rgba(tmp_path / "opaque.png", (8, 6), (200, 10, 10), 255)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(plain)
    assert transparency_note(partly, 1000) == PARTLY_TRANSPARENT
    assert transparency_note(wholly, 1000) == WHOLLY_TRANSPARENT
    assert transparency_note(opaque, 1000) is None and transparency_note(plain, 1000) is None
    with transparency_tally() as tally:
        pixels = np.asarray(decode_rgb(partly, 1000))
        decode_rgb(wholly, 1000), decode_rgb(opaque, 1000), decode_rgb(plain, 1000)
    assert tally == {PARTLY_TRANSPARENT: 1, WHOLLY_TRANSPARENT: 1}
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == (200, 10, 10)).all()  # over white, as documented


def test_prepare_vg_counts_images_with_transparent_pixels(tmp_path: Path, capsys) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "VG_100K" / "1.jpg").unlink()
    rgba(root / "VG_100K" / "1.png", (40, 30), (0, 0, 250), left_half_clear((40, 30)))
    out = tmp_path / "facts.h5"
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(out), "--no-text", "--no-progress",
                 "--tasks", "2", "--min-fact-count", "1", "--image-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert PARTLY_TRANSPARENT in printed
    with open_facts(out) as facts:
        assert facts.provenance["notes"][PARTLY_TRANSPARENT] == 1
        assert WHOLLY_TRANSPARENT not in facts.provenance["notes"]
        first = np.flatnonzero(facts.sample_image_id == 1)
        crops = facts.pixels(first)
        boxes = facts.sample_box[first]
    for crop, (x, _y, w, _h) in zip(crops, boxes):
        if x + w <= 20:  # inside the transparent left half: white
            assert (crop == 255).all()
        elif x >= 20:
            assert (crop == (0, 0, 250)).all()


def test_prepare_lll_counts_partly_and_wholly_transparent_images_once_each(tmp_path: Path, capsys) -> None:
    root = write_lll_fixture(tmp_path / "data")
    # img1 is linked by two rows (B1 and B2): counted once
    rgba(root / "images" / "train" / "img1.png", (16, 9), (10, 200, 10), left_half_clear((16, 9)))
    rgba(root / "images" / "train" / "img9.png", (16, 9), (10, 200, 10), 0)
    out = tmp_path / "lll.h5"
    assert main(["prepare", "lll", "--root", str(root), "--split", SPLIT, "--out", str(out), "--image-size", "8",
                 "--no-progress", "--text-encoder", "native"]) == 0
    printed = capsys.readouterr().out
    assert PARTLY_TRANSPARENT in printed and WHOLLY_TRANSPARENT in printed
    with open_facts(out) as facts:
        notes = facts.provenance["notes"]
        assert notes[PARTLY_TRANSPARENT] == 1 and notes[WHOLLY_TRANSPARENT] == 1
        wholly = facts.pixels(np.flatnonzero(facts.sample_image_id == 8))  # img9: image id 8
        assert wholly.size and (wholly == 255).all()


@pytest.mark.parametrize("alpha, expected", [(0, WHOLLY_TRANSPARENT), (None, PARTLY_TRANSPARENT), (255, None)])
def test_prepare_images_counts_transparent_images_in_its_summary(tmp_path: Path, capsys, alpha, expected) -> None:
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (12, 12), (9, 9, 9)).save(root / split / label / "0.png")
    rgba(root / "train" / "a" / "1.png", (12, 12), (1, 2, 200), left_half_clear((12, 12)) if alpha is None else alpha)
    out = tmp_path / "images.h5"
    assert main(["prepare", "images", "--dataset", "image_folder", "--root", str(root), "--out", str(out),
                 "--image-size", "8"]) == 0
    printed = capsys.readouterr().out
    if expected is None:
        assert "transparent" not in printed
    else:
        assert f"; 1 {expected}" in printed
