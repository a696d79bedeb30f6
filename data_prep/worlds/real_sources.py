"""The object images of the real-image world (:mod:`data_prep.worlds.real`): Fashion-MNIST
clothing, scikit-learn's handwritten digits and capital letters rendered from the DejaVu fonts.

Each object category is a *pool* of different real images, all bright ink on black (uint8,
0 = background, 255 = full ink), so that an instance is drawn by using its pixels as the
alpha of its colour tint. The three sources:

==========  =======================================  ==========================================
source      categories                               pool of each category
==========  =======================================  ==========================================
clothing    t shirt, trousers, ... (10)              Fashion-MNIST train + test images of the
                                                     class (7,000, 28 x 28); Debian package
                                                     ``dataset-fashion-mnist``
digits      zero ... nine (10)                       scikit-learn's ``load_digits`` images of the
                                                     digit (about 180, 8 x 8, 0-16 scaled to 0-255)
letters     letter a ... letter z (26)               ``LETTER_RENDERS`` renders of the capital
                                                     letter, fonts in turn, each with a random size,
                                                     shift and slant (28 x 28)
==========  =======================================  ==========================================

The categories are ranked by interleaving the sources (clothing 1, digit 1, letter 1,
clothing 2, ...): the world draws them with Zipf weights by this rank, so each source has
frequent and rare categories.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataPrepError, MissingDatasetError
from ..image_sets.idx import FASHION_MNIST_DIR, fashion_mnist_available, load_fashion_mnist
from ..image_sets.sources import DEFAULT_FONT_DIRS, digit_images, list_fonts, render_character

SOURCE_NAMES: tuple[str, ...] = ("clothing", "digits", "letters")
CLOTHING_NAMES: tuple[str, ...] = (
    "t shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CLOTHING_SYNSETS: tuple[str, ...] = (
    "jersey.n.03", "trouser.n.01", "sweater.n.01", "dress.n.01", "coat.n.01",
    "sandal.n.01", "shirt.n.01", "gym_shoe.n.01", "bag.n.04", "boot.n.01",
)
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTER_NAMES: tuple[str, ...] = tuple(f"letter {c.lower()}" for c in LETTERS)
#: renders of each letter (fonts in turn, random size/shift/slant): the letter pools' size
LETTER_RENDERS = 160
LETTER_CANVAS = 64
SOURCE_IMAGE_SIZE = 28
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`"


@dataclass(frozen=True)
class CategoryPool:
    """The real images of one category: ``images`` uint8 [n, h, w] (ink bright on black) and
    ``source_index`` int64 [n], each image's row in its source (Fashion-MNIST: train rows
    0-59,999 then test rows 60,000-69,999; digits: the ``load_digits`` row; letters: the render number)."""

    name: str
    source: str
    synset: str
    images: np.ndarray
    source_index: np.ndarray


def parse_sources(sources: str | Sequence[str]) -> tuple[str, ...]:
    """The object sources named in ``sources`` (a comma-separated string or a sequence) in the
    canonical order of ``SOURCE_NAMES``; raises :class:`DataPrepError` on an unknown or empty list."""
    names = [s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources) if s.strip()]
    unknown = [name for name in names if name not in SOURCE_NAMES]
    if unknown or not names:
        raise DataPrepError(f"object sources must be a comma-separated subset of {','.join(SOURCE_NAMES)}, "
                            f"got {','.join(names) or 'nothing'}")
    return tuple(name for name in SOURCE_NAMES if name in names)


def _source_categories(source: str) -> list[tuple[str, str]]:
    if source == "clothing":
        return list(zip(CLOTHING_NAMES, CLOTHING_SYNSETS))
    if source == "digits":
        return [(name, f"{name}.n.01") for name in DIGIT_NAMES]
    return [(name, "letter.n.02") for name in LETTER_NAMES]


def ranked_categories(sources: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, synset)`` of every category of ``sources``, in Zipf rank order (sources interleaved)."""
    lists = [_source_categories(source) for source in parse_sources(sources)]
    ranked = []
    for position in range(max(len(items) for items in lists)):
        ranked.extend(items[position] for items in lists if position < len(items))
    return ranked


def _clothing_pools(root: Path) -> list[CategoryPool]:
    if not fashion_mnist_available(root):
        raise MissingDatasetError(f"Fashion-MNIST not found in {root}: {INSTALL_HINT} "
                                  "(or leave clothing out: --objects digits,letters)")
    train_images, train_labels = load_fashion_mnist(root, "train")
    test_images, test_labels = load_fashion_mnist(root, "test")
    images = np.concatenate([train_images, test_images])
    labels = np.concatenate([train_labels, test_labels])
    pools = []
    for label, (name, synset) in enumerate(_source_categories("clothing")):
        rows = np.flatnonzero(labels == label)
        pools.append(CategoryPool(name, "fashion_mnist", synset, images[rows], rows.astype(np.int64)))
    return pools


def _digit_pools() -> list[CategoryPool]:
    images, labels = digit_images()
    pools = []
    for label, (name, synset) in enumerate(_source_categories("digits")):
        rows = np.flatnonzero(labels == label)
        pools.append(CategoryPool(name, "sklearn_digits", synset, images[rows], rows.astype(np.int64)))
    return pools


@functools.lru_cache(maxsize=2)
def _letter_pools(seed: int, font_dir: str | None) -> tuple[CategoryPool, ...]:
    """The letter pools of ``seed`` (kept for the next call: rendering them takes seconds; read-only arrays)."""
    fonts = list_fonts(font_dir)
    if not fonts:
        where = font_dir if font_dir is not None else " or ".join(DEFAULT_FONT_DIRS)
        raise MissingDatasetError(f"no .ttf/.otf fonts in {where}; install fonts-dejavu-core "
                                  "(or leave letters out: --objects clothing,digits)")
    pools = []
    for letter_index, (character, (name, synset)) in enumerate(zip(LETTERS, _source_categories("letters"))):
        rng = np.random.default_rng([seed, 1, letter_index])
        renders = [render_character(character, fonts[k % len(fonts)], rng, LETTER_CANVAS, SOURCE_IMAGE_SIZE)[:, :, 0]
                   for k in range(LETTER_RENDERS)]
        images, rows = np.stack(renders), np.arange(LETTER_RENDERS, dtype=np.int64)
        images.setflags(write=False)
        rows.setflags(write=False)
        pools.append(CategoryPool(name, "dejavu_letters", synset, images, rows))
    return tuple(pools)


def load_category_pools(sources: Sequence[str], seed: int, *,
                        fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR,
                        font_dir: str | os.PathLike | None = None) -> list[CategoryPool]:
    """The pools of every category of ``sources``, in the rank order of :func:`ranked_categories`.

    Letters are rendered from ``seed`` (deterministic). Raises :class:`MissingDatasetError` with
    the package to install when a source is not on this machine.
    """
    by_name: dict[str, CategoryPool] = {}
    chosen = parse_sources(sources)
    if "clothing" in chosen:
        by_name.update((pool.name, pool) for pool in _clothing_pools(Path(fashion_mnist_dir)))
    if "digits" in chosen:
        by_name.update((pool.name, pool) for pool in _digit_pools())
    if "letters" in chosen:
        by_name.update((pool.name, pool) for pool in _letter_pools(int(seed), None if font_dir is None else str(font_dir)))
    return [by_name[name] for name, _ in ranked_categories(chosen)]
