"""Visual Genome dumps -> fact HDF5 (:func:`prepare_visual_genome`), and the pipeline shared with VG-SGG.h5.

Facts (docs/method.md §11):

* ``<S>``     one per object instance of ``objects.json``; region = the object box;
* ``<S,A>``   one per (object, attribute) of ``attributes.json``; the attribute fills the
  P slot; region = the object box;
* ``<S,P,O>`` one per relationship of ``relationships.json``; region = the union of the
  subject and object boxes.

The JSON files are streamed with ijson (its C backend ``yajl2_c`` when installed), one
image record at a time: memory holds the image table, the fact table and the compact
sample arrays (37 bytes a sample), never a whole file.

Quirks of the real dumps handled, each skipped record counted by reason in the
report and the provenance (nothing stops on one bad record):

* subject/object carry ``name`` (a string) in some records and ``names`` (a list) in others;
* image records carry ``id`` instead of ``image_id`` (image_data.json of v1.0/v1.2);
* ``merged_object_ids``: an object merged into another one of the same image is skipped
  (``objects: merged duplicate``);
* ``synsets`` may be missing (never read);
* names/attributes/predicates are cleaned (:mod:`data_prep.text_clean`), then mapped through
  ``object_alias.txt`` (subjects, objects) and ``relationship_alias.txt`` (predicates);
* a relationship whose subject or object has no name after cleaning is skipped;
* images listed in image_data.json but absent on disk, and images that do not decode
  (the real dump's 1592, 1722, 4616, 4617), drop their samples;
* image_data width/height that disagree with the decoded image: the decoded image is
  trusted (boxes are in the real image's pixels); boxes are clipped to the image, the
  clipped ones counted, the empty ones dropped.

Train/test: raw VG has no split, so images are split 80/20 with the seed
(:func:`split_by_image`); a fact with at least two samples that all fell on one side
gets one sample moved to the other side, so that facts appear in both where possible.
Facts with fewer than ``min_fact_count`` training samples are dropped.
"""
from __future__ import annotations

import array
import datetime
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import DataPrepError, MissingDatasetError
from .facts_h5 import FORMAT_VERSION, Fact, fact_order, write_fact_file
from .splits import filter_rare_facts, format_task_table, random_split, semantic_split, task_statistics
from .text_clean import AliasMap

EmbedFn = Callable[[list[Fact]], Any]

SPLITS = ("random", "semantic")
TEST_FRACTION = 0.2
DEFAULT_MIN_FACT_COUNT = 3
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "images", ".")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------- report
@dataclass
class PrepareReport:
    """What a prepare run kept and dropped. ``str(report)`` is a printable summary with the task table."""

    out_path: Path
    source: str
    kept: dict[str, Any]
    dropped: dict[str, int]
    notes: dict[str, int]
    task_statistics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also stored in the file's provenance)."""
        return {
            "out_path": str(self.out_path), "source": self.source, "kept": self.kept,
            "dropped": self.dropped, "notes": self.notes, "task_statistics": self.task_statistics,
        }

    def __str__(self) -> str:
        kept = self.kept
        lines = [
            f"wrote {self.out_path} from {self.source}",
            f"kept: {kept['facts']} facts (<S> {kept['facts_by_order']['1']}, <S,P> {kept['facts_by_order']['2']}, "
            f"<S,P,O> {kept['facts_by_order']['3']}), {kept['samples']} samples "
            f"({kept['train_samples']} train, {kept['test_samples']} test) from {kept['images']} images, "
            f"{kept['tasks']} tasks",
        ]
        if self.dropped:
            lines.append("dropped:")
            width = max(len(reason) for reason in self.dropped)
            lines += [f"  {reason:<{width}}  {count:>10}" for reason, count in sorted(self.dropped.items())]
        else:
            lines.append("dropped: nothing")
        if any(self.notes.values()):
            lines.append("notes:")
            width = max(len(name) for name in self.notes)
            lines += [f"  {name:<{width}}  {count:>10}" for name, count in sorted(self.notes.items()) if count]
        lines.append(format_task_table(self.task_statistics))
        return "\n".join(lines)


