"""The main demo pipeline (triplets.demo) on a reduced world: synth → prepare → train → query."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triplets.language", reason="the demo embeds facts with triplets.language")

from triplets.demo import main, run_demo  # noqa: E402

REDUCED = [
    "synth.num_images=160",
    "prepare.min_fact_count=3",
    "train.optim.epochs=1",
    "train.model.trunk_channels=[8, 16]",
    "train.model.branch_channels=16",
    "train.model.hidden_dim=32",
    # the tiny network is unstable at the demo's lr 0.03 (BatchNorm scales grow and MAS's Ω explodes)
    "train.optim.lr=0.01",
    "train.methods=[{name: finetune}, {name: mas, options: {lam: 1.0, mode: exact}}]",
]


def test_reduced_demo_writes_results_and_reuses_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, overrides=REDUCED, progress=False)
    first = capsys.readouterr().out
    assert "rendered" in first and "prepared" in first
    assert "image → facts (mas)" in first and "text → images (mas)" in first
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["finetune", "mas"]
    for entry in saved["methods"].values():
        R = entry["accuracy_matrix"]
        assert len(R) == 4
        assert 0.0 <= entry["avg_acc"] <= 1.0
        assert entry["avg_acc"] == pytest.approx(sum(R[-1]) / 4)
        assert entry["forgetting"] == pytest.approx(sum(max(R[l][j] for l in range(j, 3)) - R[3][j]
                                                        for j in range(3)) / 3)  # Chaudhry et al. 2018
    assert (out / "results.md").is_file() and (out / "mas" / "index" / "facts.faiss").is_file()
    assert (tmp_path / "demo_data" / "facts.h5").is_file()

    # a second demo reuses the world, the fact file and the finished run: same numbers
    again = run_demo(out, overrides=REDUCED, progress=False, query_example=False)
    second = capsys.readouterr().out
    assert "world reused" in second and "fact file reused" in second and "resumed" in second
    assert again["methods"] == results["methods"]


def test_demo_bad_setting_is_one_line_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo"), "--set", "synth.num_image=10"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'num_images'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
