"""data.images.open_rgb: every Pillow mode to 8-bit RGB with known pixel values, and EXIF orientation.

Each image is built here, saved in a format that keeps its mode, and read back through open_rgb.
"""

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from lora_sd.data.images import image_size, open_rgb
from lora_sd.errors import DataError

WHITE = (255, 255, 255)


def row(im: Image.Image, tmp_path, fmt: str, **save) -> list[tuple]:
    """`im` (one row of pixels) saved as `fmt`, reopened with open_rgb: its pixels as tuples."""
    path = tmp_path / f"image.{fmt.lower()}"
    im.save(path, format=fmt, **save)
    with Image.open(path) as check:
        assert check.mode == im.mode or (im.mode, check.mode) == ("I;16B", "I;16"), "the file kept its mode"
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == im.size
    return [tuple(int(v) for v in px) for px in np.asarray(rgb)[0]]


def grey(*values):
    return [(v, v, v) for v in values]


def one_row(mode, values, dtype=None):
    if dtype is not None:  # 16-bit, 32-bit and float modes: from raw bytes (`dtype` gives their layout)
        return Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes())
    im = Image.new(mode, (len(values), 1))
    im.putdata(values)
    return im


def test_bilevel_and_grey(tmp_path):
    assert row(one_row("1", [0, 255, 0]), tmp_path, "PNG") == grey(0, 255, 0)
    assert row(one_row("L", [0, 17, 200, 255]), tmp_path, "PNG") == grey(0, 17, 200, 255)


def test_grey_with_alpha_on_white(tmp_path):
    got = row(one_row("LA", [(10, 255), (100, 0), (200, 128), (30, 255)]), tmp_path, "PNG")
    assert got[0] == grey(10)[0] and got[1] == WHITE and got[3] == grey(30)[0]
    assert all(abs(v - (200 * 128 + 255 * 127) / 255) <= 1 for v in got[2])  # 227.4: blended over white


def test_palette_with_and_without_transparency(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (12, 34, 56), (200, 100, 0)]
    im = Image.new("P", (4, 1))
    im.putpalette([c for rgb in colours for c in rgb])
    im.putdata([0, 1, 2, 3])
    assert row(im, tmp_path, "PNG") == colours
    assert row(im, tmp_path, "PNG", transparency=1) == [colours[0], WHITE, colours[2], colours[3]]
    got = row(im, tmp_path, "PNG", transparency=bytes([255, 0, 255, 128]))  # an alpha per palette entry
    assert got[:3] == [colours[0], WHITE, colours[2]]
    assert all(abs(v - e) <= 1 for v, e in zip(got[3], (227, 177, 127)))
    pa = Image.new("PA", (2, 1))
    pa.putpalette([c for rgb in colours for c in rgb])
    pa.putdata([(2, 255), (0, 0)])
    assert row(pa, tmp_path, "TIFF") == [colours[2], WHITE]


def test_rgba_and_rgb_with_a_transparent_colour_on_white(tmp_path):
    got = row(one_row("RGBA", [(10, 20, 30, 255), (10, 20, 30, 0), (200, 100, 0, 128)]), tmp_path, "PNG")
    assert got[:2] == [(10, 20, 30), WHITE]
    assert all(abs(v - e) <= 1 for v, e in zip(got[2], (227, 177, 127)))
    assert row(one_row("RGB", [(1, 2, 3), (4, 5, 6)]), tmp_path, "PNG", transparency=(1, 2, 3)) == [WHITE, (4, 5, 6)]
    assert row(one_row("L", [7, 9]), tmp_path, "PNG", transparency=9) == [grey(7)[0], WHITE]


