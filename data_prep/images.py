"""Image-classification datasets converted once to HDF5, and read back as datasets.

:func:`prepare_image_dataset` reads one dataset from its usual on-disk layout and
writes a single HDF5 file (atomically: temporary file in the target folder, then
rename)::

    /                       attrs: format="mas-triplets-images", format_version=1,
                                   dataset (registered name), image_height, image_width,
                                   channels, provenance (JSON: source root, files, seed, options)
    /class_names            (C,) UTF-8 strings; label k names class_names[k]
    /<split>/images         (N, H, W, channels) uint8, one image per row
    /<split>/labels         (N,) int64 in [0, C)

for ``split`` in ``train`` and ``test``. Images of variable size (photographs) are
resized so that the shorter side is ``image_size`` pixels and centre-cropped to
``image_size`` x ``image_size`` (the paper's protocol stores 256 and crops 224 at
training time); fixed-size sources keep their size unless ``image_size`` is given.

:func:`open_image_dataset` returns an :class:`ImageH5`, whose :meth:`ImageH5.view`
gives a map-style dataset (``len`` and ``[i] -> (image, label)``, usable by a torch
``DataLoader``) over one split and a subset of classes, relabelled 0..k-1 in the
order asked for, optionally subsampled per class (deterministically by seed).

Sources (``SOURCES`` lists them with the layout each expects under ``root``):

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
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_output
from .errors import DataPrepError, MissingDatasetError
from .idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    fashion_mnist_available,
    load_fashion_mnist,
)

FORMAT_NAME = "mas-triplets-images"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
DEFAULT_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")
PHOTO_DEFAULT_SIZE = 256


class ImageFormatError(DataPrepError):
    """An image HDF5 file is not of this format, of another version, or is truncated."""


@dataclass(frozen=True)
class SourceSpec:
    """A registered dataset source: how to read it and the layout expected under ``root``."""

    name: str
    layout: str
    variable_size: bool
    needs_root: bool = True


@dataclass
class _Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class _Loaded:
    class_names: list[str]
    splits: dict[str, _Split]
    files: list[str]


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec("fashion_mnist", "ROOT/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                   "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (Debian: apt-get install "
                   "dataset-fashion-mnist, ROOT=/usr/share/datasets/fashion-mnist)", False, needs_root=False),
        SourceSpec("digits", "none: scikit-learn's bundled load_digits (8x8, upsampled)", False, needs_root=False),
        SourceSpec("font_letters", "ROOT = a folder of .ttf/.otf fonts (default: the DejaVu fonts in "
                   "/usr/share/fonts/truetype/dejavu)", False, needs_root=False),
        SourceSpec("flowers102", "ROOT/flowers-102/jpg/image_*.jpg, ROOT/flowers-102/imagelabels.mat, "
                   "ROOT/flowers-102/setid.mat (torchvision Flowers102 layout)", True),
        SourceSpec("stanford_cars", "ROOT/stanford_cars/{cars_train,cars_test}/*.jpg and "
                   "ROOT/stanford_cars/devkit/{cars_meta,cars_train_annos}.mat, "
                   "ROOT/stanford_cars/cars_test_annos_withlabels.mat (torchvision StanfordCars layout)", True),
        SourceSpec("fgvc_aircraft", "ROOT/fgvc-aircraft-2013b/data/images/*.jpg and "
                   "ROOT/fgvc-aircraft-2013b/data/images_variant_{trainval,test}.txt, variants.txt "
                   "(torchvision FGVCAircraft layout)", True),
        SourceSpec("svhn", "ROOT/train_32x32.mat and ROOT/test_32x32.mat (torchvision SVHN layout)", False),
        SourceSpec("cifar10", "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
                   "(torchvision CIFAR10 layout)", False),
        SourceSpec("cifar100", "ROOT/cifar-100-python/{train,test,meta} (torchvision CIFAR100 layout)", False),
        SourceSpec("cub200", "ROOT/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,"
                   "classes.txt,images/<class>/*.jpg} (CUB-200-2011 archive unpacked)", True),
        SourceSpec("mit_indoor67", "ROOT/Images/<class>/*.jpg, ROOT/TrainImages.txt, ROOT/TestImages.txt "
                   "(MIT Indoor 67 archive plus its train/test lists)", True),
        SourceSpec("voc_actions", "ROOT/VOC2012/{JPEGImages/*.jpg,Annotations/*.xml,"
                   "ImageSets/Action/train.txt,ImageSets/Action/val.txt} (PASCAL VOC 2012 trainval; "
                   "test = the val list; one sample per annotated person box)", True),
        SourceSpec("chars74k", "ROOT/English/Fnt/Sample001..Sample062/*.png (Chars74K EnglishFnt.tgz "
                   "unpacked; split 80/20 per class by seed)", False),
        SourceSpec("image_folder", "ROOT/train/<class>/*.{jpg,png} and ROOT/test/<class>/*.{jpg,png}", True),
    )
}


# --------------------------------------------------------------------------- public API


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
) -> Path:
    """Convert dataset ``name`` read under ``root`` to the HDF5 file ``out`` and return its path.

    ``image_size`` (pixels): photographs are resized (shorter side) and centre-cropped to
    ``image_size`` x ``image_size`` (default 256); fixed-size sources are resized to it only
    when given. ``split`` lists the splits to write (``"train"``, ``"test"``). ``seed`` makes
    random splits and the letter renderings reproducible. ``characters``,
    ``renders_per_class`` (train, test) and ``render_canvas`` (pixels) configure
    ``font_letters`` only. The write is atomic; an existing ``out`` is replaced.
    """
    if name not in SOURCES:
        raise DataPrepError(_unknown_source_message(name))
    spec = SOURCES[name]
    splits = tuple(split)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataPrepError(f"split must name one or both of {list(SPLITS)}, got {list(splits)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise DataPrepError(f"image_size must be an integer of at least 4 pixels, got {image_size!r}")
    if spec.needs_root and root is None:
        raise MissingDatasetError(f"dataset {name!r} needs --root; expected layout: {spec.layout}")
    size = image_size if image_size is not None else (PHOTO_DEFAULT_SIZE if spec.variable_size else None)
    root_path = Path(root) if root is not None else None
    reader = _READERS[name]
    options = {"seed": seed, "characters": characters, "renders_per_class": list(renders_per_class),
               "render_canvas": render_canvas}
    loaded = reader(root_path, size, splits, options)
    if size is not None:
        for part in loaded.splits.values():
            if part.images.shape[1:3] != (size, size):
                part.images = _resize_all(part.images, size)
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
    }
    out_path = Path(out)
    _write_h5(out_path, name, loaded, provenance)
    return out_path


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


# --------------------------------------------------------------------------- writing


def _write_h5(out: Path, name: str, loaded: _Loaded, provenance: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = {s.images.shape[1:] for s in loaded.splits.values()}
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
            handle.create_dataset("class_names", data=np.array(loaded.class_names, dtype=object),
                                  dtype=h5py.string_dtype("utf-8"))
            for split_name, part in loaded.splits.items():
                group = handle.create_group(split_name)
                count = part.images.shape[0]
                chunk = (max(1, min(count, max(1, (1 << 20) // max(1, height * width * channels)))),
                         height, width, channels)
                group.create_dataset("images", data=part.images.astype(np.uint8, copy=False),
                                     chunks=chunk if count else None, compression="lzf" if count else None)
                group.create_dataset("labels", data=part.labels.astype(np.int64, copy=False))


# --------------------------------------------------------------------------- image helpers


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pil_to_array(image: Image.Image, size: int | None) -> np.ndarray:
    """RGB/L image → (H, W, C) uint8; with ``size``: shorter side to ``size``, centre crop."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if size is not None:
        image = _resize_shorter_and_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _resize_shorter_and_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out[i] = _pil_to_array(pil, size)
    return out


