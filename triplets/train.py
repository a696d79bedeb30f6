"""Task-by-task training of the fact embedding, one run folder per experiment.

For every method of the config (finetune, joint, mas, lmas, ewc, si, lwf, …) a fresh
model is built with the same seed and trained on the tasks in order. Per task ``t``::

    reg.before_task(model, TaskInfo(t))
    for epoch, batch (order from a torch.Generator seeded by (seed, t, epoch)):
        loss = slot_loss(model(x), L[f], w[f]) [+ c · InfoNCE] + reg.penalty(model, x)
        step; reg.after_step(model)
    reg.after_task(model, images of task t)      # MAS: Ω on forward() = S‖P‖O, pre-normalisation
    R[t][j] = standard top-5 of tasks j ≤ t      # triplets.evaluate.evaluate_task
    checkpoint (atomic)                          # RUN/<method>/checkpoint.pt

``joint`` is fine-tuning on the union of tasks 0..t at step t (the upper bound).
A killed run continues with ``resume=True`` after its last finished task and gives the
same result as an uninterrupted one; a finished method is skipped.

Run folder::

    RUN/config.yaml  RUN/versions.json  RUN/results.json  RUN/results.md  RUN/plots/*.png
    RUN/<method>/checkpoint.pt  RUN/<method>/model.pt  RUN/<method>/log.txt
    RUN/<method>/result.json    RUN/<method>/index/
    RUN/features/<fingerprint>.h5            # only with model.cache_features

Cached trunk features (``model.cache_features: true``, torchvision backbones only): the
shared trunk is frozen (:meth:`FactEmbeddingNet.freeze_trunk`), its output for every sample
of the fact file is computed once (eval mode, no gradients, ``eval.batch_size`` images at a
time) and written atomically to ``RUN/features/<fingerprint>.h5`` (dataset ``features``,
float32 ``[N, C, h, w]`` in sample-index order, chunked by whole samples; float32 so that
training on the cache gives the same numbers as running the frozen trunk on the images).
The fingerprint (:func:`feature_cache_fingerprint`) hashes the trunk's weights and input
standardisation, the fact file (resolved path, size, modification time, fact vocabulary,
sample count) and the image size, so a stale cache is never read; a matching file is reused
by every method of the run and on ``--resume``. Training, importance (``after_task``) and the
per-task evaluation then run the branches alone (:meth:`FactEmbeddingNet.branch_head`) on
the cached features, so MAS's Ω (and every regularizer's state) covers the branch parameters
only. Importance images from another fact file (``data.importance_data: PATH``) go through
the frozen trunk on the fly. The saved ``model.pt`` is the full network (frozen trunk
included), so :meth:`Run.load_model` and queries work on raw images as before. The cache
holds ``N · C · h · w · 4`` bytes (resnet18 at 32 px: 8 KiB per sample; at 224 px: 392 KiB)
and each task's features are read into memory for training.

Several processes (``torchrun --nproc_per_node=N -m triplets.cli train --config C --out RUN``;
the rules are :mod:`mas_core.distributed`'s): the command joins the process group (gloo on
a CPU, nccl on GPUs, every rank on ``cuda:LOCAL_RANK``) and every rank runs :func:`train_run`
with the same config and seeds. Each global batch is the one-process batch (same
generator-seeded order, whatever N); rank ``r`` trains on its positions ``r, r+N, …`` (in
memory, streamed or cached features alike) through DistributedDataParallel, with the loss
``N/|batch| · Σ ℓ_k`` plus the penalty inside the wrapped forward, so the averaged gradient
is the one-process gradient. The logged loss and the divergence check use the all-reduced
global-batch loss. ``after_task`` runs on the unwrapped model over this rank's share of the
importance samples (:class:`~mas_core.distributed.RankShard`); the estimators sum across
ranks, so Ω (Fisher, Hebbian sums) is the one-process value. Every rank evaluates (no
collective); rank 0 alone writes ``config.yaml``, ``versions.json``, logs, checkpoints,
``model.pt``, results, report, plots, indexes and the feature cache (the others wait for it,
then read it). Checkpoints hold the unwrapped model, so a run checkpointed on N processes
resumes on any number. The run folder (and the fact file) must be on a file system every rank
sees. What differs from one process, beyond the rounding of sums (measured on the tests'
tiny world, 2 processes: the same accuracy matrices and logged losses, weights within 2e-7,
Ω within 5e-7 relative): the InfoNCE term
(``loss.contrastive_weight``) takes its negatives among the facts of the rank's share, not of
the whole batch; BatchNorm (``model.norm: batch``, the torchvision backbones) normalises
with per-rank batch statistics and keeps rank 0's running statistics (``model.norm: group``
has no batch statistics); dropout masks differ (ranks other than 0 draw from their own
seed); LwF's distillation is averaged per rank.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import yaml
from torch import Tensor

from mas_core.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from mas_core.distributed import (
    ProcessInfo,
    RankShard,
    all_reduce_tensor,
    current,
    is_main_process,
    local_device,
    rank_share,
    run_on_main_process,
    same_on_every_rank,
    wrap_for_training,
)
from mas_core.errors import CheckpointMismatchError, DivergenceError

from .config import from_dict, to_dict
from .errors import ConfigError, RunFolderError
from .model import BranchHead, FactEmbeddingNet, ModelConfig, build_model, contrastive_loss, slot_loss, slot_targets

LOCAL_METHODS = ("joint",)  # methods the training loop implements itself (no regularizer of their own)
LABELLED_IMPORTANCE_METHODS = ("ewc",)  # methods whose after_task needs (image, fact) batches and a loss


# ----------------------------------------------------------------------------- configuration
@dataclass
class DataConfig:
    """``data:``. ``fact_file``: the prepared fact HDF5. ``importance_data``: the images a
    method's ``after_task`` estimates importance on: ``"train"`` (the task's training images),
    ``"test"`` (the task's test images, unlabeled: the MAS paper's test-condition adaptation) or
    the path of another fact file (its images of the same task index, all splits).
    ``importance_max_samples`` caps that set (first N in file order). ``in_memory`` loads each
    task's pixels once into RAM (fast for small images); false streams them from the HDF5."""

    fact_file: str = ""
    importance_data: str = "train"
    importance_max_samples: int | None = None
    in_memory: bool = True

    def validate(self) -> None:
        if not self.fact_file:
            raise ValueError("data.fact_file is required: the path of a fact file made by `mas-triplets prepare`")
        if self.importance_max_samples is not None and self.importance_max_samples <= 0:
            raise ValueError("data.importance_max_samples must be positive or null")


