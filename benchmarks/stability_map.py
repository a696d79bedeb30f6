"""Stability map of MAS's penalty: λ × learning rate × penalty_step × lam_scale, on three experiments.

    python benchmarks/stability_map.py run  [--out runs/stability/map.jsonl] [--experiments fmnist recog facts] [--rates 0 1]
    python benchmarks/stability_map.py plot [--out runs/stability/map.jsonl] [--png docs/stability_map.png]
    python benchmarks/stability_map.py table [--out runs/stability/map.jsonl]

For every cell ``(experiment, lr, λ, penalty_step, lam_scale)`` one MAS run (exact Ω, accumulate sum,
SGD momentum 0.9, seed 0) is trained and one JSON line is appended to ``--out``: ``diverged`` (the
loop raised :class:`~mas_core.errors.DivergenceError`), ``avg_acc`` and ``forgetting`` (fractions,
``docs/method.md`` §10; ``null`` when diverged), ``effective_lam`` (λ / mean Ω at the last task under
``lam_scale=mean``, where the experiment exposes the regularizer), ``wall_s``. Cells already in the
file are skipped, so an interrupted run continues where it stopped. Cells run in the order protocol
learning rate first, then the second rate, experiment by experiment, λ ascending.

REDUCED protocols (so that the 144 cells fit in about 40 minutes on a shared 2-core machine, one
torch thread); the full protocols are in ``scripts/split_fashion_mnist.py``, ``configs/recognition_offline.yaml``
and ``configs/demo.yaml``:

* ``fmnist``: split Fashion-MNIST, 5 class-pair tasks, MLP 784-256-256 with 2-way heads, **1,000
  training and 500 test images per class, 2 epochs per task** (full: 6,000 / 1,000, 5 epochs),
  batch 128; learning rates 0.05 (the protocol's) and 0.01.
* ``recog``: the offline recognition sequence (5 tasks, small CNN), **2 epochs per task** (full: 6),
  MAS's ``max_samples`` 500 (config: 1,000); learning rates 0.05 (the config's) and 0.01.
* ``facts``: the fact-embedding demo world (semantic split, 4 tasks, configs/demo.yaml's model
  and loss), **3 epochs per task** (full: 10), no index saved; learning rates 0.03 (the config's)
  and 0.01. The data (``runs/stability/facts_data``) is made once, as ``python -m triplets.demo`` does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from mas_core.errors import DivergenceError  # noqa: E402
from mas_core.loop import OptimSettings  # noqa: E402
from mas_core.regularizers import MAS  # noqa: E402
from mas_core.sequence import run_sequence  # noqa: E402

LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
STEPS = ("gradient", "proximal")
SCALES = ("none", "mean")
LEARNING_RATES = {"fmnist": (0.05, 0.01), "recog": (0.05, 0.01), "facts": (0.03, 0.01)}
EXPERIMENTS = tuple(LEARNING_RATES)
DEFAULT_OUT = ROOT / "runs" / "stability" / "map.jsonl"


def cell_key(cell: dict[str, Any]) -> tuple:
    return (cell["experiment"], float(cell["lr"]), float(cell["lam"]), cell["penalty_step"], cell["lam_scale"])


def all_cells(experiments: list[str], rate_indices: tuple[int, ...] = (0, 1),
              lams: tuple[float, ...] = LAMBDAS) -> list[dict[str, Any]]:
    """The grid in run order: the first learning rate of every experiment, then the second."""
    cells = []
    for rate_index in rate_indices:
        for experiment in experiments:
            lr = LEARNING_RATES[experiment][rate_index]
            for lam in lams:
                for step in STEPS:
                    for scale in SCALES:
                        cells.append({"experiment": experiment, "lr": lr, "lam": lam, "penalty_step": step,
                                      "lam_scale": scale})
    return cells


def read_cells(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    cells = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                cells.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that cell runs again
                continue
    return cells


# --------------------------------------------------------------------------- the experiments

def _fmnist_runner() -> Callable[[dict[str, Any]], dict[str, Any]]:
    from triplets.recognition.data import fashion_mnist_mlp, split_fashion_mnist

    tasks = split_fashion_mnist(num_tasks=5, train_per_class=1000, test_per_class=500, seed=0)

    def run(cell: dict[str, Any]) -> dict[str, Any]:
        reg = MAS(lam=cell["lam"], penalty_step=cell["penalty_step"], lam_scale=cell["lam_scale"])
        optim = OptimSettings(epochs=2, lr=cell["lr"], momentum=0.9, batch_size=128)
        return _sequence_outcome(lambda: run_sequence(fashion_mnist_mlp, tasks, reg, optim, seed=0, progress=False), reg)

    return run


def _recog_runner() -> Callable[[dict[str, Any]], dict[str, Any]]:
    from triplets.recognition.config import load_recognition_config
    from triplets.recognition.data import build_tasks, ensure_prepared, model_factory

    config = load_recognition_config(ROOT / "configs" / "recognition_offline.yaml",
                                     [f"data_dir={ROOT / 'runs' / 'data_cache'}"])
    for spec in config.tasks:
        ensure_prepared(spec, config.data_dir, config.seed, lambda message: None)
    tasks = build_tasks(config)
    make_model = model_factory(config.model)

    def run(cell: dict[str, Any]) -> dict[str, Any]:
        reg = MAS(lam=cell["lam"], max_samples=500, penalty_step=cell["penalty_step"], lam_scale=cell["lam_scale"])
        optim = OptimSettings(epochs=2, lr=cell["lr"], momentum=config.train.momentum,
                              batch_size=config.train.batch_size)
        return _sequence_outcome(lambda: run_sequence(make_model, tasks, reg, optim, seed=config.seed,
                                                      eval_batch_size=config.train.eval_batch_size,
                                                      progress=False), reg)

    return run


#: the drawn-shapes demo of configs/demo.yaml before it moved to the real-image world (issue 14): the
#: settings the documented fact cells were measured with.
SHAPES_DEMO = ["synth.world=shapes", "synth.num_images=600", "train.optim.batch_size=32"]


def _facts_runner(work: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    from triplets.config import load_config
    from triplets.demo import DEFAULT_CONFIG, DemoConfig, ensure_fact_file, ensure_world
    from triplets.facts.train import train_run
    from triplets.facts.train_config import MethodConfig

    data_dir = work / "facts_data"
    demo = load_config(DEFAULT_CONFIG, DemoConfig, [f"train.data.fact_file={data_dir / 'facts.h5'}", *SHAPES_DEMO])
    world, _ = ensure_world(demo.synth, data_dir / "synth", progress=False)
    fact_path, _ = ensure_fact_file(demo.prepare, world, demo.synth, data_dir / "facts.h5", progress=False)

    def run(cell: dict[str, Any]) -> dict[str, Any]:
        options = {"lam": cell["lam"], "mode": "exact", "penalty_step": cell["penalty_step"],
                   "lam_scale": cell["lam_scale"]}
        config = dataclasses.replace(
            demo.train, data=dataclasses.replace(demo.train.data, fact_file=str(fact_path.resolve())),
            optim=dataclasses.replace(demo.train.optim, epochs=3, lr=cell["lr"]),
            methods=[MethodConfig("mas", options)], eval=dataclasses.replace(demo.train.eval, index="none"))
        folder = work / "facts_runs" / "_".join([str(cell[k]) for k in ("lr", "lam", "penalty_step", "lam_scale")]
                                                + [str(os.getpid())])
        shutil.rmtree(folder, ignore_errors=True)  # a cell cut by an interruption starts over
        started = time.perf_counter()
        try:
            results = train_run(config, folder, resume=False, progress=False)
        except DivergenceError as error:
            return {"diverged": True, "error": str(error)[:300], "wall_s": time.perf_counter() - started}
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the JSON line keeps the numbers
        entry = results["methods"]["mas"]
        return {"diverged": False, "avg_acc": entry["avg_acc"], "forgetting": entry["forgetting"],
                "wall_s": time.perf_counter() - started}

    return run


def _sequence_outcome(train: Callable[[], Any], reg: MAS) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = train()
    except DivergenceError as error:
        return {"diverged": True, "error": str(error)[:300], "effective_lam": reg.effective_lam,
                "wall_s": time.perf_counter() - started}
    return {"diverged": False, "avg_acc": result.avg_acc, "forgetting": result.avg_forgetting,
            "effective_lam": reg.effective_lam, "wall_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- commands

def run_grid(out: Path, experiments: list[str], rate_indices: tuple[int, ...] = (0, 1),
             descending: bool = False, lams: tuple[float, ...] = LAMBDAS) -> None:
    """Run every missing cell, appending one JSON line per cell to ``out`` (flushed and fsynced).
    The file is read again before each cell, so two processes given disjoint ``rate_indices`` (or
    experiments) may share it, as may two processes walking the grid from both ends (``descending``)."""
    torch.set_num_threads(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    runners: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
    cells = all_cells(experiments, rate_indices, lams)
    for cell in reversed(cells) if descending else cells:
        if cell_key(cell) in {cell_key(done) for done in read_cells(out)}:
            continue
        name = cell["experiment"]
        if name not in runners:
            runners[name] = {"fmnist": _fmnist_runner, "recog": _recog_runner,
                             "facts": lambda: _facts_runner(out.parent)}[name]()
        outcome = runners[name](cell)
        record = {**cell, **outcome}
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        acc = "diverged" if outcome["diverged"] else f"acc {outcome['avg_acc']:.4f} forget {outcome['forgetting']:.4f}"
        print(f"{name} lr={cell['lr']} lam={cell['lam']:g} {cell['penalty_step']}/{cell['lam_scale']}: {acc} "
              f"({outcome['wall_s']:.1f} s)", flush=True)


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """One row per (experiment, lr, penalty_step, lam_scale); one column per λ:
    ``avg_acc / forgetting`` in percent, or ``div.``; ``·`` for a cell not measured."""
    by_key = {cell_key(cell): cell for cell in cells}
    lines = ["| experiment | lr | penalty_step | lam_scale | " + " | ".join(f"λ={lam:g}" for lam in LAMBDAS) + " |",
             "|---|---|---|---|" + "---|" * len(LAMBDAS)]
    for experiment in EXPERIMENTS:
        for lr in LEARNING_RATES[experiment]:
            for step in STEPS:
                for scale in SCALES:
                    entries = []
                    for lam in LAMBDAS:
                        cell = by_key.get((experiment, float(lr), float(lam), step, scale))
                        if cell is None:
                            entries.append("·")
                        elif cell["diverged"]:
                            entries.append("div.")
                        else:
                            entries.append(f"{100 * cell['avg_acc']:.1f} / {100 * cell['forgetting']:.1f}")
                    if any(entry != "·" for entry in entries):
                        lines.append(f"| {experiment} | {lr:g} | {step} | {scale} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def plot(cells: list[dict[str, Any]], png: Path) -> None:
    """Average accuracy against λ, one panel per (experiment, lr), one line per (step, scale);
    a diverged cell is a cross at the bottom of its panel."""
    import matplotlib.pyplot as plt

    by_key = {cell_key(cell): cell for cell in cells}
    figure, axes = plt.subplots(2, len(EXPERIMENTS), figsize=(4.2 * len(EXPERIMENTS), 7), squeeze=False)
    styles = {("gradient", "none"): ("tab:blue", "-"), ("gradient", "mean"): ("tab:blue", "--"),
              ("proximal", "none"): ("tab:red", "-"), ("proximal", "mean"): ("tab:red", "--")}
    for column, experiment in enumerate(EXPERIMENTS):
        for row, lr in enumerate(LEARNING_RATES[experiment]):
            axis = axes[row][column]
            for (step, scale), (color, line) in styles.items():
                xs, ys, crosses = [], [], []
                for lam in LAMBDAS:
                    cell = by_key.get((experiment, float(lr), float(lam), step, scale))
                    if cell is None:
                        continue
                    if cell["diverged"]:
                        crosses.append(lam)
                    else:
                        xs.append(lam)
                        ys.append(100 * cell["avg_acc"])
                axis.plot(xs, ys, color=color, linestyle=line, marker="o", markersize=3,
                          label=f"{step}, lam_scale={scale}")
                axis.scatter(crosses, [0.0] * len(crosses), color=color, marker="x", s=40)
            axis.set_xscale("log")
            axis.set_xlim(LAMBDAS[0] / 2, LAMBDAS[-1] * 2)
            axis.set_ylim(-3, 103)
            axis.set_title(f"{experiment}, lr {lr:g}", fontsize=10)
            axis.set_xlabel("λ")
            axis.set_ylabel("average accuracy (%); × = diverged")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.suptitle("MAS: penalty in the loss (gradient) vs proximal step; λ as given vs λ / mean Ω", fontsize=11)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    temporary = png.with_name(png.name + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "plot", "table"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON-lines file of the cells")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--rates", nargs="+", type=int, default=[0, 1], choices=[0, 1],
                        help="which learning rates of each experiment to run: 0 = the protocol's, 1 = the second")
    parser.add_argument("--lams", nargs="+", type=float, default=list(LAMBDAS), help="a subset of the λ grid")
    parser.add_argument("--descending", action="store_true", help="run the cells from the last (largest λ) backwards")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "stability_map.png")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_grid(args.out, args.experiments, tuple(args.rates), args.descending, tuple(args.lams))
    elif args.command == "table":
        print(markdown_table(read_cells(args.out)))
    else:
        import matplotlib

        matplotlib.use("Agg")
        plot(read_cells(args.out), args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