def test_cmyk_and_ycbcr(tmp_path):
    # the usual conversion without an ICC profile: R = (255 - C)(255 - K) / 255, ...
    cmyk = one_row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (100, 50, 0, 100)])
    assert row(cmyk, tmp_path, "TIFF") == [WHITE, (0, 255, 255), (0, 0, 0), (94, 125, 155)]
    flat = Image.new("CMYK", (16, 16), (100, 50, 0, 100))  # JPEG stores CMYK inverted (Adobe): read back right
    flat.save(tmp_path / "cmyk.jpg", quality=100)
    assert all(abs(int(v) - e) <= 2 for v, e in zip(open_rgb(tmp_path / "cmyk.jpg").getpixel((8, 8)), (94, 125, 155)))
    ycbcr = one_row("RGB", [(128, 128, 128), (250, 10, 10), (0, 0, 0)]).convert("YCbCr")
    got = row(ycbcr, tmp_path, "TIFF")
    assert all(abs(v - e) <= 2 for px, exp in zip(got, [(128,) * 3, (250, 10, 10), (0,) * 3]) for v, e in zip(px, exp))


def test_16_bit_grey_is_not_white(tmp_path):
    values = [0, 255, 25700, 32896, 65535]  # k * 257 is 8-bit k; 255 is nearly black
    expected = grey(0, 0, 100, 128, 255)
    assert row(one_row("I;16", values, "<u2"), tmp_path, "PNG") == expected  # a 16-bit greyscale PNG
    assert row(one_row("I;16B", values, ">u2"), tmp_path, "TIFF") == expected
    assert row(one_row("I;16B", values, ">u2"), tmp_path, "PNG") == expected  # Pillow reads it as I;16
    got = row(one_row("I;16", values, "<u2"), tmp_path, "PNG", transparency=25700)
    assert got == grey(0, 0) + [WHITE] + grey(128, 255)


def test_32_bit_int_reads_as_16_bit_range(tmp_path):
    got = row(one_row("I", [0, 25700, 65535, 70000, -5], "<i4"), tmp_path, "TIFF")
    assert got == grey(0, 100, 255, 255, 0)