@dataclass
class OptimConfig:
    """``optim:`` plain SGD with momentum, a fresh optimizer per task. ``epochs`` per task
    (``first_task_epochs`` overrides it for task 0 when set); ``lr`` learning rate;
    ``weight_decay`` ordinary L2; ``clip_grad_norm`` caps the gradient's L2 norm (null: off)."""

    epochs: int = 5
    first_task_epochs: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None

    def validate(self) -> None:
        if self.epochs <= 0 or (self.first_task_epochs is not None and self.first_task_epochs <= 0):
            raise ValueError("optim.epochs (and optim.first_task_epochs) must be positive")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("optim.lr and optim.batch_size must be positive")
        if not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0:
            raise ValueError("optim.momentum must be in [0, 1) and optim.weight_decay ≥ 0")


@dataclass
class LossConfig:
    """``loss:`` ``squared``: Caffe's ½‖·‖² per slot instead of the plain distance;
    ``contrastive_weight``: weight of the in-batch InfoNCE term (0: off) at ``temperature``;
    ``unit_norm_targets``: scale every language slot to unit norm (see model.slot_targets)."""

    squared: bool = False
    contrastive_weight: float = 0.0
    temperature: float = 0.1
    unit_norm_targets: bool = True

    def validate(self) -> None:
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise ValueError("loss.contrastive_weight must be ≥ 0 and loss.temperature > 0")


@dataclass
class MethodConfig:
    """One entry of ``methods:``: a registered method ``name`` (finetune, joint, mas, lmas,
    ewc, si, lwf, …) with its ``options`` (e.g. ``{lam: 1.0, mode: exact}``) and an optional
    ``label`` naming it in the run folder (to compare two settings of one method)."""

    name: str = "finetune"
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        """The name of this method in the run folder and results: ``label`` or ``name``."""
        return self.label or self.name


@dataclass
class EvalConfig:
    """``eval:`` batch size of the evaluation passes and the kind of FAISS index saved with
    each method (``"none"`` saves no index; ``"ivfpq"``: compressed codes, for sets of
    ≥ 16,384 vectors, smaller ones get a flat index; for millions of vectors past one
    machine's memory see :func:`triplets.index.build_sharded_index`). ``exact_backend``: how
    exact (flat) searches run, see :func:`triplets.index.choose_exact_backend` (``auto``: FAISS
    where the index is on a GPU, else the blocked torch GEMM; ``torch`` or ``faiss`` force one)."""

    batch_size: int = 256
    index: Literal["flat", "ivf", "ivfpq", "hnsw", "none"] = "flat"
    exact_backend: Literal["auto", "torch", "faiss"] = "auto"


@dataclass
class TrainConfig:
    """A training run: the fact data, the model, the optimizer, the loss, the methods compared.

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``. ``num_threads``: CPU
    threads torch may use during the run (null: torch's default; 1 is much faster on a
    machine whose cores are busy with other work). Neither changes what a checkpoint must
    agree on to be resumed."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig("finetune"), MethodConfig("mas")])
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None

    def validate(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be a positive integer or null (torch's default)")
        if not self.methods:
            raise ValueError("methods: list at least one method (e.g. finetune, mas)")
        keys = [method.key for method in self.methods]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"methods: {duplicates} appear twice; give one of them a distinct label")
        for key in keys:
            if not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"methods: {key!r} is not a folder-safe name; use letters, digits, '_' or '-'")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (``--set`` overrides applied) into a validated :class:`TrainConfig`."""
    from .config import load_config

    return load_config(path, TrainConfig, overrides)


def select_methods(config: TrainConfig, names: list[str]) -> TrainConfig:
    """A copy of ``config`` keeping only the methods whose key is in ``names`` (config order)."""
    import difflib

    keys = [method.key for method in config.methods]
    for name in names:
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--methods: {name!r} is not a method of this config{hint} (methods: {', '.join(keys)})")
    return dataclasses.replace(config, methods=[m for m in config.methods if m.key in names])


