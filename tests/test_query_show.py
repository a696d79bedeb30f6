"""`mas-triplets query ... --show FILE.png` and `scripts/query.py --show`: the pictures of query answers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.facts.fact_file import open_facts, write_fact_file
from triplets.cli import main
from triplets.errors import TripletsError
from triplets.query.show import (BOX_COLOUR, IMAGE_QUERY_SIZE_IN, PANEL_SIZE_IN, SHEET_COLUMNS, SHEET_TITLE_IN,
                                 check_show_path, region_view, sheet_size_pixels)

REPO = Path(__file__).resolve().parents[1]
SLOT_DIM = 8
CROP = 16
IMAGE_W, IMAGE_H = 64, 48
FACTS = [("man", None, None), ("man", "riding", "horse"), ("dog", "on", "grass"), ("horse", "brown", None),
         ("woman", "riding", "bike"), ("dog", None, None)]
RED = tuple(int(BOX_COLOUR[i:i + 2], 16) for i in (1, 3, 5))


def _red_mask(picture: np.ndarray) -> np.ndarray:
    return (np.abs(picture[:, :, :3].astype(int) - np.array(RED)).sum(axis=2) < 60)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A fact file whose samples are boxes of images on disk (the even image ids; the odd ones
    are gone), and a one-method run trained on it."""
    from triplets.config import from_dict
    from triplets.facts.train import train_run
    from triplets.facts.train_config import TrainConfig

    root = tmp_path_factory.mktemp("show")
    (root / "vg" / "VG_100K").mkdir(parents=True)
    (root / "vg" / "image_data.json").write_text("[]", encoding="utf-8")
    rng = np.random.default_rng(0)
    words = {w: rng.normal(size=SLOT_DIM).astype(np.float32) for w in sorted({w for f in FACTS for w in f if w})}
    zero = np.zeros(SLOT_DIM, np.float32)
    embeddings = np.stack([np.concatenate([words[s], words[p] if p else zero, words[o] if o else zero])
                           for s, p, o in FACTS])
    sample_fact, split, pixels, boxes, image_ids = [], [], [], [], []
    for fact_id in range(len(FACTS)):
        colour = rng.integers(0, 255, size=3)
        for number in range(10):
            image_id = 100 * fact_id + number
            image = np.full((IMAGE_H, IMAGE_W, 3), 235, np.uint8)
            x, y, size = int(rng.integers(0, IMAGE_W - 24)), int(rng.integers(0, IMAGE_H - 24)), 20
            image[y:y + size, x:x + size] = colour
            if image_id % 2 == 0:
                Image.fromarray(image).save(root / "vg" / "VG_100K" / f"{image_id}.png")
            pixels.append(np.asarray(Image.fromarray(image[y:y + size, x:x + size]).resize((CROP, CROP))))
            boxes.append((x, y, size, size))
            sample_fact.append(fact_id)
            split.append(1 if number >= 7 else 0)
            image_ids.append(image_id)
    fact_path = write_fact_file(
        root / "facts.h5", facts=FACTS, sample_fact=np.array(sample_fact), sample_image_id=np.array(image_ids),
        sample_box=np.array(boxes, np.float32), sample_split=np.array(split, np.int8),
        task_of_fact=np.arange(len(FACTS)) // 3, sample_pixels=np.stack(pixels),
        provenance={"source": "tests", "source_files": {"image_data.json": {"path": str(root / "vg" / "image_data.json")}}},
        fact_embeddings=embeddings, encoder_name="test-words")
    config = from_dict(TrainConfig, {
        "data": {"fact_file": str(fact_path)},
        "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32},
        "optim": {"epochs": 1, "lr": 0.01, "batch_size": 16},
        "methods": [{"name": "finetune"}], "seed": 0, "device": "cpu",
    })
    train_run(config, root / "run", progress=False)
    return {"root": root, "run": root / "run", "facts": fact_path}


