"""Atomic, safe checkpoints and result files.

Checkpoints hold state_dicts, plain values and the run's configuration only (never
pickled modules), and are read back with ``torch.load(weights_only=True)``.
Every write goes to a temporary file in the target folder and is renamed into
place, so a crash or a kill leaves either the previous file or the new one,
never half of one.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointMismatchError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state_dicts, plain values) atomically with ``torch.save``."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, *, expected_config: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    If ``expected_config`` is given, the checkpoint's ``"config"`` entry must equal it;
    otherwise :class:`CheckpointMismatchError` names the first differing key.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, not a torch file, unsafe pickle
        raise CheckpointMismatchError(
            f"cannot read checkpoint {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "delete it to start over"
        ) from None
    if expected_config is not None:
        check_config(state, expected_config, path)
    return state


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