# ---------------------------------------------------------------------------- collecting samples
class FactCollector:
    """Accumulates samples in compact arrays while streaming.

    A sample is three phrase ids (subject, predicate/attribute, object; -1 = absent slot),
    an image id, a box x, y, w, h and a split code: 37 bytes. Facts are not interned one by one (a
    Visual Genome dump holds about a million distinct facts, most of them seen once);
    :meth:`fact_table` finds the distinct facts with numpy at the end. Phrase id 0 is
    reserved for the empty phrase ("nothing left after cleaning").
    """

    def __init__(self) -> None:
        self.phrases: list[str] = [""]
        self.phrase_ids: dict[str, int] = {"": 0}
        self.sample_subject = array.array("i")
        self.sample_predicate = array.array("i")
        self.sample_object = array.array("i")
        self.sample_image = array.array("q")
        self.sample_box = array.array("f")
        self.sample_split = array.array("b")
        self.dropped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()

    def phrase_id(self, phrase: str) -> int:
        """Id of the (cleaned) phrase, added to the table on first sight; 0 for ``""``."""
        phrase_id = self.phrase_ids.get(phrase)
        if phrase_id is None:
            phrase_id = self.phrase_ids[phrase] = len(self.phrases)
            self.phrases.append(phrase)
        return phrase_id

    def add_ids(self, subject: int, predicate: int, obj: int, image_id: int, x: float, y: float, w: float, h: float,
                split: int = -1) -> None:
        """Record one sample by phrase ids (-1 for an absent slot); ``split`` -1 means "decide later"."""
        self.sample_subject.append(subject)
        self.sample_predicate.append(predicate)
        self.sample_object.append(obj)
        self.sample_image.append(image_id)
        self.sample_box.extend((x, y, w, h))
        self.sample_split.append(split)

    def add(self, fact: Fact, image_id: int, x: float, y: float, w: float, h: float, split: int = -1) -> None:
        """Record one sample of ``fact`` (cleaned strings) in image ``image_id`` with region box x, y, w, h."""
        subject, predicate, obj = fact
        self.add_ids(self.phrase_id(subject), -1 if predicate is None else self.phrase_id(predicate),
                     -1 if obj is None else self.phrase_id(obj), image_id, x, y, w, h, split)

    def __len__(self) -> int:
        return len(self.sample_subject)

    def fact_table(self) -> tuple[np.ndarray, np.ndarray]:
        """``(slots int64 [U, 3], sample_fact int64 [N])``: the distinct (s, p, o) phrase-id triples and each sample's row."""
        subjects = np.frombuffer(self.sample_subject, dtype=np.int32)
        predicates = np.frombuffer(self.sample_predicate, dtype=np.int32)
        objects = np.frombuffer(self.sample_object, dtype=np.int32)
        if len(subjects) == 0:
            return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
        base = len(self.phrases) + 1
        if base ** 3 < 2 ** 62:
            # pack (s, p, o) into one int64 key; -1 (absent) becomes 0
            keys = subjects.astype(np.int64)
            keys += 1
            keys *= base
            keys += predicates
            keys += 1
            keys *= base
            keys += objects
            keys += 1
            unique_keys, sample_fact = np.unique(keys, return_inverse=True)
            del keys
            unique = np.stack([unique_keys // (base * base) - 1, (unique_keys // base) % base - 1,
                               unique_keys % base - 1], axis=1)
        else:  # more than ~1.6M distinct phrases: compare rows instead of packed keys
            slots = np.stack([subjects, predicates, objects], axis=1)
            unique, sample_fact = np.unique(slots, axis=0, return_inverse=True)
            unique = unique.astype(np.int64)
        return unique, sample_fact.reshape(-1).astype(np.int64, copy=False)

    def fact(self, slots: Sequence[int]) -> Fact:
        """The fact tuple of one row of :meth:`fact_table`."""
        subject, predicate, obj = (int(v) for v in slots)
        phrases = self.phrases
        return (phrases[subject], phrases[predicate] if predicate >= 0 else None, phrases[obj] if obj >= 0 else None)


# ---------------------------------------------------------------------------- JSON streaming
def _ijson_module() -> Any:
    import ijson

    try:
        return ijson.get_backend("yajl2_c")
    except Exception:  # C backend not built on this platform: the default one is correct, slower
        return ijson


def stream_json_array(path: Path, *, progress: bool = False, description: str = "") -> Iterator[Any]:
    """Yield the elements of the top-level JSON array in ``path`` one at a time (ijson, floats as float).

    Raises :class:`DataPrepError` for a file that is not a JSON array or is malformed.
    """
    from ijson.common import JSONError

    backend = _ijson_module()
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
        bar = _progress_bar(progress, total=size, unit="B", unit_scale=True, desc=description or path.name)
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


def _progress_bar(enabled: bool, **options: Any) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, **options)


