"""The options of a prepare run (:class:`PrepareOptions`), shared by every source reader.

``prepare_visual_genome`` and ``prepare_sgg`` take one :class:`PrepareOptions` (or its
fields as keywords); it is validated when built, so a bad value stops the run before
any file is read, with a one-line :class:`~data_prep.errors.DataPrepError`.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import DataPrepError
from .fact_file import Fact
from ..image_decode import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels, check_stored_image_size
from ..sources.json_stream import DEFAULT_MAX_JSON_DEPTH
from .splits import TEST_FRACTION

#: ``text_encoder(facts) -> float32 [F, 3*d]`` (or a tuple whose first item is that array)
EmbedFn = Callable[[list[Fact]], Any]

SPLITS = ("random", "semantic")
DEFAULT_MIN_FACT_COUNT = 3


@dataclass(frozen=True)
class PrepareOptions:
    """How collected samples become a fact file. Built once, validated in ``__post_init__``."""

    num_tasks: int = 4
    """Number of tasks T the facts are divided into (at least 1; at most the number of facts kept)."""
    split: str = "random"
    """How facts are divided into tasks: ``"random"`` (seeded, round-robin) or ``"semantic"``
    (k-means on the facts' language embeddings; needs ``text_encoder``)."""
    min_fact_count: int = DEFAULT_MIN_FACT_COUNT
    """Facts with fewer training samples than this are dropped (at least 1)."""
    orders: tuple[int, ...] = (1, 2, 3)
    """Fact orders kept: 1 <S>, 2 <S,P>, 3 <S,P,O>; stored sorted and without repeats."""
    image_size: int = 64
    """Side S in pixels of the stored S x S region crops (1 to ``MAX_STORED_IMAGE_SIZE`` = 1024)."""
    seed: int = 0
    """Seed of the train/test split by image and of the task split."""
    text_encoder: EmbedFn | None = None
    """``text_encoder(facts) -> float32 [F, 3*d]``: the facts' language embeddings, stored in the
    file; None stores none (then only the random split is possible)."""
    encoder_name: str | None = None
    """Name of the text encoder, stored beside the embeddings."""
    no_images: bool = False
    """Store facts and boxes only: no images are read, boxes are clipped to image_data's sizes."""
    progress: bool = True
    """Progress bars on an interactive stderr."""
    command_line: str | None = None
    """The command that started the run, for the provenance (a sequence of words is joined by spaces)."""
    test_fraction: float = TEST_FRACTION
    """Fraction of the images, chosen with ``seed``, whose samples go to the test split, in [0, 1)
    (sources without their own train/test split only)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest ``width * height`` an image may declare in its header; a larger one stops the run
    before it is decoded (a decompression bomb), naming the file."""
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    """Deepest nesting of ``[`` / ``{`` a JSON dump may hold (Visual Genome's reach 5); a deeper
    file is refused while it streams, naming the file and the depth."""

    def __post_init__(self) -> None:
        for name in ("num_tasks", "min_fact_count", "image_size", "seed", "max_json_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise DataPrepError(f"{name} must be an integer, got {value!r}")
        if self.split not in SPLITS:
            raise DataPrepError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if self.split == "semantic" and self.text_encoder is None:
            raise DataPrepError("the semantic split needs fact embeddings from a text encoder; drop --no-text "
                                "or use --split random")
        if self.num_tasks < 1:
            raise DataPrepError(f"--tasks must be at least 1, got {self.num_tasks}")
        if self.min_fact_count < 1:
            raise DataPrepError(f"--min-fact-count must be at least 1, got {self.min_fact_count}")
        check_stored_image_size(self.image_size)
        if self.max_json_depth < 2:
            raise DataPrepError(f"max_json_depth must be at least 2, got {self.max_json_depth}")
        check_max_pixels(self.max_image_pixels)
        object.__setattr__(self, "orders", _checked_orders(self.orders))
        if self.text_encoder is not None and not callable(self.text_encoder):
            raise DataPrepError(f"text_encoder must be a function of the facts, got {self.text_encoder!r}")
        if isinstance(self.command_line, (list, tuple)):
            object.__setattr__(self, "command_line", " ".join(self.command_line))
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, numbers.Real) \
                or not 0.0 <= self.test_fraction < 1.0:
            raise DataPrepError(f"test_fraction must lie in [0, 1), got {self.test_fraction!r}")

    @classmethod
    def build(cls, options: PrepareOptions | None = None, overrides: Mapping[str, Any] | None = None) -> PrepareOptions:
        """``options`` (default: all defaults) with the fields named in ``overrides`` replaced, validated.

        An unknown name raises :class:`DataPrepError` listing the valid ones.
        """
        overrides = dict(overrides or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise DataPrepError(f"unknown prepare option {unknown[0]!r}; the options are {', '.join(valid)}")
        return dataclasses.replace(options if options is not None else cls(), **overrides)


def _checked_orders(orders: Sequence[int]) -> tuple[int, ...]:
    """``orders`` sorted without repeats; raises unless it names some of 1, 2, 3."""
    try:
        chosen = tuple(sorted(set(int(order) for order in orders)))
    except (TypeError, ValueError):
        raise DataPrepError(f"--orders must list some of 1, 2, 3; got {orders!r}") from None
    if not chosen or any(order not in (1, 2, 3) for order in chosen):
        listed = ",".join(map(str, orders)) or "nothing"
        raise DataPrepError(f"--orders must list some of 1, 2, 3; got {listed}")
    return chosen
