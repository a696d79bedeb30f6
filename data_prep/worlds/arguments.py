"""The arguments of a synthetic world (:func:`data_prep.worlds.synthetic.write_world_dump`, so ``mas-triplets
synth``), range-checked before anything is allocated, rendered or written.

Limits (one-line :class:`~data_prep.errors.DataPrepError` past them):

* ``num_images``: 1 to :data:`MAX_IMAGES` (1,000,000; the real-image world's default is 20,000,
  the shapes world's 600). Each image is a JPEG of a few kilobytes, so the largest world is a few GB.
* ``image_size``: from :data:`MIN_IMAGE_SIZE` (96 x 72, room for a scene's objects) to
  :data:`MAX_IMAGE_SIDE` (4096) pixels a side: one 4096 x 4096 canvas is 48 MB in memory.
* ``seed``: an integer from 0 to :data:`MAX_SEED` (2**32 - 1, what numpy's seeding takes).
* the output folder: not a file; its parent (or the nearest existing folder above) writable, as
  the folder itself when it exists; a non-empty folder only with ``force``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..atomic import check_output_folder
from ..errors import DataPrepError

MIN_IMAGE_SIZE = (96, 72)
MAX_IMAGE_SIDE = 4096
MAX_IMAGES = 1_000_000
MAX_SEED = 2**32 - 1


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_world_arguments(num_images: object, image_size: object, seed: object = 0) -> tuple[int, int]:
    """``(width, height)`` once ``num_images``, ``image_size`` and ``seed`` are in range."""
    if not _is_integer(num_images) or not 1 <= num_images <= MAX_IMAGES:  # type: ignore[operator]
        raise DataPrepError(f"num_images (--images) must be a positive integer of at most {MAX_IMAGES:,}, got {num_images!r}")
    try:
        width, height = (int(v) for v in image_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DataPrepError(f"image_size must be (width, height) in pixels, got {image_size!r}") from None
    if width < MIN_IMAGE_SIZE[0] or height < MIN_IMAGE_SIZE[1]:
        raise DataPrepError(
            f"image_size {width}x{height} is too small; use at least {MIN_IMAGE_SIZE[0]}x{MIN_IMAGE_SIZE[1]} pixels")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise DataPrepError(f"image_size (--image-size) {width}x{height} is too large; at most {MAX_IMAGE_SIDE} "
                            "pixels a side")
    if not _is_integer(seed) or not 0 <= seed <= MAX_SEED:  # type: ignore[operator]
        raise DataPrepError(f"seed (--seed) must be an integer from 0 to {MAX_SEED:,}, got {seed!r}")
    return width, height


def prepare_destination(out_dir: str | os.PathLike, force: bool) -> Path:
    """Check the output folder of a world: writable, not a file, empty unless ``force``."""
    out_dir = check_output_folder(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DataPrepError(f"{out_dir} exists and is not empty; choose another --out or pass --force to replace it")
    return out_dir
