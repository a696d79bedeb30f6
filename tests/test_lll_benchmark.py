"""`mas-triplets prepare lll` on a tiny benchmark in the lifelong-fact-learning layout, its errors, and the
paper configs that train on its output."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import open_facts
from data_prep.sources.lll_benchmark import missing_fact_file_hint, prepare_lll, read_native_vector
from triplets.cli import main
from triplets.facts.train_config import load_train_config

SPLIT = "2tasks_random"
SAMPLE_HEADER = ["image_links", "NLP_links", "SPO", "id", "w_s", "w_p", "w_o"]
# benchmark fact id -> (task k, S, P, O, (w_s, w_p, w_o)); id 12 has no O (<S,P>), 10 is <S>; 15 has no sample
FACTS = {
    10: (1, "man", "", "", (1, 0, 0)),
    11: (1, "man", "riding", "horse", (1, 1, 1)),
    12: (1, "dog", "brown", "", (1, 1, 0)),
    15: (1, "cat", "", "", (1, 0, 0)),
    20: (2, "horse", "eating", "grass", (1, 1, 1)),
    21: (2, "car", "red", "", (1, 1, 0)),
}
COLOURS = {name: (20 * i, 255 - 20 * i, (37 * i) % 256) for i, name in enumerate(
    ["img1", "img2", "img3", "img4", "img5", "img6", "img7", "img8", "img9", "img10", "img11", "img12"], start=1)}
# (image link, fact id) per row, in file order; "missing" has no file, "bad" does not decode,
# img8 is linked as .jpg but stored as .png (the authors' loader tries .png too), one row repeats
ROWS = {
    ("B1", "train"): [("train/img1.png", 10), ("train/img2.png", 11), ("train/img3.png", 11), ("train/img2.png", 11),
                      ("train/missing.png", 12), ("train/img4.png", 12), ("train/bad.png", 10),
                      ("train/img8.jpg", 10)],
    ("B1", "test"): [("test/img5.png", 10), ("test/img6.png", 11), ("test/img7.png", 12)],
    ("B2", "train"): [("train/img9.png", 20), ("train/img10.png", 21), ("train/img1.png", 20)],
    ("B2", "test"): [("test/img11.png", 20), ("test/img12.png", 21)],
}
EXPECTED_IDS = [10, 11, 12, 20, 21]
EXPECTED_SAMPLES = [  # (fact row, split, image id, colour name)
    (0, 0, 0, "img1"), (1, 0, 1, "img2"), (1, 0, 2, "img3"), (2, 0, 3, "img4"), (0, 0, 4, "img8"),
    (0, 1, 5, "img5"), (1, 1, 6, "img6"), (2, 1, 7, "img7"),
    (3, 0, 8, "img9"), (4, 0, 9, "img10"), (3, 0, 0, "img1"), (3, 1, 10, "img11"), (4, 1, 11, "img12"),
]


def native_vector(fact_id: int) -> np.ndarray:
    """The fixture's 900 numbers of a fact: seeded values with many digits, zero for a missing slot."""
    values = np.random.default_rng(fact_id).normal(size=900).round(7)
    for slot, flag in enumerate(FACTS[fact_id][4]):
        if not flag:
            values[slot * 300:(slot + 1) * 300] = 0.0
    return values


def _write_csv(path: Path, header: list[str], rows: list[list[object]], index_column: bool = False) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(([""] if index_column else []) + header)
        for number, row in enumerate(rows):
            writer.writerow(([number] if index_column else []) + row)


