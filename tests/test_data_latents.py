"""The latent cache: encoded once, reused across runs, invalidated by image/bucket/VAE changes."""

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lora_sd.data import build_train_data, load_dataset_config
from lora_sd.errors import ConfigError


class CountingEncoder:
    """A stand-in VAE: 8x8 average pooling, plus a 4th channel; counts calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels):
        assert pixels.ndim == 4 and pixels.shape[1] == 3
        self.calls += 1
        self.images += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)  # [B, 3, H/8, W/8]
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def dataset(tmp_path, **subset):
    folder = tmp_path / "images"
    if not folder.exists():
        folder.mkdir()
        for i, size in enumerate([(64, 64), (128, 64), (64, 64), (64, 128)]):
            img = Image.new("RGB", size, (30 * i, 100, 200))
            img.paste((255, 0, 0), (0, 0, size[0] // 3, size[1]))  # asymmetric, so flips differ
            img.save(folder / f"img{i}.png")
    general = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
               "bucket_reso_steps": 8, "batch_size": 2}
    return load_dataset_config({"general": general,
                                "datasets": [{"subsets": [{"image_dir": str(folder), "num_repeats": 2, **subset}]}]})


def build(tmp_path, encoder, vae_id="vae-a", seed=0, **kw):
    kw.setdefault("cache_latents", True)
    kw.setdefault("cache_latents_to_disk", True)
    return build_train_data(dataset(tmp_path, **kw.pop("subset", {})), seed=seed, max_data_loader_n_workers=0,
                            encode_fn=encoder, vae_id=vae_id, cache_dir=tmp_path / "cache", **kw)


def test_second_run_makes_no_vae_call(tmp_path):
    first = CountingEncoder()
    data = build(tmp_path, first)
    assert first.images == 4 and first.calls >= 3  # one call per bucket batch (3 buckets)
    second = CountingEncoder()
    data = build(tmp_path, second)
    assert second.calls == 0
    batch = next(iter(data.dataloader))
    assert "latents" in batch and "pixel_values" not in batch
    h, w = batch["latents"].shape[2:]
    assert batch["latents"].shape[1] == 4 and (h * 8, w * 8) in {(64, 64), (40, 88), (88, 40)}


def test_changed_image_bucket_or_vae_is_reencoded(tmp_path):
    build(tmp_path, CountingEncoder())
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "images" / "img2.png")  # same size, new pixels
    encoder = CountingEncoder()
    build(tmp_path, encoder)
    assert encoder.images == 1
    Image.new("RGB", (128, 128), (1, 2, 3)).save(tmp_path / "images" / "img2.png")  # same bucket, new size
    encoder = CountingEncoder()
    build(tmp_path, encoder)
    assert encoder.images == 1
    encoder = CountingEncoder()
    build(tmp_path, encoder, vae_id="vae-b")
    assert encoder.images == 4


def test_flip_aug_caches_both_and_matches_uncached(tmp_path):
    encoder = CountingEncoder()
    cached = build(tmp_path, encoder, seed=7, subset={"flip_aug": True})
    assert encoder.images == 8  # every image plain and flipped
    again = CountingEncoder()
    build(tmp_path, again, seed=7, subset={"flip_aug": True})
    assert again.calls == 0
    plain = build(tmp_path, CountingEncoder(), seed=7, subset={"flip_aug": True},
                  cache_latents=False, cache_latents_to_disk=False)
    flips = 0
    for with_cache, without in zip(cached.dataloader, plain.dataloader):
        assert with_cache["image_paths"] == without["image_paths"]
        assert with_cache["flipped"] == without["flipped"]
        flips += sum(with_cache["flipped"])
        torch.testing.assert_close(with_cache["latents"], encoder(without["pixel_values"]))
    assert flips > 0


def test_in_memory_cache_encodes_once_per_run(tmp_path, monkeypatch):
    import lora_sd.data.latents

    monkeypatch.setattr(lora_sd.data.latents, "file_digest", None)  # keys of a one-run cache hash no file
    encoder = CountingEncoder()
    data = build(tmp_path, encoder, cache_latents_to_disk=False)
    assert encoder.images == 4 and not (tmp_path / "cache").exists()
    for _ in range(2):
        assert sum(len(b["latents"]) for b in data.dataloader) == 8
    assert encoder.images == 4


def test_color_aug_or_random_crop_disable_caching(tmp_path, caplog):
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        data = build(tmp_path, encoder, subset={"random_crop": True})
    assert encoder.calls == 0 and "latent caching is off" in caplog.text and "random_crop" in caplog.text
    assert "pixel_values" in next(iter(data.dataloader))


def test_cache_latents_needs_encode_fn(tmp_path):
    with pytest.raises(ConfigError, match="encode_fn"):
        build(tmp_path, None)


@pytest.mark.parametrize("flags", [{"cache_latents_to_disk": True, "cache_latents": False},
                                   {"cache_latents_to_disk": False, "cache_latents": True}])
def test_every_latent_cache_needs_the_vae_id(tmp_path, flags):
    """Without the VAE in the key another VAE would read these latents: no cache is made without it."""
    with pytest.raises(ValueError, match="vae_id"):
        build(tmp_path, CountingEncoder(), vae_id="", **flags)


def test_vae_encoder_latents_do_not_depend_on_vae_batch_size(tmp_path, tiny_sd1):
    """vae_batch_size changes the number of VAE calls, not the latents (each image draws its own noise)."""
    from lora_sd.data.latents import VaeEncoder

    (tmp_path / "images").mkdir()
    for i, size in enumerate([(128, 64), (128, 64), (128, 64), (64, 64)]):  # one bucket of 3 with 5x11 latents
        Image.new("RGB", size, (60 * i, 100, 200)).save(tmp_path / "images" / f"img{i}.png")
    latents, calls = {}, {}
    for size in (1, 3):
        encoder = VaeEncoder(tiny_sd1.vae, seed=0)
        real_encode, n = tiny_sd1.vae.encode, []

        def counting(x, real_encode=real_encode, n=n):
            n.append(len(x))
            return real_encode(x)

        encoder.vae = type("Counted", (), {"encode": staticmethod(counting), "parameters": tiny_sd1.vae.parameters})()
        data = build(tmp_path, encoder, cache_latents_to_disk=False, vae_batch_size=size)
        latents[size] = {p: b for batch in data.dataloader for p, b in zip(batch["image_paths"], batch["latents"])}
        calls[size] = n
    assert sorted(calls[1]) == [1, 1, 1, 1] and sorted(calls[3]) == [1, 3]
    assert latents[1].keys() == latents[3].keys()
    for p in latents[1]:  # equal up to float rounding of batched convolutions
        torch.testing.assert_close(latents[1][p], latents[3][p], rtol=1e-5, atol=1e-5)


def test_vae_fingerprint_follows_the_weights():
    from lora_sd.data.latents import vae_fingerprint
    from lora_sd.tiny import build_tiny_sd

    a, b = build_tiny_sd("sd1").vae, build_tiny_sd("sd1").vae
    assert vae_fingerprint(a) == vae_fingerprint(b)
    with torch.no_grad():
        next(b.parameters())[0].add_(1e-3)
    assert vae_fingerprint(a) != vae_fingerprint(b)
