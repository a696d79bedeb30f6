"""The strict checks :func:`data_prep.facts.fact_file.open_facts` runs on a fact file: root attributes
(:func:`check_attributes`), each dataset's dtype and shape from the HDF5 metadata before any
data is read (:func:`check_layout`), and the values of the small datasets (:func:`check_values`:
id ranges, split codes, orders, finite boxes) before they are cast, so nothing is silently
truncated, wrapped or dropped. Each failure raises :class:`~data_prep.errors.FactFileError`
naming the file, the dataset and what was expected.

Cost: the layout checks read metadata only; the value checks are one pass (min/max, membership)
over the arrays the reader loads anyway. The pixels are checked by dtype and shape, never read.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from ..errors import FactFileError

#: dtype kind each dataset must have: "int" (signed or unsigned integers), "float", "str", "uint8"
_KINDS = {
    "facts/subject": "str", "facts/predicate": "str", "facts/object": "str", "vocabulary": "str",
    "facts/order": "int", "facts/task": "int", "samples/fact": "int", "samples/image_id": "int",
    "samples/split": "int", "facts/slot_mask": "float", "facts/embedding": "float", "samples/box": "float",
    "samples/pixels": "uint8",
}
#: shape each dataset must have: F facts, N samples, V words, D embedding width, S pixels
_SHAPES = {
    "facts/subject": "[F]", "facts/predicate": "[F]", "facts/object": "[F]", "facts/order": "[F]",
    "facts/task": "[F]", "facts/slot_mask": "[F, 3]", "facts/embedding": "[F, 3*d]", "samples/fact": "[N]",
    "samples/image_id": "[N]", "samples/split": "[N]", "samples/box": "[N, 4]", "samples/pixels": "[N, S, S, 3]",
    "vocabulary": "[V]",
}


@dataclass(frozen=True)
class Layout:
    """Sizes read from the datasets' shapes: facts F, samples N, pixel side S (None: no pixels)."""

    num_facts: int
    num_samples: int
    image_size: int | None


def _fail(path: Path, message: str) -> FactFileError:
    return FactFileError(f"fact file {path}: {message}; prepare it again")


def _show(value: object) -> str:
    """A short rendering of an attribute value: numpy scalars as Python values, arrays as lists."""
    if isinstance(value, np.ndarray):
        return f"the array {value.tolist()!r:.60}"
    if isinstance(value, np.generic):
        return repr(value.item())
    return f"{value!r:.60}"


def _integer_attribute(attrs: Mapping[str, Any], name: str, path: Path) -> int | None:
    """The root attribute ``name`` as an int (None when absent); anything but an integer scalar is refused."""
    if name not in attrs:
        return None
    value = attrs[name]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise _fail(path, f"attribute '{name}' is {_show(value)} ({type(value).__name__}); expected an integer")
    return int(value)


def check_attributes(attrs: Mapping[str, Any], path: Path, supported_version: int) -> None:
    """``format_version`` an integer equal to ``supported_version``; ``complete`` the boolean True."""
    if "format_version" not in attrs:
        raise FactFileError(f"{path} has no 'format_version' attribute; it is not a mas-triplets fact file")
    version = attrs["format_version"]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (numbers.Integral, np.integer)):
        raise FactFileError(f"fact file {path} has format_version {_show(version)} ({type(version).__name__}); "
                            f"expected the integer {supported_version}: prepare it again with this version")
    if int(version) != supported_version:
        raise FactFileError(
            f"fact file {path} has format_version {int(version)}; this reader reads version {supported_version}: "
            "prepare it again with this version")
    complete = attrs.get("complete", False)
    if not isinstance(complete, (bool, np.bool_)) or not bool(complete):
        raise FactFileError(f"fact file {path} is incomplete (its write did not finish); prepare it again")


def _kind_matches(dataset: h5py.Dataset, kind: str) -> bool:
    dtype = dataset.dtype
    if kind == "str":
        return h5py.check_string_dtype(dtype) is not None or dtype.kind == "S"
    if kind == "int":
        return dtype.kind in "iu"
    if kind == "float":
        return dtype.kind == "f"
    return dtype == np.uint8


