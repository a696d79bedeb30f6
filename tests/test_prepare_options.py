"""PrepareOptions: the one validated set of options of `prepare vg` / `prepare sgg` (data_prep.facts.options)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.facts.options import DEFAULT_MIN_FACT_COUNT, PrepareOptions
from data_prep.sources.sgg_h5 import prepare_sgg
from data_prep.facts.splits import TEST_FRACTION
from data_prep.sources.visual_genome import prepare_visual_genome


def _embed(facts: list) -> np.ndarray:
    return np.ones((len(facts), 6), dtype=np.float32)


def test_defaults_are_valid_and_documented() -> None:
    options = PrepareOptions()
    assert (options.num_tasks, options.split, options.min_fact_count, options.orders, options.image_size,
            options.seed, options.test_fraction) == (4, "random", DEFAULT_MIN_FACT_COUNT, (1, 2, 3), 64, 0, TEST_FRACTION)
    assert options.text_encoder is None and options.no_images is False and options.command_line is None


def test_values_are_normalised() -> None:
    options = PrepareOptions(orders=[3, 1, 3], command_line=["mas-triplets", "prepare", "vg"])
    assert options.orders == (1, 3)
    assert options.command_line == "mas-triplets prepare vg"
    assert PrepareOptions(split="semantic", text_encoder=_embed).split == "semantic"
    assert PrepareOptions(num_tasks=np.int64(3)).num_tasks == 3
    assert PrepareOptions(test_fraction=0).test_fraction == 0


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_tasks": 0}, "--tasks must be at least 1, got 0"),
    ({"num_tasks": 2.5}, "num_tasks must be an integer, got 2.5"),
    ({"num_tasks": True}, "num_tasks must be an integer, got True"),
    ({"min_fact_count": 0}, "--min-fact-count must be at least 1, got 0"),
    ({"image_size": -8}, "--image-size must be at least 1, got -8"),
    ({"seed": "0"}, "seed must be an integer, got '0'"),
    ({"split": "kmeans"}, "unknown split 'kmeans'; use one of random, semantic"),
    ({"split": "semantic"}, "the semantic split needs fact embeddings from a text encoder"),
    ({"orders": (4,)}, "--orders must list some of 1, 2, 3; got 4"),
    ({"orders": ()}, "--orders must list some of 1, 2, 3; got nothing"),
    ({"orders": ("s",)}, "--orders must list some of 1, 2, 3; got ('s',)"),
    ({"test_fraction": 1.0}, "test_fraction must lie in [0, 1), got 1.0"),
    ({"test_fraction": -0.1}, "test_fraction must lie in [0, 1), got -0.1"),
    ({"text_encoder": "minilm"}, "text_encoder must be a function of the facts, got 'minilm'"),
])
def test_bad_values_raise_one_clear_line(fields: dict, message: str) -> None:
    with pytest.raises(DataPrepError) as caught:
        PrepareOptions(**fields)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PrepareOptions().num_tasks = 2  # type: ignore[misc]


def test_build_replaces_named_fields_and_revalidates() -> None:
    base = PrepareOptions(num_tasks=2, seed=7)
    built = PrepareOptions.build(base, {"image_size": 8})
    assert (built.num_tasks, built.seed, built.image_size) == (2, 7, 8)
    assert base.image_size == 64  # the original is untouched
    assert PrepareOptions.build(None, {}) == PrepareOptions()
    with pytest.raises(DataPrepError, match="--tasks must be at least 1"):
        PrepareOptions.build(base, {"num_tasks": 0})
    with pytest.raises(DataPrepError, match="unknown prepare option 'num_task'; the options are num_tasks, split"):
        PrepareOptions.build(base, {"num_task": 2})


def test_readers_check_options_before_reading_any_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(DataPrepError, match="--min-fact-count must be at least 1, got 0"):
        prepare_visual_genome(missing, tmp_path / "f.h5", min_fact_count=0)
    with pytest.raises(DataPrepError, match="unknown prepare option 'tasks'"):
        prepare_visual_genome(missing, tmp_path / "f.h5", PrepareOptions(), tasks=2)
    with pytest.raises(DataPrepError, match="unknown split 'semantik'"):
        prepare_sgg(missing / "a.h5", missing / "d.json", missing / "i.json", None, tmp_path / "f.h5", split="semantik")
    assert not (tmp_path / "f.h5").exists()