def test_float_reads_as_0_to_1(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        got = row(one_row("F", [0.0, 0.5, 1.0, 100 / 255, 2.0, float("nan")], "<f4"), tmp_path, "TIFF")
    assert got == grey(0, 128, 255, 100, 255, 0)
    assert "values above 1 (max 2)" in caplog.text and "image.tiff" in caplog.text


def png_16_bit(colour_type: int, samples: list[int], width: int) -> bytes:
    """A 16-bit-per-channel PNG, one row (Pillow cannot write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, 1, 16, colour_type, 0, 0, 0)
    pixels = b"\x00" + struct.pack(f">{len(samples)}H", *samples)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def test_16_bit_rgb_and_rgba_png(tmp_path):
    (tmp_path / "rgb16.png").write_bytes(png_16_bit(2, [0x80FF, 0x0101, 0xFFFF, 0x0000, 0x7F80, 0x1234], 2))
    assert np.asarray(open_rgb(tmp_path / "rgb16.png")).tolist() == [[[128, 1, 255], [0, 127, 18]]]  # high bytes
    (tmp_path / "rgba16.png").write_bytes(png_16_bit(6, [0x0A00, 0x1400, 0x1E00, 0xFFFF, 0x0A00, 0x1400, 0x1E00, 0], 2))
    assert np.asarray(open_rgb(tmp_path / "rgba16.png")).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def pattern(width=6, height=4) -> Image.Image:
    """Every pixel different, so that any rotation or flip shows."""
    arr = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3) * 3
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt.lower()}"
    pattern().save(path, format=fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # Pillow's reading as the reference
    got = open_rgb(path)
    assert got.size == image_size(path) == (upright.shape[1], upright.shape[0])
    assert got.size == ((4, 6) if orientation >= 5 else (6, 4))
    assert np.array_equal(np.asarray(got), upright)
    if fmt == "PNG" and orientation == 6:  # 6: turned 90 degrees clockwise to display: first stored column on top
        assert np.array_equal(np.asarray(got)[0], np.asarray(pattern())[::-1, 0])


def test_phone_photo_is_upright(tmp_path):
    """A landscape-stored JPEG with orientation 6 (a portrait phone photo): red left half ends up on top."""
    stored = Image.new("RGB", (40, 20), (220, 20, 20))
    stored.paste((20, 20, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert image_size(tmp_path / "phone.jpg") == (20, 40)
    got = open_rgb(tmp_path / "phone.jpg")
    assert got.size == (20, 40)
    top, bottom = np.asarray(got)[5, 10].astype(int), np.asarray(got)[35, 10].astype(int)
    assert np.abs(top - (220, 20, 20)).max() <= 6 and np.abs(bottom - (20, 20, 220)).max() <= 6


def test_unreadable_images_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"text.png: not a readable image"):
        open_rgb(tmp_path / "text.png")
    pattern(64, 64).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-100])
    assert image_size(tmp_path / "cut.png") == (64, 64)  # the header is fine
    with pytest.raises(DataError, match=r"cut.png: not a readable image \(image file is truncated\)"):
        open_rgb(tmp_path / "cut.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb: over twice the limit
    with pytest.raises(DataError, match=r"cut.png: too large to open safely"):
        image_size(tmp_path / "cut.png")


def test_training_pixels_and_index_sizes(tmp_path):
    """The index buckets the upright size and load_pixels (training and the latent cache) reads the same."""
    from lora_sd.data import load_dataset_config
    from lora_sd.data.index import build_index
    from lora_sd.data.transforms import load_pixels

    folder = tmp_path / "img"
    folder.mkdir()
    stored = Image.new("RGB", (64, 32), (220, 20, 20))
    stored.paste((20, 20, 220), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 8  # 90 degrees counter-clockwise to display: the right (blue) half on top
    stored.save(folder / "a_phone.jpg", exif=exif, quality=95)
    Image.frombytes("I;16", (32, 32), np.full(32 * 32, 25700, "<u2").tobytes()).save(folder / "b_grey16.png")
    config = load_dataset_config({"general": {"resolution": 32, "enable_bucket": True, "min_bucket_reso": 16,
                                              "max_bucket_reso": 64, "bucket_reso_steps": 8},
                                  "datasets": [{"subsets": [{"image_dir": str(folder)}]}]})
    rows = build_index(config).to_list()
    assert [(r["width"], r["height"]) for r in rows] == [(32, 64), (32, 32)]
    assert rows[0]["bucket_h"] > rows[0]["bucket_w"]  # a portrait bucket
    tensors = [load_pixels(r["image_path"], (r["bucket_w"], r["bucket_h"]), (r["resized_w"], r["resized_h"]))[0]
               for r in rows]
    pixels = [((t + 1) * 127.5).round() for t in tensors]
    h = pixels[0].shape[1]
    assert (pixels[0][:, 2, :] - torch_tensor((20, 20, 220))).abs().max() <= 8  # top: blue
    assert (pixels[0][:, h - 3, :] - torch_tensor((220, 20, 20))).abs().max() <= 8  # bottom: red
    assert pixels[1].min() == pixels[1].max() == 100  # 25700 / 257, not white


def torch_tensor(rgb):
    import torch
    return torch.tensor(rgb, dtype=torch.float32)[:, None]


def test_image_size_reads_only_the_header(tmp_path, monkeypatch):
    """The index reads sizes from headers: no image is decoded (a PNG's own getexif would decode it)."""
    from PIL import ImageFile, WebPImagePlugin

    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("PNG", "JPEG", "WEBP"):
        pattern().save(tmp_path / f"p.{fmt.lower()}", format=fmt, exif=exif)
    pattern().save(tmp_path / "plain.png")  # no eXIf chunk before the pixels: Pillow's getexif would decode

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", no_decoding)  # WebP has its own
    for fmt in ("png", "jpeg", "webp"):
        assert image_size(tmp_path / f"p.{fmt}") == (4, 6)
    assert image_size(tmp_path / "plain.png") == (6, 4)


@pytest.mark.parametrize("fmt", ["png", "webp"])
@pytest.mark.parametrize("exif", [b"Exif\x00\x00not a TIFF block", "orientation 9", "orientation 0"])
def test_broken_or_unknown_orientation_leaves_the_image_as_stored(tmp_path, exif, fmt):
    """Pillow raises on a PNG's or WebP's broken EXIF block: the image is still read, as stored."""
    if isinstance(exif, str):
        value, exif = int(exif.split()[1]), Image.Exif()
        exif[0x0112] = value
    path = tmp_path / f"odd.{fmt}"
    pattern().save(path, exif=exif, lossless=True)
    assert image_size(path) == open_rgb(path).size == (6, 4)
    assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(pattern()))
