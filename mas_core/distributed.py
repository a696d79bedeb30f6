"""Several processes, one result: training and importance on :mod:`torch.distributed`.

Launch any entry point with PyTorch's own launcher, e.g.
``torchrun --nproc_per_node=2 -m triplets.cli train CONFIG --out RUN``; the entry point
calls :func:`init_from_environment`, which reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
that ``torchrun`` sets, picks the backend (``nccl`` when the device is a GPU, ``gloo``
otherwise) and returns a :class:`ProcessInfo` (``None`` in an ordinary single process).
Nothing here starts processes or reads the environment at import time.

Three rules make an N-process run the same computation as the 1-process run of the same
config (up to the order of floating-point sums):

1. **Global batches, split across ranks** (:func:`rank_share`). Every rank draws the same
   global sample order (seeded by (seed, task, epoch), independent of N). Global batch
   ``b`` is ``order[b·B:(b+1)·B]``, exactly as in one process; rank ``r`` trains on
   positions ``r, r+N, r+2N, …`` of it. No sample is padded in or dropped (unlike
   :class:`torch.utils.data.DistributedSampler`, which repeats samples to even out the
   ranks). Each rank's loss is the *mean* of its share's per-sample losses times
   ``N·|share| / |batch|`` (the task loop, :func:`mas_core.loop.epoch_shares`; equivalently
   the share's sum times the :func:`rank_share` weight ``N / |batch|``), so that
   DistributedDataParallel's average over ranks is ``(1/|batch|) Σ_{k∈batch} ℓ_k``: the
   one-process gradient (in one process the factor is exactly 1). A rank whose share is
   empty (a last batch smaller than N) runs one sample with weight 0 so that every rank
   takes part in the all-reduce.
2. **Penalties inside the DDP forward** (:class:`LossModule`). The regularizer's penalty is
   computed in the wrapped module's forward, so that DDP sees every parameter it touches
   (old heads included) and reduces each gradient exactly once.
3. **Importance is reduced after the absolute value** (:class:`RankShard`,
   :func:`all_reduce_sums`). Under DDP, backward averages gradients across ranks *before*
   anything else sees them, so ``|g|`` of a DDP backward is ``|mean_r g_r|``, a coarser,
   smaller estimate than MAS's ``(1/N) Σ_k |g_k|``. The estimators of
   :mod:`mas_core.importance` therefore run on the *unwrapped* module over this rank's
   disjoint share of the samples (:func:`shard_positions`), sum ``φ(g_k)`` locally, and only
   then all-reduce the sums and the sample counts: ``Ω = Σ_r S_r / Σ_r N_r``, the
   single-process value. The same holds for EWC's Fisher (``φ = (·)²``) and l-MAS's Hebbian
   sums. SI's path integral ``−g·Δθ`` needs no reduction: after a DDP step ``g`` is the
   global-batch gradient and ``Δθ`` is identical on every rank.

What differs from one process: dropout masks (each rank draws its own), BatchNorm batch
statistics in training mode (per rank, unless the model is converted with
:class:`torch.nn.SyncBatchNorm`), LwF/EBLL's per-batch distillation mean (averaged per rank),
and the rounding of sums.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mas_core.errors import MASCoreError

__all__ = [
    "LossModule",
    "ProcessInfo",
    "RankShard",
    "all_reduce_sums",
    "all_reduce_tensor",
    "barrier",
    "choose_backend",
    "current",
    "init_from_environment",
    "is_main_process",
    "local_device",
    "parameters_in_graph",
    "process_group_session",
    "rank_share",
    "run_on_main_process",
    "same_on_every_rank",
    "shard_positions",
    "spans_processes",
    "wrap_for_training",
]


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a distributed job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, results and logs."""
        return self.rank == 0


def choose_backend(device: str | torch.device | None = None) -> str:
    """``"nccl"`` when ``device`` is a CUDA device (or ``None`` and CUDA is available), else ``"gloo"``."""
    if device is None:
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = torch.device(device).type == "cuda"
    return "nccl" if use_cuda and dist.is_nccl_available() else "gloo"


