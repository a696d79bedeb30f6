"""How high does a task's epoch-mean loss go, relative to its first epoch, in runs that do not diverge?

The data behind the finite-collapse bound of :mod:`mas_core.divergence` (``docs/method.md`` §14.1).
Split scikit-learn digits (5 tasks of 2 classes, 8×8 inputs, MLP 64-64-64 with one 2-way head per
task, or with ``--model cnn`` a small CNN with BatchNorm; 5 epochs per task, batch 32, SGD momentum
0.9, seed 0) under MAS, EWC, SI and IMM, both
penalty steps, λ ∈ {1e-3 … 1e4} and lr ∈ {0.05, 0.01}; the collapse rule itself is switched off
(k = ∞) so the ratios are seen whole. For every run: whether it diverged (NaN/Inf), and the largest
``L̄_e / L̄_1`` over its tasks and epochs ``e ≥ 2``.

    .venv/bin/python benchmarks/loss_collapse_survey.py --out runs/loss_collapse_survey.jsonl
    .venv/bin/python benchmarks/loss_collapse_survey.py --model cnn --out runs/loss_collapse_survey_cnn.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import mas_core.divergence as divergence
from mas_core.errors import DivergenceError
from mas_core.sequence import MultiHeadNet, OptimSettings, Task, run_sequence

LAMBDAS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
LINE = re.compile(r"task (\d+) \(.*\) epoch (\d+)/\d+: mean loss (\S+)")


def tasks() -> list[Task]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    result = []
    for t in range(5):
        keep = (y == 2 * t) | (y == 2 * t + 1)
        xs, ys = x[keep], (y[keep] - 2 * t)
        cut = int(0.8 * len(ys))
        result.append(Task(name=f"{2 * t}{2 * t + 1}", train=TensorDataset(xs[:cut], ys[:cut]),
                           test=TensorDataset(xs[cut:], ys[cut:]), num_classes=2))
    return result


def make_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()), 64)


def make_cnn() -> MultiHeadNet:
    """A small CNN with BatchNorm on the 8×8 digit images (a different architecture from the MLP)."""
    return MultiHeadNet(nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU()), 32)


def max_ratio(lines: list[str]) -> float:
    """The largest mean loss of an epoch e ≥ 2 over the first epoch's, over the tasks logged."""
    first: dict[int, float] = {}
    worst = 0.0
    for line in lines:
        match = LINE.search(line)
        if not match:
            continue
        task, epoch, loss = int(match[1]), int(match[2]), float(match[3])
        if epoch == 1:
            first[task] = loss
        elif first.get(task, 0) > 0:
            worst = max(worst, loss / first[task])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/loss_collapse_survey.jsonl"))
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    divergence.COLLAPSE_FACTOR = math.inf
    data = tasks()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for method in ("mas", "ewc", "si", "imm"):
            for step in ("gradient", "proximal"):
                for lr in (0.05, 0.01):
                    for lam in LAMBDAS:
                        lines: list[str] = []
                        options = {"lam_l2" if method == "imm" else "lam": lam, "penalty_step": step}
                        started = time.perf_counter()
                        try:
                            result = run_sequence(make_cnn if args.model == "cnn" else make_model, data, method, OptimSettings(epochs=5, lr=lr, batch_size=32),
                                                  seed=0, method_options=options, progress=False, log=lines.append)
                            diverged, avg = False, sum(result.accuracy[-1]) / len(result.accuracy[-1])
                        except DivergenceError:
                            diverged, avg = True, None
                        cell = {"model": args.model, "method": method, "penalty_step": step, "lr": lr, "lam": lam, "diverged": diverged,
                                "max_ratio": max_ratio(lines), "avg_acc": avg,
                                "wall_s": round(time.perf_counter() - started, 2)}
                        out.write(json.dumps(cell) + "\n")
                        out.flush()
                        print(cell, flush=True)


if __name__ == "__main__":
    main()
