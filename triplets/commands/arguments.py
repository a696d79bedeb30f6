"""Argument types and options shared by several subcommands of ``mas-triplets``."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from data_prep.image_decode import DEFAULT_MAX_IMAGE_PIXELS


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (else argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_max_image_pixels(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels``, the same limit for every command that decodes images through data_prep."""
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse an image whose header declares more than this many pixels (width x height) "
                        f"before decoding it (default {DEFAULT_MAX_IMAGE_PIXELS:,})")


def add_log_option(parser: argparse.ArgumentParser) -> None:
    """``--log``: what a training run logs beside ``RUN/metrics.csv`` (:mod:`triplets.run_log`)."""
    parser.add_argument("--log", choices=("csv", "tensorboard"), default="csv",
                        help="csv (default): the per-epoch metrics log RUN/metrics.csv; tensorboard: also TensorBoard "
                        "event files in RUN/tensorboard/ (needs the optional extra: pip install "
                        "'mas-triplets[tensorboard]'). Ctrl-C stops after the current batch and prints the --resume "
                        "command (exit status 130)")


def diverged_exit_status(results: dict[str, Any], command: str) -> int:
    """The exit status of a finished run (:mod:`triplets.runner`'s divergence policy): 1 when some
    method diverged (each named on stderr with its error), else 0."""
    diverged = results.get("diverged") or {}
    for method, message in diverged.items():
        print(f"mas-triplets {command}: method {method} diverged: {message}", file=sys.stderr)
    return 1 if diverged else 0
