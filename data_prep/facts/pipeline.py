"""From the samples a source reader collected to the fact file: the pipeline shared by
every source (:func:`finish_prepare`), and what it reports (:class:`PrepareReport`).

The steps, in order, each a function below:

1. :func:`_keep_samples_in_readable_images`: image sizes from the decoded images (trusted) or
   image_data; samples of unknown images dropped; boxes clipped to the image, empty ones dropped;
2. train/test split by image (:func:`~data_prep.facts.splits.split_by_image`) unless the source gives one;
3. :func:`_drop_rare_facts`: facts with fewer than ``min_fact_count`` training samples;
4. :func:`_number_facts`: fact ids sorted by (order, subject, predicate, object);
5. samples sorted by image, then fact (the crops read each image once);
6. :func:`_embed_facts` (optional), then the task split (random or semantic);
7. the atomic write of facts, samples, region crops and provenance.
"""
from __future__ import annotations

import array
import datetime
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import regions
from ..errors import DataPrepError
from .collector import FactCollector
from .fact_file import FORMAT_VERSION, Fact, fact_order, write_fact_file
from .options import EmbedFn, PrepareOptions
from .splits import (
    cover_both_splits,
    filter_rare_facts,
    format_task_table,
    random_split,
    semantic_split,
    split_by_image,
    task_statistics,
)


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


@dataclass
class CollectedSource:
    """What a source reader hands :func:`finish_prepare` beside the samples in its collector."""

    name: str
    """The source's name in the provenance and the report (``"visual_genome"``, ``"vg_sgg_h5"``)."""
    files: dict[str, Path | None]
    """The input files read, by name; path and size go to the provenance."""
    listed_sizes: dict[int, tuple[int, int]]
    """image id -> (width, height) in pixels as the source lists them; (0, 0) = unknown."""
    image_paths: dict[int, Path] | None
    """image id -> image file; None = no images (boxes are clipped to ``listed_sizes``, no crops)."""
    split_given: bool
    """True when the collector's samples carry the source's own 0 train / 1 test split."""
    extra_provenance: dict[str, Any] = field(default_factory=dict)
    """Source-specific counts merged into the provenance."""


@dataclass
class _Samples:
    """Parallel per-sample arrays: fact row (int64), image id (int64), box x, y, w, h (float32 [N, 4], pixels),
    split (int8, 0 train / 1 test, -1 undecided)."""

    fact: np.ndarray
    image: np.ndarray
    box: np.ndarray
    split: np.ndarray

    def take(self, rows: np.ndarray) -> _Samples:
        """The samples selected by a boolean mask or an index array."""
        return _Samples(self.fact[rows], self.image[rows], self.box[rows], self.split[rows])


def finish_prepare(collector: FactCollector, source: CollectedSource, out: str | os.PathLike,
                   options: PrepareOptions) -> PrepareReport:
    """Turn the samples in ``collector`` into the fact file ``out`` (steps in the module docstring).

    Returns the report; raises :class:`DataPrepError` when no fact is left. The file is
    written atomically: an error or interruption leaves no file at ``out``.
    """
    fact_slots, sample_fact = collector.fact_table()
    num_raw_facts = len(fact_slots)
    collector.sample_subject = collector.sample_predicate = collector.sample_object = array.array("i")
    samples = _Samples(sample_fact, np.frombuffer(collector.sample_image, dtype=np.int64),
                       np.frombuffer(collector.sample_box, dtype=np.float32).reshape(-1, 4),
                       np.frombuffer(collector.sample_split, dtype=np.int8))
    collected = len(sample_fact)
    del sample_fact
    if not collected:
        reasons = "; ".join(f"{reason}: {count}" for reason, count in collector.dropped.most_common(2))
        raise DataPrepError(f"the input files gave no sample ({reasons or 'they hold no record'}); check the "
                            "files and --orders")
    samples = _keep_samples_in_readable_images(samples, collector, source, options)
    if not len(samples.fact):
        raise DataPrepError(_no_sample_in_images_message(collected, collector.notes, source))
    collector.sample_image, collector.sample_box = array.array("q"), array.array("f")
    collector.sample_split = array.array("b")

    if not source.split_given:
        samples.split = split_by_image(samples.image, options.seed, options.test_fraction)
        if options.test_fraction > 0:
            collector.notes["samples moved to cover both splits"] += cover_both_splits(
                samples.fact, samples.split, num_raw_facts)
    samples, kept_raw = _drop_rare_facts(samples, num_raw_facts, options.min_fact_count, collector.dropped)
    facts, samples = _number_facts(samples, [collector.fact(fact_slots[i]) for i in kept_raw.tolist()], kept_raw,
                                   num_raw_facts)
    del fact_slots
    if not facts:
        raise DataPrepError(
            f"no fact is left after filtering ({collected} samples collected); lower --min-fact-count or check "
            "the input files and --orders"
        )
    samples = samples.take(np.lexsort((samples.fact, samples.image)))

    fact_embeddings = _embed_facts(facts, options.text_encoder)
    if options.split == "semantic":
        task_of_fact = semantic_split(fact_embeddings, options.num_tasks, options.seed)
    else:
        task_of_fact = random_split(len(facts), options.num_tasks, options.seed)
    orders = np.array([fact_order(fact) for fact in facts], dtype=np.int8)
    statistics = task_statistics(task_of_fact, orders, samples.fact, samples.split, facts)

    report = PrepareReport(out_path=Path(out), source=source.name, kept=_kept_counts(facts, orders, samples, options),
                           dropped=dict(sorted(collector.dropped.items())), notes=dict(sorted(collector.notes.items())),
                           task_statistics=statistics)
    with_images = source.image_paths is not None
    pixels = None
    if source.image_paths is not None:
        pixels = regions.crop_blocks(samples.image, samples.box, source.image_paths, options.image_size,
                                           options.max_image_pixels, options.progress)
    write_fact_file(
        out, facts=facts, sample_fact=samples.fact, sample_image_id=samples.image, sample_box=samples.box,
        sample_split=samples.split, task_of_fact=task_of_fact, sample_pixels=pixels,
        provenance=_provenance(report, source, options, collected), fact_embeddings=fact_embeddings,
        encoder_name=options.encoder_name, image_size=options.image_size if with_images else None,
    )
    return report


