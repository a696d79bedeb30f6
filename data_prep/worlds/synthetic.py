"""The embedded Visual-Genome-style synthetic world (``mas-triplets synth``).

:func:`generate_world` renders small scenes of coloured, textured shapes placed in
visible spatial relations and writes them in the *real* Visual Genome file format,
so that ``prepare vg`` reads it exactly as it reads the real dumps::

    OUT/image_data.json        [{"image_id"|"id", "width", "height", "url", "coco_id", "flickr_id"}]
    OUT/objects.json           [{"image_id", "image_url", "objects": [{"object_id", "x", "y", "w", "h",
                                  "names": [..], "synsets": [..], "merged_object_ids"?}]}]
    OUT/relationships.json     [{"image_id", "relationships": [{"relationship_id", "predicate", "synsets",
                                  "subject": {object fields, "name": str | "names": [str]},
                                  "object": {...}}]}]
    OUT/attributes.json        [{"image_id", "attributes": [{"object_id", "x", "y", "w", "h", "names",
                                  "synsets", "attributes"?: [..]}]}]
    OUT/object_alias.txt       one alias group per line, canonical term first
    OUT/relationship_alias.txt
    OUT/VG_100K/{image_id}.jpg
    OUT/synth_manifest.json    seed, counts, planted quirks and the canonical fact counts

Boxes are in pixels of the image, ``(x, y)`` the top-left corner, ``w``/``h`` the size.

The world (categories, attributes, predicates and the layout of each predicate) is drawn by
:mod:`data_prep.worlds.scenes`, where it is described. Other worlds (:mod:`data_prep.worlds.real`)
reuse this writer: :func:`write_world_dump` writes any :class:`WorldSpec`.

Real-dump quirks are planted deterministically and sparingly (see ``SynthReport.quirks``):
``id`` instead of ``image_id``; subject/object ``name`` (str) vs ``names`` (list);
names with a capital and a trailing space, with an accent, with punctuation; alias
names (``disc`` for ``circle``, ``beside`` for ``next to``); upper-case predicates;
missing ``synsets``; ``merged_object_ids`` on some objects; attribute records
without ``attributes``; relationships whose subject has no name; an image listed
but absent on disk; an image whose JPEG does not decode (and the real dump's
corrupt ids 1592, 1722, 4616, 4617 when the world is that large); an image whose
``width``/``height`` in image_data.json are wrong. Every planted record maps, after
the standard cleaning (strip, lowercase, fold accents, drop punctuation, aliases),
to the canonical fact counted in ``SynthReport.fact_counts``.

Output is deterministic for a given seed (identical bytes) and written atomically:
everything goes into a hidden temporary sibling folder that is renamed to ``out_dir``
at the end.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

from PIL import Image
from tqdm import tqdm

from ..errors import DataPrepError
from ..facts.fact_file import Fact, fact_order
from .scenes import SceneSampler, render_scene
from .arguments import check_world_arguments, prepare_destination

__all__ = ["SynthReport", "WorldNaming", "WorldSpec", "generate_world", "iter_fact_counts_table",
           "load_manifest_fact_counts", "write_world_dump"]


CATEGORY_SYNSETS = {
    "circle": "circle.n.01", "square": "square.n.01", "triangle": "triangle.n.01",
    "star": "star.n.03", "cross": "cross.n.01", "diamond": "diamond.n.02",
    "ring": "ring.n.08", "hexagon": "hexagon.n.01",
}
PREDICATE_SYNSETS = {
    "on": "along.r.01", "left of": "left.r.01", "next to": "next.r.01", "above": "above.r.01",
    "inside": "inside.r.02", "right of": "right.r.04", "below": "below.r.01",
    "bigger than": "big.a.01",
}
#: accented spellings that fold (NFKD, combining marks dropped) to the canonical name
ACCENTED_NAMES = {
    "circle": "círcle", "square": "squäre", "triangle": "triángle", "star": "stär",
    "cross": "cröss", "diamond": "diamönd", "ring": "ríng", "hexagon": "hexagön",
}
OBJECT_ALIASES = (("circle", "disc"),)
RELATIONSHIP_ALIASES = (("next to", "beside"),)
#: ids of the real Visual Genome dump whose JPEG does not decode; planted when in range
REAL_CORRUPT_IMAGE_IDS = (1592, 1722, 4616, 4617)

JPEG_QUALITY = 90
MIN_QUIRK_IMAGES = 10
MANIFEST_NAME = "synth_manifest.json"
INSTANCES_NAME = "instances.json"


@dataclass(frozen=True)
class WorldNaming:
    """How a world's canonical names are written in the dump: WordNet synsets of each category and
    predicate, the accented spelling of each category (a planted quirk), and the alias pairs
    ``(canonical, alias)`` written to object_alias.txt / relationship_alias.txt and planted in the
    records. Every canonical name must be a fixed point of :func:`data_prep.text_clean.clean_phrase`.
    """

    category_synsets: Mapping[str, str]
    predicate_synsets: Mapping[str, str]
    accented_names: Mapping[str, str]
    object_aliases: Sequence[tuple[str, str]]
    relationship_aliases: Sequence[tuple[str, str]]


#: one image of a world: ``(canvas, objects, relations)``; each object has ``category``, ``x``, ``y``,
#: ``size`` (a square box, pixels) and ``attributes`` (list of str); each relation is
#: ``(subject_index, object_index, predicate)`` into the object list
Scene = tuple[Image.Image, list[Any], list[tuple[int, int, str]]]


@dataclass(frozen=True)
class WorldSpec:
    """A world the dump writer (:func:`write_world_dump`) can write: its image size in pixels, its
    naming, ``scene(image_id)`` (deterministic per id; called for ids 1..N in order) and, optionally,
    ``instance_record(obj)``: a JSON-able dict of where an object's pixels come from, written with
    its object and image ids to ``instances.json``; ``manifest``: extra entries of synth_manifest.json."""

    width: int
    height: int
    naming: WorldNaming
    scene: Callable[[int], Scene]
    instance_record: Callable[[Any], dict[str, Any]] | None = None
    manifest: Mapping[str, Any] = field(default_factory=dict)


SHAPES_NAMING = WorldNaming(CATEGORY_SYNSETS, PREDICATE_SYNSETS, ACCENTED_NAMES, OBJECT_ALIASES, RELATIONSHIP_ALIASES)


@dataclass
class SynthReport:
    """What :func:`generate_world` wrote.

    ``fact_counts`` maps each canonical fact ``(subject, predicate_or_attribute_or_None,
    object_or_None)`` to its number of samples in the images that exist and decode:
    one <S> sample per entry of objects.json, one <S,A> sample per (object, attribute)
    of attributes.json, one <S,P,O> sample per named relationship. A correct reader
    (cleaning + aliases, skipping the missing and corrupt images and nameless
    relationships) recovers exactly these counts. ``num_relationships`` counts the
    relationship records written, the planted nameless ones included.
    """

    out_dir: Path
    seed: int
    num_images: int
    image_size: tuple[int, int]
    num_objects: int
    num_relationships: int
    num_attribute_records: int
    fact_counts: dict[Fact, int]
    missing_image_ids: list[int]
    corrupt_image_ids: list[int]
    wrong_size_image_ids: list[int]
    quirks: dict[str, int]
    seconds: float
    files: list[str] = field(default_factory=list)

    def facts_with_at_least(self, min_count: int) -> list[Fact]:
        """The facts with ``>= min_count`` samples, most frequent first (ties by name)."""
        kept = [(count, fact) for fact, count in self.fact_counts.items() if count >= min_count]
        kept.sort(key=lambda item: (-item[0], _fact_sort_key(item[1])))
        return [fact for _, fact in kept]

    def order_counts(self) -> dict[int, int]:
        """Number of distinct facts of order 1 (<S>), 2 (<S,A>) and 3 (<S,P,O>)."""
        orders = Counter(fact_order(fact) for fact in self.fact_counts)
        return {order: orders.get(order, 0) for order in (1, 2, 3)}

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        orders = self.order_counts()
        lines = [
            f"synthetic Visual Genome world in {self.out_dir}",
            f"  images: {self.num_images} ({self.image_size[0]}x{self.image_size[1]} px), seed {self.seed}",
            f"  objects: {self.num_objects}, relationships: {self.num_relationships}, "
            f"attribute records: {self.num_attribute_records}",
            f"  distinct facts: {len(self.fact_counts)} (<S> {orders[1]}, <S,A> {orders[2]}, "
            f"<S,P,O> {orders[3]}); with >= 5 samples: {len(self.facts_with_at_least(5))}",
            "  planted quirks: " + ", ".join(f"{k}={v}" for k, v in sorted(self.quirks.items()) if v),
            f"  written in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def _fact_sort_key(fact: Fact) -> tuple[str, str, str]:
    return (fact[0], fact[1] or "", fact[2] or "")



# --------------------------------------------------------------------------- JSON streaming
class _JsonArrayWriter:
    """Writes a JSON array one record at a time (bounded memory)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.count = 0
        handle.write("[")

    def write(self, record: dict[str, Any]) -> None:
        if self.count:
            self.handle.write(", ")
        self.handle.write(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")))
        self.count += 1

    def close(self) -> None:
        self.handle.write("]")


# --------------------------------------------------------------------------- the world
@dataclass
class _Counters:
    object_id: int = 1_000_000
    relationship_id: int = 3_000_000
    object_index: int = 0
    relationship_index: int = 0
    quirks: Counter = field(default_factory=Counter)


def _image_url(image_id: int) -> str:
    return f"https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg"


def _written_name(category: str, index: int, counters: _Counters, naming: WorldNaming) -> str:
    """The name as the dump spells it: mostly canonical, sometimes with a planted quirk."""
    if index % 37 == 5:
        counters.quirks["name_capital_trailing_space"] += 1
        return category.capitalize() + " "
    if index % 53 == 11:
        counters.quirks["name_accent"] += 1
        return naming.accented_names[category]
    if index % 61 == 13:
        counters.quirks["name_punctuation"] += 1
        return category + "."
    for canonical, alias in naming.object_aliases:
        if category == canonical and index % 17 == 2:
            counters.quirks["name_alias"] += 1
            return alias
    return category


def _written_predicate(predicate: str, index: int, counters: _Counters, naming: WorldNaming) -> str:
    for canonical, alias in naming.relationship_aliases:
        if predicate == canonical and index % 7 == 1:
            counters.quirks["predicate_alias"] += 1
            return alias
    if index % 23 == 4:
        counters.quirks["predicate_upper_case"] += 1
        return predicate.upper()
    return predicate


def _special_image_ids(image_ids: list[int]) -> tuple[set[int], set[int], set[int]]:
    """(missing, corrupt, wrong-size) image ids, planted deterministically."""
    n = len(image_ids)
    if n < MIN_QUIRK_IMAGES:
        return set(), set(), set()
    missing = {image_ids[n // 3]}
    corrupt = {image_ids[(2 * n) // 3]} | (set(REAL_CORRUPT_IMAGE_IDS) & set(image_ids))
    corrupt -= missing
    wrong_size = {image_ids[n // 2]} - missing - corrupt
    return missing, corrupt, wrong_size


def _object_record(shape: Any, object_id: int, written_name: str, counters: _Counters,
                   naming: WorldNaming) -> dict[str, Any]:
    index = counters.object_index
    record: dict[str, Any] = {"object_id": object_id, "x": shape.x, "y": shape.y, "w": shape.size, "h": shape.size,
                              "names": [written_name]}
    if index % 29 == 3:
        counters.quirks["missing_synsets"] += 1
    else:
        record["synsets"] = [naming.category_synsets[shape.category]]
    if index % 4 == 0:
        # ids below 1_000_000: never those of a written object (which start at 1_000_001)
        record["merged_object_ids"] = [] if index % 8 == 0 else [index % 1_000_000]
        counters.quirks["merged_object_ids"] += index % 8 != 0
    return record


def _relationship_end(obj: dict[str, Any], use_names_list: bool) -> dict[str, Any]:
    end = {key: obj[key] for key in ("object_id", "x", "y", "w", "h")}
    if "synsets" in obj:
        end["synsets"] = obj["synsets"]
    if use_names_list:
        end["names"] = list(obj["names"])
    else:
        end["name"] = obj["names"][0]
    return end


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def _image_data_record(image_id: int, width: int, height: int, wrong_size: bool, counters: _Counters) -> dict[str, Any]:
    """The image's record of image_data.json (sometimes keyed ``id``; wrong width/height when ``wrong_size``)."""
    record: dict[str, Any] = {}
    if image_id % 10 == 3:
        record["id"] = image_id
        counters.quirks["image_data_id_key"] += 1
    else:
        record["image_id"] = image_id
    record.update({"width": width, "height": height, "url": _image_url(image_id), "coco_id": None, "flickr_id": None})
    if wrong_size:
        record["width"], record["height"] = height, width + 37
    return record


def _object_and_attribute_records(shapes: list[Any], usable: bool, counters: _Counters, fact_counts: Counter[Fact],
                                  naming: WorldNaming) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The image's entries of objects.json and attributes.json; counts the <S> and <S,A> facts of a usable image."""
    object_records = []
    attribute_records = []
    for shape in shapes:
        counters.object_index += 1
        counters.object_id += 1
        written = _written_name(shape.category, counters.object_index, counters, naming)
        record = _object_record(shape, counters.object_id, written, counters, naming)
        object_records.append(record)
        attribute_record = {key: record[key] for key in ("object_id", "x", "y", "w", "h", "names")}
        if "synsets" in record:
            attribute_record["synsets"] = record["synsets"]
        attributes = list(shape.attributes)
        if counters.object_index % 50 == 7:
            counters.quirks["attributes_key_missing"] += 1
            attributes = []
        else:
            written_attributes = list(attributes)
            if counters.object_index % 43 == 9:
                written_attributes[0] = written_attributes[0].capitalize() + " "
                counters.quirks["attribute_capital_trailing_space"] += 1
            attribute_record["attributes"] = written_attributes
        attribute_records.append(attribute_record)
        if usable:
            fact_counts[(shape.category, None, None)] += 1
            for attribute in attributes:
                fact_counts[(shape.category, attribute, None)] += 1
    return object_records, attribute_records


def _relationship_records(image_id: int, shapes: list[Any], relations: list[tuple[int, int, str]],
                          object_records: list[dict[str, Any]], usable: bool, counters: _Counters,
                          fact_counts: Counter[Fact], naming: WorldNaming) -> list[dict[str, Any]]:
    """The image's entries of relationships.json (sometimes one whose subject has no name);
    counts the <S,P,O> facts of a usable image."""
    use_names_list = image_id % 3 == 0
    records = []
    for subject_index, object_index, predicate in relations:
        counters.relationship_index += 1
        counters.relationship_id += 1
        records.append({
            "relationship_id": counters.relationship_id,
            "predicate": _written_predicate(predicate, counters.relationship_index, counters, naming),
            "synsets": [naming.predicate_synsets[predicate]],
            "subject": _relationship_end(object_records[subject_index], use_names_list),
            "object": _relationship_end(object_records[object_index], use_names_list),
        })
        if usable:
            fact_counts[(shapes[subject_index].category, predicate, shapes[object_index].category)] += 1
    if relations and image_id % 97 == 5:
        # a relationship whose subject has no name: the reader must skip and count it
        counters.relationship_id += 1
        nameless = _relationship_end(object_records[relations[0][0]], use_names_list)
        if use_names_list:
            nameless["names"] = []
        else:
            nameless["name"] = ""
        records.append({
            "relationship_id": counters.relationship_id, "predicate": relations[0][2],
            "synsets": [], "subject": nameless,
            "object": _relationship_end(object_records[relations[0][1]], use_names_list),
        })
        counters.quirks["relationship_subject_without_name"] += 1
    counters.quirks["relationship_names_list" if use_names_list else "relationship_name_str"] += len(records)
    return records


def _image_file_bytes(canvas: Image.Image, corrupt: bool) -> bytes:
    """The JPEG of ``canvas``; when ``corrupt``, truncated so that the header parses and the pixels do not."""
    data = _encode_jpeg(canvas)
    if corrupt:
        data = data[:len(data) // 3]
        data = data[:2] + b"\x00" * 16 + data[18:]
    return data


def _write_world(folder: Path, world: WorldSpec, num_images: int, progress: bool) -> dict[str, Any]:
    """Render the images and write the dump's files into ``folder``; return the counts for the manifest."""
    width, height, naming = world.width, world.height, world.naming
    image_dir = folder / "VG_100K"
    image_dir.mkdir()
    image_ids = list(range(1, num_images + 1))
    missing, corrupt, wrong_size = _special_image_ids(image_ids)
    counters = _Counters()
    counters.quirks.update({"image_missing_on_disk": len(missing), "image_corrupt": len(corrupt),
                            "image_data_wrong_size": len(wrong_size)})
    fact_counts: Counter[Fact] = Counter()
    num_objects = num_relationships = num_attribute_records = 0
    with open(folder / "image_data.json", "w", encoding="utf-8") as image_file, \
            open(folder / "objects.json", "w", encoding="utf-8") as objects_file, \
            open(folder / "relationships.json", "w", encoding="utf-8") as relationships_file, \
            open(folder / "attributes.json", "w", encoding="utf-8") as attributes_file, \
            open(folder / INSTANCES_NAME if world.instance_record else os.devnull, "w", encoding="utf-8") as instances_file:
        image_writer = _JsonArrayWriter(image_file)
        objects_writer = _JsonArrayWriter(objects_file)
        relationships_writer = _JsonArrayWriter(relationships_file)
        attributes_writer = _JsonArrayWriter(attributes_file)
        instances_writer = _JsonArrayWriter(instances_file)
        for image_id in tqdm(image_ids, desc="synth images", unit="img", disable=not progress):
            canvas, shapes, relations = world.scene(image_id)
            usable = image_id not in missing and image_id not in corrupt
            image_writer.write(_image_data_record(image_id, width, height, image_id in wrong_size, counters))
            object_records, attribute_records = _object_and_attribute_records(shapes, usable, counters, fact_counts,
                                                                              naming)
            if world.instance_record is not None:
                for shape, record in zip(shapes, object_records):
                    instances_writer.write({"image_id": image_id, "object_id": record["object_id"],
                                            **world.instance_record(shape)})
            num_objects += len(object_records)
            num_attribute_records += len(attribute_records)
            objects_writer.write({"image_id": image_id, "objects": object_records, "image_url": _image_url(image_id)})
            attributes_writer.write({"image_id": image_id, "attributes": attribute_records})
            relationship_records = _relationship_records(image_id, shapes, relations, object_records, usable,
                                                         counters, fact_counts, naming)
            num_relationships += len(relationship_records)
            relationships_writer.write({"image_id": image_id, "relationships": relationship_records})
            if image_id not in missing:
                (image_dir / f"{image_id}.jpg").write_bytes(_image_file_bytes(canvas, image_id in corrupt))
        for writer in (image_writer, objects_writer, relationships_writer, attributes_writer, instances_writer):
            writer.close()

    (folder / "object_alias.txt").write_text(
        "".join(",".join(group) + "\n" for group in naming.object_aliases), encoding="utf-8")
    (folder / "relationship_alias.txt").write_text(
        "".join(",".join(group) + "\n" for group in naming.relationship_aliases), encoding="utf-8")
    return {
        "num_objects": num_objects,
        "num_relationships": num_relationships,
        "num_attribute_records": num_attribute_records,
        "fact_counts": dict(fact_counts),
        "missing": sorted(missing),
        "corrupt": sorted(corrupt),
        "wrong_size": sorted(wrong_size),
        "quirks": dict(counters.quirks),
    }


def _write_manifest(path: Path, generator: str, seed: int, num_images: int, image_size: tuple[int, int],
                    written: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Record what was generated (for provenance and round-trip tests) beside the dump."""
    facts = sorted(written["fact_counts"].items(), key=lambda item: (-item[1], _fact_sort_key(item[0])))
    manifest = {
        "generator": generator,
        **extra,
        "seed": seed,
        "num_images": num_images,
        "image_size": list(image_size),
        "num_objects": written["num_objects"],
        "num_relationships": written["num_relationships"],
        "num_attribute_records": written["num_attribute_records"],
        "missing_image_ids": written["missing"],
        "corrupt_image_ids": written["corrupt"],
        "wrong_size_image_ids": written["wrong_size"],
        "quirks": dict(sorted(written["quirks"].items())),
        "fact_counts": [[s, p, o, count] for (s, p, o), count in facts],
    }
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_manifest_fact_counts(dump_dir: str | os.PathLike) -> dict[Fact, int]:
    """The canonical fact counts recorded in ``dump_dir/synth_manifest.json``."""
    path = Path(dump_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataPrepError(f"{path} not found; {dump_dir} is not a folder written by `mas-triplets synth`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return {(s, p, o): int(count) for s, p, o, count in manifest["fact_counts"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataPrepError(f"{path} is malformed ({exc}); regenerate it with `mas-triplets synth --force`") from None


def generate_world(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 600,
    seed: int = 0,
    image_size: tuple[int, int] = (160, 120),
    progress: bool = True,
    force: bool = False,
) -> SynthReport:
    """Render ``num_images`` scenes of shapes and write them as a Visual Genome dump into ``out_dir``.

    ``image_size`` is ``(width, height)`` in pixels. Written by :func:`write_world_dump` (atomic,
    ``force`` to replace a non-empty ``out_dir``). Same ``seed`` -> identical bytes.
    Raises :class:`~data_prep.errors.DataPrepError` on bad arguments.
    """
    def make_world(width: int, height: int) -> WorldSpec:
        def scene(image_id: int) -> Scene:
            rng = random.Random(seed * 1_000_003 + image_id)
            return render_scene(rng, SceneSampler(rng), width, height)
        return WorldSpec(width, height, SHAPES_NAMING, scene)

    return write_world_dump(out_dir, make_world, generator="data_prep.synthetic.generate_world",
                            num_images=num_images, seed=seed, image_size=image_size, progress=progress, force=force)


def write_world_dump(
    out_dir: str | os.PathLike,
    make_world: Callable[[int, int], WorldSpec],
    *,
    generator: str,
    num_images: int,
    seed: int,
    image_size: tuple[int, int],
    progress: bool = True,
    force: bool = False,
) -> SynthReport:
    """Write the world ``make_world(width, height)`` as a Visual Genome dump of ``num_images`` images.

    The arguments and ``out_dir`` are checked before ``make_world`` is called
    (:mod:`data_prep.worlds.arguments`: sizes, counts and the seed in range, the folder writable). The folder is built
    in a hidden temporary sibling and renamed to ``out_dir`` only when complete; an existing
    non-empty ``out_dir`` is refused unless ``force`` (then it is replaced, the old one removed
    only after the new one is in place). ``generator`` and ``seed`` are recorded in the manifest.
    """
    start = time.perf_counter()
    width, height = check_world_arguments(num_images, image_size, seed)
    out_dir = prepare_destination(out_dir, force)
    world = make_world(width, height)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        written = _write_world(staging, world, num_images, progress)
        _write_manifest(staging / MANIFEST_NAME, generator, seed, num_images, (width, height), written, world.manifest)
        prepare_destination(out_dir, force)  # re-check: something may have appeared meanwhile
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.iterdir() if p.is_file())
    return SynthReport(
        out_dir=out_dir,
        seed=seed,
        num_images=num_images,
        image_size=(width, height),
        num_objects=written["num_objects"],
        num_relationships=written["num_relationships"],
        num_attribute_records=written["num_attribute_records"],
        fact_counts=written["fact_counts"],
        missing_image_ids=written["missing"],
        corrupt_image_ids=written["corrupt"],
        wrong_size_image_ids=written["wrong_size"],
        quirks=written["quirks"],
        seconds=time.perf_counter() - start,
        files=files,
    )


def iter_fact_counts_table(report: SynthReport, limit: int = 20) -> Iterator[str]:
    """Lines ``count  <S, P, O>`` of the ``limit`` most frequent facts, for printing."""
    for fact in report.facts_with_at_least(1)[:limit]:
        text = ", ".join(part for part in fact if part is not None)
        yield f"{report.fact_counts[fact]:6d}  <{text}>"