def write_lll_fixture(base: Path) -> Path:
    """A two-task benchmark under ``base/mid_scale`` in the released layout; returns that root."""
    root = base / "mid_scale"
    folder = root / "splits" / SPLIT
    folder.mkdir(parents=True)
    for (task, part), rows in ROWS.items():
        for link, _fact in rows:
            name = Path(link).stem
            if name in COLOURS:
                path = (root / "images" / link).with_suffix(".png")
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12 + len(name), 9), COLOURS[name]).save(path)
    (root / "images" / "train" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    vectors = root / "NLP_feat" / "unique_facts"
    vectors.mkdir(parents=True)
    for fact_id in FACTS:
        values = native_vector(fact_id)
        if fact_id % 2:  # one number a line (np.savetxt) or all on one line
            np.savetxt(vectors / f"f{fact_id}.txt", values, fmt="%.7f")
        else:
            (vectors / f"f{fact_id}.txt").write_text(" ".join(f"{v:.7f}" for v in values) + "\n")
    for task in ("B1", "B2"):
        k = int(task[1:])
        facts = [[fact_id, sum(flags), s, p, o] for fact_id, (kk, s, p, o, flags) in FACTS.items() if kk == k]
        _write_csv(folder / f"{task}_facts.csv", ["id", "type", "S", "P", "O"], facts, index_column=k == 2)
        for part in ("train", "test"):
            rows = []
            for link, fact_id in ROWS[(task, part)]:
                _k, s, p, o, flags = FACTS[fact_id]
                # links relative to ROOT (NLP_feat/...) for B1, relative to ROOT/NLP_feat for B2
                nlp = f"NLP_feat/unique_facts/f{fact_id}.txt" if k == 1 else f"unique_facts/f{fact_id}.txt"
                rows.append([link, nlp, " ".join(x for x in (s, p, o) if x), fact_id, *flags])
            _write_csv(folder / f"{task}_{part}.csv", SAMPLE_HEADER, rows, index_column=k == 2)
    return root


@pytest.fixture()
def lll_root(tmp_path: Path) -> Path:
    return write_lll_fixture(tmp_path / "data")


def _prepare(root: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "lll", "--root", str(root), "--split", SPLIT, "--out", str(out), "--image-size", "8",
                 "--no-progress", *extra])


