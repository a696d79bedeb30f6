"""Does Ω learned from queries protect the queried part better? (issue 15, ``docs/results.md``)

After task 1 the model is "deployed": it answers queries drawn mostly (``--share``, 90 %) from a
sub-distribution of task 1's test inputs (recognition: classes 0 and 2 of ``fmnist-tops``, i.e.
T-shirt and pullover of {T-shirt, pullover, coat, shirt}; fact world: half of task 1's facts,
chosen by a seeded draw). Then the remaining tasks are trained with MAS, task 1 protected by

- ``train``:   Ω_1 from task 1's training inputs (the paper; ``online_importance.use: none``)
- ``queries``: Ω_1 from the queries alone (``use: queries``)
- ``queries_scaled``: Ω_queries rescaled to Ω_train's total (ΣΩ) — where the protection goes,
  without changing how much there is (the queries' Ω is larger overall here)
- ``mixed``:   ½ Ω_train + ½ Ω_queries (``use: mixed, query_weight: 0.5``)

and task 1's accuracy is measured right after task 1 and after the last task, separately on the
queried sub-distribution and on the rest. To keep the queries and the measurement apart, task 1's
test set is split in two halves (alternate samples in file order): queries are drawn from the
first, accuracy is measured on the second.

(a) ``recog``: ``configs/recognition_offline.yaml`` (five tasks, multi-head small CNN, its optimiser),
    MAS with ``--recog-lam``; accuracy = top-1 of task 1's head.
(b) ``facts``: the drawn-shapes demo world (``configs/demo.yaml``'s training settings with the
    shapes world's batch size 32, four semantic tasks; ``--fact-file`` is that world's fact file, e.g.
    ``python -m triplets.demo --out runs/shapes_demo --set synth.world=shapes --set synth.num_images=600
    --set train.optim.batch_size=32`` writes it to ``runs/shapes_demo_data/facts.h5``), MAS λ = 15, through the application itself: ``train_run(stop_after_task=1)``,
    the query code's :func:`~triplets.query.online_importance.record_query_pixels`, and
    ``train_run(resume=True)`` with the ``online_importance`` section; accuracy = standard top-5
    (task 1's facts as candidates) per test image.

    PYTHONPATH=. python benchmarks/online_importance_experiment.py --seeds 0 1 2 --out runs/online_importance

Prints one JSON line per (experiment, seed, variant) and a Markdown table of mean ± sd over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mas_core import MAS, OnlineImportance, mas_importance, mix_importance  # noqa: E402
from mas_core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mas_core.loop import OptimSettings, train_tasks  # noqa: E402
from mas_core.sequence import ClassificationExperiment, Task  # noqa: E402

VARIANTS = {"train": ("none", 0.0), "queries": ("queries", 1.0), "queries_scaled": ("queries", 1.0),
            "mixed": ("mixed", 0.5)}
"""``queries_scaled``: Ω_queries multiplied by ΣΩ_train / ΣΩ_queries, so that it has the training Ω's
total mass: it moves protection between parameters without making the penalty stronger or weaker."""


def split_halves(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternate positions: the query pool (even) and the measurement half (odd)."""
    positions = np.arange(count)
    return positions[0::2], positions[1::2]


