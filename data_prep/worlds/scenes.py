"""Rendering the scenes of the synthetic world (:mod:`data_prep.worlds.synthetic`): shapes, their
colours and textures, and the pairs of shapes laid out in each predicate's configuration.

The world
---------
* Categories (subjects/objects), Zipf-distributed by rank: ``CATEGORIES``.
* Attributes of an object: its colour (``COLOURS``, Zipf) always, and its texture
  (``striped``/``dotted``) when it is not plain. Both are drawn inside the object's
  box, so an <S,A> fact is visible in the object box alone.
* Predicates (Zipf over ``PREDICATES``), each a distinct, visible geometric
  configuration of the subject S and the object O inside their union box:

  ================  ================================================================
  ``on``            S rests on top of a wider O, touching it (no gap)
  ``left of``       S and O of similar size side by side with a gap, S on the left
  ``next to``       S and O of similar size side by side, touching (no gap)
  ``above``         S and O of similar size stacked with a gap, S on top
  ``inside``        a small S drawn in the centre of a large O
  ``right of``      as ``left of``, S on the right
  ``below``         as ``above``, S at the bottom
  ``bigger than``   a large S and a small O (size ratio >= 1.8) side by side
  ================  ================================================================

  Which of the two shapes is the subject is decidable from the pixels: for ``on``,
  ``inside`` and ``bigger than`` by its role (the top one, the inner one, the big
  one); for the symmetric layouts (``left of``, ``right of``, ``above``, ``below``,
  ``next to``) by the convention that the subject is the category of lower rank in
  ``CATEGORIES`` (strictly lower for the four directional predicates, so that
  "circle left of square" and "square right of circle" never both occur).

Each image is split into two side-by-side cells; each cell holds either one
relationship (a pair of objects) or one lone object, so a relationship's union box
contains nothing but its two objects.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..errors import DataPrepError

CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "blue": (31, 90, 200),
    "green": (44, 160, 44),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (255, 127, 14),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
TEXTURE_PROBABILITIES: tuple[float, ...] = (0.6, 0.25, 0.15)
PREDICATES: tuple[str, ...] = (
    "on", "left of", "next to", "above", "inside", "right of", "below", "bigger than",
)
#: predicates whose subject is identified by the category-rank convention (strictly lower rank)
DIRECTIONAL_PREDICATES = frozenset({"left of", "right of", "above", "below"})

ZIPF_EXPONENT_CATEGORIES = 1.0
ZIPF_EXPONENT_COLOURS = 1.0
ZIPF_EXPONENT_PREDICATES = 1.0
PAIR_CELL_PROBABILITY = 0.8


def _zipf_weights(count: int, exponent: float) -> list[float]:
    """Zipf weights ``w_r = 1 / r**exponent`` for ranks r = 1..count (unnormalised)."""
    return [1.0 / (rank ** exponent) for rank in range(1, count + 1)]



# --------------------------------------------------------------------------- drawing
@dataclass
class Shape:
    category: str
    colour: str
    texture: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.size, self.size)

    @property
    def attributes(self) -> list[str]:
        """The shape's <S,A> attributes: its colour, then its texture unless plain."""
        return [self.colour] if self.texture == "plain" else [self.colour, self.texture]


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, start: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(start + 2 * math.pi * k / sides), cy + radius * math.sin(start + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _shape_mask(category: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` L-mode mask (255 inside the shape) of ``category``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    last = size - 1
    centre = last / 2.0
    if category == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif category == "square":
        inset = max(1, round(size * 0.06))
        draw.rectangle((inset, inset, last - inset, last - inset), fill=255)
    elif category == "triangle":
        draw.polygon([(centre, 0), (last, last), (0, last)], fill=255)
    elif category == "star":
        points = []
        for k in range(10):
            radius = centre if k % 2 == 0 else centre * 0.45
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((centre + radius * math.cos(angle), centre + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif category == "cross":
        arm = max(2, round(size / 3))
        lo = (size - arm) // 2
        draw.rectangle((lo, 0, lo + arm - 1, last), fill=255)
        draw.rectangle((0, lo, last, lo + arm - 1), fill=255)
    elif category == "diamond":
        draw.polygon([(centre, 0), (last, centre), (centre, last), (0, centre)], fill=255)
    elif category == "ring":
        thickness = max(2, round(size * 0.2))
        draw.ellipse((0, 0, last, last), fill=255)
        draw.ellipse((thickness, thickness, last - thickness, last - thickness), fill=0)
    elif category == "hexagon":
        draw.polygon(_regular_polygon(centre, centre, centre, 6, 0.0), fill=255)
    else:  # pragma: no cover - CATEGORIES is closed
        raise DataPrepError(f"unknown synthetic category {category!r}; use one of {', '.join(CATEGORIES)}")
    return mask


def _texture_fill(colour: str, texture: str, size: int) -> Image.Image:
    """The shape's fill: its colour, with light diagonal stripes or light dots when textured."""
    base = COLOURS[colour]
    fill = Image.new("RGB", (size, size), base)
    if texture == "plain":
        return fill
    light = tuple(int(c + (255 - c) * 0.75) for c in base)
    draw = ImageDraw.Draw(fill)
    if texture == "striped":
        for offset in range(-size, size, 6):
            draw.line((offset, size, offset + size, 0), fill=light, width=2)
    elif texture == "dotted":
        for dy in range(2, size, 6):
            for dx in range(2 + (dy // 6 % 2) * 3, size, 6):
                draw.ellipse((dx - 1, dy - 1, dx + 2, dy + 2), fill=light)
    return fill


def _draw_shape(canvas: Image.Image, shape: Shape) -> None:
    mask = _shape_mask(shape.category, shape.size)
    canvas.paste(_texture_fill(shape.colour, shape.texture, shape.size), (shape.x, shape.y), mask)


# --------------------------------------------------------------------------- scene sampling
class SceneSampler:
    """Draws the random choices of the world from one ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.category_weights = _zipf_weights(len(CATEGORIES), ZIPF_EXPONENT_CATEGORIES)
        self.colour_names = list(COLOURS)
        self.colour_weights = _zipf_weights(len(COLOURS), ZIPF_EXPONENT_COLOURS)
        self.predicate_weights = _zipf_weights(len(PREDICATES), ZIPF_EXPONENT_PREDICATES)

    def category(self) -> str:
        return self.rng.choices(CATEGORIES, self.category_weights)[0]

    def colour(self, avoid: str | None = None) -> str:
        while True:
            colour = self.rng.choices(self.colour_names, self.colour_weights)[0]
            if colour != avoid:
                return colour

    def texture(self, size: int) -> str:
        if size < 16:
            return "plain"
        return self.rng.choices(TEXTURES, TEXTURE_PROBABILITIES)[0]

    def predicate(self) -> str:
        return self.rng.choices(PREDICATES, self.predicate_weights)[0]

    def subject_object_categories(self, predicate: str) -> tuple[str, str]:
        """Categories of (S, O) obeying the subject convention of the module docstring."""
        first = self.category()
        second = self.category()
        if predicate in DIRECTIONAL_PREDICATES:
            while second == first:
                second = self.category()
        if predicate in DIRECTIONAL_PREDICATES or predicate == "next to":
            rank = CATEGORIES.index
            if rank(second) < rank(first):
                first, second = second, first
        return first, second

    def shape(self, category: str, size: int, x: int, y: int, avoid_colour: str | None = None) -> Shape:
        return Shape(category, self.colour(avoid_colour), self.texture(size), x, y, size)


def layout_pair(predicate: str, rng: random.Random, cell_w: int, cell_h: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Relative layout ``((sx, sy, s_size), (ox, oy, o_size))`` of S and O for ``predicate``.

    Coordinates are relative to the pair's union box top-left; sizes in pixels. The
    pair must fit in ``cell_w`` x ``cell_h`` minus a 2-pixel margin on each side.
    """
    room_w, room_h = cell_w - 4, cell_h - 4
    unit = min(room_w, room_h)
    if predicate in ("left of", "right of", "next to"):
        gap = 0 if predicate == "next to" else rng.randint(max(5, unit // 10), max(6, unit // 6))
        max_size = (room_w - gap) // 2
        a = rng.randint(max(12, int(max_size * 0.6)), max_size)
        b = max(12, min(max_size, round(a * rng.uniform(0.8, 1.0))))
        left_size, right_size = (a, b) if rng.random() < 0.5 else (b, a)
        height = max(left_size, right_size)
        left = (0, (height - left_size) // 2, left_size)
        right = (left_size + gap, (height - right_size) // 2, right_size)
        if predicate == "right of":
            return right, left
        return (left, right) if rng.random() < 0.5 or predicate == "left of" else (right, left)
    if predicate in ("above", "below"):
        gap = rng.randint(max(5, unit // 10), max(6, unit // 6))
        max_size = min(room_w, (room_h - gap) // 2)
        a = rng.randint(max(12, int(max_size * 0.6)), max_size)
        b = max(12, min(max_size, round(a * rng.uniform(0.8, 1.0))))
        top_size, bottom_size = (a, b) if rng.random() < 0.5 else (b, a)
        width = max(top_size, bottom_size)
        top = ((width - top_size) // 2, 0, top_size)
        bottom = ((width - bottom_size) // 2, top_size + gap, bottom_size)
        return (top, bottom) if predicate == "above" else (bottom, top)
    if predicate == "on":
        max_base = min(room_w, int(room_h * 0.6))
        base = rng.randint(max(18, int(max_base * 0.65)), max_base)
        top_size = rng.randint(max(10, int(base * 0.4)), max(11, int(base * 0.7)))
        top_size = min(top_size, room_h - base)
        width = base
        shift = rng.randint(-(base - top_size) // 4, (base - top_size) // 4)
        top = ((width - top_size) // 2 + shift, 0, top_size)
        bottom = (0, top_size, base)
        return top, bottom
    if predicate == "inside":
        outer = rng.randint(max(30, int(unit * 0.7)), unit)
        inner = max(10, round(outer * rng.uniform(0.32, 0.42)))
        offset = (outer - inner) // 2
        return (offset, offset, inner), (0, 0, outer)
    if predicate == "bigger than":
        gap = rng.randint(max(4, unit // 12), max(5, unit // 7))
        big_max = min(room_h, int((room_w - gap) / 1.45))
        big = rng.randint(max(24, int(big_max * 0.75)), big_max)
        small = max(8, min(round(big * rng.uniform(0.35, 0.5)), room_w - gap - big))
        height = big
        big_shape = (0, 0, big)
        small_shape = (big + gap, (height - small) // 2, small)
        if rng.random() < 0.5:  # small one on the left
            small_shape = (0, (height - small) // 2, small)
            big_shape = (small + gap, 0, big)
        return big_shape, small_shape
    raise DataPrepError(f"unknown synthetic predicate {predicate!r}")  # pragma: no cover


def render_scene(rng: random.Random, sampler: SceneSampler, width: int, height: int) -> tuple[Image.Image, list[Shape], list[tuple[int, int, str]]]:
    """Render one image: two cells, each a relationship pair or a lone object.

    Returns the image, its shapes (drawing order) and the relationships as
    ``(subject_index, object_index, predicate)`` into the shape list.
    """
    background = tuple(rng.randint(215, 245) for _ in range(3))
    canvas = Image.new("RGB", (width, height), background)
    shapes: list[Shape] = []
    relations: list[tuple[int, int, str]] = []
    cell_w = width // 2
    for cell in range(2):
        cell_x = cell * cell_w
        if rng.random() < PAIR_CELL_PROBABILITY:
            predicate = sampler.predicate()
            subject_category, object_category = sampler.subject_object_categories(predicate)
            (sx, sy, s_size), (ox, oy, o_size) = layout_pair(predicate, rng, cell_w, height)
            union_w = max(sx + s_size, ox + o_size)
            union_h = max(sy + s_size, oy + o_size)
            left = cell_x + 2 + rng.randint(0, max(0, cell_w - 4 - union_w))
            top = 2 + rng.randint(0, max(0, height - 4 - union_h))
            obj = sampler.shape(object_category, o_size, left + ox, top + oy)
            avoid = obj.colour if predicate in ("inside", "on") else None
            subj = sampler.shape(subject_category, s_size, left + sx, top + sy, avoid_colour=avoid)
            shapes.extend([obj, subj])  # the object first: an inner subject is drawn on top
            relations.append((len(shapes) - 1, len(shapes) - 2, predicate))
        else:
            size = rng.randint(16, max(17, min(cell_w, height) - 16))
            x = cell_x + 2 + rng.randint(0, cell_w - 4 - size)
            y = 2 + rng.randint(0, height - 4 - size)
            shapes.append(sampler.shape(sampler.category(), size, x, y))
    for shape in shapes:
        _draw_shape(canvas, shape)
    return canvas, shapes, relations
