"""The image-classification sources :mod:`data_prep.image_sets.prepare` converts, each read from its usual
on-disk layout into memory (uint8 images, int64 labels, class names): ``SOURCES`` lists them
with the layout each expects under ``root``; ``READERS`` maps a name to its reader.

Variable-size photographs are resized (shorter side to ``size``) and centre-cropped to
``size`` x ``size``. Nothing is downloaded: torchvision classes are read with ``download=False``.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import DataPrepError, MissingDatasetError
from ..image_decode import DECODE_ERRORS, decode_rgb, to_rgb8
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_available, load_fashion_mnist
from .image_file import SPLITS

DEFAULT_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")


@dataclass(frozen=True)
class SourceSpec:
    """A registered dataset source: how to read it and the layout expected under ``root``."""

    name: str
    layout: str
    variable_size: bool
    needs_root: bool = True


@dataclass
class ImageSplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class LoadedImages:
    class_names: list[str]
    splits: dict[str, ImageSplit]
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


def _pil_to_array(image: Image.Image, size: int | None) -> np.ndarray:
    """Image → (H, W, C) uint8, C = 1 for one-channel modes, else 3 (converted by
    :func:`~data_prep.image_decode.to_rgb8`); with ``size``: shorter side to ``size``, centre crop."""
    if image.mode not in ("L", "RGB"):
        image = to_rgb8(image, keep_grayscale=True)
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


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out[i] = _pil_to_array(pil, size)
    return out


def _stack(arrays: list[np.ndarray], labels: list[int], what: str) -> ImageSplit:
    if not arrays:
        raise MissingDatasetError(f"{what}: no images found")
    channels = {a.shape[2] for a in arrays}
    if len(channels) > 1:  # mixed grayscale and colour photographs: promote to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return ImageSplit(np.stack(arrays).astype(np.uint8), np.asarray(labels, dtype=np.int64))


def _open_image(path: Path, layout: str, name: str, max_pixels: int) -> Image.Image:
    """Decode ``path`` once (:func:`~data_prep.image_decode.decode_rgb`: the pixel limit checked from
    the header; ``L`` for one-channel images, else ``RGB``); one-line errors for a missing or bad file."""
    try:
        return decode_rgb(path, max_pixels, keep_grayscale=True)
    except FileNotFoundError:
        raise MissingDatasetError(f"{name}: image {path} is missing (dataset incomplete?); "
                                  f"expected layout: {layout}") from None
    except DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingDatasetError(f"{name}: image {path} is unreadable ({reason}); the download may be "
                                  f"incomplete; expected layout: {layout}") from None


def _require(paths: Iterable[Path], name: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingDatasetError(f"dataset {name!r} not found or incomplete (missing {missing[0]}"
                                  f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
                                  f"expected layout: {SOURCES[name].layout}")


def unknown_source_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(SOURCES), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown image dataset {name!r}{hint} (known: {', '.join(SOURCES)})"


# --------------------------------------------------------------------------- offline sources


def _read_fashion_mnist(root: Path | None, size: int | None, splits: Sequence[str],
                        options: dict[str, Any]) -> LoadedImages:
    root = root if root is not None else FASHION_MNIST_DIR
    for candidate in (root, root / "FashionMNIST" / "raw", root / "raw"):  # also torchvision's layout
        if fashion_mnist_available(candidate):
            root = candidate
            break
    result: dict[str, ImageSplit] = {}
    for split_name in splits:
        try:
            images, labels = load_fashion_mnist(root, split_name)
        except MissingDatasetError as exc:
            raise MissingDatasetError(f"dataset 'fashion_mnist' not found or incomplete ({exc}); "
                                      f"expected layout: {SOURCES['fashion_mnist'].layout}") from None
        result[split_name] = ImageSplit(images[:, :, :, None].astype(np.uint8), labels.astype(np.int64))
    return LoadedImages(list(FASHION_MNIST_CLASSES), result, [str(root)])


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(members.size * test_fraction)
        test_rows.append(members[:cut])
        train_rows.append(members[cut:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: uint8 images [1797, 8, 8] (its 0–16 grey levels
    scaled to 0–255, ``round(v · 255/16)``) and int64 labels 0–9."""
    from sklearn.datasets import load_digits  # heavy (about 1 s to import): only the digit sources need it

    bunch = load_digits()
    return np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), bunch.target.astype(np.int64)


def _read_digits(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> LoadedImages:
    images, labels = digit_images()
    images = images[:, :, :, None]
    train_rows, test_rows = _stratified_split(labels, 1.0 / 3.0, int(options["seed"]))
    if size is not None:
        images = resize_all(images, size)
    rows = {"train": train_rows, "test": test_rows}
    result = {s: ImageSplit(images[rows[s]], labels[rows[s]]) for s in splits}
    return LoadedImages([str(d) for d in range(10)], result, ["sklearn.datasets.load_digits"])


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
                       options: dict[str, Any]) -> LoadedImages:
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
    result: dict[str, ImageSplit] = {}
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
    return LoadedImages(list(characters), result, [str(f) for f in fonts])


