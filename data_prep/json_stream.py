"""Streaming the top-level JSON array of a (multi-gigabyte) dump one element at a time, with ijson."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import ijson
from ijson.common import JSONError

from .errors import DataPrepError, MissingDatasetError
from .progress import progress_bar


def _ijson_backend() -> Any:
    """ijson's C backend ``yajl2_c`` when it is built on this platform, else the default (correct, slower) one."""
    try:
        return ijson.get_backend("yajl2_c")
    except Exception:  # the C extension is an optional part of ijson's build
        return ijson


def stream_json_array(path: Path, *, progress: bool = False, description: str = "") -> Iterator[Any]:
    """Yield the elements of the top-level JSON array in ``path`` one at a time (floats as float).

    Raises :class:`MissingDatasetError` for a missing file and :class:`DataPrepError` for
    a file that is not a JSON array or is malformed.
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
            for count, item in enumerate(backend.items(handle, "item", use_float=True)):
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
