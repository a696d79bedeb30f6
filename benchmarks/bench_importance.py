"""Benchmark: the exact per-sample MAS importance against a batch-size-1 loop and the batch estimator.

Run:  .venv/bin/python benchmarks/bench_importance.py [--repeats 5] [--samples 3000]

For three models (the 784-256-256 MLP with a 2-way head of the Fashion-MNIST demo, a
small CNN on 1×28×28 inputs with max-pooling, and the same CNN with stride-2
convolutions instead of pooling) it times, side by side and interleaved in each repeat:

* ``loop``: brute force, one autograd backward per sample (batch size 1), Σ|g_k|/N;
* ``exact``: :func:`mas_core.importance.mas_importance` (``mode="exact"``);
* ``batch``: the batch-level estimator (``mode="batch"``, the original code's);
* ``vmap``: plain ``torch.func.vmap`` over per-sample gradients of every parameter
  (the general fallback forced on all parameters), for reference.

and reports medians, ``exact_vs_loop_speedup = loop / exact`` (goal ≥ 10),
``exact_vs_batch_slowdown = exact / batch`` (goal ≤ 1.10, issue 27), the same in this process's
CPU seconds (``*_cpu_s``, ``exact_vs_batch_cpu_slowdown``: on a machine shared with other jobs the
wall clock also counts the time the process waited for a core, CPU time does not) and
``max_rel_err`` = the largest
``max|Ω_exact − Ω_loop| / max|Ω_loop|`` over parameters. The last line printed is a JSON
object. This is a benchmark script, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from mas_core.importance import mas_importance

try:  # the package layout (since c6bef5f)
    from mas_core.importance.mas import SquaredNormObjective
    from mas_core.importance.per_sample import _accumulate_vectorised
except ImportError:  # one module, as at 3672441: the script also runs there (benchmarks/against.py --script current)
    from mas_core.importance import _SquaredNormObjective as SquaredNormObjective  # type: ignore[attr-defined,no-redef]
    from mas_core.importance import _accumulate_vectorised  # type: ignore[attr-defined,no-redef]


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)
    )


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def make_strided_cnn() -> nn.Module:
    """The same CNN with stride-2 convolutions in place of max-pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def loop_importance(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """Brute force: Ω = (1/N) Σ_k |∂‖F(x_k)‖²/∂θ| with one backward per sample."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for k in range(inputs.shape[0]):
        value = model(inputs[k:k + 1]).square().sum()
        for name, grad in zip(params, torch.autograd.grad(value, list(params.values()))):
            sums[name] += grad.abs()
    return {name: total / inputs.shape[0] for name, total in sums.items()}


def vmap_importance(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Per-sample gradients of every parameter by vmap (the fallback forced everywhere)."""
    model.eval()
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    objective = SquaredNormObjective(None)
    count = 0
    for batch in batches:
        _accumulate_vectorised(
            model, batch, batch.shape[0], objective, torch.abs, sums, list(sums), None
        )
        count += batch.shape[0]
    return {name: total / count for name, total in sums.items()}


def max_relative_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    return max(
        float((actual[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-30)) for n in expected
    )


def timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, this process's CPU seconds and the result of ``function()``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def bench_model(name: str, model: nn.Module, inputs: Tensor, batch_size: int, repeats: int,
                with_vmap: bool) -> dict[str, float]:
    batches = list(inputs.split(batch_size))
    methods: dict[str, Callable[[], dict[str, Tensor]]] = {
        "loop": lambda: loop_importance(model, inputs),
        "exact": lambda: mas_importance(model, batches),
        "batch": lambda: mas_importance(model, batches, mode="batch"),
    }
    if with_vmap:
        methods["vmap"] = lambda: vmap_importance(model, batches)
    mas_importance(model, batches[:1])  # warm-up (allocator, first-call costs)
    times: dict[str, list[float]] = {method: [] for method in methods}
    cpu_times: dict[str, list[float]] = {method: [] for method in methods}
    results: dict[str, dict[str, Tensor]] = {}
    for _ in range(repeats):
        for method, function in methods.items():  # interleaved: drift hits all methods alike
            seconds, cpu_seconds, results[method] = timed(function)
            times[method].append(seconds)
            cpu_times[method].append(cpu_seconds)
    medians = {f"{method}_s": statistics.median(values) for method, values in times.items()}
    cpu_medians = {f"{method}_cpu_s": statistics.median(values) for method, values in cpu_times.items()}
    report = {
        "samples": inputs.shape[0],
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{key: round(value, 4) for key, value in medians.items()},
        "exact_vs_loop_speedup": round(medians["loop_s"] / medians["exact_s"], 2),
        "exact_vs_batch_slowdown": round(medians["exact_s"] / medians["batch_s"], 3),
        **{key: round(value, 4) for key, value in cpu_medians.items()},
        "exact_vs_batch_cpu_slowdown": round(cpu_medians["exact_cpu_s"] / cpu_medians["batch_cpu_s"], 3),
        "max_rel_err": max_relative_error(results["exact"], results["loop"]),
    }
    if with_vmap:
        report["vmap_max_rel_err"] = max_relative_error(results["vmap"], results["loop"])
    print(f"{name}: {json.dumps(report)}", flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    parser.add_argument("--samples", type=int, default=3000, help="samples for the MLP")
    parser.add_argument("--cnn-samples", type=int, default=1000, help="samples for the CNN")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-vmap", action="store_true", help="skip the plain-vmap reference")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 OpenMP "
                             "threads spin-wait on each other and small ops run ~10x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mlp_report = bench_model("mlp", make_mlp(), torch.randn(args.samples, 1, 28, 28), args.batch_size,
                             args.repeats, not args.no_vmap)
    cnn_report = bench_model("cnn", make_cnn(), torch.randn(args.cnn_samples, 1, 28, 28), args.batch_size,
                             args.repeats, not args.no_vmap)
    strided_report = bench_model("cnn_strided", make_strided_cnn(), torch.randn(args.cnn_samples, 1, 28, 28),
                                 args.batch_size, args.repeats, not args.no_vmap)
    reports = {"mlp": mlp_report, "cnn": cnn_report, "cnn_strided": strided_report}
    summary = {
        "benchmark": "importance",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "repeats": args.repeats,
        **reports,
        "exact_vs_loop_speedup": min(r["exact_vs_loop_speedup"] for r in reports.values()),
        "exact_vs_batch_slowdown": max(r["exact_vs_batch_slowdown"] for r in reports.values()),
        "exact_vs_batch_cpu_slowdown": max(r["exact_vs_batch_cpu_slowdown"] for r in reports.values()),
        "max_rel_err": max(r["max_rel_err"] for r in reports.values()),
    }
    summary["goals_met"] = summary["exact_vs_loop_speedup"] >= 10 and summary["exact_vs_batch_slowdown"] <= 1.10
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
