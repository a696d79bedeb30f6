"""The ``mas-triplets`` console script.

Each subcommand lives in :mod:`triplets.commands` as a module with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``, and delegates to the packages'
public functions. Errors raised for bad input by any of the three packages are
printed as one line on stderr with a non-zero exit code (2); anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from typing import Sequence

COMMANDS = ("synth", "prepare", "train", "evaluate", "query", "recognition")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mas-triplets")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mas-triplets",
        description="Memory Aware Synapses: continual learning of triplet fact embeddings and "
        "object-recognition sequences.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"triplets.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"triplets.commands.{name}":
                continue  # subcommand not part of this build
            raise
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_prep.errors import DataPrepError
    from mas_core.errors import MASCoreError

    from .errors import TripletsError

    return (MASCoreError, DataPrepError, TripletsError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["mas-triplets", *argv])  # recorded in provenance and run folders
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except _user_errors() as exc:
        print(f"mas-triplets {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"mas-triplets {args.command}: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mas-triplets {args.command}: interrupted; finished work is checkpointed", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
