"""The image HDF5 format of :mod:`data_prep.image_sets.prepare`: its writer (:func:`write_image_h5`) and its
reader (:func:`open_image_dataset` -> :class:`ImageH5`, whose views are map-style datasets).

Layout (``format_version`` 1)::

    /                       attrs: format="mas-triplets-images", format_version=1,
                                   dataset (registered name), image_height, image_width,
                                   channels, provenance (JSON: source root, files, seed, options)
    /class_names            (C,) UTF-8 strings; label k names class_names[k]
    /<split>/images         (N, H, W, channels) uint8, one image per row
    /<split>/labels         (N,) int64 in [0, C)

for ``split`` in ``train`` and ``test``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..atomic import atomic_output
from ..errors import DataPrepError, MissingDatasetError

FORMAT_NAME = "mas-triplets-images"
FORMAT_VERSION = 1
SPLITS = ("train", "test")


class ImageFormatError(DataPrepError):
    """An image HDF5 file is not of this format, of another version, or is truncated."""


def open_image_dataset(path: str | os.PathLike) -> ImageH5:
    """Open an HDF5 file written by :func:`prepare_image_dataset` (checks format and version)."""
    return ImageH5(path)


class ImageH5:
    """A prepared image dataset: class names, splits, and dataset views over them.

    Reads the whole file's metadata at construction; images are read on demand by the
    views (each view loads its selected rows into memory once, see :meth:`view`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingDatasetError(f"image dataset file not found: {self.path}; "
                                      "create it with `mas-triplets prepare images`")
        try:
            with h5py.File(self.path, "r") as handle:
                if handle.attrs.get("format") != FORMAT_NAME:
                    raise ImageFormatError(f"{self.path} is not an image dataset written by "
                                           "`mas-triplets prepare images`")
                version = int(handle.attrs.get("format_version", -1))
                if version != FORMAT_VERSION:
                    raise ImageFormatError(f"{self.path} has format version {version}, this code reads "
                                           f"{FORMAT_VERSION}; prepare it again")
                self.name = str(handle.attrs["dataset"])
                self.class_names = [_to_str(v) for v in handle["class_names"][()]]
                self.provenance = json.loads(_to_str(handle.attrs["provenance"]))
                self.splits = tuple(s for s in SPLITS if s in handle)
                self._labels = {s: handle[s]["labels"][()].astype(np.int64) for s in self.splits}
                shapes = {s: handle[s]["images"].shape for s in self.splits}
        except OSError as exc:
            raise ImageFormatError(f"cannot read {self.path} as HDF5 ({exc}); prepare it again") from None
        except KeyError as exc:
            raise ImageFormatError(f"{self.path} lacks {exc}; the file is truncated, prepare it again") from None
        for split_name, shape in shapes.items():
            if shape[0] != self._labels[split_name].shape[0]:
                raise ImageFormatError(f"{self.path}: {split_name} has {shape[0]} images but "
                                       f"{self._labels[split_name].shape[0]} labels; prepare it again")
        first = shapes[self.splits[0]]
        self.image_shape: tuple[int, int, int] = (int(first[1]), int(first[2]), int(first[3]))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self, split: str) -> np.ndarray:
        """The labels of ``split`` as an int64 array (a copy)."""
        self._check_split(split)
        return self._labels[split].copy()

    def class_indices(self, classes: Sequence[int | str] | None) -> list[int]:
        """Resolve class names or indices to indices (all classes when ``None``)."""
        if classes is None:
            return list(range(self.num_classes))
        indices: list[int] = []
        for item in classes:
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not 0 <= int(item) < self.num_classes:
                    raise DataPrepError(f"class index {item} out of range for {self.name} "
                                        f"({self.num_classes} classes)")
                indices.append(int(item))
            elif isinstance(item, str) and item in self.class_names:
                indices.append(self.class_names.index(item))
            else:
                raise DataPrepError(f"class {item!r} not in {self.name}; classes are "
                                    f"{self.class_names[:12]}{' ...' if self.num_classes > 12 else ''}")
        if len(set(indices)) != len(indices):
            raise DataPrepError(f"class list {list(classes)} names a class twice")
        return indices

    def view(self, split: str, classes: Sequence[int | str] | None = None, *,
             max_per_class: int | None = None, seed: int = 0,
             transform: Callable[[np.ndarray], Any] | None = None) -> ImageSplitView:
        """A dataset over ``split`` restricted to ``classes`` (relabelled 0..k-1 in that order).

        ``max_per_class`` keeps at most that many samples of each class, chosen
        uniformly without replacement with ``numpy.random.default_rng(seed)`` and kept
        in file order. ``transform`` maps the (H, W, C) uint8 image to the returned input.
        """
        self._check_split(split)
        indices = self.class_indices(classes)
        if max_per_class is not None and max_per_class < 1:
            raise DataPrepError(f"max_per_class must be at least 1, got {max_per_class}")
        labels = self._labels[split]
        rng = np.random.default_rng(seed)
        rows: list[np.ndarray] = []
        new_labels: list[np.ndarray] = []
        for new_label, old_label in enumerate(indices):
            members = np.flatnonzero(labels == old_label)
            if max_per_class is not None and members.size > max_per_class:
                members = np.sort(rng.choice(members, size=max_per_class, replace=False))
            rows.append(members)
            new_labels.append(np.full(members.size, new_label, dtype=np.int64))
        row_index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        order = np.argsort(row_index, kind="stable")
        row_index = row_index[order]
        label_array = np.concatenate(new_labels)[order] if new_labels else np.zeros(0, dtype=np.int64)
        if row_index.size == 0:
            raise DataPrepError(f"{self.name} {split}: no samples for classes {list(classes or [])}")
        with h5py.File(self.path, "r") as handle:
            images = handle[split]["images"][row_index] if row_index.size else None
        return ImageSplitView(images, label_array, [self.class_names[i] for i in indices], transform)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataPrepError(f"{self.path} has no split {split!r}; it has {list(self.splits)}")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self._labels[s].size}" for s in self.splits)
        return f"ImageH5({self.name!r}, classes={self.num_classes}, {sizes}, shape={self.image_shape})"


