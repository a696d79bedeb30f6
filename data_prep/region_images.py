"""The images behind a source's samples: finding them on disk, checking that they decode,
and cropping each sample's region (:func:`crop_blocks`)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: what PIL raises for a file that is not a decodable image
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, EOFError)


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


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully to an RGB PIL image; raises one of :data:`DECODE_ERRORS` if it does not decode."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def decoded_image_sizes(image_ids: np.ndarray, image_paths: dict[int, Path], notes: Counter[str],
                        listed_sizes: dict[int, tuple[int, int]], progress: bool) -> dict[int, tuple[int, int]]:
    """Decode every image in ``image_ids``; return id -> (width, height) in pixels of those that decode.

    Counts in ``notes`` the images missing on disk, those that do not decode, and those
    whose decoded size differs from ``listed_sizes`` (image_data.json; (0, 0) = unknown).
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
            image = open_rgb(path)
        except DECODE_ERRORS:
            notes["images that do not decode"] += 1
            continue
        sizes[image_id] = image.size
        listed = listed_sizes.get(image_id)
        if listed is not None and listed != (0, 0) and listed != image.size:
            notes["images whose decoded size differs from image_data"] += 1
    if bar is not None:
        bar.close()
    return sizes


def crop_blocks(image_ids: np.ndarray, boxes: np.ndarray, image_paths: dict[int, Path], image_size: int,
                progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_sample, uint8 [k, S, S, 3])`` per image, S = ``image_size``; samples must be sorted by image id.

    Each region ``(x, y, w, h)`` (pixels) is cropped to ``floor(x), floor(y), ceil(x + w), ceil(y + h)``
    and resized to S x S (bilinear).
    """
    boundaries = np.flatnonzero(np.diff(image_ids)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    stops = np.concatenate([boundaries, [len(image_ids)]]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    bar = progress_bar(progress, total=len(starts), desc="cropping regions", unit="img")
    for start, stop in zip(starts.tolist(), stops.tolist()):
        image = open_rgb(image_paths[int(image_ids[start])])
        block = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
        for row, (x, y, w, h) in enumerate(boxes[start:stop].tolist()):
            region = image.crop((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))))
            block[row] = np.asarray(region.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
        if bar is not None:
            bar.update(1)
        yield start, block
    if bar is not None:
        bar.close()
