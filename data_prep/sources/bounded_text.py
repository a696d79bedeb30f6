"""Text files read as a careful reader reads a file it did not write: line by line with a bound on
one line's size, and quoted in error messages only as a short printable excerpt.

* :func:`bounded_lines` yields a binary file's lines, refusing (one line, naming the file and the
  line number) a line longer than ``max_line_bytes`` before it is held whole.
* :func:`csv_rows` streams a UTF-8 CSV file through :func:`bounded_lines`, with the same bound on
  one record (a quoted field may span lines).
* :func:`excerpt` quotes a file's bytes or text: at most :data:`EXCERPT_CHARS` characters,
  non-printable ones escaped (``\\x00``, ``\\u200b``), so an error line never carries a file's raw
  bytes to the terminal.
* :func:`exact_integer` parses an integer field exactly (a 23-digit id stays the same integer).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from ..errors import DataPrepError

#: default bound on one line (and one CSV record) of a text file: 1 MiB; the benchmark's lines are
#: a few hundred bytes (CSV rows) or about 11 KB (900 numbers on one line)
MAX_LINE_BYTES = 1 << 20
#: characters of a file's content an error message quotes at most
EXCERPT_CHARS = 40
#: digits an integer field may have (ids of the benchmark have 1 to 7)
MAX_INTEGER_DIGITS = 40
_INTEGER = re.compile(r"^[+-]?[0-9]+(?:\.0*)?$")


def excerpt(value: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """``value`` quoted in single quotes: at most ``limit`` characters of it, non-printable ones,
    quotes and backslashes escaped, ``...`` after a cut. Bytes are read as UTF-8 (invalid bytes
    shown as ``\\xNN``)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: 4 * limit]).decode("utf-8", errors="backslashreplace")
    cut = len(value) > limit
    out = []
    for char in value[:limit]:
        if char in "'\\":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "'" + "".join(out) + "'" + ("..." if cut else "")


def exact_integer(text: str, where: str, column: str) -> int:
    """``text`` as an integer, exactly (``"12"``, ``" -3 "``, ``"12.0"``); else one line naming
    ``where`` and ``column`` with an excerpt of ``text``."""
    stripped = text.strip()
    if _INTEGER.match(stripped) is None or len(stripped.split(".")[0].lstrip("+-")) > MAX_INTEGER_DIGITS:
        raise DataPrepError(f"{where}: column {column} holds {excerpt(text)}; expected an integer")
    return int(stripped.split(".")[0])


def bounded_lines(handle: BinaryIO, path: str | Path, max_line_bytes: int = MAX_LINE_BYTES,
                  what: str = "line") -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` of ``handle`` (1-based, the newline kept); a line longer than
    ``max_line_bytes`` raises :class:`DataPrepError` once that many bytes have been read."""
    number = 0
    while True:
        line = handle.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line_bytes:
            raise DataPrepError(f"{path}, line {number}: a {what} longer than {max_line_bytes:,} bytes; "
                                "not a file of this dataset")
        yield number, line


def _decoded_lines(handle: BinaryIO, path: Path, max_line_bytes: int, state: dict[str, int]) -> Iterator[str]:
    for number, line in bounded_lines(handle, path, max_line_bytes):
        state["line"] = number
        state["pending"] += len(line)
        if state["pending"] > max_line_bytes:
            raise DataPrepError(f"{path}, line {number}: a record longer than {max_line_bytes:,} bytes; "
                                "not a file of this dataset")
        if b"\0" in line:
            raise DataPrepError(f"{path}, line {number}: holds NUL bytes; not a text file")
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataPrepError(f"{path}, line {number}: not UTF-8 text; give the dataset's CSV file") from None
        yield text


def csv_rows(path: Path, required: Sequence[str], max_line_bytes: int = MAX_LINE_BYTES
             ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` of a CSV file streamed line by line, its header checked for the
    ``required`` columns; every record at most ``max_line_bytes`` long, every row as wide as the
    header. Errors are one line naming the file and the line, quoting at most an excerpt."""
    state = {"pending": 0, "line": 0}
    try:
        with open(path, "rb") as handle:
            reader = csv.reader(_decoded_lines(handle, path, max_line_bytes, state))
            header = next(reader, None)
            state["pending"] = 0
            if header is None:
                raise DataPrepError(f"{path}: empty file; expected a header line with the columns "
                                    f"{', '.join(required)}")
            missing = [column for column in required if column not in header]
            if missing:
                found = ", ".join(h for h in header if h) or "nothing"
                raise DataPrepError(f"{path}, line 1: missing column(s) {', '.join(missing)} "
                                    f"(the header has: {excerpt(found, 4 * len(', '.join(required)) + 40)})")
            for fields in reader:
                state["pending"] = 0
                if not fields:
                    continue  # a blank line, as csv.DictReader skips it
                if len(fields) != len(header):
                    raise DataPrepError(f"{path}, line {reader.line_num}: the row's number of fields ({len(fields)}) "
                                        f"differs from the header's ({len(header)})")
                yield reader.line_num, dict(zip(header, fields))
    except csv.Error as exc:
        raise DataPrepError(f"{path}, line {state['line']}: not a readable CSV file ({excerpt(str(exc), 80)})"
                            ) from None
    except IsADirectoryError:
        raise DataPrepError(f"{path} is a folder; expected a CSV file") from None
    except PermissionError:
        raise DataPrepError(f"{path}: cannot be read (permission denied)") from None
