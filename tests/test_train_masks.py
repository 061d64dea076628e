"""masked_loss: masks from `conditioning_data_dir` and from the alpha channel (`alpha_mask`), transformed with
their images, cached with the latents, ignored pixels not trained; bad masks refused naming the file."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lora_sd.data import build_train_data, load_dataset_config
from lora_sd.data.transforms import load_sample
from lora_sd.errors import ConfigError, DataError
from lora_sd.training.noise import diffusion_loss
from tests.test_data_latents import CountingEncoder
from tests.test_state import _error_line
from tests.test_train import _no_outputs, args, assets, train_recipe  # noqa: F401  (assets: a fixture)

SMALL = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
         "bucket_reso_steps": 8, "batch_size": 2}


def pattern(size, seed):
    """An asymmetric RGB image: a flip, a crop or a misplaced resize of its mask shows."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]  # red ramps left to right
    arr[: h // 3, : w // 2, 0] = 255
    arr[..., 1] = rng.integers(0, 256, (h, w))
    return Image.fromarray(arr)


def make_set(root, sizes=((64, 64), (128, 64), (64, 128), (96, 64))):
    """Images, and masks that are copies of them (the mask's red channel is the image's)."""
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    for i, size in enumerate(sizes):
        pattern(size, i).save(root / "img" / f"{i}.png")
        shutil.copy(root / "img" / f"{i}.png", root / "mask" / f"{i}.png")
        (root / "img" / f"{i}.caption").write_text("sks shape")
    return root


def datasets(root, **subset):
    sub = {"image_dir": str(root / "img"), "conditioning_data_dir": str(root / "mask"), **subset}
    return load_dataset_config({"general": SMALL, "datasets": [{"subsets": [sub]}]})


def test_masked_pixels_do_not_change_loss_or_gradients():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    masks = torch.ones(2, 1, 64, 64)
    masks[0, :, :32] = 0  # the top half of image 0 (latent rows 0-3)
    masks[1, :, :, 40:] = 0  # the right 3/8 of image 1 (latent columns 5-7)
    changed = target.clone()
    changed[0, :, :4] += 5
    changed[1, :, :, 5:] -= 3
    results = []
    for t in (target, changed):
        pred.grad = None
        loss = diffusion_loss(pred, t, torch.ones(2), masks=masks)
        loss.backward()
        results.append((loss.detach(), pred.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert (results[0][1][0, :, :4] == 0).all() and (results[0][1][0, :, 4:] != 0).all()
    unmasked = diffusion_loss(pred, changed, torch.ones(2)) - diffusion_loss(pred, target, torch.ones(2))
    assert unmasked.abs() > 1  # without masks the same change moves the loss
    # sd-scripts' apply_masked_loss: the mean stays over the whole image (a half mask halves the weight)
    half = torch.zeros(2, 1, 64, 64)
    half[..., :32] = 1
    want = (((pred - target) ** 2)[..., :4].sum(dim=[1, 2, 3]) / (4 * 8 * 8)).mean()
    torch.testing.assert_close(diffusion_loss(pred, target, torch.ones(2), masks=half), want)


def test_conditioning_masks_follow_bucket_resize_random_crop_and_flip(tmp_path):
    root = make_set(tmp_path)
    data = build_train_data(datasets(root, random_crop=True, flip_aug=True), seed=4, max_data_loader_n_workers=0)
    flips = crops = 0
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in data.dataloader:
            red = (batch["pixel_values"][:, :1] + 1) / 2  # the image's red channel, 0..1, as the step sees it
            assert batch["masks"].shape == red.shape
            torch.testing.assert_close(batch["masks"], red, atol=1.5 / 255, rtol=0)
            flips += sum(batch["flipped"])
            crops += int((batch["crop_top_lefts"] != 0).any())
    assert flips and crops  # flips and off-center crops were among them


def test_alpha_mask_reads_the_alpha_before_compositing(tmp_path):
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.linspace(0, 255, 96).astype(np.uint8)[None, :]  # transparent left, opaque right
    rgba[:16, :, 3] = 0
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels, _, mask = load_sample(path, (96, 64), (96, 64), alpha_mask=True)
    torch.testing.assert_close(mask[0], torch.from_numpy(rgba[..., 3] / 255.0).float())
    assert torch.allclose(pixels[:, :16], torch.ones(3, 16, 96))  # fully transparent: white, as without masks
    assert load_sample(path, (96, 64), (96, 64))[2] is None
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")  # no alpha at all: trained everywhere
    assert load_sample(tmp_path / "rgb.png", (96, 64), (96, 64), alpha_mask=True)[2].min() == 1
    (tmp_path / "img").mkdir()
    shutil.copy(path, tmp_path / "img" / "a.png")
    cfg = load_dataset_config({"general": {"resolution": [96, 64], "alpha_mask": True},
                               "datasets": [{"subsets": [{"image_dir": str(tmp_path / "img")}]}]})
    batch = next(iter(build_train_data(cfg, seed=0, max_data_loader_n_workers=0).dataloader))
    torch.testing.assert_close(batch["masks"][0, 0], torch.from_numpy(rgba[..., 3] / 255.0).float())


def test_masks_are_cached_with_the_latents_and_invalidated_when_they_change(tmp_path):
    root = make_set(tmp_path)

    def build(encoder, **subset):
        return build_train_data(datasets(root, flip_aug=True, **subset), seed=2, max_data_loader_n_workers=0,
                                cache_latents=True, cache_latents_to_disk=True, encode_fn=encoder, vae_id="v",
                                cache_dir=tmp_path / "cache")

    first = CountingEncoder()
    cached = build(first)
    assert first.images == 8  # 4 images, plain and flipped
    again = CountingEncoder()
    cached = build(again)
    assert again.calls == 0
    plain = build_train_data(datasets(root, flip_aug=True), seed=2, max_data_loader_n_workers=0)
    for with_cache, without in zip(cached.dataloader, plain.dataloader):
        assert with_cache["flipped"] == without["flipped"]
        want = F.interpolate(without["masks"], size=with_cache["latents"].shape[-2:], mode="area")
        torch.testing.assert_close(with_cache["masks"], want)
    Image.new("RGB", (96, 64), (0, 0, 0)).save(root / "mask" / "3.png")  # one mask changed: only it re-encodes
    changed = CountingEncoder()
    data = build(changed)
    assert changed.images == 2
    masks = {p: m for b in data.dataloader for p, m in zip(b["image_paths"], b["masks"])}
    assert masks[str(root / "img" / "3.png")].max() == 0
    shutil.rmtree(root / "mask")
    alpha = CountingEncoder()
    build(alpha, conditioning_data_dir=None, alpha_mask=True)  # another mask source: other entries
    assert alpha.images == 8


def test_a_run_without_masks_keeps_its_cache_keys(tmp_path):
    """Rows without masks keep the keys they had before masks existed (existing caches stay valid)."""
    from lora_sd.data.latents import latent_key

    row = {"image_path": str(tmp_path / "x.png"), "bucket_w": 64, "bucket_h": 64, "resized_w": 64, "resized_h": 64}
    Image.new("RGB", (64, 64)).save(row["image_path"])
    plain = latent_key(row, False, "v")
    assert latent_key({**row, "mask_path": "", "alpha_mask": False}, False, "v") == plain
    assert latent_key({**row, "alpha_mask": True}, False, "v") != plain


@pytest.mark.parametrize("problem", ["missing", "size", "no_masks", "no_masked_loss", "both", "no_folder"])
def test_bad_masks_exit_2_naming_the_file_and_write_nothing(assets, tmp_path, capsys, problem):  # noqa: F811
    from lora_sd.cli import run_main

    root = make_set(tmp_path / "data", sizes=((64, 64), (64, 64)))
    subset = {"image_dir": str(root / "img"), "conditioning_data_dir": str(root / "mask")}
    masked = True
    if problem == "missing":
        (root / "mask" / "1.png").unlink()
        named = f"no mask for {root / 'img' / '1.png'}"
    elif problem == "size":
        Image.new("L", (32, 64)).save(root / "mask" / "1.png")
        named = f"{root / 'mask' / '1.png'}: the mask is 32x64 but its image"
    elif problem == "no_masks":
        del subset["conditioning_data_dir"]
        named = "`masked_loss` needs masks"
    elif problem == "no_masked_loss":
        masked, named = False, "used with `masked_loss = true`"
    elif problem == "both":
        subset["alpha_mask"], named = True, "`conditioning_data_dir` and `alpha_mask` are both set"
    else:
        subset["conditioning_data_dir"], named = str(tmp_path / "nowhere"), f"{tmp_path / 'nowhere'} does not exist"
    toml = tmp_path / "data.toml"
    toml.write_text("[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\n"
                    + "".join(f"{k} = {v!r}\n".replace("True", "true") for k, v in subset.items()).replace("'", '"'))
    out = tmp_path / "out"
    argv = [a for a in args(assets, out) if a not in ("--train_data_dir", str(assets / "images"))]
    argv += ["--dataset_config", str(toml)] + (["--masked_loss"] if masked else [])
    assert run_main(train_recipe.main, argv) == 2
    assert named in _error_line(capsys)  # one line, last on stderr, no traceback
    assert _no_outputs(out)


def test_masked_training_runs_and_the_mask_reaches_the_loss(assets, tmp_path, monkeypatch):  # noqa: F811
    from lora_sd.training import noise

    root = make_set(tmp_path / "data", sizes=((64, 64), (64, 64)))
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{root / "img"}"\n'
                    f'conditioning_data_dir = "{root / "mask"}"\n')
    seen, real = [], noise.diffusion_loss
    monkeypatch.setattr(noise, "diffusion_loss", lambda *a, **k: seen.append(k["masks"]) or real(*a, **k))
    argv = [a for a in args(assets, tmp_path / "out") if a not in ("--train_data_dir", str(assets / "images"))]
    result = train_recipe.main(argv + ["--dataset_config", str(toml), "--masked_loss", "--cache_latents"])
    assert result.steps == 2 and len(seen) == 2
    assert all(m is not None and m.shape == (1, 1, 8, 8) and 0 < m.mean() < 1 for m in seen)