def _image_id(record: Any) -> int | None:
    if not isinstance(record, dict):
        return None
    for key in ("image_id", "id"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
            return int(value)
    nested = record.get("image")
    if isinstance(nested, dict):
        return _image_id(nested)
    return None


def _box(record: dict[str, Any]) -> tuple[float, float, float, float] | None:
    try:
        x, y, w, h = (record["x"], record["y"], record["w"], record["h"])
    except (KeyError, TypeError):
        return None
    for value in (x, y, w, h):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return None
    return float(x), float(y), float(w), float(h)


class _PhraseIds:
    """raw string -> phrase id of its cleaned, alias-mapped form (0: nothing left), memoised on the raw string.

    Visual Genome repeats the same few hundred thousand strings millions of times, so
    the cleaning rule runs once per distinct raw string.
    """

    def __init__(self, aliases: AliasMap, collector: FactCollector) -> None:
        self.aliases = aliases
        self.collector = collector
        self.cache: dict[str, int] = {}

    def __call__(self, raw: object) -> int:
        if raw.__class__ is not str:
            return 0
        phrase_id = self.cache.get(raw)  # type: ignore[arg-type]
        if phrase_id is None:
            phrase_id = self.collector.phrase_id(self.aliases.clean(raw))
            if len(self.cache) < 4_000_000:
                self.cache[raw] = phrase_id  # type: ignore[index]
        return phrase_id

    def name_of(self, obj: dict[str, Any]) -> int:
        """Phrase id of an object record's name: ``name`` (a string) or the first usable entry of ``names`` (a list)."""
        phrase_id = self(obj.get("name"))
        if phrase_id:
            return phrase_id
        names = obj.get("names")
        if isinstance(names, str):
            return self(names)
        if isinstance(names, list):
            for candidate in names:
                phrase_id = self(candidate)
                if phrase_id:
                    return phrase_id
        return 0


def _merged_ids(objects: Iterable[Any]) -> set[int]:
    merged: set[int] = set()
    for obj in objects:
        if isinstance(obj, dict):
            ids = obj.get("merged_object_ids")
            if isinstance(ids, list):
                merged.update(int(i) for i in ids if isinstance(i, (int, float)))
    return merged


def _is_merged_duplicate(obj: dict[str, Any], merged: set[int]) -> bool:
    object_id = obj.get("object_id", obj.get("id"))
    return isinstance(object_id, (int, float)) and int(object_id) in merged


def read_image_data(path: Path, *, progress: bool = False) -> dict[int, tuple[int, int]]:
    """image id -> (width, height) from image_data.json (``image_id`` or ``id``); bad records skipped.

    Returns the table; (0, 0) marks an image whose width/height is missing.
    """
    table: dict[int, tuple[int, int]] = {}
    for record in stream_json_array(path, progress=progress, description="image_data.json"):
        image_id = _image_id(record)
        if image_id is None:
            continue
        width, height = record.get("width"), record.get("height")
        if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
            table[image_id] = (int(width), int(height))
        else:
            table[image_id] = (0, 0)
    return table


def _collect_objects(path: Path, collector: FactCollector, names: _PhraseIds, progress: bool) -> None:
    drop = collector.dropped
    for record in stream_json_array(path, progress=progress, description="objects.json"):
        image_id = _image_id(record)
        objects = record.get("objects") if isinstance(record, dict) else None
        if image_id is None or not isinstance(objects, list):
            drop["objects.json: image records without image id or objects list"] += 1
            continue
        merged = _merged_ids(objects)
        for obj in objects:
            if not isinstance(obj, dict):
                drop["objects: malformed"] += 1
                continue
            if merged and _is_merged_duplicate(obj, merged):
                drop["objects: merged duplicate"] += 1
                continue
            box = _box(obj)
            if box is None:
                drop["objects: missing or malformed box"] += 1
                continue
            name = names.name_of(obj)
            if not name:
                drop["objects: no name"] += 1
                continue
            collector.add_ids(name, -1, -1, image_id, *box)


def _collect_attributes(path: Path, collector: FactCollector, names: _PhraseIds, attributes: _PhraseIds,
                        progress: bool) -> None:
    drop = collector.dropped
    for record in stream_json_array(path, progress=progress, description="attributes.json"):
        image_id = _image_id(record)
        objects = record.get("attributes") if isinstance(record, dict) else None
        if image_id is None or not isinstance(objects, list):
            drop["attributes.json: image records without image id or attributes list"] += 1
            continue
        merged = _merged_ids(objects)
        for obj in objects:
            if not isinstance(obj, dict):
                drop["attributes: malformed object"] += 1
                continue
            raw_attributes = obj.get("attributes")
            if not raw_attributes:
                continue  # an object without attributes holds no <S,A> fact
            if isinstance(raw_attributes, str):
                raw_attributes = [raw_attributes]
            if not isinstance(raw_attributes, list):
                drop["attributes: malformed object"] += 1
                continue
            if merged and _is_merged_duplicate(obj, merged):
                drop["attributes: merged duplicate object"] += len(raw_attributes)
                continue
            box = _box(obj)
            if box is None:
                drop["attributes: missing or malformed box"] += len(raw_attributes)
                continue
            name = names.name_of(obj)
            if not name:
                drop["attributes: object without name"] += len(raw_attributes)
                continue
            seen: set[int] = set()
            for raw in raw_attributes:
                attribute = attributes(raw)
                if not attribute:
                    drop["attributes: empty after cleaning"] += 1
                elif attribute in seen:
                    drop["attributes: duplicate on the same object"] += 1
                else:
                    seen.add(attribute)
                    collector.add_ids(name, attribute, -1, image_id, *box)


def _collect_relationships(path: Path, collector: FactCollector, names: _PhraseIds, predicates: _PhraseIds,
                           progress: bool) -> int:
    """Stream relationships.json into ``collector``; return the number of relationships read.

    This is the hot loop of a 2.3M-relationship dump, so it inlines the memo lookups of
    :class:`_PhraseIds`, the box rule of :func:`_box` (same results) and the collector's appends.
    """
    drop = collector.dropped
    total = 0
    append_subject, append_predicate = collector.sample_subject.append, collector.sample_predicate.append
    append_object, append_image = collector.sample_object.append, collector.sample_image.append
    extend_box, append_split = collector.sample_box.extend, collector.sample_split.append
    name_cache, predicate_cache = names.cache, predicates.cache
    for record in stream_json_array(path, progress=progress, description="relationships.json"):
        image_id = _image_id(record)
        relationships = record.get("relationships") if isinstance(record, dict) else None
        if image_id is None or not isinstance(relationships, list):
            drop["relationships.json: image records without image id or relationships list"] += 1
            continue
        total += len(relationships)
        for relationship in relationships:
            try:
                subject = relationship["subject"]
                obj = relationship["object"]
                raw = relationship["predicate"]
            except (KeyError, TypeError):
                drop["relationships: malformed or missing subject, object or predicate"] += 1
                continue
            if subject.__class__ is not dict or obj.__class__ is not dict:
                drop["relationships: malformed or missing subject, object or predicate"] += 1
                continue
            predicate = predicate_cache.get(raw) if raw.__class__ is str else None
            if predicate is None:
                predicate = predicates(raw)
            if not predicate:
                drop["relationships: no predicate"] += 1
                continue
            raw = subject.get("name")
            if raw is None:  # the `names` (list) variant
                raw = subject.get("names")
                raw = raw[0] if raw.__class__ is list and raw else None
            subject_name = name_cache.get(raw) if raw.__class__ is str else None
            if not subject_name:
                subject_name = names.name_of(subject)
                if not subject_name:
                    drop["relationships: subject without name"] += 1
                    continue
            raw = obj.get("name")
            if raw is None:  # the `names` (list) variant
                raw = obj.get("names")
                raw = raw[0] if raw.__class__ is list and raw else None
            object_name = name_cache.get(raw) if raw.__class__ is str else None
            if not object_name:
                object_name = names.name_of(obj)
                if not object_name:
                    drop["relationships: object without name"] += 1
                    continue
            try:
                sx, sy, ox, oy = subject["x"], subject["y"], obj["x"], obj["y"]
                sx1, sy1 = sx + subject["w"], sy + subject["h"]
                ox1, oy1 = ox + obj["w"], oy + obj["h"]
                x0 = sx if sx < ox else ox
                y0 = sy if sy < oy else oy
                box = (x0, y0, (sx1 if sx1 > ox1 else ox1) - x0, (sy1 if sy1 > oy1 else oy1) - y0)
                extend_box(box)  # a non-numeric coordinate raised TypeError above, before anything is appended
            except (KeyError, TypeError):
                drop["relationships: missing or malformed box"] += 1
                continue
            append_subject(subject_name)
            append_predicate(predicate)
            append_object(object_name)
            append_image(image_id)
            append_split(-1)
    return total


# ---------------------------------------------------------------------------- images
def index_image_files(folders: Iterable[Path]) -> dict[int, Path]:
    """image id -> path for every ``<integer>.jpg|.jpeg|.png`` directly inside ``folders`` (first folder wins)."""
    paths: dict[int, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and stem.isdigit() and entry.is_file():
                    paths.setdefault(int(stem), Path(entry.path))
    return paths


def _open_rgb(path: Path) -> Any:
    """Decode ``path`` fully to an RGB PIL image; raises the PIL/OS error if it does not decode."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, EOFError)


def _real_image_sizes(image_ids: np.ndarray, image_paths: dict[int, Path], collector: FactCollector,
                      listed_sizes: dict[int, tuple[int, int]], progress: bool) -> dict[int, tuple[int, int]]:
    """Decode every image that has samples; return id -> (width, height) of those that decode."""
    errors = _decode_errors()
    sizes: dict[int, tuple[int, int]] = {}
    bar = _progress_bar(progress, total=len(image_ids), desc="checking images", unit="img")
    for image_id in image_ids.tolist():
        if bar is not None:
            bar.update(1)
        path = image_paths.get(image_id)
        if path is None:
            collector.notes["images listed but missing on disk"] += 1
            continue
        try:
            image = _open_rgb(path)
        except errors:
            collector.notes["images that do not decode"] += 1
            continue
        sizes[image_id] = image.size
        listed = listed_sizes.get(image_id)
        if listed is not None and listed != (0, 0) and listed != image.size:
            collector.notes["images whose decoded size differs from image_data"] += 1
    if bar is not None:
        bar.close()
    return sizes


def _crop_blocks(image_ids: np.ndarray, boxes: np.ndarray, image_paths: dict[int, Path], image_size: int,
                 progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_sample, uint8 (k,S,S,3))`` per image; samples must be sorted by image id."""
    from PIL import Image

    boundaries = np.flatnonzero(np.diff(image_ids)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    stops = np.concatenate([boundaries, [len(image_ids)]]).astype(np.int64) if len(image_ids) else np.zeros(0, np.int64)
    bar = _progress_bar(progress, total=len(starts), desc="cropping regions", unit="img")
    for start, stop in zip(starts.tolist(), stops.tolist()):
        image = _open_rgb(image_paths[int(image_ids[start])])
        block = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
        for row, (x, y, w, h) in enumerate(boxes[start:stop].tolist()):
            region = image.crop((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))))
            block[row] = np.asarray(region.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
        if bar is not None:
            bar.update(1)
        yield start, block
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------- splitting samples
def split_by_image(sample_image_id: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Split (int8 [N], 0 train / 1 test) putting ``round(test_fraction * images)`` whole images, chosen with ``seed``, in test."""
    images = np.unique(sample_image_id)
    if not 0.0 <= test_fraction < 1.0:
        raise DataPrepError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    num_test = int(round(test_fraction * len(images)))
    if len(images) >= 2 and test_fraction > 0:
        num_test = min(max(num_test, 1), len(images) - 1)
    test_images = np.random.default_rng(seed).permutation(images)[:num_test]
    return np.isin(sample_image_id, test_images).astype(np.int8)


def _cover_both_splits(sample_fact: np.ndarray, sample_split: np.ndarray, num_facts: int) -> int:
    """Move one sample of every fact with >= 2 samples all on one side to the other side; return how many moved."""
    order = np.argsort(sample_fact, kind="stable")
    counts = np.bincount(sample_fact, minlength=num_facts)
    train_counts = np.bincount(sample_fact[sample_split == 0], minlength=num_facts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    moved = 0
    for fact in np.flatnonzero(counts >= 2).tolist():
        if train_counts[fact] == counts[fact]:
            sample_split[order[starts[fact] + counts[fact] - 1]] = 1  # last sample of the fact -> test
            moved += 1
        elif train_counts[fact] == 0:
            sample_split[order[starts[fact]]] = 0  # first sample of the fact -> train
            moved += 1
    return moved


# ---------------------------------------------------------------------------- shared pipeline
def _check_options(num_tasks: int, split: str, min_fact_count: int, orders: Sequence[int], image_size: int,
                   text_encoder: EmbedFn | None) -> tuple[int, ...]:
    if split not in SPLITS:
        raise DataPrepError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "semantic" and text_encoder is None:
        raise DataPrepError("the semantic split needs fact embeddings from a text encoder; drop --no-text "
                            "or use --split random")
    if num_tasks < 1:
        raise DataPrepError(f"--tasks must be at least 1, got {num_tasks}")
    if min_fact_count < 1:
        raise DataPrepError(f"--min-fact-count must be at least 1, got {min_fact_count}")
    if image_size < 1:
        raise DataPrepError(f"--image-size must be at least 1, got {image_size}")
    chosen = tuple(sorted(set(int(order) for order in orders)))
    if not chosen or any(order not in (1, 2, 3) for order in chosen):
        raise DataPrepError(f"--orders must list some of 1, 2, 3; got {','.join(map(str, orders)) or 'nothing'}")
    return chosen


def _file_entry(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(Path(path).resolve()), "size_bytes": Path(path).stat().st_size if Path(path).exists() else None}


def finish_prepare(
    collector: FactCollector,
    out: str | os.PathLike,
    *,
    source: str,
    source_files: dict[str, Path | None],
    listed_sizes: dict[int, tuple[int, int]],
    image_paths: dict[int, Path] | None,
    split_given: bool,
    num_tasks: int,
    split: str,
    min_fact_count: int,
    orders: Sequence[int],
    image_size: int,
    seed: int,
    text_encoder: EmbedFn | None,
    encoder_name: str | None,
    progress: bool,
    command_line: str | Sequence[str] | None,
    extra_provenance: dict[str, Any] | None = None,
    test_fraction: float = TEST_FRACTION,
) -> PrepareReport:
    """Turn collected samples into a fact file: image checks, box clipping, train/test split,
    rare-fact filter, fact ordering, embeddings, task split, region crops, atomic write.

    ``image_paths`` None means no images (boxes are clipped to ``listed_sizes``).
    ``split_given`` means ``collector.sample_split`` holds the source's 0/1 split.
    """
    dropped = collector.dropped
    notes = collector.notes
    fact_slots, sample_fact = collector.fact_table()
    num_raw_facts = len(fact_slots)
    collector.sample_subject = collector.sample_predicate = collector.sample_object = array.array("i")
    sample_image = np.frombuffer(collector.sample_image, dtype=np.int64)
    sample_box = np.frombuffer(collector.sample_box, dtype=np.float32).reshape(-1, 4)
    sample_split = np.frombuffer(collector.sample_split, dtype=np.int8)
    collected = len(sample_fact)

    # -- image sizes: decoded images (trusted) or image_data
    image_ids = np.unique(sample_image)
    if image_paths is not None:
        sizes = _real_image_sizes(image_ids, image_paths, collector, listed_sizes, progress)
        reason_unknown = "samples in images missing on disk or that do not decode"
    else:
        sizes = {image_id: size for image_id in image_ids.tolist()
                 if (size := listed_sizes.get(image_id, (0, 0))) != (0, 0)}
        reason_unknown = "samples in images absent from image_data or without width/height"
    known = np.fromiter((image_id in sizes for image_id in image_ids.tolist()), dtype=bool, count=len(image_ids))
    width_of = np.array([sizes.get(i, (0, 0))[0] for i in image_ids.tolist()], dtype=np.float32)
    height_of = np.array([sizes.get(i, (0, 0))[1] for i in image_ids.tolist()], dtype=np.float32)
    position = np.searchsorted(image_ids, sample_image)
    keep = known[position] if len(sample_image) else np.zeros(0, dtype=bool)
    if (~keep).sum():
        dropped[reason_unknown] += int((~keep).sum())

    # -- clip boxes to the (decoded) image, column by column (bounded temporaries)
    clipped_box = np.empty_like(sample_box)
    changed = np.zeros(len(sample_box), dtype=bool)
    for start_column, size_column, limit in ((0, 2, width_of[position]), (1, 3, height_of[position])):
        low = np.clip(sample_box[:, start_column], 0, limit)
        high = np.clip(sample_box[:, start_column] + sample_box[:, size_column], 0, limit)
        clipped_box[:, start_column] = low
        clipped_box[:, size_column] = high - low
        changed |= np.abs(low - sample_box[:, start_column]) > 1e-3
        changed |= np.abs(clipped_box[:, size_column] - sample_box[:, size_column]) > 1e-3
        del low, high, limit
    del position
    empty = keep & ((clipped_box[:, 2] < 1) | (clipped_box[:, 3] < 1))
    notes["boxes clipped to the image"] += int((keep & changed & ~empty).sum())
    if empty.sum():
        dropped["samples whose box is empty inside the image"] += int(empty.sum())
    keep &= ~empty
    del changed, empty

    sample_fact, sample_image, sample_box, sample_split = (
        sample_fact[keep], sample_image[keep], clipped_box[keep], sample_split[keep])
    del clipped_box, keep
    collector.sample_image, collector.sample_box = array.array("q"), array.array("f")
    collector.sample_split = array.array("b")

    # -- train/test split
    if not split_given:
        sample_split = split_by_image(sample_image, seed, test_fraction)
        if test_fraction > 0:
            notes["samples moved to cover both splits"] += _cover_both_splits(sample_fact, sample_split, num_raw_facts)

    # -- rare facts
    present = np.bincount(sample_fact, minlength=num_raw_facts) > 0
    frequent = filter_rare_facts(sample_fact, sample_split, num_raw_facts, min_fact_count)
    rare = present & ~frequent
    if rare.sum():
        dropped[f"facts with fewer than {min_fact_count} training samples"] += int(rare.sum())
        dropped[f"samples of facts with fewer than {min_fact_count} training samples"] += int(
            (~frequent[sample_fact]).sum())
    keep = frequent[sample_fact]
    sample_fact, sample_image, sample_box, sample_split = (
        sample_fact[keep], sample_image[keep], sample_box[keep], sample_split[keep])

    # -- fact ids: sorted by (order, subject, predicate, object)
    kept_raw = np.flatnonzero(frequent & present)
    kept_facts = [collector.fact(fact_slots[i]) for i in kept_raw.tolist()]
    sort_key = [(fact_order(fact), fact[0], fact[1] or "", fact[2] or "") for fact in kept_facts]
    ranking = sorted(range(len(kept_raw)), key=sort_key.__getitem__)
    new_id = np.full(num_raw_facts, -1, dtype=np.int64)
    new_id[kept_raw[ranking]] = np.arange(len(ranking))
    facts: list[Fact] = [kept_facts[i] for i in ranking]
    sample_fact = new_id[sample_fact]
    del new_id, fact_slots
    if not facts:
        raise DataPrepError(
            f"no fact is left after filtering ({collected} samples collected); lower --min-fact-count or check "
            "the input files and --orders"
        )

    # -- samples sorted by image (crops read each image once), then by fact
    sample_order = np.lexsort((sample_fact, sample_image))
    sample_fact, sample_image, sample_box, sample_split = (
        sample_fact[sample_order], sample_image[sample_order], sample_box[sample_order], sample_split[sample_order])

    # -- language embeddings, then tasks
    fact_embeddings = None
    if text_encoder is not None:
        embedded = text_encoder(facts)
        if isinstance(embedded, tuple):
            embedded = embedded[0]
        fact_embeddings = np.asarray(embedded, dtype=np.float32)
        if fact_embeddings.ndim != 2 or fact_embeddings.shape[0] != len(facts):
            raise DataPrepError(
                f"the text encoder returned shape {fact_embeddings.shape} for {len(facts)} facts; expected [F, 3*d]"
            )
    if split == "semantic":
        task_of_fact = semantic_split(fact_embeddings, num_tasks, seed)
    else:
        task_of_fact = random_split(len(facts), num_tasks, seed)
    orders_array = np.array([fact_order(fact) for fact in facts], dtype=np.int8)
    statistics = task_statistics(task_of_fact, orders_array, sample_fact, sample_split, facts)

    kept = {
        "facts": len(facts),
        "facts_by_order": {str(order): int((orders_array == order).sum()) for order in (1, 2, 3)},
        "samples": int(len(sample_fact)),
        "train_samples": int((sample_split == 0).sum()),
        "test_samples": int((sample_split == 1).sum()),
        "images": int(len(np.unique(sample_image))),
        "tasks": int(num_tasks),
    }
    out = Path(out)
    report = PrepareReport(out_path=out, source=source, kept=kept, dropped=dict(sorted(dropped.items())),
                           notes=dict(sorted(notes.items())), task_statistics=statistics)
    if isinstance(command_line, (list, tuple)):
        command_line = " ".join(command_line)
    provenance = {
        "source": source,
        "source_files": {name: _file_entry(path) for name, path in source_files.items()},
        "command_line": command_line,
        "options": {"num_tasks": num_tasks, "split": split, "min_fact_count": min_fact_count,
                    "orders": list(orders), "image_size": None if image_paths is None else image_size,
                    "seed": seed, "images": image_paths is not None, "encoder_name": encoder_name,
                    "train_test": "as given by the source" if split_given else
                    f"by image, {test_fraction:.0%} of images in test (seeded)"},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
        "samples_collected": collected,
        "kept": kept,
        "dropped": report.dropped,
        "notes": report.notes,
        "task_statistics": statistics,
        **(extra_provenance or {}),
    }
    pixels = None
    if image_paths is not None:
        pixels = _crop_blocks(sample_image, sample_box, image_paths, image_size, progress)
    write_fact_file(
        out, facts=facts, sample_fact=sample_fact, sample_image_id=sample_image, sample_box=sample_box,
        sample_split=sample_split, task_of_fact=task_of_fact, sample_pixels=pixels, provenance=provenance,
        fact_embeddings=fact_embeddings, encoder_name=encoder_name,
        image_size=image_size if image_paths is not None else None,
    )
    return report


# ---------------------------------------------------------------------------- Visual Genome
def prepare_visual_genome(
    vg_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_tasks: int = 4,
    split: str = "random",
    min_fact_count: int = DEFAULT_MIN_FACT_COUNT,
    orders: Sequence[int] = (1, 2, 3),
    image_size: int = 64,
    seed: int = 0,
    text_encoder: EmbedFn | None = None,
    encoder_name: str | None = None,
    no_images: bool = False,
    progress: bool = True,
    command_line: str | Sequence[str] | None = None,
    test_fraction: float = TEST_FRACTION,
) -> PrepareReport:
    """Build a fact file from the raw Visual Genome dumps in ``vg_dir`` (see the module docstring).

    Needs ``image_data.json``, plus ``objects.json`` (for order 1), ``relationships.json``
    (order 3); ``attributes.json`` (order 2), ``object_alias.txt`` and
    ``relationship_alias.txt`` are optional. ``text_encoder(facts) -> float32 [F, 3*d]``
    supplies the language embeddings (required for ``split="semantic"``); ``encoder_name``
    is stored beside them. ``test_fraction`` of the images (seeded) go to the test split.
    Raises :class:`DataPrepError` for bad options or files.
    """
    vg_dir = Path(vg_dir)
    chosen_orders = _check_options(num_tasks, split, min_fact_count, orders, image_size, text_encoder)
    if not vg_dir.is_dir():
        raise MissingDatasetError(f"Visual Genome folder {vg_dir} not found; give the folder holding image_data.json")
    files = {name: vg_dir / name for name in ("image_data.json", "objects.json", "relationships.json",
                                               "attributes.json", "object_alias.txt", "relationship_alias.txt")}
    needed = ["image_data.json"] + (["objects.json"] if 1 in chosen_orders else []) + (
        ["relationships.json"] if 3 in chosen_orders else [])
    for name in needed:
        if not files[name].is_file():
            raise MissingDatasetError(f"{files[name]} not found; download it from the Visual Genome site into {vg_dir}")
    use_attributes = 2 in chosen_orders and files["attributes.json"].is_file()
    object_aliases = AliasMap.from_file(files["object_alias.txt"]) if files["object_alias.txt"].is_file() else AliasMap()
    predicate_aliases = (AliasMap.from_file(files["relationship_alias.txt"])
                         if files["relationship_alias.txt"].is_file() else AliasMap())
    listed_sizes = read_image_data(files["image_data.json"], progress=progress)
    collector = FactCollector()
    names = _PhraseIds(object_aliases, collector)
    predicates = _PhraseIds(predicate_aliases, collector)
    attributes = _PhraseIds(AliasMap(), collector)
    relationships_read = 0
    if 1 in chosen_orders:
        _collect_objects(files["objects.json"], collector, names, progress)
    if use_attributes:
        _collect_attributes(files["attributes.json"], collector, names, attributes, progress)
    if 3 in chosen_orders:
        relationships_read = _collect_relationships(files["relationships.json"], collector, names, predicates,
                                                    progress)
    image_paths = None if no_images else index_image_files(vg_dir / folder for folder in IMAGE_FOLDERS)
    used = {name: path for name, path in files.items()
            if path.is_file() and (name != "attributes.json" or use_attributes)
            and (name != "objects.json" or 1 in chosen_orders)
            and (name != "relationships.json" or 3 in chosen_orders)}
    extra = {"relationships_read": relationships_read, "images_listed": len(listed_sizes),
             "aliases": {"object": len(object_aliases), "predicate": len(predicate_aliases)},
             "attributes_file": "used" if use_attributes else ("absent" if 2 in chosen_orders else "not requested")}
    if image_paths is not None:
        extra["image_files_found"] = len(image_paths)
    return finish_prepare(
        collector, out, source="visual_genome", source_files=used, listed_sizes=listed_sizes,
        image_paths=image_paths, split_given=False, num_tasks=num_tasks, split=split,
        min_fact_count=min_fact_count, orders=chosen_orders, image_size=image_size, seed=seed,
        text_encoder=text_encoder, encoder_name=encoder_name, progress=progress, command_line=command_line,
        extra_provenance=extra, test_fraction=test_fraction,
    )
