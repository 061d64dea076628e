"""The demo shows what it learned: a pretrained, cached base model; a report picture; a measurable effect.

The base model is pretrained here on a short plan and the LoRA trained 200 steps at a higher rate
(the real run takes minutes): enough for the LoRA's effect to be measured.
"""

import importlib.util
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_sd import demo, demo_pretrain, demo_report
from lora_sd.demo_scenes import colour_distance, draw_scene

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
train_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_recipe)

SHORT_PLAN = demo_pretrain.PretrainPlan(unet_steps=300, unet_batch=16, scenes=128)
TINY_PLAN = demo_pretrain.PretrainPlan(unet_steps=1, unet_batch=1, scenes=2)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo command on a short schedule, its cache and outputs in a temporary folder."""
    tmp = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_SD_CACHE", str(tmp / "cache"))
        mp.setattr(demo_pretrain, "PLAN", SHORT_PLAN)
        result = train_recipe.main(["--config", str(ROOT / "configs" / "demo.toml"), "--max_train_steps", "200",
                                    "--learning_rate", "1e-2",
                                    "--output_dir", str(tmp / "out"), "--logging_dir", str(tmp / "logs")])
        training = [Image.open(p) for p in sorted((demo.asset_path(demo.IMAGES) / demo.IMAGE_FOLDERS[0]).glob("*"))
                    if p.suffix == ".png"]
    return result, tmp / "out", training


def _tiles(report, name):
    return [report.crop(box) for box in demo_report.LAYOUT[name]]


def test_report_has_the_grid_and_the_loss_curve(demo_run):
    result, out, training = demo_run
    report = Image.open(out / "demo-report.png").convert("RGB")
    assert report.size == demo_report.SIZE
    for tile, image in zip(_tiles(report, "training"), training):  # the training images, at twice their size
        assert tile.resize(image.size, Image.NEAREST).tobytes() == image.convert("RGB").tobytes()
    before, after = _tiles(report, "before"), _tiles(report, "after")
    assert len(before) == len(after) == len(demo_report.SEEDS)
    assert all(len(set(tile.getdata())) > 20 for tile in before + after)  # drawn pictures, not blank boxes
    curve = report.crop(demo_report.LAYOUT["curve"])
    blue = {(x, y) for x in range(curve.width) for y in range(curve.height) if curve.getpixel((x, y)) == (30, 70, 200)}
    assert len({x for x, _ in blue}) > 0.8 * (curve.width - 46)  # the moving average spans the plot's width
    grey = [p for p in curve.getdata() if p == (190, 190, 190)]  # the raw loss per step
    assert grey and len(result.losses) == 200
    assert (out / "demo-sample.png").is_file()


def test_the_lora_draws_closer_to_its_training_images(demo_run):
    """Colour distance to the training images (demo_scenes.colour_distance), on the report's tiles: with the
    LoRA clearly smaller than without, at the same seeds."""
    _, out, training = demo_run
    report = Image.open(out / "demo-report.png").convert("RGB")
    before = colour_distance(_tiles(report, "before"), training)
    after = colour_distance(_tiles(report, "after"), training)
    assert after + 0.03 < before, (before, after)  # measured: 0.215 -> 0.163 here, 0.196 -> 0.120 with the real plan


def test_the_base_never_saw_the_concept():
    """The base's scenes have no red: what the LoRA adds is new to the model."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        caption, image = draw_scene(rng)
        assert "red" not in caption and "sks" not in caption
        assert not any(r > 150 and g < 90 and b < 90 for r, g, b in image.getdata())


def test_the_vae_is_an_exact_pixel_codec():
    """Latent = the 8x8 thumbnail (and a zero channel); decoded = the thumbnail, nearest-upsampled."""
    import random

    import torch

    vae = demo_pretrain.pixel_codec()
    rng = random.Random(0)
    pixels = demo_pretrain._pixels([draw_scene(rng)[1] for _ in range(3)] + [demo.draw_image(rng)])
    thumbnails = torch.nn.functional.avg_pool2d(pixels, 8)
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist
        decoded = vae.decode(latent.sample()).sample
    assert latent.mean.shape == (4, 4, 8, 8) and float(latent.std.max()) < 1e-6
    torch.testing.assert_close(latent.mean[:, :3], thumbnails, atol=1e-3, rtol=0)
    assert float(latent.mean[:, 3].abs().max()) < 1e-3
    torch.testing.assert_close(decoded, torch.nn.functional.interpolate(thumbnails, scale_factor=8), atol=1e-3, rtol=0)


def test_pretraining_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SD_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_pretrain, "PLAN", TINY_PLAN)
    calls = []
    real = demo_pretrain.pretrain_demo_model
    monkeypatch.setattr(demo_pretrain, "pretrain_demo_model", lambda folder: calls.append(folder) or real(folder))
    model = Path(demo.resolve_demo_path(demo.MODEL))
    assert (model / "model_index.json").is_file() and len(calls) == 1
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert demo.resolve_demo_path(demo.MODEL) == str(model)
    assert len(calls) == 1 and weights.stat().st_mtime_ns == stamp  # the second resolve pretrains nothing
    assert model.parent.name == demo.VERSION


def test_pretraining_is_atomic(tmp_path, monkeypatch):
    """Interrupted when the model is written but not yet in place: no model folder, no leftovers; the next
    resolve makes it whole."""
    import lora_sd.models

    monkeypatch.setenv("LORA_SD_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_pretrain, "PLAN", TINY_PLAN)
    real = lora_sd.models.save_diffusers

    def interrupted(model, folder):
        real(model, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_sd.models, "save_diffusers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.resolve_demo_path(demo.MODEL)
    assert os.listdir(demo.demo_folder()) == []
    monkeypatch.setattr(lora_sd.models, "save_diffusers", real)
    model = Path(demo.resolve_demo_path(demo.MODEL))
    assert (model / "model_index.json").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, local_files_only=True)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the pretrained VAE's latents
