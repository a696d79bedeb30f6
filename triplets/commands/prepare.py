"""``mas-triplets prepare vg|sgg|images``: build the fact HDF5 from Visual Genome or VG-SGG.h5.

This command composes the three steps the packages keep apart: reading and writing
(:mod:`data_prep`) and the language embeddings of the facts (:mod:`triplets.facts.language`),
passed to data_prep as a callable so that data_prep never imports the model side.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from data_prep.atomic import check_output_file
from data_prep.sources.json_stream import DEFAULT_MAX_JSON_DEPTH
from data_prep.facts.options import DEFAULT_MIN_FACT_COUNT, PrepareOptions
from data_prep.sources.sgg_h5 import prepare_sgg
from data_prep.sources.visual_genome import prepare_visual_genome

from ..facts import language
from ..errors import TripletsError
from . import prepare_images, prepare_lll
from .arguments import add_max_image_pixels, positive_int


def _orders(text: str) -> tuple[int, ...]:
    try:
        orders = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--orders takes a comma-separated list of 1, 2, 3, got {text!r}") from None
    if not orders or any(order not in (1, 2, 3) for order in orders):
        raise argparse.ArgumentTypeError(f"--orders takes a comma-separated list of 1, 2, 3, got {text!r}")
    return orders


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output fact file (.h5); written atomically")
    parser.add_argument("--tasks", type=positive_int, default=4, help="number of tasks T (default 4)")
    parser.add_argument("--split", choices=("random", "semantic"), default="random",
                        help="how facts are divided into tasks: random, or k-means on their language embeddings")
    parser.add_argument("--min-fact-count", type=positive_int, default=DEFAULT_MIN_FACT_COUNT,
                        help=f"drop facts with fewer training samples (default {DEFAULT_MIN_FACT_COUNT})")
    parser.add_argument("--orders", type=_orders, default=(1, 2, 3),
                        help="fact orders to keep: 1 <S>, 2 <S,P>, 3 <S,P,O> (default 1,2,3)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="side S of the stored region crops (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test and task splits (default 0)")
    parser.add_argument("--text-encoder", default="minilm",
                        help="text encoder spec for the fact embeddings: minilm (default), a local transformers "
                             "folder or a word2vec file")
    parser.add_argument("--no-text", action="store_true", help="store no fact embeddings (random split only)")
    parser.add_argument("--no-images", action="store_true", help="store facts and boxes only, no region pixels")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_max_image_pixels(parser)
    parser.add_argument("--max-json-depth", type=positive_int, default=DEFAULT_MAX_JSON_DEPTH,
                        help="refuse a JSON file nesting [ and { deeper than this while it streams (default "
                        f"{DEFAULT_MAX_JSON_DEPTH}; Visual Genome's dumps nest 6)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prepare`` and its sub-subcommands ``vg``, ``sgg``, ``lll`` and ``images``."""
    parser = subparsers.add_parser("prepare", help="build the fact HDF5 file from Visual Genome or VG-SGG.h5",
                                   description="Build the fact HDF5 file from the raw Visual Genome dumps (vg), "
                                   "a VG-SGG.h5 file (sgg), the lifelong-fact-learning benchmark's split files "
                                   "(lll) or image folders (images).")
    prepare_subparsers = parser.add_subparsers(dest="prepare_command", metavar="SOURCE")

    vg = prepare_subparsers.add_parser("vg", help="from the raw Visual Genome JSON dumps",
                                       description="Build the fact file from the Visual Genome dumps: image_data.json, "
                                       "objects.json, relationships.json, optional attributes.json and alias files, "
                                       "images under VG_100K/ and VG_100K_2/.")
    vg.add_argument("--vg-dir", required=True, help="folder holding the Visual Genome JSON files and image folders")
    _add_common_options(vg)
    vg.set_defaults(_prepare_run=_run_vg)

    sgg = prepare_subparsers.add_parser("sgg", help="from VG-SGG.h5 + VG-SGG-dicts.json",
                                        description="Build the fact file from the scene-graph community's VG-SGG.h5.")
    sgg.add_argument("--h5", required=True, help="VG-SGG.h5")
    sgg.add_argument("--dicts", required=True, help="VG-SGG-dicts.json")
    sgg.add_argument("--image-data", required=True, help="image_data.json of Visual Genome")
    sgg.add_argument("--images", default=None, help="folder of the Visual Genome images (not needed with --no-images)")
    _add_common_options(sgg)
    sgg.set_defaults(_prepare_run=_run_sgg)

    images = prepare_images.add_parser(prepare_subparsers)
    images.set_defaults(_prepare_run=prepare_images.run)
    lll = prepare_lll.add_parser(prepare_subparsers)
    lll.set_defaults(_prepare_run=prepare_lll.run)
    parser.set_defaults(_prepare_parser=parser)
    return parser


def _text_encoder(args: argparse.Namespace) -> tuple[Callable[[list], Any] | None, str | None]:
    """The embed function handed to data_prep (None with --no-text) and the encoder's name."""
    if args.no_text:
        if args.split == "semantic":
            raise TripletsError("--split semantic needs fact embeddings; drop --no-text or use --split random")
        return None, None
    encoder = language.load_text_encoder(args.text_encoder)

    def embed(facts: list) -> Any:
        embeddings, _masks = language.embed_facts(facts, encoder)
        return embeddings

    return embed, getattr(encoder, "name", str(args.text_encoder))


def _prepare_options(args: argparse.Namespace) -> PrepareOptions:
    """The common options of ``prepare vg`` and ``prepare sgg`` as one validated :class:`PrepareOptions`."""
    text_encoder, encoder_name = _text_encoder(args)
    return PrepareOptions(
        num_tasks=args.tasks, split=args.split, min_fact_count=args.min_fact_count, orders=args.orders,
        image_size=args.image_size, seed=args.seed, text_encoder=text_encoder, encoder_name=encoder_name,
        no_images=args.no_images, progress=not args.no_progress, command_line=args.command_line,
        max_image_pixels=args.max_image_pixels, max_json_depth=args.max_json_depth,
    )


def _run_vg(args: argparse.Namespace) -> int:
    report = prepare_visual_genome(args.vg_dir, args.out, _prepare_options(args))
    print(report)
    return 0


def _run_sgg(args: argparse.Namespace) -> int:
    report = prepare_sgg(args.h5, args.dicts, args.image_data, args.images, args.out, _prepare_options(args))
    print(report)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen source (``vg``, ``sgg``, ``lll``, ``images``) once ``--out`` is known to
    be writable (not a folder, its folder writable)."""
    handler = getattr(args, "_prepare_run", None)
    if handler is None:
        args._prepare_parser.print_help()
        return 2
    check_output_file(args.out)  # before any reading, encoder loading or decoding
    return int(handler(args) or 0)
