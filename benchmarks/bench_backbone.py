"""Benchmark: the pretrained EfficientNet-Lite0 backbone (triplets.backbones) on the CPU.

Run:  .venv/bin/python benchmarks/bench_backbone.py [--threads 2] [--repeats 5] [--batch 64]

Three measurements, each side by side in one run (medians of ``--repeats`` timed passes after a
warm-up pass; ratios are what count on a shared machine):

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


def median_rate(step: Callable[[], None], samples: int, repeats: int) -> float:
    """``samples`` / the median wall time of ``step`` over ``repeats`` timed calls (after one warm-up)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return samples / statistics.median(times)


def _timm_twin(net: torch.nn.Module) -> torch.nn.Module | None:
    try:
        import timm
    except ImportError:
        return None
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict({name: value for (_, value), name in zip(net.state_dict().items(),
                                                                       reference.state_dict())})
    return reference


def extraction(batch: int, repeats: int) -> dict:
    ours = efficientnet_lite0()
    theirs = _timm_twin(ours)
    report = {}
    for size in (64, 96, 128):
        images = torch.rand(batch, 3, size, size) * 2 - 1
        row = {}
        for label, net in (("ours", ours), ("timm", theirs)):
            if net is None:
                continue
            for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                net.to(memory_format=fmt)
                inputs = images.contiguous(memory_format=fmt)

                def forward(net=net, inputs=inputs) -> None:
                    with torch.no_grad():
                        net(inputs)
                row[f"{label}_{fmt_name}_ips"] = round(median_rate(forward, batch, repeats), 1)
            net.to(memory_format=torch.contiguous_format)
        best_ours = max(row["ours_contiguous_ips"], row["ours_channels_last_ips"])
        row["channels_last_speedup"] = round(row["ours_channels_last_ips"] / row["ours_contiguous_ips"], 3)
        if theirs is not None:
            row["ours_vs_timm"] = round(best_ours / max(row["timm_contiguous_ips"], row["timm_channels_last_ips"]), 3)
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
        rates = {}
        for label, module, inputs in (("cached", head, features), ("uncached", model, images)):
            module.train()
            optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)

            def step(module=module, inputs=inputs, optimizer=optimizer) -> None:
                loss = module(inputs).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rates[f"{label}_sps"] = round(median_rate(step, batch, repeats), 1)
        rates["cached_vs_uncached"] = round(rates["cached_sps"] / rates["uncached_sps"], 2)
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
              "extract": extraction(args.batch, args.repeats), "train": training(args.batch, args.repeats)}
    for size, row in report["extract"].items():
        print(f"extract {size}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    for name, row in report["train"].items():
        print(f"train {name}: " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
