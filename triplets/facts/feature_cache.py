"""Cached trunk features (``model.cache_features: true``, torchvision backbones only).

The shared trunk is frozen (:meth:`FactEmbeddingNet.freeze_trunk`); its output for every sample
of the fact file is computed once (eval mode, no gradients, ``eval.batch_size`` images at a
time) and written atomically to ``RUN/features/<fingerprint>.h5`` (dataset ``features``,
float32 ``[N, C, h, w]`` in sample-index order, chunked by whole samples; float32 so that
training on the cache gives the same numbers as running the frozen trunk on the images). The
fingerprint (:func:`feature_cache_fingerprint`) hashes the trunk's weights and input
standardisation, the fact file (resolved path, size, modification time, fact vocabulary, sample
count) and the image size, so a stale cache is never read; a matching file is reused by every
method of the run and on ``--resume``. ``feature_cache_dir`` (a run setting) puts the file in a
folder that several run folders share instead (one method per process, in parallel): the first
process to need it computes it while the others wait on a lock (``.<fingerprint>.lock``), and
every later one reads it. The cache holds ``N · C · h · w · 4`` bytes (resnet18 at
32 px: 8 KiB per sample; at 224 px: 392 KiB) and each task's features are read into memory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_prep.facts.fact_file import read_rows
from mas_core.checkpoint import exclusive_file_lock

from ..errors import ConfigError
from .data import sample_indices
from ..fingerprint import feature_cache_fingerprint
from .model import EFFICIENTNET_PRETRAINED_DEPTH, BranchHead, FactEmbeddingNet

FEATURE_CACHE_DIR = "features"
FEATURE_DATASET = "features"


def feature_cache_folder(run_dir: str | Path, shared: str | Path | None = None) -> Path:
    """Where a run keeps its feature caches: the ``shared`` folder when given (the run setting
    ``feature_cache_dir``), else ``RUN/features``."""
    return Path(shared) if shared is not None else Path(run_dir) / FEATURE_CACHE_DIR


def feature_cache_path(folder: str | Path, fingerprint: str) -> Path:
    """``FOLDER/<fingerprint>.h5`` (``FOLDER``: :func:`feature_cache_folder`)."""
    return Path(folder) / f"{fingerprint}.h5"


def write_feature_cache(path: str | Path, model: FactEmbeddingNet, fact_file, *, fingerprint: str,
                        batch_size: int = 256, device: str | torch.device = "cpu") -> Path:
    """Compute ``model.trunk_features`` of every sample of ``fact_file`` (in sample-index
    order, ``batch_size`` images at a time, eval mode, no gradients) and write them as the
    float32 dataset ``features`` ``[N, C, h, w]`` of the HDF5 file ``path``, atomically
    (a temporary file in the same folder, then a rename). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_samples = int(fact_file.num_samples)
    if num_samples == 0:
        raise ConfigError(f"{fact_file.path} holds no samples; nothing to cache")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    was_training = model.training
    model.eval()
    # EfficientNet-Lite0's depthwise convolutions run 1.3-2.4x faster in channels_last on the CPU
    # (benchmarks/bench_backbone.py); the trunk goes back to the default layout afterwards
    fast_layout = getattr(model, "pretrained_depth", None) == EFFICIENTNET_PRETRAINED_DEPTH
    if fast_layout:
        model.trunk.to(memory_format=torch.channels_last)
    try:
        with h5py.File(temporary, "w") as handle, torch.no_grad():
            dataset = None
            for start in range(0, num_samples, batch_size):
                indices = np.arange(start, min(num_samples, start + batch_size))
                pixels = torch.from_numpy(np.asarray(fact_file.pixels(indices))).permute(0, 3, 1, 2)
                pixels = pixels.contiguous(memory_format=torch.channels_last if fast_layout else torch.contiguous_format)
                features = model.trunk_features(pixels.to(device)).float().contiguous().cpu().numpy()
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
        if fast_layout:
            model.trunk.to(memory_format=torch.contiguous_format)
        if temporary.exists():
            temporary.unlink()
    return path


