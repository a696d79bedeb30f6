"""The main demo pipeline (triplets.demo) on reduced worlds: synth → prepare → train → query → picture."""
from __future__ import annotations

import json

import pytest
from PIL import Image

pytest.importorskip("triplets.facts.language", reason="the demo embeds facts with triplets.facts.language")

from data_prep.errors import MissingDatasetError  # noqa: E402
from data_prep.facts.fact_file import open_facts  # noqa: E402
from triplets import demo as demo_module  # noqa: E402
from triplets.config import load_config  # noqa: E402
from triplets.demo import SHOW_FILE, SHOW_K, DemoConfig, main, run_demo  # noqa: E402
from triplets.query.show import sheet_size_pixels  # noqa: E402

TINY_MODEL = [
    "prepare.min_fact_count=3",
    "train.optim.epochs=1",
    "train.model.trunk_channels=[8, 16]",
    "train.model.branch_channels=16",
    "train.model.hidden_dim=32",
    # the tiny network is unstable at the demo's lr 0.03 (BatchNorm scales grow and MAS's Ω explodes)
    "train.optim.lr=0.01",
]
# a cut of the real-image world without clothing (digits and letters need no installed dataset)
REDUCED = [
    "synth.num_images=160",
    "synth.objects=digits,letters",
    *TINY_MODEL,
    "train.methods=[{name: finetune}, {name: mas, options: {lam: 1.0, mode: exact}}]",
]


def test_default_demo_is_a_cut_of_the_real_world_with_proximal_mas():
    config = load_config(demo_module.DEFAULT_CONFIG, DemoConfig)
    assert config.synth.world == "real" and 0 < config.synth.num_images < 20_000
    assert [m.name for m in config.train.methods] == ["finetune", "mas"]
    assert config.train.methods[1].options.get("penalty_step") == "proximal"


def test_reduced_demo_writes_results_picture_and_reuses_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, overrides=REDUCED, progress=False)
    first = capsys.readouterr().out
    assert "real world of 160 images written" in first and "prepared" in first
    assert "image → facts (mas)" in first and "text → images (mas)" in first
    picture = out / SHOW_FILE
    assert f"nearest test regions: {picture}" in first
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size == sheet_size_pixels(SHOW_K)
    assert "MAS - finetune: average standard top-5" in first and "final generalized top-5" in first

    stamp = json.loads((tmp_path / "demo_data" / "synth.json").read_text())
    assert stamp["world"] == "real" and stamp["objects"] == "digits,letters" and stamp["num_images"] == 160
    manifest = json.loads((tmp_path / "demo_data" / "synth" / "synth_manifest.json").read_text())
    assert manifest["world"] == "real" and manifest["sources"] == ["digits", "letters"]

    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["finetune", "mas"]
    for entry in saved["methods"].values():
        R = entry["accuracy_matrix"]
        assert len(R) == 4
        assert 0.0 <= entry["avg_acc"] <= 1.0
        assert entry["avg_acc"] == pytest.approx(sum(R[-1]) / 4)
        assert entry["forgetting"] == pytest.approx(sum(max(R[l][j] for l in range(j, 3)) - R[3][j]
                                                        for j in range(3)) / 3)  # Chaudhry et al. 2018
        generalized = entry["final"]["generalized"]
        assert len(generalized) == 4
        assert demo_module.generalized_top5(entry) == pytest.approx(sum(t["top5"] for t in generalized) / 4)
    assert (out / "results.md").is_file() and (out / "mas" / "index" / "facts.faiss").is_file()
    assert (tmp_path / "demo_data" / "facts.h5").is_file()

    # a second demo reuses the world, the fact file and the finished run: same numbers
    again = run_demo(out, overrides=REDUCED, progress=False, query_example=False)
    second = capsys.readouterr().out
    assert "world of 160 images reused" in second and "fact file reused" in second and "resumed" in second
    assert again["methods"] == results["methods"]


def test_demo_keeps_the_shapes_world_and_replaces_a_run_of_another_world(tmp_path, capsys):
    out = tmp_path / "demo"
    finetune_only = [*TINY_MODEL, "train.methods=[{name: finetune}]"]
    results = run_demo(out, overrides=["synth.world=shapes", "synth.num_images=120", *finetune_only],
                       progress=False, query_example=False)
    assert "shapes world of 120 images written" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo_data" / "synth.json").read_text())["world"] == "shapes"
    assert 0.0 <= results["methods"]["finetune"]["avg_acc"] <= 1.0

    # same training settings on another world: the new fact file makes the old run stale
    run_demo(out, overrides=["synth.num_images=120", "synth.objects=digits,letters", *finetune_only],
             progress=False, query_example=False)
    second = capsys.readouterr().out
    assert "real world of 120 images written" in second and "replacing it" in second and "done" in second
    saved = json.loads((out / "results.json").read_text())
    with open_facts(tmp_path / "demo_data" / "facts.h5") as fact_file:
        sizes = [len(fact_file.facts_of_task(t)) for t in range(fact_file.num_tasks)]
    assert [task["num_facts"] for task in saved["tasks"]] == sizes


def test_demo_bad_setting_is_one_line_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo"), "--set", "synth.num_image=10"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'num_images'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()

    assert main(["--out", str(tmp_path / "demo"), "--set", "synth.world=shapes", "--set", "synth.objects=digits"]) == 2
    err = capsys.readouterr().err
    assert "synth.objects applies to world: real only" in err and len(err.strip().splitlines()) == 1


def test_demo_missing_dataset_names_the_ways_around_it(tmp_path, capsys, monkeypatch):
    def missing(*_args, **_kwargs):
        raise MissingDatasetError("Fashion-MNIST not found in /nowhere: apt-get install dataset-fashion-mnist")

    monkeypatch.setattr(demo_module, "generate_real_world", missing)
    assert main(["--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "synth.objects=digits,letters" in err and "synth.world=shapes" in err
    assert len(err.strip().splitlines()) == 1
