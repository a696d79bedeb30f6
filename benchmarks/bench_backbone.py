"""Benchmark: the pretrained EfficientNet-Lite0 backbone (triplets.backbones) on the CPU.

Run:  .venv/bin/python benchmarks/bench_backbone.py [--threads 2] [--repeats 5] [--batch 64]

Three measurements, each side by side in one run (medians of ``--repeats`` timed passes after a
warm-up pass, the variants of a figure timed round by round; every rate also per CPU second,
``*_cpu``, which leaves out the time spent waiting for a core on a shared machine; ratios are what
count there):

* ``extract``: images per second of the whole network's forward pass (no gradients, eval mode)
  at 64, 96 and 128 pixels, ours against an independent implementation holding the same weights
  (timm's ``tf_efficientnet_lite0``; skipped when timm is not installed), each in the default
  (``contiguous``) and the ``channels_last`` memory format; ``ours_vs_timm`` = ours / timm in the
  faster format of each (goal >= 1.0), ``channels_last_speedup`` = ours channels_last / ours
  contiguous (the fact model runs in the default format unless this is > 1 at its sizes);
* ``train``: training samples per second of the fact model's branches (``trunk_blocks`` 15 and
  16, 64-pixel inputs) on cached trunk features (forward, a squared-output loss, backward, SGD)
  against the same model run from the images through the frozen trunk (``cached_vs_uncached``);
* the parameter count.

The last line printed is a JSON object. This is a benchmark script, never a timed test.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from triplets.backbones import efficientnet_lite0  # noqa: E402
from triplets.facts.model import ModelConfig, build_model  # noqa: E402


def _timm_twin(net: torch.nn.Module) -> torch.nn.Module | None:
    try:
        import timm
    except ImportError:
        return None
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict({name: value for (_, value), name in zip(net.state_dict().items(),
                                                                       reference.state_dict())})
    return reference


def interleaved_rates(steps: dict[str, Callable[[], None]], samples: int, repeats: int) -> dict[str, float]:
    """``{name: samples / median wall s, name + "_cpu": samples / median CPU s}`` of each step, timed
    round by round (each step once per round, after one warm-up call each), so that a change of the
    machine's load hits all of them alike; CPU seconds leave out the time spent waiting for a core."""
    for step in steps.values():
        step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    rates = {}
    for name in steps:
        rates[name] = samples / statistics.median(wall[name])
        rates[f"{name}_cpu"] = samples / statistics.median(cpu[name])
    return rates


def extraction(batch: int, repeats: int) -> dict:
    ours = efficientnet_lite0()
    theirs = _timm_twin(ours)
    copies = {"ours": ours, "timm": theirs}
    # one copy per memory format, so that no conversion runs inside the timed calls
    for label in ("ours", "timm"):
        if copies[label] is not None:
            copies[f"{label}_cl"] = copy.deepcopy(copies[label]).to(memory_format=torch.channels_last)
    report = {}
    for size in (64, 96, 128):
        images = torch.rand(batch, 3, size, size) * 2 - 1
        steps: dict[str, Callable[[], None]] = {}
        for label in ("ours", "timm"):
            if copies[label] is None:
                continue
            for fmt_name, net, fmt in (("contiguous", copies[label], torch.contiguous_format),
                                       ("channels_last", copies[f"{label}_cl"], torch.channels_last)):
                inputs = images.contiguous(memory_format=fmt)

                def forward(net=net, inputs=inputs) -> None:
                    with torch.no_grad():
                        net(inputs)
                steps[f"{label}_{fmt_name}_ips"] = forward
        row = {name: round(rate, 1) for name, rate in interleaved_rates(steps, batch, repeats).items()}
        for suffix in ("", "_cpu"):
            best_ours = max(row[f"ours_contiguous_ips{suffix}"], row[f"ours_channels_last_ips{suffix}"])
            row[f"channels_last_speedup{suffix}"] = round(
                row[f"ours_channels_last_ips{suffix}"] / row[f"ours_contiguous_ips{suffix}"], 3)
            if theirs is not None:
                row[f"ours_vs_timm{suffix}"] = round(
                    best_ours / max(row[f"timm_contiguous_ips{suffix}"], row[f"timm_channels_last_ips{suffix}"]), 3)
        report[f"{size}px"] = row
    return report


def training(batch: int, repeats: int) -> dict:
    report = {}
    slot_dim = 128
    images = torch.rand(batch, 3, 32, 32)
    for trunk_blocks in (15, 16):
        model = build_model(ModelConfig(backbone="efficientnet_lite0", trunk_blocks=trunk_blocks, input_size=64,
                                        freeze_trunk=True, hidden_dim=256), slot_dim, 32)
        with torch.no_grad():
            features = model.trunk_features(images)
        head = model.branch_head()
        steps: dict[str, Callable[[], None]] = {}
        for label, module, inputs in (("cached", head, features), ("uncached", model, images)):
            module.train()
            optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)

            def step(module=module, inputs=inputs, optimizer=optimizer) -> None:
                loss = module(inputs).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            steps[f"{label}_sps"] = step
        rates = {name: round(rate, 1) for name, rate in interleaved_rates(steps, batch, repeats).items()}
        rates["cached_vs_uncached"] = round(rates["cached_sps"] / rates["uncached_sps"], 2)
        rates["cached_vs_uncached_cpu"] = round(rates["cached_sps_cpu"] / rates["uncached_sps_cpu"], 2)
        rates["trained_parameters"] = sum(p.numel() for p in head.parameters() if p.requires_grad)
        report[f"trunk_blocks_{trunk_blocks}"] = rates
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per figure (median reported)")
    parser.add_argument("--batch", type=int, default=64, help="images per pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "torch": torch.__version__,
              "parameters": sum(p.numel() for p in efficientnet_lite0().parameters()),
              "extract": extraction(args.batch, args.repeats), "train": training(args.batch, args.repeats),
              "load_average_1min": os.getloadavg()[0]}
    for size, row in report["extract"].items():
        print(f"extract {size}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    for name, row in report["train"].items():
        print(f"train {name}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
