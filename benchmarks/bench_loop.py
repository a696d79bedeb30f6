"""Benchmark: training steps per second of the task loop against a bare PyTorch loop.

Run:  .venv/bin/python benchmarks/bench_loop.py [--repeats 5] [--samples 1024] [--epochs 2]

For two models — the recognition sequence's multi-head small CNN (1×28×28 inputs, width 32,
128 features; :func:`triplets.recognition.data.make_trunk`) and the fact-embedding small CNN
(3×32×32 images, slot loss; :func:`triplets.facts.model.build_model`) — and two methods (fine-tuning
and MAS, λ = 1, exact Ω) it trains two tasks of ``--samples`` random samples each, batch 64,
``--epochs`` epochs, one CPU thread, and times the training steps of the second task (MAS
then has Ω and θ* from the first):

* ``loop``: :func:`mas_core.loop.train_tasks` (the project's loop: seeded order, the loss
  through ``distributed.wrap_for_training``, the all-reduced divergence check, the per-epoch
  weight check, ``after_step`` only when the method asks for it);
* ``bare``: the same model (same seed), the same batches in the same order, the same SGD
  optimizer and the same regularizer's ``penalty`` in a plain ``for`` loop
  (``zero_grad; loss = task loss + penalty; backward; step; float(loss)``).

It reports the median over ``--repeats`` interleaved repeats (alternating which runs first) of the steps per second of each,
``overhead = bare steps/s / loop steps/s`` per case and ``loop_overhead`` = the largest of them
(goal ≤ 1.05); ``loop_overhead_fastest`` is the same ratio of the fastest repeat of each (the
one least disturbed by other work on a shared machine). The last line printed is a JSON object. A benchmark script, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mas_core.checkpoint import seed_everything
from mas_core.loop import ImportanceSource, OptimSettings, derived_seed, epoch_shares, train_tasks
from mas_core.regularizers import make_regularizer
from mas_core.regularizers.base import TaskInfo
from mas_core.sequence import IndexedData, MultiHeadNet
from triplets.facts.model import ModelConfig, build_model, slot_loss
from triplets.recognition.config import ModelSpec
from triplets.recognition.data import make_trunk

BATCH_SIZE = 64
SLOT_DIM = 16


class _BenchExperiment:
    """Two tasks of random data for one of the two models, with a timer on task 2's epochs."""

    metric_name = "nothing (benchmark)"
    importance_loss = None

    def __init__(self, kind: str, samples: int) -> None:
        self.kind = kind
        self.task_names = ["t1", "t2"]
        generator = torch.Generator().manual_seed(0)
        self.data = []
        for _ in range(2):
            if kind == "recognition":
                inputs = torch.randn(samples, 1, 28, 28, generator=generator)
                targets = torch.randint(0, 5, (samples,), generator=generator)
            else:
                inputs = torch.rand(samples, 3, 32, 32, generator=generator)
                targets = torch.randn(samples, 3 * SLOT_DIM, generator=generator)
            self.data.append(TensorDataset(inputs, targets))
        self.masks = torch.ones(samples, 3)
        self.started = self.stopped = 0.0

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def build_model(self) -> nn.Module:
        if self.kind == "recognition":
            trunk, width = make_trunk(ModelSpec(arch="small_cnn", input_size=28, channels=1))
            return MultiHeadNet(trunk, width)
        return build_model(ModelConfig(trunk_channels=[16, 32], branch_channels=32, hidden_dim=128), SLOT_DIM, 32)

    def trained_module(self, model: nn.Module) -> nn.Module:
        return model

    def begin_task(self, model: nn.Module, task: int) -> int | None:
        if task == 1:
            self.started = time.perf_counter()
        if self.kind == "recognition":
            model.active_head = model.add_head(5)
            return model.active_head
        return None

    def train_data(self, tasks: Sequence[int]) -> IndexedData:
        return IndexedData(self.data[tasks[-1]])

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        return task_loss(self.kind, module, batch, task, self.masks)

    def importance_data(self, model: nn.Module, task: int, kind: str) -> ImportanceSource:
        return ImportanceSource(IndexedData(TensorDataset(self.data[task].tensors[0])), 256)

    def evaluate(self, model: nn.Module, task: int) -> list[float]:
        return [0.0] * (task + 1)

    def on_log(self, message: str) -> None:
        if message.startswith("[") and "task 2 (t2) epoch" in message:
            self.stopped = time.perf_counter()  # the last one: after the last epoch of task 2


