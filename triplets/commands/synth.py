"""``mas-triplets synth``: write the embedded Visual-Genome-style synthetic world.

Example::

    mas-triplets synth --out data/synth_vg --images 600 --seed 0
    mas-triplets prepare vg --vg-dir data/synth_vg --out data/synth.h5 --min-fact-count 5

    # the real-image world (Fashion-MNIST clothing, digits, font letters), 20,000 images or a cut
    mas-triplets synth --world real --out data/realworld_vg
    mas-triplets synth --world real --out data/realworld_cut --images 2000 --objects digits,letters
"""
from __future__ import annotations

import argparse

from data_prep.image_sets.idx import FASHION_MNIST_DIR
from data_prep.worlds.real import DEFAULT_NUM_IMAGES, generate_real_world
from data_prep.worlds.real_sources import SOURCE_NAMES
from data_prep.worlds.synthetic import generate_world, iter_fact_counts_table
from data_prep.worlds.arguments import MAX_IMAGE_SIDE, MAX_IMAGES, MAX_SEED

from ..errors import TripletsError

WORLDS = ("shapes", "real")
DEFAULT_IMAGES = {"shapes": 600, "real": DEFAULT_NUM_IMAGES}


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (e.g. 160x120), got {text!r}") from None
    return width, height


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` and its options."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic Visual-Genome-style dataset (rendered shapes or real object images in visible relations)",
        description="Render scenes of objects in visible spatial relations and write them in the real "
        "Visual Genome file format (image_data.json, objects.json, relationships.json, attributes.json, "
        "VG_100K/*.jpg), ready for `mas-triplets prepare vg --vg-dir DIR`. --world shapes: coloured, "
        "textured shapes; --world real: real images (Fashion-MNIST clothing, handwritten digits, font "
        "letters) with colour, orientation and size attributes and Zipf-distributed facts.",
    )
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--world", choices=WORLDS, default="shapes",
                        help="shapes (default) or real (objects are real images)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"number of images (default {DEFAULT_IMAGES['shapes']} for shapes, "
                        f"{DEFAULT_IMAGES['real']} for real, at most {MAX_IMAGES:,}; a smaller number writes the first "
                        "images of the same world)")
    parser.add_argument("--objects", default=",".join(SOURCE_NAMES), metavar="SOURCES",
                        help=f"--world real: the object sources, a comma-separated subset of {','.join(SOURCE_NAMES)} "
                        "(default all; clothing needs Debian's dataset-fashion-mnist)")
    parser.add_argument("--fashion-mnist-dir", default=str(FASHION_MNIST_DIR),
                        help=f"--world real: folder of the Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})")
    parser.add_argument("--seed", type=int, default=0, help=f"random seed, 0 to {MAX_SEED:,}; same seed, identical files (default 0)")
    parser.add_argument("--image-size", type=_image_size, default=(160, 120), metavar="WxH",
                        help=f"image size in pixels (default 160x120, at most {MAX_IMAGE_SIDE} a side)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate the world and print its summary; returns the exit code."""
    if args.world != "real" and (args.objects != ",".join(SOURCE_NAMES) or args.fashion_mnist_dir != str(FASHION_MNIST_DIR)):
        raise TripletsError("--objects and --fashion-mnist-dir apply to --world real only")
    num_images = DEFAULT_IMAGES[args.world] if args.images is None else args.images
    common = {"num_images": num_images, "seed": args.seed, "image_size": args.image_size,
              "progress": not args.quiet, "force": args.force}
    if args.world == "real":
        report = generate_real_world(args.out, sources=args.objects, fashion_mnist_dir=args.fashion_mnist_dir, **common)
    else:
        report = generate_world(args.out, **common)
    if not args.quiet:
        print(report.summary())
        print("  most frequent facts:")
        for line in iter_fact_counts_table(report, limit=10):
            print("  " + line)
    return 0
