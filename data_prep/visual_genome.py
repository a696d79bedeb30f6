"""Visual Genome dumps -> fact HDF5 (:func:`prepare_visual_genome`): reading the JSON dumps into samples.

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
(:func:`data_prep.splits.split_by_image`); a fact with at least two samples that all fell
on one side gets one sample moved to the other side, so that facts appear in both where
possible. Facts with fewer than ``min_fact_count`` training samples are dropped. These
steps, the image checks, the crops and the write are shared with the other sources
(:func:`data_prep.fact_pipeline.finish_prepare`); the options are one
:class:`~data_prep.prepare_options.PrepareOptions`.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from .atomic import check_output_file
from .errors import DataPrepError, MissingDatasetError
from .fact_collector import FactCollector
from .fact_pipeline import CollectedSource, PrepareReport, finish_prepare
from .json_stream import DEFAULT_MAX_JSON_DEPTH, stream_json_array
from .prepare_options import PrepareOptions
from .region_images import find_image_files
from .text_clean import AliasMap

IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "images", ".")


# ---------------------------------------------------------------------------- reading the records
def image_id_of(record: Any) -> int | None:
    """The image id of a record: its integer ``image_id`` or ``id`` (or those of its nested ``image``); None if absent."""
    if not isinstance(record, dict):
        return None
    for key in ("image_id", "id"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
            return int(value)
    nested = record.get("image")
    if isinstance(nested, dict):
        return image_id_of(nested)
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

    def name_of_end(self, end: dict[str, Any]) -> int:
        """:meth:`name_of` of a relationship's subject or object, looking up the memo first (the hot path)."""
        raw = end.get("name")
        if raw is None:  # the `names` (list) variant
            raw = end.get("names")
            raw = raw[0] if raw.__class__ is list and raw else None
        phrase_id = self.cache.get(raw) if raw.__class__ is str else None
        return phrase_id or self.name_of(end)

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


def read_image_data(path: Path, *, progress: bool = False,
                    max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[int, tuple[int, int]]:
    """image id -> (width, height) from image_data.json (``image_id`` or ``id``); bad records skipped.

    Returns the table; (0, 0) marks an image whose width/height is missing.
    """
    table: dict[int, tuple[int, int]] = {}
    for record in stream_json_array(path, progress=progress, description="image_data.json", max_depth=max_depth):
        image_id = image_id_of(record)
        if image_id is None:
            continue
        width, height = record.get("width"), record.get("height")
        if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
            table[image_id] = (int(width), int(height))
        else:
            table[image_id] = (0, 0)
    return table


def _image_records(path: Path, key: str, drop: Counter[str],
                   options: PrepareOptions) -> Iterator[tuple[int, list[Any]]]:
    """``(image id, record[key])`` of each per-image record of the dump ``path``; a record without
    an image id or without a ``key`` list is counted in ``drop`` and skipped. A dump where no
    record has both raises :class:`DataPrepError` (another file under this name, or a broken one)."""
    records = usable = 0
    for record in stream_json_array(path, progress=options.progress, description=path.name,
                                    max_depth=options.max_json_depth):
        records += 1
        image_id = image_id_of(record)
        entries = record.get(key) if isinstance(record, dict) else None
        if image_id is None or not isinstance(entries, list):
            drop[f"{path.name}: image records without image id or {key} list"] += 1
            continue
        usable += 1
        yield image_id, entries
    if not usable:
        what = f"none of its {records:,} records has" if records else "it holds no record with"
        raise DataPrepError(f"{path}: {what} an image id and a '{key}' list, so it gives no fact; give the "
                            f"Visual Genome {path.name} (or leave its fact order out of --orders)")


def _collect_objects(path: Path, collector: FactCollector, names: _PhraseIds, options: PrepareOptions) -> None:
    """Stream objects.json into ``collector``: one <S> sample per named object, region = its box."""
    drop = collector.dropped
    for image_id, objects in _image_records(path, "objects", drop, options):
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
                        options: PrepareOptions) -> None:
    """Stream attributes.json into ``collector``: one <S,A> sample per distinct (object, attribute), region = the object box."""
    drop = collector.dropped
    for image_id, objects in _image_records(path, "attributes", drop, options):
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
                           options: PrepareOptions) -> int:
    """Stream relationships.json into ``collector``; return the number of relationships read.

    This is the hot loop of a 2.3M-relationship dump, so it inlines the memo lookups of
    :class:`_PhraseIds` (of the predicate, and of a ``name`` string), the box rule of :func:`_box`
    (same results) and the collector's appends.
    """
    drop = collector.dropped
    total = 0
    append_subject, append_predicate = collector.sample_subject.append, collector.sample_predicate.append
    append_object, append_image = collector.sample_object.append, collector.sample_image.append
    extend_box, append_split = collector.sample_box.extend, collector.sample_split.append
    name_of_end, name_cache, predicate_cache = names.name_of_end, names.cache, predicates.cache
    for image_id, relationships in _image_records(path, "relationships", drop, options):
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
            raw = subject.get("name")  # the memo first, inline (the hot path); name_of_end for the rest
            subject_name = (name_cache.get(raw) if raw.__class__ is str else None) or name_of_end(subject)
            if not subject_name:
                drop["relationships: subject without name"] += 1
                continue
            raw = obj.get("name")
            object_name = (name_cache.get(raw) if raw.__class__ is str else None) or name_of_end(obj)
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


