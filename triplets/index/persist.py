"""Index files on disk: the versioned JSON files (sidecar, manifest), atomic index writes, shard
reads (memory-mapped where FAISS can) and clearing a folder of a previous sharded index."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mas_core import checkpoint

from ..errors import RunFolderError
from . import common
from .common import MANIFEST_NAME, VECTORS_FILE


def sidecar_path(path: str | os.PathLike) -> Path:
    """The metadata file of the index at ``path``: ``path + ".json"``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def index_bytes(cpu_index: Any) -> bytes:
    """``faiss.serialize_index`` of ``cpu_index`` as bytes."""
    return np.asarray(common._faiss().serialize_index(cpu_index), dtype=np.uint8).tobytes()


def write_index_file(path: Path, cpu_index: Any) -> tuple[int, str]:
    """Serialise ``cpu_index`` to ``path`` atomically (temporary file + rename); return (bytes, SHA-256)."""
    data = index_bytes(cpu_index)
    checkpoint.atomic_write_bytes(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def read_shard(path: Path, mmap: bool) -> Any:
    """``faiss.read_index`` with ``IO_FLAG_MMAP`` (inverted lists memory-mapped, not copied) when
    ``mmap`` and the installed faiss supports it for this file; a plain read otherwise."""
    faiss = common._faiss()
    if mmap and hasattr(faiss, "IO_FLAG_MMAP"):
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:
            warnings.warn(f"faiss cannot memory-map {path.name} ({str(exc).splitlines()[0]}); reading it into RAM",
                          stacklevel=3)
    return faiss.read_index(str(path))


def read_format_file(path: Path, expected_format: str, expected_version: int, *, what: str,
                     owner: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format``/``format_version`` must be the given ones;
    a :class:`RunFolderError` saying "rebuild the index" otherwise."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{what} {path} is not valid JSON ({getattr(exc, 'msg', exc)}); rebuild the index") from None
    if not isinstance(content, dict) or content.get("format") != expected_format:
        raise RunFolderError(f"{path} is not a mas-triplets {what}; rebuild the index")
    if content.get("format_version") != expected_version:
        raise RunFolderError(f"{owner} has format version {content.get('format_version')}, this code reads "
                             f"{expected_version}; rebuild the index")
    return content


def remove_previous_index(folder: Path) -> None:
    """Remove a previous sharded index from ``folder``: its manifest first (so the folder never
    looks complete meanwhile), then shard and vector files and leftover temporary files."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for pattern in ("shard-*-of-*.faiss", VECTORS_FILE, ".shard-*.tmp", ".vectors-*.tmp", ".spill-*.tmp",
                    f".{MANIFEST_NAME}.*.tmp"):
        for stale in folder.glob(pattern):
            if stale.is_file():
                stale.unlink()
