"""Every image a :mod:`data_prep` command reads is opened here: the pixel-count limit checked from
the header before anything is decoded (:func:`check_image`, :func:`decode_rgb`), and the one
conversion of every Pillow mode to 8-bit RGB (or 8-bit grey) by scaling (:func:`to_rgb8`).

Conversion rules (value ranges are scaled, never clipped):

* ``1``: 0 / 255; ``L``: as is; ``P``: the palette expanded; ``RGB``, ``RGBX``, ``CMYK``,
  ``YCbCr``, ``HSV``: Pillow's colour conversion;
* 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; 16-bit grey PNGs): ``round(v / 257)``,
  so 65535 -> 255 and an 8-bit value ``b`` stored as ``257 b`` gives back ``b`` (16-bit RGB(A)
  PNGs Pillow itself opens as 8-bit RGB(A) by keeping the high byte of each sample);
* ``I`` (32-bit integer): scaled from the declared range ``[0, 2^bits - 1]`` to ``[0, 255]``,
  ``bits`` = the TIFF ``BitsPerSample`` tag when there is one, else 16 when every value fits
  in ``0..65535`` (Pillow's 16-bit PNG and PGM), else 32; a negative value is refused;
* ``F`` (32-bit float): values in ``[0, 1]`` are multiplied by 255; any other range is scaled
  linearly from the image's own ``[min, max]`` to ``[0, 255]`` (a constant image gives 0);
  NaN or infinity is refused;
* alpha (``LA``, ``PA``, ``RGBA``, premultiplied ``La``, ``RGBa``, or a ``transparency`` entry of
  ``P``, ``L``, ``RGB``): composited over :data:`ALPHA_BACKGROUND` (white), then dropped. A prepare
  summary counts the images this touched (:func:`transparency_note`, :func:`transparency_tally`):
  :data:`PARTLY_TRANSPARENT` (some pixel has alpha < 255) and :data:`WHOLLY_TRANSPARENT` (every
  pixel has alpha 0: the stored image is plain white), each image in one of the two.

Values are rounded to the nearest integer. ``LAB`` and other modes are refused as undecodable.
"""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataPrepError

