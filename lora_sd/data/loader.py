"""build_train_data: dataset configs -> index -> buckets -> sampler -> DataLoader (+ latent cache).

A batch is a dict:
  "latents" [B, 4, h, w] (cached) or "pixel_values" [B, 3, H, W] in [-1, 1];
  "captions" list[str] after shuffle/dropout ("" when dropped);
  "loss_weights" [B]: 1.0, or prior_loss_weight for regularization images;
  "network_multipliers" [B]; "image_paths"; "flipped";
  "original_sizes_hw", "crop_top_lefts", "target_sizes_hw" [B, 2] (SDXL conditioning);
  "masks" [B, 1, H, W] (or [B, 1, h, w] at the latents' size when cached), 0..1, when a subset has loss masks
  (lora_sd.data.masks; ones for the images of other subsets).
"""

import logging
import os
import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from lora_sd.data.buckets import crop_box
from lora_sd.data.captions import process_caption, tag_counts
from lora_sd.data.index import build_index
from lora_sd.data.latents import LatentCache, default_cache_dir, latent_key
from lora_sd.data.masks import attach_masks, has_mask
from lora_sd.data.sampler import BucketBatchSampler
from lora_sd.data.transforms import load_sample
from lora_sd.errors import ConfigError

logger = logging.getLogger(__name__)


class TrainImages(Dataset):
    """Index rows -> training samples. Items are (row, sample_seed, epoch) from the sampler."""

    def __init__(self, rows: list[dict], configs, prior_loss_weight: float, cache: LatentCache | None,
                 keys: list[str | None]):
        self.rows = rows
        self.configs = configs
        self.prior_loss_weight = prior_loss_weight
        self.cache = cache
        self.keys = keys
        self.masked = any(has_mask(r) for r in rows)  # then every sample has a mask (ones where none)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        index, seed, epoch = item
        row = self.rows[index]
        ds = self.configs[row["dataset"]]
        sub = ds.subsets[row["subset"]]
        rng = random.Random(seed)
        flipped = sub.flip_aug and rng.random() < 0.5
        bucket, resized = (row["bucket_w"], row["bucket_h"]), (row["resized_w"], row["resized_h"])
        sample = {"image_path": row["image_path"], "flipped": flipped,
                  "loss_weight": self.prior_loss_weight if row["is_reg"] else 1.0,
                  "network_multiplier": ds.network_multiplier,
                  "original_size_hw": (row["height"], row["width"]), "target_size_hw": (bucket[1], bucket[0])}
        if self.keys[index] is not None:
            sample["latents"] = self.cache.get(self.keys[index], flipped)
            mask = self.cache.get_mask(self.keys[index], flipped)
            box = crop_box(resized, bucket)  # cached latents are always center crops
        else:
            sample["pixel_values"], box, mask = load_sample(
                row["image_path"], bucket, resized, mask_path=row["mask_path"], alpha_mask=row["alpha_mask"],
                flip=flipped, crop_rng=rng if sub.random_crop else None, color_rng=rng if sub.color_aug else None)
        if self.masked:
            size = (sample["latents"] if "latents" in sample else sample["pixel_values"]).shape[-2:]
            sample["mask"] = mask if mask is not None else torch.ones(1, *size)
        left = resized[0] - box[2] if flipped else box[0]  # the crop as seen in the flipped image
        sample["crop_top_left"] = (box[1], left)
        # sd-scripts counts epochs from 1 (caption_dropout_every_n_epochs=2 drops in epochs 2, 4, ...)
        sample["caption"] = process_caption(row["caption"], sub, rng, epoch + 1)
        return sample


