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
  (``zero_grad; loss = task loss + penalty; backward; step;`` the method's step hooks, as the loop
  calls them (the proximal penalty step of MAS's default ``penalty_step``); ``float(loss)``).

It reports the median over ``--repeats`` interleaved repeats (alternating which runs first) of the steps per second of each,
``overhead = bare steps/s / loop steps/s`` per case and ``loop_overhead`` = the largest of them
(goal ≤ 1.05); ``loop_overhead_fastest`` is the same ratio of the fastest repeat of each (the
one least disturbed by other work on a shared machine). The same in this process's CPU seconds:
``cpu_overhead`` per case and ``loop_cpu_overhead`` (the largest); on a machine shared with other
jobs the wall clock also counts the time the process waited for a core, CPU time does not. The last
line printed is a JSON object. A benchmark script, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
        self.started = self.stopped = self.cpu_started = self.cpu_stopped = 0.0

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
            self.started, self.cpu_started = time.perf_counter(), time.process_time()
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
            self.stopped, self.cpu_stopped = time.perf_counter(), time.process_time()  # after task 2's last epoch


def task_loss(kind: str, module: nn.Module, batch: Any, task: int, masks: Tensor) -> Tensor:
    """The mean task loss of a batch: cross-entropy of the task's head, or the slot loss."""
    inputs, targets = batch
    if kind == "recognition":
        return F.cross_entropy(module(inputs, head=task), targets)
    return slot_loss(module(inputs), targets, masks[: targets.shape[0]])


def loop_steps_per_second(kind: str, method: str, samples: int, optim: OptimSettings) -> tuple[float, float]:
    """Steps per wall second and per CPU second of task 2 in the project's loop."""
    experiment = _BenchExperiment(kind, samples)
    train_tasks(experiment, method, optim, seed=0, method_options={"lam": 1.0} if method == "mas" else None,
                log=experiment.on_log)
    steps = optim.epochs * math.ceil(samples / optim.batch_size)
    return (steps / (experiment.stopped - experiment.started),
            steps / (experiment.cpu_stopped - experiment.cpu_started))


def bare_steps_per_second(kind: str, method: str, samples: int, optim: OptimSettings) -> tuple[float, float]:
    """The same two tasks in a plain loop; the steps of task 2 timed (per wall and per CPU second)."""
    experiment = _BenchExperiment(kind, samples)
    seed_everything(0)
    model = experiment.build_model()
    reg = make_regularizer(method, **({"lam": 1.0} if method == "mas" else {}))
    seconds = cpu_seconds = 0.0
    for task in range(2):
        torch.manual_seed(derived_seed(0, "task", task))
        head = experiment.begin_task(model, task)
        tensors = experiment.data[task].tensors
        model.train()
        reg.before_task(model, TaskInfo(index=task, head=head, num_samples=samples))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                                    momentum=optim.momentum, weight_decay=optim.weight_decay)
        started, cpu_started = time.perf_counter(), time.process_time()
        total = 0.0
        for epoch in range(optim.epochs):
            for index, _ in epoch_shares(samples, optim.batch_size, 0, task, epoch, None):
                batch = (tensors[0][index], tensors[1][index])
                optimizer.zero_grad(set_to_none=True)
                loss = task_loss(kind, model, batch, task, experiment.masks) + reg.penalty(model, batch[0])
                loss.backward()
                optimizer.step()
                if reg.uses_optimizer_step_hook:  # MAS's default proximal step, as the loop does
                    reg.after_optimizer_step(model, optimizer)
                if reg.uses_step_hook:
                    reg.after_step(model)
                total += float(loss.detach())
        if task == 1:
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        model.eval()
        reg.after_task(model, [tensors[0][i:i + 256] for i in range(0, samples, 256)])
    steps = optim.epochs * math.ceil(samples / optim.batch_size)
    return steps / seconds, steps / cpu_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="recognition/finetune,recognition/mas,facts/finetune,facts/mas",
                        help="comma-separated KIND/METHOD cases to run (default: all four)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optim = OptimSettings(epochs=args.epochs, lr=0.01, momentum=0.9, batch_size=BATCH_SIZE)
    cases: dict[str, dict[str, float]] = {}
    for case in args.cases.split(","):
        kind, method = case.strip().split("/")
        runs: dict[str, list[float]] = {"loop": [], "bare": []}
        cpu_runs: dict[str, list[float]] = {"loop": [], "bare": []}
        for repeat in range(args.repeats):  # interleaved, alternating which goes first
            order = ("bare", "loop") if repeat % 2 == 0 else ("loop", "bare")
            for which in order:
                measure = bare_steps_per_second if which == "bare" else loop_steps_per_second
                per_second, per_cpu_second = measure(kind, method, args.samples, optim)
                runs[which].append(per_second)
                cpu_runs[which].append(per_cpu_second)
        loop, bare = statistics.median(runs["loop"]), statistics.median(runs["bare"])
        best = max(runs["bare"]) / max(runs["loop"])  # the fastest repeat of each: least hit by other load
        cpu_loop, cpu_bare = statistics.median(cpu_runs["loop"]), statistics.median(cpu_runs["bare"])
        cases[f"{kind}/{method}"] = {"loop_steps_per_s": round(loop, 2), "bare_steps_per_s": round(bare, 2),
                                     "overhead": round(bare / loop, 4), "overhead_fastest": round(best, 4),
                                     "loop_steps_per_cpu_s": round(cpu_loop, 2),
                                     "bare_steps_per_cpu_s": round(cpu_bare, 2),
                                     "cpu_overhead": round(cpu_bare / cpu_loop, 4)}
        print(f"{kind:<12} {method:<9} loop {loop:8.2f} steps/s   bare {bare:8.2f} steps/s   "
              f"overhead {bare / loop:.3f} (fastest repeats: {best:.3f}; CPU seconds: {cpu_bare / cpu_loop:.3f})",
              flush=True)
    summary = {"loop_overhead": max(case["overhead"] for case in cases.values()),
               "loop_overhead_fastest": max(case["overhead_fastest"] for case in cases.values()),
               "loop_cpu_overhead": max(case["cpu_overhead"] for case in cases.values()), "cases": cases,
               "repeats": args.repeats, "samples": args.samples, "epochs": args.epochs, "batch_size": BATCH_SIZE,
               "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
               "load_average_1min": os.getloadavg()[0]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
