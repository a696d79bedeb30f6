"""``mas-triplets prepare images``: convert an image-classification dataset once to HDF5
(see :mod:`data_prep.image_sets.prepare` for the sources and the layout each expects)."""
from __future__ import annotations

import argparse
from typing import Any

from data_prep.errors import DataPrepError
from data_prep.image_sets.prepare import prepare_image_dataset
from data_prep.image_sets.image_file import open_image_dataset
from data_prep.image_sets.sources import SOURCES

from .arguments import add_max_image_pixels


def add_parser(prepare_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``images`` under ``prepare``."""
    parser = prepare_subparsers.add_parser(
        "images", help="an image-classification dataset → HDF5 (for `mas-triplets recognition`)",
        description="Convert one classification dataset to the project's image HDF5 (uint8 images, labels, "
        "class names, train/test split, provenance). Sources: " + ", ".join(SOURCES) + ".")
    parser.add_argument("--dataset", required=True, help="source name: " + ", ".join(SOURCES))
    parser.add_argument("--root", default=None,
                        help="folder holding the dataset (offline sources have defaults; nothing is downloaded)")
    parser.add_argument("--out", required=True, help="HDF5 file to write (atomically)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels: photographs are resized (shorter side) and centre-cropped to this square "
                        "(default 256); fixed-size sources keep their size unless given")
    parser.add_argument("--split", default="train,test", help="splits to write: train,test (default both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random splits and letter renderings")
    parser.add_argument("--renders-per-class", default="200,60",
                        help="font_letters only: TRAIN,TEST renderings per character")
    add_max_image_pixels(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert and print a one-line summary."""
    try:
        renders = tuple(int(part) for part in str(args.renders_per_class).split(","))
    except ValueError:
        renders = ()
    if len(renders) != 2:
        raise DataPrepError(f"--renders-per-class expects TRAIN,TEST integers, got {args.renders_per_class!r}")
    splits = [part.strip() for part in str(args.split).split(",") if part.strip()]
    path = prepare_image_dataset(args.dataset, args.root, args.out, image_size=args.image_size, split=splits,
                                 seed=args.seed, renders_per_class=renders,  # type: ignore[arg-type]
                                 max_image_pixels=args.max_image_pixels)
    data = open_image_dataset(path)
    sizes = ", ".join(f"{split} {data.labels(split).size}" for split in data.splits)
    notes = "".join(f"; {count} {note}" for note, count in sorted(data.provenance.get("notes", {}).items()) if count)
    print(f"wrote {path}: {data.name}, {data.num_classes} classes, {sizes} images of "
          f"{data.image_shape[0]}x{data.image_shape[1]}x{data.image_shape[2]}{notes}")
    return 0
