"""The lifelong-fact-learning benchmark's split files -> fact HDF5 (:func:`prepare_lll`).

The benchmark of "Exploring the Challenges towards Lifelong Fact Learning" (mid-scale 6DS:
4 tasks; large-scale Sherlock LSC: 8 tasks) is released as split files, read here as the
authors' code reads them::

    ROOT/splits/<T>tasks_<random|semantic>/B<k>_train.csv   k = 1..T
    ROOT/splits/<T>tasks_<random|semantic>/B<k>_test.csv
    ROOT/splits/<T>tasks_<random|semantic>/B<k>_facts.csv
    ROOT/images/{train,test}/...                            image_links are relative to ROOT/images/
    ROOT/NLP_feat/...                                       900 floats per fact (S, P, O: 300 each)

Columns: ``B<k>_train.csv`` / ``B<k>_test.csv``: ``image_links``, ``NLP_links`` (900 numbers,
looked up as ``ROOT/<link>`` then ``ROOT/NLP_feat/<link>``), ``SPO``, ``id``, ``w_s``, ``w_p``,
``w_o``; ``B<k>_facts.csv``: ``id``, ``type``, ``S``, ``P``, ``O`` (other columns are ignored;
``B<k>_BD_complete_*.csv`` are read when the plain names are absent).

Kept: task ``k - 1`` = the facts of ``B<k>_facts.csv``; train/test = the rows of ``B<k>_train.csv``
/ ``B<k>_test.csv``; facts in increasing benchmark id (``provenance["source_fact_ids"][i]`` is the
benchmark id of fact row ``i``), a slot present exactly when its ``w_`` flag is 1; samples in
reading order, box and pixels = the whole image (resized to S x S); language: the benchmark's 900
numbers (``text_encoder="native"``) or ``text_encoder(facts) -> [F, 3d]``.

Streaming: the CSVs are read row by row twice (pass 1 checks every row and image without a
full-size decode, ~30 bytes kept per sample; pass 2, inside the writer, decodes each kept image
once and resizes it, block by block): memory never holds the images. Missing or undecodable
images, repeated rows and facts without samples are counted drops; malformed files raise
:class:`DataPrepError` naming the file and the line. The files are read as
:mod:`data_prep.sources.lll_files` and :mod:`data_prep.sources.bounded_text` say: every link confined to the
dataset, every line bounded, ids exact, file content quoted only as a short excerpt.
Every rule is in ``docs/data_format.md`` ("The lifelong-fact-learning benchmark").
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import sys
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..atomic import check_output_file
from .bounded_text import csv_rows, exact_integer, excerpt
from ..errors import DataPrepError, MissingDatasetError
from ..image_decode import (DECODE_ERRORS, DEFAULT_MAX_IMAGE_PIXELS, check_image_transparency, check_max_pixels,
                           check_stored_image_size, decode_rgb, open_checked)
from ..facts.fact_file import FORMAT_VERSION, Fact, fact_order, write_fact_file
from ..facts.splits import task_statistics
from ..facts.pipeline import PrepareReport
from .lll_files import NATIVE_SLOT_DIM, DatasetRoot, read_native_vector  # noqa: F401  (read_native_vector: public here)

EmbedFn = Callable[[list[Fact]], Any]

NATIVE = "native"
NATIVE_ENCODER_NAME = "lll-native:word2vec-300x3"
SOURCE = "lifelong_fact_learning"
SPLIT_NAME = re.compile(r"^(\d+)tasks_(random|semantic)$")
SAMPLE_COLUMNS = ("image_links", "NLP_links", "SPO", "id", "w_s", "w_p", "w_o")
FACT_COLUMNS = ("id", "type", "S", "P", "O")
FILE_PREFIXES = ("B{k}_", "B{k}_BD_complete_")
PIXEL_BLOCK = 64
# data/lll/<scale><T>_<random|semantic>.h5, the files the configs/lll_*.yaml presets train on
FACT_FILE_NAME = re.compile(r"^(midscale|large)(\d+)_(random|semantic)\.h5$")
SCALE_FOLDERS = {"midscale": "mid_scale", "large": "large_scale"}


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class TaskFiles:
    """The three CSV files of benchmark task ``B<k>`` (``k`` 1-based)."""

    k: int
    train: Path
    test: Path
    facts: Path


def parse_split_name(split: str) -> tuple[int, str]:
    """``"4tasks_random"`` -> ``(4, "random")``; raises :class:`DataPrepError` for another form."""
    match = SPLIT_NAME.match(str(split))
    if match is None or int(match.group(1)) < 1:
        raise DataPrepError(f"--split {split!r} is not a benchmark split name; give <T>tasks_random or "
                            "<T>tasks_semantic (e.g. 4tasks_random for mid-scale, 8tasks_semantic for large-scale)")
    return int(match.group(1)), match.group(2)


def layout_text(root: str | os.PathLike, split: str) -> str:
    """The expected layout in one line, for error messages."""
    match = SPLIT_NAME.match(str(split))
    tasks = match.group(1) if match else "T"
    return (f"{Path(root)}/ holding splits/{split}/B<k>_train.csv, B<k>_test.csv, B<k>_facts.csv (k = 1..{tasks}), "
            "images under images/, 900-float files under NLP_feat/")


def find_task_files(root: str | os.PathLike, split: str) -> list[TaskFiles]:
    """The CSV files of every task of ``split`` under ``root`` (``data/<scale>``), checked to exist."""
    root = Path(root)
    num_tasks, _kind = parse_split_name(split)
    if not root.is_dir():
        raise MissingDatasetError(f"benchmark folder {root} not found; expected {layout_text(root, split)}")
    splits_dir = root / "splits"
    folder = splits_dir / split
    if not folder.is_dir():
        found = sorted(p.name for p in splits_dir.iterdir() if p.is_dir()) if splits_dir.is_dir() else []
        where = f"split folders under {splits_dir}: {', '.join(found)}" if found else f"{splits_dir} holds no split folder"
        raise MissingDatasetError(f"split folder {folder} not found ({where}); expected {layout_text(root, split)}")
    tasks = []
    for k in range(1, num_tasks + 1):
        paths = {}
        for part in ("train", "test", "facts"):
            candidates = [folder / (prefix.format(k=k) + f"{part}.csv") for prefix in FILE_PREFIXES]
            existing = [path for path in candidates if path.is_file()]
            if not existing:
                raise MissingDatasetError(f"{candidates[0]} not found; split {split} needs B1..B{num_tasks} "
                                          f"train, test and facts files ({layout_text(root, split)})")
            paths[part] = existing[0]
        tasks.append(TaskFiles(k, paths["train"], paths["test"], paths["facts"]))
    return tasks


def missing_fact_file_hint(path: str | os.PathLike) -> str | None:
    """For an absent ``.../lll/<midscale|large><T>_<random|semantic>.h5``: one line naming the
    benchmark layout expected beside it and the ``prepare lll`` command that makes it; else None."""
    path = Path(path)
    match = FACT_FILE_NAME.match(path.name)
    if match is None or path.parent.name != "lll":
        return None
    scale, num_tasks, kind = match.groups()
    split = f"{num_tasks}tasks_{kind}"
    root = path.parent.parent / SCALE_FOLDERS[scale]
    # the command first: the CLI shortens a line over 600 characters in its middle
    return (f"data.fact_file: no file {path}; run `mas-triplets prepare lll --root {root} --split {split} "
            f"--out {path} --text-encoder native --image-size 224` first: it is the lifelong-fact-learning "
            f"benchmark ({SCALE_FOLDERS[scale]}, split {split}) prepared from {layout_text(root, split)}")


# ---------------------------------------------------------------------------- CSV reading
def _flag(text: str, where: str, column: str) -> int:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return int(lowered == "true")
    value = exact_integer(text, where, column)
    if value not in (0, 1):
        raise DataPrepError(f"{where}: column {column} holds {excerpt(text)}; expected 0 or 1")
    return value


def _link_hash(link: str) -> int:
    """A signed 64-bit hash of an image link (collisions: ~1e-8 for a million images)."""
    return int.from_bytes(hashlib.blake2b(link.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _clean_link(text: str) -> str:
    return os.path.normpath(text.strip().strip("'\"")) if text.strip() else ""


# ---------------------------------------------------------------------------- images
def _image_size(path: Path, max_pixels: int | None) -> tuple[tuple[int, int], str | None]:
    """(width, height) of the image at ``path`` and the note its transparent pixels will give:
    checked without a full-size decode under the pixel limit
    (:func:`~data_prep.image_decode.check_image_transparency`), or from its header alone when
    ``max_pixels`` is None (no pixels are stored, nothing is decoded or composited)."""
    if max_pixels is None:
        with open_checked(path, sys.maxsize) as image:
            return image.size, None
    return check_image_transparency(path, max_pixels)


def _resized(path: Path, image_size: int, max_pixels: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(decode_rgb(path, max_pixels).resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)


def _progress_bar(enabled: bool, **options: Any) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, **options)


# ---------------------------------------------------------------------------- pass 1
def _no_rows(path: Path) -> str:
    return (f"{path} has a header and no rows; every task needs its facts, train and test rows "
            "(a file cut short by a failed copy or download?)")


@dataclass
class _Fact:
    source_id: int
    task: int
    subject: str
    predicate: str
    obj: str
    where: str
    flags: tuple[int, int, int] | None = None
    vector: np.ndarray | None = None


class _Collector:
    """Pass 1: every row checked; the kept ones stored as compact arrays (row, fact, split, image hash)."""

    def __init__(self, root: Path, native: bool, max_pixels: int | None, progress: bool) -> None:
        self.root = root
        self.dataset = DatasetRoot(root)
        self.native = native
        self.max_pixels = max_pixels
        self.facts: list[_Fact] = []
        self.fact_of_id: dict[int, int] = {}
        self.sample_row = array("q")
        self.sample_fact = array("i")
        self.sample_split = array("b")
        self.sample_hash = array("q")
        self.sample_size = array("f")
        self.rows_read = 0
        self.dropped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.transparent: set[str] = set()  # image files counted in the notes as composited over white
        self.bar = _progress_bar(progress, desc="reading split files", unit="row")

    def read_facts(self, files: TaskFiles, task: int) -> dict[int, int]:
        """Read ``B<k>_facts.csv``: benchmark id -> index into ``self.facts``."""
        of_task: dict[int, int] = {}
        for line, row in csv_rows(files.facts, FACT_COLUMNS):
            where = f"{files.facts}, line {line}"
            source_id = exact_integer(row["id"], where, "id")
            if source_id in self.fact_of_id:
                first = self.facts[self.fact_of_id[source_id]]
                raise DataPrepError(f"{where}: fact id {source_id} is listed twice (first at {first.where}); "
                                    "a fact belongs to one task")
            index = self.fact_of_id[source_id] = of_task[source_id] = len(self.facts)
            self.facts.append(_Fact(source_id, task, row["S"].strip(), row["P"].strip(), row["O"].strip(), where))
        if not of_task:
            raise DataPrepError(_no_rows(files.facts))
        return of_task

    def _check_flags(self, fact: _Fact, flags: tuple[int, int, int], where: str) -> None:
        if fact.flags is not None:
            if flags != fact.flags:
                raise DataPrepError(f"{where}: w_s, w_p, w_o = {flags} for fact {fact.source_id}, whose earlier rows "
                                    f"give {fact.flags}")
            return
        w_s, w_p, w_o = flags
        if not w_s:
            raise DataPrepError(f"{where}: w_s = 0 for fact {fact.source_id}; every fact has a subject")
        if w_o and not w_p:
            raise DataPrepError(f"{where}: fact {fact.source_id} has w_o = 1 but w_p = 0; facts are <S>, <S,P> or <S,P,O>")
        for name, flag, text in (("S", w_s, fact.subject), ("P", w_p, fact.predicate), ("O", w_o, fact.obj)):
            if flag and not text:
                raise DataPrepError(f"{where}: fact {fact.source_id} has w_{name.lower()} = 1 but its {name} is empty "
                                    f"in {fact.where}")
            if not flag and text:
                self.notes[f"facts whose {name} text is ignored because w_{name.lower()} = 0"] += 1
        fact.flags = flags

    def read_samples(self, path: Path, split: int, of_task: dict[int, int], facts_path: Path) -> None:
        rows_before = self.rows_read
        for line, row in csv_rows(path, SAMPLE_COLUMNS):
            row_index = self.rows_read
            self.rows_read += 1
            if self.bar is not None and self.rows_read % 256 == 0:
                self.bar.update(256)
            where = f"{path}, line {line}"
            source_id = exact_integer(row["id"], where, "id")
            if source_id not in of_task:
                raise DataPrepError(f"{where}: fact id {source_id} is not listed in {facts_path}")
            fact_index = of_task[source_id]
            fact = self.facts[fact_index]
            flags = (_flag(row["w_s"], where, "w_s"), _flag(row["w_p"], where, "w_p"), _flag(row["w_o"], where, "w_o"))
            self._check_flags(fact, flags, where)
            if self.native and fact.vector is None:
                link = _clean_link(row["NLP_links"])
                fact.vector = read_native_vector(self.dataset.vector_file(link, where), where)
            link = _clean_link(row["image_links"])
            image_path, other_suffix = self.dataset.image_file(link, where)
            if image_path is None:
                self.dropped["rows whose image file is missing"] += 1
                continue
            if other_suffix:
                self.notes["images found under the other suffix (.jpg/.png)"] += 1
            try:
                size, transparency = _image_size(image_path, self.max_pixels)
                if transparency is not None and str(image_path) not in self.transparent:
                    self.transparent.add(str(image_path))
                    self.notes[transparency] += 1
            except DECODE_ERRORS:
                self.dropped["rows whose image does not decode"] += 1
                continue
            self.sample_row.append(row_index)
            self.sample_fact.append(fact_index)
            self.sample_split.append(split)
            self.sample_hash.append(_link_hash(link))
            self.sample_size.extend(size)

        if self.rows_read == rows_before:
            raise DataPrepError(_no_rows(path))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.rows_read % 256)
            self.bar.close()


def _first_occurrences(hashes: np.ndarray, facts: np.ndarray) -> np.ndarray:
    """Boolean mask of the samples that do not repeat an earlier sample's (image, fact)."""
    keep = np.ones(len(hashes), dtype=bool)
    if len(hashes) < 2:
        return keep
    order = np.lexsort((np.arange(len(hashes)), facts, hashes))
    same = (hashes[order][1:] == hashes[order][:-1]) & (facts[order][1:] == facts[order][:-1])
    keep[order[1:][same]] = False
    return keep