def _stack(arrays: list[np.ndarray], labels: list[int], what: str) -> _Split:
    if not arrays:
        raise MissingDatasetError(f"{what}: no images found")
    channels = {a.shape[2] for a in arrays}
    if len(channels) > 1:  # mixed grayscale and colour photographs: promote to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return _Split(np.stack(arrays).astype(np.uint8), np.asarray(labels, dtype=np.int64))


def _open_image(path: Path, layout: str, name: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise MissingDatasetError(f"{name}: image {path} is missing (dataset incomplete?); "
                                  f"expected layout: {layout}") from None
    except OSError as exc:
        raise MissingDatasetError(f"{name}: image {path} is unreadable ({exc}); the download may be "
                                  f"incomplete; expected layout: {layout}") from None


def _require(paths: Iterable[Path], name: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingDatasetError(f"dataset {name!r} not found or incomplete (missing {missing[0]}"
                                  f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
                                  f"expected layout: {SOURCES[name].layout}")


def _unknown_source_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(SOURCES), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown image dataset {name!r}{hint} (known: {', '.join(SOURCES)})"


# --------------------------------------------------------------------------- offline sources


def _read_fashion_mnist(root: Path | None, size: int | None, splits: Sequence[str],
                        options: dict[str, Any]) -> _Loaded:
    root = root if root is not None else FASHION_MNIST_DIR
    for candidate in (root, root / "FashionMNIST" / "raw", root / "raw"):  # also torchvision's layout
        if fashion_mnist_available(candidate):
            root = candidate
            break
    result: dict[str, _Split] = {}
    for split_name in splits:
        try:
            images, labels = load_fashion_mnist(root, split_name)
        except MissingDatasetError as exc:
            raise MissingDatasetError(f"dataset 'fashion_mnist' not found or incomplete ({exc}); "
                                      f"expected layout: {SOURCES['fashion_mnist'].layout}") from None
        result[split_name] = _Split(images[:, :, :, None].astype(np.uint8), labels.astype(np.int64))
    return _Loaded(list(FASHION_MNIST_CLASSES), result, [str(root)])


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(members.size * test_fraction)
        test_rows.append(members[:cut])
        train_rows.append(members[cut:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def _read_digits(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> _Loaded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, :, :, None]
    labels = bunch.target.astype(np.int64)
    train_rows, test_rows = _stratified_split(labels, 1.0 / 3.0, int(options["seed"]))
    if size is not None:
        images = _resize_all(images, size)
    rows = {"train": train_rows, "test": test_rows}
    result = {s: _Split(images[rows[s]], labels[rows[s]]) for s in splits}
    return _Loaded([str(d) for d in range(10)], result, ["sklearn.datasets.load_digits"])


def list_fonts(font_dir: str | os.PathLike | None = None) -> list[Path]:
    """TrueType/OpenType font files under ``font_dir`` (default: DejaVu, then all system fonts), sorted."""
    dirs = [Path(font_dir)] if font_dir is not None else [Path(d) for d in DEFAULT_FONT_DIRS]
    for directory in dirs:
        if directory.is_dir():
            fonts = sorted(p for p in directory.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
            if fonts:
                return fonts
    return []


def render_character(character: str, font_path: Path, rng: np.random.Generator, canvas: int,
                     size: int) -> np.ndarray:
    """Render ``character`` dark-on-light like Chars74K's font images, then invert to white-on-black.

    Random augmentation (drawn from ``rng``): glyph height 55-80 % of the canvas, rotation
    uniform in ±12 degrees, shift uniform in ±8 % of the canvas. Returns (size, size, 1) uint8.
    """
    glyph_px = int(canvas * rng.uniform(0.55, 0.80))
    font = ImageFont.truetype(str(font_path), glyph_px)
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), character, font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * canvas
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * canvas
    draw.text((x, y), character, fill=255, font=font)
    image = image.rotate(float(rng.uniform(-12.0, 12.0)), resample=Image.BILINEAR, fillcolor=0)
    image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)[:, :, None]


def _read_font_letters(root: Path | None, size: int | None, splits: Sequence[str],
                       options: dict[str, Any]) -> _Loaded:
    fonts = list_fonts(root)
    if len(fonts) < 2:
        where = root if root is not None else " or ".join(DEFAULT_FONT_DIRS)
        raise MissingDatasetError(f"dataset 'font_letters' needs at least 2 fonts, found {len(fonts)} in {where}; "
                                  f"expected layout: {SOURCES['font_letters'].layout} (Debian: fonts-dejavu-core)")
    characters = str(options["characters"])
    if not characters or len(set(characters)) != len(characters):
        raise DataPrepError(f"characters must be distinct and non-empty, got {characters!r}")
    per_class = dict(zip(SPLITS, (int(n) for n in options["renders_per_class"])))
    if min(per_class.values()) < 1:
        raise DataPrepError(f"renders_per_class must be positive, got {options['renders_per_class']}")
    # Hold out every fourth font for the test split, so that test letters come from unseen fonts.
    font_sets = {"train": [f for i, f in enumerate(fonts) if i % 4 != 3],
                 "test": [f for i, f in enumerate(fonts) if i % 4 == 3]}
    out_size = size if size is not None else 28
    canvas = int(options["render_canvas"])
    result: dict[str, _Split] = {}
    for split_index, split_name in enumerate(SPLITS):
        if split_name not in splits:
            continue
        rng = np.random.default_rng([int(options["seed"]), split_index])
        arrays, labels = [], []
        split_fonts = font_sets[split_name]
        for label, character in enumerate(characters):
            for k in range(per_class[split_name]):
                font = split_fonts[(k + label) % len(split_fonts)]
                arrays.append(render_character(character, font, rng, canvas, out_size))
                labels.append(label)
        result[split_name] = _stack(arrays, labels, "font_letters")
    return _Loaded(list(characters), result, [str(f) for f in fonts])


# --------------------------------------------------------------------------- torchvision sources


def _torchvision_reader(name: str, class_name: str, split_args: dict[str, list[dict[str, Any]]]) -> Callable[..., _Loaded]:
    def read(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> _Loaded:
        import torchvision.datasets as tv_datasets

        cls = getattr(tv_datasets, class_name)
        result: dict[str, _Split] = {}
        class_names: list[str] | None = None
        for split_name in splits:
            arrays: list[np.ndarray] = []
            labels: list[int] = []
            for kwargs in split_args[split_name]:
                try:
                    dataset = cls(str(root), download=False, **kwargs)
                except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise MissingDatasetError(f"dataset {name!r} not found or incomplete under {root} ({reason}); "
                                              f"expected layout: {SOURCES[name].layout}") from None
                if class_names is None:
                    class_names = _torchvision_class_names(dataset)
                for index in range(len(dataset)):
                    try:
                        image, label = dataset[index]
                    except (OSError, FileNotFoundError) as exc:
                        raise MissingDatasetError(f"dataset {name!r}: sample {index} unreadable ({exc}); the "
                                                  f"download may be incomplete; expected layout: "
                                                  f"{SOURCES[name].layout}") from None
                    arrays.append(_pil_to_array(image, size))
                    labels.append(int(label))
            result[split_name] = _stack(arrays, labels, name)
        if class_names is None or len(class_names) <= max(int(s.labels.max()) for s in result.values()):
            count = 1 + max(int(s.labels.max()) for s in result.values())
            class_names = [str(i) for i in range(count)]
        return _Loaded(class_names, result, [str(root)])

    return read


def _torchvision_class_names(dataset: Any) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    return None


# --------------------------------------------------------------------------- image-folder sources


def _read_listed(paths_labels: list[tuple[Path, int]], size: int | None, name: str) -> _Split:
    arrays, labels = [], []
    for path, label in paths_labels:
        arrays.append(_pil_to_array(_open_image(path, SOURCES[name].layout, name), size))
        labels.append(label)
    return _stack(arrays, labels, name)


def _read_cub200(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> _Loaded:
    assert root is not None
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    names = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    _require([base / n for n in names] + [base / "images"], "cub200")

    def table(file_name: str) -> dict[int, str]:
        rows = {}
        for line in (base / file_name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                key, value = line.split(maxsplit=1)
                rows[int(key)] = value.strip()
        return rows

    images, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    classes = table("classes.txt")
    class_names = [re.sub(r"^\d+\.", "", classes[k]) for k in sorted(classes)]
    if set(images) != set(labels) or set(images) != set(is_train):
        raise MissingDatasetError("cub200: images.txt, image_class_labels.txt and train_test_split.txt list "
                                  f"different image ids; expected layout: {SOURCES['cub200'].layout}")
    result = {}
    for split_name in splits:
        wanted = "1" if split_name == "train" else "0"
        listed = [(base / "images" / images[i], int(labels[i]) - 1) for i in sorted(images) if is_train[i] == wanted]
        result[split_name] = _read_listed(listed, size, "cub200")
    return _Loaded(class_names, result, [str(base / n) for n in names])


def _read_mit_indoor67(root: Path | None, size: int | None, splits: Sequence[str],
                       options: dict[str, Any]) -> _Loaded:
    assert root is not None
    lists = {"train": root / "TrainImages.txt", "test": root / "TestImages.txt"}
    _require([root / "Images"] + [lists[s] for s in splits], "mit_indoor67")
    class_names = sorted(p.name for p in (root / "Images").iterdir() if p.is_dir())
    lookup = {c: i for i, c in enumerate(class_names)}
    result = {}
    for split_name in splits:
        listed = []
        for line in lists[split_name].read_text(encoding="utf-8").splitlines():
            relative = line.strip()
            if relative:
                class_name = relative.split("/")[0]
                if class_name not in lookup:
                    raise MissingDatasetError(f"mit_indoor67: {lists[split_name].name} names class {class_name!r} "
                                              f"with no folder; expected layout: {SOURCES['mit_indoor67'].layout}")
                listed.append((root / "Images" / relative, lookup[class_name]))
        result[split_name] = _read_listed(listed, size, "mit_indoor67")
    return _Loaded(class_names, result, [str(lists[s]) for s in splits])


VOC_ACTIONS = ("jumping", "phoning", "playinginstrument", "reading", "ridingbike", "ridinghorse", "running",
               "takingphoto", "usingcomputer", "walking")


def _read_voc_actions(root: Path | None, size: int | None, splits: Sequence[str],
                      options: dict[str, Any]) -> _Loaded:
    assert root is not None
    base = next((c for c in (root / "VOCdevkit" / "VOC2012", root / "VOC2012") if c.is_dir()), root)
    lists = {"train": base / "ImageSets" / "Action" / "train.txt", "test": base / "ImageSets" / "Action" / "val.txt"}
    _require([base / "JPEGImages", base / "Annotations"] + [lists[s] for s in splits], "voc_actions")
    result = {}
    for split_name in splits:
        arrays, labels = [], []
        for image_id in (line.strip() for line in lists[split_name].read_text().splitlines()):
            if not image_id:
                continue
            annotation = base / "Annotations" / f"{image_id}.xml"
            _require([annotation], "voc_actions")
            photo = None
            for person in ElementTree.parse(annotation).getroot().iter("object"):
                actions = person.find("actions")
                box = person.find("bndbox")
                if actions is None or box is None:
                    continue
                active = [a for a in VOC_ACTIONS if (actions.findtext(a) or "0").strip() == "1"]
                if len(active) != 1:  # "other" or ambiguous persons are skipped
                    continue
                if photo is None:
                    photo = _open_image(base / "JPEGImages" / f"{image_id}.jpg", SOURCES["voc_actions"].layout,
                                        "voc_actions")
                coords = [int(float(box.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax")]
                crop = photo.crop((max(0, coords[0] - 1), max(0, coords[1] - 1), coords[2], coords[3]))
                arrays.append(_pil_to_array(crop, size))
                labels.append(VOC_ACTIONS.index(active[0]))
        result[split_name] = _stack(arrays, labels, "voc_actions")
    return _Loaded(list(VOC_ACTIONS), result, [str(lists[s]) for s in splits])


CHARS74K_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _read_chars74k(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> _Loaded:
    assert root is not None
    base = root / "English" / "Fnt" if (root / "English" / "Fnt").is_dir() else root
    folders = [base / f"Sample{k:03d}" for k in range(1, 63)]
    _require(folders, "chars74k")
    paths_labels = [(p, label) for label, folder in enumerate(folders) for p in sorted(folder.glob("*.png"))]
    labels = np.array([label for _, label in paths_labels], dtype=np.int64)
    train_rows, test_rows = _stratified_split(labels, 0.2, int(options["seed"]))
    rows = {"train": train_rows, "test": test_rows}
    out_size = size if size is not None else 32
    result = {}
    for split_name in splits:
        listed = [paths_labels[i] for i in rows[split_name]]
        arrays = [_pil_to_array(_open_image(p, SOURCES["chars74k"].layout, "chars74k").convert("L"), out_size)
                  for p, _ in listed]
        result[split_name] = _stack(arrays, [label for _, label in listed], "chars74k")
    return _Loaded(list(CHARS74K_CLASSES), result, [str(base)])


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp")


def _read_image_folder(root: Path | None, size: int | None, splits: Sequence[str],
                       options: dict[str, Any]) -> _Loaded:
    assert root is not None
    _require([root / s for s in splits], "image_folder")
    class_sets = [sorted(p.name for p in (root / s).iterdir() if p.is_dir()) for s in splits]
    class_names = sorted(set().union(*class_sets))
    if not class_names:
        raise MissingDatasetError(f"image_folder: no class folders under {root}; expected layout: "
                                  f"{SOURCES['image_folder'].layout}")
    lookup = {c: i for i, c in enumerate(class_names)}
    result = {}
    for split_name in splits:
        listed = [(p, lookup[c.name]) for c in sorted((root / split_name).iterdir()) if c.is_dir()
                  for p in sorted(c.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
        result[split_name] = _read_listed(listed, size, "image_folder")
    return _Loaded(class_names, result, [str(root)])


_READERS: dict[str, Callable[[Path | None, int | None, Sequence[str], dict[str, Any]], _Loaded]] = {
    "fashion_mnist": _read_fashion_mnist,
    "digits": _read_digits,
    "font_letters": _read_font_letters,
    "flowers102": _torchvision_reader("flowers102", "Flowers102", {"train": [{"split": "train"}, {"split": "val"}],
                                                     "test": [{"split": "test"}]}),
    "stanford_cars": _torchvision_reader("stanford_cars", "StanfordCars", {"train": [{"split": "train"}], "test": [{"split": "test"}]}),
    "fgvc_aircraft": _torchvision_reader("fgvc_aircraft", "FGVCAircraft", {"train": [{"split": "trainval"}],
                                                          "test": [{"split": "test"}]}),
    "svhn": _torchvision_reader("svhn", "SVHN", {"train": [{"split": "train"}], "test": [{"split": "test"}]}),
    "cifar10": _torchvision_reader("cifar10", "CIFAR10", {"train": [{"train": True}], "test": [{"train": False}]}),
    "cifar100": _torchvision_reader("cifar100", "CIFAR100", {"train": [{"train": True}], "test": [{"train": False}]}),
    "cub200": _read_cub200,
    "mit_indoor67": _read_mit_indoor67,
    "voc_actions": _read_voc_actions,
    "chars74k": _read_chars74k,
    "image_folder": _read_image_folder,
}


def iter_sources() -> Iterator[SourceSpec]:
    """The registered sources, in registration order."""
    return iter(SOURCES.values())
