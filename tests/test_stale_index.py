"""Stale-index retrieval (triplets.facts.stale_index, eval.stale_index, evaluate --stale-index) on a
2-task run of the tiny fact world: the saved embeddings, C[s] by hand, C[T] = fresh, resume."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from test_train import SMALL_MODEL, make_tiny_fact_file
from triplets.errors import ConfigError, RunFolderError
from triplets.facts.evaluate import embed_images, evaluate_run, image_to_fact_metrics
from triplets.facts.stale_index import STALE_KEYS, embeddings_path
from triplets.facts.train import train_run
from mas_core.loop import OptimSettings
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig
from triplets.run_folder import load_run
from triplets.facts.data import fact_image_dataset

METHODS = [MethodConfig("finetune"), MethodConfig("mas", {"lam": 1.0}), MethodConfig("imm", {"mode": "mean"})]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    return make_tiny_fact_file(tmp_path_factory.mktemp("stale") / "facts.h5", num_tasks=2, facts_per_task=6,
                               train_per_fact=4, test_per_fact=2)


def _config(fact_file: Path, *, stale: bool = True) -> TrainConfig:
    return TrainConfig(data=DataConfig(fact_file=str(fact_file)), model=SMALL_MODEL,
                       optim=OptimSettings(epochs=1, batch_size=16, lr=0.05), methods=list(METHODS),
                       eval=EvalConfig(index="none", stale_index=stale), num_threads=1)


@pytest.fixture(scope="module")
def stale_run(two_tasks, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stale_run") / "run"
    return out, train_run(_config(two_tasks), out, progress=False)


def test_stale_rows_are_the_saved_embeddings_ranked_and_the_last_is_the_fresh_figure(stale_run, two_tasks):
    out, results = stale_run
    with load_run(out) as run:
        fact_file = run.fact_file
        for name, entry in results["methods"].items():
            rows = entry["stale_index"]["rows"]
            assert [row["index_after_task"] for row in rows] == [1, 2]
            # C[T] = fresh, every key, exactly; and it is the run's average standard top-5
            assert rows[-1]["stale"] == rows[-1]["fresh"]
            assert rows[-1]["stale"]["top5"] == pytest.approx(entry["avg_acc"], abs=1e-15)
            assert set(rows[0]["stale"]) == set(STALE_KEYS)
            # fresh[s]: the final model's own standard metrics of tasks 0..s
            assert rows[0]["fresh"]["top5"] == entry["final"]["standard"][0]["top5"]
            # C[s] by hand from the saved file: the fact vectors rank the stored region embeddings
            matrix = entry.get("accuracy_matrix_merged") or entry["accuracy_matrix"]  # the delivered model's
            for after in range(2):
                with np.load(embeddings_path(out / name, after)) as saved:
                    tasks = [(saved[f"embeddings_{j}"], saved[f"fact_ids_{j}"]) for j in range(after + 1)]
                top5 = []
                for j, (vectors, ids) in enumerate(tasks):
                    facts = fact_file.facts_of_task(j)
                    value = image_to_fact_metrics(vectors, ids, fact_file.fact_embeddings, fact_file.facts,
                                                  facts)["top5"]
                    assert value == rows[after]["per_task"][j]["top5"] == matrix[after][j]
                    top5.append(value)
                assert rows[after]["stale"]["top5"] == pytest.approx(np.mean(top5), abs=1e-15)
            # the last file holds the final model's embeddings of the test regions
            model = run.load_model(name)
            with np.load(embeddings_path(out / name, 1)) as saved:
                for j in range(2):
                    vectors, ids = embed_images(model, fact_image_dataset(fact_file, j, "test"))
                    np.testing.assert_allclose(saved[f"embeddings_{j}"], vectors, atol=1e-6)
                    assert saved[f"fact_ids_{j}"].tolist() == ids.tolist()
    # the field's figures and the diagonal mean are in results.json and results.md
    mas = results["methods"]["mas"]
    assert mas["diagonal_mean"] == pytest.approx(np.mean([mas["accuracy_matrix"][j][j] for j in range(2)]))
    assert set(mas["retrieval"]) == {"standard", "generalized"} and "i2f_r10" in mas["retrieval"]["generalized"]
    assert "f2i_r5" in mas["final"]["generalized"][1]
    markdown = (out / "results.md").read_text()
    assert "Stale index" in markdown and "| mas | 2 |" in markdown and "diagonal mean" in markdown
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"]["imm"]["stale_index"] == results["methods"]["imm"]["stale_index"]


def test_a_resumed_run_saves_the_same_embeddings_and_rows(stale_run, two_tasks, tmp_path):
    out, results = stale_run
    resumed = tmp_path / "resumed"
    config = dataclasses.replace(_config(two_tasks), methods=[METHODS[1]])
    train_run(config, resumed, progress=False, stop_after_task=1)
    assert embeddings_path(resumed / "mas", 0).is_file() and not embeddings_path(resumed / "mas", 1).exists()
    again = train_run(config, resumed, resume=True, progress=False)
    for after in range(2):
        assert embeddings_path(resumed / "mas", after).read_bytes() == embeddings_path(out / "mas", after).read_bytes()
    assert again["methods"]["mas"]["stale_index"] == results["methods"]["mas"]["stale_index"]
    assert not list(resumed.rglob("*.tmp"))


def test_evaluate_recomputes_the_rows_and_refuses_a_run_without_embeddings(stale_run, two_tasks, tmp_path, capsys):
    from triplets.cli import main

    out, results = stale_run
    evaluated = evaluate_run(out, stale_index=True)
    for name in results["methods"]:
        assert evaluated["methods"][name]["stale_index"] == results["methods"][name]["stale_index"]
    assert main(["evaluate", "--run", str(out), "--stale-index"]) == 0
    assert "Stale index" in capsys.readouterr().out

    plain = tmp_path / "plain"
    train_run(dataclasses.replace(_config(two_tasks, stale=False), methods=[METHODS[0]]), plain, progress=False)
    assert "stale_index" not in json.loads((plain / "results.json").read_text())["methods"]["finetune"]
    before = (plain / "results.json").read_bytes()
    assert main(["evaluate", "--run", str(plain), "--stale-index"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "eval.stale_index" in error and "after task(s) 1, 2" in error
    assert (plain / "results.json").read_bytes() == before          # nothing written
    assert "stale_index" not in evaluate_run(plain)["methods"]["finetune"]   # the run's config: off


def test_a_damaged_file_and_a_bad_option_are_refused(stale_run, tmp_path):
    import shutil

    out, _ = stale_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = embeddings_path(copy / "mas", 0)
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    arrays["embeddings_0"] = arrays["embeddings_0"] + 1.0
    np.savez(path, **arrays)                                          # edited, checksum kept
    with pytest.raises(RunFolderError, match="checksum"):
        evaluate_run(copy, stale_index=True)
    with pytest.raises(ValueError, match="eval.stale_index"):
        EvalConfig(stale_index="yes").validate()
    from triplets.config import from_dict

    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"eval": {"stale_index": "yes"}}, "test")


def test_turning_the_option_on_when_resuming_a_started_method_is_refused_before_training(two_tasks, tmp_path):
    out = tmp_path / "run"
    config = dataclasses.replace(_config(two_tasks, stale=False), methods=[METHODS[1]])
    train_run(config, out, progress=False, stop_after_task=1)
    checkpoint = (out / "mas" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="without eval.stale_index"):
        train_run(dataclasses.replace(_config(two_tasks), methods=[METHODS[1]]), out, resume=True, progress=False)
    assert (out / "mas" / "checkpoint.pt").read_bytes() == checkpoint     # nothing trained
    finished = train_run(config, out, resume=True, progress=False)       # without it the run goes on
    assert len(finished["methods"]["mas"]["accuracy_matrix"]) == 2
