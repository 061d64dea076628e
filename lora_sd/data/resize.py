"""Image resizing: the training pipeline's resize and sd-scripts' resize_images_to_resolution.

Pillow filters stand in for sd-scripts' OpenCV ones: `area` is Pillow's BOX
(pixel-area averaging, what cv2.INTER_AREA does when shrinking), `cubic` is
BICUBIC, `lanczos4` is LANCZOS. With no interpolation given, shrinking uses
area and enlarging lanczos, as sd-scripts' resize_image does.
"""

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lora_sd.data.images import IMAGE_EXTENSIONS, open_rgb
from lora_sd.errors import ConfigError, DataError
from lora_sd.io import check_writable_folder

logger = logging.getLogger(__name__)

INTERPOLATIONS = {
    "area": Image.Resampling.BOX,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos4": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


def resize_image(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """`image` at `size` (width, height); unchanged when it already has that size."""
    if image.size == tuple(size):
        return image
    if interpolation is None:
        shrinking = size[0] * size[1] < image.size[0] * image.size[1]
        interpolation = "area" if shrinking else "lanczos4"
    return image.resize(tuple(size), INTERPOLATIONS[interpolation])


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """"512x512,384x384" -> [("512x512", 262144), ("384x384", 147456)]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"`--max_resolution`: {item!r} is not WIDTHxHEIGHT (e.g. 512x512)")
        if item in (name for name, _ in out):
            raise ConfigError(f"`--max_resolution`: {item} is given twice")
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
    if as_png:
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=100)


def _plan(src: Path, resolutions, save_as_png: bool, copy_associated_files: bool):
    """(images, others, outputs): outputs maps each destination name to the source file it comes from;
    two sources for one name (`a.png` and `a.jpg`, or a source already named `a+512x512.jpg`) are refused
    before anything is read, as one would silently replace the other."""
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            others.setdefault(p.stem, []).append(p)
    outputs: dict[str, Path] = {}

    def add(name, source):
        if name in outputs:
            raise DataError(f"{src}: {outputs[name].name} and {source.name} would both be written as {name}; "
                            "rename one of them")
        outputs[name] = source

    for p in files:  # originals and other files, as they are
        add(p.name, p)
    for p in images:
        for name, _ in resolutions:
            add(f"{p.stem}+{name}{'.png' if save_as_png else '.jpg'}", p)
            for other in others.get(p.stem, []) if copy_associated_files else []:
                add(f"{p.stem}+{name}{other.suffix}", other)
    return images, others, outputs


def _write_outputs(stage: Path, outputs, images, others, resolutions, *, divisible_by, interpolation, save_as_png,
                   copy_associated_files):
    """Every output into `stage`; the first unreadable image raises before anything reaches the destination."""
    for name, source in outputs.items():
        if name == source.name:  # the original (and every other file) as it is
            shutil.copy2(source, stage / name)
    for path in tqdm(images, desc="resizing"):
        original = open_rgb(path)
        for name, area in resolutions:
            resized, final = fit_to_area(*original.size, area, divisible_by)
            if min(final) <= 0:
                raise DataError(f"{path}: {original.size[0]}x{original.size[1]} leaves nothing at "
                                f"{name} with --divisible_by {divisible_by}")
            image = resize_image(original, resized, interpolation)
            left, top = (resized[0] - final[0]) // 2, (resized[1] - final[1]) // 2
            image = image.crop((left, top, left + final[0], top + final[1]))
            out = f"{path.stem}+{name}{'.png' if save_as_png else '.jpg'}"
            _save(image, stage / out, save_as_png)
            logger.info("%s %s as %s (%dx%d)", "resized" if resized != original.size else "saved",
                        path.name, out, *final)
            for other in others.get(path.stem, []) if copy_associated_files else []:
                shutil.copy2(other, stage / f"{path.stem}+{name}{other.suffix}")


def resize_images(src, dst, max_resolution="512x512,384x384,256x256,128x128", *, divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False,
                  copy_associated_files: bool = False) -> list[Path]:
    """Copy every file of `src` into `dst` as it is, and write each image once more per area, as `stem+512x512.jpg`.

    Images larger than an area are shrunk to it (aspect kept), smaller ones are
    written at their own size; both are center-cropped to multiples of
    `divisible_by`. With `copy_associated_files` the files sharing an image's
    stem (captions...) are also copied beside each resized image under its new
    name. Everything is written into a temporary folder inside `dst` first and
    moved into place only when every image has been read and written: an
    unreadable image (or a full disk) leaves `dst` as it was. Returns the paths written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist")
    if divisible_by < 1:
        raise ConfigError(f"`--divisible_by` must be >= 1, got {divisible_by}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"`--interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    # outputs are files directly in dst, inputs files directly in src: only the same folder can collide
    # (io.refuse_overwriting_inputs would also refuse a dst that merely holds src, where nothing collides)
    if dst.is_dir() and os.path.samefile(dst, src):
        raise ConfigError(f"destination {dst} is the source folder; give another folder")
    check_writable_folder(dst, f"destination {dst}")  # a file there, or a read-only folder: one line
    resolutions = parse_resolutions(max_resolution)
    images, others, outputs = _plan(src, resolutions, save_as_png, copy_associated_files)
    if not images:  # an exit 0 that wrote nothing (or only copied captions) would hide a wrong folder
        raise DataError(f"source folder {src} holds no images ({', '.join(IMAGE_EXTENSIONS)}); nothing to resize")
    created = [p for p in (dst, *dst.parents) if not p.exists()]
    dst.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".resize_images.", suffix=".tmp", dir=dst))
    try:
        _write_outputs(stage, outputs, images, others, resolutions, divisible_by=divisible_by,
                       interpolation=interpolation, save_as_png=save_as_png,
                       copy_associated_files=copy_associated_files)
        for name in outputs:
            os.replace(stage / name, dst / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # the folders this run made, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return [dst / name for name in outputs]
