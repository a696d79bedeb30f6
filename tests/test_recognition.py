"""The object-recognition sequence: the paper's claims on a reduced offline run, resume after
kill -9, config validation, the paper-protocol configs failing only for want of data, and
the prepare/recognition commands' error handling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_prep.errors import MissingDatasetError
from data_prep.image_sets.idx import fashion_mnist_available
from triplets.cli import main
from triplets.errors import ConfigError
from triplets.report import recognition_markdown as results_markdown
from triplets.recognition.run import comparable, run_recognition
from triplets.recognition.config import load_recognition_config
from triplets.recognition.data import build_tasks

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PAPER_CONFIGS = ["recogseq8.yaml", "pair_birds_scenes.yaml", "pair_scenes_birds.yaml", "pair_flower_birds.yaml",
                 "pair_flower_scenes.yaml"]
needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(FMNIST),
                                  reason="Debian dataset-fashion-mnist not installed (make test-data)")


def reduced_config(tmp: Path, data_dir: Path, methods: list[str], num_tasks: int = 3) -> Path:
    """A 3-task cut of configs/recognition_offline.yaml: few samples, few epochs."""
    config = {
        "name": "reduced", "seed": 0, "data_dir": str(data_dir),
        "tasks": [
            {"name": "fmnist-tops", "dataset": "fashion_mnist", "classes": [0, 2, 4, 6],
             "max_train_per_class": 100, "max_test_per_class": 100},
            {"name": "letters", "dataset": "font_letters", "classes": list("ABCDEFGHIJ"),
             "renders_per_class": [40, 30]},
            {"name": "fmnist-rest", "dataset": "fashion_mnist", "classes": [1, 3, 5, 7, 8, 9],
             "max_train_per_class": 70, "max_test_per_class": 100},
        ],
        "model": {"arch": "small_cnn", "input_size": 28, "channels": 1, "width": 8, "feature_dim": 32},
        "train": {"epochs": 5, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
        "methods": methods,
        # the proximal step's λ (the default since issue 23; with momentum 0.9 about 10× the gradient form's
        # 0.1 and 0.001 that these tests used before)
        "method_options": {"mas": {"lam": 1.0}, "lmas": {"lam": 0.01}},
    }
    config["tasks"] = config["tasks"][:num_tasks]
    path = tmp / "reduced.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reduced_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not fashion_mnist_available(FMNIST):
        pytest.skip("Debian dataset-fashion-mnist not installed (make test-data)")
    tmp = tmp_path_factory.mktemp("reduced")
    path = reduced_config(tmp, tmp / "data", ["finetune", "mas", "lmas", "mas@test", "joint"])
    return run_recognition(load_recognition_config(path), tmp / "run", progress=False)


def test_reduced_run_forgets_and_mas_forgets_least(reduced_results: dict) -> None:
    methods = reduced_results["methods"]
    drops = {name: m["avg_drop"] for name, m in methods.items()}
    assert drops["finetune"] < -0.04, drops  # a sequence on which nothing forgets shows nothing
    assert drops["mas"] > drops["finetune"] + 0.02, drops
    assert drops["mas"] == max(drops[m] for m in ("finetune", "mas", "lmas")), drops


def test_reduced_run_lmas_forgets_less_than_finetune(reduced_results: dict) -> None:
    drops = {name: m["avg_drop"] for name, m in reduced_results["methods"].items()}
    assert drops["finetune"] < drops["lmas"] <= drops["mas"], drops


def test_importance_from_unlabeled_test_data_preserves_as_well(reduced_results: dict) -> None:
    methods = reduced_results["methods"]
    assert methods["mas@test"]["importance_data"] == "test" and methods["mas"]["importance_data"] == "train"
    # Table 3: Ω on unlabeled test inputs keeps old tasks as well as Ω on training data (±3 points)
    assert abs(methods["mas@test"]["avg_drop"] - methods["mas"]["avg_drop"]) <= 0.03
    assert methods["mas@test"]["avg_drop"] > methods["finetune"]["avg_drop"] + 0.02


def test_joint_is_the_upper_bound(reduced_results: dict) -> None:
    methods = reduced_results["methods"]
    best_other = max(m["avg_acc"] for name, m in methods.items() if name != "joint")
    assert methods["joint"]["avg_acc"] >= best_other - 0.005, {n: m["avg_acc"] for n, m in methods.items()}


def test_results_files_and_metrics_consistent(reduced_results: dict, tmp_path: Path) -> None:
    for summary in reduced_results["methods"].values():
        R = summary["accuracy_matrix"]
        assert len(R) == 3 and all(R[i][j] is None for i in range(3) for j in range(i + 1, 3))
        final = [R[2][j] for j in range(3)]
        assert summary["avg_acc"] == pytest.approx(sum(final) / 3)
        assert summary["avg_drop"] == pytest.approx(sum(R[2][j] - R[j][j] for j in range(3)) / 3)
        assert summary["forgetting"] == pytest.approx(sum(max(R[l][j] for l in range(j, 2)) - R[2][j]
                                                          for j in range(2)) / 2)  # Chaudhry et al. 2018
        assert summary["bwt"] == pytest.approx(sum(R[2][j] - R[j][j] for j in range(2)) / 2)
    assert reduced_results["complete"] is True
    # the one results schema (docs/run_folder.md), shared with the fact embedding
    assert reduced_results["schema_version"] == 1 and reduced_results["experiment"] == "recognition"
    assert [task["name"] for task in reduced_results["tasks"]] == ["fmnist-tops", "letters", "fmnist-rest"]
    assert reduced_results["methods"]["mas@test"]["importance_data"] == "test"
    assert reduced_results["methods"]["mas@test"]["method"] == "mas"
    table = results_markdown(reduced_results)
    assert "| mas@test |" in table and "avg drop" in table
    two = json.loads(json.dumps(reduced_results))
    two["tasks"] = two["tasks"][:2]
    for summary in two["methods"].values():
        summary["accuracy_matrix"] = [row[:2] for row in summary["accuracy_matrix"][:2]]
    R = two["methods"]["finetune"]["accuracy_matrix"]
    assert f"| finetune | {100 * R[1][0]:.2f} ({100 * (R[1][0] - R[0][0]):+.2f}) | {100 * R[1][1]:.2f} |" \
        in results_markdown(two)


@needs_fmnist
def test_resume_after_kill_equals_uninterrupted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path = reduced_config(tmp_path, data_dir, ["finetune", "mas"], num_tasks=2)
    config = load_recognition_config(path, ["train.epochs=2"])
    reference = run_recognition(config, tmp_path / "uninterrupted", progress=False)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "triplets.cli", "recognition", "--config", str(path), "--out", str(out),
         "--set", "train.epochs=2", "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "mas" / "checkpoint.pt"
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_mid_run = process.poll() is None
    if killed_mid_run:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert killed_mid_run, "the run finished before it could be killed"
    assert (out / "finetune" / "result.json").is_file() and marker.is_file()
    resumed = run_recognition(config, out, resume=True, progress=False)
    assert comparable(resumed) == comparable(reference)
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_offline_config_loads_with_enough_tasks_and_sources() -> None:
    config = load_recognition_config(REPO / "configs" / "recognition_offline.yaml")
    assert len(config.tasks) >= 4 and len({task.dataset for task in config.tasks}) >= 2
    assert config.model.arch == "small_cnn"
    assert {"finetune", "mas", "lmas", "mas@test", "joint"} <= {method.key for method in config.methods}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_load_and_fail_only_for_want_of_data(name: str, tmp_path: Path) -> None:
    config = load_recognition_config(REPO / "configs" / name, [f"data_dir={tmp_path / 'cache'}"])
    assert config.model.arch == "alexnet" and config.model.input_size == 224 and config.model.resize == 256
    assert all(options.get("lam") == 1.0 for options in config.method_options.values())
    with pytest.raises(MissingDatasetError) as info:
        build_tasks(config)
    message = str(info.value)
    assert "\n" not in message and "expected layout" in message


def test_cli_recognition_missing_data_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["recognition", "--config", str(REPO / "configs" / "pair_flower_birds.yaml"), "--out",
                 str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'cache'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "expected layout" in err


def test_config_errors_name_the_nearest_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [{name: a, dataset: digits}]\nmodel: {arch: small_cnn, widht: 8}\n")
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        load_recognition_config(bad)
    bad.write_text("tasks: [{name: a, dataset: digit}]\n")
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_recognition_config(bad)
    bad.write_text("tasks: [{name: a, dataset: digits}]\nmethods: [mas, ewc@test]\n")
    with pytest.raises(ConfigError, match="without labels"):
        load_recognition_config(bad)
    bad.write_text("tasks: [{name: a, dataset: digits}]\nmethods: [maas]\n")
    with pytest.raises(ConfigError, match="did you mean 'mas'"):
        load_recognition_config(bad)


def test_prepare_images_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["prepare", "images", "--dataset", "cub200", "--root", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "cub.h5")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "CUB_200_2011" in err
    code = main(["prepare", "images", "--dataset", "flowerz", "--out", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "did you mean 'flowers102'" in err
    assert not (tmp_path / "cub.h5").exists()


def test_prepare_images_command_writes_a_readable_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["prepare", "images", "--dataset", "digits", "--out", str(tmp_path / "d.h5"), "--image-size", "12"])
    assert code == 0 and "10 classes" in capsys.readouterr().out
    from data_prep.image_sets.image_file import open_image_dataset

    assert open_image_dataset(tmp_path / "d.h5").image_shape == (12, 12, 1)


def test_pretrained_trunk_loads_local_weights_only(tmp_path: Path) -> None:
    import torch
    import torchvision

    from triplets.errors import RunFolderError
    from triplets.recognition.config import ModelSpec
    from triplets.recognition.data import make_trunk

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    spec = ModelSpec(arch="resnet18", input_size=32, channels=3, pretrained_weights=str(tmp_path / "r18.pth"))
    trunk, feature_dim = make_trunk(spec)
    assert feature_dim == 512
    assert torch.equal(trunk.conv1.weight, reference.conv1.weight)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        make_trunk(ModelSpec(arch="alexnet", input_size=224, channels=3, pretrained_weights=str(tmp_path / "no")))


def test_resize_and_crop_inputs_like_the_paper(tmp_path: Path) -> None:
    import torch

    config_path = tmp_path / "crop.yaml"
    config_path.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "tasks": [{"name": "digits", "dataset": "digits", "classes": [0, 1], "max_train_per_class": 5,
                   "max_test_per_class": 5}],
        "model": {"arch": "small_cnn", "channels": 3, "input_size": 16, "resize": 20, "augment": True,
                  "normalize": "imagenet"}}))
    (task,) = build_tasks(load_recognition_config(config_path))
    torch.manual_seed(0)
    first = task.train[3][0]
    torch.manual_seed(0)
    assert torch.equal(first, task.train[3][0]) and first.shape == (3, 16, 16)
    centre = task.test[0][0]
    assert torch.equal(centre, task.test[0][0])  # test inputs: deterministic centre crop
    # ImageNet normalisation: a black pixel maps to -mean/std
    assert float(centre.min()) == pytest.approx(-0.485 / 0.229, abs=1e-4)


def test_two_processes_give_the_one_process_results(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m triplets.cli recognition`: rank 0 alone writes, and the
    results equal the one-process run's (small_cnn has no BatchNorm or dropout, so only the
    order of floating-point sums differs: accuracies within one test image, 1/200)."""
    if not fashion_mnist_available(FMNIST):
        pytest.skip("Debian dataset-fashion-mnist not installed (make test-data)")
    path = reduced_config(tmp_path, tmp_path / "data", ["finetune", "mas"], num_tasks=2)
    reference = run_recognition(load_recognition_config(path, ["train.epochs=2"]), tmp_path / "one",
                                progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "triplets.cli",
         "recognition", "--config", str(path), "--out", str(tmp_path / "two"), "--set", "train.epochs=2"],
        env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = comparable(reference)
    for name, summary in one["methods"].items():
        for row_one, row_two in zip(summary["accuracy_matrix"], two["methods"][name]["accuracy_matrix"]):
            assert row_two == pytest.approx(row_one, abs=1 / 200 + 1e-9), name
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files(tmp_path / "two") == files(tmp_path / "one")