def test_prepare_lll_native_keeps_tasks_splits_ids_masks_and_vectors(
        lll_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lll.h5"
    assert _prepare(lll_root, out, "--text-encoder", "native") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "rows whose image file is missing" in printed
    with open_facts(out) as facts:
        assert facts.facts == [("man", None, None), ("man", "riding", "horse"), ("dog", "brown", None),
                               ("horse", "eating", "grass"), ("car", "red", None)]
        assert facts.provenance["source_fact_ids"] == EXPECTED_IDS
        assert facts.task_of_fact.tolist() == [0, 0, 0, 1, 1] and facts.num_tasks == 2
        expected_masks = np.array([FACTS[i][4] for i in EXPECTED_IDS], dtype=np.float32)
        np.testing.assert_array_equal(facts.slot_masks, expected_masks)
        # the benchmark's own numbers, exactly (as float32), zero blocks for the missing slots
        expected_vectors = np.stack([native_vector(i) for i in EXPECTED_IDS]).astype(np.float32)
        np.testing.assert_array_equal(facts.fact_embeddings, expected_vectors)
        assert not facts.fact_embeddings[0, 300:].any() and not facts.fact_embeddings[2, 600:].any()
        assert facts.encoder_name == "lll-native:word2vec-300x3"
        assert facts.sample_fact.tolist() == [s[0] for s in EXPECTED_SAMPLES]
        assert facts.sample_split.tolist() == [s[1] for s in EXPECTED_SAMPLES]
        assert facts.sample_image_id.tolist() == [s[2] for s in EXPECTED_SAMPLES]
        # the box is the whole image (the fixture's images are (12 + len(name)) x 9)
        np.testing.assert_array_equal(facts.sample_box[:, 2], [12 + len(s[3]) for s in EXPECTED_SAMPLES])
        assert (facts.sample_box[:, 3] == 9).all() and not facts.sample_box[:, :2].any()
        pixels = facts.pixels(np.arange(facts.num_samples))
        assert pixels.shape == (13, 8, 8, 3)
        for index, (_f, _s, _i, colour) in enumerate(EXPECTED_SAMPLES):
            assert (pixels[index] == np.array(COLOURS[colour], dtype=np.uint8)).all(), index
        provenance = facts.provenance
        assert provenance["dropped"] == {
            "facts listed in B<k>_facts.csv without any sample row": 1,
            "rows repeating an earlier row's image and fact": 1,
            "rows whose image does not decode": 1,
            "rows whose image file is missing": 1,
        }
        assert provenance["notes"] == {"images found under the other suffix (.jpg/.png)": 1}
        assert provenance["samples_collected"] == 16
        assert provenance["kept"]["images"] == 12 and provenance["kept"]["train_samples"] == 8
        assert provenance["benchmark_tasks"] == ["B1", "B2"]
        assert [row["facts"] for row in provenance["task_statistics"]] == [3, 2]


def test_pixels_stream_in_blocks_across_boundaries(lll_root: Path, tmp_path: Path, monkeypatch) -> None:
    from data_prep.sources import lll_benchmark

    monkeypatch.setattr(lll_benchmark, "PIXEL_BLOCK", 4)  # 13 samples: blocks of 4, 4, 4, 1
    blocks: list[tuple[int, int]] = []
    original = lll_benchmark._pixel_blocks

    def recording(*args, **kwargs):
        for first, block in original(*args, **kwargs):
            blocks.append((first, len(block)))
            yield first, block

    monkeypatch.setattr(lll_benchmark, "_pixel_blocks", recording)
    out = tmp_path / "blocks.h5"
    prepare_lll(lll_root, SPLIT, out, image_size=8, progress=False)
    assert blocks == [(0, 4), (4, 4), (8, 4), (12, 1)]
    with open_facts(out) as facts:
        pixels = facts.pixels(np.arange(facts.num_samples))
        for index, (_f, _s, _i, colour) in enumerate(EXPECTED_SAMPLES):
            assert (pixels[index] == np.array(COLOURS[colour], dtype=np.uint8)).all(), index


def test_native_vector_reader_takes_both_layouts(lll_root: Path) -> None:
    for fact_id in (11, 12):
        vector = read_native_vector(lll_root / "NLP_feat" / "unique_facts" / f"f{fact_id}.txt", "here")
        np.testing.assert_array_equal(vector, native_vector(fact_id).astype(np.float32))


def test_prepare_lll_no_images_and_library_call(lll_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "facts_only.h5"
    report = prepare_lll(lll_root, SPLIT, out, no_images=True, progress=False)
    assert report.kept["samples"] == 13 and report.kept["tasks"] == 2
    with open_facts(out) as facts:
        assert not facts.has_pixels and facts.image_size is None
        # without decoding, the corrupt file is still an image file that exists but its header fails
        assert facts.provenance["dropped"]["rows whose image does not decode"] == 1


def test_prepare_lll_reembeds_with_minilm(lll_root: Path, tmp_path: Path) -> None:
    from triplets.facts.language import embed_facts, load_text_encoder

    out = tmp_path / "minilm.h5"
    assert _prepare(lll_root, out) == 0  # minilm is the default encoder
    encoder = load_text_encoder("minilm")
    with open_facts(out) as facts:
        expected, masks = embed_facts(facts.facts, encoder)
        assert facts.fact_embeddings.shape == (5, 3 * 384)
        np.testing.assert_allclose(facts.fact_embeddings, expected, atol=1e-5)
        np.testing.assert_array_equal(facts.slot_masks, masks)
        assert facts.encoder_name == encoder.name


def _fails_cleanly(capsys: pytest.CaptureFixture[str], out: Path, code: int, *fragments: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mas-triplets prepare: error:"), err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary file
    return err


def _rewrite(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def test_missing_column_is_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    _rewrite(lll_root / "splits" / SPLIT / "B1_train.csv", ",w_o\n", ",w_x\n")
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"),
                   "B1_train.csv, line 1", "missing column(s) w_o")


def test_non_numeric_vector_is_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    path = lll_root / "NLP_feat" / "unique_facts" / "f11.txt"
    lines = path.read_text().splitlines()
    lines[5] = "0.1x"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"),
                   "B1_train.csv, line 3", "f11.txt", "non-number '0.1x'")


def test_wrong_vector_length_is_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    path = lll_root / "NLP_feat" / "unique_facts" / "f20.txt"
    path.write_text(" ".join(["0.5"] * 899))
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"),
                   "B2_train.csv, line 2", "899 numbers; expected 900")


def test_fact_id_missing_from_facts_file_is_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    _rewrite(lll_root / "splits" / SPLIT / "B2_test.csv", "unique_facts/f21.txt,car red,21,", "unique_facts/f21.txt,car red,11,")
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"),
                   "B2_test.csv, line 3", "fact id 11 is not listed in", "B2_facts.csv")


def test_bad_flag_and_contradicting_flags_are_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    train = lll_root / "splits" / SPLIT / "B1_train.csv"
    original = train.read_text()
    _rewrite(train, "man,10,1,0,0", "man,10,1,2,0")
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"), "B1_train.csv, line 2",
                   "column w_p holds '2'")
    train.write_text(original.replace("train/img8.jpg,NLP_feat/unique_facts/f10.txt,man,10,1,0,0",
                                      "train/img8.jpg,NLP_feat/unique_facts/f10.txt,man,10,1,1,0"))
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"), "B1_train.csv, line 9",
                   "earlier rows give (1, 0, 0)")


def test_short_row_and_bad_id_are_one_line_exit_2(lll_root: Path, tmp_path: Path, capsys) -> None:
    test = lll_root / "splits" / SPLIT / "B1_test.csv"
    original = test.read_text()
    test.write_text(original.rstrip("\n") + "\ntest/img5.png,NLP_feat/unique_facts/f10.txt\n")
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"), "B1_test.csv, line 5",
                   "number of fields")
    test.write_text(original.replace("man,10,1,0,0", "man,ten,1,0,0"))
    _fails_cleanly(capsys, out, _prepare(lll_root, out, "--text-encoder", "native"), "B1_test.csv, line 2",
                   "column id holds 'ten'")