def _no_sample_in_images_message(collected: int, notes: Counter[str], source: CollectedSource) -> str:
    """Why none of the ``collected`` samples lies in a usable image, for the one-line error."""
    if source.image_paths is None:
        return (f"none of the {collected} samples collected lies in an image that image_data lists with a "
                "width and height; check image_data.json")
    missing, broken = notes["images listed but missing on disk"], notes["images that do not decode"]
    folders = sorted({str(path.parent) for path in list(source.image_paths.values())[:1000]})
    return (f"none of the {collected} samples collected lies in an image found on disk and decodable "
            f"({missing} images missing, {broken} that do not decode; {len(source.image_paths)} image files "
            f"found in {', '.join(folders[:3])}); check that the images belong to these annotation files")


def _keep_samples_in_readable_images(samples: _Samples, collector: FactCollector, source: CollectedSource,
                                     options: PrepareOptions) -> _Samples:
    """Drop the samples of images of unknown size and those whose box is empty inside the image;
    clip the other boxes to the image (the decoded image's size when there are images)."""
    dropped, notes = collector.dropped, collector.notes
    image_ids = np.unique(samples.image)
    if source.image_paths is not None:
        sizes = regions.checked_image_sizes(image_ids, source.image_paths, notes, source.listed_sizes,
                                                  options.max_image_pixels, options.progress)
        reason_unknown = "samples in images missing on disk or that do not decode"
    else:
        sizes = {image_id: size for image_id in image_ids.tolist()
                 if (size := source.listed_sizes.get(image_id, (0, 0))) != (0, 0)}
        reason_unknown = "samples in images absent from image_data or without width/height"
    known = np.fromiter((image_id in sizes for image_id in image_ids.tolist()), dtype=bool, count=len(image_ids))
    width_of = np.array([sizes.get(i, (0, 0))[0] for i in image_ids.tolist()], dtype=np.float32)
    height_of = np.array([sizes.get(i, (0, 0))[1] for i in image_ids.tolist()], dtype=np.float32)
    position = np.searchsorted(image_ids, samples.image)
    keep = known[position] if len(samples.image) else np.zeros(0, dtype=bool)
    if (~keep).sum():
        dropped[reason_unknown] += int((~keep).sum())

    # clip column by column (bounded temporaries)
    box = samples.box
    clipped_box = np.empty_like(box)
    changed = np.zeros(len(box), dtype=bool)
    for start_column, size_column, limit in ((0, 2, width_of[position]), (1, 3, height_of[position])):
        low = np.clip(box[:, start_column], 0, limit)
        high = np.clip(box[:, start_column] + box[:, size_column], 0, limit)
        clipped_box[:, start_column] = low
        clipped_box[:, size_column] = high - low
        changed |= np.abs(low - box[:, start_column]) > 1e-3
        changed |= np.abs(clipped_box[:, size_column] - box[:, size_column]) > 1e-3
        del low, high, limit
    del position
    empty = keep & ((clipped_box[:, 2] < 1) | (clipped_box[:, 3] < 1))
    notes["boxes clipped to the image"] += int((keep & changed & ~empty).sum())
    if empty.sum():
        dropped["samples whose box is empty inside the image"] += int(empty.sum())
    keep &= ~empty
    del changed, empty
    samples.box = clipped_box
    return samples.take(keep)


