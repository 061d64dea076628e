"""SDXL conditioning pieces: encode_sdxl against diffusers' SDXL pipeline, cached text-encoder outputs equal to
uncached (memory and disk), and the per-image time_ids with buckets and random_crop."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lora_sd.training.text import TextEncoders, encode_sdxl, tokenize
from lora_sd.training.text_cache import CachedTextEncoder

CAPTIONS = ["a photo of sks girl", "a red house, blue sky, " * 12, ""]


@pytest.fixture(scope="module")
def tiny_xl():
    from lora_sd.tiny import build_tiny_sd

    return build_tiny_sd("sdxl")


def test_encode_sdxl_equals_diffusers_sdxl_prompt_embeddings(tiny_xl):
    """Penultimate states of both encoders concatenated, te2's pooled projection: diffusers' encode_prompt."""
    pipe = tiny_xl.pipeline()
    with torch.no_grad():
        context, pooled = encode_sdxl(tiny_xl.text_encoder, tiny_xl.text_encoder_2,
                                      tokenize(tiny_xl.tokenizer, CAPTIONS[:2]), tokenize(tiny_xl.tokenizer_2, CAPTIONS[:2]))
        want, _, want_pooled, _ = pipe.encode_prompt(CAPTIONS[:2], do_classifier_free_guidance=False)
    assert context.shape == (2, 77, 32 + 40) and pooled.shape == (2, 24)
    assert (context - want).abs().max() <= 1e-5 and (pooled - want_pooled).abs().max() <= 1e-5


def test_sdxl_225_tokens_chunks_both_tokenizers(tiny_xl):
    fn = TextEncoders([tiny_xl.text_encoder, tiny_xl.text_encoder_2], [tiny_xl.tokenizer, tiny_xl.tokenizer_2], 225)
    with torch.no_grad():
        context, pooled = fn(CAPTIONS[:2])
        short, short_pooled = TextEncoders(fn.encoders, fn.tokenizers)(CAPTIONS[:2])
    assert context.shape == (2, 227, 72)
    # the first chunk is the 75-token encoding: the same first 76 states and the same pool (sd-scripts: pool2[::n])
    assert (context[:, :76] - short[:, :76]).abs().max() <= 1e-5 and (pooled - short_pooled).abs().max() <= 1e-5
    ids_2 = tokenize(tiny_xl.tokenizer_2, CAPTIONS[:1], 225)
    assert (ids_2[0, 1:, 1] == tiny_xl.tokenizer_2.eos_token_id).all()  # empty chunks start <BOS> <EOS> ! ! ...


def test_cached_text_encoder_outputs_equal_uncached_in_memory_and_on_disk(tiny_xl, tmp_path):
    fn = TextEncoders([tiny_xl.text_encoder, tiny_xl.text_encoder_2], [tiny_xl.tokenizer, tiny_xl.tokenizer_2], 150)
    with torch.no_grad():
        want = fn(CAPTIONS)
    cached = CachedTextEncoder(fn, tmp_path)
    assert cached.fill(CAPTIONS) == 3
    shards = list(tmp_path.rglob("shard-*.safetensors"))
    assert len(shards) == 1
    calls = []
    reread = CachedTextEncoder(fn, tmp_path)
    reread.encode_fn = lambda captions: calls.append(captions)  # a hit must not encode
    reread.encode_fn.cache_id = fn.cache_id
    for c in (cached, reread):
        context, pooled = c(CAPTIONS[::-1], device="cpu")
        assert (context - want[0].flip(0)).abs().max() <= 1e-5 and (pooled - want[1].flip(0)).abs().max() <= 1e-5
    assert calls == []
    # other weights (or another max_token_length) miss: another folder
    other = TextEncoders(fn.encoders, fn.tokenizers, 225)
    assert CachedTextEncoder(other, tmp_path).cache == {}


def test_a_run_with_cached_text_encoder_outputs_on_disk_trains_the_same_lora(tmp_path, monkeypatch):
    from tests.test_train import args, kohya_file, train_recipe

    from lora_sd.demo import draw_image
    from lora_sd.tiny import save_tiny_diffusers
    from lora_sd.training import text_cache

    save_tiny_diffusers(tmp_path / "model", "sdxl")
    sub = tmp_path / "images" / "1_sks shape"
    sub.mkdir(parents=True)
    for i in range(2):
        draw_image(random.Random(i)).save(sub / f"{i}.png")
    monkeypatch.setattr(text_cache, "default_text_cache_dir", lambda: tmp_path / "text_cache")
    common = ("--network_train_unet_only", "--max_token_length", "150")
    train_recipe.main(args(tmp_path, tmp_path / "a", *common))
    for run in ("b", "c"):  # c reads what b wrote
        train_recipe.main(args(tmp_path, tmp_path / run, *common, "--cache_text_encoder_outputs_to_disk"))
    assert len(list((tmp_path / "text_cache").rglob("shard-*.safetensors"))) == 1
    a, _ = kohya_file(tmp_path / "a" / "lora.safetensors")
    for run in ("b", "c"):
        b, _ = kohya_file(tmp_path / run / "lora.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_time_ids_follow_each_bucket_and_random_crop(tmp_path, monkeypatch):
    """Two buckets, random_crop: time_ids = original (h, w), the crop's (top, left), the bucket (h, w); the crop
    is where the pixels came from; and the U-Net gets exactly these ids."""
    from lora_sd.data import build_train_data
    from lora_sd.data.dataset_config import dreambooth_dataset_config
    from lora_sd.data.resize import resize_image
    from lora_sd.data.transforms import to_tensor

    sub = tmp_path / "images" / "1_sks"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (150, 90), "tall.png": (90, 150)}  # (w, h)
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(sub / name)
    configs = dreambooth_dataset_config(str(tmp_path / "images"), None, resolution=(64, 64), enable_bucket=True,
                                        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                                        random_crop=True, batch_size=1)
    data = build_train_data(configs, seed=3, max_data_loader_n_workers=0)
    seen_buckets = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in data.dataloader:
            name = batch["image_paths"][0].rsplit("/", 1)[-1]
            w, h = sizes[name]
            _, _, bucket_h, bucket_w = batch["pixel_values"].shape
            top, left = batch["crop_top_lefts"][0].tolist()
            assert batch["original_sizes_hw"][0].tolist() == [h, w]
            assert batch["target_sizes_hw"][0].tolist() == [bucket_h, bucket_w]
            seen_buckets.add((bucket_w, bucket_h))
            row = next(r for r in data.index.to_list() if r["image_path"] == batch["image_paths"][0])
            resized = resize_image(Image.open(sub / name).convert("RGB"), (row["resized_w"], row["resized_h"]))
            crop = to_tensor(resized.crop((left, top, left + bucket_w, top + bucket_h)))
            assert torch.equal(crop, batch["pixel_values"][0])
    assert len(seen_buckets) == 2

    from lora_sd.config import TrainConfig
    from lora_sd.tiny import build_tiny_sd
    from lora_sd.training.noise import compute_loss, time_ids

    tiny = build_tiny_sd("sdxl")
    got = []
    real_forward = tiny.unet.forward
    monkeypatch.setattr(tiny.unet, "forward", lambda *a, added_cond_kwargs=None, **k:
                        got.append(added_cond_kwargs["time_ids"]) or real_forward(*a, added_cond_kwargs=added_cond_kwargs, **k))
    fn = TextEncoders([tiny.text_encoder, tiny.text_encoder_2], [tiny.tokenizer, tiny.tokenizer_2])
    with torch.no_grad():
        compute_loss(batch, unet=tiny.unet, text_conditioning=fn, vae=tiny.vae, scheduler=tiny.scheduler,
                     cfg=TrainConfig(), generator=torch.Generator().manual_seed(0), weight_dtype=torch.float32)
    want = torch.tensor([[h, w, top, left, bucket_h, bucket_w]], dtype=torch.float32)
    assert torch.equal(got[0], want) and torch.equal(time_ids(batch).float(), want)
