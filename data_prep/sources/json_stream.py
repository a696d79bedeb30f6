"""Streaming the top-level JSON array of a (multi-gigabyte) dump one element at a time, with ijson,
under a nesting-depth limit checked on every chunk before ijson parses it (:class:`DepthLimitedReader`).

Why the limit: ijson's memory grows with the square of the nesting depth (a 40 KB file of
nested brackets takes about 1 GB, 400 KB exhausts 24 GB), so a hostile or corrupt file must be
refused before the parser sees it. Visual Genome's dumps nest 6 deep (the array, an image record,
its relationship list, a relationship, its subject, the subject's ``names`` list).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Iterator

import ijson
import numpy as np
from ijson.common import JSONError

from ..errors import DataPrepError, MissingDatasetError
from ..progress import progress_bar


#: default deepest nesting of ``[`` / ``{`` accepted, about ten times what Visual Genome uses
DEFAULT_MAX_JSON_DEPTH = 64
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_IS_BRACKET = _BRACKET_STEP != 0
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_EMPTY = np.zeros(0, dtype=np.int64)
#: every byte but the six that decide the depth (``"`` ``\\`` ``[`` ``]`` ``{`` ``}``): deleted by the fast path
_NOT_STRUCTURAL = bytes(byte for byte in range(256) if byte not in b'"\\[]{}')


class DepthLimitedReader:
    """A binary file wrapper whose :meth:`read` raises :class:`DataPrepError` (naming ``path``, the
    limit and the byte offset) as soon as the bytes read so far nest deeper than ``max_depth``.

    Brackets inside strings are not counted: the reader tracks strings and backslash escapes
    across chunks. Cost: a few vectorised passes over each chunk.
    """

    def __init__(self, handle: BinaryIO | None, path: Path, max_depth: int) -> None:
        self.handle, self.path, self.max_depth = handle, path, max_depth
        self.depth = 0
        self.offset = 0
        self.in_string = False
        self.escape_next = False

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)  # type: ignore[union-attr]
        if data:
            self.check(data)
        return data

    def check(self, data: bytes) -> None:
        """Advance the depth over ``data`` (the next bytes of the file); raise past ``max_depth``.

        First :meth:`_check_fast`, which settles the chunks of ordinary JSON; else the exact general
        pass, vectorised over the sparse positions only: backslash runs (an odd run escapes the
        next byte), unescaped quotes (their running count says inside or outside a string) and
        brackets. The general pass also names the byte offset of a refused chunk.
        """
        if not data or self._check_fast(data):
            return
        chars = np.frombuffer(data, dtype=np.uint8)
        backslashes = np.flatnonzero(chars == _BACKSLASH)
        escaped_first = self.escape_next
        if escaped_first and len(backslashes) and backslashes[0] == 0:
            backslashes = backslashes[1:]  # escaped by the run that ended the previous chunk
        escaped = _EMPTY
        if len(backslashes):
            breaks = np.flatnonzero(np.diff(backslashes) != 1)
            starts = np.concatenate(([0], breaks + 1))
            ends = np.concatenate((breaks, [len(backslashes) - 1]))
            escaped = backslashes[ends[(ends - starts) % 2 == 0]] + 1  # runs of odd length escape the next byte
        self.escape_next = bool(len(escaped)) and int(escaped[-1]) == len(chars)
        quotes = np.flatnonzero(chars == _QUOTE)
        if len(escaped) and len(quotes):
            nearest = escaped[np.minimum(np.searchsorted(escaped, quotes), len(escaped) - 1)]
            quotes = quotes[nearest != quotes]
        if escaped_first and len(quotes) and quotes[0] == 0:
            quotes = quotes[1:]
        brackets = np.flatnonzero(_IS_BRACKET.take(chars))  # take: ~3x faster than fancy indexing
        if len(brackets):
            outside = (np.searchsorted(quotes, brackets) + self.in_string) % 2 == 0
            brackets = brackets[outside]
            depths = self.depth + np.cumsum(_BRACKET_STEP[chars[brackets]], dtype=np.int64)
            if len(depths) and int(depths.max()) > self.max_depth:
                where = self.offset + int(brackets[np.argmax(depths > self.max_depth)])
                raise DataPrepError(
                    f"{self.path} nests JSON deeper than {self.max_depth} levels (at byte {where:,}); Visual "
                    "Genome's dumps nest 6 deep, so the file is corrupt or hostile; raise --max-json-depth if it "
                    "is genuine")
            if len(depths):
                self.depth = int(depths[-1])
        self.in_string = bool((len(quotes) + self.in_string) % 2)
        self.offset += len(chars)


    def _check_fast(self, data: bytes) -> bool:
        """Advance over ``data`` and return True when it holds no backslash and no string holding a
        bracket or a quote, and stays within ``max_depth``; else change nothing and return False.

        ``data.translate`` keeps only the six structural bytes (a C loop, a sixth of the bytes left
        for JSON like Visual Genome's); every string is then ``""`` (its letters deleted), so the
        strings go with ``replace(b'""', b'')``; one quote left at the very end opens a string that
        runs on into the next chunk. If another quote is left, some string held a bracket or a
        quote: the general pass decides. Else the rest are
        the brackets outside strings, whose running depth ``d_0 + Σ (±1)`` is checked against the
        limit (``d_0`` the depth before the chunk). Why the pairs are the strings: scanning left to
        right, the first quote can only go with the byte after it, so it must be a quote; the
        pairs are then quotes 1-2, 3-4, …, i.e. each string's opening and closing quote with
        nothing between them.
        """
        if self.escape_next:
            return False
        kept = data.translate(None, _NOT_STRUCTURAL)
        if b"\\" in kept:
            return False
        if self.in_string:
            kept = b'"' + kept  # the string open at the chunk's start, closed in it if its rest is empty
        outside = kept.replace(b'""', b"")
        open_string = outside.endswith(b'"')  # the last string runs on into the next chunk
        if open_string:
            outside = outside[:-1]
        if b'"' in outside:
            return False
        if outside:
            depths = self.depth + np.cumsum(_BRACKET_STEP[np.frombuffer(outside, dtype=np.uint8)], dtype=np.int64)
            if int(depths.max()) > self.max_depth:
                return False  # the general pass raises, naming the byte
            self.depth = int(depths[-1])
        self.in_string = open_string
        self.offset += len(data)
        return True


def check_json_depth(data: bytes, path: Path, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> None:
    """Raise :class:`DataPrepError` when the JSON text ``data`` (of ``path``) nests deeper than ``max_depth``."""
    DepthLimitedReader(None, path, max_depth).check(data)


def _ijson_backend() -> Any:
    """ijson's C backend ``yajl2_c`` when it is built on this platform, else the default (correct, slower) one."""
    try:
        return ijson.get_backend("yajl2_c")
    except Exception:  # the C extension is an optional part of ijson's build
        return ijson


def stream_json_array(path: Path, *, progress: bool = False, description: str = "",
                      max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Iterator[Any]:
    """Yield the elements of the top-level JSON array in ``path`` one at a time (floats as float).

    Raises :class:`MissingDatasetError` for a missing file and :class:`DataPrepError` for
    a file that is not a JSON array, is malformed or nests deeper than ``max_depth``
    (checked before ijson parses each chunk, so memory stays bounded).
    """
    backend = _ijson_backend()
    path = Path(path)
    if not path.is_file():
        raise MissingDatasetError(f"{path} not found; give the folder holding the Visual Genome JSON dumps")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
        if head[:3] == b"\xef\xbb\xbf":
            head = head[3:].lstrip()
        if not head.startswith(b"["):
            raise DataPrepError(f"{path} is not a JSON array (it starts with {head[:20]!r}); give the original dump")
        handle.seek(0)
        bar = progress_bar(progress, total=size, unit="B", unit_scale=True, desc=description or path.name)
        position = 0
        try:
            reader = DepthLimitedReader(handle, path, max_depth)
            for count, item in enumerate(backend.items(reader, "item", use_float=True)):
                yield item
                if bar is not None and count % 512 == 0:
                    now = handle.tell()
                    bar.update(now - position)
                    position = now
        except (JSONError, UnicodeDecodeError) as exc:
            raise DataPrepError(
                f"{path} is malformed JSON ({str(exc).splitlines()[0][:120]}); re-download or repair the file"
            ) from None
        finally:
            if bar is not None:
                bar.update(size - position)
                bar.close()