def task_loss(kind: str, module: nn.Module, batch: Any, task: int, masks: Tensor) -> Tensor:
    """The mean task loss of a batch: cross-entropy of the task's head, or the slot loss."""
    inputs, targets = batch
    if kind == "recognition":
        return F.cross_entropy(module(inputs, head=task), targets)
    return slot_loss(module(inputs), targets, masks[: targets.shape[0]])


def loop_steps_per_second(kind: str, method: str, samples: int, optim: OptimSettings) -> float:
    experiment = _BenchExperiment(kind, samples)
    train_tasks(experiment, method, optim, seed=0, method_options={"lam": 1.0} if method == "mas" else None,
                log=experiment.on_log)
    steps = optim.epochs * math.ceil(samples / optim.batch_size)
    return steps / (experiment.stopped - experiment.started)


def bare_steps_per_second(kind: str, method: str, samples: int, optim: OptimSettings) -> float:
    """The same two tasks in a plain loop; the steps of task 2 timed."""
    experiment = _BenchExperiment(kind, samples)
    seed_everything(0)
    model = experiment.build_model()
    reg = make_regularizer(method, **({"lam": 1.0} if method == "mas" else {}))
    seconds = 0.0
    for task in range(2):
        torch.manual_seed(derived_seed(0, "task", task))
        head = experiment.begin_task(model, task)
        tensors = experiment.data[task].tensors
        model.train()
        reg.before_task(model, TaskInfo(index=task, head=head, num_samples=samples))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                                    momentum=optim.momentum, weight_decay=optim.weight_decay)
        started = time.perf_counter()
        total = 0.0
        for epoch in range(optim.epochs):
            for index, _ in epoch_shares(samples, optim.batch_size, 0, task, epoch, None):
                batch = (tensors[0][index], tensors[1][index])
                optimizer.zero_grad(set_to_none=True)
                loss = task_loss(kind, model, batch, task, experiment.masks) + reg.penalty(model, batch[0])
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
        if task == 1:
            seconds = time.perf_counter() - started
        model.eval()
        reg.after_task(model, [tensors[0][i:i + 256] for i in range(0, samples, 256)])
    return optim.epochs * math.ceil(samples / optim.batch_size) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optim = OptimSettings(epochs=args.epochs, lr=0.01, momentum=0.9, batch_size=BATCH_SIZE)
    cases: dict[str, dict[str, float]] = {}
    for kind in ("recognition", "facts"):
        for method in ("finetune", "mas"):
            runs: dict[str, list[float]] = {"loop": [], "bare": []}
            for repeat in range(args.repeats):  # interleaved, alternating which goes first
                order = ("bare", "loop") if repeat % 2 == 0 else ("loop", "bare")
                for which in order:
                    measure = bare_steps_per_second if which == "bare" else loop_steps_per_second
                    runs[which].append(measure(kind, method, args.samples, optim))
            loop, bare = statistics.median(runs["loop"]), statistics.median(runs["bare"])
            best = max(runs["bare"]) / max(runs["loop"])  # the fastest repeat of each: least hit by other load
            cases[f"{kind}/{method}"] = {"loop_steps_per_s": round(loop, 2), "bare_steps_per_s": round(bare, 2),
                                         "overhead": round(bare / loop, 4), "overhead_fastest": round(best, 4)}
            print(f"{kind:<12} {method:<9} loop {loop:8.2f} steps/s   bare {bare:8.2f} steps/s   "
                  f"overhead {bare / loop:.3f} (fastest repeats: {best:.3f})", flush=True)
    summary = {"loop_overhead": max(case["overhead"] for case in cases.values()),
               "loop_overhead_fastest": max(case["overhead_fastest"] for case in cases.values()), "cases": cases,
               "repeats": args.repeats, "samples": args.samples, "epochs": args.epochs, "batch_size": BATCH_SIZE,
               "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
