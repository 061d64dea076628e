"""The index: one `datasets.Dataset` row per image, built from image headers.

Columns: image_path, caption (raw, before shuffle/dropout), caption_source
("file" | "class_tokens" | "metadata" | "none"), tag_text (what tag frequency
counts), width, height (upright: the EXIF orientation applied, see
data.images), bucket_w, bucket_h, resized_w, resized_h, num_repeats (after regularization balancing; 0 = this reg image is unused),
is_reg, dataset, subset, is_val (held out for the validation loss: `split_validation`; num_repeats 1).
Only headers are read (PIL opens lazily), so
indexing a large folder does not decode any image.
"""

import json
import logging
import math
import random
from pathlib import Path

import datasets
from tqdm import tqdm

from lora_sd.data.buckets import BucketAssigner, BucketSettings
from lora_sd.data.captions import find_caption, read_caption_file
from lora_sd.data.images import IMAGE_EXTENSIONS, image_size
from lora_sd.errors import DataError

logger = logging.getLogger(__name__)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (as sd-scripts' glob_images)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _dreambooth_rows(sub) -> list[dict]:
    folder = Path(sub.image_dir)
    if not folder.is_dir():
        raise DataError(f"`image_dir` {folder} does not exist or is not a folder")
    images = list_images(folder)
    if not images:
        raise DataError(f"`image_dir` {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    rows = []
    for path in images:
        cap_path = find_caption(path, sub.caption_extension)
        if cap_path is not None:
            caption, source = read_caption_file(cap_path, sub.enable_wildcard), "file"
        elif sub.class_tokens:
            caption, source = sub.class_tokens, "class_tokens"
        else:
            caption, source = "", "none"
        rows.append({"image_path": str(path), "caption": caption, "caption_source": source,
                     "tag_text": caption})
    missing = sum(r["caption_source"] != "file" for r in rows)
    if missing:
        logger.info("%s: %d of %d images have no %s caption file; using class tokens %r",
                    folder, missing, len(rows), sub.caption_extension, sub.class_tokens or "")
    return rows


def _find_metadata_image(key: str, image_dir: Path | None) -> Path | None:
    if Path(key).is_file():
        return Path(key)
    if image_dir is None:
        return None
    for candidate in [image_dir / key] + [image_dir / (key + ext) for ext in IMAGE_EXTENSIONS]:
        if candidate.is_file():
            return candidate
    return None


def _metadata_entry(entry, key: str, meta_path: Path) -> tuple[str | None, str | None]:
    """(caption, tags) of one metadata entry: strings or absent, and not both absent or empty (sd-scripts
    asserts "caption or tag is required"; an entry of another shape would train on an empty caption)."""
    if not isinstance(entry, dict):
        raise DataError(f"`metadata_file` {meta_path}: the entry for {key!r} must be an object "
                        f'{{"caption": "...", "tags": "..."}}, got {type(entry).__name__}')
    caption, tags = entry.get("caption"), entry.get("tags")
    for name, value in (("caption", caption), ("tags", tags)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"`metadata_file` {meta_path}: {key!r} `{name}` must be a string, "
                            f"got {type(value).__name__}")
    if not caption and not tags:
        raise DataError(f"`metadata_file` {meta_path}: {key!r} has neither `caption` nor `tags` (one is required)")
    return caption, tags


def _metadata_rows(sub) -> list[dict]:
    meta_path = Path(sub.metadata_file)
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"`metadata_file` {meta_path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"`metadata_file` {meta_path}: not UTF-8 JSON ({e})") from None
    if not isinstance(metadata, dict) or not metadata:
        raise DataError(f"`metadata_file` {meta_path}: expected a non-empty object of image key -> "
                        "{caption, tags}")
    image_dir = Path(sub.image_dir) if sub.image_dir else None
    rows = []
    for key, entry in metadata.items():
        path = _find_metadata_image(key, image_dir)
        if path is None:
            raise DataError(f"`metadata_file` {meta_path}: no image for key {key!r} "
                            f"(looked in {image_dir or 'the working directory'})")
        caption, tags = _metadata_entry(entry, key, meta_path)
        if caption is None:
            caption, tags = tags, None
        if tags and sub.enable_wildcard:  # sd-scripts: the tags on one line, added to every caption line
            tags = tags.replace("\n", sub.caption_separator)
            caption = "\n".join(f"{line}{sub.caption_separator} {tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = caption + sub.caption_separator + " " + tags
        rows.append({"image_path": str(path), "caption": caption, "caption_source": "metadata",
                     "tag_text": tags or ""})
    return rows


def _balance_reg(train_images: int, reg_rows: list[dict]):
    """sd-scripts' rule: reg images get repeats until they match the train images.

    The first pass takes each reg image with its subset's repeats; later passes
    add one repeat to each in turn. Reg images never reached get 0 (unused).
    """
    original = [r["num_repeats"] for r in reg_rows]
    for r in reg_rows:
        r["num_repeats"] = 0
    n, first = 0, True
    while n < train_images:
        for r, repeats in zip(reg_rows, original):
            r["num_repeats"] += repeats if first else 1
            n += repeats if first else 1
            if n >= train_images:
                break
        first = False
    unused = sum(r["num_repeats"] == 0 for r in reg_rows)
    if unused:
        logger.warning("%d regularization images are not used: there are more than training images", unused)


def _header_rows(rows, assigner, steps, skip_bad_images, desc):
    kept = []
    for row in tqdm(rows, desc=desc, leave=False):
        path = Path(row["image_path"])
        try:
            w, h = image_size(path)
        except DataError as e:
            if not skip_bad_images:
                raise
            logger.warning("skipping %s", e)
            continue
        bucket, resized = assigner.select(w, h)
        if min(bucket) <= 0:
            raise DataError(f"{path}: {w}x{h} is smaller than `bucket_reso_steps` ({steps}); no bucket fits")
        row.update(width=w, height=h, bucket_w=bucket[0], bucket_h=bucket[1],
                   resized_w=resized[0], resized_h=resized[1])
        kept.append(row)
    return kept


def split_validation(rows: list[dict], fraction: float, seed: int):
    """Mark `fraction` of one subset's `rows` is_val, as sd-scripts' split_train_val: the rows shuffled with
    `random.Random(seed)`, the first ceil(n * (1 - fraction)) train, the rest validate (at least one image trains)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for i in order[math.ceil(len(rows) * (1 - fraction)):]:
        rows[i].update(is_val=True, num_repeats=1)


def build_index(configs, *, skip_bad_images: bool = False, validation_split: float = 0.0,
                validation_seed: int = 0) -> datasets.Dataset:
    """Every image of every subset, with its caption, size, bucket and repeats; the dataset's `validation_split`
    (else `validation_split`) of each training subset's images held out for validation with its
    `validation_seed` (else `validation_seed`): is_val; regularization images never are."""
    all_rows = []
    for d, ds in enumerate(configs):
        assigner = BucketAssigner(BucketSettings.of(ds))
        train_images, reg_rows = 0, []
        for s, sub in enumerate(ds.subsets):
            rows = _metadata_rows(sub) if sub.metadata_file else _dreambooth_rows(sub)
            rows = _header_rows(rows, assigner, ds.bucket_reso_steps, skip_bad_images, f"reading {sub.name}")
            if not rows:
                where = f"`metadata_file` {sub.metadata_file}" if sub.metadata_file else f"`image_dir` {sub.image_dir}"
                raise DataError(f"{where}: no readable images left")
            for row in rows:
                row.update(num_repeats=sub.num_repeats, is_reg=sub.is_reg, dataset=d, subset=s, is_val=False)
            if sub.is_reg:
                reg_rows += rows
            else:
                fraction = ds.validation_split or validation_split
                if fraction:
                    seed = validation_seed if ds.validation_seed is None else ds.validation_seed
                    split_validation(rows, fraction, seed)
                train_images += sub.num_repeats * sum(not r["is_val"] for r in rows)
            all_rows += rows
        if reg_rows:
            _balance_reg(train_images, reg_rows)
    columns = {key: [r[key] for r in all_rows] for key in all_rows[0]} if all_rows else {}
    return datasets.Dataset.from_dict(columns)
