"""The demo's assets, made when its training starts: a tiny SD1 model and a small procedurally drawn image set.

configs/demo.toml names them `demo:tiny-sd1` and `demo:images`; those paths
resolve to a cache folder (`$LORA_SD_CACHE`, default `~/.cache/lora_sd`),
written atomically so that two processes starting together are safe.
Loading a config writes nothing: it takes the image folder's layout from
`IMAGE_FOLDERS` (`asset_path`), and resolving any asset when training loads
the model (`resolve_demo_path`) makes all of them.
"""

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from lora_sd.io import atomic_path

PREFIX = "demo:"
VERSION = "demo-v1"
NUM_IMAGES = 8
SIZE = 64
MODEL, IMAGES = PREFIX + "tiny-sd1", PREFIX + "images"
ASSETS = (MODEL, IMAGES)
IMAGE_FOLDERS = ("10_sks shape",)  # the DreamBooth subfolders _make_images writes


def cache_root() -> Path:
    return Path(os.environ.get("LORA_SD_CACHE") or Path.home() / ".cache" / "lora_sd")


def demo_folder() -> Path:
    return cache_root() / VERSION


def is_demo_path(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def asset_path(value) -> Path:
    """Where the asset `demo:<name>` is (or will be) in the cache; makes nothing."""
    if value not in ASSETS:
        from lora_sd.errors import ConfigError

        raise ConfigError(f"{value}: unknown demo asset; known: " + ", ".join(ASSETS))
    return demo_folder() / value[len(PREFIX):]


def resolve_demo_path(value):
    """`demo:<name>` -> the cached asset, all the demo's assets made now if missing; anything else unchanged."""
    if not is_demo_path(value):
        return value
    path = asset_path(value)
    makers = {MODEL: _make_model, IMAGES: _make_images}
    for asset, make in makers.items():
        _make(asset_path(asset), make)
    return str(path)


def _make(path: Path, make):
    if not path.exists() and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        _wait_for(path)  # under `accelerate launch` the local main process makes the assets
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            make(tmp / path.name)
            os.rename(tmp / path.name, path)  # fails if another process got there first: theirs is kept
        except OSError:
            if not path.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(path: Path, seconds=600):
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            from lora_sd.errors import DataError

            raise DataError(f"{path}: the demo asset was not made by the main process within {seconds} s")
        time.sleep(0.5)


def _make_model(folder: Path):
    from lora_sd.tiny import save_tiny_diffusers

    save_tiny_diffusers(folder, "sd1", seed=0)


def draw_image(rng: random.Random, size=SIZE):
    """A red disc with a white ring on a blue gradient, at a random place and size: the "sks shape"."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    top = rng.randint(40, 90)
    for y in range(size):
        v = int(top + (200 - top) * y / size)
        draw.line([(0, y), (size, y)], fill=(20, 40, v))
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30), outline=(250, 250, 250), width=max(2, size // 24))
    a = rng.uniform(0, 2 * math.pi)
    draw.line([(cx, cy), (cx + r * math.cos(a), cy + r * math.sin(a))], fill=(250, 250, 250), width=2)
    return image


def _make_images(folder: Path):
    sub = folder / IMAGE_FOLDERS[0]
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(NUM_IMAGES):
        draw_image(rng).save(sub / f"{i:02d}.png")
        (sub / f"{i:02d}.caption").write_text("a photo of sks shape, red, blue")


def render_with_lora(lora_path, out_path, prompt="a photo of sks shape, red, blue", seed=0):
    """Load the demo model in a diffusers pipeline, `pipe.load_lora_weights(lora)`, save one image."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(resolve_demo_path(MODEL), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_lora_weights(str(lora_path))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=20,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    with atomic_path(out_path) as tmp:
        image.save(tmp, format="PNG")
    return out_path