# ----------------------------------------------------------------------------- helpers
def vocabulary_fingerprint(facts: list[tuple[str, str | None, str | None]]) -> str:
    """SHA-256 (hex) of the fact vocabulary in fact-id order: two fact files agree on what
    fact id ``k`` means exactly when their fingerprints are equal."""
    text = json.dumps([list(fact) for fact in facts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fact_file_fingerprint(fact_file) -> str:
    """:func:`vocabulary_fingerprint` of an opened fact file (what ``model.pt`` stores as ``fact_file_sha``)."""
    return vocabulary_fingerprint(fact_file.facts)


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on (None for one that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, distributions in (("torch", ["torch"]), ("torchvision", ["torchvision"]),
                                ("transformers", ["transformers"]), ("faiss", ["faiss-cpu", "faiss-gpu", "faiss"]),
                                ("numpy", ["numpy"]), ("h5py", ["h5py"]), ("mas-triplets", ["mas-triplets"])):
        found[name] = None
        for dist in distributions:
            try:
                found[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return found


def _derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=auto or cpu")
    return torch.device(name)


def _open_fact_file(path: str | Path):
    from data_prep.facts_h5 import open_facts

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.fact_file: no file {path}; make one with `mas-triplets prepare` (or synth + prepare)")
    return open_facts(path)


def _check_fact_file(fact_file) -> None:
    if fact_file.fact_embeddings is None:
        raise ConfigError(f"{fact_file.path} has no cached fact embeddings; run `mas-triplets prepare` with an encoder")
    if not fact_file.has_pixels:
        raise ConfigError(f"{fact_file.path} holds no image pixels; prepare it with an image size (e.g. --image-size 32)")


class _Samples:
    """Images and fact ids of a set of samples of the fact file.

    In memory: uint8 ``[n, 3, S, S]`` tensors (converted to float in ``[0, 1]`` per batch).
    Streamed: a ConcatDataset of ``fact_file.dataset(task, split)`` parts read by a DataLoader.
    """

    def __init__(self, fact_file, parts: list[tuple[int, int | None]], *, in_memory: bool,
                 max_samples: int | None = None):
        indices = [fact_file.sample_indices(task=task, split=split) for task, split in parts]
        self.indices = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        if max_samples is not None:
            self.indices = self.indices[:max_samples]
        self.fact_ids = torch.as_tensor(np.asarray(fact_file.sample_fact)[self.indices], dtype=torch.long)
        self.in_memory = in_memory
        self.pixels: Tensor | None = None
        self.dataset = None
        if in_memory:
            if len(self.indices):
                array = np.asarray(fact_file.pixels(self.indices))
                self.pixels = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        else:
            from torch.utils.data import ConcatDataset, Subset

            datasets = [fact_file.dataset(task, one_split) for task, split in parts
                        for one_split in ((split,) if split is not None else (0, 1))]
            self.dataset = ConcatDataset(datasets)
            if max_samples is not None:
                self.dataset = Subset(self.dataset, range(min(max_samples, len(self.dataset))))

    def __len__(self) -> int:
        return int(len(self.indices))

    def batches(self, batch_size: int, generator: torch.Generator | None = None, *,
                with_labels: bool = True) -> Iterator[Any]:
        """Yield ``(images float [b,3,S,S], fact_ids [b])`` (or images alone), shuffled by
        ``generator`` when one is given, in file order otherwise."""
        n = len(self)
        if self.in_memory:
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            for start in range(0, n, batch_size):
                chosen = order[start:start + batch_size]
                images = self.pixels[chosen].float().div_(255.0)
                yield (images, self.fact_ids[chosen]) if with_labels else images
        else:
            from torch.utils.data import DataLoader, RandomSampler

            sampler = RandomSampler(self.dataset, generator=generator) if generator is not None else None
            for images, fact_ids in DataLoader(self.dataset, batch_size=batch_size, sampler=sampler):
                yield (images, fact_ids) if with_labels else images

    def shared_batches(self, batch_size: int, generator: torch.Generator,
                       info: ProcessInfo | None = None) -> Iterator[tuple[Tensor, Tensor, float]]:
        """Several processes: this rank's share of every global batch, ``(images, fact_ids, weight)``.

        The global batches are those :meth:`batches` yields for the same ``generator`` (the
        same permutation, cut into ``batch_size`` pieces); each is split by
        :func:`mas_core.distributed.rank_share`, whose ``weight`` (``N / |global batch|``, or 0
        for a padded empty share) multiplies this rank's summed per-sample loss."""
        n = len(self)
        if self.in_memory:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                chosen, weight = rank_share(order[start:start + batch_size], info)
                yield self.pixels[chosen].float().div_(255.0), self.fact_ids[chosen], weight
        else:
            from torch.utils.data import DataLoader, RandomSampler

            order = torch.as_tensor(list(RandomSampler(self.dataset, generator=generator)), dtype=torch.long)
            shares = [rank_share(order[start:start + batch_size], info) for start in range(0, n, batch_size)]
            loader = DataLoader(self.dataset, batch_sampler=[chosen.tolist() for chosen, _ in shares])
            for (images, fact_ids), (_, weight) in zip(loader, shares):
                yield images, fact_ids, weight

    def batches_at(self, positions: list[int], batch_size: int, *, with_labels: bool = True) -> Iterator[Any]:
        """Like ``batches(batch_size)`` (file order, no shuffling) over the samples at ``positions``
        only (positions in this set, increasing): one rank's share of an importance pass."""
        if self.in_memory:
            chosen_all = torch.as_tensor(positions, dtype=torch.long)
            for start in range(0, len(chosen_all), batch_size):
                chosen = chosen_all[start:start + batch_size]
                images = self.pixels[chosen].float().div_(255.0)
                yield (images, self.fact_ids[chosen]) if with_labels else images
        else:
            from torch.utils.data import DataLoader, Subset

            for images, fact_ids in DataLoader(Subset(self.dataset, list(positions)), batch_size=batch_size):
                yield (images, fact_ids) if with_labels else images


class _Reiterable:
    """A data source that can be iterated several times (regularizers may loop over it twice)."""

    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return iter(self._make())


# ----------------------------------------------------------------------------- cached trunk features
FEATURE_CACHE_DIR = "features"
FEATURE_DATASET = "features"


def trunk_fingerprint(model: FactEmbeddingNet) -> str:
    """SHA-256 (hex) of the trunk's state (every parameter and buffer: name, dtype, shape,
    bytes) and of the input standardisation: equal exactly when the trunk computes the same
    function of the images."""
    digest = hashlib.sha256()
    tensors = [(f"trunk.{name}", value) for name, value in sorted(model.trunk.state_dict().items())]
    tensors += [("input_mean", model.input_mean), ("input_std", model.input_std)]
    for name, value in tensors:
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}:".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def feature_cache_fingerprint(model: FactEmbeddingNet, fact_file) -> str:
    """The key of a feature cache: SHA-256 (hex) of :func:`trunk_fingerprint`, the fact
    file's resolved path, byte size and modification time (ns), its fact vocabulary, sample
    count and image size, and the stored dtype. Any change of the trunk or of the fact file
    gives another key (a merely touched file is recomputed, never a stale one read)."""
    path = Path(fact_file.path).resolve()
    stat = path.stat()
    parts = {
        "trunk": trunk_fingerprint(model), "fact_file": str(path), "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns, "vocabulary": fact_file_fingerprint(fact_file),
        "num_samples": int(fact_file.num_samples), "image_size": int(fact_file.image_size), "dtype": "float32",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def feature_cache_path(run_dir: str | Path, fingerprint: str) -> Path:
    """``RUN/features/<fingerprint>.h5``."""
    return Path(run_dir) / FEATURE_CACHE_DIR / f"{fingerprint}.h5"


def write_feature_cache(path: str | Path, model: FactEmbeddingNet, fact_file, *, fingerprint: str,
                        batch_size: int = 256, device: str | torch.device = "cpu") -> Path:
    """Compute ``model.trunk_features`` of every sample of ``fact_file`` (in sample-index
    order, ``batch_size`` images at a time, eval mode, no gradients) and write them as the
    float32 dataset ``features`` ``[N, C, h, w]`` of the HDF5 file ``path``, atomically
    (a temporary file in the same folder, then a rename). Returns ``path``."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_samples = int(fact_file.num_samples)
    if num_samples == 0:
        raise ConfigError(f"{fact_file.path} holds no samples; nothing to cache")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    was_training = model.training
    model.eval()
    try:
        with h5py.File(temporary, "w") as handle, torch.no_grad():
            dataset = None
            for start in range(0, num_samples, batch_size):
                indices = np.arange(start, min(num_samples, start + batch_size))
                pixels = torch.from_numpy(np.asarray(fact_file.pixels(indices))).permute(0, 3, 1, 2).contiguous()
                features = model.trunk_features(pixels.to(device)).float().cpu().numpy()
                if dataset is None:
                    per_sample = int(np.prod(features.shape[1:])) * 4
                    rows = max(1, min(num_samples, (1 << 20) // per_sample))  # chunks of about 1 MiB, whole samples
                    dataset = handle.create_dataset(FEATURE_DATASET, shape=(num_samples, *features.shape[1:]),
                                                    dtype="float32", chunks=(rows, *features.shape[1:]))
                dataset[start:start + len(indices)] = features
            handle.attrs["fingerprint"] = fingerprint
            handle.attrs["fact_file"] = str(Path(fact_file.path).resolve())
            handle.attrs["image_size"] = int(fact_file.image_size)
        os.replace(temporary, path)
    finally:
        model.train(was_training)
        if temporary.exists():
            temporary.unlink()
    return path


def ensure_feature_cache(run_dir: str | Path, model: FactEmbeddingNet, fact_file, *, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> Path:
    """The feature cache of ``model``'s trunk on ``fact_file`` in ``run_dir``: reused when
    ``RUN/features/<fingerprint>.h5`` exists and agrees (fingerprint attribute, sample
    count), computed by :func:`write_feature_cache` otherwise."""
    import h5py

    fingerprint = feature_cache_fingerprint(model, fact_file)
    path = feature_cache_path(run_dir, fingerprint)
    if path.is_file():
        try:
            with h5py.File(path, "r") as handle:
                if (handle.attrs.get("fingerprint") == fingerprint
                        and handle[FEATURE_DATASET].shape[0] == int(fact_file.num_samples)):
                    return path
        except (OSError, KeyError):
            pass  # unreadable or foreign: recomputed below
    return write_feature_cache(path, model, fact_file, fingerprint=fingerprint, batch_size=batch_size, device=device)


class _FeatureSamples:
    """Cached trunk features and fact ids of a set of samples (same ``batches`` API and
    shuffling as the in-memory :class:`_Samples`, so a cached run sees the same batches)."""

    def __init__(self, features_path: Path, fact_file, parts: list[tuple[int, int | None]], *,
                 max_samples: int | None = None):
        import h5py

        indices = [fact_file.sample_indices(task=task, split=split) for task, split in parts]
        self.indices = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        if max_samples is not None:
            self.indices = self.indices[:max_samples]
        self.fact_ids = torch.as_tensor(np.asarray(fact_file.sample_fact)[self.indices], dtype=torch.long)
        self.features: Tensor | None = None
        if len(self.indices):
            unique, inverse = np.unique(self.indices, return_inverse=True)  # h5py wants increasing indices
            with h5py.File(features_path, "r") as handle:
                stored = np.asarray(handle[FEATURE_DATASET][unique])
            self.features = torch.from_numpy(stored[inverse])

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, *,
                with_labels: bool = True) -> Iterator[Any]:
        """Yield ``(features float32 [b, C, h, w], fact_ids [b])`` (or features alone), shuffled
        by ``generator`` when one is given, in file order otherwise."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            chosen = order[start:start + batch_size]
            yield (self.features[chosen], self.fact_ids[chosen]) if with_labels else self.features[chosen]

    def shared_batches(self, batch_size: int, generator: torch.Generator,
                       info: ProcessInfo | None = None) -> Iterator[tuple[Tensor, Tensor, float]]:
        """This rank's share of every global batch (see :meth:`_Samples.shared_batches`)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), batch_size):
            chosen, weight = rank_share(order[start:start + batch_size], info)
            yield self.features[chosen], self.fact_ids[chosen], weight

    def batches_at(self, positions: list[int], batch_size: int, *, with_labels: bool = True) -> Iterator[Any]:
        """The features (and fact ids) of the samples at ``positions``, ``batch_size`` at a time."""
        chosen_all = torch.as_tensor(positions, dtype=torch.long)
        for start in range(0, len(chosen_all), batch_size):
            chosen = chosen_all[start:start + batch_size]
            yield (self.features[chosen], self.fact_ids[chosen]) if with_labels else self.features[chosen]


def _cached_embeddings(head: BranchHead, samples: _FeatureSamples, device: torch.device,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings of cached features, as ``evaluate.embed_images`` computes them."""
    import torch.nn.functional as F

    was_training = head.training
    head.eval()
    vectors = []
    try:
        with torch.no_grad():
            for features in samples.batches(batch_size, with_labels=False):
                output = head.embed(features.to(device))
                vectors.append(F.normalize(output.float(), dim=1).cpu().numpy())
    finally:
        head.train(was_training)
    return np.concatenate(vectors).astype(np.float32), samples.fact_ids.numpy().astype(np.int64)


# ----------------------------------------------------------------------------- the run
@dataclass
class _Context:
    config: TrainConfig
    fact_file: Any
    device: torch.device
    targets: Tensor  # [F, 3d] regression targets, on device
    masks: Tensor  # [F, 3] slot masks, on device
    slot_dim: int
    image_size: int
    fingerprint: str
    progress: bool
    run_dir: Path | None = None
    cache: dict = field(default_factory=dict)

    def samples(self, key: tuple, parts: list[tuple[int, int | None]], max_samples: int | None = None,
                features: Path | None = None) -> _Samples | _FeatureSamples:
        """Images (``features`` None) or cached trunk features of the samples of ``parts``."""
        if features is not None:
            key = ("features", str(features)) + key
            if key not in self.cache:
                self.cache[key] = _FeatureSamples(features, self.fact_file, parts, max_samples=max_samples)
        elif key not in self.cache:
            self.cache[key] = _Samples(self.fact_file, parts, in_memory=self.config.data.in_memory,
                                       max_samples=max_samples)
        return self.cache[key]


def _method_state_config(config: TrainConfig, method: MethodConfig) -> dict[str, Any]:
    """What a method's checkpoint must agree on to be resumed: everything that changes its
    numbers (data, model, optimizer, loss, seed, the method itself), not device or evaluation."""
    plain = to_dict(config)
    model = {key: value for key, value in plain["model"].items()  # checkpoints from before these keys still match
             if not (key in ("freeze_trunk", "cache_features") and value is False)}
    return {"data": plain["data"], "model": model, "optim": plain["optim"], "loss": plain["loss"],
            "seed": plain["seed"], "method": to_dict(method)}


def _make_regularizer(method: MethodConfig, ctx: _Context | None):
    """The mas_core regularizer of ``method`` (Finetune for ``joint``)."""
    from mas_core.regularizers import make_regularizer

    if method.name in LOCAL_METHODS:
        if method.options:
            raise ConfigError(f"method {method.key!r}: joint takes no options, got {sorted(method.options)}")
        return make_regularizer("finetune")
    from mas_core.regularizers import method_options

    options = dict(method.options)
    if method.name in LABELLED_IMPORTANCE_METHODS:
        if "loss_fn" not in method_options(method.name):
            raise ConfigError(f"method {method.key!r}: this mas_core's {method.name} takes no loss_fn, so it cannot "
                              "be applied to the regression loss of the fact embedding; drop it from methods")
    if method.name in LABELLED_IMPORTANCE_METHODS and ctx is not None:
        targets, masks, squared = ctx.targets, ctx.masks, ctx.config.loss.squared

        def per_sample_slot_loss(model, batch):
            images, fact_ids = batch[0], batch[1]
            fact_ids = fact_ids.to(targets.device)
            return slot_loss(model(images), targets[fact_ids], masks[fact_ids], squared=squared, reduction="none")

        options.setdefault("loss_fn", per_sample_slot_loss)
    return make_regularizer(method.name, **options)


def _task_epochs(config: TrainConfig, task: int) -> int:
    if task == 0 and config.optim.first_task_epochs is not None:
        return config.optim.first_task_epochs
    return config.optim.epochs


def _importance_source(ctx: _Context, method: MethodConfig, task: int, features: Path | None = None,
                       model: FactEmbeddingNet | None = None):
    """The data handed to ``after_task``: images only (MAS, l-MAS, SI, LwF …) or
    ``(image, fact)`` batches for methods that need a loss (EWC). With a feature cache
    (``features``), the cached trunk features instead of the images; images of another fact
    file then go through ``model``'s frozen trunk on the fly.

    Several processes: a :class:`mas_core.distributed.RankShard` over the same samples, whose
    batches hold this rank's positions ``r, r+N, …`` only (same batch layout); the
    estimators all-reduce their sums and counts, so every rank gets the one-process estimate."""
    data = ctx.config.data
    batch_size = ctx.config.eval.batch_size
    limit = data.importance_max_samples
    if method.name in LABELLED_IMPORTANCE_METHODS:
        samples = ctx.samples(("train", task, limit), [(task, 0)], limit, features)
        if current() is not None:
            return RankShard(lambda positions: ((x.to(ctx.device), y.to(ctx.device))
                                                for x, y in samples.batches_at(positions, batch_size)), len(samples))
        return _Reiterable(lambda: ((x.to(ctx.device), y.to(ctx.device)) for x, y in samples.batches(batch_size)))
    if data.importance_data in ("train", "test"):
        split = 0 if data.importance_data == "train" else 1
        samples = ctx.samples((data.importance_data, task, limit), [(task, split)], limit, features)
    else:
        key = ("external", task, limit)
        if key not in ctx.cache:
            other = _open_fact_file(data.importance_data)
            if other.num_tasks <= task or not other.has_pixels or other.image_size != ctx.image_size:
                raise ConfigError(
                    f"data.importance_data: {data.importance_data} must hold pixels of size {ctx.image_size} "
                    f"for task {task}; it has {other.num_tasks} tasks, image size {other.image_size}")
            ctx.cache[key] = _Samples(other, [(task, None)], in_memory=data.in_memory, max_samples=limit)
        samples = ctx.cache[key]
    if len(samples) == 0:
        raise ConfigError(f"data.importance_data={data.importance_data!r} has no images for task {task}")
    if current() is not None:
        def shard_batches(positions: list[int]) -> Iterator[Tensor]:
            for x in samples.batches_at(positions, batch_size, with_labels=False):
                if features is not None and isinstance(samples, _Samples):
                    assert model is not None
                    with torch.no_grad():
                        yield model.trunk_features(x.to(ctx.device))
                else:
                    yield x.to(ctx.device)

        return RankShard(shard_batches, len(samples))
    if features is not None and isinstance(samples, _Samples):
        assert model is not None

        def through_trunk():
            with torch.no_grad():
                for x in samples.batches(batch_size, with_labels=False):
                    yield model.trunk_features(x.to(ctx.device))

        return _Reiterable(through_trunk)
    return _Reiterable(lambda: (x.to(ctx.device) for x in samples.batches(batch_size, with_labels=False)))


def _evaluate_top5(model: FactEmbeddingNet, ctx: _Context, task: int, features: Path | None = None) -> float:
    from .evaluate import evaluate_embeddings, evaluate_task

    if features is not None:
        samples = ctx.samples(("test", task, None), [(task, 1)], None, features)
        vectors, fact_ids = _cached_embeddings(model.branch_head(), samples, ctx.device, ctx.config.eval.batch_size)
        return float(evaluate_embeddings(vectors, fact_ids, ctx.fact_file, task, mode="standard")["top5"])
    metrics = evaluate_task(model, ctx.fact_file, task, mode="standard", split="test", device=str(ctx.device),
                            batch_size=ctx.config.eval.batch_size)
    return float(metrics["top5"])


def _final_metrics(model: FactEmbeddingNet, ctx: _Context, features: Path | None = None) -> dict[str, Any]:
    from .evaluate import MODES, evaluate_embeddings, final_metrics

    if features is None:
        return final_metrics(model, ctx.fact_file, split="test", device=str(ctx.device),
                             batch_size=ctx.config.eval.batch_size)
    final: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    head = model.branch_head()
    for task in range(int(ctx.fact_file.num_tasks)):
        samples = ctx.samples(("test", task, None), [(task, 1)], None, features)
        vectors, fact_ids = _cached_embeddings(head, samples, ctx.device, ctx.config.eval.batch_size)
        for mode in MODES:
            final[mode].append(evaluate_embeddings(vectors, fact_ids, ctx.fact_file, task, mode=mode))
    return final


def _train_method(ctx: _Context, method: MethodConfig, method_dir: Path) -> dict[str, Any]:
    """Train one method over all tasks (resuming from its checkpoint if there is one).

    Several processes (see the module docs): every rank builds the same model, trains on its
    share of every global batch through DistributedDataParallel, evaluates (every rank, no
    collective) and only rank 0 writes ``log.txt``, the checkpoints and ``result.json``."""
    from mas_core.metrics import average_accuracy, average_forgetting, backward_transfer
    from mas_core.regularizers.base import TaskInfo

    config, device = ctx.config, ctx.device
    info = current()
    main = info is None or info.is_main
    num_tasks = ctx.fact_file.num_tasks
    state_config = _method_state_config(config, method)
    result_path = method_dir / "result.json"
    checkpoint_path = method_dir / "checkpoint.pt"
    log_path = method_dir / "log.txt"
    if main:
        method_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_model(config.model, ctx.slot_dim, ctx.image_size).to(device)
    features: Path | None = None
    trained: FactEmbeddingNet | BranchHead = model  # what the optimizer and the regularizer see
    if config.model.cache_features:
        if ctx.run_dir is None:
            raise ConfigError("model.cache_features needs a run folder to keep the features in")
        features = _shared_feature_cache(ctx, model)
        trained = model.branch_head()
    reg = _make_regularizer(method, ctx)
    accuracy_matrix: list[list[float | None]] = []
    start_task, wall_time = 0, 0.0
    log_lines: list[str] = []
    with same_on_every_rank():  # every rank reads the same files (written before this run)
        if checkpoint_path.exists():
            # the unwrapped model's state (no DDP "module." prefix): any number of processes resumes it
            state = load_checkpoint(checkpoint_path, expected_config=state_config, map_location=device)
            model.load_state_dict(state["model"])
            reg.load_state_dict(state["regularizer"])
            accuracy_matrix = [list(row) for row in state["accuracy_matrix"]]
            start_task, wall_time = int(state["finished_tasks"]), float(state["wall_time_s"])
            log_lines = list(state.get("log", []))
            if result_path.exists() and start_task == num_tasks:
                return json.loads(result_path.read_text(encoding="utf-8"))
        elif result_path.exists():
            raise RunFolderError(f"{method_dir} has a result but no checkpoint; delete the folder to retrain "
                                 f"{method.key}")

    from tqdm.auto import tqdm

    show = ctx.progress and main and sys.stderr.isatty()
    lam = method.options.get("lam", method.options.get("lambda"))
    for task in range(start_task, num_tasks):
        started = time.perf_counter()
        torch.manual_seed(_derived_seed(config.seed, "task", task))  # dropout etc.: same stream on resume
        if not main:  # other ranks draw other dropout masks (rank 0 keeps the one-process stream)
            torch.manual_seed(_derived_seed(config.seed, "task", task, "rank", info.rank))
        parts = [(t, 0) for t in range(task + 1)] if method.name == "joint" else [(task, 0)]
        train = ctx.samples(("train-parts", tuple(parts)), parts, None, features)
        if len(train) == 0:
            raise ConfigError(f"task {task} has no training samples in {ctx.fact_file.path}")
        model.train()
        trained.train()
        reg.before_task(trained, TaskInfo(index=task, num_samples=len(train)))
        # several processes: DDP over the whole loss (penalty included), built anew for every task
        wrapper = None if info is None else wrap_for_training(trained, _rank_loss(ctx, reg), find_unused_parameters=False)
        optimizer = torch.optim.SGD(trained.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay)
        epochs = _task_epochs(config, task)
        steps_per_epoch = math.ceil(len(train) / config.optim.batch_size)
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{method.key} task {task + 1}/{num_tasks}",
                   disable=not show, leave=False)
        loss_sum, loss_count = 0.0, 0
        for epoch in range(epochs):
            generator = torch.Generator().manual_seed(_derived_seed(config.seed, task, epoch))
            if wrapper is None:
                batches = ((images, fact_ids, None) for images, fact_ids
                           in train.batches(config.optim.batch_size, generator))
            else:
                batches = train.shared_batches(config.optim.batch_size, generator, info)
            for images, fact_ids, weight in batches:
                images, fact_ids = images.to(device), fact_ids.to(device)
                if wrapper is None:
                    embedding = trained(images)  # images, or cached trunk features
                    loss = slot_loss(embedding, ctx.targets[fact_ids], ctx.masks[fact_ids],
                                     squared=config.loss.squared)
                    if config.loss.contrastive_weight > 0:
                        loss = loss + config.loss.contrastive_weight * contrastive_loss(
                            embedding, fact_ids, ctx.targets, temperature=config.loss.temperature)
                    loss = loss + reg.penalty(trained, images)
                    value = loss.detach()
                else:
                    loss = wrapper(images, fact_ids, weight)
                    # the global-batch loss (mean of the ranks' losses), the same on every rank, so that
                    # every rank takes the same divergence decision (none waits in a collective alone)
                    value = all_reduce_tensor(loss.detach().reshape(1).clone())[0] / info.world_size
                if not torch.isfinite(value):
                    with same_on_every_rank():  # the all-reduced value: every rank stops here
                        raise DivergenceError(
                            f"method {method.key}, task {task}, epoch {epoch}: the loss became {value.item()}; "
                            f"lower optim.lr (now {config.optim.lr}) or the method's lam (now {lam})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optim.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained.parameters(), config.optim.clip_grad_norm)
                optimizer.step()
                reg.after_step(trained)
                loss_sum += float(value)
                loss_count += 1
                bar.update(1)
        bar.close()
        del wrapper
        broken = next((name for name, value in model.state_dict().items()
                       if value.is_floating_point() and not torch.isfinite(value).all()), None)
        if broken is not None:
            with same_on_every_rank():  # the ranks hold the same weights
                raise DivergenceError(
                    f"method {method.key}, task {task}: {broken} holds NaN/Inf after training; "
                    f"lower optim.lr (now {config.optim.lr}) or the method's lam (now {lam})")
        model.eval()
        trained.eval()
        # the unwrapped module: estimators reduce |g_k| statistics across ranks themselves
        reg.after_task(trained, _importance_source(ctx, method, task, features, model))
        model.eval()
        trained.eval()
        # evaluation runs on every rank (identical weights, no collective); rank 0 writes it
        row: list[float | None] = [_evaluate_top5(model, ctx, j, features) for j in range(task + 1)]
        row += [None] * (num_tasks - task - 1)
        accuracy_matrix.append(row)
        seconds = time.perf_counter() - started
        wall_time += seconds
        line = (f"[{method.key}] task {task + 1}/{num_tasks}: {len(train)} samples × {epochs} epochs, "
                f"mean loss {loss_sum / max(loss_count, 1):.4f}, standard top-5 on tasks 1..{task + 1}: "
                + " ".join(f"{value:.3f}" for value in row[:task + 1]) + f" ({seconds:.1f} s)")
        log_lines.append(line)
        if not main:
            continue
        atomic_write_text(log_path, "\n".join(log_lines) + "\n")
        if ctx.progress:
            print(line, file=sys.stderr if show else sys.stdout, flush=True)
        save_checkpoint(checkpoint_path, {
            "config": state_config, "finished_tasks": task + 1, "model": model.state_dict(),
            "regularizer": reg.state_dict(), "accuracy_matrix": accuracy_matrix, "wall_time_s": wall_time,
            "log": log_lines, "rng": torch.get_rng_state(),
        })

    model.eval()
    if main:
        save_checkpoint(method_dir / "model.pt", {
            "model": model.state_dict(), "model_config": to_dict(config.model), "slot_dim": ctx.slot_dim,
            "image_size": ctx.image_size, "encoder_name": ctx.fact_file.encoder_name, "fact_file_sha": ctx.fingerprint,
        })
    result = {
        "accuracy_matrix": accuracy_matrix,
        "avg_top5": average_accuracy(accuracy_matrix),
        "forgetting": average_forgetting(accuracy_matrix),
        "bwt": backward_transfer(accuracy_matrix),
        "final": _final_metrics(model, ctx, features),
        "wall_time_s": wall_time,
    }
    if main:
        atomic_write_json(result_path, result)
    return result


def _rank_loss(ctx: _Context, reg: Any):
    """``loss_fn(model, images, fact_ids, weight)`` of one rank's share of a global batch (the
    forward of :func:`mas_core.distributed.wrap_for_training`): ``weight · Σ_k ℓ_k`` over the
    share (``ℓ_k`` the per-sample slot loss, ``weight = N / |global batch|``) plus ``c · weight
    · |share| · InfoNCE(share)`` plus the regularizer's penalty. DDP's average over the ranks
    is then the one-process loss: the slot-loss mean over the global batch, the penalty (the
    same on every rank) once, and the InfoNCE term as the sample-weighted mean of per-rank
    terms whose negatives are the facts of the rank's share (a difference from one process,
    whose negatives are the facts of the whole global batch)."""
    loss_config = ctx.config.loss

    def loss_fn(model: torch.nn.Module, images: Tensor, fact_ids: Tensor, weight: float) -> Tensor:
        embedding = model(images)
        per_sample = slot_loss(embedding, ctx.targets[fact_ids], ctx.masks[fact_ids], squared=loss_config.squared,
                               reduction="none")
        loss = weight * per_sample.sum()
        if loss_config.contrastive_weight > 0:
            loss = loss + (loss_config.contrastive_weight * weight * images.shape[0]) * contrastive_loss(
                embedding, fact_ids, ctx.targets, temperature=loss_config.temperature)
        return loss + reg.penalty(model, images)

    return loss_fn


def _shared_feature_cache(ctx: _Context, model: FactEmbeddingNet) -> Path:
    """:func:`ensure_feature_cache` written by rank 0 alone; the other ranks wait for it (in
    :func:`mas_core.distributed.run_on_main_process`) and then only check that rank 0's file is the one they expect."""
    assert ctx.run_dir is not None
    batch_size = ctx.config.eval.batch_size
    if current() is None:
        return ensure_feature_cache(ctx.run_dir, model, ctx.fact_file, batch_size=batch_size, device=ctx.device)
    written = run_on_main_process(lambda: ensure_feature_cache(ctx.run_dir, model, ctx.fact_file,
                                                               batch_size=batch_size, device=ctx.device))
    path = feature_cache_path(ctx.run_dir, feature_cache_fingerprint(model, ctx.fact_file))
    if Path(written) != path or not path.is_file():
        raise RunFolderError(f"this rank cannot read the feature cache {written} that rank 0 wrote; the run "
                             "folder must be on a file system every process sees, with the same model on every rank")
    return path


def _prepare_folder(config: TrainConfig, out_dir: Path, resume: bool) -> TrainConfig:
    """Create or check the run folder; return the config whose methods are recorded there."""
    config_path = out_dir / "config.yaml"
    if config_path.exists():
        if not resume:
            raise RunFolderError(f"{out_dir} already holds a run; pass --resume to continue it or choose a new --out")
        try:
            saved = from_dict(TrainConfig, yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
        except ConfigError as exc:
            raise RunFolderError(f"{config_path} is not a readable run config ({exc}); use a new --out") from None
        for section in ("data", "model", "optim", "loss", "seed"):
            if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
                raise CheckpointMismatchError(
                    f"{out_dir} was trained with another {section!r} section; resume with the original config "
                    "or use a new --out")
        methods = list(saved.methods) + [m for m in config.methods if m.key not in {s.key for s in saved.methods}]
        for method in config.methods:
            old = next(s for s in methods if s.key == method.key)
            if to_dict(old) != to_dict(method):
                raise CheckpointMismatchError(
                    f"method {method.key!r} in {out_dir} was trained with options {old.options}; "
                    "resume with the original config or give the new setting another label")
        recorded = dataclasses.replace(config, methods=methods)
    else:
        if out_dir.exists() and any(out_dir.iterdir()) and not resume:
            raise RunFolderError(f"{out_dir} exists and is not empty; choose a new --out (nothing was overwritten)")
        recorded = config
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, yaml.safe_dump(to_dict(recorded), sort_keys=False))
    atomic_write_json(out_dir / "versions.json", package_versions())
    return recorded


def train_run(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train every method of ``config`` task by task into the run folder ``out_dir``; return
    the results dictionary also written to ``RUN/results.json`` (schema in the module docs of
    :mod:`triplets.evaluate`: per method the accuracy matrix R, ``avg_top5``, ``forgetting``,
    ``bwt``, ``final`` metrics and ``wall_time_s``; accuracies are fractions in [0, 1]).

    Under ``torchrun`` (a process group joined beforehand, as ``mas-triplets train`` does with
    :func:`mas_core.distributed.init_from_environment`) every rank calls it with the same
    arguments; rank 0 writes the run folder and the others return the same dictionary
    without writing anything (see the module docs)."""
    with same_on_every_rank():  # the checks before training fail alike on every rank
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, fact_file=str(Path(config.data.fact_file).expanduser().resolve())))
        config.validate()
        out_dir = Path(out_dir)
        fact_file = _open_fact_file(config.data.fact_file)
    threads_before = torch.get_num_threads()
    if config.num_threads is not None:  # CPU threads for this run only; restored below
        torch.set_num_threads(config.num_threads)
    try:
        with same_on_every_rank():
            _check_fact_file(fact_file)
            embeddings = torch.as_tensor(np.asarray(fact_file.fact_embeddings), dtype=torch.float32)
            slot_dim = embeddings.shape[1] // 3
            device = local_device(resolve_device(config.device))  # several GPUs: cuda:LOCAL_RANK
            _check_one_gpu_per_process(config.device, device)
            ctx = _Context(
                config=config, fact_file=fact_file, device=device,
                targets=slot_targets(embeddings, unit_norm=config.loss.unit_norm_targets).to(device),
                masks=torch.as_tensor(np.asarray(fact_file.slot_masks), dtype=torch.float32).to(device),
                slot_dim=slot_dim, image_size=int(fact_file.image_size),
                fingerprint=fact_file_fingerprint(fact_file), progress=progress, run_dir=out_dir,
            )
            build_model(config.model, slot_dim, ctx.image_size)  # fail fast on a bad model config
            for method in config.methods:
                _make_regularizer(method, None)  # fail fast on an unknown method or bad options
        # rank 0 creates or checks the folder; its answer (or its error) reaches every rank
        recorded = run_on_main_process(lambda: _prepare_folder(config, out_dir, resume))
        finished: dict[str, Any] = {}
        for method in config.methods:
            finished[method.key] = _train_method(ctx, method, out_dir / method.key)
        if not is_main_process():  # rank 0 alone writes results, report, plots and indexes
            return _results_dict(out_dir, recorded, fact_file, json.loads(json.dumps(finished)))
        results = collect_results(out_dir, recorded, fact_file)
        _write_index(out_dir, recorded, ctx)
        return results
    finally:
        torch.set_num_threads(threads_before)
        fact_file.close()


def _check_one_gpu_per_process(name: str, device: torch.device) -> None:
    """Under torchrun, refuse a device naming one GPU (``cuda:1``) for several processes of one
    machine: each process must take its own ``cuda:LOCAL_RANK`` (``device: auto`` or ``cuda``)."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if current() is not None and device.type == "cuda" and name not in ("auto", "cuda") and processes_here > 1:
        raise ConfigError(f"device {name!r} names one GPU for the {processes_here} processes on this machine; "
                          "under torchrun use device=auto or device=cuda (each process takes cuda:LOCAL_RANK)")


def collect_results(out_dir: Path, config: TrainConfig, fact_file) -> dict:
    """Gather every finished method's ``result.json`` into ``RUN/results.json`` and write the
    Markdown table and plots (:func:`triplets.report.write_report`)."""
    results = _results_dict(out_dir, config, fact_file)
    atomic_write_json(out_dir / "results.json", results)
    from .report import write_report

    write_report(results, out_dir)
    return results


def _results_dict(out_dir: Path, config: TrainConfig, fact_file, known: dict[str, Any] | None = None) -> dict:
    """The contents of ``RUN/results.json``: the methods' results (``known`` ones as given, the
    others from their ``result.json``), the tasks' sizes and the config."""
    known = known or {}
    methods: dict[str, Any] = {}
    for method in config.methods:
        path = out_dir / method.key / "result.json"
        if method.key in known:
            methods[method.key] = known[method.key]
        elif path.exists():
            methods[method.key] = json.loads(path.read_text(encoding="utf-8"))
    tasks = []
    for task in range(fact_file.num_tasks):
        tasks.append({
            "index": task,
            "num_facts": int(len(fact_file.facts_of_task(task))),
            "num_train": int(len(fact_file.sample_indices(task=task, split=0))),
            "num_test": int(len(fact_file.sample_indices(task=task, split=1))),
        })
    return {"methods": methods, "tasks": tasks, "config": to_dict(config)}


def _write_index(out_dir: Path, config: TrainConfig, ctx: _Context) -> None:
    """Save the FAISS indexes of every finished method (see :func:`build_run_indexes`)."""
    if config.eval.index == "none":
        return
    for method in config.methods:
        model_path = out_dir / method.key / "model.pt"
        if not model_path.exists():
            continue
        state = load_checkpoint(model_path, map_location="cpu")
        model = build_model(config.model, ctx.slot_dim, ctx.image_size)
        model.load_state_dict(state["model"])
        build_run_indexes(out_dir / method.key / "index", model.eval(), ctx.fact_file, kind=config.eval.index,
                          device=str(ctx.device), batch_size=config.eval.batch_size)


def build_run_indexes(index_dir: str | Path, model: FactEmbeddingNet, fact_file, *, kind: str = "flat",
                      device: str = "cpu", batch_size: int = 256) -> dict[str, Path]:
    """Write ``index_dir/facts.faiss`` (the fact file's language vectors, ids = fact ids) and
    ``index_dir/images.faiss`` (the model's embeddings of all test images, ids = sample
    indices), each with its ``.json`` sidecar. Both carry ``model_fingerprint(model)``, so
    :func:`triplets.index.load_index` with the fingerprint of another model refuses them.
    Small sets fall back to a flat index (IVF needs ≥ 39 vectors per cell; IVF-PQ's
    codebooks ≥ 64 per centroid, 16,384 vectors)."""
    from .evaluate import embed_images
    from .index import build_index, model_fingerprint

    index_dir = Path(index_dir)
    fingerprint = model_fingerprint(model)
    fact_vectors = np.asarray(fact_file.fact_embeddings, dtype=np.float32)
    test_indices = fact_file.sample_indices(None, "test")
    image_vectors, _ = embed_images(model, fact_file.dataset(None, "test"), batch_size=batch_size, device=device)
    written = {}
    for name, vectors, ids in (("facts", fact_vectors, np.arange(len(fact_vectors))),
                               ("images", image_vectors, test_indices)):
        enough = 64 * 256 if kind == "ivfpq" else 39 * 4
        chosen = kind if kind == "flat" or len(vectors) >= enough else "flat"
        index = build_index(vectors, kind=chosen, ids=ids, fingerprint=fingerprint, use_gpu="auto",
                            metadata={"contents": name, "encoder_name": fact_file.encoder_name,
                                      "fact_file_sha": fact_file_fingerprint(fact_file)})
        written[name] = index.save(index_dir / f"{name}.faiss")
    return written


# ----------------------------------------------------------------------------- reading a run back
@dataclass
class Run:
    """A finished (or partly finished) run folder, opened for evaluation and queries."""

    dir: Path
    config: TrainConfig
    methods: list[str]
    fact_file: Any

    def load_model(self, method: str, *, device: str | torch.device = "cpu") -> FactEmbeddingNet:
        """The final model of ``method`` in eval mode. Raises RunFolderError if the method has
        no final model or was trained on a fact file with another vocabulary."""
        if method not in self.methods:
            import difflib

            close = difflib.get_close_matches(method, self.methods, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RunFolderError(f"{self.dir} has no trained method {method!r}{hint} (trained: {', '.join(self.methods)})")
        path = self.dir / method / "model.pt"
        try:
            state = load_checkpoint(path, map_location=device)
        except (CheckpointMismatchError, FileNotFoundError) as exc:
            raise RunFolderError(f"cannot read {path} ({exc}); retrain with `mas-triplets train --resume`") from None
        if state.get("fact_file_sha") != fact_file_fingerprint(self.fact_file):
            raise RunFolderError(
                f"{self.fact_file.path} has another fact vocabulary than the one {method!r} in {self.dir} was "
                "trained on; use the run's own fact file")
        model_config = from_dict(ModelConfig, state["model_config"], f"{path}: model_config")
        model = build_model(model_config, int(state["slot_dim"]), int(state["image_size"]))
        model.load_state_dict(state["model"])
        return model.to(device).eval()

    def close(self) -> None:
        """Close the fact file."""
        self.fact_file.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_run(run_dir: str | Path) -> Run:
    """Open the run folder ``run_dir``. Raises RunFolderError for a folder that is not a run,
    has no finished method, or whose fact file is gone."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); train one with `mas-triplets train`")
    try:
        config = from_dict(TrainConfig, yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    except (ConfigError, yaml.YAMLError) as exc:
        raise RunFolderError(f"{config_path} is not a valid run config ({str(exc).splitlines()[0]})") from None
    methods = [m.key for m in config.methods if (run_dir / m.key / "model.pt").is_file()]
    if not methods:
        raise RunFolderError(f"{run_dir} has no finished method yet; finish it with `mas-triplets train --resume`")
    if not Path(config.data.fact_file).is_file():
        raise RunFolderError(f"the run's fact file {config.data.fact_file} is gone; restore it to use {run_dir}")
    return Run(dir=run_dir, config=config, methods=methods, fact_file=_open_fact_file(config.data.fact_file))
