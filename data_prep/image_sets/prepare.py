"""Image-classification datasets converted once to HDF5, and read back as datasets.

:func:`prepare_image_dataset` reads one dataset from its usual on-disk layout
(:mod:`data_prep.image_sets.sources`) and writes a single HDF5 file (:mod:`data_prep.image_sets.image_file`
documents the layout), atomically: temporary file in the target folder, then rename.
Images of variable size (photographs) are resized so that the shorter side is
``image_size`` pixels and centre-cropped to ``image_size`` x ``image_size`` (the paper's
protocol stores 256 and crops 224 at training time); fixed-size sources keep their size
unless ``image_size`` is given.

:func:`open_image_dataset` returns an :class:`ImageH5`, whose :meth:`ImageH5.view`
gives a map-style dataset (``len`` and ``[i] -> (image, label)``, usable by a torch
``DataLoader``) over one split and a subset of classes, relabelled 0..k-1 in the
order asked for, optionally subsampled per class (deterministically by seed).

Sources (``SOURCES`` of :mod:`data_prep.image_sets.sources` lists them with the layout each
expects under ``root``):

* offline: ``fashion_mnist`` (IDX files, e.g. Debian's ``dataset-fashion-mnist`` in
  /usr/share/datasets/fashion-mnist), ``digits`` (scikit-learn's bundled 8x8
  handwritten digits, upsampled), ``font_letters`` (letters rendered from installed
  TrueType fonts with random small rotations, shifts and scales, in the manner of the
  font subset of Chars74K; deterministic by seed);
* torchvision classes read from a local root with ``download=False``: ``flowers102``,
  ``stanford_cars``, ``fgvc_aircraft``, ``svhn``, ``cifar10``, ``cifar100``;
* image folders with list files: ``cub200`` (CUB-200-2011), ``mit_indoor67``,
  ``voc_actions`` (PASCAL VOC 2012 action person boxes), ``chars74k`` (English/Fnt),
  and ``image_folder`` (``root/train/<class>/*`` and ``root/test/<class>/*``).

A missing or incomplete dataset raises :class:`~data_prep.errors.MissingDatasetError`
whose one-line message names the layout expected.
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

from ..atomic import check_output_file
from ..errors import DataPrepError, MissingDatasetError
from ..image_decode import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels, check_stored_image_size, transparency_tally
from .image_file import FORMAT_VERSION, SPLITS, ImageH5, open_image_dataset, write_image_h5
from .sources import READERS, SOURCES, resize_all, unknown_source_message

__all__ = ["PHOTO_DEFAULT_SIZE", "prepare_image_dataset"]

PHOTO_DEFAULT_SIZE = 256


def prepare_image_dataset(
    name: str,
    root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    split: Sequence[str] = SPLITS,
    seed: int = 0,
    characters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    renders_per_class: tuple[int, int] = (200, 60),
    render_canvas: int = 64,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Path:
    """Convert dataset ``name`` read under ``root`` to the HDF5 file ``out`` and return its path.

    ``image_size`` (pixels): photographs are resized (shorter side) and centre-cropped to
    ``image_size`` x ``image_size`` (default 256); fixed-size sources are resized to it only
    when given. ``split`` lists the splits to write (``"train"``, ``"test"``). ``seed`` makes
    random splits and the letter renderings reproducible. ``characters``,
    ``renders_per_class`` (train, test) and ``render_canvas`` (pixels) configure
    ``font_letters`` only. ``max_image_pixels``: an image file declaring more pixels (width x
    height) stops the run before it is decoded, naming the file. Every image file is decoded once,
    to 8-bit by :mod:`data_prep.image_decode`. The write is atomic; an existing ``out`` is replaced.
    """
    if name not in SOURCES:
        raise DataPrepError(unknown_source_message(name))
    check_output_file(out, "out")
    spec = SOURCES[name]
    splits = tuple(split)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataPrepError(f"split must name one or both of {list(SPLITS)}, got {list(splits)}")
    if image_size is not None:
        check_stored_image_size(image_size, "image_size", smallest=4)
    if spec.needs_root and root is None:
        raise MissingDatasetError(f"dataset {name!r} needs --root; expected layout: {spec.layout}")
    size = image_size if image_size is not None else (PHOTO_DEFAULT_SIZE if spec.variable_size else None)
    root_path = Path(root) if root is not None else None
    reader = READERS[name]
    options = {"seed": seed, "characters": characters, "renders_per_class": list(renders_per_class),
               "render_canvas": render_canvas}
    max_image_pixels = check_max_pixels(max_image_pixels)
    with transparency_tally() as transparent:  # images composited over white, for the summary
        loaded = reader(root_path, size, splits, {**options, "max_image_pixels": max_image_pixels})
    if size is not None:
        for part in loaded.splits.values():
            if part.images.shape[1:3] != (size, size):
                part.images = resize_all(part.images, size)
    provenance = {
        "dataset": name,
        "root": str(root_path.resolve()) if root_path is not None else None,
        "files": loaded.files[:50],
        "num_files": len(loaded.files),
        "image_size": size,
        "splits": list(splits),
        "options": options if name == "font_letters" else {"seed": seed},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "format_version": FORMAT_VERSION,
        "notes": dict(sorted(transparent.items())),
    }
    out_path = Path(out)
    write_image_h5(out_path, name, loaded.class_names,
                   {split_name: (part.images, part.labels) for split_name, part in loaded.splits.items()},
                   provenance)
    return out_path