# --------------------------------------------------------------------------- torchvision sources


def _torchvision_reader(name: str, class_name: str, split_args: dict[str, list[dict[str, Any]]]) -> Callable[..., LoadedImages]:
    def read(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> LoadedImages:
        import torchvision.datasets as tv_datasets

        cls = getattr(tv_datasets, class_name)
        max_pixels = int(options["max_image_pixels"])
        # the classes that read image files take a loader: ours applies the pixel limit and the mode conversion
        loader = ({"loader": lambda path: decode_rgb(path, max_pixels)}
                  if "loader" in inspect.signature(cls).parameters else {})
        result: dict[str, ImageSplit] = {}
        class_names: list[str] | None = None
        for split_name in splits:
            arrays: list[np.ndarray] = []
            labels: list[int] = []
            for kwargs in split_args[split_name]:
                try:
                    dataset = cls(str(root), download=False, **kwargs, **loader)
                except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise MissingDatasetError(f"dataset {name!r} not found or incomplete under {root} ({reason}); "
                                              f"expected layout: {SOURCES[name].layout}") from None
                if class_names is None:
                    class_names = _torchvision_class_names(dataset)
                for index in range(len(dataset)):
                    try:
                        image, label = dataset[index]
                    except DECODE_ERRORS as exc:
                        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        raise MissingDatasetError(f"dataset {name!r}: sample {index} unreadable ({reason}); the "
                                                  f"download may be incomplete; expected layout: "
                                                  f"{SOURCES[name].layout}") from None
                    arrays.append(_pil_to_array(image, size))
                    labels.append(int(label))
            result[split_name] = _stack(arrays, labels, name)
        if class_names is None or len(class_names) <= max(int(s.labels.max()) for s in result.values()):
            count = 1 + max(int(s.labels.max()) for s in result.values())
            class_names = [str(i) for i in range(count)]
        return LoadedImages(class_names, result, [str(root)])

    return read


def _torchvision_class_names(dataset: Any) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    return None


# --------------------------------------------------------------------------- image-folder sources


def _read_listed(paths_labels: list[tuple[Path, int]], size: int | None, name: str, max_pixels: int) -> ImageSplit:
    arrays, labels = [], []
    for path, label in paths_labels:
        arrays.append(_pil_to_array(_open_image(path, SOURCES[name].layout, name, max_pixels), size))
        labels.append(label)
    return _stack(arrays, labels, name)


def _read_cub200(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> LoadedImages:
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
        result[split_name] = _read_listed(listed, size, "cub200", options["max_image_pixels"])
    return LoadedImages(class_names, result, [str(base / n) for n in names])


def _read_mit_indoor67(root: Path | None, size: int | None, splits: Sequence[str],
                       options: dict[str, Any]) -> LoadedImages:
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
        result[split_name] = _read_listed(listed, size, "mit_indoor67", options["max_image_pixels"])
    return LoadedImages(class_names, result, [str(lists[s]) for s in splits])


VOC_ACTIONS = ("jumping", "phoning", "playinginstrument", "reading", "ridingbike", "ridinghorse", "running",
               "takingphoto", "usingcomputer", "walking")


def _read_voc_actions(root: Path | None, size: int | None, splits: Sequence[str],
                      options: dict[str, Any]) -> LoadedImages:
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
                                        "voc_actions", options["max_image_pixels"])
                coords = [int(float(box.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax")]
                crop = photo.crop((max(0, coords[0] - 1), max(0, coords[1] - 1), coords[2], coords[3]))
                arrays.append(_pil_to_array(crop, size))
                labels.append(VOC_ACTIONS.index(active[0]))
        result[split_name] = _stack(arrays, labels, "voc_actions")
    return LoadedImages(list(VOC_ACTIONS), result, [str(lists[s]) for s in splits])


CHARS74K_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _read_chars74k(root: Path | None, size: int | None, splits: Sequence[str], options: dict[str, Any]) -> LoadedImages:
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
        arrays = [_pil_to_array(_open_image(p, SOURCES["chars74k"].layout, "chars74k",
                                               options["max_image_pixels"]).convert("L"), out_size)
                  for p, _ in listed]
        result[split_name] = _stack(arrays, [label for _, label in listed], "chars74k")
    return LoadedImages(list(CHARS74K_CLASSES), result, [str(base)])


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp")


def _read_image_folder(root: Path | None, size: int | None, splits: Sequence[str],
                       options: dict[str, Any]) -> LoadedImages:
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
        result[split_name] = _read_listed(listed, size, "image_folder", options["max_image_pixels"])
    return LoadedImages(class_names, result, [str(root)])


READERS: dict[str, Callable[[Path | None, int | None, Sequence[str], dict[str, Any]], LoadedImages]] = {
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
