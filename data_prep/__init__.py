"""Turning relation datasets (Visual Genome, VG-SGG.h5) into the project's fact HDF5, and reading it back;
image-classification datasets into image HDF5; the synthetic Visual-Genome-style world.

Public entry points (imported lazily, so ``import data_prep`` stays light):

* :func:`open_facts`, :func:`write_fact_file`, :class:`FactFile` (:mod:`data_prep.facts.fact_file`);
* :func:`prepare_visual_genome` (:mod:`data_prep.sources.visual_genome`), :func:`prepare_sgg` (:mod:`data_prep.sources.sgg_h5`),
  both taking one :class:`PrepareOptions` (:mod:`data_prep.facts.options`) and returning a
  :class:`PrepareReport` (:mod:`data_prep.facts.pipeline`);
* :func:`prepare_lll` (:mod:`data_prep.sources.lll_benchmark`: the lifelong-fact-learning benchmark's split files);
* :func:`random_split`, :func:`semantic_split`, :func:`task_statistics` (:mod:`data_prep.facts.splits`).

Where each step lives, for the fact file: a source reader (``sources.visual_genome``,
``sources.sgg_h5``, ``sources.lll_benchmark``; JSON streamed by ``sources.json_stream``) fills a
``facts.collector.FactCollector``; ``facts.pipeline.finish_prepare`` checks the images and crops the
regions (``facts.regions``), splits train/test and tasks (``facts.splits``) and writes the file
(``facts.fact_file``, atomically via ``atomic``); ``open_facts`` checks what it reads
(``facts.checks``). Every image file any command reads is opened by ``image_decode`` (the pixel
limit from the header, every mode to 8-bit by scaling); JSON is streamed under a nesting-depth
limit (``sources.json_stream``). Images: ``image_sets.prepare.prepare_image_dataset`` reads a
source (``image_sets.sources``, ``image_sets.idx``) and writes ``image_sets.image_file``. The
synthetic world: ``worlds.synthetic`` writes the dump of the scenes ``worlds.scenes`` renders; the
real-image world: ``worlds.real`` plans and draws scenes of the real object images
``worlds.real_sources`` loads, written by the same writer. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_facts": "data_prep.facts.fact_file",
    "write_fact_file": "data_prep.facts.fact_file",
    "FactFile": "data_prep.facts.fact_file",
    "FORMAT_VERSION": "data_prep.facts.fact_file",
    "prepare_visual_genome": "data_prep.sources.visual_genome",
    "PrepareReport": "data_prep.facts.pipeline",
    "PrepareOptions": "data_prep.facts.options",
    "prepare_sgg": "data_prep.sources.sgg_h5",
    "prepare_lll": "data_prep.sources.lll_benchmark",
    "random_split": "data_prep.facts.splits",
    "semantic_split": "data_prep.facts.splits",
    "task_statistics": "data_prep.facts.splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
