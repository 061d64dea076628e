"""Dataset config: sd-scripts' `[general]` / `[[datasets]]` / `[[datasets.subsets]]`.

Values are inherited general -> dataset -> subset (the nearest one wins), as
in sd-scripts' config_util. Unlike sd-scripts, unknown keys and impossible
values are errors that name the key and the file; all of them are reported
together in one line.

Loss masks (lora_sd.data.masks): a subset's `conditioning_data_dir` (a folder
of masks named as the images, used with `masked_loss`) or `alpha_mask`
(the images' alpha channel; inherited like the other subset keys).

Also the DreamBooth folder convention without a TOML: `train_data_dir/10_sks dog/`
(10 repeats, class tokens "sks dog"), `reg_data_dir/1_dog/`.
"""

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from lora_sd import demo
from lora_sd.config.coerce import CoercionError, coerce
from lora_sd.data.buckets import bucket_reso_range
from lora_sd.errors import ConfigErrors, DataError
from lora_sd.io import read_toml

logger = logging.getLogger(__name__)


@dataclass
class SubsetConfig:
    """One image folder (DreamBooth style) or one metadata file (fine-tuning style)."""

    image_dir: str | None = None
    metadata_file: str | None = None  # fine-tuning JSON: image key -> {"caption", "tags"}
    is_reg: bool = False
    class_tokens: str | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    cache_info: bool = False  # accepted for sd-scripts configs; headers are read anyway
    conditioning_data_dir: str | None = None  # loss masks named as the images (sd-scripts' ControlNet subsets)
    alpha_mask: bool = False  # the images' alpha channel is the loss mask

    @property
    def name(self) -> str:
        """What sd-scripts' metadata calls this subset (ss_dataset_dirs, ss_tag_frequency)."""
        return Path(self.metadata_file or self.image_dir or "").name


@dataclass
class DatasetConfig:
    """Images sharing one resolution, batch size and bucket settings."""

    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0  # sd-scripts': a fraction of each training subset held out (data.index)
    validation_seed: int | None = None  # of that split (default: the training seed)
    subsets: list[SubsetConfig] = field(default_factory=list)


_SUBSET_KEYS = {f.name for f in dataclasses.fields(SubsetConfig)}
_DATASET_KEYS = {f.name for f in dataclasses.fields(DatasetConfig)} - {"subsets"}
# sd-scripts keys we read but do not implement: accepted only at their default.
_REFUSED = {
    "face_crop_aug_range": None,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
}
_KNOWN = _SUBSET_KEYS | _DATASET_KEYS | set(_REFUSED)
# Only meaningful per subset: sd-scripts does not let them be inherited.
_SUBSET_ONLY = {"image_dir", "metadata_file", "is_reg", "conditioning_data_dir"}


def _field_types(cls):
    return {f.name: f.type for f in dataclasses.fields(cls)}


_TYPES = {**_field_types(SubsetConfig), **_field_types(DatasetConfig)}


def _check_unknown(table: dict, allowed: set, section: str, errors: ConfigErrors):
    for key in sorted(set(table) - allowed):
        errors.unknown(key, allowed, f"{section}.{key}" if section else key)


def _check_refused(table: dict, section: str, errors: ConfigErrors):
    for key, default in _REFUSED.items():
        if key in table and table[key] != default:
            errors.add(f"{section}.{key}", "is not supported by lora-sd; remove it")


def _coerce(key: str, value, section: str, errors: ConfigErrors):
    """A TOML value as the field's type (the training config's coercer); None with an error added."""
    try:
        return coerce(value, _TYPES[key])
    except CoercionError as e:
        errors.add(f"{section}.{key}", str(e))
        return None


# Numeric keys' (minimum, maximum or None).
_DATASET_RANGES = {"batch_size": (1, None)}
_SUBSET_RANGES = {"num_repeats": (1, None), "keep_tokens": (0, None), "caption_dropout_every_n_epochs": (0, None),
                  "caption_dropout_rate": (0, 1), "caption_tag_dropout_rate": (0, 1)}


def _check_ranges(obj, ranges: dict, label: str, errors: ConfigErrors):
    for key, (low, high) in ranges.items():
        value = getattr(obj, key)
        if high is None and value < low:
            errors.add(f"{label}.{key}", f"must be >= {low}, got {value}")
        elif high is not None and not low <= value <= high:
            errors.add(f"{label}.{key}", f"must be in [{low}, {high}], got {value}")


