"""The images behind a source's samples: finding them on disk, checking that they decode
(:func:`checked_image_sizes`, without a full-size decode) and cropping each sample's region
(:func:`crop_blocks`, one full decode per image). Every image goes through
:mod:`data_prep.image_decode`: the pixel limit from the header, the conversion to 8-bit RGB."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ..errors import DataPrepError
from ..image_decode import DECODE_ERRORS, check_image_transparency, decode_rgb
from ..progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def index_image_files(folders: Iterable[Path]) -> dict[int, Path]:
    """image id -> path for every ``<integer>.jpg|.jpeg|.png`` directly inside ``folders`` (first folder wins)."""
    paths: dict[int, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and stem.isdigit() and entry.is_file():
                    paths.setdefault(int(stem), Path(entry.path))
    return paths


def find_image_files(folders: Iterable[Path]) -> dict[int, Path]:
    """:func:`index_image_files`, raising :class:`DataPrepError` naming the folders when none holds an image."""
    folders = [Path(folder) for folder in folders]
    paths = index_image_files(folders)
    if not paths:
        looked = ", ".join(str(folder) for folder in folders)
        raise DataPrepError(f"no image file (<image id>{'|'.join(IMAGE_SUFFIXES)}) found in {looked}; put the "
                            "images there or use --no-images")
    return paths


def checked_image_sizes(image_ids: np.ndarray, image_paths: dict[int, Path], notes: Counter[str],
                        listed_sizes: dict[int, tuple[int, int]], max_pixels: int,
                        progress: bool) -> dict[int, tuple[int, int]]:
    """Check every image in ``image_ids`` (:func:`~data_prep.image_decode.check_image`: header, pixel
    limit, data, no full-size decode); return id -> (width, height) in pixels of those that decode.

    Counts in ``notes`` the images missing on disk, those that do not decode, those
    whose size differs from ``listed_sizes`` (image_data.json; (0, 0) = unknown), and those with
    transparent pixels (composited over white when decoded). An image
    above ``max_pixels`` raises :class:`~data_prep.image_decode.ImageTooLargeError`.
    """
    sizes: dict[int, tuple[int, int]] = {}
    bar = progress_bar(progress, total=len(image_ids), desc="checking images", unit="img")
    for image_id in image_ids.tolist():
        if bar is not None:
            bar.update(1)
        path = image_paths.get(image_id)
        if path is None:
            notes["images listed but missing on disk"] += 1
            continue
        try:
            size, transparency = check_image_transparency(path, max_pixels)
        except DECODE_ERRORS:
            notes["images that do not decode"] += 1
            continue
        if transparency is not None:
            notes[transparency] += 1
        sizes[image_id] = size
        listed = listed_sizes.get(image_id)
        if listed is not None and listed != (0, 0) and listed != size:
            notes["images whose decoded size differs from image_data"] += 1
    if bar is not None:
        bar.close()
    return sizes


def crop_blocks(image_ids: np.ndarray, boxes: np.ndarray, image_paths: dict[int, Path], image_size: int,
                max_pixels: int, progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_sample, uint8 [k, S, S, 3])`` per image, S = ``image_size``; samples must be sorted by image id.

    Each image is decoded once (:func:`~data_prep.image_decode.decode_rgb`); one that passed
    :func:`checked_image_sizes` but fails now raises :class:`DataPrepError` naming it. Each region
    ``(x, y, w, h)`` (pixels) is cropped to ``floor(x), floor(y), ceil(x + w), ceil(y + h)`` and
    resized to S x S (bilinear).
    """
    boundaries = np.flatnonzero(np.diff(image_ids)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    stops = np.concatenate([boundaries, [len(image_ids)]]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    bar = progress_bar(progress, total=len(starts), desc="cropping regions", unit="img")
    for start, stop in zip(starts.tolist(), stops.tolist()):
        path = image_paths[int(image_ids[start])]
        try:
            image = decode_rgb(path, max_pixels)
        except DECODE_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataPrepError(f"{path} passed the image check but does not decode ({reason}); replace or remove "
                                "it (the samples of an image missing on disk are dropped)") from None
        block = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
        for row, (x, y, w, h) in enumerate(boxes[start:stop].tolist()):
            region = image.crop((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))))
            block[row] = np.asarray(region.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
        if bar is not None:
            bar.update(1)
        yield start, block
    if bar is not None:
        bar.close()
