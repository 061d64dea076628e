"""Latent cache: each training image encoded once by the VAE, then reused.

Where it lives (`cache_latents_to_disk`): `datasets` tables under
`<cache_dir>/<vae tag>/shard-*` (default cache_dir: the `datasets` cache,
`~/.cache/huggingface/datasets/lora_sd_latents`), not safetensors beside the
images as sd-scripts does. Why: image folders stay read-only and clean (they
may be shared, or on a read-only mount), several runs or datasets with other
buckets can share one cache, and `datasets` gives memory-mapped reads that
data-loader workers share. An entry's key hashes the image's bytes, its bucket
and resized size, the flip setting and the VAE id, so a changed image, bucket
or VAE simply misses and is re-encoded; stale entries are never read. Each
caching pass appends one shard (written atomically), so nothing is rewritten.
An image with a loss mask (lora_sd.data.masks) has its mask stored beside its
latents, area-resized to their size, and its key names the mask's source.

Without `cache_latents_to_disk` the same entries live in memory for the run.
"""

import hashlib
import logging
import time
import uuid
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lora_sd.data.images import DECODING
from lora_sd.data.masks import mask_key_parts
from lora_sd.data.transforms import load_sample_image, to_batch
from lora_sd.io import atomic_path

logger = logging.getLogger(__name__)

_FEATURES = datasets.Features({
    "key": datasets.Value("string"),
    "shape": datasets.List(datasets.Value("int32")),  # [4, H/8, W/8]
    "latents": datasets.List(datasets.Value("float32")),
    "latents_flipped": datasets.List(datasets.Value("float32")),  # empty without flip_aug
    "mask": datasets.List(datasets.Value("float32")),  # [1, H/8, W/8] loss mask; empty without one (data.masks)
})


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "lora_sd_latents"


_file_hashes: dict[tuple[str, int, int], str] = {}


def weights_fingerprint(*models) -> str:
    """sha256 of the models' weights (names, dtypes, bytes): a cache keyed by it misses when a weight changes."""
    h = hashlib.sha256()
    for i, model in enumerate(models):
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{i}.{name}.{t.dtype}".encode() if i or t.dtype != torch.float32 else name.encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's weights: cached latents are invalidated when the VAE changes, not only its path."""
    return weights_fingerprint(vae)


class VaeEncoder:
    """The `encode_fn` of the latent cache: pixels [B, 3, H, W] in [-1, 1] -> unscaled latents [B, 4, H/8, W/8].

    The VAE encodes in float32 (sd-scripts' no_half_vae). Each image draws its own noise from one seeded
    generator (diffusers' per-sample generators), so the latents do not depend on how many images share a
    VAE call. `vae_id` is the VAE's fingerprint, the part of every cache key that names the VAE.
    """

    def __init__(self, vae, seed: int):
        self.vae = vae
        self.generator = torch.Generator().manual_seed(seed)
        self.vae_id = vae_fingerprint(vae)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        latent_dist = self.vae.encode(pixels.to(device, torch.float32)).latent_dist
        return latent_dist.sample([self.generator] * len(pixels)).cpu()


