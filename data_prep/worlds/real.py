"""The real-image world (``mas-triplets synth --world real``): scenes whose objects are real images
(Fashion-MNIST clothing, handwritten digits, letters rendered from fonts; see
:mod:`data_prep.worlds.real_sources`), written in the real Visual Genome file format by the dump
writer of :mod:`data_prep.worlds.synthetic` (same files, same planted quirks), plus ``instances.json``:
for each object, the source image its pixels come from and how it was drawn.

The world
---------
* **Objects**: a category drawn with Zipf weights ``w_r = 1 / r**ZIPF_CATEGORIES`` by its rank
  (the sources interleaved); the k-th instance of a category in the world uses image
  ``perm_c[k mod n_c]`` of the category's pool of ``n_c`` real images (``perm_c`` a seeded
  permutation), so no image repeats before the pool is used up.
* **Drawing**: the source image is resized to the object's square box (``size`` pixels, bilinear),
  rotated by its orientation angle (bilinear, black fill), and its intensity ``a = pixel / 255``
  is the alpha of the colour tint over what lies below: ``out = below * (1 - a) + tint * a``.
  The subject of ``in front of`` is opaque: its box is first filled with the background colour.
* **Attributes** (the <S,A> facts), all visible inside the object's box: its colour tint
  (``COLOURS``, Zipf, always), its orientation unless upright (``tilted`` 15-30 degrees either
  way, ``sideways`` 90, ``upside down`` 180), its size when extreme (``small``: side
  <= ``SMALL_FRACTION`` x image height; ``large``: side >= ``LARGE_FRACTION`` x image height).
* **Predicates** (Zipf over ``PREDICATES``), each a visible layout of S and O in their union box:
  ``left of``/``right of`` (side by side with a gap), ``above``/``below`` (stacked with a gap),
  ``near`` (side by side, touching), ``on top of`` (S resting on a wider O), ``bigger than`` /
  ``smaller than`` (size ratio >= 1.8 side by side), ``in front of`` (S overlapping a corner of
  a larger O, hiding it). Which object is the subject is decidable from the pixels: by its role
  (on top, in front) or, for the symmetric layouts, by the rank convention of
  :mod:`data_prep.worlds.scenes` (the subject is the category of lower rank: strictly for the
  directional and comparative predicates, so that "a left of b" and "b right of a" never both
  occur, and "a bigger than b" and "b smaller than a" neither).
* **Images**: ``width // CELL_WIDTH`` side-by-side cells, each a relationship pair
  (probability ``PAIR_CELL_PROBABILITY``) or a lone object, on a random light background.

Facts of the three orders, as :mod:`data_prep.facts.fact_file` defines them: <S> one per object,
<S,A> one per (object, attribute), <S,P,O> one per relationship. Their frequencies are long
tailed (products of Zipf draws). Everything but the images themselves is decided by
:class:`WorldPlanner` from ``random.Random(seed * 1_000_003 + image_id)`` and the per-category
instance counters, so :func:`plan_fact_counts` counts a world's facts without drawing a pixel,
and ``--images N`` writes exactly the first N images of the larger world of the same seed.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ..facts.fact_file import Fact
from ..image_sets.idx import FASHION_MNIST_DIR
from .real_sources import CategoryPool, load_category_pools, parse_sources, ranked_categories
from .synthetic import Scene, SynthReport, WorldNaming, WorldSpec, write_world_dump
from .scenes import layout_pair

__all__ = ["COLOURS", "PREDICATES", "RealObject", "WorldPlanner", "draw_instance", "generate_real_world",
           "plan_fact_counts"]

DEFAULT_NUM_IMAGES = 20_000
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "blue": (30, 70, 200), "green": (30, 140, 40), "black": (25, 25, 25),
    "orange": (235, 110, 0), "purple": (130, 50, 170), "brown": (120, 70, 30), "pink": (225, 60, 150),
}
#: (attribute or None for upright, probability, angle range in degrees, counter-clockwise)
ORIENTATIONS: tuple[tuple[str | None, float], ...] = (
    (None, 0.70), ("tilted", 0.14), ("sideways", 0.10), ("upside down", 0.06),
)
PREDICATES: tuple[str, ...] = (
    "left of", "on top of", "near", "above", "bigger than", "right of", "below", "smaller than", "in front of",
)
PREDICATE_SYNSETS = {
    "left of": "left.r.01", "on top of": "on_top_of.r.01", "near": "near.r.01", "above": "above.r.01",
    "bigger than": "big.a.01", "right of": "right.r.04", "below": "below.r.01", "smaller than": "small.a.01",
    "in front of": "in_front.r.01",
}
#: predicates whose subject is the category of strictly lower rank (the two categories differ)
RANK_ORDERED_PREDICATES = frozenset({"left of", "right of", "above", "below", "bigger than", "smaller than"})
#: layouts of :func:`data_prep.worlds.scenes.layout_pair` this world's predicates reuse
SHARED_LAYOUTS = {"left of": "left of", "right of": "right of", "above": "above", "below": "below",
                  "near": "next to", "on top of": "on", "bigger than": "bigger than"}
OBJECT_ALIASES = (("sneaker", "trainer"), ("zero", "nought"))
RELATIONSHIP_ALIASES = (("near", "close to"),)
ZIPF_CATEGORIES = 1.0
ZIPF_COLOURS = 1.0
ZIPF_PREDICATES = 1.0
PAIR_CELL_PROBABILITY = 0.8
CELL_WIDTH = 80
SMALL_FRACTION = 0.2
LARGE_FRACTION = 0.42
TILT_DEGREES = (15.0, 30.0)


def _zipf(count: int, exponent: float) -> list[float]:
    return [1.0 / rank ** exponent for rank in range(1, count + 1)]


def _accented(name: str) -> str:
    """``name`` with its first vowel accented (a quirk the reader's accent folding undoes)."""
    for position, char in enumerate(name):
        if char in "aeiou":
            return name[:position] + "áéíóú"["aeiou".index(char)] + name[position + 1:]
    return name


@dataclass
class RealObject:
    """One object instance: its category, the ``ordinal``-th instance of it in the world, its
    square box (``x``, ``y`` top-left, side ``size``, pixels), colour tint, orientation
    (attribute or None, and the rotation ``angle`` in degrees counter-clockwise) and whether it
    hides what lies below (``opaque``)."""

    category: str
    ordinal: int
    x: int
    y: int
    size: int
    colour: str
    orientation: str | None
    angle: float
    size_word: str | None
    opaque: bool = False

    @property
    def attributes(self) -> list[str]:
        """The <S,A> attributes: the colour, then the orientation and the size word when present."""
        return [self.colour] + [word for word in (self.orientation, self.size_word) if word is not None]


class WorldPlanner:
    """Decides every image of the world but its pixels; :meth:`plan` must be called for image ids
    1, 2, ... in order (the per-category instance counters run across images)."""

    def __init__(self, categories: Sequence[str], seed: int, width: int, height: int) -> None:
        self.categories = list(categories)
        self.rank = {name: rank for rank, name in enumerate(self.categories)}
        self.seed, self.width, self.height = seed, width, height
        self.category_weights = _zipf(len(self.categories), ZIPF_CATEGORIES)
        self.colour_names = list(COLOURS)
        self.colour_weights = _zipf(len(COLOURS), ZIPF_COLOURS)
        self.predicate_weights = _zipf(len(PREDICATES), ZIPF_PREDICATES)
        self.instances: Counter[str] = Counter()
        self.cells = max(2, width // CELL_WIDTH)

    def _category(self, rng: random.Random) -> str:
        return rng.choices(self.categories, self.category_weights)[0]

    def _object(self, rng: random.Random, category: str, x: int, y: int, size: int) -> RealObject:
        colour = rng.choices(self.colour_names, self.colour_weights)[0]
        orientation = rng.choices([o for o, _ in ORIENTATIONS], [p for _, p in ORIENTATIONS])[0]
        angle = 0.0
        if orientation == "sideways":
            angle = rng.choice((90.0, 270.0))
        elif orientation == "upside down":
            angle = 180.0
        elif orientation == "tilted":
            angle = rng.choice((1, -1)) * round(rng.uniform(*TILT_DEGREES), 1)
        size_word = ("small" if size <= SMALL_FRACTION * self.height
                     else "large" if size >= LARGE_FRACTION * self.height else None)
        ordinal = self.instances[category]
        self.instances[category] += 1
        return RealObject(category, ordinal, x, y, size, colour, orientation, angle, size_word)

    def _subject_object(self, rng: random.Random, predicate: str) -> tuple[str, str]:
        first, second = self._category(rng), self._category(rng)
        if predicate in RANK_ORDERED_PREDICATES:
            while second == first:
                second = self._category(rng)
        if (predicate in RANK_ORDERED_PREDICATES or predicate == "near") and self.rank[second] < self.rank[first]:
            first, second = second, first
        return first, second

    def _layout(self, predicate: str, rng: random.Random, cell_w: int) -> tuple[tuple[int, int, int], ...]:
        if predicate in SHARED_LAYOUTS:
            return layout_pair(SHARED_LAYOUTS[predicate], rng, cell_w, self.height)
        if predicate == "smaller than":
            big, small = layout_pair("bigger than", rng, cell_w, self.height)
            return small, big
        # in front of: a smaller S over a corner of O, covering about half of S's side both ways
        unit = min(cell_w, self.height) - 4
        big = rng.randint(max(24, int(unit / 1.3 * 0.75)), int(unit / 1.3))
        small = max(12, round(big * rng.uniform(0.5, 0.6)))
        overlap = round(small * 0.55)
        front = (big - overlap, big - overlap, small)
        back = (0, 0, big)
        if rng.random() < 0.5:  # over the bottom-left corner instead
            front, back = (0, big - overlap, small), (small - overlap, 0, big)
        return front, back

    def plan(self, image_id: int) -> tuple[tuple[int, int, int], list[RealObject], list[tuple[int, int, str]]]:
        """``(background RGB, objects in drawing order, relations (subject, object, predicate))``."""
        rng = random.Random(self.seed * 1_000_003 + image_id)
        background = (rng.randint(215, 245), rng.randint(215, 245), rng.randint(215, 245))
        objects: list[RealObject] = []
        relations: list[tuple[int, int, str]] = []
        cell_w = self.width // self.cells
        for cell in range(self.cells):
            cell_x = cell * cell_w
            if rng.random() < PAIR_CELL_PROBABILITY:
                predicate = rng.choices(PREDICATES, self.predicate_weights)[0]
                subject_category, object_category = self._subject_object(rng, predicate)
                (sx, sy, s_size), (ox, oy, o_size) = self._layout(predicate, rng, cell_w)
                union_w, union_h = max(sx + s_size, ox + o_size), max(sy + s_size, oy + o_size)
                left = cell_x + 2 + rng.randint(0, max(0, cell_w - 4 - union_w))
                top = 2 + rng.randint(0, max(0, self.height - 4 - union_h))
                objects.append(self._object(rng, object_category, left + ox, top + oy, o_size))
                objects.append(self._object(rng, subject_category, left + sx, top + sy, s_size))
                objects[-1].opaque = predicate == "in front of"
                relations.append((len(objects) - 1, len(objects) - 2, predicate))
            else:
                size = rng.randint(16, max(17, min(cell_w, self.height) - 16))
                x = cell_x + 2 + rng.randint(0, cell_w - 4 - size)
                y = 2 + rng.randint(0, self.height - 4 - size)
                objects.append(self._object(rng, self._category(rng), x, y, size))
        return background, objects, relations


def draw_instance(source: np.ndarray, size: int, angle: float) -> np.ndarray:
    """The alpha (float32 [size, size], 0-1) of a source image (uint8 [h, w], ink bright) resized
    to ``size`` x ``size`` (bilinear) and rotated ``angle`` degrees counter-clockwise (bilinear, black fill)."""
    image = Image.fromarray(np.ascontiguousarray(source, dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    if angle:
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(image, dtype=np.float32) / 255.0


class _RealScenes:
    """``scene(image_id)`` and ``instance_record(obj)`` of the world, for the dump writer."""

    def __init__(self, pools: list[CategoryPool], seed: int, width: int, height: int) -> None:
        self.pools = {pool.name: pool for pool in pools}
        self.permutations = {pool.name: np.random.default_rng([seed, 2, rank]).permutation(len(pool.images))
                             for rank, pool in enumerate(pools)}
        self.planner = WorldPlanner([pool.name for pool in pools], seed, width, height)
        self.width, self.height = width, height

    def row(self, obj: RealObject) -> int:
        """The row of ``obj``'s image in its category's pool."""
        permutation = self.permutations[obj.category]
        return int(permutation[obj.ordinal % len(permutation)])

    def scene(self, image_id: int) -> Scene:
        background, objects, relations = self.planner.plan(image_id)
        canvas = np.empty((self.height, self.width, 3), dtype=np.float32)
        canvas[:] = background
        for obj in objects:
            alpha = draw_instance(self.pools[obj.category].images[self.row(obj)], obj.size, obj.angle)[:, :, None]
            region = canvas[obj.y:obj.y + obj.size, obj.x:obj.x + obj.size]
            if obj.opaque:
                region[:] = background
            region[:] = region * (1.0 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * alpha
        pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels), objects, relations

    def instance_record(self, obj: RealObject) -> dict[str, Any]:
        pool = self.pools[obj.category]
        return {"category": obj.category, "source": pool.source,
                "source_index": int(pool.source_index[self.row(obj)]), "pool_row": self.row(obj),
                "colour": obj.colour, "angle": obj.angle, "opaque": obj.opaque}


def _naming(categories: Iterable[tuple[str, str]]) -> WorldNaming:
    categories = list(categories)
    names = {name for name, _ in categories}
    return WorldNaming(
        category_synsets=dict(categories),
        predicate_synsets=PREDICATE_SYNSETS,
        accented_names={name: _accented(name) for name in names},
        object_aliases=tuple(pair for pair in OBJECT_ALIASES if pair[0] in names),
        relationship_aliases=RELATIONSHIP_ALIASES,
    )


def plan_fact_counts(num_images: int, seed: int = 0, sources: str | Sequence[str] = "clothing,digits,letters",
                     image_size: tuple[int, int] = (160, 120), skip_image_ids: Iterable[int] = ()) -> Counter[Fact]:
    """The canonical fact counts of the world's first ``num_images`` images, without drawing them
    (the images in ``skip_image_ids`` planned but not counted). Equal to what
    :func:`generate_real_world` records for the images that exist and decode."""
    width, height = image_size
    planner = WorldPlanner([name for name, _ in ranked_categories(sources)], seed, width, height)
    skipped = set(skip_image_ids)
    counts: Counter[Fact] = Counter()
    for image_id in range(1, num_images + 1):
        _, objects, relations = planner.plan(image_id)
        if image_id in skipped:
            continue
        for obj in objects:
            counts[(obj.category, None, None)] += 1
            for attribute in obj.attributes:
                counts[(obj.category, attribute, None)] += 1
        for subject, obj_index, predicate in relations:
            counts[(objects[subject].category, predicate, objects[obj_index].category)] += 1
    return counts


def generate_real_world(
    out_dir: str | os.PathLike,
    *,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    image_size: tuple[int, int] = (160, 120),
    sources: str | Sequence[str] = "clothing,digits,letters",
    fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR,
    progress: bool = True,
    force: bool = False,
) -> SynthReport:
    """Write the real-image world's first ``num_images`` images as a Visual Genome dump into ``out_dir``.

    ``sources``: the object sources (``clothing``, ``digits``, ``letters``; comma-separated or a
    sequence). Written atomically by :func:`data_prep.worlds.synthetic.write_world_dump`; same ``seed``
    -> identical bytes. Raises :class:`~data_prep.errors.DataPrepError` on bad arguments and
    :class:`~data_prep.errors.MissingDatasetError` (naming the package) when a source is missing.
    """
    chosen = parse_sources(sources)

    def make_world(width: int, height: int) -> WorldSpec:
        pools = load_category_pools(chosen, seed, fashion_mnist_dir=fashion_mnist_dir)
        scenes = _RealScenes(pools, seed, width, height)
        manifest = {"world": "real", "sources": list(chosen),
                    "categories": [[pool.name, pool.source, len(pool.images)] for pool in pools],
                    "predicates": list(PREDICATES), "colours": list(COLOURS)}
        return WorldSpec(width, height, _naming(ranked_categories(chosen)), scenes.scene,
                         instance_record=scenes.instance_record, manifest=manifest)

    return write_world_dump(out_dir, make_world, generator="data_prep.real_world.generate_real_world",
                            num_images=num_images, seed=seed, image_size=image_size, progress=progress, force=force)