#: default largest ``width * height`` (pixels) an image may declare in its header; 100 million
#: pixels is about 300 MB once decoded to RGB (Visual Genome's largest images hold ~1 million)
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
#: largest side S (pixels) of the stored S x S images: one is S * S * 3 bytes (3 MB at 1024)
MAX_STORED_IMAGE_SIZE = 1024
#: RGB colour that transparent pixels are composited over
ALPHA_BACKGROUND = (255, 255, 255)
#: the notes of a prepare summary for the images whose transparent pixels were composited
PARTLY_TRANSPARENT = "images with transparent pixels (composited over white)"
WHOLLY_TRANSPARENT = "images wholly transparent (stored plain white)"
#: the modes :func:`to_rgb8` converts
SUPPORTED_MODES = frozenset({"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV",
                             "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
#: what Pillow raises for a file that is not a decodable image (the pixel limit raises :class:`ImageTooLargeError`)
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, UnidentifiedImageError, EOFError)
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_tallies: list[Counter[str]] = []  # the active transparency_tally() counters, innermost last
_TIFF_BITS_PER_SAMPLE = 258


class ImageTooLargeError(DataPrepError):
    """An image declares more pixels than the limit (a decompression bomb, or a genuinely huge image)."""


def check_max_pixels(max_pixels: object) -> int:
    """``max_pixels`` as a positive int; raises :class:`DataPrepError` otherwise."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise DataPrepError(f"max_image_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def check_stored_image_size(image_size: object, option: str = "--image-size", smallest: int = 1) -> int:
    """``image_size`` as an int in ``smallest..MAX_STORED_IMAGE_SIZE``; raises :class:`DataPrepError` otherwise."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise DataPrepError(f"{option} must be an integer, got {image_size!r}")
    if image_size < smallest:
        raise DataPrepError(f"{option} must be at least {smallest}, got {image_size}")
    if image_size > MAX_STORED_IMAGE_SIZE:
        raise DataPrepError(f"{option} must be at most {MAX_STORED_IMAGE_SIZE} pixels (each stored image is "
                            f"S x S x 3 bytes), got {image_size}")
    return int(image_size)


@contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Pillow's own bomb check (a warning above ~89 Mpx, an error above ~179 Mpx) off: ours replaces it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def open_checked(path: str | os.PathLike, max_pixels: int) -> Iterator[Image.Image]:
    """The image at ``path`` opened lazily (header only), after checking ``width * height <= max_pixels``.

    Raises :class:`ImageTooLargeError` (one line naming the file and its declared size) above
    the limit, ``ValueError`` for a mode :func:`to_rgb8` does not convert, and one of
    :data:`DECODE_ERRORS` for a file that is not an image.
    """
    with _pillow_limit_off():
        image = Image.open(path)
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{path} declares {width} x {height} = {width * height:,} pixels ({Path(path).stat().st_size:,} "
                f"bytes on disk), above the limit of {max_pixels:,} pixels (a decompression bomb?); "
                "raise --max-image-pixels if the image is genuine")
        if image.mode not in SUPPORTED_MODES:
            raise ValueError(f"unsupported image mode {image.mode}")
        yield image
    finally:
        image.close()


def check_image(path: str | os.PathLike, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image at ``path`` once its data is checked, without a full-size decode.

    JPEG: decoded at 1/8 scale (libjpeg reads the whole entropy-coded stream, so a truncated or
    corrupt file fails as it would at full size, with 1/64 of the pixels in memory); PNG: every
    chunk's CRC and the end chunk checked (``verify``); other formats: decoded. Raises as
    :func:`open_checked`.
    """
    with open_checked(path, max_pixels) as image:
        return _checked_size(image)


def check_image_transparency(path: str | os.PathLike, max_pixels: int) -> tuple[tuple[int, int], str | None]:
    """:func:`check_image`'s size and :func:`transparency_note`'s note; an image whose header
    declares no alpha is opened once, as by :func:`check_image`."""
    with open_checked(path, max_pixels) as image:
        alpha = _has_alpha(image)
        size = _checked_size(image)
    return size, (transparency_note(path, max_pixels) if alpha else None)


def _checked_size(image: Image.Image) -> tuple[int, int]:
    size = image.size
    if image.format in ("JPEG", "MPO"):  # MPO: a camera JPEG holding several frames
        image.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
        with _pillow_limit_off():
            image.load()
    elif image.format == "PNG":
        image.verify()
    else:
        with _pillow_limit_off():
            image.load()
    return size


def decode_rgb(path: str | os.PathLike, max_pixels: int, *, keep_grayscale: bool = False) -> Image.Image:
    """Decode ``path`` once, fully, to 8-bit RGB (``L`` for one-channel modes with ``keep_grayscale``).

    Raises as :func:`open_checked`, plus ``ValueError`` for NaN/infinite or negative values.
    """
    with open_checked(path, max_pixels) as image:
        with _pillow_limit_off():
            image.load()
        if _tallies:
            kind = _transparency_kind(image)
            if kind is not None:
                _tallies[-1][kind] += 1
        converted = to_rgb8(image, keep_grayscale=keep_grayscale)
        return converted.copy() if converted is image else converted  # closing ``image`` frees its pixels


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "PA", "RGBA", "La", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def _transparency_kind(image: Image.Image) -> str | None:
    """:data:`WHOLLY_TRANSPARENT`, :data:`PARTLY_TRANSPARENT` or None (opaque) for a loaded image."""
    if not _has_alpha(image):
        return None
    if image.mode in ("La", "RGBa"):
        alpha = np.asarray(image)[..., -1]
        low, high = int(alpha.min(initial=255)), int(alpha.max(initial=0))
    else:
        low, high = image.convert("RGBA").getchannel("A").getextrema()
    if high == 0:
        return WHOLLY_TRANSPARENT
    return PARTLY_TRANSPARENT if low < 255 else None


def transparency_note(path: str | os.PathLike, max_pixels: int) -> str | None:
    """The summary note that compositing will give the image at ``path`` (:data:`PARTLY_TRANSPARENT`,
    :data:`WHOLLY_TRANSPARENT`), or None: for the check passes, which decode no pixels otherwise.
    Only an image whose header declares alpha or a transparent colour is decoded (fully, under the
    pixel limit). Raises as :func:`open_checked`."""
    with open_checked(path, max_pixels) as image:
        if not _has_alpha(image):
            return None
        with _pillow_limit_off():
            image.load()
        return _transparency_kind(image)


@contextmanager
def transparency_tally() -> Iterator[Counter[str]]:
    """Within the block, :func:`decode_rgb` counts the images it composites (note -> images)."""
    tally: Counter[str] = Counter()
    _tallies.append(tally)
    try:
        yield tally
    finally:
        _tallies.remove(tally)


def to_rgb8(image: Image.Image, *, keep_grayscale: bool = False) -> Image.Image:
    """``image`` as 8-bit ``RGB`` by the rules of the module docstring; one-channel modes give ``L``
    instead when ``keep_grayscale``. Raises ``ValueError`` for an unsupported mode or values."""
    mode = image.mode
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {mode}")
    if mode in _SIXTEEN_BIT_GREY or mode in ("I", "F"):
        grey = Image.fromarray(_scaled_to_uint8(image), mode="L")
        return grey if keep_grayscale else grey.convert("RGB")
    grey_source = mode in ("1", "L", "LA", "La")
    if mode in ("La", "RGBa"):  # premultiplied alpha: out = c + background * (255 - a) / 255
        values = np.asarray(image).astype(np.float32)
        colour, alpha = values[..., :-1], values[..., -1:]
        background = np.array(ALPHA_BACKGROUND[:colour.shape[-1]] if mode == "RGBa" else ALPHA_BACKGROUND[:1],
                              dtype=np.float32)
        out = np.rint(np.clip(colour + background * (255.0 - alpha) / 255.0, 0, 255)).astype(np.uint8)
        composed = Image.fromarray(out[..., 0], mode="L") if mode == "La" else Image.fromarray(out, mode="RGB")
        if mode == "La" and not keep_grayscale:
            return composed.convert("RGB")
        return composed
    if mode in ("LA", "PA", "RGBA") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        return rgb.convert("L") if keep_grayscale and grey_source else rgb
    if keep_grayscale and grey_source:
        return image.convert("L")
    return image if mode == "RGB" else image.convert("RGB")


def _scaled_to_uint8(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a 16-bit, 32-bit integer or float grey image (rules in the module docstring)."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_GREY:
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.mode == "I":
        values = values.astype(np.int64)
        if values.size and values.min() < 0:
            raise ValueError(f"32-bit integer image holds negative values (min {int(values.min())})")
        bits = _declared_bits(image, int(values.max()) if values.size else 0)
        top = (1 << bits) - 1
        if values.size and values.max() > top:
            raise ValueError(f"pixel value {int(values.max())} exceeds the declared {bits}-bit range")
        return ((values * 255 + top // 2) // top).astype(np.uint8)
    values = values.astype(np.float32)  # mode F
    if values.size and not np.isfinite(values).all():
        raise ValueError("float image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


def _declared_bits(image: Image.Image, largest: int) -> int:
    """Bit depth of an ``I`` image: TIFF ``BitsPerSample``, else 16 when ``largest`` fits, else 32."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and _TIFF_BITS_PER_SAMPLE in tags:
        declared = tags[_TIFF_BITS_PER_SAMPLE]
        declared = declared[0] if isinstance(declared, tuple) else declared
        if 1 <= int(declared) <= 32:
            return int(declared)
    return 16 if largest <= 0xFFFF else 32
