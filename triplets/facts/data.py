"""Reading a fact file for training: the file opened and checked, and the samples of some tasks
and splits as batches addressed by position (what :class:`mas_core.loop.TrainData` asks for).
Its fingerprints (the vocabulary's, the bytes') live in :mod:`triplets.fingerprint`."""
from __future__ import annotations

from pathlib import Path
import os
from typing import Any, Iterator, Sequence

import h5py

import numpy as np
import torch
from torch import Tensor

from data_prep.errors import FactFileError
from data_prep.facts.fact_file import open_facts, read_rows
from data_prep.sources.lll_benchmark import missing_fact_file_hint

from ..errors import ConfigError


def open_fact_file(path: str | Path) -> Any:
    """The fact file at ``path`` (:func:`data_prep.facts.fact_file.open_facts`); a missing file is a
    :class:`~triplets.errors.ConfigError` saying how to make one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing_fact_file_hint(path)
                          or f"data.fact_file: no file {path}; make one with `mas-triplets prepare` (or synth + prepare)")
    return open_facts(path)


def check_fact_file(fact_file: Any) -> None:
    """Refuse a fact file without cached fact embeddings or pixels (training needs both)."""
    if fact_file.fact_embeddings is None:
        raise ConfigError(f"{fact_file.path} has no cached fact embeddings; run `mas-triplets prepare` with an encoder")
    if not fact_file.has_pixels:
        raise ConfigError(f"{fact_file.path} holds no image pixels; prepare it with an image size (e.g. --image-size 32)")


def sample_indices(fact_file: Any, parts: Sequence[tuple[int, int | None]], max_samples: int | None) -> np.ndarray:
    """The sample indices of ``parts`` (``(task, split)``; split ``None``: both), in that order,
    the first ``max_samples`` of them when given."""
    indices = [fact_file.sample_indices(task=task, split=split) for task, split in parts]
    chosen = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    return chosen[:max_samples] if max_samples is not None else chosen


class FactSamples:
    """Images and fact ids of the samples of ``parts`` of a fact file.

    In memory: uint8 ``[n, 3, S, S]`` pixels, converted to float in ``[0, 1]`` per batch.
    Streamed: each batch's regions read from the file when asked for (``fact_file.pixels``: one
    slice per run of chunks, see :func:`data_prep.facts.fact_file.read_rows`), nothing kept.
    ``batches(index_batches)`` yields ``(images float [b, 3, S, S], fact_ids [b])`` per index
    tensor (positions in this set); ``with_labels=False`` yields the images alone.
    """

    def __init__(self, fact_file: Any, parts: Sequence[tuple[int, int | None]], *, in_memory: bool,
                 max_samples: int | None = None, with_labels: bool = True) -> None:
        self.indices = sample_indices(fact_file, parts, max_samples)
        self.fact_ids = torch.as_tensor(np.asarray(fact_file.sample_fact)[self.indices], dtype=torch.long)
        self.in_memory = in_memory
        self.with_labels = with_labels
        self.pixels: Tensor | None = None
        self.fact_file = fact_file
        if in_memory and len(self.indices):
            array = np.asarray(fact_file.pixels(self.indices))
            self.pixels = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return int(len(self.indices))

    def inputs_only(self) -> "FactSamples":
        """The same samples, batches holding the images alone."""
        view = object.__new__(FactSamples)
        view.__dict__.update(self.__dict__, with_labels=False)
        return view

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Any]:
        if self.in_memory:
            for chosen in index_batches:
                images = self.pixels[chosen].float().div_(255.0)
                yield (images, self.fact_ids[chosen]) if self.with_labels else images
            return
        for chosen in index_batches:
            rows = self.indices[np.asarray(chosen, dtype=np.int64)]
            pixels = torch.from_numpy(np.asarray(self.fact_file.pixels(rows)))
            images = pixels.permute(0, 3, 1, 2).float().div_(255.0)
            yield (images, self.fact_ids[chosen]) if self.with_labels else images

    def in_order(self, batch_size: int) -> Iterator[Any]:
        """All samples in file order, ``batch_size`` at a time."""
        return self.batches(list(torch.arange(len(self)).split(batch_size)))


class FactImageDataset(torch.utils.data.Dataset):
    """Samples of a fact file as ``(image float32 tensor (3,S,S) in [0,1], fact_id int)``
    (:func:`fact_image_dataset`).

    Each process (DataLoader worker) opens its own read-only HDF5 handle on first use.
    """

    def __init__(self, path: str | Path, sample_indices: np.ndarray, sample_facts: np.ndarray) -> None:
        self.path = Path(path)
        self.sample_indices = np.asarray(sample_indices, dtype=np.int64)
        self.sample_facts = np.asarray(sample_facts, dtype=np.int64)
        self._handle: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.sample_indices.shape[0])

    def _pixels(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle["samples/pixels"]

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        if not -len(self) <= position < len(self):
            raise IndexError(position)
        index = int(self.sample_indices[position])
        region = self._pixels()[index]
        image = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1).float().div_(255.0)
        return image, int(self.sample_facts[position])

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Tensor, int]]:
        """A DataLoader's whole batch at once: the rows read by :func:`data_prep.facts.fact_file.read_rows`."""
        chosen = np.asarray(positions, dtype=np.int64)
        if chosen.size and not (chosen.min() >= -len(self) and chosen.max() < len(self)):
            raise IndexError(positions)
        indices = self.sample_indices[chosen]
        unique, inverse = np.unique(indices, return_inverse=True)
        images = torch.from_numpy(read_rows(self._pixels(), unique)[inverse]).permute(0, 3, 1, 2).float().div_(255.0)
        return [(image, int(fact)) for image, fact in zip(images, self.sample_facts[chosen])]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state


def fact_image_dataset(fact_file: Any, task: int | None, split: int | str) -> FactImageDataset:
    """A torch ``Dataset`` of ``(image float32 (3,S,S) in [0,1], fact_id)`` of an opened fact file's
    samples of ``task`` (None: all) and ``split``."""
    if not fact_file.has_pixels:
        raise FactFileError(f"fact file {fact_file.path} has no pixels (prepared with --no-images); prepare it with images")
    indices = fact_file.sample_indices(task, split)
    return FactImageDataset(fact_file.path, indices, fact_file.sample_fact[indices])


__all__ = ["FactImageDataset", "FactSamples", "check_fact_file", "fact_image_dataset", "open_fact_file", "sample_indices"]