def _drop_rare_facts(samples: _Samples, num_raw_facts: int, min_fact_count: int,
                     dropped: Counter[str]) -> tuple[_Samples, np.ndarray]:
    """Drop the facts with fewer than ``min_fact_count`` training samples and their samples.

    Returns the kept samples and the kept raw fact rows (sorted).
    """
    present = np.bincount(samples.fact, minlength=num_raw_facts) > 0
    frequent = filter_rare_facts(samples.fact, samples.split, num_raw_facts, min_fact_count)
    rare = present & ~frequent
    if rare.sum():
        dropped[f"facts with fewer than {min_fact_count} training samples"] += int(rare.sum())
        dropped[f"samples of facts with fewer than {min_fact_count} training samples"] += int(
            (~frequent[samples.fact]).sum())
    return samples.take(frequent[samples.fact]), np.flatnonzero(frequent & present)


def _number_facts(samples: _Samples, kept_facts: list[Fact], kept_raw: np.ndarray,
                  num_raw_facts: int) -> tuple[list[Fact], _Samples]:
    """Fact ids sorted by (order, subject, predicate, object): the facts in id order, and the
    samples with their raw fact rows replaced by those ids."""
    sort_key = [(fact_order(fact), fact[0], fact[1] or "", fact[2] or "") for fact in kept_facts]
    ranking = sorted(range(len(kept_raw)), key=sort_key.__getitem__)
    new_id = np.full(num_raw_facts, -1, dtype=np.int64)
    new_id[kept_raw[ranking]] = np.arange(len(ranking))
    samples.fact = new_id[samples.fact]
    return [kept_facts[i] for i in ranking], samples


def _embed_facts(facts: list[Fact], text_encoder: EmbedFn | None) -> np.ndarray | None:
    """float32 [F, 3*d] language embeddings of ``facts`` from ``text_encoder``, or None without one."""
    if text_encoder is None:
        return None
    embedded = text_encoder(facts)
    if isinstance(embedded, tuple):
        embedded = embedded[0]
    fact_embeddings = np.asarray(embedded, dtype=np.float32)
    if fact_embeddings.ndim != 2 or fact_embeddings.shape[0] != len(facts):
        raise DataPrepError(
            f"the text encoder returned shape {fact_embeddings.shape} for {len(facts)} facts; expected [F, 3*d]"
        )
    return fact_embeddings


def _kept_counts(facts: list[Fact], orders: np.ndarray, samples: _Samples, options: PrepareOptions) -> dict[str, Any]:
    """What the file holds: facts (by order), samples (train/test), images, tasks."""
    return {
        "facts": len(facts),
        "facts_by_order": {str(order): int((orders == order).sum()) for order in (1, 2, 3)},
        "samples": int(len(samples.fact)),
        "train_samples": int((samples.split == 0).sum()),
        "test_samples": int((samples.split == 1).sum()),
        "images": int(len(np.unique(samples.image))),
        "tasks": int(options.num_tasks),
    }


def _file_entry(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(Path(path).resolve()), "size_bytes": Path(path).stat().st_size if Path(path).exists() else None}


def _provenance(report: PrepareReport, source: CollectedSource, options: PrepareOptions,
                collected: int) -> dict[str, Any]:
    """The JSON provenance stored in the file: sources, command line, options, counts, drops, task statistics."""
    with_images = source.image_paths is not None
    return {
        "source": source.name,
        "source_files": {name: _file_entry(path) for name, path in source.files.items()},
        "command_line": options.command_line,
        "options": {"num_tasks": options.num_tasks, "split": options.split, "min_fact_count": options.min_fact_count,
                    "orders": list(options.orders), "image_size": options.image_size if with_images else None,
                    "seed": options.seed, "images": with_images, "encoder_name": options.encoder_name,
                    "train_test": "as given by the source" if source.split_given else
                    f"by image, {options.test_fraction:.0%} of images in test (seeded)"},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
        "samples_collected": collected,
        "kept": report.kept,
        "dropped": report.dropped,
        "notes": report.notes,
        "task_statistics": report.task_statistics,
        **source.extra_provenance,
    }
