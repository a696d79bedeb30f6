"""The one runner of both experiments (triplets.runner, issue 25): one method spec (``mas@test`` the
shorthand of ``{name: mas, label: mas@test, importance_data: test}``) in both configs, one divergence
policy (the diverged method listed with its error, the others go on, exit status 1), one resume rule
(a diverged method whose settings changed trains from its start; any other changed method is
refused in one line), one saved config (config.yaml; a recognition folder's older config.json read
or refused in one line)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mas_core.checkpoint import atomic_write_json, read_json
from triplets.cli import main
from triplets.config import from_dict, to_dict
from triplets.errors import ConfigError, RunFolderError
from triplets.facts.train_config import TrainConfig, load_train_config
from triplets.recognition.config import RecognitionConfig, load_recognition_config, resolved_method
from triplets.run_folder import load_run, run_kind
from triplets.runner import MethodSpec, parse_methods

from test_faults import refused
from test_recognition import tiny_digits_config
from test_train import make_tiny_fact_file

MODEL = {"trunk_channels": [4, 8], "branch_channels": 8, "hidden_dim": 16}
DIVERGING_MAS = {"name": "mas", "options": {"lam": 1e12, "penalty_step": "gradient"}}
CALM_MAS = {"name": "mas", "options": {"lam": 1.0, "penalty_step": "gradient"}}


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    return make_tiny_fact_file(tmp_path_factory.mktemp("runner") / "facts.h5", num_tasks=2, facts_per_task=4,
                               train_per_fact=4, test_per_fact=2)


def fact_config(path: Path, facts: Path, methods: list, index: str = "none", **data) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"fact_file": str(facts), **data}, "model": MODEL,
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05}, "methods": methods,
        "eval": {"index": index}, "num_threads": 1, "device": "cpu"}, sort_keys=False))
    return path


def matrix(run: Path, key: str) -> list:
    return json.loads((run / "results.json").read_text())["methods"][key]["accuracy_matrix"]


# ------------------------------------------------------------------------------------------ the spec

def test_the_shorthand_and_the_mapping_are_one_spec() -> None:
    spec = MethodSpec.from_string("mas@test")
    assert (spec.name, spec.label, spec.importance_data, spec.key, spec.folder) == \
        ("mas", "mas@test", "test", "mas@test", "mas_at_test")
    assert spec.to_plain() == "mas@test" and MethodSpec("mas").to_plain() == "mas"
    assert MethodSpec("mas", {"lam": 2.0}, "strong").to_plain() == {"name": "mas", "options": {"lam": 2.0},
                                                                     "label": "strong"}
    assert parse_methods("finetune, mas@test") == [MethodSpec("finetune"), spec]
    raw = {"data": {"fact_file": "x.h5"}, "methods": ["finetune", "mas@test", {"name": "ewc", "label": "e2"}]}
    config = from_dict(TrainConfig, raw)
    assert [m.key for m in config.methods] == ["finetune", "mas@test", "e2"]
    assert from_dict(TrainConfig, to_dict(config)).methods == config.methods  # written and read back alike
    with pytest.raises(ConfigError, match="only .* estimate importance without labels"):
        from_dict(TrainConfig, {"data": {"fact_file": "x.h5"}, "methods": ["ewc@test"]})
    with pytest.raises(ConfigError, match="after @ must be 'train' or 'test'"):
        from_dict(TrainConfig, {"data": {"fact_file": "x.h5"}, "methods": ["mas@val"]})


def test_a_recognition_spec_takes_method_options_then_its_own(tmp_path: Path) -> None:
    path = tiny_digits_config(tmp_path, ["mas", {"name": "mas", "label": "strong", "options": {"lam": 3.0}},
                                         {"name": "lmas", "importance_data": "test"}], {"mas": {"lam": 2.0}})
    config = load_recognition_config(path)
    resolved = [resolved_method(config, method) for method in config.methods]
    assert [(m.key, m.options, m.importance_data) for m in resolved] == [
        ("mas", {"lam": 2.0}, "train"), ("strong", {"lam": 3.0}, "train"), ("lmas", {}, "test")]


# ------------------------------------------------------------------------------------------ the fact runs

def test_a_diverged_fact_method_is_listed_the_others_finish_and_a_resume_retrains_it(
        facts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """MAS at λ = 1e12 (gradient step) diverges on task 2: fine-tuning is trained and reported, MAS is
    listed under `diverged` with its one-line error, exit status 1 (before issue 25 the fact run
    stopped). Resumed with the lower strength the error advises, MAS trains from its start and equals
    a fresh run; changing a finished method instead is refused in one line."""
    ewc = {"name": "ewc", "options": {"lam": 1.0}}
    config = fact_config(tmp_path / "c.yaml", facts, ["finetune", ewc, DIVERGING_MAS])
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["finetune", "ewc"] and results["complete"] is False
    assert list(results["diverged"]) == ["mas"] and "\n" not in results["diverged"]["mas"]
    assert "training diverged" in results["diverged"]["mas"] and "method mas diverged: training diverged" in err
    assert "- mas: training diverged" in (out / "results.md").read_text()
    with load_run(out) as run:
        assert run.methods == ["finetune", "ewc"]
    finetune = (out / "finetune" / "result.json").read_bytes()

    refused(capsys, ["train", "--config", str(config), "--out", str(out), "--resume", "--no-progress",
                     "--set", "methods=[finetune, {name: ewc, options: {lam: 2.0}}, mas]"],
            "method 'ewc' in .* was trained with", out)
    assert main(["train", "--config", str(config), "--out", str(out), "--resume", "--no-progress",
                 "--set", f"methods=[finetune, {json.dumps(ewc)}, {json.dumps(CALM_MAS)}]"]) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and not results.get("diverged")
    assert list(results["methods"]) == ["finetune", "ewc", "mas"]
    assert results["methods"]["mas"]["options"]["lam"] == 1.0
    assert (out / "finetune" / "result.json").read_bytes() == finetune  # the finished method is kept as it was
    fresh = fact_config(tmp_path / "fresh.yaml", facts, [CALM_MAS])
    assert main(["train", "--config", str(fresh), "--out", str(tmp_path / "fresh"), "--no-progress"]) == 0
    assert matrix(tmp_path / "fresh", "mas") == results["methods"]["mas"]["accuracy_matrix"]


def test_mas_at_test_in_a_fact_config_is_mas_on_the_test_images(facts: Path, tmp_path: Path) -> None:
    """``mas@test`` (the config's importance data: train) trains as ``mas`` with ``data.importance_data:
    test``: the same accuracy matrix, in the folder ``mas_at_test``, queried as ``mas@test``."""
    one = fact_config(tmp_path / "one.yaml", facts, ["mas", "mas@test"], index="flat")
    two = fact_config(tmp_path / "two.yaml", facts, ["mas"], importance_data="test")
    assert main(["train", "--config", str(one), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert main(["train", "--config", str(two), "--out", str(tmp_path / "two"), "--no-progress"]) == 0
    assert matrix(tmp_path / "one", "mas@test") == matrix(tmp_path / "two", "mas")
    weights = {name: torch.load(tmp_path / name / "model.pt", weights_only=True)["model"]
               for name in ("one/mas_at_test", "two/mas", "one/mas")}
    assert all(torch.equal(weights["one/mas_at_test"][k], weights["two/mas"][k]) for k in weights["two/mas"])
    assert not all(torch.equal(weights["one/mas"][k], weights["two/mas"][k]) for k in weights["two/mas"])
    samples = {key: json.loads((tmp_path / "one" / "results.json").read_text())["methods"][key]["labels"][0]
               ["importance"]["samples"] for key in ("mas", "mas@test")}
    assert samples == {"mas": 16, "mas@test": 8}  # 4 facts × 4 training images, × 2 test images
    assert (tmp_path / "one" / "mas_at_test" / "model.pt").is_file()
    assert load_train_config(tmp_path / "one" / "config.yaml").methods == [MethodSpec("mas"),
                                                                           MethodSpec.from_string("mas@test")]
    with load_run(tmp_path / "one") as run:
        assert run.methods == ["mas", "mas@test"] and run.load_model("mas@test") is not None
    assert (tmp_path / "one" / "mas_at_test" / "index" / "images.faiss").is_file()
    assert main(["evaluate", "--run", str(tmp_path / "one")]) == 0  # evaluate and query find its folder
    assert main(["query", "--run", str(tmp_path / "one"), "--method", "mas@test", "--text", "subj0_0"]) == 0


# ------------------------------------------------------------------------------------------ recognition folders

def test_recognition_writes_config_yaml_and_an_older_config_json_folder_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A recognition run records config.yaml (first line: the command), so `evaluate` refuses it in one
    line; a folder of the older layout (config.json, result.json as {identity, result}) resumes to the
    same results and is then recorded as config.yaml; a config.json that is not a config is refused."""
    path = tiny_digits_config(tmp_path, ["finetune", {"name": "mas", "label": "strong", "options": {"lam": 2.0}}])
    out = tmp_path / "run"
    assert main(["recognition", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    reference = json.loads((out / "results.json").read_text())
    assert reference["methods"]["strong"]["options"] == {"lam": 2.0} and (out / "strong" / "result.json").is_file()
    assert run_kind(out) == "recognition" and (out / "config.yaml").read_text().startswith("# mas-triplets recognition")
    with pytest.raises(RunFolderError, match="holds a recognition run"):
        load_run(out)

    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    saved = yaml.safe_load((legacy / "config.yaml").read_text())
    (legacy / "config.yaml").unlink()
    (legacy / "config.json").write_text(json.dumps(saved))
    for key in ("finetune", "strong"):  # the older per-method file: the result under its identity
        atomic_write_json(legacy / key / "result.json", {"identity": {"method": key},
                                                         "result": read_json(legacy / key / "result.json")},
                          checksum=True)
    (legacy / "results.json").unlink()
    assert run_kind(legacy) == "recognition"
    refused(capsys, ["recognition", "--config", str(path), "--out", str(legacy), "--quiet"], "already holds a run",
            legacy)
    broken = tmp_path / "broken"
    shutil.copytree(legacy, broken)
    (broken / "config.json").write_text(json.dumps({**saved, "optimiser": {}}))
    refused(capsys, ["recognition", "--config", str(path), "--out", str(broken), "--resume", "--quiet"],
            r"config.json is not a valid run config .*unknown key 'optimiser'", broken)

    assert main(["recognition", "--config", str(path), "--out", str(legacy), "--resume", "--quiet"]) == 0
    resumed = json.loads((legacy / "results.json").read_text())
    assert resumed["methods"] == reference["methods"] and resumed["complete"] is True
    assert not (legacy / "config.json").exists()
    assert from_dict(RecognitionConfig, yaml.safe_load((legacy / "config.yaml").read_text())).methods == \
        load_recognition_config(path).methods