# ---------------------------------------------------------------------------- Visual Genome
def prepare_visual_genome(vg_dir: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions | None = None,
                          **option_fields: Any) -> PrepareReport:
    """Build a fact file from the raw Visual Genome dumps in ``vg_dir`` (see the module docstring).

    ``options`` (default :class:`PrepareOptions`'s defaults) says how; its fields may also
    be given, or overridden, as keywords (``num_tasks=2, progress=False``). Needs
    ``image_data.json``, plus ``objects.json`` (for order 1), ``relationships.json``
    (order 3); ``attributes.json`` (order 2), ``object_alias.txt`` and
    ``relationship_alias.txt`` are optional. Raises :class:`DataPrepError` for bad
    options or files.
    """
    options = PrepareOptions.build(options, option_fields)
    check_output_file(out, "out")
    vg_dir = Path(vg_dir)
    orders = options.orders
    if not vg_dir.is_dir():
        raise MissingDatasetError(f"Visual Genome folder {vg_dir} not found; give the folder holding image_data.json")
    files = {name: vg_dir / name for name in ("image_data.json", "objects.json", "relationships.json",
                                               "attributes.json", "object_alias.txt", "relationship_alias.txt")}
    needed = ["image_data.json"] + (["objects.json"] if 1 in orders else []) + (
        ["relationships.json"] if 3 in orders else [])
    for name in needed:
        if not files[name].is_file():
            raise MissingDatasetError(f"{files[name]} not found; download it from the Visual Genome site into {vg_dir}")
    use_attributes = 2 in orders and files["attributes.json"].is_file()
    object_aliases = AliasMap.from_file(files["object_alias.txt"]) if files["object_alias.txt"].is_file() else AliasMap()
    predicate_aliases = (AliasMap.from_file(files["relationship_alias.txt"])
                         if files["relationship_alias.txt"].is_file() else AliasMap())
    image_paths = None if options.no_images else find_image_files(vg_dir / folder for folder in IMAGE_FOLDERS)
    listed_sizes = read_image_data(files["image_data.json"], progress=options.progress,
                                   max_depth=options.max_json_depth)
    collector = FactCollector()
    names = _PhraseIds(object_aliases, collector)
    predicates = _PhraseIds(predicate_aliases, collector)
    attributes = _PhraseIds(AliasMap(), collector)
    relationships_read = 0
    if 1 in orders:
        _collect_objects(files["objects.json"], collector, names, options)
    if use_attributes:
        _collect_attributes(files["attributes.json"], collector, names, attributes, options)
    if 3 in orders:
        relationships_read = _collect_relationships(files["relationships.json"], collector, names, predicates,
                                                    options)
    used = {name: path for name, path in files.items()
            if path.is_file() and (name != "attributes.json" or use_attributes)
            and (name != "objects.json" or 1 in orders)
            and (name != "relationships.json" or 3 in orders)}
    extra = {"relationships_read": relationships_read, "images_listed": len(listed_sizes),
             "aliases": {"object": len(object_aliases), "predicate": len(predicate_aliases)},
             "attributes_file": "used" if use_attributes else ("absent" if 2 in orders else "not requested")}
    if image_paths is not None:
        extra["image_files_found"] = len(image_paths)
    source = CollectedSource(name="visual_genome", files=used, listed_sizes=listed_sizes, image_paths=image_paths,
                             split_given=False, extra_provenance=extra)
    return finish_prepare(collector, source, out, options)
