"""Atomic output files for :mod:`data_prep`.

:func:`atomic_output` hands out a temporary path in the target's folder; when the
``with`` block ends normally the file is flushed to disk, given the permissions a
plain ``open()`` would give it, and renamed over the target in one step. If the
block raises (an error, Ctrl-C), the temporary file is removed and the target is
left as it was, so no half-written file ever carries the final name. A write killed between the
two (``kill -9``, a power cut) can leave ``.NAME.<random>.tmp`` beside the target: the next write
of the same target removes them (:func:`remove_stale_temporaries`; two processes writing one
target at once are not supported).

Ctrl-C during the write is deferred to the next :func:`interruption_point` (between datasets and
pixel blocks of a fact file) or to the end of the write, and raised there as
:class:`KeyboardInterrupt` from ordinary code: a signal that lands inside HDF5's own clean-up would
otherwise be printed as "Exception ignored" and lost, and the half file renamed into place.

:func:`check_output_file` and :func:`check_output_folder` check an output target before any work:
not a folder (not a file), and its folder, or the nearest existing folder above it, writable.
"""
from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DataPrepError

_pending_interrupts: list[list[bool]] = []  # one flag per active deferral, innermost last


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_writable_folder(folder: Path, target: Path, option: str) -> None:
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise DataPrepError(f"{option} {target}: {existing} is not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataPrepError(f"{option} {target}: cannot write into the folder {existing} (permission denied or "
                            f"read-only); choose another {option}")


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Before any work: ``path`` can become the output file: it is not a folder (nor a device or
    pipe), and its folder, or the nearest existing folder above it (the write creates the rest), is
    a folder this process may write into. Raises :class:`DataPrepError` in one line."""
    path = Path(path)
    if os.path.isdir(path):
        raise DataPrepError(f"{option} {path} is a folder; give the name of the file to write")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise DataPrepError(f"{option} {path} exists and is not a regular file; choose another {option}")
    _check_writable_folder(path.parent, path, option)
    return path


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Before any work: ``path`` can become the output folder (built beside it, then renamed): not a
    file, and its parent (or the nearest existing folder above) writable, as ``path`` itself when it
    exists. Raises :class:`DataPrepError` in one line."""
    path = Path(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise DataPrepError(f"{path} exists and is not a folder; choose another {option}")
    _check_writable_folder(path.parent, path, option)
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise DataPrepError(f"{option} {path}: cannot write into the folder {path} (permission denied or "
                            f"read-only); choose another {option}")
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files ``.NAME.<random>.tmp`` that an earlier write of ``path``
    killed between writing and renaming left beside it; return their paths. Other files, folders
    and symbolic links are left alone."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


def interruption_point() -> None:
    """Raise the :class:`KeyboardInterrupt` that Ctrl-C asked for during a deferred write, if any."""
    if _pending_interrupts and _pending_interrupts[-1][0]:
        _pending_interrupts[-1][0] = False
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) only sets a flag, raised by :func:`interruption_point` or on
    leaving the block. Only in the main thread with Python's default handler; else a no-op."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    flag = [False]

    def note(signum: int, frame: object) -> None:
        flag[0] = True

    _pending_interrupts.append(flag)
    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending_interrupts.remove(flag)
    if flag[0]:
        raise KeyboardInterrupt


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; rename it to ``path`` on success (Ctrl-C
    deferred, see the module's docstring). Leftover temporaries of ``path`` are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DataPrepError(f"cannot write {path} ({exc.strerror or exc.__class__.__name__}); choose another "
                            "output path") from None
    os.close(fd)
    try:
        with deferred_interrupts():
            yield tmp_name
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp made it 0600
        try:
            os.replace(tmp_name, path)
        except OSError as exc:  # the target became a folder meanwhile, or cannot be replaced
            raise DataPrepError(f"cannot write {path} ({exc.strerror or exc.__class__.__name__}); "
                                "choose another output path") from None
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
