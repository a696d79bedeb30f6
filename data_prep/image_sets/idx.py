"""Reader of IDX files (the MNIST / Fashion-MNIST format), plain or gzipped.

An IDX file is a big-endian header followed by the raw array:

    bytes 0-1  zero
    byte  2    element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3    number of dimensions d
    then d big-endian uint32 sizes, then prod(sizes) elements, row-major, big-endian

:func:`load_fashion_mnist` reads one split of Fashion-MNIST from a folder holding
``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (each optionally ending in
``.gz``; Debian's ``dataset-fashion-mnist`` installs them gzipped in
``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import DataPrepError, MissingDatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(DataPrepError):
    """A file is not a valid IDX file (bad magic number, truncated data)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into a native-endian numpy array of its shape."""
    path = Path(path)
    if not path.is_file():
        raise MissingDatasetError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise IDXFormatError(f"{path}: cannot read ({exc}); the file is corrupt, download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = header_end + count * dtype.itemsize
    if len(raw) != expected:
        raise IDXFormatError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file has {len(raw)} bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise MissingDatasetError(
        f"{root} lacks {stem}[.gz]; expected the four Fashion-MNIST IDX files there "
        "(install Debian's dataset-fashion-mnist or point to a folder that has them)"
    )


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a Fashion-MNIST split.

    ``images`` is uint8 ``[N, 28, 28]`` (pixel intensities 0-255), ``labels`` int64 ``[N]``
    in 0-9. ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000).
    """
    if split not in ("train", "test"):
        raise DataPrepError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise MissingDatasetError(
            f"Fashion-MNIST folder {root} does not exist; install Debian's dataset-fashion-mnist "
            "or pass the folder holding the IDX files"
        )
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{root}: images {images.shape} and labels {labels.shape} do not form a dataset "
            "([N, H, W] images with N labels)"
        )
    return images, labels.astype(np.int64)


def fashion_mnist_available(root: str | os.PathLike = FASHION_MNIST_DIR) -> bool:
    """True when all four Fashion-MNIST IDX files (plain or gzipped) are in ``root``."""
    root = Path(root)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return all((root / stem).is_file() or (root / f"{stem}.gz").is_file() for stem in stems)
