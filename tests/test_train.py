"""Task-by-task training of the fact embedding (triplets.facts.train, `mas-triplets train`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_prep.facts.fact_file import write_fact_file
from mas_core.errors import CheckpointMismatchError
from triplets.config import to_dict
from triplets.errors import ConfigError, RunFolderError


def make_tiny_fact_file(path: Path, *, num_tasks: int = 4, facts_per_task: int = 12, train_per_fact: int = 8,
                        test_per_fact: int = 3, image_size: int = 16, slot_dim: int = 16, seed: int = 0) -> Path:
    """A small fact world: every fact has its own colour with a faint 4×4 pattern, every
    sample is that template plus noise; language vectors are random per word.
    Each task mixes <S>, <S,P> and <S,P,O> facts with task-specific subjects."""
    rng = np.random.default_rng(seed)
    predicates = [f"pred{i}" for i in range(4)]
    facts, task_of_fact = [], []
    for task in range(num_tasks):
        for k in range(facts_per_task):
            subject = f"subj{task}_{k % 6}"
            order = 1 + k % 3
            if order == 1:
                fact = (subject, None, None)
            elif order == 2:
                fact = (subject, predicates[k % 4], None)
            else:
                fact = (subject, predicates[(k + 1) % 4], f"obj{(task * 7 + k) % 10}")
            if fact in facts:
                fact = (f"{subject}x{k}", fact[1], fact[2])
            facts.append(fact)
            task_of_fact.append(task)
    words: dict[str, np.ndarray] = {}

    def vector(word):
        if word is None:
            return np.zeros(slot_dim, np.float32)
        if word not in words:
            words[word] = rng.normal(size=slot_dim).astype(np.float32)
        return words[word]

    fact_embeddings = np.stack([np.concatenate([vector(s), vector(p), vector(o)]) for s, p, o in facts])
    colours = rng.uniform(0.1, 0.9, size=(len(facts), 1, 1, 3))
    patterns = rng.uniform(-0.2, 0.2, size=(len(facts), 4, 4, 3))
    templates = colours + patterns.repeat(image_size // 4, axis=1).repeat(image_size // 4, axis=2)
    sample_fact, sample_split, pixels = [], [], []
    for fact_id in range(len(facts)):
        for split, count in ((0, train_per_fact), (1, test_per_fact)):
            for _ in range(count):
                image = np.clip(templates[fact_id] + rng.normal(0, 0.15, templates[fact_id].shape), 0, 1)
                pixels.append((image * 255).round().astype(np.uint8))
                sample_fact.append(fact_id)
                sample_split.append(split)
    n = len(sample_fact)
    return write_fact_file(
        path, facts=facts, sample_fact=np.array(sample_fact), sample_image_id=np.arange(n),
        sample_box=np.tile(np.array([0, 0, image_size, image_size], np.float32), (n, 1)),
        sample_split=np.array(sample_split, np.int8), task_of_fact=np.array(task_of_fact),
        sample_pixels=np.stack(pixels), provenance={"source": "tests/test_train.py tiny world"},
        fact_embeddings=fact_embeddings, encoder_name="random-words",
    )


from triplets.facts.model import ModelConfig  # noqa: E402
from triplets.facts.train import train_run  # noqa: E402
from mas_core.loop import OptimSettings  # noqa: E402
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig, load_train_config  # noqa: E402
from triplets.run_folder import load_run  # noqa: E402

SMALL_MODEL = ModelConfig(trunk_channels=[8, 16], branch_channels=16, hidden_dim=32)


@pytest.fixture(scope="module")
def small_facts(tmp_path_factory) -> Path:
    """3 tasks × 6 facts, 4 training and 2 test images per fact: for the mechanics tests."""
    return make_tiny_fact_file(tmp_path_factory.mktemp("small") / "facts.h5", num_tasks=3, facts_per_task=6,
                               train_per_fact=4, test_per_fact=2)


def _config(fact_file: Path, *, methods=None, epochs: int = 2, **optim) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(fact_file=str(fact_file)), model=SMALL_MODEL,
        optim=OptimSettings(epochs=epochs, batch_size=16, **optim),
        methods=methods or [MethodConfig("finetune"), MethodConfig("mas", {"lam": 1.0})],
        eval=EvalConfig(index="none"), num_threads=1,
    )


def _final_state(run_dir: Path, method: str) -> dict:
    return torch.load(run_dir / method / "model.pt", weights_only=True)["model"]


def die_after_first_mas_task(monkeypatch):
    """Make the task loop (``mas_core.loop``) raise KeyboardInterrupt right after MAS's first task is
    checkpointed (a kill at the worst moment); returns the real ``save_checkpoint``."""
    import mas_core.loop as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).parent.name == "mas" and state.get("completed_tasks") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    return real_save


# resumed == uninterrupted and the run folder's contents: tests/test_loop.py


def test_a_changed_config_cannot_resume_and_a_used_folder_is_not_overwritten(small_facts, tmp_path, monkeypatch):
    import mas_core.loop as train_module

    config = _config(small_facts, methods=[MethodConfig("mas", {"lam": 1.0})], epochs=1)
    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    checkpoint = (tmp_path / "run" / "mas" / "checkpoint.pt").read_bytes()

    with pytest.raises(RunFolderError, match="--resume"):
        train_run(config, tmp_path / "run", progress=False)
    changed_lr = _config(small_facts, methods=[MethodConfig("mas", {"lam": 1.0})], epochs=1, lr=0.01)
    with pytest.raises(CheckpointMismatchError, match="optim"):
        train_run(changed_lr, tmp_path / "run", resume=True, progress=False)
    changed_lam = _config(small_facts, methods=[MethodConfig("mas", {"lam": 2.0})], epochs=1)
    with pytest.raises(CheckpointMismatchError, match="mas"):
        train_run(changed_lam, tmp_path / "run", resume=True, progress=False)
    # the method checkpoint itself also refuses another configuration
    from mas_core.checkpoint import load_checkpoint
    from triplets.facts.train import method_checkpoint_config

    with pytest.raises(CheckpointMismatchError, match="lam"):
        load_checkpoint(tmp_path / "run" / "mas" / "checkpoint.pt",
                        expected_config=method_checkpoint_config(changed_lam, changed_lam.methods[0]))
    assert (tmp_path / "run" / "mas" / "checkpoint.pt").read_bytes() == checkpoint  # nothing overwritten


def test_unknown_config_keys_name_the_nearest_valid_key(small_facts, tmp_path):
    from triplets.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"fact_file": str(small_facts)}, "optim": {"epoch": 3}}))
    with pytest.raises(ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        load_train_config(path)
    path.write_text(yaml.safe_dump({"data": {"fact_file": str(small_facts)}, "method": []}))
    with pytest.raises(ConfigError, match="did you mean 'methods'"):
        load_train_config(path)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"fact_file": str(small_facts)}}))
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_train_config(good, ["optim.batchsize=8"])
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
    assert main(["train", "--config", str(good), "--out", str(tmp_path / "never"), "--methods", "maz"]) == 2
    assert not (tmp_path / "never").exists()


def test_cli_train_joint_and_load_run(small_facts, tmp_path, capsys):
    from triplets.cli import main

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({
        "data": {"fact_file": str(small_facts)},
        "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32},
        "optim": {"epochs": 1, "batch_size": 16},
        "methods": [{"name": "finetune"}, {"name": "joint"}, {"name": "mas", "options": {"lam": 1.0}}],
        "num_threads": 1,
    }))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_path), "--out", str(out), "--methods", "finetune,joint",
                 "--no-progress"]) == 0
    assert "finetune" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["finetune", "joint"]
    for entry in results["methods"].values():
        R = entry["accuracy_matrix"]
        assert len(R) == 3 and R[0][1] is None and R[0][2] is None and R[1][2] is None
        # Chaudhry et al. 2018: the best accuracy before the last task minus the final one
        assert entry["forgetting"] == pytest.approx((max(R[0][0], R[1][0]) - R[2][0] + R[1][1] - R[2][1]) / 2)
        assert entry["avg_acc"] == pytest.approx(sum(R[2]) / 3)
        assert len(entry["final"]["standard"]) == 3 and len(entry["final"]["generalized"]) == 3
    joint_log = (out / "joint" / "log.txt").read_text().splitlines()
    # joint trains on the union of the tasks so far: 24, 48, 72 training samples
    assert [line.split(": ")[1].split(" samples")[0] for line in joint_log] == ["24", "48", "72"]
    assert (out / "finetune" / "index" / "facts.faiss").is_file()
    assert (out / "finetune" / "index" / "images.faiss").is_file()

    with load_run(out) as run:
        assert run.methods == ["finetune", "joint"] and run.config.optim.epochs == 1
        model = run.load_model("joint")
        assert not model.training and model.slot_dim == 16
        with pytest.raises(RunFolderError, match="did you mean 'joint'"):
            run.load_model("jont")
    # a run folder pointing at a fact file of another vocabulary is refused
    other = make_tiny_fact_file(tmp_path / "other.h5", num_tasks=3, facts_per_task=3, train_per_fact=2,
                                test_per_fact=1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["data"]["fact_file"] = str(other)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RunFolderError, match="is not the one .* was trained on"):  # RUN/data.json's SHA-256
        load_run(out)
    (out / "data.json").unlink()  # deleting the data record does not switch the check off: model.pt holds it
    with pytest.raises(RunFolderError, match="model.pt records"):
        load_run(out)
    from mas_core.checkpoint import load_checkpoint, save_checkpoint

    for method in ("finetune", "joint"):  # a run from before runs recorded their data: the vocabulary still decides
        state = load_checkpoint(out / method / "model.pt")
        del state["fact_file_sha256"]
        save_checkpoint(out / method / "model.pt", state)
    with load_run(out) as run, pytest.raises(RunFolderError, match="another fact vocabulary"):
        run.load_model("finetune")
    with pytest.raises(RunFolderError, match="not a run folder"):
        load_run(tmp_path / "nowhere")


def test_divergence_names_the_learning_rate(small_facts, tmp_path):
    from mas_core.errors import DivergenceError

    config = _config(small_facts, methods=[MethodConfig("finetune")], epochs=3, lr=1e8, momentum=0.0)
    with pytest.raises(DivergenceError, match="optim.lr"):
        train_run(config, tmp_path / "run", progress=False)


def test_mas_forgets_clearly_less_than_finetuning(tmp_path):
    """Reduced run on the 4-task tiny world (12 facts per task, 8 training and 6 test images
    per fact, 10 epochs per task, SGD lr 0.01 momentum 0.9, batch 16, exact MAS λ = 5).
    Measured here: finetune forgets 0.551 of standard top-5 (average top-5 0.569), MAS 0.245
    (average 0.733)."""
    facts = make_tiny_fact_file(tmp_path / "facts.h5", test_per_fact=6)
    config = _config(facts, epochs=10, lr=0.01,
                     methods=[MethodConfig("finetune"), MethodConfig("mas", {"lam": 50.0, "mode": "exact"})])
    results = train_run(config, tmp_path / "run", progress=False)["methods"]
    finetune, mas = results["finetune"], results["mas"]
    assert finetune["forgetting"] > 0.3
    assert mas["forgetting"] < finetune["forgetting"] - 0.15
    assert mas["avg_acc"] > finetune["avg_acc"] + 0.1


def test_importance_data_test_hands_the_tasks_unlabeled_test_images_to_after_task(small_facts, tmp_path, monkeypatch):
    import dataclasses

    from data_prep.facts.fact_file import open_facts
    from mas_core.regularizers.mas import MAS

    seen: list[tuple[int, bool]] = []
    real_after_task = MAS.after_task

    def recording_after_task(self, model, data):
        batches = list(data)
        seen.append((sum(len(batch) for batch in batches), all(isinstance(b, torch.Tensor) for b in batches)))
        return real_after_task(self, model, batches)

    monkeypatch.setattr(MAS, "after_task", recording_after_task)
    config = _config(small_facts, methods=[MethodConfig("mas", {"lam": 1.0})], epochs=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, importance_data="test"))
    train_run(config, tmp_path / "run", progress=False)
    with open_facts(small_facts) as facts:
        expected = [len(facts.sample_indices(task, "test")) for task in range(3)]
    assert [count for count, _ in seen] == expected == [12, 12, 12]
    assert all(images_only for _, images_only in seen)  # no labels: images only


def test_every_baseline_trains_the_triplet_model(small_facts, tmp_path):
    """EWC (Fisher of the per-sample slot loss), SI, LwF (MSE on the embedding) and l-MAS run
    through the same loop; each keeps a non-trivial importance state after the tasks."""
    methods = [MethodConfig("ewc", {"lam": 1.0}), MethodConfig("si", {"lam": 0.1}),
               MethodConfig("lwf", {"lam": 1.0}), MethodConfig("lmas", {"lam": 0.01})]
    out = tmp_path / "run"
    results = train_run(_config(small_facts, methods=methods, epochs=1), out, progress=False)
    assert list(results["methods"]) == ["ewc", "si", "lwf", "lmas"]
    for entry in results["methods"].values():
        R = entry["accuracy_matrix"]
        assert all(0.0 <= R[i][j] <= 1.0 for i in range(3) for j in range(i + 1))
    ewc_state = torch.load(out / "ewc" / "checkpoint.pt", weights_only=True)["regularizer"]
    fisher_total = sum(float(value.sum()) for value in ewc_state["fisher"].values())
    assert ewc_state["tasks_seen"] == 3 and fisher_total > 0.0