def init_from_environment(device: str | torch.device | None = None, backend: str = "auto", *,
                          timeout_minutes: float = 120.0) -> ProcessInfo | None:
    """Join the process group described by ``torchrun``'s environment variables.

    Returns ``None`` when ``WORLD_SIZE`` is absent or 1 (an ordinary single process; nothing
    is initialised). Otherwise initialises the default process group once (``backend``
    ``"auto"``: :func:`choose_backend` of ``device``), pins the GPU of ``LOCAL_RANK`` when the
    backend is ``nccl``, and returns this process's :class:`ProcessInfo`.
    ``timeout_minutes`` bounds how long a rank waits in a collective, e.g. while rank 0
    alone writes a feature cache (default 2 hours; torchrun still stops every rank at once
    when one of them dies).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise MASCoreError("this PyTorch build has no torch.distributed; run with one process")
    if not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise MASCoreError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun "
                                   "(torchrun --nproc_per_node=N -m triplets.cli ...)")
        chosen = choose_backend(device) if backend == "auto" else backend
        if chosen not in ("gloo", "nccl", "mpi"):
            raise MASCoreError(f"backend must be 'auto', 'gloo', 'nccl' or 'mpi', got {backend!r}")
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    return current()


def current() -> ProcessInfo | None:
    """This process's :class:`ProcessInfo` when a process group of 2 or more is initialised, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return ProcessInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       backend=str(dist.get_backend()))


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a distributed job."""
    info = current()
    return info is None or info.is_main


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if current() is not None:
        dist.barrier()


def leave_process_group(*, wait: bool = True) -> None:
    """Destroy the default process group (nothing when none is joined).

    With ``wait`` (the normal way out) every rank first meets in a barrier: a rank that
    destroys its group and exits while another rank still works (rank 0 writing a checkpoint,
    say) tears the shared gloo connections down under it, and the slower process aborts with
    "terminate called without an active exception". ``wait=False`` is for leaving on an error,
    when the other ranks may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device: str | torch.device) -> torch.device:
    """``device``, with a bare ``"cuda"`` turned into this rank's ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    info = current()
    if device.type == "cuda" and device.index is None and info is not None:
        return torch.device("cuda", info.local_rank)
    return device


# --------------------------------------------------------------------------- splitting the samples

def shard_positions(count: int, info: ProcessInfo | None = None) -> list[int]:
    """Positions ``r, r+N, r+2N, … < count`` of rank ``r`` of ``N``: disjoint, covering, no padding.

    All positions in a single process."""
    info = current() if info is None else info
    if info is None:
        return list(range(count))
    return list(range(info.rank, count, info.world_size))


def rank_share(global_batch: Tensor, info: ProcessInfo | None = None) -> tuple[Tensor, float]:
    """This rank's part of one global batch (indices) and the weight of its summed loss.

    Returns ``(indices, weight)`` with ``indices = global_batch[r::N]`` and
    ``weight = N / len(global_batch)``, so that the DDP average over ranks of
    ``weight · Σ_{k∈indices} ℓ_k`` is the global-batch mean loss. An empty share (a global
    batch with fewer than N samples) is replaced by the batch's first sample with weight 0.
    In a single process: ``(global_batch, 1 / len(global_batch))``.
    """
    size = int(global_batch.shape[0])
    if size == 0:
        raise MASCoreError("rank_share got an empty global batch")
    info = current() if info is None else info
    if info is None:
        return global_batch, 1.0 / size
    share = global_batch[info.rank::info.world_size]
    if share.shape[0] == 0:
        return global_batch[:1], 0.0
    return share, info.world_size / size


class RankShard:
    """One rank's disjoint share of a data source, marked so that estimators reduce across ranks.

    ``make_batches(positions)`` yields the batches of the samples at ``positions`` (global
    positions in the data source, increasing). The importance estimators of
    :mod:`mas_core.importance` recognise a ``RankShard`` (:func:`spans_processes`): they sum
    over this rank's samples and all-reduce sums and counts before dividing, so the result
    is the estimate over the union of all shards, identical on every rank. ``max_samples``
    of an estimator applies to the union (the first ``max_samples`` global positions), via
    :meth:`first`.

    Every rank must iterate its shard (a collective follows), even when the shard is empty.
    """

    spans_processes = True

    def __init__(self, make_batches: Callable[[list[int]], Iterable[Any]], count: int,
                 info: ProcessInfo | None = None, *, positions: Sequence[int] | None = None) -> None:
        self.info = current() if info is None else info
        self.count = int(count)
        self.positions = list(positions) if positions is not None else shard_positions(self.count, self.info)
        self._make_batches = make_batches

    def first(self, max_samples: int) -> "RankShard":
        """The shard of the first ``max_samples`` positions of the whole source."""
        kept = [position for position in self.positions if position < max_samples]
        return RankShard(self._make_batches, min(self.count, max_samples), self.info, positions=kept)

    def __iter__(self) -> Iterator[Any]:
        if not self.positions:
            return iter(())
        return iter(self._make_batches(self.positions))

    def __repr__(self) -> str:
        info = self.info
        where = f"rank {info.rank}/{info.world_size}" if info is not None else "single process"
        return f"RankShard({len(self.positions)} of {self.count} samples, {where})"


def spans_processes(data: Any) -> bool:
    """True when ``data`` is one rank's share of a distributed source (a :class:`RankShard`)
    and a process group is running: its statistics must be all-reduced."""
    return bool(getattr(data, "spans_processes", False)) and current() is not None


# --------------------------------------------------------------------------- collectives

def all_reduce_tensor(value: Tensor, op: Any = None) -> Tensor:
    """Sum (or ``op``) of ``value`` over ranks, in place; ``value`` itself in a single process.
    ``gloo`` reduces CPU tensors, ``nccl`` CUDA tensors: the tensor is moved as needed."""
    if current() is None:
        return value
    op = dist.ReduceOp.SUM if op is None else op
    needs_cuda = dist.get_backend() == "nccl"
    if needs_cuda != (value.device.type == "cuda"):
        staged = value.to(torch.device("cuda", torch.cuda.current_device()) if needs_cuda else "cpu")
        dist.all_reduce(staged, op=op)
        value.copy_(staged.to(value.device))
    else:
        dist.all_reduce(value, op=op)
    return value


def all_reduce_sums(sums: dict[str, Tensor], count: int) -> tuple[dict[str, Tensor], int]:
    """``(Σ_r sums_r, Σ_r count_r)`` over ranks: the per-rank sums of ``φ(g_k)`` and sample counts.

    All tensors are flattened into one float64 buffer (one collective; float64 so that the
    cross-rank sum adds no rounding beyond the per-rank sums). Every rank must call it with
    the same names and shapes."""
    if current() is None:
        return sums, count
    names = list(sums)
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    flat = torch.cat([sums[name].detach().reshape(-1).to(torch.float64) for name in names]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=device)])
    all_reduce_tensor(flat)
    reduced: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        size = sums[name].numel()
        reduced[name] = flat[offset:offset + size].reshape(sums[name].shape).to(sums[name].dtype)
        offset += size
    return reduced, int(round(float(flat[offset])))


# --------------------------------------------------------------------------- training

class LossModule(nn.Module):
    """``forward(*args) = loss_fn(model, *args)``: the whole training loss, penalty included,
    as one module for :class:`~torch.nn.parallel.DistributedDataParallel` to wrap (rule 2 of
    the module docs). ``model`` is a submodule, so its parameters are the DDP parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, *args: Any) -> Tensor:
        return self._loss_fn(self.model, *args)


