"""Benchmark: the training throughput of `mas-triplets train` on the real-image world, and the data
path (fact file → batches of tensors) against the model's step.

Run:  .venv/bin/python benchmarks/bench_train.py [--images 1500] [--fact-file F.h5] [--threads 1]

Data: a cut of the real-image world (``mas-triplets synth --world real --images N``, clothing
only when Fashion-MNIST is installed) prepared as ``train`` reads it (``prepare vg --tasks 8
--split random --min-fact-count 5 --image-size 32``, MiniLM fact vectors), or ``--fact-file``.

For each model, ``small_cnn`` (trained end to end) and ``resnet18`` with
``model.cache_features: true`` (the frozen trunk's features cached once, the two branches
trained on them), on the training samples of task 1, it measures:

* ``step_sps``: samples per second of the model's training step alone (forward, the run's loss
  — slot distance + in-batch InfoNCE —, backward, SGD step) on batches already in memory;
* ``data_sps``: samples per second of the data path alone, as ``train`` runs it
  (:class:`triplets.facts.data.FactSamples` / :class:`triplets.facts.feature_cache.FeatureSamples`):
  reading the task's samples from the file (``load_s``) plus one epoch of shuffled batches,
  each turned into tensors. Modes: ``memory`` (``data.in_memory: true``, the default: the
  task's pixels read once), ``stream`` (``data.in_memory: false``: each batch read from the
  HDF5 when asked for), and for the cached features ``features``;
* ``data_path_vs_step = data_sps / step_sps`` (goal >= 3: reading is never the bottleneck);
* ``train_sps``: ``train_run`` end to end (fine-tuning, one epoch per task, 8 tasks): training
  samples seen / wall time, evaluation after each task, final metrics and (resnet18) the
  feature cache included, so it is below ``step_sps``.

Timings are medians of ``--repeats`` runs (the end-to-end run once). The last line printed is a
JSON object. This is a benchmark script, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from data_prep.image_sets.idx import fashion_mnist_available  # noqa: E402
from data_prep.facts.options import PrepareOptions  # noqa: E402
from data_prep.worlds.real import generate_real_world  # noqa: E402
from data_prep.sources.visual_genome import prepare_visual_genome  # noqa: E402
from triplets.config import from_dict  # noqa: E402
from triplets.facts.data import FactSamples, check_fact_file, open_fact_file  # noqa: E402
from triplets.facts.experiment import FactContext, FactExperiment, fact_context  # noqa: E402
from triplets.facts.feature_cache import FeatureSamples  # noqa: E402
from triplets.facts.language import embed_facts, load_text_encoder  # noqa: E402
from triplets.facts.train import train_run  # noqa: E402
from triplets.facts.train_config import TrainConfig  # noqa: E402

IMAGE_SIZE = 32
BATCH_SIZE = 64
MODELS: dict[str, dict[str, Any]] = {
    "small_cnn": {"backbone": "small_cnn", "trunk_channels": [16, 32], "branch_channels": 32, "hidden_dim": 128},
    "resnet18_cached": {"backbone": "resnet18", "hidden_dim": 128, "cache_features": True},
}


def make_fact_file(folder: Path, images: int, seed: int) -> Path:
    """A cut of the real-image world prepared as the realworld8 config reads it."""
    sources = "clothing,digits,letters" if fashion_mnist_available() else "digits,letters"
    world = generate_real_world(folder / "world", num_images=images, seed=seed, sources=sources, progress=False)
    encoder = load_text_encoder("minilm")

    def embed(facts):
        embeddings, _masks = embed_facts(facts, encoder)
        return embeddings

    out = folder / "facts.h5"
    options = PrepareOptions(num_tasks=8, split="random", min_fact_count=5, image_size=IMAGE_SIZE, seed=seed,
                             text_encoder=embed, encoder_name=encoder.name, progress=False)
    prepare_visual_genome(world.out_dir, out, options)
    return out


def _config(fact_file: Path, model: str, threads: int, **extra: Any) -> TrainConfig:
    return from_dict(TrainConfig, {
        "data": {"fact_file": str(fact_file), **extra.get("data", {})},
        "model": MODELS[model],
        "optim": {"epochs": 1, "lr": 0.03, "momentum": 0.9, "batch_size": BATCH_SIZE},
        "loss": {"contrastive_weight": 0.3, "temperature": 0.1},
        "methods": [{"name": "finetune"}],
        "eval": {"batch_size": 512, "index": "none"},
        "seed": 0, "device": "cpu", "num_threads": threads,
    })


def _context(config: TrainConfig, fact_file: Any, run_dir: Path) -> FactContext:
    return fact_context(config, fact_file, torch.device("cpu"), run_dir)


def _median_time(action: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _epoch_batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randperm(count, generator=generator).split(BATCH_SIZE))


def measure_data(make_samples: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Load the task's samples, then one epoch of shuffled batches turned into tensors."""
    loads, epochs = [], []
    count = 0
    for repeat in range(repeats):
        start = time.perf_counter()
        samples = make_samples()
        loaded = time.perf_counter()
        count = len(samples)
        for images, fact_ids in samples.batches(_epoch_batches(count, repeat)):
            images.sum()  # touch the tensor
        loads.append(loaded - start)
        epochs.append(time.perf_counter() - loaded)
    load_s, epoch_s = statistics.median(loads), statistics.median(epochs)
    return {"samples": count, "load_s": round(load_s, 4), "epoch_s": round(epoch_s, 4),
            "data_sps": round(count / (load_s + epoch_s), 1)}


