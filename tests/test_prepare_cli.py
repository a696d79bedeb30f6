"""`mas-triplets prepare vg|sgg`: end to end through the console script, bad inputs, interrupted runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_sgg_h5 import write_sgg_fixture  # noqa: E402
from test_visual_genome import EXPECTED_FACTS, write_vg_fixture  # noqa: E402

from data_prep import open_facts  # noqa: E402
from data_prep.facts import pipeline as fact_pipeline  # noqa: E402
from data_prep.worlds import synthetic
from data_prep.sources import visual_genome
from triplets.facts import language  # noqa: E402
from triplets.cli import main  # noqa: E402

COMMON = ["--no-text", "--no-progress", "--tasks", "2", "--min-fact-count", "1", "--image-size", "8"]


def _one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mas-triplets prepare: error:"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_prepare_vg_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    out = tmp_path / "facts.h5"
    code = main(["prepare", "vg", "--vg-dir", str(root), "--out", str(out), *COMMON, "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "top facts" in printed
    with open_facts(out) as facts:
        # 20 % of the images go to test: facts with >= 2 samples have one on each side and are all kept;
        # a single-sample fact is kept exactly when its image is a training image
        assert set(facts.facts) <= set(EXPECTED_FACTS)
        assert {fact for fact, count in EXPECTED_FACTS.items() if count >= 2} <= set(facts.facts)
        train_counts = np.bincount(facts.sample_fact[facts.sample_split == 0], minlength=len(facts.facts))
        assert (train_counts >= 1).all()
        assert facts.num_tasks == 2 and facts.image_size == 8
        assert facts.provenance["options"]["seed"] == 3
        assert "prepare" in facts.provenance["command_line"]
        first = facts.sample_split.copy()
    # the same command twice gives the same file contents
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(out), *COMMON, "--seed", "3"]) == 0
    with open_facts(out) as facts:
        np.testing.assert_array_equal(facts.sample_split, first)


def test_prepare_sgg_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg")
    out = tmp_path / "facts.h5"
    code = main(["prepare", "sgg", "--h5", str(fixture["h5_path"]), "--dicts", str(fixture["dicts_path"]),
                 "--image-data", str(fixture["image_data_path"]), "--images", str(fixture["images_dir"]),
                 "--out", str(out), *COMMON, "--orders", "1,3"])
    assert code == 0, capsys.readouterr().err
    with open_facts(out) as facts:
        assert sorted(set(facts.fact_order.tolist())) == [1, 3]
        assert facts.sample_split.tolist().count(1) == 1  # image 11 is the test image (split 2)


def test_missing_folder_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prepare", "vg", "--vg-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o.h5"), *COMMON])
    assert code == 2
    _one_line_error(capsys, "absent", "not found")
    assert not (tmp_path / "o.h5").exists()


def test_missing_json_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "relationships.json").unlink()
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "o.h5"), *COMMON]) == 2
    _one_line_error(capsys, "relationships.json not found")


def test_malformed_json_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "objects.json").write_text('[{"image_id": 1, "objects": [{"x": 1,,}]}]')
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "o.h5"), *COMMON]) == 2
    _one_line_error(capsys, "objects.json is malformed JSON")
    (root / "objects.json").write_text('{"image_id": 1}')
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "o.h5"), *COMMON]) == 2
    _one_line_error(capsys, "is not a JSON array")
    assert not (tmp_path / "o.h5").exists()


def test_sgg_h5_missing_dataset_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg", drop="labels")
    args = ["prepare", "sgg", "--h5", str(fixture["h5_path"]), "--dicts", str(fixture["dicts_path"]),
            "--image-data", str(fixture["image_data_path"]), "--no-images", "--out", str(tmp_path / "o.h5"), *COMMON]
    assert main(args) == 2
    _one_line_error(capsys, "no dataset 'labels'")
    good_dicts = fixture["dicts_path"].read_text()
    fixture["dicts_path"].write_text("{not json")
    assert main(args) == 2
    _one_line_error(capsys, "VG-SGG-dicts.json is malformed JSON")
    fixture["dicts_path"].write_text(good_dicts)
    fixture["h5_path"].write_bytes(b"not an hdf5 file")
    assert main(args) == 2
    _one_line_error(capsys, "not a readable HDF5 file")


def test_semantic_split_without_text_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "o.h5"), *COMMON,
                 "--split", "semantic"]) == 2
    _one_line_error(capsys, "semantic")


def test_too_many_tasks_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    args = ["prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "o.h5"), "--no-text", "--no-progress",
            "--tasks", "50", "--no-images", "--min-fact-count", "1"]
    assert main(args) == 2
    _one_line_error(capsys, "50 tasks but only")


def test_interrupted_prepare_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    out = tmp_path / "out" / "facts.h5"

    def failing_encoder(facts):
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        visual_genome.prepare_visual_genome(root, out, num_tasks=1, min_fact_count=1, text_encoder=failing_encoder,
                                            progress=False)
    assert not out.exists()

    real_crops = fact_pipeline.regions.crop_blocks

    def crops_then_interrupt(*args, **kwargs):
        blocks = real_crops(*args, **kwargs)
        yield next(blocks)
        raise KeyboardInterrupt

    monkeypatch.setattr(fact_pipeline.regions, "crop_blocks", crops_then_interrupt)
    code = main(["prepare", "vg", "--vg-dir", str(root), "--out", str(out), *COMMON])
    assert code == 130
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_prepare_without_source_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare"]) == 2
    assert "vg" in capsys.readouterr().out


def test_provenance_records_drops(tmp_path: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    out = tmp_path / "facts.h5"
    assert main(["prepare", "vg", "--vg-dir", str(root), "--out", str(out), *COMMON]) == 0
    with open_facts(out) as facts:
        provenance = facts.provenance
    assert provenance["dropped"]["objects: merged duplicate"] == 1
    assert provenance["source_files"]["relationships.json"]["size_bytes"] == (root / "relationships.json").stat().st_size
    assert len(provenance["task_statistics"]) == 2
    json.dumps(provenance)


def test_synth_world_round_trip_recovers_exact_fact_counts(tmp_path: Path) -> None:
    world = synthetic.generate_world(tmp_path / "synth", num_images=24, seed=1, image_size=(96, 72), progress=False)
    assert world.missing_image_ids and world.corrupt_image_ids and world.wrong_size_image_ids
    out = tmp_path / "facts.h5"
    report = visual_genome.prepare_visual_genome(tmp_path / "synth", out, num_tasks=2, min_fact_count=1,
                                                 image_size=8, test_fraction=0.0, progress=False)
    with open_facts(out) as facts:
        counts = dict(zip(facts.facts, np.bincount(facts.sample_fact, minlength=len(facts.facts)).tolist()))
        assert counts == world.fact_counts
        assert not set(facts.sample_image_id.tolist()) & set(world.missing_image_ids + world.corrupt_image_ids)
        assert facts.pixels(np.arange(len(facts.sample_fact))).shape == (len(facts.sample_fact), 8, 8, 3)
    assert report.notes["images listed but missing on disk"] == len(world.missing_image_ids)
    assert report.notes["images that do not decode"] == len(world.corrupt_image_ids)


def test_text_encoder_is_composed_by_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command loads the encoder from triplets.facts.language and hands data_prep an embed function."""
    calls: list[str] = []

    class HashEncoder:
        name = "hash-encoder"
        dim = 4

        def encode(self, texts):
            return np.array([[hash(t) % 7, len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)

    def load_text_encoder(spec: str = "minilm"):
        calls.append(spec)
        return HashEncoder()

    def embed_facts(facts, encoder):
        vectors = np.zeros((len(facts), 3 * encoder.dim), dtype=np.float32)
        masks = np.zeros((len(facts), 3), dtype=np.float32)
        for row, fact in enumerate(facts):
            for slot, phrase in enumerate(fact):
                if phrase is not None:
                    vectors[row, slot * encoder.dim:(slot + 1) * encoder.dim] = encoder.encode([phrase])[0]
                    masks[row, slot] = 1.0
        return vectors, masks

    monkeypatch.setattr(language, "load_text_encoder", load_text_encoder)
    monkeypatch.setattr(language, "embed_facts", embed_facts)
    root = write_vg_fixture(tmp_path / "vg")
    out = tmp_path / "facts.h5"
    args = ["prepare", "vg", "--vg-dir", str(root), "--out", str(out), "--no-progress", "--tasks", "2",
            "--min-fact-count", "1", "--no-images", "--split", "semantic", "--text-encoder", "my-encoder"]
    assert main(args) == 0
    assert calls == ["my-encoder"]
    with open_facts(out) as facts:
        assert facts.encoder_name == "hash-encoder"
        np.testing.assert_array_equal(facts.fact_embeddings, embed_facts(facts.facts, HashEncoder())[0])
        assert sorted(set(facts.task_of_fact.tolist())) == [0, 1]
        assert facts.provenance["options"]["split"] == "semantic"


def test_benchmark_generator_schema_is_read_completely(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_prepare

    sizes = bench_prepare.generate(tmp_path / "vg", num_images=30, num_relationships=400, seed=0)
    report = visual_genome.prepare_visual_genome(tmp_path / "vg", tmp_path / "f.h5", num_tasks=1, min_fact_count=1,
                                                 orders=(3,), no_images=True, progress=False, test_fraction=0.0)
    with open_facts(tmp_path / "f.h5") as facts:
        assert facts.provenance["relationships_read"] == sizes["relationships"] == 400
        # every generated relationship is well formed: all kept, none dropped
        assert len(facts.sample_fact) + report.dropped.get("samples whose box is empty inside the image", 0) == 400
        assert set(facts.sample_image_id.tolist()) <= set(range(1, 31))
