"""Opening image files: every reader (index, training transforms, latent cache, resize tool) comes here.

`open_rgb(path)` gives 8-bit RGB, upright, for every mode Pillow opens:
- `1`, `L`, `P`, `CMYK`, `YCbCr`, `RGB`: Pillow's own conversion to RGB (CMYK without its ICC
  profile: R = (255-C)(255-K)/255, ...). 16-bit-per-channel RGB/RGBA/LA PNGs are read by Pillow as
  8-bit already (their high byte).
- `I;16` (16-bit greyscale PNG/TIFF, any byte order) and `I` (32-bit integers, read as a 16-bit
  range 0..65535, which is what 16-bit PNGs give): the high byte, value >> 8, as Pillow does for
  16-bit RGB. Pillow's own `convert` clips them at 255, so almost every pixel would be white.
- `F` (floating point): read as 0..1 (the convention of float TIFF/EXR tools), clipped; a warning
  names the file when values above 1 are seen.
- Transparency (`LA`, `PA`, `RGBA`, `P`/`L`/`RGB`/`I;16` with a transparent colour) is composited
  on white: the colour under a transparent pixel is undefined (often black, sometimes erased
  content). sd-scripts instead drops alpha and keeps that colour. `open_rgb_alpha` also gives the
  alpha channel itself (a subset's `alpha_mask`: the loss mask).
- The EXIF orientation (also XMP's, as Pillow reads it) is applied, so phone photos are upright;
  `image_size` gives the upright size from the header alone, which the index buckets with.
  sd-scripts does not apply it.

DECODING names this behaviour; the latent cache puts it in its keys, so latents of images decoded
under other rules are not reused.
"""

import contextlib
import logging

import numpy as np
from PIL import Image

from lora_sd.errors import DataError

logger = logging.getLogger(__name__)

DECODING = "rgb8;alpha-on-white;high-byte;float-0-1;exif-orientation"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BACKGROUND = (255, 255, 255)

# EXIF orientation -> the transpose that makes the image upright (the table of
# PIL.ImageOps.exif_transpose, which decodes the image: the index must know the size from the header).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa"}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@contextlib.contextmanager
def open_image(path):
    """The image opened lazily (only its header is read until it is loaded); DataError naming the file."""
    try:
        with Image.open(path) as im:
            yield im
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: too large to open safely ({e})") from None


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) from what the header gave; 1 when there is none.

    Image.getexif of the base class: a PNG's own getexif decodes the image to look for an eXIf
    chunk after the pixels, which index-time header reads must not do (the loader asks the same
    way, before decoding, so both always agree)."""
    try:
        value = Image.Image.getexif(im).get(0x0112, 1)  # 0x0112: Orientation
    except (SyntaxError, ValueError, OSError) as e:  # a broken EXIF block ("not a TIFF file"): the pixels are fine
        logger.debug("%s: EXIF block ignored (%s)", getattr(im, "filename", "image"), e)
        return 1
    return value if value in _UPRIGHT else 1


def image_size(path) -> tuple[int, int]:
    """(width, height) as the image trains, upright; from the header only. DataError naming the file."""
    with open_image(path) as im:
        w, h = im.size
        return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def _to_8bit(im: Image.Image, path) -> Image.Image:
    """I;16 / I / F -> L (LA when a transparent value is set); Pillow's convert clips these at 255."""
    arr = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        if values.size and values.max() > 1.0:
            logger.warning("%s: a floating-point image with values above 1 (max %g): read as 0..1, brighter "
                           "values clipped", path, values.max())
        grey = Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    else:
        grey = Image.fromarray((np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8))
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and im.mode != "F":
        alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


def to_rgb(im: Image.Image, path="<image>") -> Image.Image:
    """A loaded image of any mode as 8-bit RGB (a new image): see the module docstring."""
    if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
        im = _to_8bit(im, path)
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), rgba).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:  # a mode no image file gives (Pillow has no conversion for it)
        raise DataError(f"{path}: cannot convert an image of mode {im.mode} to RGB ({e})") from None


def alpha_of(im: Image.Image) -> Image.Image:
    """A loaded image's alpha channel (`L`, 255 = opaque), after `_to_8bit` for 16-bit/float modes; all 255 for
    an image without transparency (sd-scripts' alpha_mask reads such an image as fully opaque)."""
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return im.convert("RGBA").getchannel("A")
    return Image.new("L", im.size, 255)


def open_rgb(path) -> Image.Image:
    """The image decoded as upright 8-bit RGB; DataError naming the file when it cannot be read."""
    return open_rgb_alpha(path, alpha=False)[0]


def open_rgb_alpha(path, alpha: bool = True) -> tuple[Image.Image, Image.Image | None]:
    """(upright RGB as open_rgb gives it, the alpha channel read before the compositing on white, upright too;
    None unless `alpha`)."""
    with open_image(path) as im:
        turn = _UPRIGHT.get(orientation(im))  # before load(): the same header view as image_size
        im.load()
        if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
            im = _to_8bit(im, path)
        # most files are RGB already: Pillow's convert("RGB") would copy every pixel for nothing
        rgb = im if im.mode == "RGB" and "transparency" not in im.info else to_rgb(im, path)
        mask = alpha_of(im) if alpha else None
    if turn is not None:
        rgb, mask = rgb.transpose(turn), mask.transpose(turn) if mask is not None else None
    return rgb, mask