def file_digest(path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) within a process."""
    st = Path(path).stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _file_hashes:
        with open(path, "rb") as f:
            _file_hashes[memo] = hashlib.file_digest(f, "sha256").hexdigest()
    return _file_hashes[memo]


def latent_key(row: dict, flip: bool, vae_id: str, content: bool = True) -> str:
    """What an entry depends on: image bytes, bucket, resized size, flip, VAE, the image decoding, and the loss
    mask's source when the row has one (lora_sd.data.masks).

    `content=False`, for the in-memory cache (filled and read within one run), names the image by its
    path instead of hashing its bytes, so that images are not read once more just for the key.
    """
    image = file_digest(row["image_path"]) if content else row["image_path"]
    parts = [image, row["bucket_w"], row["bucket_h"], row["resized_w"], row["resized_h"], int(flip), vae_id,
             DECODING]  # how pixels are decoded: latents of images decoded another way are not reused
    parts += mask_key_parts(row, file_digest if content else str)
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


class LatentCache:
    """key -> latents [4, h, w] (and the flipped image's latents), in memory or in `datasets` shards."""

    def __init__(self, root: Path | None, vae_id: str):
        if not vae_id:  # every key names the VAE, or another VAE's latents would be read back
            raise ValueError("a latent cache needs the VAE's fingerprint (vae_id, see VaeEncoder)")
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self.root = None if root is None else Path(root) / hashlib.sha256(vae_id.encode()).hexdigest()[:16]
        self.shards: list[datasets.Dataset] = []
        self.where: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        if self.root is not None and self.root.is_dir():
            for shard_dir in sorted(self.root.glob("shard-*")):
                self._add_shard(datasets.load_from_disk(str(shard_dir)))

    def _add_shard(self, shard: datasets.Dataset):
        self.shards.append(shard.with_format("numpy"))
        for i, key in enumerate(shard["key"]):
            self.where[key] = (len(self.shards) - 1, i)

    def __contains__(self, key) -> bool:
        return key in self.memory or key in self.where

    def get(self, key: str, flipped: bool = False) -> torch.Tensor:
        if key in self.memory:
            latents, latents_flipped, _ = self.memory[key]
            return latents_flipped if flipped else latents
        shard, i = self.where[key]
        entry = self.shards[shard][i]
        flat = entry["latents_flipped"] if flipped else entry["latents"]
        return torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(tuple(entry["shape"])))

    def get_mask(self, key: str, flipped: bool = False) -> torch.Tensor | None:
        """The entry's loss mask [1, h, w] at the latents' size (mirrored for the flipped image), or None."""
        if key in self.memory:
            mask = self.memory[key][2]
        else:
            shard, i = self.where[key]
            entry = self.shards[shard][i]
            flat = entry.get("mask")
            shape = (1, *entry["shape"][1:])
            has = flat is not None and len(flat) > 0  # shards written before masks have no mask column
            mask = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(shape)) if has else None
        return mask.flip(-1) if mask is not None and flipped else mask

    def fill(self, items: list[tuple[str, dict, bool]], encode_fn, batch_size: int = 4):
        """Encode the (key, index row, flip_aug) items not cached yet; returns how many were encoded."""
        todo = {key: (row, flip) for key, row, flip in items if key not in self}
        if not todo:
            logger.info("latent cache: all %d images cached", len(items))
            return 0
        # batches of one bucket (the VAE needs one shape per batch)
        by_bucket: dict[tuple, list] = {}
        for key, (row, flip) in todo.items():
            by_bucket.setdefault((row["bucket_w"], row["bucket_h"], flip), []).append((key, row))
        batches = [(flip, group[i:i + batch_size]) for (_, _, flip), group in by_bucket.items()
                   for i in range(0, len(group), batch_size)]
        new = {"key": [], "shape": [], "latents": [], "latents_flipped": [], "mask": []}
        start = time.perf_counter()
        for flip, batch in tqdm(batches, desc="caching latents", smoothing=1):
            encoded = self._encode(batch, flip, encode_fn)
            for (key, _), (latents, latents_flipped, mask) in zip(batch, encoded):
                if self.root is None:
                    self.memory[key] = (latents, latents_flipped, mask)
                    continue
                new["key"].append(key)
                new["shape"].append(list(latents.shape))
                new["latents"].append(latents)
                new["latents_flipped"].append(latents_flipped)
                new["mask"].append(mask)
        if self.root is not None:
            self._write_shard(new)
        seconds = time.perf_counter() - start
        logger.info("cached %d latents in %.1f s (%.2f images/s)", len(todo), seconds, len(todo) / max(seconds, 1e-9))
        return len(todo)

    @staticmethod
    def _encode(batch, flip, encode_fn):
        def run(pixels):
            with torch.no_grad():
                return encode_fn(pixels).detach().float().cpu()

        # each image is decoded once: load_sample flips after cropping, so the flipped crop is this one mirrored
        samples = [load_sample_image(row["image_path"], (row["bucket_w"], row["bucket_h"]), (row["resized_w"],
                                     row["resized_h"]), mask_path=row.get("mask_path"),
                                     alpha_mask=row.get("alpha_mask")) for _, row in batch]
        pixels = to_batch([image for image, _, _ in samples])
        latents = run(pixels)
        flipped = run(pixels.flip(-1)) if flip else [None] * len(batch)
        # the mask as the loss uses it: area-resized to the latents (mirroring commutes with it)
        masks = [None if mask is None else F.interpolate(mask[None], size=latents.shape[-2:], mode="area")[0]
                 for _, _, mask in samples]
        return list(zip(latents, flipped, masks))

    def _write_shard(self, columns: dict):
        # the float columns go to Arrow as one buffer each (offsets + values): from Python lists of arrays,
        # `datasets` would encode every value on its own; the stored format is the same List(float32)
        arrays = {name: _float_lists(columns[name]) for name in ("latents", "latents_flipped", "mask")}
        shard = datasets.Dataset.from_dict({"key": columns["key"], "shape": columns["shape"], **arrays},
                                           features=_FEATURES)
        target = self.root / f"shard-{uuid.uuid4().hex}"
        with atomic_path(target) as tmp:
            shard.save_to_disk(str(tmp))
        self._add_shard(datasets.load_from_disk(str(target)))
        logger.info("latent cache: %d new entries in %s", len(shard), target)


def _float_lists(tensors: list, max_values: int = 2**31 - 1) -> pa.ChunkedArray:
    """Tensors (None: an empty list) -> Arrow list<float32> of their flattened values, without converting value by
    value; in chunks of at most `max_values` values (list<float32> has 32-bit offsets)."""
    flat = [np.zeros(0, np.float32) if t is None else t.reshape(-1).numpy() for t in tensors]
    chunks, current, size = [], [], 0
    for f in flat:
        if current and size + len(f) > max_values:
            chunks.append(current)
            current, size = [], 0
        current.append(f)
        size += len(f)
    chunks.append(current)

    def lists(part):
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in part])]).astype(np.int32)
        values = np.concatenate(part) if part else np.zeros(0, np.float32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))

    return pa.chunked_array([lists(part) for part in chunks], pa.list_(pa.float32()))