def test_text_query_contact_sheet_has_one_boxed_panel_per_hit(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sheet.png"
    assert main(["query", "--run", str(world["run"]), "--text", "man|riding|horse", "--k", "7",
                 "--show", str(out)]) == 0
    capsys.readouterr()
    picture = np.asarray(Image.open(out).convert("RGB"))
    expected = sheet_size_pixels(7)
    assert expected == (round(SHEET_COLUMNS * PANEL_SIZE_IN[0] * 100), round((2 * PANEL_SIZE_IN[1] + SHEET_TITLE_IN) * 100))
    assert (picture.shape[1], picture.shape[0]) == expected
    red = _red_mask(picture)
    panel_w, panel_h, title = (round(v * 100) for v in (*PANEL_SIZE_IN, SHEET_TITLE_IN))
    boxed = [bool(red[title + row * panel_h:title + (row + 1) * panel_h, col * panel_w:(col + 1) * panel_w].sum() > 20)
             for row in range(2) for col in range(SHEET_COLUMNS)]
    assert boxed == [True] * 7 + [False] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]  # written atomically, no leftovers


def test_image_query_picture_shows_the_box_and_lists_the_facts(world, tmp_path: Path, capsys) -> None:
    image = np.full((IMAGE_H, IMAGE_W, 3), 240, np.uint8)
    image[10:30, 20:40] = (30, 60, 200)
    Image.fromarray(image).save(tmp_path / "query.png")
    out = tmp_path / "answer.png"
    assert main(["query", "--run", str(world["run"]), "--image", str(tmp_path / "query.png"), "--box", "20,10,20,20",
                 "--k", "4", "--show", str(out)]) == 0
    capsys.readouterr()
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert (picture.shape[1], picture.shape[0]) == (round(IMAGE_QUERY_SIZE_IN[0] * 100), round(IMAGE_QUERY_SIZE_IN[1] * 100))
    red = _red_mask(picture)
    half = picture.shape[1] // 2
    assert red[:, :half].sum() > 100 and red[:, half:].sum() == 0
    assert (picture[:, half:] < 100).all(axis=2).sum() > 200  # the listed facts, dark text on white


def test_region_view_uses_the_source_image_when_it_is_there(world) -> None:
    with open_facts(world["facts"]) as facts:
        present = int(np.flatnonzero(facts.sample_image_id % 2 == 0)[0])
        pixels, (x, y, w, h) = region_view(facts, present)
        full = np.asarray(Image.open(world["root"] / "vg" / "VG_100K" / f"{facts.sample_image_id[present]}.png"))
        bx, by, bw, bh = (int(v) for v in facts.sample_box[present])
        assert pixels.shape[0] > h and pixels.shape[1] > w  # context around the box
        assert np.array_equal(pixels[int(y):int(y) + bh, int(x):int(x) + bw], full[by:by + bh, bx:bx + bw])
        gone = int(np.flatnonzero(facts.sample_image_id % 2 == 1)[0])
        pixels, box = region_view(facts, gone)
        assert np.array_equal(pixels, facts.pixels([gone])[0]) and box == (0.0, 0.0, CROP, CROP)


@pytest.mark.parametrize("name, fragment", [("nowhere/answer.png", "does not exist"), ("answer.jpg", "ending in .png"),
                                            ("folder.png", "is a folder")])
def test_bad_show_path_is_a_one_line_error(world, tmp_path: Path, capsys, name: str, fragment: str) -> None:
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(TripletsError, match=fragment):
        check_show_path(tmp_path / name)
    code = main(["query", "--run", str(world["run"]), "--text", "dog", "--show", str(tmp_path / name)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0]


def test_script_show_flag_draws_a_stored_test_region(world, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("query_script", REPO / "scripts" / "query.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "sample.png"
    assert script.main([str(world["run"]), "--sample", "0", "--k", "3", "--show", str(out)]) == 0
    assert f"picture: {out}" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == (round(IMAGE_QUERY_SIZE_IN[0] * 100), round(IMAGE_QUERY_SIZE_IN[1] * 100))
    sheet = tmp_path / "text.png"
    assert script.main([str(world["run"]), "--text", "dog|on|grass", "--k", "3", "--show", str(sheet)]) == 0
    with Image.open(sheet) as picture:
        assert picture.size == sheet_size_pixels(3)
