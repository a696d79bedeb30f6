"""``mas-triplets prepare lll``: the lifelong-fact-learning benchmark's split files → fact HDF5.

Composes reading and writing (:func:`data_prep.sources.lll_benchmark.prepare_lll`) with the language
side (:mod:`triplets.facts.language`): ``--text-encoder native`` keeps the benchmark's own 900-d
word2vec vectors; any other spec (``minilm``, a model folder, a word2vec file) re-embeds the
S, P, O strings of the facts.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .arguments import add_max_image_pixels, positive_int


def add_parser(prepare_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``lll`` under ``prepare``."""
    parser = prepare_subparsers.add_parser(
        "lll", help="from the lifelong-fact-learning benchmark's split files (mid-scale 6DS, large-scale)",
        description="Build the fact file from the lifelong-fact-learning benchmark: ROOT/splits/SPLIT/B<k>_train.csv, "
        "B<k>_test.csv, B<k>_facts.csv (k = 1..T), images under ROOT/images/, 900-float language vectors under "
        "ROOT/NLP_feat/. Keeps the benchmark's tasks, train/test split and fact ids.")
    parser.add_argument("--root", required=True, help="the benchmark's scale folder, e.g. data/mid_scale or data/large_scale")
    parser.add_argument("--split", required=True, help="<T>tasks_random or <T>tasks_semantic (a folder of ROOT/splits/)")
    parser.add_argument("--out", required=True, help="output fact file (.h5); written atomically")
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="side S of the stored images, resized whole (default 224, the paper's input)")
    parser.add_argument("--text-encoder", default="minilm",
                        help="native (the benchmark's 300-d word2vec per slot, the paper's setting), minilm "
                             "(default), a local transformers folder or a word2vec file")
    parser.add_argument("--no-images", action="store_true",
                        help="store facts only, no pixels (images are checked to exist, not decoded)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_max_image_pixels(parser)
    return parser


def _embedder(spec: str) -> tuple[Callable[[list], Any] | str, str | None]:
    """``"native"`` (kept by data_prep) or an embed function over facts, with the encoder's name."""
    from data_prep.sources.lll_benchmark import NATIVE

    if spec.strip().lower() == NATIVE:
        return NATIVE, None
    from ..facts.language import embed_facts, load_text_encoder

    encoder = load_text_encoder(spec)

    def embed(facts: list) -> Any:
        embeddings, _masks = embed_facts(facts, encoder)
        return embeddings

    return embed, getattr(encoder, "name", spec)


def run(args: argparse.Namespace) -> int:
    """Prepare the fact file and print the report (kept, dropped, notes, task table)."""
    from data_prep.sources.lll_benchmark import find_task_files, prepare_lll

    find_task_files(args.root, args.split)  # a bad layout fails before the text encoder loads
    text_encoder, encoder_name = _embedder(args.text_encoder)
    report = prepare_lll(args.root, args.split, args.out, text_encoder=text_encoder, encoder_name=encoder_name,
                         image_size=args.image_size, no_images=args.no_images, progress=not args.no_progress,
                         command_line=args.command_line, max_image_pixels=args.max_image_pixels)
    print(report)
    return 0