def check_layout(handle: h5py.File, path: Path) -> Layout:
    """Every present dataset's dtype and shape (metadata only); returns the sizes they agree on."""
    present = {name: handle.get(name) for name in _KINDS}  # one lookup each: h5py lookups cost ~0.1 ms
    present = {name: item for name, item in present.items() if item is not None}
    for name, item in present.items():
        if not isinstance(item, h5py.Dataset) or not _kind_matches(item, _KINDS[name]):
            found = item.dtype if isinstance(item, h5py.Dataset) else "a group"
            expected = {"int": "integers", "float": "floats", "str": "strings", "uint8": "uint8"}[_KINDS[name]]
            raise _fail(path, f"dataset '{name}' has dtype {found}; expected {expected} {_SHAPES[name]}")
    shapes = {name: item.shape for name, item in present.items()}
    num_facts = shapes["facts/subject"][0] if len(shapes["facts/subject"]) == 1 else -1
    num_samples = shapes["samples/fact"][0] if len(shapes["samples/fact"]) == 1 else -1
    pixels = shapes.get("samples/pixels")
    image_size = pixels[1] if pixels is not None and len(pixels) == 4 else None
    sizes = {"F": num_facts, "N": num_samples, "S": image_size}
    for name, shape in shapes.items():
        pattern = _SHAPES[name].strip("[]").split(", ")
        ok = len(shape) == len(pattern)
        for size, symbol in zip(shape, pattern):
            if symbol in sizes:
                ok = ok and size == sizes[symbol]
            elif symbol.isdigit():
                ok = ok and size == int(symbol)
            elif symbol == "3*d":
                ok = ok and size > 0 and size % 3 == 0
        if not ok:
            raise _fail(path, f"dataset '{name}' has shape {list(shape)}; expected {_SHAPES[name]} with "
                        f"F = {num_facts} facts, N = {num_samples} samples"
                        + (f", S = {image_size}" if name == "samples/pixels" else ""))
    provenance = handle.get("provenance")
    if provenance is not None and (not isinstance(provenance, h5py.Dataset) or provenance.shape != ()):
        raise _fail(path, "'provenance' is not a scalar string dataset")
    for name, expected in (("num_facts", num_facts), ("num_samples", num_samples)):
        stored = _integer_attribute(handle.attrs, name, path)
        if stored is not None and stored != expected:
            raise _fail(path, f"attribute '{name}' is {stored} but the datasets hold {expected}")
    stored_size = _integer_attribute(handle.attrs, "image_size", path)
    if stored_size is not None and stored_size != (image_size or 0):
        raise _fail(path, f"attribute 'image_size' is {stored_size} but 'samples/pixels' has side {image_size or 0}")
    return Layout(num_facts, num_samples, image_size)


def _check_range(path: Path, name: str, values: np.ndarray, low: int, high: int, what: str) -> None:
    """Every value of the integer array ``values`` in ``low..high``."""
    if values.size and (values.min() < low or values.max() > high):
        bad = values[(values < low) | (values > high)][0]
        raise _fail(path, f"dataset '{name}' holds {bad}; expected {what} in {low}..{high}")


def check_values(raw: Mapping[str, np.ndarray], attrs: Mapping[str, Any], path: Path, layout: Layout) -> int:
    """Ranges of the loaded datasets (before any cast); returns the number of tasks T.

    Task ids in 0..T-1 with every task non-empty (T = attribute ``num_tasks``, else max + 1),
    sample fact ids in 0..F-1, orders 1..3, splits 0/1, image ids non-negative, boxes finite with
    non-negative coordinates, slot masks 0/1, embeddings finite.
    """
    num_facts = layout.num_facts
    task = raw["facts/task"]
    stored_tasks = _integer_attribute(attrs, "num_tasks", path)
    num_tasks = stored_tasks if stored_tasks is not None else (int(task.max()) + 1 if task.size else 0)
    if num_facts and num_tasks < 1:
        raise _fail(path, f"attribute 'num_tasks' is {num_tasks}; expected at least 1")
    _check_range(path, "facts/task", task, 0, num_tasks - 1, "task ids")
    if task.size:
        empty = np.flatnonzero(np.bincount(task.astype(np.int64), minlength=num_tasks) == 0)
        if empty.size:
            raise _fail(path, f"task {int(empty[0])} of 0..{num_tasks - 1} has no fact in 'facts/task'")
    _check_range(path, "samples/fact", raw["samples/fact"], 0, num_facts - 1, "fact ids")
    _check_range(path, "facts/order", raw["facts/order"], 1, 3, "fact orders")
    _check_range(path, "samples/split", raw["samples/split"], 0, 1, "split codes (0 train, 1 test)")
    _check_range(path, "samples/image_id", raw["samples/image_id"], 0, np.iinfo(np.int64).max, "image ids")
    box = raw["samples/box"]
    within_float32 = box.dtype.itemsize <= 4 or not box.size or float(np.abs(box).max()) <= np.finfo(np.float32).max
    if box.size and not (np.isfinite(box).all() and (box >= 0).all() and within_float32):
        raise _fail(path, "dataset 'samples/box' holds a negative, NaN or infinite value; expected x, y, w, h >= 0 "
                    "in pixels")
    mask = raw["facts/slot_mask"]
    if mask.size and not np.isin(mask, (0.0, 1.0)).all():
        raise _fail(path, "dataset 'facts/slot_mask' holds a value other than 0 and 1")
    embedding = raw.get("facts/embedding")
    if embedding is not None and embedding.size and not (
            np.isfinite(embedding).all() and (embedding.dtype.itemsize <= 4
                                              or float(np.abs(embedding).max()) <= np.finfo(np.float32).max)):
        raise _fail(path, "dataset 'facts/embedding' holds a NaN or infinite value (or one beyond float32)")
    return num_tasks


def check_orders(orders: np.ndarray, computed: np.ndarray, path: Path) -> None:
    """``facts/order`` equals the order the slot strings give (S only 1, S+P 2, S+P+O 3)."""
    differ = np.flatnonzero(orders.astype(np.int64) != computed)
    if differ.size:
        row = int(differ[0])
        raise _fail(path, f"dataset 'facts/order' gives fact {row} order {int(orders[row])} but its slots make it "
                    f"order {int(computed[row])}")
