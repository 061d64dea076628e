"""Image resizing: the training pipeline's resize and sd-scripts' resize_images_to_resolution.

Pillow filters stand in for sd-scripts' OpenCV ones: `area` is Pillow's BOX
(pixel-area averaging, what cv2.INTER_AREA does when shrinking), `cubic` is
BICUBIC, `lanczos4` is LANCZOS. With no interpolation given, shrinking uses
area and enlarging lanczos, as sd-scripts' resize_image does.
"""

import contextlib
import logging
import math
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lora_sd.errors import ConfigError, DataError
from lora_sd.io import atomic_path

logger = logging.getLogger(__name__)

INTERPOLATIONS = {
    "area": Image.Resampling.BOX,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos4": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resize_image(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """`image` at `size` (width, height); unchanged when it already has that size."""
    if image.size == tuple(size):
        return image
    if interpolation is None:
        shrinking = size[0] * size[1] < image.size[0] * image.size[1]
        interpolation = "area" if shrinking else "lanczos4"
    return image.resize(tuple(size), INTERPOLATIONS[interpolation])


@contextlib.contextmanager
def open_image(path):
    """The image opened lazily (only its header is read until it is loaded); DataError naming the file."""
    try:
        with Image.open(path) as im:
            yield im
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def load_rgb(path) -> Image.Image:
    """The image decoded as RGB (palette and alpha images too); DataError naming the file."""
    with open_image(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA")
        return im.convert("RGB")


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """"512x512,384x384" -> [("512x512", 262144), ("384x384", 147456)]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"`--max_resolution`: {item!r} is not WIDTHxHEIGHT (e.g. 512x512)")
        out.append((item, int(parts[0]) * int(parts[1])))
    return out


def fit_to_area(width: int, height: int, max_area: int, divisible_by: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized size, final size after the divisible_by center crop); never enlarges."""
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        resized = (int(width * scale), int(height * scale))
    else:
        resized = (width, height)
    final = (resized[0] - resized[0] % divisible_by, resized[1] - resized[1] % divisible_by)
    return resized, final


def _save(image: Image.Image, path: Path, as_png: bool):
    with atomic_path(path) as tmp:
        if as_png:
            image.save(tmp, format="PNG")
        else:
            image.save(tmp, format="JPEG", quality=100)


def _copy(src: Path, target: Path):
    with atomic_path(target) as tmp:
        shutil.copy2(src, tmp)


def resize_images(src, dst, max_resolution="512x512,384x384,256x256,128x128", *, divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False,
                  copy_associated_files: bool = False) -> list[Path]:
    """Write every image of `src` into `dst` once per area, named `stem+512x512.jpg`.

    Images larger than an area are shrunk to it (aspect kept), smaller ones are
    written at their own size; both are center-cropped to multiples of
    `divisible_by`. Other files in `src` are copied as they are; with
    `copy_associated_files` the files sharing an image's stem (captions...) are
    also copied beside each resized image under its new name. Returns the paths written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist")
    if divisible_by < 1:
        raise ConfigError(f"`--divisible_by` must be >= 1, got {divisible_by}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"`--interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"destination {dst} is the source folder; give another folder")
    resolutions = parse_resolutions(max_resolution)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others: dict[str, list[Path]] = {}
    written = []
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            others.setdefault(path.stem, []).append(path)
            _copy(path, dst / path.name)
            written.append(dst / path.name)
    for path in tqdm(images, desc="resizing"):
        original = load_rgb(path)
        for name, area in resolutions:
            resized, final = fit_to_area(*original.size, area, divisible_by)
            if min(final) <= 0:
                raise DataError(f"{path}: {original.size[0]}x{original.size[1]} leaves nothing at "
                                f"{name} with --divisible_by {divisible_by}")
            image = resize_image(original, resized, interpolation)
            left, top = (resized[0] - final[0]) // 2, (resized[1] - final[1]) // 2
            image = image.crop((left, top, left + final[0], top + final[1]))
            out = dst / f"{path.stem}+{name}{'.png' if save_as_png else '.jpg'}"
            _save(image, out, save_as_png)
            written.append(out)
            logger.info("%s %s as %s (%dx%d)", "resized" if resized != original.size else "saved",
                        path.name, out.name, *final)
        for other in others.get(path.stem, []) if copy_associated_files else []:
            for name, _ in resolutions:
                target = dst / f"{path.stem}+{name}{other.suffix}"
                _copy(other, target)
                written.append(target)
    return written
