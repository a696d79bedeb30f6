"""VG-SGG.h5 + VG-SGG-dicts.json (the scene-graph community's format) -> fact HDF5 (:func:`prepare_sgg`).

The conventions of the format (scene-graph-TF-release ``vg_to_imdb``/``vg_to_roidb``, read
the same way by neural-motifs and Scene-Graph-Benchmark):

* ``boxes_1024`` (or ``boxes_512``): int32 [B, 4] = (x_center, y_center, w, h) in an image
  rescaled so that its long side is 1024 (512). Rescaled here to the real image:
  ``factor = max(width, height) / 1024`` with width/height from ``image_data.json``;
  ``x = (xc - w/2) * factor``, ``y = (yc - h/2) * factor``, ``w * factor``, ``h * factor``;
  ``boxes_1024`` is used when both are present.
* ``labels`` [B, 1] and ``predicates`` [R, 1]: 1-indexed into ``idx_to_label`` /
  ``idx_to_predicate`` of the dicts file, whose keys are strings (``"1"``); 0 or an
  unknown index drops the record (counted).
* ``img_to_first_box``/``img_to_last_box`` and ``img_to_first_rel``/``img_to_last_rel``:
  [I], inclusive ranges of rows, -1 when the image has none.
* ``relationships`` [R, 2]: (subject row, object row) as *global* box rows.
* ``split`` [I]: 0 train, 2 test (stored as 0 / 1 in the fact file); other values drop the image.
* optional ``attributes`` [B, k]: 1-indexed into ``idx_to_attribute``, 0 = none (only the
  "with attributes" variant of the file has them; without it there are no <S,P> facts).
* ``active_object_mask`` is not used: every labelled box is a <S> sample.
* Row i of the h5 is the i-th image of ``image_data.json``; when image_data.json lists
  more images than the h5, the four images of the real dump that do not decode
  (1592, 1722, 4616, 4617), which the h5 omits, are skipped first.

Facts: <S> from each labelled box (its box), <S,A> from attributes, <S,P,O> from each
relationship (union box). The file's split is kept as given.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..atomic import check_output_file
from ..errors import DataPrepError, MissingDatasetError
from ..facts.collector import FactCollector
from ..facts.pipeline import CollectedSource, PrepareReport, finish_prepare
from .json_stream import check_json_depth, stream_json_array
from ..facts.options import PrepareOptions
from ..facts.regions import find_image_files
from ..text_clean import clean_phrase
from .visual_genome import image_id_of

CORRUPT_VG_IMAGE_IDS = (1592, 1722, 4616, 4617)
BOX_SCALES = (1024, 512)


def _read_dicts(path: Path, max_depth: int) -> dict[str, Any]:
    if not path.is_file():
        raise MissingDatasetError(f"{path} not found; give the VG-SGG-dicts.json that goes with the h5 file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataPrepError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
    check_json_depth(raw, path, max_depth)
    try:
        dicts = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path} is malformed JSON (line {exc.lineno}: {exc.msg}); give the original dicts file") from None
    except UnicodeDecodeError:
        raise DataPrepError(f"{path} is not UTF-8 JSON; give the original dicts file") from None
    if not isinstance(dicts, dict):
        raise DataPrepError(f"{path} must hold a JSON object with idx_to_label and idx_to_predicate")
    return dicts


def _index_table(dicts: dict[str, Any], key: str, path: Path, required: bool) -> dict[int, str]:
    """``{"1": "man", ...}`` -> {1: "man"} with cleaned names; string keys as in the community files."""
    raw = dicts.get(key)
    if raw is None:
        if required:
            raise DataPrepError(f"{path} has no '{key}'; give the VG-SGG-dicts.json that goes with the h5 file")
        return {}
    if not isinstance(raw, dict):
        raise DataPrepError(f"{path}: '{key}' must map string indices to names")
    table: dict[int, str] = {}
    for index, name in raw.items():
        try:
            number = int(index)
        except (TypeError, ValueError):
            raise DataPrepError(f"{path}: '{key}' has the non-integer key {index!r}") from None
        cleaned = clean_phrase(name)
        if cleaned:
            table[number] = cleaned
    return table


def _read_dataset(handle: Any, name: str, path: Path) -> np.ndarray:
    if name not in handle:
        raise DataPrepError(f"{path} has no dataset '{name}'; give a VG-SGG.h5 file (scene-graph-TF-release layout)")
    try:
        return np.asarray(handle[name][()])
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataPrepError(f"{path}: dataset '{name}' is unreadable ({str(exc).splitlines()[0]}); the file may be truncated") from None


def _image_rows(image_records: list[tuple[int, int, int]], num_images: int, path: Path) -> list[tuple[int, int, int]]:
    if len(image_records) == num_images:
        return image_records
    without_corrupt = [record for record in image_records if record[0] not in CORRUPT_VG_IMAGE_IDS]
    if len(without_corrupt) == num_images:
        return without_corrupt
    raise DataPrepError(
        f"{path} lists {len(image_records)} images but the h5 has {num_images}; give the image_data.json "
        "the h5 was made from"
    )


@dataclass
class _SggTables:
    """The datasets of VG-SGG.h5 a run reads (int64, boxes float64); those of orders not asked for are None."""

    scale: int
    """Long side (pixels) of the rescaled images the boxes are in: 1024 or 512."""
    boxes: np.ndarray
    """[B, 4] (x_center, y_center, w, h)."""
    labels: np.ndarray
    """[B] 1-indexed into idx_to_label."""
    first_box: np.ndarray
    """[I] first box row of each image, -1 when none."""
    last_box: np.ndarray
    """[I] last box row of each image (inclusive)."""
    image_split: np.ndarray
    """[I] 0 train, 2 test."""
    relationships: np.ndarray | None
    """[R, 2] (subject box row, object box row)."""
    predicates: np.ndarray | None
    """[R] 1-indexed into idx_to_predicate."""
    first_rel: np.ndarray | None
    """[I] first relationship row of each image, -1 when none."""
    last_rel: np.ndarray | None
    """[I] last relationship row of each image (inclusive)."""
    attributes: np.ndarray | None
    """[B, k] 1-indexed into idx_to_attribute, 0 = none."""


def _read_tables(h5_path: Path, orders: tuple[int, ...]) -> _SggTables:
    """Read the datasets ``orders`` needs from ``h5_path`` and check that their lengths agree."""
    try:
        handle = h5py.File(h5_path, "r")
    except OSError as exc:
        raise DataPrepError(f"{h5_path} is not a readable HDF5 file ({str(exc).splitlines()[0]}); the file may be truncated") from None

    def rows(name: str) -> np.ndarray:
        return _read_dataset(handle, name, h5_path).reshape(-1).astype(np.int64)

    with handle:
        scale = next((s for s in BOX_SCALES if f"boxes_{s}" in handle), None)
        if scale is None:
            raise DataPrepError(f"{h5_path} has no dataset 'boxes_1024' or 'boxes_512'; give a VG-SGG.h5 file")
        tables = _SggTables(
            scale=scale, boxes=_read_dataset(handle, f"boxes_{scale}", h5_path).astype(np.float64).reshape(-1, 4),
            labels=rows("labels"), first_box=rows("img_to_first_box"), last_box=rows("img_to_last_box"),
            image_split=rows("split"), relationships=None, predicates=None, first_rel=None, last_rel=None,
            attributes=None)
        if 3 in orders:
            tables.relationships = _read_dataset(handle, "relationships", h5_path).reshape(-1, 2).astype(np.int64)
            tables.predicates = rows("predicates")
            tables.first_rel, tables.last_rel = rows("img_to_first_rel"), rows("img_to_last_rel")
        if 2 in orders and "attributes" in handle:
            attributes = _read_dataset(handle, "attributes", h5_path)
            tables.attributes = attributes.reshape(attributes.shape[0], -1).astype(np.int64)
    num_images, num_boxes = len(tables.first_box), len(tables.boxes)
    lengths = {"labels": len(tables.labels), "img_to_last_box": len(tables.last_box), "split": len(tables.image_split)}
    expected = {"labels": num_boxes, "img_to_last_box": num_images, "split": num_images}
    if tables.relationships is not None:
        lengths.update({"predicates": len(tables.predicates), "img_to_first_rel": len(tables.first_rel),
                        "img_to_last_rel": len(tables.last_rel)})
        expected.update({"predicates": len(tables.relationships), "img_to_first_rel": num_images,
                         "img_to_last_rel": num_images})
    if tables.attributes is not None:
        lengths["attributes"] = len(tables.attributes)
        expected["attributes"] = num_boxes
    for name, length in lengths.items():
        if length != expected[name]:
            raise DataPrepError(f"{h5_path}: '{name}' has {length} rows, expected {expected[name]}; the file is inconsistent")
    return tables


def _read_image_records(path: Path, progress: bool, max_depth: int) -> list[tuple[int, int, int]]:
    """``(image id, width, height)`` of each record of image_data.json, in file order; 0 x 0 when unknown."""
    records: list[tuple[int, int, int]] = []
    for record in stream_json_array(path, progress=progress, description="image_data.json", max_depth=max_depth):
        image_id = image_id_of(record)
        if image_id is None:
            raise DataPrepError(f"{path}: an image record has no image_id; give the original image_data.json")
        width, height = record.get("width"), record.get("height")
        valid = isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0
        records.append((image_id, int(width) if valid else 0, int(height) if valid else 0))
    return records


def _collect_boxes(collector: FactCollector, tables: _SggTables, row: int, image_id: int, factor: float,
                   split_code: int, label_names: dict[int, str], attribute_names: dict[int, str],
                   orders: tuple[int, ...]) -> bool:
    """The <S> and <S,A> samples of image ``row``; False (the image dropped) when its box range is out of bounds."""
    drop = collector.dropped
    start, stop = int(tables.first_box[row]), int(tables.last_box[row])
    if start < 0 or stop < start:
        return True
    if stop >= len(tables.boxes):
        drop["images whose box range exceeds the boxes"] += 1
        return False
    for box_row in range(start, stop + 1):
        name = label_names.get(int(tables.labels[box_row]))
        if name is None:
            drop["boxes: unknown or zero label"] += 1
            continue
        xc, yc, w, h = tables.boxes[box_row]
        x, y, w, h = (xc - w / 2.0) * factor, (yc - h / 2.0) * factor, w * factor, h * factor
        if 1 in orders:
            collector.add((name, None, None), image_id, x, y, w, h, split_code)
        if tables.attributes is not None:
            seen: set[str] = set()
            for index in tables.attributes[box_row].tolist():
                if index == 0:
                    continue
                attribute = attribute_names.get(index)
                if attribute is None:
                    drop["attributes: unknown index"] += 1
                elif attribute not in seen:
                    seen.add(attribute)
                    collector.add((name, attribute, None), image_id, x, y, w, h, split_code)
    return True


def _collect_relationships(collector: FactCollector, tables: _SggTables, row: int, image_id: int, factor: float,
                           split_code: int, label_names: dict[int, str], predicate_names: dict[int, str]) -> None:
    """The <S,P,O> samples of image ``row``, each with the union box of its subject and object."""
    assert tables.relationships is not None and tables.predicates is not None
    drop = collector.dropped
    start, stop = int(tables.first_rel[row]), int(tables.last_rel[row])  # type: ignore[index]
    if start < 0 or stop < start:
        return
    if stop >= len(tables.relationships):
        drop["images whose relationship range exceeds the relationships"] += 1
        return
    num_boxes = len(tables.boxes)
    for rel_row in range(start, stop + 1):
        subject_row, object_row = (int(v) for v in tables.relationships[rel_row])
        if not (0 <= subject_row < num_boxes and 0 <= object_row < num_boxes):
            drop["relationships: box row outside the boxes"] += 1
            continue
        predicate = predicate_names.get(int(tables.predicates[rel_row]))
        if predicate is None:
            drop["relationships: unknown or zero predicate"] += 1
            continue
        subject_name = label_names.get(int(tables.labels[subject_row]))
        object_name = label_names.get(int(tables.labels[object_row]))
        if subject_name is None or object_name is None:
            drop["relationships: subject or object with unknown label"] += 1
            continue
        (sxc, syc, sw, sh), (oxc, oyc, ow, oh) = tables.boxes[subject_row], tables.boxes[object_row]
        x0 = min(sxc - sw / 2.0, oxc - ow / 2.0)
        y0 = min(syc - sh / 2.0, oyc - oh / 2.0)
        x1 = max(sxc + sw / 2.0, oxc + ow / 2.0)
        y1 = max(syc + sh / 2.0, oyc + oh / 2.0)
        collector.add((subject_name, predicate, object_name), image_id,
                      x0 * factor, y0 * factor, (x1 - x0) * factor, (y1 - y0) * factor, split_code)


def prepare_sgg(h5_path: str | os.PathLike, dicts_path: str | os.PathLike, image_data_path: str | os.PathLike,
                images_dir: str | os.PathLike | None, out: str | os.PathLike, options: PrepareOptions | None = None,
                **option_fields: Any) -> PrepareReport:
    """Build a fact file from VG-SGG.h5 (conventions in the module docstring). ``options`` and
    ``option_fields`` as :func:`data_prep.sources.visual_genome.prepare_visual_genome`; the file's own
    train/test split is kept (``test_fraction`` is not used). ``images_dir`` may be None with ``no_images``.
    """
    options = PrepareOptions.build(options, option_fields)
    check_output_file(out, "out")
    orders = options.orders
    h5_path, dicts_path, image_data_path = Path(h5_path), Path(dicts_path), Path(image_data_path)
    if not h5_path.is_file():
        raise MissingDatasetError(f"{h5_path} not found; give the VG-SGG.h5 file")
    if not options.no_images:
        if images_dir is None:
            raise DataPrepError("give --images DIR (the Visual Genome images) or --no-images")
        if not Path(images_dir).is_dir():
            raise MissingDatasetError(f"image folder {images_dir} not found; give the folder of the VG images")
    image_paths = None
    if not options.no_images:
        folder = Path(images_dir)  # type: ignore[arg-type]
        image_paths = find_image_files([folder, folder / "VG_100K", folder / "VG_100K_2"])
    dicts = _read_dicts(dicts_path, options.max_json_depth)
    label_names = _index_table(dicts, "idx_to_label", dicts_path, required=True)
    predicate_names = _index_table(dicts, "idx_to_predicate", dicts_path, required=3 in orders)
    attribute_names = _index_table(dicts, "idx_to_attribute", dicts_path, required=False)
    image_records = _read_image_records(image_data_path, options.progress, options.max_json_depth)
    tables = _read_tables(h5_path, orders)
    rows = _image_rows(image_records, len(tables.first_box), image_data_path)

    collector = FactCollector()
    drop = collector.dropped
    for row, (image_id, width, height) in enumerate(rows):
        split_code = {0: 0, 2: 1}.get(int(tables.image_split[row]))
        if split_code is None:
            drop["images with a split other than 0 (train) or 2 (test)"] += 1
            continue
        if width <= 0 or height <= 0:
            drop["images without width/height in image_data"] += 1
            continue
        factor = max(width, height) / float(tables.scale)
        if not _collect_boxes(collector, tables, row, image_id, factor, split_code, label_names, attribute_names,
                              orders):
            continue
        if tables.relationships is not None:
            _collect_relationships(collector, tables, row, image_id, factor, split_code, label_names,
                                   predicate_names)

    listed_sizes = {image_id: (width, height) for image_id, width, height in rows}
    extra = {"box_scale": tables.scale, "h5_images": len(tables.first_box), "h5_boxes": len(tables.boxes),
             "h5_relationships": int(len(tables.relationships)) if tables.relationships is not None else 0,
             "attributes_in_h5": "used" if tables.attributes is not None else "absent or not requested"}
    source = CollectedSource(name="vg_sgg_h5",
                             files={"h5": h5_path, "dicts": dicts_path, "image_data": image_data_path},
                             listed_sizes=listed_sizes, image_paths=image_paths, split_given=True,
                             extra_provenance=extra)
    return finish_prepare(collector, source, out, options)
