"""Seconds per image of latent caching: lora-sd's cache against the bare floor of sd-scripts' per-image work.

    python benchmarks/cache_speed.py                       # full-size SD 1.5 VAE, 512 px, 24 images, 3 rounds
    python benchmarks/cache_speed.py --model tiny --images 64 --rounds 5
    python benchmarks/cache_speed.py --model stub --images 48 --rounds 5   # only the work around the VAE
    python benchmarks/cache_speed.py --first-epoch         # + caching and first epoch of a tiny training run

Rows, on the same images and the same VAE (random weights with SD 1.5's
config, float32, no download), interleaved round by round (the order rotates)
so that the machine's noise hits every row alike:
  floor   sd-scripts' cache_batch_latents and nothing more: PIL open, convert
          to RGB, numpy, resize with cv2.INTER_AREA (Pillow's BOX filter when
          OpenCV is not installed; said in the output), center crop,
          ToTensor + Normalize(0.5, 0.5), stack `vae_batch_size` images,
          vae.encode(batch).latent_dist.sample(), to the CPU; no storage;
  memory  lora-sd's `cache_latents` (keys, decoding, the encoder, the in-memory entries);
  disk    lora-sd's `cache_latents_to_disk` into a fresh folder each round
          (content hashes of the images, the `datasets` shard written and read back).
Each row reports its median seconds per image and range, and the ratio to the
floor's median of the same round (median and range over rounds). The VAE's
fingerprint (hashed once per run, not per image) is reported on its own line.
`--text` adds the text-encoder output cache (CLIP ViT-L config) against bare
batched encoding of the same captions.
"""

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` JPEG photos-alike (smooth colour fields plus grain) in `folder/1_bench`, with captions."""
    from PIL import Image

    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        base = np.stack([np.sin(xx / (40 + 7 * c + i) + c) * np.cos(yy / (55 + 5 * i)) for c in range(3)], -1)
        arr = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(sub / f"{i:03d}.jpg", quality=92)
        (sub / f"{i:03d}.caption").write_text(f"a photo number {i}, bench, {'red' if i % 2 else 'blue'}")
    return folder


class StubVae(torch.nn.Module):
    """A stand-in VAE that does next to no work (8x8 average pooling): with it the rows time only what is not
    VAE work, the part caching can lose or gain against sd-scripts."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # the encoders ask the VAE's parameters for its device

    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        pooled = torch.nn.functional.avg_pool2d(pixels, 8) * self.scale
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], 1)))


def build_vae(model: str):
    from diffusers import AutoencoderKL

    from lora_sd import tiny
    from lora_sd.models import sd_configs

    if model == "stub":
        return StubVae().requires_grad_(False)
    torch.manual_seed(0)
    config = tiny.vae_config() if model == "tiny" else sd_configs.shipped_configs("sd1")["vae"]
    return AutoencoderKL(**config).eval().requires_grad_(False)


def _resize_floor():
    """sd-scripts' shrinking resize: cv2.INTER_AREA, or Pillow's BOX (the same pixel-area average) without OpenCV."""
    try:
        import cv2

        return "cv2.INTER_AREA", lambda arr, size: cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    except ImportError:
        from PIL import Image

        return "PIL BOX", lambda arr, size: np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX))


def floor_cache(rows, vae, batch_size: int, resize) -> int:
    """sd-scripts' per-image work of latent caching, nothing stored (see the module docstring)."""
    from PIL import Image

    for i in range(0, len(rows), batch_size):
        tensors = []
        for row in rows[i:i + batch_size]:
            image = Image.open(row["image_path"])
            if image.mode != "RGB":
                image = image.convert("RGB")
            arr = resize(np.array(image, np.uint8), (row["resized_w"], row["resized_h"]))
            top, left = (row["resized_h"] - row["bucket_h"]) // 2, (row["resized_w"] - row["bucket_w"]) // 2
            arr = arr[top:top + row["bucket_h"], left:left + row["bucket_w"]]
            tensors.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).sub(0.5)
                           .div(0.5))
        with torch.no_grad():
            vae.encode(torch.stack(tensors).to(vae.device, vae.dtype)).latent_dist.sample().to("cpu")
    return len(rows)


def ours_cache(rows, configs, encoder, batch_size: int, to_disk: bool) -> int:
    from lora_sd.data.loader import _latent_cache

    with tempfile.TemporaryDirectory() as cache_dir:
        cache, _ = _latent_cache(rows, configs, cache_latents=True, cache_latents_to_disk=to_disk, encode_fn=encoder,
                                 vae_id=encoder.vae_id, cache_dir=Path(cache_dir), vae_batch_size=batch_size)
        return len(cache.memory) + len(cache.where)


def text_rows(captions, batch_size: int, model: str):
    """(floor, ours) for the text-encoder outputs of `captions`: bare batched CLIP calls vs the output cache;
    SD 1.5's text encoder (CLIP ViT-L config) for sd15, lora_sd.tiny's otherwise."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_sd import tiny
    from lora_sd.models import sd_configs
    from lora_sd.training.text import TextEncoders, tokenize
    from lora_sd.training.text_cache import CachedTextEncoder

    torch.manual_seed(0)
    tokenizer = tiny.tiny_tokenizer("sd1")  # the tokenizer's cost is negligible; its vocabulary fits the config
    config = (dict(sd_configs.shipped_configs("sd1")["text_encoder"], vocab_size=len(tokenizer)) if model == "sd15"
              else tiny.text_encoder_config("sd1", len(tokenizer)))
    encoder = CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)
    fn = TextEncoders([encoder], [tokenizer])

    def floor():
        with torch.no_grad():
            for i in range(0, len(captions), batch_size):
                ids = tokenize(tokenizer, captions[i:i + batch_size])[:, 0]
                encoder(ids)[0].to("cpu")
        return len(captions)

    def ours():
        return CachedTextEncoder(fn).fill(captions, batch_size)

    return floor, ours


def run_rounds(rows: dict, rounds: int) -> dict:
    """{name: [seconds per image, one per round]}; the order of the rows rotates each round."""
    names = list(rows)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            count = rows[name]()
            times[name].append((time.perf_counter() - start) / count)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.4f}" for n in names), flush=True)
    return times


def report(times: dict, floor: str, unit: str = "image"):
    for name, values in times.items():
        line = f"{name:>10}: {statistics.median(values):.4f} s/{unit} ({min(values):.4f}-{max(values):.4f})"
        if name != floor:
            ratios = [v / f for v, f in zip(values, times[floor])]
            line += f", {statistics.median(ratios):.3f}x the floor ({min(ratios):.3f}-{max(ratios):.3f})"
        print(line)


def first_epoch(images: Path, resolution: int, batch_size: int):
    """Caching plus the first epoch of a real training run (the train recipe, tiny model: a full-size one would
    take hours on CPU), with cached latents and text-encoder outputs."""
    import importlib.util

    from lora_sd.tiny import save_tiny_diffusers

    spec = importlib.util.spec_from_file_location("train_recipe", Path(__file__).parents[1] / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    for name in ("lora_sd.data.latents", "lora_sd.training.text_cache"):  # the run's "cached N ... in T s" lines
        logging.getLogger(name).setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_diffusers(Path(tmp) / "model")
        start = time.perf_counter()
        recipe.main(["--pretrained_model_name_or_path", str(Path(tmp) / "model"), "--train_data_dir", str(images),
                     "--resolution", str(resolution), "--output_dir", str(Path(tmp) / "out"),
                     "--output_name", "bench", "--max_train_epochs", "1", "--seed", "0", "--cache_latents",
                     "--cache_text_encoder_outputs", "--network_train_unet_only", "--vae_batch_size",
                     str(batch_size), "--max_data_loader_n_workers", "0", "--caption_extension", ".caption"])
        print(f"first epoch (tiny model, {resolution} px, batch 1: loading, caching and training, "
              f"{len(list(images.rglob('*.jpg')))} images): {time.perf_counter() - start:.1f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["sd15", "tiny", "stub"], default="sd15",
                   help="the VAE: SD 1.5's, lora_sd.tiny's, or a stub (8x8 pooling: only the work around the VAE)")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    p.add_argument("--vae_batch_size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default="floor,memory,disk", help="which rows (floor is always measured)")
    p.add_argument("--text", action="store_true", help="also the text-encoder output cache")
    p.add_argument("--first-epoch", action="store_true", help="also caching + first epoch of a tiny training run")
    p.add_argument("--profile", choices=["memory", "disk"], default=None,
                   help="cProfile one pass of that row instead of timing (top 25 by cumulative time)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = args.resolution or (64 if args.model == "tiny" else 512)
    from lora_sd.data import dreambooth_dataset_config
    from lora_sd.data.index import build_index
    from lora_sd.data.latents import VaeEncoder
    from lora_sd.data.masks import attach_masks

    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp) / "images", args.images, (res * 5 // 4, res * 3 // 2))
        configs = dreambooth_dataset_config(images, resolution=res, caption_extension=".caption")
        rows = attach_masks(build_index(configs).to_list(), configs)
        vae = build_vae(args.model)
        start = time.perf_counter()
        encoder = VaeEncoder(vae, seed=0)
        print(f"{args.model} VAE, {res} px, {args.images} images {rows[0]['width']}x{rows[0]['height']} -> "
              f"{rows[0]['bucket_w']}x{rows[0]['bucket_h']}, vae_batch_size {args.vae_batch_size}, "
              f"torch threads {torch.get_num_threads()}; VAE fingerprint (once per run) "
              f"{time.perf_counter() - start:.2f} s")
        resize_name, resize = _resize_floor()
        print(f"floor resize: {resize_name}")
        if args.profile:
            import cProfile
            import pstats

            cProfile.runctx("ours_cache(rows, configs, encoder, args.vae_batch_size, args.profile == 'disk')",
                            globals(), locals(), str(Path(tmp) / "prof"))
            for sort in ("cumulative", "tottime"):
                pstats.Stats(str(Path(tmp) / "prof")).sort_stats(sort).print_stats(30)
            return
        candidates = {"floor": lambda: floor_cache(rows, vae, args.vae_batch_size, resize),
                      "memory": lambda: ours_cache(rows, configs, encoder, args.vae_batch_size, False),
                      "disk": lambda: ours_cache(rows, configs, encoder, args.vae_batch_size, True)}
        wanted = {"floor", *args.rows.split(",")}
        report(run_rounds({n: f for n, f in candidates.items() if n in wanted}, args.rounds), "floor")
        if args.text:
            captions = [f"a photo number {i}, bench, {random.Random(i).choice(['red', 'blue'])}"
                        for i in range(args.images)]
            floor, ours = text_rows(captions, args.vae_batch_size, args.model)
            print(f"text-encoder outputs ({'CLIP ViT-L' if args.model == 'sd15' else 'tiny'} config, random "
                  "weights):")
            report(run_rounds({"te floor": floor, "te cache": ours}, args.rounds), "te floor", "caption")
        if args.first_epoch:
            first_epoch(images, res, args.vae_batch_size)


if __name__ == "__main__":
    main()
