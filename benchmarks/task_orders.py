"""Does MAS's ``accumulate`` rule make the result independent of the task order?

    python benchmarks/task_orders.py [--experiment fmnist|recog] [--orders 5] [--lam 0.5 0.25]
                                     [--matched [--matched-lam 0.25]] [--epochs N]
                                     [--out runs/task_orders/fmnist.json] [--png docs/task_orders.png]

The claim tested (the seed notes' "Alpha" extension, ``MAS(accumulate="alpha")``,
``docs/method.md`` §3): with ``"alpha"`` the results no longer depend on the order of the tasks,
and the average forgetting is lower than MAS's own rule ``"sum"``. For every task order (the
given order first, then ``--orders - 1`` further distinct permutations drawn from ``--order-seed``)
and every rule in ``sum``, ``alpha``, ``ema`` (``ema_alpha`` 0.5), one MAS run (exact Ω, the same
λ, the same seed: the same trunk initialisation and the same per-position head initialisation and
data order; only the task list is permuted) is trained on the experiment's tasks, plus fine-tuning as
the reference. Per run: the accuracy matrix, average accuracy ``A``, forgetting ``F`` (Chaudhry
et al.) and ``BWT`` (fractions, :mod:`mas_core.metrics`, ``docs/method.md`` §10), the final
accuracy of each task by its position in the order, and the mean Ω (over all anchored elements)
after each task. Per rule: mean and sample standard deviation (``ddof = 1``) of ``A``, ``F`` and
``BWT`` over the orders; the standard deviation across orders is the consistency measure.

The rules do not weigh Ω alike: after ``k`` tasks ``"sum"`` holds ``Σ_t Ω_t``, ``"alpha"`` a weighted
*mean* of the ``Ω_t`` and ``"ema"`` ``Σ_t 0.5^(k−t+1) Ω_t`` (weights summing to ``1 − 0.5^k``), so one λ
is a weaker penalty under ``alpha`` and ``ema`` (about ``k`` times and ``k/(1 − 0.5^k)`` times weaker
at task ``k + 1`` when the ``Ω_t`` have similar mass). ``--matched`` therefore also runs ``alpha`` and
``ema`` at ``λ_r = λ · Σ_k meanΩ_sum(k) / Σ_k meanΩ_r(k)`` (``k`` over the tasks whose Ω penalises a
later task, summed over the orders of the first pass), so that the mean Ω the penalty sees matches
``"sum"``'s on average (with several ``--lam``, for each one named by ``--matched-lam``).

Experiments: ``fmnist`` is ``scripts/split_fashion_mnist.py``'s full protocol (5 class-pair tasks,
MLP 784-256-256, 5 epochs, SGD lr 0.05 momentum 0.9, batch 128, λ 0.5 as in ``docs/results.md``);
``recog`` the offline recognition sequence of ``configs/recognition_offline.yaml`` (small CNN,
λ 0.1, ``max_samples`` 1,000; ``--epochs`` to reduce its 6 epochs). Writes one JSON line with
everything (``--out``) and the plot (``--png``), both atomically; one torch thread by default. Each
finished run is also appended to ``--out`` + ``.runs.jsonl`` and reused when the same command is
run again (an interrupted invocation continues; delete that file to start over).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from mas_core import (MAS, DivergenceError, OptimSettings, Task, atomic_write_text, average_accuracy,  # noqa: E402
                      average_forgetting, backward_transfer, run_sequence)

RULES = ("sum", "alpha", "ema")
METRICS = ("avg_acc", "forgetting", "bwt")


# --------------------------------------------------------------------------- the script's logic

def task_orders(num_tasks: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct orders of ``range(num_tasks)``: the identity first, then permutations
    drawn from ``numpy.random.default_rng(seed)`` (repeats skipped), the same for the same seed."""
    if num_tasks < 1 or count < 1:
        raise ValueError(f"need at least one task and one order, got num_tasks={num_tasks}, count={count}")
    if count > math.factorial(num_tasks):
        raise ValueError(f"{num_tasks} tasks have fewer than {count} distinct orders")
    rng = np.random.default_rng(seed)
    orders = [list(range(num_tasks))]
    while len(orders) < count:
        order = [int(t) for t in rng.permutation(num_tasks)]
        if order not in orders:
            orders.append(order)
    return orders


