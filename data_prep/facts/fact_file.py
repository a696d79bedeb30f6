"""The fact HDF5 file: writer (:func:`write_fact_file`) and reader (:func:`open_facts`).

Layout (``format_version`` 1; every field is documented in ``docs/data_format.md``)::

    /                       attrs: format_version, complete, num_facts, num_samples, num_tasks,
                                   image_size (0 = no pixels), encoder_name ("" = none)
    /facts/subject          str  [F]        S slot
    /facts/predicate        str  [F]        P slot (predicate or attribute), "" when absent
    /facts/object           str  [F]        O slot, "" when absent
    /facts/order            int8 [F]        1 <S>, 2 <S,P>, 3 <S,P,O>
    /facts/slot_mask        float32 [F,3]   w_s, w_p, w_o (1 = slot present)
    /facts/task             int32 [F]       task of each fact, 0..T-1
    /facts/embedding        float32 [F,3d]  optional: language target (S | P | O vectors)
    /samples/fact           int32 [N]       fact id of each sample
    /samples/image_id       int64 [N]       source image id
    /samples/box            float32 [N,4]   region x, y, w, h in original image pixels
    /samples/split          int8 [N]        0 train, 1 test
    /samples/pixels         uint8 [N,S,S,3] optional: the region resized to S x S, RGB
    /vocabulary             str  [V]        sorted distinct slot phrases
    /provenance             str  scalar     JSON: sources, command line, counts, drops, task stats

Writes are atomic: everything goes to a temporary file in the output folder which is
renamed onto the output path only once complete (the root attribute ``complete`` is
set last); an exception at any point removes the temporary file and leaves the
output path untouched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from . import checks
from ..atomic import atomic_output, interruption_point
from ..errors import FactFileError

FORMAT_VERSION = 1

Fact = tuple[str, "str | None", "str | None"]

_REQUIRED_DATASETS = (
    "facts/subject",
    "facts/predicate",
    "facts/object",
    "facts/order",
    "facts/slot_mask",
    "facts/task",
    "samples/fact",
    "samples/image_id",
    "samples/box",
    "samples/split",
    "vocabulary",
    "provenance",
)

_NUMERIC_DATASETS = ("facts/order", "facts/slot_mask", "facts/task", "facts/embedding", "samples/fact",
                     "samples/image_id", "samples/box", "samples/split")

_SPLIT_NAMES = {"train": 0, "test": 1}


def fact_order(fact: Sequence[str | bytes | None]) -> int:
    """Order of a fact (S, P, O): 1 for <S>, 2 for <S,P>, 3 for <S,P,O>.

    A slot is absent when it is None or empty (``""``, as the file stores it) or left out
    (``fact`` may hold 1 to 3 slots).
    """
    if len(fact) >= 3 and fact[2]:
        return 3
    if len(fact) >= 2 and fact[1]:
        return 2
    return 1


def fact_to_string(fact: Sequence[str | None]) -> str:
    """``"<man,riding,horse>"`` style rendering of a fact tuple (absent slots left out)."""
    return "<" + ",".join(part for part in fact if part is not None) + ">"


def _validate_facts(facts: Sequence[Sequence[str | None]]) -> list[Fact]:
    checked: list[Fact] = []
    for index, fact in enumerate(facts):
        if len(fact) != 3:
            raise FactFileError(f"fact {index} has {len(fact)} slots; give (subject, predicate|None, object|None)")
        subject, predicate, obj = fact
        if not isinstance(subject, str) or not subject:
            raise FactFileError(f"fact {index} has no subject; every fact needs a non-empty subject string")
        predicate = predicate or None
        obj = obj or None
        if obj is not None and predicate is None:
            raise FactFileError(f"fact {index} {fact!r} has an object but no predicate; give <S,P,O>")
        checked.append((subject, predicate, obj))
    return checked



def _chunk_rows(row_bytes: int, num_rows: int, target_bytes: int = 1 << 16) -> int:
    return max(1, min(num_rows, target_bytes // max(1, row_bytes)))


#: most rows one slice of :func:`read_rows` reads (bounds its temporary memory)
READ_ROWS_PER_SLICE = 4096


def read_rows(dataset: Any, rows: np.ndarray) -> np.ndarray:
    """The rows ``rows`` (sorted, unique, in range) of an HDF5 dataset, in that order.

    One contiguous slice per run of adjacent chunks holding wanted rows (at most
    ``READ_ROWS_PER_SLICE`` rows a slice) instead of h5py's point selection
    (``dataset[rows]``), which costs about 1.7 ms per row on a gzip-chunked pixel dataset
    against about 0.1 ms per row by slices (measured, docs/data_format.md): each chunk
    touched is decompressed once, whatever the number of wanted rows in it.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size,) + tuple(dataset.shape[1:]), dtype=dataset.dtype)
    if rows.size == 0:
        return out
    chunk_rows = int(dataset.chunks[0]) if dataset.chunks else 1
    chunk_of = rows // chunk_rows
    run_starts = np.flatnonzero(np.diff(chunk_of) > 1) + 1
    for run in np.split(np.arange(rows.size), run_starts):
        for start in range(0, run.size, READ_ROWS_PER_SLICE):
            part = run[start:start + READ_ROWS_PER_SLICE]
            first, last = int(rows[part[0]]), int(rows[part[-1]])
            out[part] = dataset[first:last + 1][rows[part] - first]
    return out


