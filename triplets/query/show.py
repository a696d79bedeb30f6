"""Pictures of query answers (``mas-triplets query ... --show FILE.png``, ``scripts/query.py --show``).

* **text query** (text → test images): a contact sheet of the top-k retrieved regions,
  ``SHEET_COLUMNS`` per row, each panel the region in its image (``CONTEXT`` x the box's larger
  side of context around it, when the source image is still where the fact file was prepared
  from; else the stored region crop) with the box drawn, and under it the rank, the score
  (cosine) and the region's true fact, in green when it is the query's fact.
* **image query** (an image region → facts; also a stored test region, ``{"sample": i}``): the
  image with its box drawn (the whole image when no box was given) beside the list of the
  top-k facts and their scores.

The picture's size is fixed by the number of panels (:func:`sheet_size_pixels`,
``IMAGE_QUERY_SIZE_IN`` x ``DPI``). Whatever ``k``, at most ``MAX_PANELS`` regions (a 10 x 5 sheet,
about 1000 x 2650 pixels) and ``MAX_FACT_LINES`` facts are drawn: the first ones, and the title
says how many were left out. Plots use matplotlib's Agg canvas directly
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``, imported on first use), so no global
backend is set; the PNG is rendered in memory and written atomically.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mas_core.checkpoint import atomic_write_bytes

from ..errors import TripletsError
from .engine import fact_text, load_image

SHEET_COLUMNS = 5
PANEL_SIZE_IN = (2.0, 2.6)          # width, height of one contact-sheet panel, inches
SHEET_TITLE_IN = 0.45               # height of the sheet's title band, inches
IMAGE_QUERY_SIZE_IN = (9.0, 4.5)    # the image-query picture, inches
DPI = 100
CONTEXT = 0.5                       # context around a region: this fraction of its larger side, each way
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "images", ".")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PANELS = 50                     # regions drawn on a contact sheet at most, whatever k
MAX_FACT_LINES = 40                 # facts listed beside an image query at most
BOX_COLOUR = "#e3120b"
MATCH_COLOUR = "#1a7f37"


def check_show_path(path: str | Path, *, writable: bool = False) -> Path:
    """``path`` as a Path when a PNG can be written there: it ends in ``.png``, is not a folder and
    its folder exists (with ``writable``: and a file can be created in it, tried with a hidden
    temporary file); else :class:`TripletsError` with a one-line reason."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TripletsError(f"--show writes a PNG picture; give a file name ending in .png, not {str(path)[:200]!r}")
    if path.is_dir():
        raise TripletsError(f"--show {path} is a folder; give a file name ending in .png")
    if not path.parent.is_dir():
        raise TripletsError(f"--show: the folder {path.parent} does not exist; create it or choose another path")
    if writable:
        try:
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise TripletsError(f"--show {path}: cannot write into {path.parent} ({exc.strerror or exc}); choose a "
                                "folder you can write to (nothing was queried)") from None
        os.close(handle)
        os.unlink(name)
    return path


def sheet_size_pixels(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of ``panels`` panels (at least one row)."""
    columns = max(1, min(panels, SHEET_COLUMNS))
    rows = max(1, math.ceil(panels / SHEET_COLUMNS))
    return (round(columns * PANEL_SIZE_IN[0] * DPI), round((rows * PANEL_SIZE_IN[1] + SHEET_TITLE_IN) * DPI))


def source_image_path(fact_file: Any, image_id: int) -> Path | None:
    """The image file ``image_id`` in the folder the fact file was prepared from (its provenance's
    source files), or None when it is not there any more."""
    provenance = getattr(fact_file, "provenance", None) or {}
    roots = []
    for entry in (provenance.get("source_files") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            root = Path(entry["path"]).parent
            if root not in roots:
                roots.append(root)
    for root in roots:
        for folder in IMAGE_FOLDERS:
            for suffix in IMAGE_SUFFIXES:
                candidate = root / folder / f"{int(image_id)}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def region_view(fact_file: Any, sample: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The picture of a stored region and its box in that picture's pixels ``(x, y, w, h)``: the
    region with ``CONTEXT`` around it cut from its source image when that is found (and decodes),
    else the stored crop (uint8 [S, S, 3]) with the box its whole frame."""
    sample = int(sample)
    path = source_image_path(fact_file, int(fact_file.sample_image_id[sample]))
    if path is not None:
        try:
            image = load_image(path)
        except TripletsError:
            image = None
        if image is not None:
            x, y, w, h = (float(v) for v in fact_file.sample_box[sample])
            margin = max(4.0, CONTEXT * max(w, h))
            left, top = max(0, math.floor(x - margin)), max(0, math.floor(y - margin))
            right, bottom = min(image.width, math.ceil(x + w + margin)), min(image.height, math.ceil(y + h + margin))
            if right > left and bottom > top:
                pixels = np.asarray(image.crop((left, top, right, bottom)), dtype=np.uint8)
                return pixels, (x - left, y - top, w, h)
    pixels = np.asarray(fact_file.pixels([sample])[0], dtype=np.uint8)
    return pixels, (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0]))


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy, first use only
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # no tight bbox: the size is the figure's
    return buffer.getvalue()


