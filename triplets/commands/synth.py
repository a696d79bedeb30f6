"""``mas-triplets synth``: write the embedded Visual-Genome-style synthetic world.

Example::

    mas-triplets synth --out data/synth_vg --images 600 --seed 0
    mas-triplets prepare vg --vg-dir data/synth_vg --out data/synth.h5 --min-fact-count 5
"""
from __future__ import annotations

import argparse

from data_prep.synthetic import generate_world, iter_fact_counts_table


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
        help="write a synthetic Visual-Genome-style dataset (rendered shapes in visible relations)",
        description="Render scenes of coloured, textured shapes in visible spatial relations and write "
        "them in the real Visual Genome file format (image_data.json, objects.json, relationships.json, "
        "attributes.json, VG_100K/*.jpg), ready for `mas-triplets prepare vg --vg-dir DIR`.",
    )
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, identical files (default 0)")
    parser.add_argument("--image-size", type=_image_size, default=(160, 120), metavar="WxH",
                        help="image size in pixels (default 160x120)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate the world and print its summary; returns the exit code."""
    report = generate_world(
        args.out,
        num_images=args.images,
        seed=args.seed,
        image_size=args.image_size,
        progress=not args.quiet,
        force=args.force,
    )
    if not args.quiet:
        print(report.summary())
        print("  most frequent facts:")
        for line in iter_fact_counts_table(report, limit=10):
            print("  " + line)
    return 0
