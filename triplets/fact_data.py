"""Reading a fact file for training: its fingerprints, and the samples of some tasks and splits
as batches addressed by position (what :class:`mas_core.loop.TrainData` asks for).

Two fingerprints: :func:`fact_file_fingerprint` covers the fact vocabulary only (what fact id
``k`` means; stored in ``model.pt`` and the indexes), :func:`file_identity` the whole file's
bytes (SHA-256, streamed in 4 MiB chunks; what a run records in ``RUN/data.json`` and what
``--resume``, ``evaluate`` and ``query`` compare). A recorded SHA-256 is reused without reading
the file again only when its size, modification time and inode are unchanged *and* a cheap
sample of its content (:func:`content_sample`) still matches; a file under
``FULL_HASH_BELOW`` bytes is always hashed in full."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from data_prep.facts_h5 import open_facts
from data_prep.lll_benchmark import missing_fact_file_hint

from .errors import ConfigError


def vocabulary_fingerprint(facts: list[tuple[str, str | None, str | None]]) -> str:
    """SHA-256 (hex) of the fact vocabulary in fact-id order: two fact files agree on what
    fact id ``k`` means exactly when their fingerprints are equal."""
    text = json.dumps([list(fact) for fact in facts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fact_file_fingerprint(fact_file: Any) -> str:
    """:func:`vocabulary_fingerprint` of an opened fact file (what ``model.pt`` stores as ``fact_file_sha``)."""
    return vocabulary_fingerprint(fact_file.facts)


_CHUNK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the bytes of the file at ``path``, read 4 MiB at a time (constant memory;
    one core hashes 200–500 MB/s, so a 6 GB fact file takes 12–30 s; :func:`file_identity` avoids
    reading an unchanged file again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


DATA_SHA_KEY = "fact_file_sha256"
"""The key of the fact file's SHA-256 in a checkpoint's experiment identity and in ``model.pt``
(the record inside the payload, which deleting ``RUN/data.json`` cannot remove)."""
FULL_HASH_BELOW = 64 << 20
SAMPLE_BLOCKS = 256
SAMPLE_BLOCK = 4096
SAMPLE_ENDS = 1 << 16


def content_sample(path: str | Path) -> str:
    """SHA-256 (hex) of a spread sample of the file's bytes: its first and last ``SAMPLE_ENDS``
    bytes (the HDF5 superblock and the metadata written last) and ``SAMPLE_BLOCKS`` blocks of
    ``SAMPLE_BLOCK`` bytes evenly spaced between them (about 1.1 MiB read, whatever the size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        starts = [0, max(0, size - SAMPLE_ENDS)] + [size * k // (SAMPLE_BLOCKS + 1) for k in range(1, SAMPLE_BLOCKS + 1)]
        for start in starts:
            handle.seek(start)
            digest.update(handle.read(SAMPLE_ENDS if start in starts[:2] else SAMPLE_BLOCK))
    return digest.hexdigest()


def file_identity(path: str | Path, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "size", "mtime_ns", "inode", "sample"}`` of the file at ``path``. When
    ``recorded`` (an earlier answer for the same path) has the file's current size, modification
    time, inode and :func:`content_sample`, and the file is at least ``FULL_HASH_BELOW`` bytes, its
    ``sha256`` is reused instead of reading the whole file again (a file rewritten in place or
    replaced gets a new modification time; one damaged in place with its time restored is caught
    by the sample where the damage falls in it)."""
    path = Path(path)
    stat = path.stat()
    now = {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns), "inode": int(stat.st_ino),
           "sample": content_sample(path)}
    if recorded and now["size"] >= FULL_HASH_BELOW \
            and all(recorded.get(key) == now[key] for key in ("path", "size", "mtime_ns", "inode", "sample")) \
            and isinstance(recorded.get("sha256"), str):
        return {**now, "sha256": recorded["sha256"]}
    return {**now, "sha256": file_sha256(path)}


def open_fact_file(path: str | Path) -> Any:
    """The fact file at ``path`` (:func:`data_prep.facts_h5.open_facts`); a missing file is a
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
    slice per run of chunks, see :func:`data_prep.facts_h5.read_rows`), nothing kept.
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


__all__ = ["DATA_SHA_KEY", "FULL_HASH_BELOW", "FactSamples", "check_fact_file", "content_sample", "fact_file_fingerprint", "file_identity", "file_sha256", "open_fact_file",
           "sample_indices", "vocabulary_fingerprint"]