def test_bad_split_name_and_missing_split_folder(lll_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.h5"
    code = main(["prepare", "lll", "--root", str(lll_root), "--split", "2tasks_randm", "--out", str(out)])
    _fails_cleanly(capsys, out, code, "'2tasks_randm' is not a benchmark split name", "<T>tasks_semantic")
    code = main(["prepare", "lll", "--root", str(lll_root), "--split", "4tasks_random", "--out", str(out)])
    _fails_cleanly(capsys, out, code, "splits/4tasks_random not found", "2tasks_random", "B<k>_train.csv")
    shutil.rmtree(lll_root / "splits")
    code = main(["prepare", "lll", "--root", str(lll_root), "--split", SPLIT, "--out", str(out)])
    _fails_cleanly(capsys, out, code, "holds no split folder")


def test_missing_task_file_names_it(lll_root: Path, tmp_path: Path, capsys) -> None:
    (lll_root / "splits" / SPLIT / "B2_facts.csv").unlink()
    out = tmp_path / "o.h5"
    _fails_cleanly(capsys, out, _prepare(lll_root, out), "B2_facts.csv not found", "B1..B2")


# ----------------------------------------------------------------------------- paper configs
CONFIGS = {
    "lll_midscale4_random.yaml": ("midscale4_random.h5", "mid_scale", "4tasks_random"),
    "lll_midscale4_semantic.yaml": ("midscale4_semantic.h5", "mid_scale", "4tasks_semantic"),
    "lll_large8_random.yaml": ("large8_random.h5", "large_scale", "8tasks_random"),
    "lll_large8_semantic.yaml": ("large8_semantic.h5", "large_scale", "8tasks_semantic"),
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_config_loads_and_fails_in_one_line_without_data(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fact_file, scale, split = CONFIGS[name]
    config = load_train_config(CONFIG_DIR / name)
    assert config.data.fact_file == f"data/lll/{fact_file}"
    assert config.model.backbone == "vgg16"
    assert [m.key for m in config.methods] == ["finetune", "mas"]
    assert config.methods[1].options["lam"] == 5.0
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(CONFIG_DIR / name), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in (f"data/lll/{fact_file}", "mas-triplets prepare lll", f"--root {tmp_path.resolve() / 'data' / scale}",
                     f"--split {split}", f"splits/{split}/B<k>_train.csv", "NLP_feat"):
        assert fragment in err, err


def test_missing_fact_file_hint_only_for_lll_names(tmp_path: Path) -> None:
    assert missing_fact_file_hint(tmp_path / "lll" / "large8_semantic.h5") is not None
    assert missing_fact_file_hint(tmp_path / "other" / "large8_semantic.h5") is None
    assert missing_fact_file_hint(tmp_path / "lll" / "facts.h5") is None


def test_paper_config_trains_on_the_prepared_fixture(lll_root: Path, tmp_path: Path, capsys) -> None:
    """The benchmark's tasks reach training and evaluation: config lll_midscale4_random.yaml with a CPU-sized model."""
    import json

    facts_path = tmp_path / "lll" / "fixture.h5"
    assert _prepare(lll_root, facts_path, "--text-encoder", "native") == 0
    run = tmp_path / "run"
    code = main(["train", "--config", str(CONFIG_DIR / "lll_midscale4_random.yaml"), "--out", str(run),
                 "--no-progress", "--set", f"data.fact_file={facts_path}", "--set", "model.backbone=small_cnn",
                 "--set", "model.weights=null", "--set", "model.norm=group", "--set", "optim.epochs=1",
                 "--set", "optim.batch_size=4",
                 "--set", "data.in_memory=true", "--set", "device=cpu", "--set", "num_threads=1",
                 "--set", "eval.index=none"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert sorted(results["methods"]) == ["finetune", "mas"]
    for entry in results["methods"].values():
        assert len(entry["accuracy_matrix"]) == 2
        assert [m["num_candidates"] for m in entry["final"]["standard"]] == [3, 2]
        assert [m["num_candidates"] for m in entry["final"]["generalized"]] == [5, 5]
        assert [m["num_images"] for m in entry["final"]["standard"]] == [3, 2]
        assert 0.0 <= entry["avg_acc"] <= 1.0
