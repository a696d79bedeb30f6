"""Atomic, safe checkpoints and result files.

Checkpoints hold state_dicts, plain values and the run's configuration only (never
pickled modules), and are read back with ``torch.load(weights_only=True)``.
Every write goes to a temporary file in the target folder and is renamed into
place, so a crash or a kill leaves either the previous file or the new one,
never half of one (a kill between the two can leave the hidden temporary file
``.NAME.<random>.tmp``; :func:`remove_stale_temporaries` removes those).

Checksums: a checkpoint is the zip archive ``torch.save`` writes, with the SHA-256 of
that archive (as written, with an empty archive comment) stored in the archive's comment
(``mas-sha256:<64 hex>``). ``torch.load`` ignores the comment; :func:`load_checkpoint`
recomputes the hash and refuses a file whose bytes changed. The same protection lives inside the
payload too, where stripping the comment cannot switch it off: a mapping saved by
:func:`save_checkpoint` carries the key ``PAYLOAD_CHECKSUM_KEY``, the SHA-256 of its contents
(:func:`payload_checksum`: every tensor's dtype, shape and bytes and every plain value, in
order), checked after loading and removed from the answer. A JSON result written by
:func:`atomic_write_json` with ``checksum=True`` carries the key ``"sha256"``: the SHA-256
of the document without that key, rendered canonically (``json.dumps(doc, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``, UTF-8); :func:`read_json` checks it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointMismatchError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMPORARY_SUFFIX = ".tmp"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "w+b") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def exclusive_file_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive POSIX advisory lock (``flock``) on ``lock_path``, created when missing (its
    folder must exist), so that processes serialise a load-modify-save or compute a file once; a
    no-op where ``fcntl`` is missing (not POSIX), where the writes stay atomic but unserialised."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_checksum(document: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``document`` without its ``"sha256"`` key, rendered canonically
    (sorted keys, no spaces, UTF-8)."""
    body = {key: value for key, value in document.items() if key != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


CHECKSUM_KEY = "sha256"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; with ``checksum`` (``obj`` a
    mapping) add the key ``"sha256"`` (:func:`json_checksum`), checked by :func:`read_json`."""
    if checksum:
        obj = {**{key: value for key, value in obj.items() if key != CHECKSUM_KEY}, CHECKSUM_KEY: json_checksum(obj)}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Read the JSON file ``path``; a mapping carrying ``"sha256"`` must match it (the key is
    removed from the answer). :class:`CheckpointMismatchError` (one line) for a file that is not
    UTF-8 JSON or whose checksum differs; ``FileNotFoundError`` when it is missing."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointMismatchError(f"cannot read the {what} {path} ({reason}); restore it or use a new output "
                                      "folder") from None
    if isinstance(document, dict) and CHECKSUM_KEY in document:
        saved = document.pop(CHECKSUM_KEY)
        actual = json_checksum(document)
        if saved != actual:
            raise CheckpointMismatchError(
                f"the {what} {path} was changed after it was written (SHA-256 {actual[:16]}…, written with "
                f"{str(saved)[:16]}…); restore it or use a new output folder")
    return document


# --------------------------------------------------------------------------- checkpoints

_EOCD = b"PK\x05\x06"  # the zip archive's end-of-central-directory record: 22 bytes + comment
_EOCD_SIZE = 22
_COMMENT_TAG = b"mas-sha256:"
_COMMENT_SIZE = len(_COMMENT_TAG) + 64
_CHUNK = 1 << 22


def _hash_prefix(handle, size: int, digest) -> None:
    handle.seek(0)
    remaining = size
    while remaining > 0:
        block = handle.read(min(_CHUNK, remaining))
        if not block:
            break
        digest.update(block)
        remaining -= len(block)


def _write_checksummed(state: dict[str, Any], handle) -> None:
    """``torch.save`` into ``handle``, then the archive's SHA-256 into its comment."""
    torch.save(state, handle)
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(size - _EOCD_SIZE)
    tail = handle.read(_EOCD_SIZE)
    if not tail.startswith(_EOCD) or tail[-2:] != b"\x00\x00":  # not the archive we expect: leave it bare
        return
    digest = hashlib.sha256()
    _hash_prefix(handle, size, digest)
    handle.seek(size - 2)
    handle.write(struct.pack("<H", _COMMENT_SIZE) + _COMMENT_TAG + digest.hexdigest().encode("ascii"))


def checkpoint_checksum(path: str | os.PathLike) -> tuple[str | None, str]:
    """``(saved, actual)``: the SHA-256 stored in the checkpoint at ``path`` (``None`` for a file
    written without one) and the one its bytes have now."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size >= _EOCD_SIZE + _COMMENT_SIZE:
            handle.seek(size - _COMMENT_SIZE - _EOCD_SIZE)
            tail = handle.read()
            record, comment = tail[:_EOCD_SIZE], tail[_EOCD_SIZE:]
            if (record.startswith(_EOCD) and record[-2:] == struct.pack("<H", _COMMENT_SIZE)
                    and comment.startswith(_COMMENT_TAG)):
                digest = hashlib.sha256()
                _hash_prefix(handle, size - _COMMENT_SIZE - 2, digest)
                digest.update(b"\x00\x00")
                return comment[len(_COMMENT_TAG):].decode("ascii", "replace"), digest.hexdigest()
        digest = hashlib.sha256()
        _hash_prefix(handle, size, digest)
        return None, digest.hexdigest()


PAYLOAD_CHECKSUM_KEY = "payload_sha256"


def payload_checksum(state: Any) -> str:
    """SHA-256 (hex) of ``state``'s contents, as :func:`torch.load` gives them back: mappings
    (key and value, in order), lists and tuples item by item, tensors by dtype, shape and bytes,
    anything else by type name and ``repr``."""
    digest = hashlib.sha256()
    stack: list[Any] = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            tensor = (tensor if tensor.device.type == "cpu" else tensor.cpu()).contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)};".encode())
            for key, item in reversed(list(value.items())):
                stack.extend((item, key))
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)};".encode())
            stack.extend(reversed(value))
        else:
            text = repr(value).encode("utf-8", "backslashreplace")
            digest.update(f"V{type(value).__name__}{len(text)};".encode() + text)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state_dicts, plain values) atomically with ``torch.save``, its
    SHA-256 in the archive's comment and the SHA-256 of its contents inside it (see the module docs)."""
    if isinstance(state, dict):
        body = {key: value for key, value in state.items() if key != PAYLOAD_CHECKSUM_KEY}
        state = {**body, PAYLOAD_CHECKSUM_KEY: payload_checksum(body)}
    _atomic_write(Path(path), lambda handle: _write_checksummed(state, handle))


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse, in one line (:class:`CheckpointMismatchError`), a checkpoint whose bytes differ from
    the SHA-256 written with it, or that is not a complete zip archive (truncated); without reading
    its tensors. ``FileNotFoundError`` when it is missing."""
    path = Path(path)
    try:
        saved, actual = checkpoint_checksum(path)
        complete = zipfile.is_zipfile(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if saved is not None and saved != actual:
        raise CheckpointMismatchError(
            f"checkpoint {path} is damaged: its bytes hash to SHA-256 {actual[:16]}…, it was written with "
            f"{saved[:16]}…; delete it to start over (or restore it)")
    if not complete:
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: not a complete torch archive (truncated?); "
                                      "delete it to start over")


def load_checkpoint(path: str | os.PathLike, *, expected_config: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    The stored SHA-256 is checked first, the contents' SHA-256 once loaded (a file written
    without them, by an older version, is read unchecked). If ``expected_config`` is given, the checkpoint's ``"config"`` entry
    must equal it; otherwise :class:`CheckpointMismatchError` names the first differing key.
    Every refusal is one line.
    """
    path = Path(path)
    verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, not a torch file, unsafe pickle
        raise CheckpointMismatchError(
            f"cannot read checkpoint {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "delete it to start over"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(state).__name__}, not a checkpoint; delete it to start over")
    if PAYLOAD_CHECKSUM_KEY in state:
        saved = state.pop(PAYLOAD_CHECKSUM_KEY)
        actual = payload_checksum(state)
        if saved != actual:
            raise CheckpointMismatchError(
                f"checkpoint {path} is damaged: its contents hash to SHA-256 {actual[:16]}…, it was written with "
                f"{str(saved)[:16]}…; delete it to start over (or restore it)")
    if expected_config is not None:
        check_config(state, expected_config, path)
    return state


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Remove the hidden temporary files (``.NAME.<random>.tmp``) that a write killed between
    writing and renaming left in ``folder`` (and its sub-folders); return their paths. Call it
    only where no other process is writing into ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(f".*{TEMPORARY_SUFFIX}") if recursive else folder.glob(f".*{TEMPORARY_SUFFIX}")
    removed = []
    for path in sorted(found):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def check_config(state: dict[str, Any], expected_config: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first key where ``state["config"]``
    differs from ``expected_config``."""
    saved = state.get("config")
    if saved != expected_config:
        diff = _first_difference(saved, expected_config)
        raise CheckpointMismatchError(
            f"checkpoint {path} was written with another configuration ({diff}); "
            "resume with the original config or use a new output folder"
        )


def _first_difference(saved: Any, expected: Any, prefix: str = "") -> str:
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in sorted(set(saved) | set(expected), key=str):
            if key not in saved:
                return f"key {prefix + str(key)!r} missing in checkpoint"
            if key not in expected:
                return f"key {prefix + str(key)!r} not in current config"
            if saved[key] != expected[key]:
                return _first_difference(saved[key], expected[key], prefix + str(key) + ".")
    return f"{prefix.rstrip('.') or 'config'}: checkpoint has {saved!r}, current is {expected!r}"


# --------------------------------------------------------------------------- random number generators

def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def get_rng_states() -> dict[str, Any]:
    """The global generators' states (torch, numpy, Python, CUDA when initialised) as tensors and
    plain values, loadable with ``weights_only=True``."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(numpy_state[0]),
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {"version": int(python_state[0]), "internal": list(python_state[1]),
                   "gauss_next": python_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned."""
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].cpu().numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