def _show_region(axes: Any, pixels: np.ndarray, box: Sequence[float]) -> None:
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    axes.imshow(pixels, interpolation="nearest")
    x, y, w, h = box
    # pixel centres are at integers: the box's edges lie half a pixel before its first pixel
    axes.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=BOX_COLOUR, linewidth=1.6))
    axes.set_xlim(-0.5, pixels.shape[1] - 0.5)
    axes.set_ylim(pixels.shape[0] - 0.5, -0.5)
    axes.set_axis_off()


def contact_sheet_png(title: str, panels: Sequence[tuple[np.ndarray, Sequence[float], str, bool]]) -> bytes:
    """A contact sheet: each panel ``(pixels, box, caption, matches)`` is a region picture with its
    box drawn and the caption under it (green when ``matches``); size :func:`sheet_size_pixels`."""
    width_px, height_px = sheet_size_pixels(len(panels))
    figure = _figure(width_px / DPI, height_px / DPI)
    figure.text(0.5, 1.0 - 0.5 * SHEET_TITLE_IN * DPI / height_px, title, ha="center", va="center", fontsize=10)
    panel_w = PANEL_SIZE_IN[0] * DPI / width_px
    panel_h = PANEL_SIZE_IN[1] * DPI / height_px
    top = 1.0 - SHEET_TITLE_IN * DPI / height_px
    for position, (pixels, box, caption, matches) in enumerate(panels):
        row, column = divmod(position, SHEET_COLUMNS)
        left, bottom = column * panel_w, top - (row + 1) * panel_h
        axes = figure.add_axes((left + 0.06 * panel_w, bottom + 0.30 * panel_h, 0.88 * panel_w, 0.66 * panel_h))
        _show_region(axes, pixels, box)
        figure.text(left + 0.5 * panel_w, bottom + 0.27 * panel_h, caption, ha="center", va="top", fontsize=7,
                    color=MATCH_COLOUR if matches else "black", linespacing=1.25)
    if not panels:
        figure.text(0.5, 0.5 * top, "no test region retrieved", ha="center", va="center", fontsize=9)
    return _png(figure)


def image_facts_png(title: str, pixels: np.ndarray, box: Sequence[float], fact_lines: Sequence[str]) -> bytes:
    """The image with its box drawn, beside the list ``fact_lines``; size ``IMAGE_QUERY_SIZE_IN`` x ``DPI``."""
    figure = _figure(*IMAGE_QUERY_SIZE_IN)
    figure.text(0.5, 0.96, title, ha="center", va="center", fontsize=10)
    _show_region(figure.add_axes((0.03, 0.05, 0.44, 0.84)), pixels, box)
    listing = "\n".join(fact_lines) if fact_lines else "no fact retrieved"
    figure.text(0.52, 0.89, listing, ha="left", va="top", fontsize=8.5, family="monospace", linespacing=1.5)
    return _png(figure)


def _caption(rank: int, hit: dict[str, Any]) -> str:
    return f"{rank}. score {hit['score']:.3f}\n" + textwrap.fill(hit["fact_text"], 30)


def write_query_picture(path: str | Path, engine: Any, query: dict[str, Any], *, facts: Sequence[dict[str, Any]],
                        images: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write the picture of a query's answer to ``path`` (PNG, atomically) and return it.

    ``query``: ``{"text": ...}`` (then ``images``, the hits of ``engine.text_to_images``, make the
    contact sheet), ``{"image": path or PIL image or array, "box": (x, y, w, h) or None}`` or
    ``{"sample": i}`` (a stored region); ``facts``: the hits of the engine's fact search.
    Raises :class:`TripletsError` for an unusable ``path``.
    """
    path = check_show_path(path)
    method = getattr(engine, "method", "?")
    if "text" in query:
        wanted = engine.parse(query["text"])
        panels = []
        shown = list(images or [])[:MAX_PANELS]
        for rank, hit in enumerate(shown, start=1):
            pixels, box = region_view(engine.fact_file, hit["sample"])
            panels.append((pixels, box, _caption(rank, hit), tuple(hit["fact"]) == tuple(wanted)))
        left_out = len(images or []) - len(shown)
        data = contact_sheet_png(f"test regions nearest to {fact_text(wanted)}  (query {query['text']!r}, "
                                 f"method {method})" + (f"; the first {len(shown)} of {len(shown) + left_out}"
                                                        if left_out else ""), panels)
    else:
        if "sample" in query:
            pixels, box = region_view(engine.fact_file, int(query["sample"]))
            true_fact = engine.facts[int(engine.fact_file.sample_fact[int(query["sample"])])]
            title = f"test region {int(query['sample'])}, true fact {fact_text(true_fact)} (method {method})"
        else:
            image = load_image(query["image"])
            pixels = np.asarray(image, dtype=np.uint8)
            box = tuple(query["box"]) if query.get("box") else (0.0, 0.0, float(image.width), float(image.height))
            name = Path(query["image"]).name if isinstance(query["image"], (str, Path)) else "image"
            title = f"facts nearest to {name}, box {', '.join(f'{v:g}' for v in box)} (method {method})"
        lines = [f"{rank:>2}. {hit['score']:.3f}  {hit['fact_text']}"
                 for rank, hit in enumerate(list(facts)[:MAX_FACT_LINES], start=1)]
        if len(facts) > MAX_FACT_LINES:
            lines.append(f"… and {len(facts) - MAX_FACT_LINES} more (not drawn)")
        data = image_facts_png(title, pixels, box, lines)
    atomic_write_bytes(path, data)
    return path
