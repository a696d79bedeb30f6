"""Query images are decoded like prepared images: the pixel limit from the header, every mode scaled to 8-bit RGB."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from triplets.errors import TripletsError
from triplets.query.engine import load_image


def test_a_16_bit_grey_png_gives_a_gradient_not_white(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)  # 0 .. 65535
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.tile(ramp, (4, 1))).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
    assert np.array_equal(rgb[0, :, 0], np.arange(256, dtype=np.uint8))  # 65535 / 257 = 255, scaled, not clipped
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_a_palette_image_with_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red stays red; the transparent rest becomes white
    Image.fromarray(pixels, mode="RGBA").save(path)
    rgb = np.asarray(load_image(path))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[1, 1]) == (255, 255, 255)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(TripletsError, match="120,000 pixels") as caught:
        load_image(path, max_pixels=100_000)
    assert "\n" not in str(caught.value)
    assert np.asarray(load_image(path, max_pixels=120_000)).shape == (300, 400, 3)