def measure_step(experiment: FactExperiment, module: torch.nn.Module, samples: Any, steps: int,
                 repeats: int) -> float:
    """Samples per second of the training step on batches already in memory."""
    batches = list(samples.batches(_epoch_batches(len(samples), 0)[:steps]))
    module.train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def run() -> None:
        for batch in batches:
            loss = experiment.loss(module, batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run()  # warm-up
    seconds = _median_time(run, repeats)
    return sum(len(b[1]) for b in batches) / seconds


def measure_model(fact_path: Path, model: str, folder: Path, threads: int, steps: int,
                  repeats: int) -> dict[str, Any]:
    config = _config(fact_path, model, threads)
    fact_file = open_fact_file(fact_path)
    try:
        check_fact_file(fact_file)
        ctx = _context(config, fact_file, folder / f"{model}_run")
        experiment = FactExperiment(ctx)
        network = experiment.build_model()
        start = time.perf_counter()
        module = experiment.trained_module(network)  # resnet18: computes the feature cache
        cache_s = time.perf_counter() - start
        parts = [(0, 0)]
        result: dict[str, Any] = {"modes": {}}
        if experiment.features is not None:
            result["feature_cache_s"] = round(cache_s, 2)
            result["modes"]["features"] = measure_data(lambda: FeatureSamples(experiment.features, fact_file, parts),
                                                       repeats)
        for mode, in_memory in (("memory", True), ("stream", False)):
            result["modes"][mode] = measure_data(lambda: FactSamples(fact_file, parts, in_memory=in_memory), repeats)
        step_sps = measure_step(experiment, module, experiment.train_data([0]), steps, repeats)
        result["step_sps"] = round(step_sps, 1)
        for entry in result["modes"].values():
            entry["data_path_vs_step"] = round(entry["data_sps"] / step_sps, 2)
        return result
    finally:
        fact_file.close()


def measure_train(fact_path: Path, model: str, folder: Path, threads: int) -> dict[str, float]:
    config = _config(fact_path, model, threads)
    with open_fact_file(fact_path) as fact_file:
        train_samples = int((np.asarray(fact_file.sample_split) == 0).sum())
    start = time.perf_counter()
    train_run(config, folder / f"{model}_train", progress=False)
    seconds = time.perf_counter() - start
    return {"train_wall_s": round(seconds, 2), "train_samples": train_samples,
            "train_sps": round(train_samples / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1500, help="images of the world's cut (default 1500)")
    parser.add_argument("--fact-file", type=Path, help="use this fact file instead of making a cut")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per repeat (default 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--no-train", action="store_true", help="skip the end-to-end train_run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": args.threads, "batch_size": BATCH_SIZE, "image_size": IMAGE_SIZE}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        folder = Path(tmp)
        if args.fact_file is None:
            start = time.perf_counter()
            fact_path = make_fact_file(folder, args.images, seed=0)
            report["data"] = {"world_images": args.images, "make_s": round(time.perf_counter() - start, 1)}
        else:
            fact_path = args.fact_file
            report["data"] = {"fact_file": str(fact_path)}
        with open_fact_file(fact_path) as fact_file:
            report["data"].update({"facts": fact_file.num_facts, "samples": fact_file.num_samples,
                                   "tasks": fact_file.num_tasks})
        for model in args.models.split(","):
            entry = measure_model(fact_path, model, folder, args.threads, args.steps, args.repeats)
            if not args.no_train:
                entry.update(measure_train(fact_path, model, folder, args.threads))
            report[model] = entry
            print(f"{model}: {json.dumps(entry)}", flush=True)
    worst = min(mode["data_path_vs_step"] for model in args.models.split(",")
                for mode in report[model]["modes"].values())
    report["data_path_vs_step_min"] = worst
    report["goal_met"] = worst >= 3.0
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
