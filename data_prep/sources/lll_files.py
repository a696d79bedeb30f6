"""The lifelong-fact-learning benchmark's own files, read without trusting them
(:mod:`data_prep.sources.lll_benchmark` composes them).

* Links (``image_links``, ``NLP_links``) are confined: an absolute link, or one that leads outside
  the dataset (``..``, a symbolic link pointing elsewhere) is refused in one line before anything
  is opened. The dataset is ``ROOT`` and its folders ``ROOT/images`` and ``ROOT/NLP_feat`` wherever
  they themselves lead (a user may link a large image folder in from another disk); every link is
  resolved (symbolic links followed) and must lie in one of them.
* A language-vector file is streamed line by line (at most :data:`MAX_VECTOR_LINE_BYTES` a line) and
  stops at its first number past 900, so a huge or binary file costs neither memory nor time.
* Error lines quote a file's content only as a short printable excerpt (:func:`excerpt`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .bounded_text import bounded_lines, excerpt
from ..errors import DataPrepError

NATIVE_SLOT_DIM = 300
NATIVE_LENGTH = 3 * NATIVE_SLOT_DIM
#: one line of a language-vector file: 900 numbers of ~12 characters fit ten times over
MAX_VECTOR_LINE_BYTES = 1 << 17
FLOAT32_MAX = float(np.finfo(np.float32).max)
IMAGE_SUFFIX_ALTERNATIVES = {".jpg": (".png",), ".jpeg": (".png",), ".png": (".jpg", ".jpeg")}


class DatasetRoot:
    """The folders a benchmark link may lead into: ``root``, ``root/images``, ``root/NLP_feat``,
    each resolved once (symbolic links followed)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.vectors = self.root / "NLP_feat"
        self.allowed = tuple(dict.fromkeys(os.path.realpath(folder) for folder in (self.root, self.images, self.vectors)))
        self._real_folder = functools.lru_cache(maxsize=4096)(os.path.realpath)

    def inside(self, path: Path) -> bool:
        """Whether ``path``, every symbolic link resolved, lies in one of the allowed folders (the
        folders are resolved once each, through a cache; the file itself is checked every time)."""
        parent, name = os.path.split(os.fspath(path))
        real = os.path.join(self._real_folder(parent), name)
        if name in ("", ".", "..") or os.path.islink(real):
            real = os.path.realpath(real)
        return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.allowed)

    def _refuse(self, link: str, where: str, what: str, reason: str) -> DataPrepError:
        return DataPrepError(f"{where}: {what} link {excerpt(link)} {reason}; links must stay inside the dataset "
                             f"{self.root} (its images/ and NLP_feat/ folders included)")

    def _pick(self, candidates: list[Path], link: str, where: str, what: str) -> Path | None:
        """The first of ``candidates`` that is a file; every one must lie inside the dataset."""
        if os.path.isabs(link):
            raise self._refuse(link, where, what, "is an absolute path")
        for candidate in candidates:
            if not self.inside(candidate):
                raise self._refuse(link, where, what, "leads outside the dataset (.. or a symbolic link)")
        return next((candidate for candidate in candidates if candidate.is_file()), None)

    def vector_file(self, link: str, where: str) -> Path:
        """The language-vector file of ``link``: ``ROOT/<link>``, else ``ROOT/NLP_feat/<link>``."""
        path = self._pick([self.root / link, self.vectors / link], link, where, "language vector") if link else None
        if path is None:
            raise DataPrepError(f"{where}: language vector file {excerpt(link)} not found in {self.root} nor "
                                f"{self.vectors}")
        return path

    def image_file(self, link: str, where: str) -> tuple[Path | None, bool]:
        """``(path, found under another suffix)`` of the image of ``link`` under ``ROOT/images``;
        path None when no file exists."""
        if not link:
            return None, False
        path = self.images / link
        candidates = [path] + [path.with_suffix(suffix)
                               for suffix in IMAGE_SUFFIX_ALTERNATIVES.get(path.suffix.lower(), ())]
        found = self._pick(candidates, link, where, "image")
        return found, found is not None and found != path


def read_native_vector(path: Path, where: str) -> np.ndarray:
    """The 900 numbers of a benchmark ``NLP_feat`` file (whitespace- or comma-separated) as float32,
    streamed line by line; a line past :data:`MAX_VECTOR_LINE_BYTES`, a 901st number, a non-number,
    NUL bytes or non-UTF-8 text are refused in one line quoting at most an excerpt."""
    values = np.empty(NATIVE_LENGTH, dtype=np.float32)
    count = 0
    try:
        with open(path, "rb") as handle:
            for number, line in bounded_lines(handle, path, MAX_VECTOR_LINE_BYTES, what="language-vector line"):
                if b"\0" in line:
                    raise DataPrepError(f"{where}: language vector file {path}, line {number}, holds NUL bytes; "
                                        "not a text file of numbers")
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataPrepError(f"{where}: language vector file {path}, line {number}, is not UTF-8 text"
                                        ) from None
                for part in text.replace(",", " ").split():
                    if count == NATIVE_LENGTH:
                        raise DataPrepError(f"{where}: language vector file {path} holds more than {NATIVE_LENGTH} "
                                            f"numbers; expected {NATIVE_LENGTH} (S, P, O: {NATIVE_SLOT_DIM} each)")
                    try:
                        value = float(part)
                    except ValueError:
                        raise DataPrepError(f"{where}: language vector file {path}, line {number}, holds the "
                                            f"non-number {excerpt(part)}") from None
                    if not abs(value) <= FLOAT32_MAX:
                        raise DataPrepError(f"{where}: language vector file {path}, line {number}, holds "
                                            f"{excerpt(part)}: nan, inf or beyond float32")
                    values[count] = value
                    count += 1
    except OSError as exc:
        raise DataPrepError(f"{where}: cannot read the language vector file {path} ({exc.__class__.__name__})") from None
    if count != NATIVE_LENGTH:
        raise DataPrepError(f"{where}: language vector file {path} holds {count} numbers; expected "
                            f"{NATIVE_LENGTH} (S, P, O: {NATIVE_SLOT_DIM} each)")
    return values