def _check_values(ds: DatasetConfig, label: str, errors: ConfigErrors):
    """Impossible values, named by key; `label` says which dataset/subset."""
    w, h = ds.resolution
    _check_ranges(ds, _DATASET_RANGES, label, errors)
    if not 0 <= ds.validation_split < 1:
        errors.add(f"{label}.validation_split", f"must be in [0, 1) (the fraction held out), got {ds.validation_split}")
    if ds.bucket_reso_steps < 8 or ds.bucket_reso_steps % 8:
        errors.add(f"{label}.bucket_reso_steps",
                   f"must be a positive multiple of 8 (latents are 1/8 size), got {ds.bucket_reso_steps}")
    if ds.enable_bucket and ds.bucket_reso_steps > math.sqrt(w * h):
        errors.add(f"{label}.bucket_reso_steps", f"({ds.bucket_reso_steps}) is above the resolution's side "
                   f"({int(math.sqrt(w * h))}): no bucket fits")
    elif ds.enable_bucket and not ds.bucket_no_upscale:
        low, high = bucket_reso_range(ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
        if ds.min_bucket_reso > ds.max_bucket_reso:
            errors.add(f"{label}.min_bucket_reso", f"({ds.min_bucket_reso}) is above `max_bucket_reso` "
                       f"({ds.max_bucket_reso}): no bucket is possible")
        elif min(w, h) < low:
            errors.add(f"{label}.min_bucket_reso", f"({ds.min_bucket_reso}) is above the resolution's "
                       f"smaller side ({min(w, h)}): no bucket fits")
        elif max(w, h) > high:
            errors.add(f"{label}.max_bucket_reso", f"({ds.max_bucket_reso}) is below the resolution's "
                       f"larger side ({max(w, h)}): no bucket fits")
    for i, sub in enumerate(ds.subsets):
        where = f"{label}.subsets[{i}]"
        if sub.image_dir is None and sub.metadata_file is None:
            errors.add(f"{where}.image_dir", "is required (or `metadata_file` for fine-tuning style)")
        _check_ranges(sub, _SUBSET_RANGES, where, errors)
        if sub.is_reg and sub.metadata_file:
            errors.add(f"{where}.is_reg", "is for DreamBooth-style folders, not `metadata_file` subsets")


def _read_table(table: dict, allowed: set, section: str, errors: ConfigErrors) -> dict:
    """One TOML table: unknown keys, refused keys and types, each error naming `section`; the typed values."""
    _check_unknown(table, allowed, section, errors)
    _check_refused(table, section, errors)
    return _typed(table, section, errors)


def _typed(table: dict, section: str, errors: ConfigErrors) -> dict:
    """Type-check one table where it is written, so each error names its own section."""
    out = {}
    for key, value in table.items():
        if key in _TYPES and key != "subsets" and value is not None:
            value = _coerce(key, value, section, errors)
            if value is not None:
                out[key] = value
    return out


def _resolve(fallbacks: list[dict], cls, skip=()):
    """Build `cls` from the nearest (already typed) table that sets each field."""
    values = {}
    for f in dataclasses.fields(cls):
        table = next((t for t in fallbacks if f.name in t), None)
        if f.name not in skip and table is not None:
            values[f.name] = table[f.name]
    return cls(**values)


def _relative_to(path: str | None, base: Path | None) -> str | None:
    if path is None or base is None or Path(path).is_absolute():
        return path
    return str(base / path)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tables(value, label: str, what: str, errors: ConfigErrors) -> list[dict]:
    """An array of tables (`[[what]]`, at least one): anything else (a number, a list of strings, ...) is one
    error naming `label`, and nothing to read."""
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        return value
    errors.add(label, f"must hold at least one [[{what}]] table" + (f", got {_short(value)}" if value else ""))
    return []


def load_dataset_config(source, *, path_for_errors=None, defaults: dict | None = None,
                        base_dir=None) -> list[DatasetConfig]:
    """Read a dataset TOML file (or its already-parsed dict) into DatasetConfigs.

    `defaults` are the lowest-priority values (e.g. `resolution` from the
    training config, as sd-scripts' command line fills them). Relative
    `image_dir`/`metadata_file` are taken as given (relative to the working
    directory, as in sd-scripts) unless `base_dir` is set.
    """
    if isinstance(source, dict):
        raw, where = source, str(path_for_errors or "dataset config")
    else:
        where = str(path_for_errors or source)
        raw = read_toml(source, "dataset config file", where)
    errors = ConfigErrors(where)
    _check_unknown(raw, {"general", "datasets"}, "", errors)
    general = raw.get("general", {})
    if not isinstance(general, dict):
        errors.add("general", f"must be a [general] table, got {_short(general)}")
        general = {}
    general_typed = _read_table(general, _KNOWN - _SUBSET_ONLY, "general", errors)
    defaults_typed = _typed(defaults or {}, "defaults", errors)
    datasets_raw = _tables(raw.get("datasets"), "datasets", "datasets", errors)
    if not datasets_raw:
        errors.raise_if_any()
    base = Path(base_dir) if base_dir is not None else None
    out = []
    for d, ds_raw in enumerate(datasets_raw):
        label = f"datasets[{d}]"
        fallbacks = [_read_table(ds_raw, (_KNOWN - _SUBSET_ONLY) | {"subsets"}, label, errors), general_typed,
                     defaults_typed]
        ds = _resolve(fallbacks, DatasetConfig, skip={"subsets"})
        subsets_raw = _tables(ds_raw.get("subsets"), f"{label}.subsets", "datasets.subsets", errors)
        for s, sub_raw in enumerate(subsets_raw):
            where_s = f"{label}.subsets[{s}]"
            sub = _resolve([_read_table(sub_raw, _SUBSET_KEYS | set(_REFUSED), where_s, errors)] + fallbacks,
                           SubsetConfig)
            sub.image_dir = _relative_to(sub.image_dir, base)
            sub.metadata_file = _relative_to(sub.metadata_file, base)
            sub.conditioning_data_dir = _relative_to(sub.conditioning_data_dir, base)
            if sub.caption_extension and not sub.caption_extension.startswith("."):
                sub.caption_extension = "." + sub.caption_extension
            ds.subsets.append(sub)
        kinds = {s.metadata_file is not None for s in ds.subsets}
        if len(kinds) > 1:
            errors.add(f"{label}.subsets", "mixes DreamBooth (image_dir) and fine-tuning (metadata_file) "
                       "subsets; split them into two [[datasets]]")
        _check_values(ds, label, errors)
        out.append(ds)
    errors.raise_if_any()
    return out


def _parse_folder_name(name: str) -> tuple[int, str] | None:
    """`10_sks dog` -> (10, "sks dog"); None when the name has no repeat count."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def _subfolders(root: str, kind: str) -> list[Path]:
    if root == demo.IMAGES:  # made when training starts (lora_sd.demo); loading a config writes nothing
        return [demo.asset_path(root) / name for name in demo.IMAGE_FOLDERS]
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"`{kind}` {root} is not a folder")
    return sorted(p for p in root_path.iterdir() if p.is_dir())


def _folder_subsets(root: str, is_reg: bool) -> list[dict]:
    subsets = []
    for child in _subfolders(root, "reg_data_dir" if is_reg else "train_data_dir"):
        parsed = _parse_folder_name(child.name)
        if parsed is None:
            logger.warning("ignoring %s: its name does not start with a repeat count like `10_`", child)
            continue
        repeats, tokens = parsed
        subsets.append({"image_dir": str(child), "num_repeats": repeats,
                        "class_tokens": tokens or None, "is_reg": is_reg})
    if not subsets:
        raise DataError(f"{root}: no subfolder named like `10_sks dog` (repeats_class tokens)")
    return subsets


def dreambooth_dataset_config(train_data_dir, reg_data_dir=None, **general_options) -> list[DatasetConfig]:
    """The folder convention: one dataset, a subset per `N_tokens` subfolder.

    `general_options` are any `[general]` keys (resolution, enable_bucket, ...).
    """
    subsets = _folder_subsets(str(train_data_dir), is_reg=False)
    if reg_data_dir is not None:
        subsets += _folder_subsets(str(reg_data_dir), is_reg=True)
    raw = {"general": general_options, "datasets": [{"subsets": subsets}]}
    return load_dataset_config(raw, path_for_errors=f"train_data_dir {train_data_dir}")