# ---------------------------------------------------------------------------- pass 2
def _pixel_blocks(tasks: list[TaskFiles], root: Path, kept_rows: np.ndarray, kept_hashes: np.ndarray,
                  image_size: int, max_pixels: int, progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """Re-stream the CSVs and yield ``(first sample, uint8 (k, S, S, 3))`` blocks of the kept rows."""
    dataset = DatasetRoot(root)
    bar = _progress_bar(progress, total=len(kept_rows), desc="resizing images", unit="img")
    block = np.empty((PIXEL_BLOCK, image_size, image_size, 3), dtype=np.uint8)
    filled = first = sample = row_index = 0
    for files in tasks:
        for path in (files.train, files.test):
            for line, row in csv_rows(path, SAMPLE_COLUMNS):
                if sample < len(kept_rows) and row_index == kept_rows[sample]:
                    link = _clean_link(row["image_links"])
                    image_path, _ = dataset.image_file(link, f"{path}, line {line}")
                    if image_path is None or _link_hash(link) != kept_hashes[sample]:
                        raise DataPrepError(f"{path}, line {line}: the row or its image changed while preparing; "
                                            "run prepare lll again")
                    try:
                        block[filled] = _resized(image_path, image_size, max_pixels)
                    except DECODE_ERRORS as exc:
                        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        raise DataPrepError(f"{path}, line {line}: image {image_path} passed the image check but "
                                            f"does not decode ({reason}); replace or remove it") from None
                    filled += 1
                    sample += 1
                    if bar is not None:
                        bar.update(1)
                    if filled == PIXEL_BLOCK:
                        yield first, block.copy()
                        first, filled = sample, 0
                row_index += 1
    if filled:
        yield first, block[:filled].copy()
    if bar is not None:
        bar.close()
    if sample != len(kept_rows):
        raise DataPrepError(f"the split files under {root / 'splits'} changed while preparing; run prepare lll again")


# ---------------------------------------------------------------------------- entry point
def prepare_lll(
    root: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    text_encoder: EmbedFn | str = NATIVE,
    encoder_name: str | None = None,
    image_size: int = 224,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    no_images: bool = False,
    progress: bool = True,
    command_line: str | Sequence[str] | None = None,
) -> PrepareReport:
    """Build a fact file from the benchmark's split ``split`` (``<T>tasks_<random|semantic>``) under
    ``root`` (``data/mid_scale``, ``data/large_scale``); see the module docstring for what is kept.

    ``text_encoder``: ``"native"`` keeps the benchmark's 900-d vectors, a callable
    ``(facts) -> float32 [F, 3d]`` re-embeds S, P, O (``encoder_name`` is stored beside).
    ``no_images`` stores no pixels (images are then only checked to exist, not decoded).
    ``max_image_pixels``: an image declaring more pixels (width x height) stops the run, naming it.
    Raises :class:`DataPrepError` (one line naming the file and line) for malformed input;
    nothing is left at ``out`` then.
    """
    root = Path(root)
    native = isinstance(text_encoder, str)
    if native and text_encoder != NATIVE:
        raise DataPrepError(f"text_encoder must be {NATIVE!r} or an embedding function, got {text_encoder!r}")
    check_stored_image_size(image_size)
    check_output_file(out, "out")
    tasks = find_task_files(root, split)
    max_image_pixels = check_max_pixels(max_image_pixels)
    collector = _Collector(root, native, None if no_images else max_image_pixels, progress)
    try:
        for task, files in enumerate(tasks):
            of_task = collector.read_facts(files, task)
            collector.read_samples(files.train, 0, of_task, files.facts)
            collector.read_samples(files.test, 1, of_task, files.facts)
    finally:
        collector.close()

    rows = np.frombuffer(collector.sample_row, dtype=np.int64)
    fact_index = np.frombuffer(collector.sample_fact, dtype=np.int32).astype(np.int64)
    sample_split = np.frombuffer(collector.sample_split, dtype=np.int8)
    hashes = np.frombuffer(collector.sample_hash, dtype=np.int64)
    sizes = np.frombuffer(collector.sample_size, dtype=np.float32).reshape(-1, 2)
    unique = _first_occurrences(hashes, fact_index)
    if (~unique).any():
        collector.dropped["rows repeating an earlier row's image and fact"] += int((~unique).sum())
    rows, fact_index, sample_split, hashes, sizes = (
        rows[unique], fact_index[unique], sample_split[unique], hashes[unique], sizes[unique])
    sample_box = np.concatenate([np.zeros_like(sizes), sizes], axis=1)  # the whole image: 0, 0, width, height

    # facts: those with a kept sample, in increasing benchmark id
    samples_per_fact = np.bincount(fact_index, minlength=len(collector.facts))
    for index, fact in enumerate(collector.facts):
        if samples_per_fact[index] == 0:
            reason = "without any sample row" if fact.flags is None else "whose every sample row was dropped"
            collector.dropped[f"facts listed in B<k>_facts.csv {reason}"] += 1
    kept_facts = sorted((i for i in range(len(collector.facts)) if samples_per_fact[i]),
                        key=lambda i: collector.facts[i].source_id)
    new_id = np.full(len(collector.facts), -1, dtype=np.int64)
    new_id[kept_facts] = np.arange(len(kept_facts))
    sample_fact = new_id[fact_index]
    records = [collector.facts[i] for i in kept_facts]
    facts: list[Fact] = []
    for record in records:
        _, w_p, w_o = record.flags  # type: ignore[misc]
        facts.append((record.subject, record.predicate if w_p else None, record.obj if w_o else None))
    task_of_fact = np.array([record.task for record in records], dtype=np.int64)
    empty_tasks = [files.k for task, files in enumerate(tasks) if not (task_of_fact == task).any()]
    if empty_tasks:
        raise DataPrepError(f"task(s) B{', B'.join(map(str, empty_tasks))} of {root / 'splits' / split} keep no "
                            "sample (every image missing or undecodable?); check the images folder "
                            f"{root / 'images'}")
    seen_text: Counter[Fact] = Counter(facts)
    repeated = sum(count - 1 for count in seen_text.values() if count > 1)
    if repeated:
        collector.notes["facts whose S, P, O text repeats another fact id's"] += repeated

    # image ids: position among the distinct kept image links, in reading order
    distinct, first_seen, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(len(distinct))
    sample_image = rank[inverse.reshape(-1)] if len(hashes) else np.zeros(0, dtype=np.int64)

    if native:
        fact_embeddings = np.stack([record.vector for record in records]).astype(np.float32)  # type: ignore[misc]
        encoder_name = NATIVE_ENCODER_NAME
        masks = np.array([record.flags for record in records], dtype=np.float32)
        stray = (np.abs(fact_embeddings.reshape(-1, 3, NATIVE_SLOT_DIM)).sum(axis=2) > 0) & (masks == 0)
        if stray.any():
            collector.notes["native vectors non-zero in a slot whose w_ flag is 0 (kept as given)"] += int(stray.sum())
    else:
        embedded = text_encoder(facts)  # type: ignore[operator]
        fact_embeddings = np.asarray(embedded[0] if isinstance(embedded, tuple) else embedded, dtype=np.float32)
        if fact_embeddings.ndim != 2 or fact_embeddings.shape[0] != len(facts) or fact_embeddings.shape[1] % 3:
            raise DataPrepError(f"the text encoder returned shape {fact_embeddings.shape} for {len(facts)} facts; "
                                "expected [F, 3*d]")

    orders = np.array([fact_order(fact) for fact in facts], dtype=np.int8)
    statistics = task_statistics(task_of_fact, orders, sample_fact, sample_split, facts)
    kept = {
        "facts": len(facts),
        "facts_by_order": {str(order): int((orders == order).sum()) for order in (1, 2, 3)},
        "samples": int(len(sample_fact)),
        "train_samples": int((sample_split == 0).sum()),
        "test_samples": int((sample_split == 1).sum()),
        "images": int(len(distinct)),
        "tasks": len(tasks),
    }
    out = Path(out)
    report = PrepareReport(out_path=out, source=SOURCE, kept=kept, dropped=dict(sorted(collector.dropped.items())),
                           notes=dict(sorted(collector.notes.items())), task_statistics=statistics)
    if isinstance(command_line, (list, tuple)):
        command_line = " ".join(command_line)
    csv_files = {f"{path.parent.name}/{path.name}": path for files in tasks for path in (files.train, files.test, files.facts)}
    provenance = {
        "source": SOURCE,
        "source_files": {name: {"path": str(path.resolve()), "size_bytes": path.stat().st_size}
                         for name, path in csv_files.items()},
        "command_line": command_line,
        "options": {"root": str(root.resolve()), "split": split, "num_tasks": len(tasks),
                    "image_size": None if no_images else image_size, "images": not no_images,
                    "encoder_name": encoder_name, "language": NATIVE if native else "re-embedded S, P, O",
                    "train_test": "as given by B<k>_train.csv / B<k>_test.csv",
                    "tasks": "task k-1 = the facts of B<k>_facts.csv"},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
        "samples_collected": collector.rows_read,
        "kept": kept,
        "dropped": report.dropped,
        "notes": report.notes,
        "task_statistics": statistics,
        "source_fact_ids": [record.source_id for record in records],
        "benchmark_tasks": [f"B{files.k}" for files in tasks],
        "image_ids": "position of the row's image_links among the distinct kept ones, reading B1 train, B1 test, "
                     "B2 train, ...",
    }
    pixels = None if no_images else _pixel_blocks(tasks, root, rows, hashes, image_size, max_image_pixels, progress)
    write_fact_file(
        out, facts=facts, sample_fact=sample_fact, sample_image_id=sample_image,
        sample_box=sample_box, sample_split=sample_split,
        task_of_fact=task_of_fact, sample_pixels=pixels, provenance=provenance, fact_embeddings=fact_embeddings,
        encoder_name=encoder_name, image_size=None if no_images else image_size,
    )
    return report
