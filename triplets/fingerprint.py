"""Every fingerprint the application stores or compares, in one place, by what it hashes.

- **A file's bytes**: :func:`file_sha256` (SHA-256, streamed in 4 MiB chunks) and
  :func:`file_identity` (that hash with the file's size, modification time, inode and a cheap
  :func:`content_sample`; a recorded SHA-256 is reused without reading the file again only when
  all of these are unchanged and the file is at least ``FULL_HASH_BELOW`` bytes). What a run
  records in ``RUN/data.json`` and under ``DATA_SHA_KEY`` in its checkpoints, and what
  ``--resume``, ``evaluate`` and ``query`` compare; also the shards of a sharded index and the
  demo's downloaded files.
- **A fact vocabulary**: :func:`vocabulary_fingerprint` (SHA-256 of the fact list in id order)
  and :func:`fact_vocabulary_fingerprint` (of an opened fact file): what fact id ``k`` means.
  Stored in ``model.pt`` and the index sidecars under ``VOCABULARY_KEY`` (``"fact_file_sha"``,
  a historical name: it never hashed the file's bytes).
- **A model's weights**: :func:`model_fingerprint` (16 hex digits of the whole ``state_dict``;
  the indexes' ``fingerprint``) and :func:`trunk_fingerprint` (the frozen trunk and its input
  handling), with :func:`feature_cache_fingerprint`, the key of a cached-feature file.
- **Conversion options**: :func:`options_fingerprint`, the name of a recognition task's cached
  image HDF5 (``<dataset>-<10 hex>.h5``).
- **A text encoder's files** (cheap, path-independent, part of the encoder's name stored in the
  fact file): :func:`transformers_folder_fingerprint`, :func:`word2vec_file_fingerprint`.

Every value is the one earlier versions stored, so old checkpoints, run folders and caches still match.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

DATA_SHA_KEY = "fact_file_sha256"
"""The key of the fact file's SHA-256 in a checkpoint's experiment identity and in ``model.pt``
(the record inside the payload, which deleting ``RUN/data.json`` cannot remove)."""
VOCABULARY_KEY = "fact_file_sha"
"""The key of :func:`fact_vocabulary_fingerprint` in ``model.pt`` and in an index's metadata
(the name is historical: the value hashes the fact vocabulary, not the file)."""
FULL_HASH_BELOW = 64 << 20
SAMPLE_BLOCKS = 256
SAMPLE_BLOCK = 4096
SAMPLE_ENDS = 1 << 16
_CHUNK = 1 << 22
TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5")


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the bytes of the file at ``path``, read 4 MiB at a time (constant memory;
    one core hashes 200–500 MB/s, so a 6 GB fact file takes 12–30 s; :func:`file_identity` avoids
    reading an unchanged file again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sample(path: str | Path) -> str:
    """SHA-256 (hex) of a spread sample of the file's bytes: its first and last ``SAMPLE_ENDS``
    bytes (the HDF5 superblock and the metadata written last) and ``SAMPLE_BLOCKS`` blocks of
    ``SAMPLE_BLOCK`` bytes evenly spaced between them (about 1.1 MiB read, whatever the size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        starts = [0, max(0, size - SAMPLE_ENDS)] + [size * k // (SAMPLE_BLOCKS + 1) for k in range(1, SAMPLE_BLOCKS + 1)]
        for start in starts:
            handle.seek(start)
            digest.update(handle.read(SAMPLE_ENDS if start in starts[:2] else SAMPLE_BLOCK))
    return digest.hexdigest()


def file_identity(path: str | Path, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "size", "mtime_ns", "inode", "sample"}`` of the file at ``path``. When
    ``recorded`` (an earlier answer for the same path) has the file's current size, modification
    time, inode and :func:`content_sample`, and the file is at least ``FULL_HASH_BELOW`` bytes, its
    ``sha256`` is reused instead of reading the whole file again (a file rewritten in place or
    replaced gets a new modification time; one damaged in place with its time restored is caught
    by the sample where the damage falls in it)."""
    path = Path(path)
    stat = path.stat()
    now = {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns), "inode": int(stat.st_ino),
           "sample": content_sample(path)}
    if recorded and now["size"] >= FULL_HASH_BELOW \
            and all(recorded.get(key) == now[key] for key in ("path", "size", "mtime_ns", "inode", "sample")) \
            and isinstance(recorded.get("sha256"), str):
        return {**now, "sha256": recorded["sha256"]}
    return {**now, "sha256": file_sha256(path)}


def vocabulary_fingerprint(facts: Sequence[tuple[str, str | None, str | None]]) -> str:
    """SHA-256 (hex) of the fact vocabulary in fact-id order: two fact files agree on what
    fact id ``k`` means exactly when their fingerprints are equal."""
    text = json.dumps([list(fact) for fact in facts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fact_vocabulary_fingerprint(fact_file: Any) -> str:
    """:func:`vocabulary_fingerprint` of an opened fact file (stored under ``VOCABULARY_KEY``)."""
    return str(vocabulary_fingerprint(fact_file.facts))


def model_fingerprint(model: Any) -> str:
    """A short SHA-256 fingerprint (16 hex digits) of a torch module's ``state_dict``.

    Hashes every entry's name, dtype, shape and values in name order, so two models give
    the same fingerprint exactly when their weights and buffers are identical.
    """
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        digest.update(tensor.reshape(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def trunk_fingerprint(model: Any) -> str:
    """SHA-256 (hex) of a fact model's trunk state (every parameter and buffer: name, dtype, shape,
    bytes), of the input standardisation and of the input resize: equal exactly when the trunk computes the same
    function of the images."""
    import torch

    digest = hashlib.sha256()
    tensors = [(f"trunk.{name}", value) for name, value in sorted(model.trunk.state_dict().items())]
    tensors += [("input_mean", model.input_mean), ("input_std", model.input_std)]
    if model.input_size is not None:  # the images are resized before the trunk
        digest.update(f"input_size:{model.input_size}:".encode())
    for name, value in tensors:
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}:".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def feature_cache_fingerprint(model: Any, fact_file: Any) -> str:
    """The key of a feature cache: SHA-256 (hex) of :func:`trunk_fingerprint`, the fact
    file's resolved path, byte size and modification time (ns), its fact vocabulary, sample
    count and image size, and the stored dtype. Any change of the trunk or of the fact file
    gives another key (a merely touched file is recomputed, never a stale one read)."""
    path = Path(fact_file.path).resolve()
    stat = path.stat()
    parts = {
        "trunk": trunk_fingerprint(model), "fact_file": str(path), "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns, "vocabulary": fact_vocabulary_fingerprint(fact_file),
        "num_samples": int(fact_file.num_samples), "image_size": int(fact_file.image_size), "dtype": "float32",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def options_fingerprint(options: dict[str, Any]) -> str:
    """sha1 of ``options`` as JSON with sorted keys (10 hex digits): equal options, equal name."""
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]


def transformers_folder_fingerprint(model_dir: Path) -> str:
    """sha1 of config.json plus the sizes of the weight files (cheap, path-independent; 12 hex digits)."""
    digest = hashlib.sha1((model_dir / "config.json").read_bytes())
    for weight_name in TRANSFORMERS_WEIGHT_FILES:
        weight = model_dir / weight_name
        if weight.is_file():
            digest.update(f"{weight_name}:{weight.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def word2vec_file_fingerprint(path: Path) -> str:
    """sha1 of the file size and its first MiB (cheap for multi-GB vector files; 12 hex digits)."""
    digest = hashlib.sha1(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


__all__ = ["DATA_SHA_KEY", "FULL_HASH_BELOW", "TRANSFORMERS_WEIGHT_FILES", "VOCABULARY_KEY", "content_sample",
           "fact_vocabulary_fingerprint", "feature_cache_fingerprint", "file_identity", "file_sha256", "model_fingerprint", "options_fingerprint",
           "transformers_folder_fingerprint", "trunk_fingerprint", "vocabulary_fingerprint", "word2vec_file_fingerprint"]
