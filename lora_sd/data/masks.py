"""Loss masks (issue 12), sd-scripts' `masked_loss`: where each training image comes from.

- A subset's `conditioning_data_dir` (sd-scripts' ControlNet-style subsets): a folder with one image per
  training image, of the same file stem (any image extension) and the same size; its red channel is the mask
  (255 = trained, 0 = ignored). Used with `masked_loss = true`.
- A subset's `alpha_mask = true`: the image's own alpha channel (read before lora-sd composites transparency
  on white; an image without alpha is all opaque). As in sd-scripts, it masks the loss even without
  `masked_loss`.
Subsets with neither train on the whole image (a mask of ones) when others in the run have masks.

Masks are resized, cropped and flipped with their image (lora_sd.data.transforms.load_sample) and cached with
the latents (lora_sd.data.latents: the key names the mask file's bytes or the alpha; the mask is stored area-
resized to the latents' size, what the loss uses). Refused, before training writes anything: `masked_loss`
without any mask, `conditioning_data_dir` without `masked_loss` (it would be ignored), both in one subset, a
missing mask and a mask of another size than its image, each naming the file.
"""

import logging
from pathlib import Path

from lora_sd.data.images import IMAGE_EXTENSIONS, image_size
from lora_sd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MASKING = "mask:red-channel|alpha;resized-with-image;area-to-latents"  # in cache keys, as images.DECODING


def check_mask_options(cfg):
    """The options that cannot work together (ConfigError naming them), from the config alone."""
    subsets = [sub for ds in cfg.datasets for sub in ds.subsets]
    for sub in subsets:
        if sub.conditioning_data_dir and sub.alpha_mask:
            raise ConfigError(f"subset {sub.name}: `conditioning_data_dir` and `alpha_mask` are both set; a subset's "
                              "masks come from one of them")
        if sub.conditioning_data_dir and not cfg.masked_loss:
            raise ConfigError(f"`conditioning_data_dir` {sub.conditioning_data_dir} (subset {sub.name}) holds loss "
                              "masks, used with `masked_loss = true`: set it, or remove conditioning_data_dir")
    if cfg.masked_loss and not any(sub.conditioning_data_dir or sub.alpha_mask for sub in subsets):
        raise ConfigError("`masked_loss` needs masks: give a subset `conditioning_data_dir` (a folder of masks named "
                          "as the images) or `alpha_mask = true` (the images' alpha channel)")


def _masks_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"`conditioning_data_dir` {folder} does not exist or is not a folder")
    masks = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            masks.setdefault(p.stem, p)  # sorted: x.jpg before x.png, as sd-scripts' glob picks the first
    return masks


def attach_masks(rows: list[dict], configs) -> list[dict]:
    """Each index row gains `mask_path` ("" for none) and `alpha_mask`; DataError for a missing mask or one of
    another size than its image (sizes from the headers, upright)."""
    folders: dict[str, dict[str, Path]] = {}
    for row in rows:
        sub = configs[row["dataset"]].subsets[row["subset"]]
        row["alpha_mask"], row["mask_path"] = bool(sub.alpha_mask), ""
        if not sub.conditioning_data_dir:
            continue
        folder = sub.conditioning_data_dir
        if folder not in folders:
            folders[folder] = _masks_in(Path(folder))
        image = Path(row["image_path"])
        mask = folders[folder].get(image.stem)
        if mask is None:
            raise DataError(f"`conditioning_data_dir` {folder}: no mask for {image} (an image named "
                            f"{image.stem}{IMAGE_EXTENSIONS[0]}, {image.stem}.jpg, ... is needed)")
        size = image_size(mask)
        if size != (row["width"], row["height"]):
            raise DataError(f"{mask}: the mask is {size[0]}x{size[1]} but its image {image} is {row['width']}x"
                            f"{row['height']}; a mask must have its image's size")
        row["mask_path"] = str(mask)
    for folder, masks in folders.items():
        used = {Path(r["mask_path"]) for r in rows if r["mask_path"]}
        extra = [p.name for p in masks.values() if p not in used]
        if extra:
            logger.warning("`conditioning_data_dir` %s: %d mask(s) without an image: %s", folder, len(extra),
                           ", ".join(extra[:5]))
    return rows


def has_mask(row: dict) -> bool:
    return bool(row.get("mask_path") or row.get("alpha_mask"))


def mask_key_parts(row: dict, digest) -> list[str]:
    """What a cached entry's mask depends on (nothing for a row without a mask: its key stays as before)."""
    if row.get("mask_path"):
        return [MASKING, "file:" + digest(row["mask_path"])]
    if row.get("alpha_mask"):
        return [MASKING, "alpha"]  # the image's bytes, already in the key, hold the alpha
    return []