def write_fact_file(
    path: str | os.PathLike,
    *,
    facts: Sequence[Sequence[str | None]],
    sample_fact: np.ndarray,
    sample_image_id: np.ndarray,
    sample_box: np.ndarray,
    sample_split: np.ndarray,
    task_of_fact: np.ndarray,
    sample_pixels: "np.ndarray | Iterable[tuple[int, np.ndarray]] | None",
    provenance: dict[str, Any],
    fact_embeddings: np.ndarray | None = None,
    encoder_name: str | None = None,
    image_size: int | None = None,
) -> Path:
    """Write a fact file atomically and return its path.

    ``sample_pixels`` is either an array ``uint8 (N, S, S, 3)`` or, for data too large for
    memory, an iterable of ``(first_sample_index, block)`` pairs whose blocks
    ``uint8 (k, S, S, 3)`` together cover every sample exactly once; then ``image_size``
    (S) is required. ``sample_box`` is ``(N, 4)`` x, y, w, h in original image pixels.
    Raises :class:`FactFileError` for inconsistent inputs; nothing is left at ``path``
    (nor a temporary file) if anything fails.
    """
    path = Path(path)
    checked_facts = _validate_facts(facts)
    num_facts = len(checked_facts)
    sample_fact = np.asarray(sample_fact, dtype=np.int64)
    num_samples = int(sample_fact.shape[0])
    sample_image_id = np.asarray(sample_image_id, dtype=np.int64)
    sample_box = np.asarray(sample_box, dtype=np.float32).reshape(-1, 4) if num_samples else np.zeros((0, 4), np.float32)
    sample_split = np.asarray(sample_split, dtype=np.int8)
    task_of_fact = np.asarray(task_of_fact, dtype=np.int64)
    for name, array, expected in (
        ("sample_image_id", sample_image_id, num_samples),
        ("sample_box", sample_box, num_samples),
        ("sample_split", sample_split, num_samples),
        ("task_of_fact", task_of_fact, num_facts),
    ):
        if array.shape[0] != expected:
            raise FactFileError(f"{name} has {array.shape[0]} rows, expected {expected}")
    if num_samples and (sample_fact.min() < 0 or sample_fact.max() >= num_facts):
        raise FactFileError(f"sample_fact holds ids outside 0..{num_facts - 1}")
    if num_samples and not np.isin(sample_split, (0, 1)).all():
        raise FactFileError("sample_split must hold 0 (train) or 1 (test) only")
    if num_facts and task_of_fact.min() < 0:
        raise FactFileError("task_of_fact holds negative task ids")
    num_tasks = int(task_of_fact.max()) + 1 if num_facts else 0
    if num_facts and len(np.unique(task_of_fact)) != num_tasks:
        raise FactFileError("task ids must be 0..T-1 with every task non-empty")
    if fact_embeddings is not None:
        fact_embeddings = np.asarray(fact_embeddings, dtype=np.float32)
        if fact_embeddings.ndim != 2 or fact_embeddings.shape[0] != num_facts or fact_embeddings.shape[1] % 3:
            raise FactFileError(
                f"fact_embeddings has shape {fact_embeddings.shape}; expected ({num_facts}, 3*d)"
            )
    pixel_array: np.ndarray | None = None
    pixel_blocks: Iterable[tuple[int, np.ndarray]] | None = None
    if isinstance(sample_pixels, np.ndarray):
        pixel_array = sample_pixels
        if pixel_array.dtype != np.uint8 or pixel_array.ndim != 4 or pixel_array.shape[0] != num_samples \
                or pixel_array.shape[1] != pixel_array.shape[2] or pixel_array.shape[3] != 3:
            raise FactFileError(
                f"sample_pixels has dtype {pixel_array.dtype} shape {pixel_array.shape}; expected uint8 ({num_samples}, S, S, 3)"
            )
        image_size = int(pixel_array.shape[1])
    elif sample_pixels is not None:
        if not image_size or image_size < 1:
            raise FactFileError("image_size is required when sample_pixels is given as blocks")
        pixel_blocks = sample_pixels
    else:
        image_size = None

    order = np.array([fact_order(fact) for fact in checked_facts], dtype=np.int8)
    slot_mask = np.stack(
        [np.ones(num_facts, np.float32), (order >= 2).astype(np.float32), (order == 3).astype(np.float32)], axis=1
    ) if num_facts else np.zeros((0, 3), np.float32)
    vocabulary = sorted({slot for fact in checked_facts for slot in fact if slot is not None})

    string_dtype = h5py.string_dtype(encoding="utf-8")
    compression = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with atomic_output(path) as tmp_name:
        with h5py.File(tmp_name, "w") as handle:
            def put(name: str, data: np.ndarray, **options: Any) -> None:
                interruption_point()  # Ctrl-C is deferred during the write (data_prep.atomic)
                data = np.asarray(data)
                if data.size == 0:
                    handle.create_dataset(name, data=data, **options)
                    return
                row_bytes = max(1, data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
                chunks = (_chunk_rows(row_bytes, data.shape[0]),) + tuple(data.shape[1:])
                handle.create_dataset(name, data=data, chunks=chunks, **compression, **options)

            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["complete"] = False
            handle.attrs["num_facts"] = num_facts
            handle.attrs["num_samples"] = num_samples
            handle.attrs["num_tasks"] = num_tasks
            handle.attrs["image_size"] = int(image_size or 0)
            handle.attrs["encoder_name"] = encoder_name or ""
            put("facts/subject", np.array([f[0] for f in checked_facts], dtype=object), dtype=string_dtype)
            put("facts/predicate", np.array([f[1] or "" for f in checked_facts], dtype=object), dtype=string_dtype)
            put("facts/object", np.array([f[2] or "" for f in checked_facts], dtype=object), dtype=string_dtype)
            put("facts/order", order)
            put("facts/slot_mask", slot_mask)
            put("facts/task", task_of_fact.astype(np.int32))
            if fact_embeddings is not None:
                put("facts/embedding", fact_embeddings)
            put("samples/fact", sample_fact.astype(np.int32))
            put("samples/image_id", sample_image_id)
            put("samples/box", sample_box)
            put("samples/split", sample_split)
            put("vocabulary", np.array(vocabulary, dtype=object), dtype=string_dtype)
            handle.create_dataset("provenance", data=json.dumps(provenance, sort_keys=True), dtype=string_dtype)
            if image_size:
                pixel_shape = (num_samples, image_size, image_size, 3)
                chunk = (_chunk_rows(image_size * image_size * 3, max(1, num_samples), 1 << 14), image_size, image_size, 3)
                pixels = handle.create_dataset(
                    "samples/pixels", shape=pixel_shape, dtype=np.uint8,
                    chunks=chunk if num_samples else None,
                    **({"compression": "gzip", "compression_opts": 1} if num_samples else {}),
                )
                if pixel_array is not None:
                    if num_samples:
                        pixels[...] = pixel_array
                else:
                    covered = np.zeros(num_samples, dtype=bool)
                    for first, block in pixel_blocks:  # type: ignore[union-attr]
                        interruption_point()
                        block = np.asarray(block)
                        if block.dtype != np.uint8 or block.shape[1:] != (image_size, image_size, 3):
                            raise FactFileError(
                                f"pixel block at {first} has dtype {block.dtype} shape {block.shape}; "
                                f"expected uint8 (k, {image_size}, {image_size}, 3)"
                            )
                        stop = first + block.shape[0]
                        if first < 0 or stop > num_samples:
                            raise FactFileError(f"pixel block {first}:{stop} lies outside 0:{num_samples}")
                        pixels[first:stop] = block
                        covered[first:stop] = True
                    if not covered.all():
                        raise FactFileError(
                            f"pixel blocks left {int((~covered).sum())} samples without pixels"
                        )
            handle.attrs["complete"] = True
    return path


class FactFile:
    """A fact file opened for reading (see :func:`open_facts`).

    Small arrays are read into memory at open time; the pixels stay on disk and are
    read on demand by :meth:`pixels` (a torch view of them:
    :func:`triplets.facts.data.fact_image_dataset`; ``data_prep`` never imports torch).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FactFileError(f"fact file {self.path} does not exist; run `mas-triplets prepare` first")
        try:
            self._handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise FactFileError(
                f"fact file {self.path} is truncated or not an HDF5 file ({str(exc).splitlines()[0]}); prepare it again"
            ) from None
        try:
            self._load()
        except BaseException:
            self._handle.close()
            raise

    def _read(self, name: str) -> np.ndarray:
        if name not in self._handle:
            raise FactFileError(f"fact file {self.path} is missing the dataset '{name}'; prepare it again")
        try:
            return self._handle[name][()]
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise FactFileError(
                f"fact file {self.path}: dataset '{name}' is unreadable (truncated file? {str(exc).splitlines()[0]}); "
                "prepare it again"
            ) from None

    def _load(self) -> None:
        attrs = self._handle.attrs
        checks.check_attributes(attrs, self.path, FORMAT_VERSION)
        for name in _REQUIRED_DATASETS:
            if name not in self._handle:
                raise FactFileError(f"fact file {self.path} is missing the dataset '{name}'; prepare it again")
        layout = checks.check_layout(self._handle, self.path)

        def strings(name: str) -> list[str]:
            try:
                return [value.decode("utf-8") if isinstance(value, bytes) else str(value)
                        for value in self._read(name)]
            except UnicodeDecodeError:
                raise FactFileError(
                    f"fact file {self.path}: dataset '{name}' is not UTF-8 text; prepare it again") from None

        subjects = strings("facts/subject")
        predicates = strings("facts/predicate")
        objects = strings("facts/object")
        self.facts: list[Fact] = [
            (subject, predicate or None, obj or None) for subject, predicate, obj in zip(subjects, predicates, objects)
        ]
        if any(not subject for subject in subjects):
            raise FactFileError(f"fact file {self.path}: 'facts/subject' holds an empty subject; prepare it again")
        raw = {name: self._read(name) for name in _NUMERIC_DATASETS if name != "facts/embedding"}
        if "facts/embedding" in self._handle:
            raw["facts/embedding"] = self._read("facts/embedding")
        self.num_tasks: int = checks.check_values(raw, attrs, self.path, layout)
        checks.check_orders(raw["facts/order"], np.array([fact_order(f) for f in self.facts], np.int64),
                                      self.path)
        self.fact_order: np.ndarray = raw["facts/order"].astype(np.int8)
        self.slot_masks: np.ndarray = raw["facts/slot_mask"].astype(np.float32)
        self.task_of_fact: np.ndarray = raw["facts/task"].astype(np.int64)
        self.sample_fact: np.ndarray = raw["samples/fact"].astype(np.int64)
        self.sample_image_id: np.ndarray = raw["samples/image_id"].astype(np.int64)
        self.sample_box: np.ndarray = raw["samples/box"].astype(np.float32).reshape(-1, 4)
        self.sample_split: np.ndarray = raw["samples/split"].astype(np.int8)
        self.vocabulary: list[str] = strings("vocabulary")
        provenance_raw = self._read("provenance")
        if isinstance(provenance_raw, bytes):
            provenance_raw = provenance_raw.decode("utf-8", errors="replace")
        try:
            self.provenance: dict[str, Any] = json.loads(provenance_raw)
        except (TypeError, ValueError, RecursionError):
            raise FactFileError(f"fact file {self.path}: 'provenance' is not valid JSON; prepare it again") from None
        if not isinstance(self.provenance, dict):
            raise FactFileError(f"fact file {self.path}: 'provenance' is not a JSON object; prepare it again")
        self.fact_embeddings: np.ndarray | None = (
            raw["facts/embedding"].astype(np.float32) if "facts/embedding" in raw else None
        )
        self.encoder_name: str | None = str(attrs.get("encoder_name", "")) or None
        self.has_pixels: bool = layout.image_size is not None
        self.image_size: int | None = layout.image_size

    # ------------------------------------------------------------------ queries
    @property
    def num_facts(self) -> int:
        """Number of facts F."""
        return len(self.facts)

    @property
    def num_samples(self) -> int:
        """Number of samples N."""
        return len(self.sample_fact)

    def facts_of_task(self, task: int) -> np.ndarray:
        """Sorted fact ids of task ``task``."""
        self._check_task(task)
        return np.flatnonzero(self.task_of_fact == task)

    def _check_task(self, task: int) -> None:
        if not 0 <= int(task) < self.num_tasks:
            raise FactFileError(f"task {task} does not exist; this file has tasks 0..{self.num_tasks - 1}")

    @staticmethod
    def _split_code(split: int | str | None) -> int | None:
        if split is None:
            return None
        if isinstance(split, str):
            if split not in _SPLIT_NAMES:
                raise FactFileError(f"unknown split {split!r}; use 'train', 'test', 0 or 1")
            return _SPLIT_NAMES[split]
        if int(split) not in (0, 1):
            raise FactFileError(f"unknown split {split!r}; use 'train', 'test', 0 or 1")
        return int(split)

    def sample_indices(self, task: int | None = None, split: int | str | None = None) -> np.ndarray:
        """Sorted indices of the samples of ``task`` (None: all) in ``split`` (0/"train", 1/"test", None: both)."""
        keep = np.ones(self.num_samples, dtype=bool)
        if task is not None:
            self._check_task(task)
            keep &= self.task_of_fact[self.sample_fact] == int(task)
        code = self._split_code(split)
        if code is not None:
            keep &= self.sample_split == code
        return np.flatnonzero(keep)

    def pixels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Region pixels of the samples ``indices`` as ``uint8 (k, S, S, 3)``, in the order given."""
        if not self.has_pixels:
            raise FactFileError(f"fact file {self.path} has no pixels (prepared with --no-images); prepare it with images")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size == 0:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        if indices.min() < 0 or indices.max() >= self.num_samples:
            raise FactFileError(f"sample index out of range 0..{self.num_samples - 1}")
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            block = read_rows(self._handle["samples/pixels"], unique)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FactFileError(
                f"fact file {self.path}: pixels unreadable (truncated file? {str(exc).splitlines()[0]})"
            ) from None
        return block[inverse]

    def close(self) -> None:
        """Close the HDF5 handle (idempotent)."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            try:
                handle.close()
            except Exception:  # already closed or the interpreter is shutting down
                pass

    def __enter__(self) -> "FactFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FactFile({str(self.path)!r}, facts={self.num_facts}, samples={self.num_samples}, "
                f"tasks={self.num_tasks}, image_size={self.image_size})")


def open_facts(path: str | os.PathLike) -> FactFile:
    """Open a fact file; raises :class:`FactFileError` naming what is wrong: version, truncation, a missing
    dataset, a dtype or shape other than the layout's, an id out of range (:mod:`data_prep.facts.checks`)."""
    return FactFile(path)