def tiny_digits_config(root: Path, methods: list[str], method_options: dict | None = None,
                       search: dict | None = None, name: str = "tiny", train_per_class: int = 10,
                       epochs: int = 2) -> Path:
    """Two tiny digit tasks (``train_per_class`` training images per class, 4 test), ``epochs``
    epochs per task: seconds per method."""
    path = root / "recognition.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "seed": 0, "data_dir": str(root / "data"),
        "tasks": [{"name": "low", "dataset": "digits", "classes": [0, 1, 2], "max_train_per_class": train_per_class,
                   "max_test_per_class": 4},
                  {"name": "high", "dataset": "digits", "classes": [7, 8, 9], "max_train_per_class": train_per_class,
                   "max_test_per_class": 4}],
        "model": {"arch": "small_cnn", "input_size": 8, "channels": 1, "width": 4, "feature_dim": 8},
        "train": {"epochs": epochs, "batch_size": 8, "lr": 0.05, "device": "cpu"},
        "methods": methods, **({"method_options": method_options} if method_options is not None else {}),
        **({"search": search} if search is not None else {}),
    }, sort_keys=False))
    return path


def test_a_diverged_method_is_listed_and_the_others_are_reported(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """MAS at λ = 1e12 diverges on task 2; fine-tuning's results are still written, MAS is listed
    under `diverged` with its one-line error, and the command exits 1."""
    config = tiny_digits_config(tmp_path, ["finetune", "mas"], {"mas": {"lam": 1e12, "penalty_step": "gradient"}})
    out = tmp_path / "run"
    assert main(["recognition", "--config", str(config), "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["finetune"] and results["complete"] is False  # mas is still to be done
    assert list(results["diverged"]) == ["mas"] and "lam=1e+12" in results["diverged"]["mas"]
    assert "\n" not in results["diverged"]["mas"]
    markdown = (out / "results.md").read_text()
    assert "| finetune |" in markdown and "- mas: training diverged" in markdown and "| mas |" not in markdown
    assert "method mas diverged: training diverged" in captured.err
    assert (out / "plots" / "accuracy.png").is_file()


def test_a_diverged_method_resumed_with_the_lower_strength_its_error_advises(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """The error advises a lower strength; resuming with it trains the method from the start (its
    checkpoint holds the diverged setting) and the record then says complete, nothing diverged."""
    config = tiny_digits_config(tmp_path, ["finetune", "mas"], {"mas": {"lam": 1e12, "penalty_step": "gradient"}})
    out = tmp_path / "run"
    assert main(["recognition", "--config", str(config), "--out", str(out), "--quiet"]) == 1
    finetune = (out / "finetune" / "result.json").read_bytes()
    capsys.readouterr()
    assert main(["recognition", "--config", str(config), "--out", str(out), "--resume", "--quiet",
                 "--set", "method_options.mas.lam=1.0"]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and list(results["methods"]) == ["finetune", "mas"]
    assert not results.get("diverged") and results["methods"]["mas"]["options"]["lam"] == 1.0
    assert (out / "finetune" / "result.json").read_bytes() == finetune  # the finished method is kept as it was
    (tmp_path / "fresh").mkdir()
    fresh = tiny_digits_config(tmp_path / "fresh", ["mas"], {"mas": {"lam": 1.0, "penalty_step": "gradient"}})
    assert main(["recognition", "--config", str(fresh), "--out", str(tmp_path / "fresh" / "run"), "--quiet"]) == 0
    alone = json.loads((tmp_path / "fresh" / "run" / "results.json").read_text())["methods"]["mas"]
    assert alone["accuracy_matrix"] == results["methods"]["mas"]["accuracy_matrix"]  # the same as a fresh run


def test_when_every_method_diverges_the_error_stands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_digits_config(tmp_path, ["mas"], {"mas": {"lam": 1e12, "penalty_step": "gradient"}})
    assert main(["recognition", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "diverged" in error and "\n" not in error