class ImageSplitView:
    """Map-style dataset: ``view[i] -> (transform(image) or image, label)``; labels 0..k-1."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 transform: Callable[[np.ndarray], Any] | None) -> None:
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


def write_image_h5(out: Path, name: str, class_names: Sequence[str],
                   splits: Mapping[str, tuple[np.ndarray, np.ndarray]], provenance: dict[str, Any]) -> None:
    """Write dataset ``name`` atomically to ``out``: ``splits`` maps a split to (images uint8 [N, H, W, C],
    labels int64 [N]); every split must have the same image shape."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = {images.shape[1:] for images, _ in splits.values()}
    if len(shapes) != 1:
        raise DataPrepError(f"{name}: splits have different image shapes {sorted(shapes)}; pass image_size")
    height, width, channels = next(iter(shapes))
    with atomic_output(out) as tmp_name:
        with h5py.File(tmp_name, "w") as handle:
            handle.attrs["format"] = FORMAT_NAME
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["dataset"] = name
            handle.attrs["image_height"] = int(height)
            handle.attrs["image_width"] = int(width)
            handle.attrs["channels"] = int(channels)
            handle.attrs["provenance"] = json.dumps(provenance)
            handle.create_dataset("class_names", data=np.array(list(class_names), dtype=object),
                                  dtype=h5py.string_dtype("utf-8"))
            for split_name, (images, labels) in splits.items():
                group = handle.create_group(split_name)
                count = images.shape[0]
                chunk = (max(1, min(count, max(1, (1 << 20) // max(1, height * width * channels)))),
                         height, width, channels)
                group.create_dataset("images", data=images.astype(np.uint8, copy=False),
                                     chunks=chunk if count else None, compression="lzf" if count else None)
                group.create_dataset("labels", data=labels.astype(np.int64, copy=False))


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
