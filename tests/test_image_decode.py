"""data_prep.image_decode: every Pillow mode to 8-bit by scaling (one test per mode, pixel values
asserted), the pixel limit from the header, and one full-size decode per image in prepare vg."""
from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_visual_genome import write_vg_fixture  # noqa: E402

from data_prep import image_decode  # noqa: E402
from data_prep.facts import regions as region_images
from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.image_decode import ALPHA_BACKGROUND, ImageTooLargeError, check_image, decode_rgb, to_rgb8  # noqa: E402
from data_prep.sources.visual_genome import prepare_visual_genome  # noqa: E402

WHITE = ALPHA_BACKGROUND


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode in ("RGB", "L")
    return np.asarray(image)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte: grey for [H, W], RGB for [H, W, 3] (Pillow cannot write 16-bit RGB)."""
    colour_type = 0 if values.ndim == 2 else 2
    height, width = values.shape[:2]
    rows = values.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
                     + _png_chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------- one test per mode
def test_mode_1_gives_0_and_255() -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    assert _pixels(to_rgb8(image)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_mode_L_kept_and_grey_kept_as_L() -> None:
    image = Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.uint8), mode="L")
    assert _pixels(to_rgb8(image))[0, :, 0].tolist() == [0, 7, 200, 255]
    assert to_rgb8(image, keep_grayscale=True).mode == "L"


def test_mode_P_palette_expanded_and_transparency_composited(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1), 0)
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9))
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    image.info["transparency"] = 2
    image.save(tmp_path / "p.png", transparency=2)
    decoded = _pixels(decode_rgb(tmp_path / "p.png", 10_000))
    assert decoded.tolist() == [[[10, 20, 30], [200, 100, 50], list(WHITE)]]


def test_mode_LA_and_La_composited_over_white() -> None:
    image = Image.fromarray(np.array([[[100, 255], [100, 0], [100, 128]]], dtype=np.uint8), mode="LA")
    grey = _pixels(to_rgb8(image, keep_grayscale=True))[0].tolist()
    assert grey[:2] == [100, 255] and abs(grey[2] - (100 * 128 + 255 * 127) / 255) <= 1
    assert _pixels(to_rgb8(image))[0, 0].tolist() == [100, 100, 100]
    premultiplied = Image.frombytes("La", (2, 1), bytes([100, 255, 50, 128]))  # 50 = 100 * 128 / 255, premultiplied
    assert _pixels(to_rgb8(premultiplied, keep_grayscale=True))[0].tolist() == [100, round(50 + 255 * 127 / 255)]


def test_mode_PA_composited() -> None:
    image = Image.new("PA", (2, 1))
    image.putpalette([90, 60, 30] + [0] * 765)
    image.putpixel((0, 0), (0, 255))
    image.putpixel((1, 0), (0, 0))
    assert _pixels(to_rgb8(image)).tolist() == [[[90, 60, 30], list(WHITE)]]


def test_mode_RGB_unchanged_and_RGBX() -> None:
    values = np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8)
    assert _pixels(to_rgb8(Image.fromarray(values, mode="RGB"))).tolist() == values.tolist()
    assert _pixels(to_rgb8(Image.fromarray(values, mode="RGB").convert("RGBX"))).tolist() == values.tolist()


def test_mode_RGBA_and_RGBa_composited(tmp_path: Path) -> None:
    values = np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [0, 0, 200, 51]]], dtype=np.uint8)
    Image.fromarray(values, mode="RGBA").save(tmp_path / "rgba.png")
    decoded = _pixels(decode_rgb(tmp_path / "rgba.png", 10_000)).astype(int)
    assert decoded[0, 0].tolist() == [200, 0, 0] and decoded[0, 1].tolist() == list(WHITE)
    expected = np.rint(np.array([0, 0, 200]) * 0.2 + np.array(WHITE) * 0.8)
    assert np.abs(decoded[0, 2] - expected).max() <= 1
    premultiplied = Image.frombytes("RGBa", (2, 1), bytes([200, 0, 0, 255, 0, 0, 40, 51]))
    assert _pixels(to_rgb8(premultiplied)).tolist() == [[[200, 0, 0], [204, 204, 244]]]


def test_mode_CMYK(tmp_path: Path) -> None:
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    image.save(tmp_path / "cmyk.jpg", quality=100)
    assert _pixels(to_rgb8(image)).tolist() == [[[255, 255, 255], [0, 255, 255]]]
    decoded = _pixels(decode_rgb(tmp_path / "cmyk.jpg", 10_000)).astype(int)
    assert decoded.shape == (1, 2, 3) and decoded[0, 0].min() > 200


def test_mode_YCbCr() -> None:
    image = Image.new("YCbCr", (2, 1), (255, 128, 128))
    image.putpixel((1, 0), (0, 128, 128))
    decoded = _pixels(to_rgb8(image)).astype(int)
    assert decoded[0, 0].min() >= 253 and decoded[0, 1].max() <= 2


def test_16_bit_grey_png_gives_a_gradient_not_white(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode in ("I;16", "I")  # what Pillow opens a 16-bit grey PNG as
    decoded = _pixels(decode_rgb(tmp_path / "grey16.png", 10_000))
    expected = (gradient.astype(np.uint32) + 128) // 257
    np.testing.assert_array_equal(decoded[..., 0], expected)
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])
    assert decoded.min() == 0 and decoded.max() == 255 and (np.diff(decoded[0, :, 0].astype(int)) >= 0).all()
    assert len(np.unique(decoded)) > 200  # a gradient, not all white


def test_16_bit_byte_orders_I16_I16B() -> None:
    values = np.array([[0, 257 * 7, 32768, 65535]], dtype=np.uint16)
    little = Image.frombytes("I;16", (4, 1), values.astype("<u2").tobytes())
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    for image in (little, big):
        assert _pixels(to_rgb8(image, keep_grayscale=True))[0].tolist() == [0, 7, 128, 255]


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path: Path) -> None:
    values = np.array([[[65535, 0, 257 * 100], [256 * 12 + 255, 40000, 65280]]], dtype=np.uint16)
    decoded = _pixels(decode_rgb(write_png16(tmp_path / "rgb16.png", values), 10_000))
    np.testing.assert_array_equal(decoded, values >> 8)


def test_mode_I_scaled_by_declared_depth() -> None:
    sixteen = Image.fromarray(np.array([[0, 257 * 9, 65535]], dtype=np.int32), mode="I")
    assert _pixels(to_rgb8(sixteen, keep_grayscale=True))[0].tolist() == [0, 9, 255]
    thirty_two = Image.fromarray(np.array([[0, 70000, 2**31 - 1]], dtype=np.int32), mode="I")
    assert _pixels(to_rgb8(thirty_two, keep_grayscale=True))[0].tolist() == [0, 0, 127]  # 127.49999...
    negative = Image.fromarray(np.array([[-1, 5]], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match="negative"):
        to_rgb8(negative)


def test_mode_I_tiff_bits_per_sample(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    decoded = _pixels(decode_rgb(tmp_path / "i32.tif", 10_000, keep_grayscale=True))[0].tolist()
    assert decoded == [0, 64, 127]  # 32 declared bits: v * 255 / (2^32 - 1)


def test_mode_F_unit_range_and_min_max_rule(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert _pixels(to_rgb8(unit, keep_grayscale=True))[0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32), mode="F")
    wide.save(tmp_path / "f.tif")
    assert _pixels(decode_rgb(tmp_path / "f.tif", 10_000, keep_grayscale=True))[0].tolist() == [0, 64, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_rgb8(Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32), mode="F"))


def test_unsupported_mode_is_a_decode_error() -> None:
    with pytest.raises(ValueError, match="unsupported image mode LAB"):
        to_rgb8(Image.new("LAB", (1, 1)))


# ---------------------------------------------------------------------------- the pixel limit
def test_limit_from_the_header_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000), 0).save(bomb)  # 144 Mpx declared, a few KB on disk
    assert bomb.stat().st_size < 100_000
    loads: list[object] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self))
    for reader in (check_image, decode_rgb):
        with pytest.raises(ImageTooLargeError) as caught:
            reader(bomb, 100_000_000)
        message = str(caught.value)
        assert "12000 x 12000" in message and "144,000,000" in message and str(bomb) in message
        assert "\n" not in message
    assert loads == []  # refused from the header: nothing decoded
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own limit restored


def test_limit_is_configurable_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(path)
    assert check_image(path, 5000) == (100, 50)
    with pytest.raises(ImageTooLargeError):
        check_image(path, 4999)
    with pytest.raises(DataPrepError, match="positive integer"):
        image_decode.check_max_pixels(0)


def test_check_image_catches_truncation_without_full_decode(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(good)
    assert check_image(good, 10_000) == (80, 64)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(image_decode.DECODE_ERRORS):
        check_image(tmp_path / "cut.jpg", 10_000)
    Image.new("RGB", (30, 20)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:-20])
    with pytest.raises(image_decode.DECODE_ERRORS):
        check_image(tmp_path / "cut.png", 10_000)


def test_prepare_vg_decodes_each_image_once_at_full_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    decoded: list[str] = []
    original = region_images.decode_rgb

    def counting(path: Path, max_pixels: int, **options: object) -> Image.Image:
        decoded.append(Path(path).name)
        return original(path, max_pixels, **options)

    monkeypatch.setattr(region_images, "decode_rgb", counting)
    report = prepare_visual_genome(root, tmp_path / "f.h5", num_tasks=2, min_fact_count=1, progress=False,
                                   image_size=8)
    assert sorted(decoded) == ["1.jpg", "2.jpg"]  # the two good images, once each
    assert report.kept["images"] == 2


def test_prepare_vg_crops_of_a_16_bit_png_are_a_gradient(tmp_path: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "VG_100K" / "1.jpg").unlink()
    gradient = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (30, 1))  # 40 x 30, as listed
    Image.fromarray(gradient).save(root / "VG_100K" / "1.png")
    prepare_visual_genome(root, tmp_path / "f.h5", num_tasks=2, min_fact_count=1, progress=False, image_size=8)
    from data_prep import open_facts

    with open_facts(tmp_path / "f.h5") as facts:
        rows = np.flatnonzero(facts.sample_image_id == 1)
        pixels = facts.pixels(rows)
        boxes = facts.sample_box[rows]
    assert len(rows) and pixels.max() < 255  # not the all-white crops of a clipping conversion
    for crop, (x, _y, w, _h) in zip(pixels, boxes):
        expected = (x + w / 2) / 40 * 255  # the gradient's value at the box centre
        assert abs(float(crop[..., 0].mean()) - expected) < 20
        assert (np.diff(crop[4, :, 0].astype(int)) >= 0).all()