def draw_queries(pool_groups: np.ndarray, count: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """Positions into the pool: ``share`` of ``count`` from the queried group (True), the rest from
    the others, without replacement."""
    queried = np.flatnonzero(pool_groups)
    others = np.flatnonzero(~pool_groups)
    from_queried = min(int(round(share * count)), len(queried))
    from_others = min(count - from_queried, len(others))
    return np.concatenate([rng.choice(queried, from_queried, replace=False),
                           rng.choice(others, from_others, replace=False)])


def mass(importance: dict[str, torch.Tensor]) -> float:
    """ΣΩ over every parameter (float64)."""
    return float(sum(value.double().sum() for value in importance.values()))


def compare(queried: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float]:
    """``mass_ratio`` = ΣΩ_queries / ΣΩ_train and the cosine of the two (all parameters flattened)."""
    q = torch.cat([queried[name].double().flatten() for name in trained])
    t = torch.cat([trained[name].double().flatten() for name in trained])
    return {"mass_ratio": float(q.sum() / t.sum()), "cosine": float(q @ t / (q.norm() * t.norm()))}


# --------------------------------------------------------------------------- (a) recognition

def recognition(seed: int, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from triplets.recognition.config import load_recognition_config
    from triplets.recognition.data import build_tasks, model_factory

    config = load_recognition_config(ROOT / "configs" / "recognition_offline.yaml",
                                     [f"data_dir={args.data_dir}", f"seed={seed}"])
    tasks = build_tasks(config)[: args.recog_tasks]
    first = tasks[0]
    inputs, targets = first.test.tensors[0], first.test.tensors[1]
    pool, measured = split_halves(len(targets))
    queried_classes = torch.tensor(args.recog_classes)
    in_group = torch.isin(targets, queried_classes).numpy()
    rng = np.random.default_rng(seed)
    chosen = pool[draw_queries(in_group[pool], args.queries, args.share, rng)]
    tasks[0] = Task(first.name, first.train, TensorDataset(inputs[measured], targets[measured]), first.num_classes)
    measure_inputs, measure_targets = inputs[measured], targets[measured]
    measure_group = torch.from_numpy(in_group[measured])
    experiment = ClassificationExperiment(model_factory(config.model), tasks, importance_batch_size=config.train.batch_size)
    optim = OptimSettings(epochs=config.train.epochs, lr=config.train.lr, momentum=config.train.momentum,
                          batch_size=config.train.batch_size)
    options = {"lam": args.recog_lam, "max_samples": 1000, "penalty_step": args.recog_step}
    base = out / f"recog_seed{seed}"
    shutil.rmtree(base, ignore_errors=True)
    first_run = train_tasks(experiment, "mas", optim, seed=seed, method_options=options,
                            checkpoint_dir=base / "after_task1", stop_after_task=1)

    def group_accuracy(model) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            correct = (model(measure_inputs, 0).argmax(1) == measure_targets).float()
        return {"queried": float(correct[measure_group].mean()), "rest": float(correct[~measure_group].mean())}

    before = group_accuracy(first_run.model)
    accumulator = OnlineImportance(first_run.model, estimator="mas", output_label="active head logits")
    for batch in inputs[torch.from_numpy(chosen)].split(64):
        accumulator.update(batch)
    queried_omega = accumulator.importance()
    train_inputs = first.train.tensors[0]
    train_omega_t1 = mas_importance(first_run.model, train_inputs.split(64), max_samples=1000)
    similarity = compare(queried_omega, train_omega_t1)
    scale = mass(train_omega_t1) / mass(queried_omega)
    rows = []
    for variant, (use, weight) in VARIANTS.items():
        folder = base / variant
        shutil.copytree(base / "after_task1", folder)

        def replace(model, trained, reg: MAS, completed: int, use=use, weight=weight, variant=variant) -> None:
            if use == "none":
                return
            source = experiment.importance_data(model, completed - 1, "inputs")
            positions = torch.arange(len(source.data))
            train_omega = reg.estimate(trained, source.data.batches(list(positions.split(source.batch_size))))
            new = queried_omega if use == "queries" else mix_importance(train_omega, queried_omega, weight)
            if variant == "queries_scaled":
                new = {name: value * scale for name, value in queried_omega.items()}
            reg.replace_last_task_importance(trained, train_omega, new)

        started = time.perf_counter()
        outcome = train_tasks(experiment, "mas", optim, seed=seed, method_options=options, checkpoint_dir=folder,
                              resume=True, after_resume=replace)
        after = group_accuracy(outcome.model)
        rows.append(_row(f"recog ({args.recog_step}, λ={args.recog_lam:g})", seed, variant, weight, accumulator.count, before, after, outcome.accuracy,
                         time.perf_counter() - started, omega=similarity))
    return rows


# --------------------------------------------------------------------------- (b) fact world

def facts(seed: int, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from triplets.config import from_dict, load_config, to_dict
    from triplets.demo import DemoConfig
    from triplets.facts.evaluate import embed_images, evaluate_embeddings
    from triplets.facts.data import fact_image_dataset, open_fact_file
    from triplets.query.online_resume import ACCUMULATOR_NAME
    from triplets.query.online_importance import record_query_pixels
    from triplets.run_folder import load_run
    from triplets.facts.train import train_run
    from triplets.facts.train_config import TrainConfig

    demo = load_config(ROOT / "configs" / "demo.yaml", DemoConfig,
                       [f"train.data.fact_file={args.fact_file}", "train.optim.batch_size=32"])
    raw = to_dict(demo.train)
    raw["data"]["fact_file"] = str(Path(args.fact_file).resolve())
    raw["methods"] = [{"name": "mas", "options": {"lam": args.facts_lam, "mode": "exact"}}]
    raw["seed"], raw["eval"]["index"] = seed, "none"
    config = from_dict(TrainConfig, raw)
    fact_file = open_fact_file(args.fact_file)
    test_samples = np.asarray(fact_file.sample_indices(0, "test"))
    sample_fact = np.asarray(fact_file.sample_fact)
    task_facts = np.asarray(fact_file.facts_of_task(0))
    rng = np.random.default_rng(seed)
    queried_facts = rng.choice(task_facts, len(task_facts) // 2, replace=False)
    pool, measured = split_halves(len(test_samples))
    in_group = np.isin(sample_fact[test_samples], queried_facts)
    chosen = test_samples[pool[draw_queries(in_group[pool], args.queries, args.share, rng)]]
    measured_samples, measured_group = test_samples[measured], in_group[measured]

    def group_top5(run_dir: Path) -> dict[str, float]:
        with load_run(run_dir) as run:
            model = run.load_model("mas")
        dataset = fact_image_dataset(fact_file, 0, "test")
        vectors, fact_ids = embed_images(model, dataset, batch_size=256)
        vectors, fact_ids = vectors[measured], fact_ids[measured]
        return {name: float(evaluate_embeddings(vectors[mask], fact_ids[mask], fact_file, 0, mode="standard")["top5"])
                for name, mask in (("queried", measured_group), ("rest", ~measured_group))}

    base = out / f"facts_seed{seed}"
    shutil.rmtree(base, ignore_errors=True)
    train_run(config, base / "after_task1", progress=False, stop_after_task=1)
    before = group_top5(base / "after_task1")
    with load_run(base / "after_task1") as run:
        model = run.load_model("mas")
        method = run.config.methods[0]
    record = record_query_pixels(base / "after_task1", method, model, fact_file.pixels(np.sort(chosen)))
    accumulator = OnlineImportance(model, output_label="check")
    accumulator.update(torch.from_numpy(fact_file.pixels(np.sort(chosen))).permute(0, 3, 1, 2).float() / 255.0)
    train_pixels = fact_file.pixels(fact_file.sample_indices(0, "train"))
    train_images = torch.from_numpy(train_pixels).permute(0, 3, 1, 2).float() / 255.0
    train_omega_t1 = mas_importance(model, train_images.split(256))
    similarity = compare(accumulator.importance(), train_omega_t1)
    scale = mass(train_omega_t1) / mass(accumulator.importance())
    rows = []
    for variant, (use, weight) in VARIANTS.items():
        folder = base / variant
        shutil.copytree(base / "after_task1", folder)
        if variant == "queries_scaled":  # the same accumulator, its sums rescaled (Ω = S / N scales with S)
            stored = load_checkpoint(folder / "mas" / ACCUMULATOR_NAME)
            stored["accumulator"]["sums"] = {name: value * scale for name, value in stored["accumulator"]["sums"].items()}
            save_checkpoint(folder / "mas" / ACCUMULATOR_NAME, stored)
        resumed = dataclasses.replace(config, online_importance=dataclasses.replace(
            config.online_importance, use=use, query_weight=weight if use == "mixed" else 0.5))
        started = time.perf_counter()
        results = train_run(resumed, folder, resume=True, progress=False)
        after = group_top5(folder)
        rows.append(_row("facts", seed, variant, weight, record.samples, before, after,
                         results["methods"]["mas"]["accuracy_matrix"], time.perf_counter() - started,
                         used=results["methods"]["mas"].get("online_importance"), omega=similarity))
    fact_file.close()
    return rows


# --------------------------------------------------------------------------- report

def _row(experiment: str, seed: int, variant: str, weight: float, queries: int, before: dict, after: dict,
         accuracy: list, seconds: float, **extra: Any) -> dict[str, Any]:
    row = {"experiment": experiment, "seed": seed, "variant": variant, "query_weight": weight, "queries": queries,
           "before": before, "after": after,
           "forgetting": {group: before[group] - after[group] for group in before},
           "avg_acc": float(np.mean([value for value in accuracy[-1] if value is not None])),
           "accuracy_matrix": accuracy, "seconds": seconds, **extra}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| experiment | Ω of task 1 | seeds | task 1 queried: after t1 → final (forgetting) | "
             "task 1 rest: after t1 → final (forgetting) | avg acc, all tasks |",
             "|---|---|---|---|---|---|"]

    def stat(values: list[float]) -> str:
        mean = 100 * statistics.fmean(values)
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"

    for experiment in dict.fromkeys(row["experiment"] for row in rows):
        for variant in VARIANTS:
            chosen = [row for row in rows if row["experiment"] == experiment and row["variant"] == variant]
            if not chosen:
                continue
            cells = []
            for group in ("queried", "rest"):
                cells.append(f"{stat([r['before'][group] for r in chosen])} → {stat([r['after'][group] for r in chosen])} "
                             f"({stat([r['forgetting'][group] for r in chosen])})")
            lines.append(f"| {experiment} | {variant} | {len(chosen)} | {cells[0]} | {cells[1]} | "
                         f"{stat([r['avg_acc'] for r in chosen])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/online_importance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--experiments", nargs="+", default=["recog", "facts"], choices=["recog", "facts"])
    parser.add_argument("--queries", type=int, default=200, help="queries answered after task 1")
    parser.add_argument("--share", type=float, default=0.9, help="share of queries from the queried sub-distribution")
    parser.add_argument("--data-dir", default="runs/data_cache", help="recognition: prepared datasets")
    parser.add_argument("--recog-tasks", type=int, default=5, help="recognition: first N tasks of the sequence")
    parser.add_argument("--recog-classes", type=int, nargs="+", default=[0, 1],
                        help="recognition: queried labels of task 1 (0, 1 = T-shirt, pullover)")
    parser.add_argument("--recog-lam", type=float, default=0.1)
    parser.add_argument("--recog-step", default="gradient", choices=["gradient", "proximal"],
                        help="recognition: MAS's penalty_step (docs/method.md §13)")
    parser.add_argument("--fact-file", default="runs/shapes_demo_data/facts.h5",
                        help="the drawn-shapes demo world's fact file (see (b) above)")
    parser.add_argument("--facts-lam", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        if "recog" in args.experiments:
            rows += recognition(seed, out, args)
        if "facts" in args.experiments:
            rows += facts(seed, out, args)
    (out / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