def run_metrics(matrix: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """``avg_acc``, ``forgetting``, ``bwt`` of one accuracy matrix and its final row by position."""
    return {"avg_acc": average_accuracy(matrix), "forgetting": average_forgetting(matrix),
            "bwt": backward_transfer(matrix), "final_by_position": [float(v) for v in matrix[-1][:len(matrix)]]}


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (``ddof = 1``; ``None`` for a single value)."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarize(runs: Sequence[dict[str, Any]], task_names: Sequence[str]) -> dict[str, Any]:
    """Across the orders of one rule (runs that diverged are counted, not averaged): mean ± sd of
    each metric, of the final accuracy at each position and of each task's final accuracy."""
    done = [run for run in runs if not run.get("diverged")]
    summary: dict[str, Any] = {"orders": len(runs), "diverged": len(runs) - len(done)}
    if not done:
        return summary
    for metric in METRICS:
        summary[metric] = mean_sd([run[metric] for run in done])
    T = len(task_names)
    summary["final_by_position"] = [mean_sd([run["final_by_position"][p] for run in done]) for p in range(T)]
    summary["final_by_task"] = {
        name: mean_sd([run["final_by_position"][run["order"].index(t)] for run in done])
        for t, name in enumerate(task_names)}
    return summary


def matched_lams(lam: float, runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """``λ_r = λ Σ meanΩ_sum / Σ meanΩ_r``, summed over the tasks before the last and over the orders
    (``runs[rule][i]`` is order ``i``) in which every rule finished; ``{}`` when there is none."""
    finished = [i for i in range(len(runs["sum"])) if all(runs[rule][i].get("mean_omega") for rule in RULES)]
    totals = {rule: sum(sum(runs[rule][i]["mean_omega"][:-1]) for i in finished) for rule in RULES}
    if not finished or totals["sum"] <= 0:
        return {}
    return {rule: lam * totals["sum"] / totals[rule] for rule in RULES if rule != "sum" and totals[rule] > 0}


class RecordingMAS(MAS):
    """:class:`MAS` that records the mean effective Ω (over all anchored elements) after each task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mean_omega: list[float] = []

    def add_task_importance(self, model: torch.nn.Module, task_importance: dict[str, torch.Tensor]) -> None:
        super().add_task_importance(model, task_importance)
        omega = self.importance
        total = sum(float(value.double().sum()) for value in omega.values())
        self.mean_omega.append(total / sum(value.numel() for value in omega.values()))


# --------------------------------------------------------------------------- the experiments

def fmnist_experiment(epochs: int | None) -> dict[str, Any]:
    from triplets.recognition.data import fashion_mnist_mlp, split_fashion_mnist

    return {"tasks": split_fashion_mnist(num_tasks=5, seed=0), "make_model": fashion_mnist_mlp, "lam": 0.5, "seed": 0,
            "mas_options": {}, "eval_batch_size": 512,
            "optim": OptimSettings(epochs=epochs or 5, lr=0.05, momentum=0.9, batch_size=128)}


def recog_experiment(epochs: int | None) -> dict[str, Any]:
    from triplets.recognition.config import load_recognition_config
    from triplets.recognition.data import build_tasks, ensure_prepared, model_factory

    config = load_recognition_config(ROOT / "configs" / "recognition_offline.yaml",
                                     [f"data_dir={ROOT / 'runs' / 'data_cache'}"])
    for spec in config.tasks:
        ensure_prepared(spec, config.data_dir, config.seed, lambda message: None)
    options = dict(config.method_options.get("mas", {}))
    lam = float(options.pop("lam"))
    optim = OptimSettings(**{f.name: getattr(config.train, f.name) for f in dataclasses.fields(OptimSettings)})
    return {"tasks": build_tasks(config), "make_model": model_factory(config.model), "lam": lam, "seed": config.seed,
            "mas_options": options, "eval_batch_size": config.train.eval_batch_size,
            "optim": dataclasses.replace(optim, epochs=epochs or optim.epochs)}


def run_one(setup: dict[str, Any], order: list[int], rule: str | None, lam: float) -> dict[str, Any]:
    """One sequence in ``order`` with MAS(``rule``, λ) (``rule=None``: fine-tuning)."""
    tasks: list[Task] = [setup["tasks"][t] for t in order]
    method = "finetune" if rule is None else RecordingMAS(lam, accumulate=rule, **setup["mas_options"])
    started = time.perf_counter()
    record: dict[str, Any] = {"order": order, "rule": rule or "finetune", "lam": None if rule is None else lam}
    try:
        result = run_sequence(setup["make_model"], tasks, method, setup["optim"], seed=setup["seed"],
                              eval_batch_size=setup["eval_batch_size"], progress=False)
    except DivergenceError as error:
        return {**record, "diverged": True, "error": str(error)[:300], "wall_s": time.perf_counter() - started}
    record.update(diverged=False, accuracy_matrix=[list(row) for row in result.accuracy],
                  **run_metrics(result.accuracy),
                  wall_s=time.perf_counter() - started)
    if rule is not None:
        record["mean_omega"] = method.mean_omega
    return record


# --------------------------------------------------------------------------- the plot

def plot(png: Path, summary: dict[str, Any], title: str) -> None:
    """Top: average accuracy and forgetting (percent) per MAS group (fine-tuning, far off the scale,
    is left to the table), one dot per order that finished and the mean ± sd bar, with the number
    of orders that diverged under the name. Bottom: the final accuracy of the task at each position
    of the order (mean ± sd over the orders) for the groups at the first matched λ and its matched ones."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [key for key, group in summary["groups"].items()
              if group["rule"] != "finetune" and group["summary"].get("avg_acc")]
    figure = Figure(figsize=(min(16.0, max(9.0, 1.1 * len(groups) + 4.0)), 8.0))
    FigureCanvasAgg(figure)
    labels = [f"{key.replace('matched to sum λ=', 'matched: sum ')}\n"
              f"{summary['groups'][key]['summary']['diverged']}/{summary['groups'][key]['summary']['orders']} diverged"
              for key in groups]
    for index, metric in enumerate(("avg_acc", "forgetting")):
        axes = figure.add_subplot(2, 2, index + 1)
        for x, key in enumerate(groups):
            group = summary["groups"][key]
            values = [100 * run[metric] for run in group["runs"] if not run.get("diverged")]
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            axes.plot([x + j for j in jitter], values, "o", color="C0", alpha=0.6, markersize=4)
            stats = group["summary"][metric]
            axes.errorbar([x + 0.3], [100 * stats["mean"]], yerr=[100 * (stats["sd"] or 0.0)], fmt="s",
                          color="C3", capsize=4)
        axes.set_xticks(range(len(groups)))
        axes.set_xticklabels(labels, rotation=90, ha="center", fontsize=6.5)
        axes.set_ylabel({"avg_acc": "average accuracy (%)", "forgetting": "average forgetting (%)"}[metric])
        axes.grid(axis="y", alpha=0.3)
    bases = [float(base) for base in summary.get("matched_lams", {})][:1]
    shown = [key for key in groups if summary["groups"][key]["lam"] in bases
             or key.endswith(f"(matched to sum λ={bases[0]:g})" if bases else "")] or groups
    axes = figure.add_subplot(2, 1, 2)
    for index, key in enumerate(shown):
        by_position = summary["groups"][key]["summary"]["final_by_position"]
        positions = range(1, len(by_position) + 1)
        axes.errorbar([p + 0.05 * (index - len(shown) / 2) for p in positions],
                      [100 * stats["mean"] for stats in by_position],
                      yerr=[100 * (stats["sd"] or 0.0) for stats in by_position], marker="o", markersize=3,
                      capsize=2, label=key)
    axes.set_xticks(list(range(1, len(summary["tasks"]) + 1)))
    axes.set_xlabel("position of the task in the order")
    axes.set_ylabel("final accuracy (%)\nmean ± sd over orders")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(alpha=0.3)
    figure.suptitle(title + "\nblue: one order each; red: mean ± sd over the orders that finished", fontsize=9)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    temporary = png.with_name(png.name + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(png)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=("fmnist", "recog"), default="fmnist")
    parser.add_argument("--orders", type=int, default=5, help="number of task orders (the given one first)")
    parser.add_argument("--order-seed", type=int, default=0)
    parser.add_argument("--lam", type=float, nargs="+", default=None,
                        help="λ values, each for every rule (default: the experiment's)")
    parser.add_argument("--matched-lam", type=float, nargs="+", default=None,
                        help="the λ values of --lam that --matched matches (default: the first)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the protocol's)")
    parser.add_argument("--matched", action="store_true",
                        help="also run alpha and ema at the λ matching sum's mean Ω")
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON line (default runs/task_orders/EXPERIMENT.json)")
    parser.add_argument("--png", type=Path, default=None, help="plot (default runs/task_orders/EXPERIMENT.png)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / "task_orders" / f"{args.experiment}.json"
    png = args.png or out.with_suffix(".png")

    torch.set_num_threads(args.threads)
    setup = (fmnist_experiment if args.experiment == "fmnist" else recog_experiment)(args.epochs)
    lams = [setup["lam"]] if args.lam is None else args.lam
    matched_bases = lams[:1] if args.matched_lam is None else args.matched_lam
    if any(base not in lams for base in matched_bases):
        parser.error(f"--matched-lam {matched_bases} must be among --lam {lams}")
    names = [task.name for task in setup["tasks"]]
    try:
        orders = task_orders(len(names), args.orders, args.order_seed)
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    groups: dict[str, dict[str, Any]] = {}

    cache_path = out.with_name(out.name + ".runs.jsonl")
    cache = _read_cache(cache_path)

    def run_group(key: str, rule: str | None, group_lam: float) -> None:
        runs = []
        for order in orders:
            cache_key = json.dumps([args.experiment, setup["optim"].epochs, rule, group_lam, order])
            run = cache.get(cache_key)
            if run is None:
                run = run_one(setup, order, rule, group_lam)
                _append_line(cache_path, {"key": cache_key, "run": run})
            runs.append(run)
            text = "diverged" if run["diverged"] else (f"acc {run['avg_acc']:.4f} forget {run['forgetting']:.4f} "
                                                      f"bwt {run['bwt']:+.4f}")
            print(f"{key:<24} order {order}: {text} ({run['wall_s']:.1f} s)", flush=True)
        groups[key] = {"rule": rule or "finetune", "lam": None if rule is None else group_lam, "runs": runs,
                       "summary": summarize(runs, names)}

    for lam in lams:
        for rule in RULES:
            run_group(f"{rule} λ={lam:g}", rule, lam)
    if not args.no_finetune:
        run_group("finetune", None, 0.0)
    matched: dict[str, dict[str, float]] = {}
    for base in matched_bases if args.matched else []:
        matched[f"{base:g}"] = matched_lams(base, {rule: groups[f"{rule} λ={base:g}"]["runs"] for rule in RULES})
        for rule, rule_lam in matched[f"{base:g}"].items():
            run_group(f"{rule} λ={rule_lam:.3g} (matched to sum λ={base:g})", rule, rule_lam)

    optim = setup["optim"]
    summary = {"experiment": args.experiment, "tasks": names, "orders": orders, "order_seed": args.order_seed,
               "lams": lams, "matched_lams": matched,
               "mas_options": setup["mas_options"], "seed": setup["seed"],
               "optim": dataclasses.asdict(optim), "threads": args.threads, "wall_s": time.perf_counter() - started,
               "groups": groups}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(summary) + "\n")
    plot(png, summary, f"{args.experiment}: MAS accumulate rules over {len(orders)} task orders "
                       f"({optim.epochs} epochs/task)")
    print(format_table(summary))
    return 0


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The runs already made (``--out`` + ``.runs.jsonl``, one line per run), so that an interrupted
    invocation continues where it stopped; a line cut by an interruption is ignored."""
    cache: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            cache[entry["key"]] = entry["run"]
    return cache


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def format_table(summary: dict[str, Any]) -> str:
    """Markdown rows: group | λ | avg acc | forgetting | BWT (percent, mean ± sd over the orders)."""
    lines = ["| rule | λ | avg acc (%) | forgetting (%) | BWT (%) | diverged |", "|---|---|---|---|---|---|"]
    for key, group in summary["groups"].items():
        stats = group["summary"]
        cells = []
        for metric in METRICS:
            if metric not in stats:
                cells.append("–")
                continue
            sd = stats[metric]["sd"]
            cells.append(f"{100 * stats[metric]['mean']:.2f} ± {100 * (sd or 0.0):.2f}")
        lam = "–" if group["lam"] is None else f"{group['lam']:.3g}"
        lines.append(f"| {key} | {lam} | {' | '.join(cells)} | {stats['diverged']}/{stats['orders']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
