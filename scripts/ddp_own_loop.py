"""MAS in your own DistributedDataParallel loop: two tasks of scikit-learn's digits.

    torchrun --nproc_per_node=2 scripts/ddp_own_loop.py            # CPU: gloo; GPUs: nccl
    python scripts/ddp_own_loop.py                                 # the same, one process

What the worked example shows (see :mod:`mas_core.distributed`):

* the loop is yours: DDP over the model, a sampler per task, ``reg.penalty`` added to the
  loss (inside the DDP forward, so DDP reduces the penalty's gradient too);
* after each task, Ω comes from ``reg.after_task`` on the **unwrapped** model and this
  rank's :class:`~mas_core.distributed.RankShard` of the task's samples: every rank sums
  ``|g_k|`` over its own samples, then sums and counts are all-reduced, so Ω equals the
  one-process Ω of the same weights (``Ω total`` and ``one-process Ω total``, which rank 0
  computes alone on all the samples, agree to float rounding);
* ``naive DDP Ω total`` is what one gets by taking ``|grad|`` after a DDP backward of the
  squared output norm: the gradients were averaged over ranks first, and the estimate shrinks.

Here the loop uses :class:`torch.utils.data.DistributedSampler` (which pads with repeated
samples so every rank has as many): the trained weights depend on the number of processes.
The project's task loop (:func:`mas_core.loop.train_tasks`, behind :func:`mas_core.run_sequence`,
``mas-triplets train`` and ``mas-triplets recognition``) splits global batches instead and gives
the one-process result.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mas_core import MAS, TaskInfo, distributed, mas_importance


def digit_tasks() -> list[TensorDataset]:
    """Task 0: digits 0–4, task 1: digits 5–9 (labels 0–4 in each), pixels in [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    inputs, targets = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
    return [TensorDataset(inputs[(targets // 5) == t], targets[(targets // 5) == t] % 5) for t in range(2)]


def main() -> None:
    torch.set_num_threads(1)
    info = distributed.init_from_environment("cpu")
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    reg = MAS(lam=0.01)
    for t, dataset in enumerate(digit_tasks()):
        reg.before_task(model, TaskInfo(index=t))
        step = distributed.wrap_for_training(
            model, lambda net, x, y: F.cross_entropy(net(x), y) + reg.penalty(net, x))
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=t)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(5):
            sampler.set_epoch(epoch)
            for x, y in DataLoader(dataset, batch_size=32, sampler=sampler):
                optimizer.zero_grad()
                step(x, y).backward()
                optimizer.step()
        shard = distributed.RankShard(
            lambda positions, data=dataset: DataLoader(torch.utils.data.Subset(data, positions), batch_size=64),
            len(dataset), info)
        before = sum(float(value.sum()) for value in reg.importance.values()) if t else 0.0
        reg.after_task(model, shard)  # the unwrapped model: |g_k| per sample, then all-reduce
        total = sum(float(value.sum()) for value in reg.importance.values()) - before  # this task's Ω
        if info is not None:  # the trap, for comparison: |grad| after DDP averaged the ranks' gradients
            probe = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model).eval())
            x = dataset.tensors[0][distributed.shard_positions(len(dataset), info)]
            probe(x).pow(2).sum().backward()
            naive = sum(float(p.grad.abs().sum()) for p in probe.parameters()) * world / len(dataset)
            del probe  # a DDP wrapper must not outlive the process group (its destructor needs it)
        if distributed.is_main_process():
            with torch.no_grad():
                accuracy = ", ".join(f"{(model(d.tensors[0]).argmax(1) == d.tensors[1]).float().mean():.3f}"
                                     for d in digit_tasks()[:t + 1])
            alone = mas_importance(model, DataLoader(dataset, batch_size=64))  # rank 0 only: no collective
            line = (f"task {t}: {world} process(es), train accuracy on tasks 0..{t}: {accuracy}; this task's Ω total {total:.6f}, "
                    f"one-process Ω total {sum(float(v.sum()) for v in alone.values()):.6f}")
            print(line + (f", naive DDP Ω total {naive:.6f}" if info is not None else ""), flush=True)
    distributed.leave_process_group()  # a barrier first: no rank exits while another still works


if __name__ == "__main__":
    main()
