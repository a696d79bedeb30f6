"""Worker for tests/test_distributed.py, launched by ``torchrun`` (2 processes, gloo).

Modes:

* ``importance``: exact MAS, batch MAS, l-MAS and Fisher of two small models on a
  fixed dataset, each rank estimating on its :class:`~mas_core.distributed.RankShard`;
  also the "naive DDP" MAS estimate (|gradient after DDP's averaging|), to show the
  trap. Rank 0 saves everything to ``--out``.
* ``sequence``: :func:`mas_core.run_sequence` on :func:`make_tasks` with each of the
  comma-separated ``--methods`` (checkpoints in ``--checkpoint-dir/METHOD``); rank 0 saves
  the accuracy matrices to ``--out``. Also runs as a single process (``WORLD_SIZE=1``).
  ``--crash-in-task T`` makes rank 0 die (``os._exit(3)``) after the first epoch of
  task ``T`` (counting from 1), after the checkpoint of task ``T − 1`` was written.

The data and models are built here so the test can build the same ones in one process.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from mas_core import MultiHeadNet, OptimSettings, Task, distributed, run_sequence
from mas_core.importance import fisher_importance, hebbian_importance, mas_importance

NUM_SAMPLES = 37  # not a multiple of 2: a padding sampler would repeat one sample


def make_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 3))
    for module in cnn.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return {"mlp": mlp, "cnn": cnn}


def make_inputs() -> dict[str, TensorDataset]:
    generator = torch.Generator().manual_seed(1)
    return {
        "mlp": TensorDataset(torch.randn(NUM_SAMPLES, 6, generator=generator),
                             torch.randint(0, 4, (NUM_SAMPLES,), generator=generator)),
        "cnn": TensorDataset(torch.randn(NUM_SAMPLES, 1, 5, 5, generator=generator),
                             torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)),
    }


def batches_of(dataset: TensorDataset, positions: list[int], batch_size: int = 8):
    index = torch.as_tensor(positions, dtype=torch.long)
    return [tuple(tensor[chunk] for tensor in dataset.tensors) for chunk in index.split(batch_size)]


def estimates(data_for) -> dict[str, dict[str, torch.Tensor]]:
    """Every estimator on every model; ``data_for(name)`` gives that model's data source."""
    models = make_models()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in models.items():
        out[f"{name}/mas"] = mas_importance(model, data_for(name))
        out[f"{name}/mas_batch"] = mas_importance(model, data_for(name), mode="batch")
        out[f"{name}/mas_first20"] = mas_importance(model, data_for(name), max_samples=20)
        out[f"{name}/hebbian"] = hebbian_importance(model, data_for(name))
        out[f"{name}/fisher"] = fisher_importance(model, data_for(name))
    return out


def make_tasks(num_tasks: int = 2, per_task: int = 90, dim: int = 8, classes: int = 3) -> list[Task]:
    """Gaussian-blob classification tasks whose class means move between tasks (so fine-tuning forgets)."""
    generator = torch.Generator().manual_seed(7)
    tasks = []
    for t in range(num_tasks):
        means = 0.8 * torch.randn(classes, dim, generator=generator)
        def split(count: int) -> TensorDataset:
            labels = torch.arange(count) % classes
            inputs = means[labels] + torch.randn(count, dim, generator=generator)
            return TensorDataset(inputs, labels)
        tasks.append(Task(name=f"blobs{t}", train=split(per_task), test=split(45), num_classes=classes))
    return tasks


def make_model() -> MultiHeadNet:
    return MultiHeadNet(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU()), 16)


SETTINGS = OptimSettings(epochs=4, batch_size=10, lr=0.02, momentum=0.9)
SEED = 0  # MAS keeps task 1 better than SI under this seed (7 of seeds 0-7; the sanity check in test_distributed)

METHOD_OPTIONS = {"mas": {"lam": 0.3}, "ewc": {"lam": 50.0}, "si": {"lam": 1.0}, "finetune": None, "joint": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["importance", "sequence"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="mas")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-in-task", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = distributed.init_from_environment("cpu")
    assert info is None or info.backend == "gloo", info
    main_process = info is None or info.is_main
    if args.mode == "importance":
        assert info is not None, "the importance mode needs 2 or more processes"
        inputs = make_inputs()
        result = estimates(lambda name: distributed.RankShard(
            lambda positions, name=name: batches_of(inputs[name], positions), NUM_SAMPLES))
        # the trap: |∂/∂θ of the rank's batch loss| after DDP has averaged the gradients over ranks
        model = make_models()["mlp"].eval()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        positions = distributed.shard_positions(NUM_SAMPLES)
        x = inputs["mlp"].tensors[0][positions]
        ddp(x).pow(2).sum(dim=1).sum().backward()
        result["mlp/naive_ddp"] = {name: p.grad.abs() * info.world_size / NUM_SAMPLES
                                   for name, p in model.named_parameters()}
        result["shard_sizes"] = {"rank": torch.tensor([len(positions)])}
    else:
        log = None
        if args.crash_in_task is not None and main_process:
            marker = f"task {args.crash_in_task} (blobs{args.crash_in_task - 1}) epoch 1/"

            def log(message: str) -> None:
                if marker in message:
                    os._exit(3)
        result = {}
        for method in args.methods.split(","):
            folder = os.path.join(args.checkpoint_dir, method) if args.checkpoint_dir else None
            sequence = run_sequence(make_model, make_tasks(), method, SETTINGS, seed=SEED,
                                    method_options=METHOD_OPTIONS[method], checkpoint_dir=folder,
                                    resume=args.resume, progress=False, log=log)
            result[method] = sequence.accuracy
    if main_process:
        torch.save(result, args.out)
    distributed.leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