def collate(samples: list[dict]) -> dict:
    """Samples of one bucket -> one batch dict (top-level so that workers can pickle it)."""
    batch = {"captions": [s["caption"] for s in samples],
             "image_paths": [s["image_path"] for s in samples],
             "flipped": [s["flipped"] for s in samples],
             "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
             "network_multipliers": torch.tensor([s["network_multiplier"] for s in samples], dtype=torch.float32)}
    for key, batch_key in (("original_size_hw", "original_sizes_hw"), ("crop_top_left", "crop_top_lefts"),
                           ("target_size_hw", "target_sizes_hw")):
        batch[batch_key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
    for key, batch_key in (("latents", "latents"), ("pixel_values", "pixel_values"), ("mask", "masks")):
        if key in samples[0]:
            batch[batch_key] = torch.stack([s[key] for s in samples])
    return batch


@dataclass
class TrainData:
    """What training needs from the data: the loader, the numbers for metadata (`index`: the training rows), and
    the validation batches (the images held out by `validation_split`, each once, in a fixed order)."""

    dataloader: DataLoader
    sampler: BucketBatchSampler
    index: "object"  # datasets.Dataset
    configs: list
    num_train_images: int
    num_reg_images: int
    validation_batches: list = field(default_factory=list)  # lists of (row, sample seed, epoch 0)
    validation_captions: list = field(default_factory=list)

    def validation_loader(self, batches: list) -> DataLoader:
        """A DataLoader over some of `validation_batches` (the same samples every time: fixed sample seeds)."""
        loader = self.dataloader
        return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=collate, num_workers=loader.num_workers,
                          pin_memory=loader.pin_memory)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int):
        """The next pass over `dataloader` yields this epoch's batches (shuffle from seed + epoch)."""
        self.sampler.choose_epoch(epoch)

    def captions(self) -> list[str]:
        """The captions training will see (each once), as the first epoch processes them (prefix, suffix,
        wildcards): what `cache_text_encoder_outputs` encodes up front."""
        captions = dict.fromkeys(self.validation_captions)
        for row in self.index.to_list():
            if row["num_repeats"] > 0:
                sub = self.configs[row["dataset"]].subsets[row["subset"]]
                captions[process_caption(row["caption"], sub, random.Random(0), 1)] = None
        return list(captions)

    def _subsets(self):
        for ds in self.configs:
            yield from ds.subsets

    def dataset_dirs_info(self) -> dict:
        """sd-scripts' ss_dataset_dirs: {folder or metadata name: {n_repeats, img_count}}."""
        counts = {}
        for d, s in zip(self.index["dataset"], self.index["subset"]):
            counts[(d, s)] = counts.get((d, s), 0) + 1
        info = {}
        for d, ds in enumerate(self.configs):
            for s, sub in enumerate(ds.subsets):
                info[sub.name] = {"n_repeats": sub.num_repeats, "img_count": counts.get((d, s), 0)}
        return info

    def tag_frequency(self) -> dict:
        """sd-scripts' ss_tag_frequency: {folder or metadata name: {tag: count}}."""
        texts: dict[str, list[str]] = {}
        for d, s, text in zip(self.index["dataset"], self.index["subset"], self.index["tag_text"]):
            texts.setdefault(self.configs[d].subsets[s].name, []).append(text)
        return {name: tag_counts(captions) for name, captions in texts.items()}

    def bucket_info(self) -> dict:
        """sd-scripts' ss_bucket_info: {"buckets": {i: {resolution, count}}, "mean_img_ar_error"}.

        Counts include repeats; several datasets are summed per resolution.
        """
        counts: dict[tuple[int, int], int] = {}
        errors = []
        columns = [self.index[c] for c in ("bucket_w", "bucket_h", "width", "height", "num_repeats")]
        for bucket_w, bucket_h, width, height, repeats in zip(*columns):
            if repeats == 0:
                continue
            counts[(bucket_w, bucket_h)] = counts.get((bucket_w, bucket_h), 0) + repeats
            errors.append(abs(bucket_w / bucket_h - width / height))  # sd-scripts' ar_error
        buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def _latent_cache(index_rows, configs, *, cache_latents, cache_latents_to_disk, encode_fn, vae_id, cache_dir,
                  vae_batch_size):
    """The cache and each row's key (None = no cached latents: pixels are loaded per step).

    `cache_latents_to_disk` implies `cache_latents` (as in sd-scripts); either way every key names the VAE.
    """
    keys = [None] * len(index_rows)
    if not (cache_latents or cache_latents_to_disk):
        return None, keys
    blocking = [f"{sub.name} ({'color_aug' if sub.color_aug else 'random_crop'})"
                for ds in configs for sub in ds.subsets if sub.color_aug or sub.random_crop]
    if blocking:
        logger.warning("latent caching is off: color_aug and random_crop change the pixels every step, "
                       "so latents cannot be cached (as in sd-scripts); subsets: %s", ", ".join(blocking))
        return None, keys
    if encode_fn is None:
        raise ConfigError("`cache_latents` needs the VAE: build_train_data(..., encode_fn=...) was not given one")
    root = (cache_dir or default_cache_dir()) if cache_latents_to_disk else None
    cache = LatentCache(root, vae_id)
    items = []
    for i, row in enumerate(index_rows):
        if row["num_repeats"] > 0:
            flip = configs[row["dataset"]].subsets[row["subset"]].flip_aug
            keys[i] = latent_key(row, flip, vae_id, content=cache_latents_to_disk)
            items.append((keys[i], row, flip))
    cache.fill(items, encode_fn, vae_batch_size)
    return cache, keys