def _agrees(path: Path, fingerprint: str, num_samples: int) -> bool:
    """Whether ``path`` is a readable cache with this ``fingerprint`` and sample count."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return handle.attrs.get("fingerprint") == fingerprint and handle[FEATURE_DATASET].shape[0] == num_samples
    except (OSError, KeyError):
        return False  # unreadable or foreign: recomputed


def ensure_feature_cache(folder: str | Path, model: FactEmbeddingNet, fact_file, *, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> Path:
    """The feature cache of ``model``'s trunk on ``fact_file`` in ``folder``
    (:func:`feature_cache_folder`): reused when ``FOLDER/<fingerprint>.h5`` exists and agrees
    (fingerprint attribute, sample count), computed by :func:`write_feature_cache` otherwise, under
    a lock so that processes sharing the folder compute it once."""
    fingerprint = feature_cache_fingerprint(model, fact_file)
    path = feature_cache_path(folder, fingerprint)
    num_samples = int(fact_file.num_samples)
    if _agrees(path, fingerprint, num_samples):
        return path
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"the feature cache folder {path.parent} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_file_lock(path.with_name(f".{fingerprint}.lock")):
        if _agrees(path, fingerprint, num_samples):  # another process wrote it while this one waited
            return path
        return write_feature_cache(path, model, fact_file, fingerprint=fingerprint, batch_size=batch_size,
                                   device=device)


class FeatureSamples:
    """Cached trunk features and fact ids of the samples of ``parts`` (the same positions and
    batches as :class:`~triplets.facts.data.FactSamples`, so a cached run sees the same batches)."""

    def __init__(self, features_path: Path, fact_file: Any, parts: Sequence[tuple[int, int | None]], *,
                 max_samples: int | None = None, with_labels: bool = True) -> None:
        self.indices = sample_indices(fact_file, parts, max_samples)
        self.fact_ids = torch.as_tensor(np.asarray(fact_file.sample_fact)[self.indices], dtype=torch.long)
        self.with_labels = with_labels
        self.features: Tensor | None = None
        if len(self.indices):
            unique, inverse = np.unique(self.indices, return_inverse=True)  # h5py wants increasing indices
            with h5py.File(features_path, "r") as handle:
                stored = read_rows(handle[FEATURE_DATASET], unique)  # slices, not h5py's slow point selection
            self.features = torch.from_numpy(stored[inverse])

    def __len__(self) -> int:
        return len(self.indices)

    def inputs_only(self) -> "FeatureSamples":
        """The same samples, batches holding the features alone."""
        view = object.__new__(FeatureSamples)
        view.__dict__.update(self.__dict__, with_labels=False)
        return view

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Any]:
        """``(features float32 [b, C, h, w], fact_ids [b])`` (or the features alone) per index tensor."""
        for chosen in index_batches:
            yield (self.features[chosen], self.fact_ids[chosen]) if self.with_labels else self.features[chosen]

    def in_order(self, batch_size: int) -> Iterator[Any]:
        """All samples in file order, ``batch_size`` at a time."""
        return self.batches(list(torch.arange(len(self)).split(batch_size)))


def cached_embeddings(head: BranchHead, samples: FeatureSamples, device: torch.device,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings of cached features, as ``evaluate.embed_images`` computes them."""
    was_training = head.training
    head.eval()
    vectors = []
    try:
        with torch.no_grad():
            for features in samples.inputs_only().in_order(batch_size):
                output = head.embed(features.to(device))
                vectors.append(F.normalize(output.float(), dim=1).cpu().numpy())
    finally:
        head.train(was_training)
    return np.concatenate(vectors).astype(np.float32), samples.fact_ids.numpy().astype(np.int64)


__all__ = ["FEATURE_CACHE_DIR", "FEATURE_DATASET", "FeatureSamples", "cached_embeddings", "ensure_feature_cache",
           "feature_cache_folder", "feature_cache_path", "write_feature_cache"]
