"""The demo's assets, made when its training starts: a tiny SD1 model pretrained on drawn scenes
(lora_sd.demo_pretrain, about a minute the first time) and a small procedurally drawn image set of
a concept that model never saw (lora_sd.demo_scenes); lora_sd.demo_report draws what the LoRA learned.

configs/demo.toml names them `demo:tiny-sd1` and `demo:images`; those paths
resolve to a cache folder (`$LORA_SD_CACHE`, default `~/.cache/lora_sd`),
written atomically so that two processes starting together are safe.
Loading a config writes nothing: it takes the image folder's layout from
`IMAGE_FOLDERS` (`asset_path`), and resolving any asset when training loads
the model (`resolve_demo_path`) makes all of them.
"""

import os
import random
import shutil
import tempfile
from pathlib import Path

from lora_sd.demo_scenes import CONCEPT_CAPTION, draw_image  # noqa: F401  (draw_image: tests draw with it)

PREFIX = "demo:"
VERSION = "demo-v2"  # v2: the model is pretrained on drawn scenes (v1 was random)
NUM_IMAGES = 8
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
    from lora_sd.demo_pretrain import pretrain_demo_model

    pretrain_demo_model(folder)  # about a minute on 2 CPU cores, once per cache


def _make_images(folder: Path):
    sub = folder / IMAGE_FOLDERS[0]
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(NUM_IMAGES):
        draw_image(rng).save(sub / f"{i:02d}.png")
        (sub / f"{i:02d}.caption").write_text(CONCEPT_CAPTION)


def write_demo_report(output_dir, output_name, lora_path, losses):
    """After a demo run: `<name>-report.png` (lora_sd.demo_report) and `<name>-sample.png`, the first
    image drawn with the LoRA; returns both paths."""
    from PIL import Image

    from lora_sd.demo_report import write_report
    from lora_sd.io import atomic_path

    training = [Image.open(p).convert("RGB") for p in sorted((asset_path(IMAGES) / IMAGE_FOLDERS[0]).glob("*.png"))]
    output_dir = Path(output_dir)
    report, after = write_report(output_dir / f"{output_name}-report.png", asset_path(MODEL), lora_path,
                                 training, losses, CONCEPT_CAPTION)
    sample = output_dir / f"{output_name}-sample.png"
    with atomic_path(sample) as tmp:
        after[0].save(tmp, format="PNG")
    return report, sample