def pinned_transfers(accelerator) -> str:
    """The training device's type, for build_train_data: on CUDA its batches are pinned (page-locked), and
    accelerate copies them to the GPU without blocking (safe: only host -> device copies, ordered on the stream
    before the step's kernels, from buffers the loader never reuses)."""
    device_type = accelerator.device.type
    if device_type == "cuda":
        accelerator.dataloader_config.non_blocking = True  # read by accelerator.prepare(dataloader)
    return device_type


def default_workers() -> int:
    """sd-scripts' default max_data_loader_n_workers: min(8, cpus - 1)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_train_data(datasets, *, seed: int, prior_loss_weight: float = 1.0,
                     max_data_loader_n_workers: int | None = None, persistent_data_loader_workers: bool = False,
                     cache_latents: bool = False, cache_latents_to_disk: bool = False, encode_fn=None,
                     vae_id: str = "", cache_dir=None, vae_batch_size: int = 1,
                     skip_bad_images: bool = False, validation_split: float = 0.0,
                     validation_seed: int | None = None, device_type: str = "cpu") -> TrainData:
    """Index the images, bucket them, cache latents if asked, and make the DataLoader.

    `encode_fn(pixels [B,3,H,W] in [-1,1]) -> latents [B,4,H/8,W/8]` (unscaled) is
    called only for images not cached yet; `vae_id` names the VAE weights so
    that a different VAE misses the disk cache; `vae_batch_size` images of
    one bucket are encoded per call (sd-scripts' option). `skip_bad_images`
    drops unreadable images with a warning instead of stopping.
    With several processes, build on the main process first
    (`accelerator.main_process_first()`) so the others find the disk cache filled.
    `validation_split` holds images out (index.split_validation, with `validation_seed`, default `seed`): they
    are cached with the rest but never trained on. `device_type` is the training device's ("cuda": the
    batches come in pinned memory, see `pinned_transfers`).
    """
    validation_seed = seed if validation_seed is None else validation_seed
    index = build_index(datasets, skip_bad_images=skip_bad_images, validation_split=validation_split,
                        validation_seed=validation_seed)
    rows = attach_masks(index.to_list(), datasets)
    cache, keys = _latent_cache(rows, datasets, cache_latents=cache_latents,
                                cache_latents_to_disk=cache_latents_to_disk, encode_fn=encode_fn,
                                vae_id=vae_id, cache_dir=cache_dir, vae_batch_size=vae_batch_size)
    def sampler_of(repeats, sampler_seed):
        return BucketBatchSampler([r["dataset"] for r in rows], [(r["bucket_w"], r["bucket_h"]) for r in rows],
                                  repeats, [ds.batch_size for ds in datasets], sampler_seed)

    sampler = sampler_of([0 if r["is_val"] else r["num_repeats"] for r in rows], seed)
    validation = sampler_of([int(r["is_val"]) for r in rows], validation_seed).batches(0)
    workers = default_workers() if max_data_loader_n_workers is None else max_data_loader_n_workers
    dataloader = DataLoader(TrainImages(rows, datasets, prior_loss_weight, cache, keys), batch_sampler=sampler,
                            collate_fn=collate, num_workers=workers, pin_memory=device_type == "cuda",
                            persistent_workers=persistent_data_loader_workers and workers > 0)
    num_train = sum(r["num_repeats"] for r in rows if not r["is_reg"] and not r["is_val"])
    # sd-scripts reports reg images with their own repeats, before balancing
    num_reg = sum(datasets[r["dataset"]].subsets[r["subset"]].num_repeats for r in rows if r["is_reg"])
    logger.info("%d training images with repeats, %d regularization images, %d batches per epoch",
                num_train, num_reg, len(sampler))
    held_out = [r for r in rows if r["is_val"]]
    if held_out:
        logger.info("%d images held out for validation (validation_split %s)", len(held_out), validation_split)
        index = index.select([i for i, r in enumerate(rows) if not r["is_val"]])
    captions = [process_caption(r["caption"], datasets[r["dataset"]].subsets[r["subset"]], random.Random(0), 1)
                for r in held_out]
    return TrainData(dataloader, sampler, index, list(datasets), num_train, num_reg, validation, captions)
