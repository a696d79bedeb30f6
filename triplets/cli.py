"""The ``mas-triplets`` console script.

Each subcommand lives in :mod:`triplets.commands` as a module with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``, and delegates to the packages'
public functions. Errors raised for bad input by any of the three packages are
printed as one line on stderr with a non-zero exit code (2); anything else is a bug
and keeps its traceback.

Several processes: ``torchrun --nproc_per_node=N -m triplets.cli train ...`` (or
``recognition``) starts N copies of this script; the command joins their process group
(:func:`mas_core.distributed.process_group_session`) once its config is read. Rank 0 prints the results and the
progress lines; the other ranks print nothing but their own errors (warnings silenced). An
error that every rank raises alike (a bad config, a refused run folder, a diverged loss:
marked by :func:`mas_core.distributed.same_on_every_rank`) is printed by rank 0 alone; every rank
still exits with its code (2), so ``torchrun`` fails as a whole.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import re
import shlex
import sys
from typing import Sequence

MAX_ERROR_LINE = 600
COMMANDS = ("synth", "prepare", "train", "evaluate", "query", "recognition")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mas-triplets")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` asks for (its first word when that is one of :data:`COMMANDS`), else None."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``only`` (then only that command's module is imported:
    ``train`` and ``recognition`` import torch, about 0.9 GB of resident memory that ``prepare``,
    which streams multi-gigabyte dumps in bounded memory, must not carry; see
    ``docs/benchmarks.md``)."""
    parser = argparse.ArgumentParser(
        prog="mas-triplets",
        description="Memory Aware Synapses: continual learning of triplet fact embeddings and "
        "object-recognition sequences.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
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


def launched_rank() -> int:
    """This process's rank as ``torchrun`` announces it (``RANK`` when ``WORLD_SIZE`` > 1), else 0.
    Read from the environment, so it is known before (and whether or not) the group is joined."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        pass
    return 0


def _report(command: str | None, message: str, exc: BaseException | None = None) -> None:
    """Print ``mas-triplets COMMAND: MESSAGE`` on stderr; on a rank other than 0 only for an
    error that is not raised alike by every rank (then naming the rank)."""
    message = " ".join(message.split())  # one line, whatever the exception held
    if len(message) > MAX_ERROR_LINE:  # never an error line of megabytes: keep its start and its advice
        message = f"{message[:MAX_ERROR_LINE - 200]} … {message[-180:]}"
    rank = launched_rank()
    if rank == 0:
        print(f"mas-triplets {command}: {message}", file=sys.stderr)
    elif exc is not None and not getattr(exc, "same_on_every_rank", False):
        print(f"mas-triplets {command} (rank {rank}): {message}", file=sys.stderr)


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|errno = (?:%s)\b" % "|".join(
    str(number) for number in sorted(_DISK_FULL_ERRNOS)), re.IGNORECASE)
_HDF5_FILENAME = re.compile(r"filename = '([^']+)'")


def disk_full_error(exc: BaseException) -> str | None:
    """One line for a write that failed because the disk (or the user's quota) is full: an
    ``OSError`` with ``ENOSPC``/``EDQUOT``, or an error from h5py or torch whose text says so, in
    ``exc`` or the exceptions it was raised from; ``None`` for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if (isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS) or _DISK_FULL_TEXT.search(text):
            filename = getattr(current, "filename", None)
            if not filename:
                found = _HDF5_FILENAME.search(text)
                filename = found.group(1) if found else None
            where = f" writing {filename}" if filename else ""
            return (f"no space left on the device{where}: free some space and run the command again "
                    "(train and recognition: with --resume; finished tasks are checkpointed)")
        current = current.__cause__ or current.__context__
    return None


def hdf5_read_error(exc: OSError) -> str | None:
    """One line for an ``OSError`` that h5py raised reading a damaged HDF5 file (a fact file, a
    prepared task), naming the file when a frame of h5py knows it; ``None`` for any other."""
    filename, traceback = None, exc.__traceback__
    from_h5py = False
    while traceback is not None:
        frame = traceback.tb_frame
        if str(frame.f_globals.get("__name__", "")).startswith("h5py"):
            from_h5py = True
            try:
                filename = filename or frame.f_locals["self"].file.filename
            except Exception:  # noqa: BLE001 - a name is a courtesy; the damage is the message
                pass
        traceback = traceback.tb_next
    if not from_h5py:
        return None
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return (f"cannot read the HDF5 file {filename or '(unknown)'} ({reason}): it is damaged; restore it or "
            "prepare it again")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(argv))
    if launched_rank() == 0:
        args = parser.parse_args(argv)
    else:  # usage errors, --help and --version are the same on every rank: rank 0 prints them
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    args.command_line = shlex.join(["mas-triplets", *argv])  # recorded in provenance and run folders
    if getattr(args, "_run", None) is None:
        if launched_rank() == 0:
            parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except _user_errors() as exc:
        _report(args.command, f"error: {exc}", exc)
        return 2
    except FileNotFoundError as exc:
        _report(args.command, f"error: file not found: {exc.filename or exc}", exc)
        return 2
    except (OSError, RuntimeError) as exc:  # a full disk first: h5py's write errors are OSErrors too
        message = disk_full_error(exc)
        if message is None and isinstance(exc, OSError):
            message = hdf5_read_error(exc)
        if message is None:
            raise
        _report(args.command, f"error: {message}", exc)
        return 2
    except KeyboardInterrupt:
        _report(args.command, "interrupted; finished work is checkpointed")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