def parameters_in_graph(output: Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``output``'s autograd graph accumulates a gradient into."""
    reached: set[int] = set()
    seen: set[int] = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def wrap_for_training(model: nn.Module, loss_fn: Callable[..., Tensor], *,
                      find_unused_parameters: bool = True) -> nn.Module:
    """The module whose ``forward(*args)`` the training loop calls for the loss.

    A single process: ``LossModule(model, loss_fn)`` itself. Distributed: that module
    wrapped in DDP. ``find_unused_parameters=True`` (the default) is needed when some
    parameters may take no part in a step's graph (other tasks' heads of a multi-head
    model); those unused on every rank keep ``grad=None`` as in one process. Pass ``False``
    when every trainable parameter is used at every step: it saves a graph traversal.
    DDP broadcasts rank 0's parameters and buffers when it is built, so every rank starts
    the task from the same weights. Build a new wrapper whenever the set of parameters
    changes (a new head)."""
    module = LossModule(model, loss_fn)
    info = current()
    if info is None:
        return module
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


# --------------------------------------------------------------------------- rank-0 work, errors

@contextlib.contextmanager
def same_on_every_rank() -> Iterator[None]:
    """Mark the exceptions raised inside as raised alike by every rank
    (``exc.same_on_every_rank = True``): config checks, a refused run folder, a diverged
    all-reduced loss. A command line then reports such an error on rank 0 only."""
    try:
        yield
    except Exception as exc:
        try:
            exc.same_on_every_rank = True  # type: ignore[attr-defined]
        except AttributeError:  # an exception type that takes no attributes
            pass
        raise


@contextlib.contextmanager
def process_group_session(device: str | torch.device | None = None) -> Iterator[ProcessInfo | None]:
    """Join ``torchrun``'s process group for a piece of work and leave it afterwards.

    Yields :func:`init_from_environment`'s answer: ``None`` in a plain process (nothing
    happens), else this rank's :class:`ProcessInfo` (backend ``gloo`` on a CPU ``device``,
    ``nccl`` on a GPU). Ranks other than 0 run with Python warnings silenced. The group is
    destroyed on the way out, error or not (unless it existed before: then it is left as it was)."""
    joined_before = dist.is_available() and dist.is_initialized()
    with same_on_every_rank():
        info = init_from_environment(device)
    leave = info is not None and not joined_before
    try:
        with warnings.catch_warnings():
            if info is not None and not info.is_main:
                warnings.simplefilter("ignore")
            yield info
    except BaseException:
        if leave:
            leave_process_group(wait=False)  # the other ranks may never reach a barrier
        raise
    if leave:
        leave_process_group()  # every rank done before any tears the connections down


def run_on_main_process(function: Callable[[], Any]) -> Any:
    """``function()`` on rank 0, its return value (or its exception) sent to every rank.

    A single process: ``function()``. Distributed: rank 0 calls it while the others wait in a
    broadcast; an exception on rank 0 is re-raised on every rank (marked
    :func:`same_on_every_rank` on the others; a :class:`MASCoreError` naming it when it cannot
    be pickled). The return value must be picklable."""
    info = current()
    if info is None:
        return function()
    outcome: list[Any] = [None]
    if info.is_main:
        try:
            outcome[0] = (True, function())
        except Exception as exc:
            try:
                pickle.dumps(exc)
                outcome[0] = (False, exc)
            except Exception:
                outcome[0] = (False, MASCoreError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if succeeded:
        return value
    with same_on_every_rank():
        raise value
