"""Captions: read per image, then shuffled and dropped per step as sd-scripts does.

Reading happens once while indexing (errors name the file); `process_caption`
runs for every sample with its own `random.Random`, so the result depends on
the seed and the sample's place in the epoch only (not on data-loader workers).
"""

import random
import re
from pathlib import Path

from lora_sd.errors import DataError


def read_caption_file(path: Path, enable_wildcard: bool = False) -> str:
    """The caption in `path`: its first line, or all non-empty lines with wildcards."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: caption file is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read caption file ({e.strerror})") from None
    lines = [line.strip() for line in text.splitlines()]
    if enable_wildcard:
        return "\n".join(line for line in lines if line)
    return lines[0] if lines else ""


def find_caption(image_path: Path, caption_extension: str) -> Path | None:
    """`img.png` -> `img.caption` (or whatever extension), or None when there is none.

    `.txt` is also accepted when the configured extension has no file, since
    many tools write `.txt` captions.
    """
    for ext in dict.fromkeys([caption_extension, ".txt"]):
        candidate = image_path.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _split(caption: str, sep: str) -> list[str]:
    return [t.strip() for t in caption.split(sep) if t.strip()]


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """One random line, and `{a|b|c}` replaced by one choice (`{{`/`}}` are literal braces)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = caption.replace("{{", "\x00").replace("}}", "\x01")
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace("\x00", "{").replace("\x01", "}")


def process_caption(caption: str, subset, rng: random.Random, epoch: int = 1) -> str:
    """sd-scripts' process_caption: prefix/suffix, dropout, wildcards, shuffle, tag dropout.

    `epoch` counts from 1, as sd-scripts' current_epoch.
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    sep = subset.caption_separator
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        fixed, suffix = [], []
        keep_sep = subset.keep_tokens_separator
        if keep_sep and keep_sep in caption:
            fixed_part, flex_part = caption.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                suffix = _split(suffix_part, sep)
            fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tokens[: subset.keep_tokens], tokens[subset.keep_tokens:]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, sep)
    return caption


def tag_counts(captions) -> dict[str, int]:
    """sd-scripts' tag frequency: comma-separated tags, stripped and lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
