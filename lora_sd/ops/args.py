"""Checks of the recipes' arguments, shared by merge, SVD merge, extraction and generation.

Each returns the checked value or raises a one-line ConfigError naming the
option; they run before any file is read, so a bad argument costs nothing.
"""

import math
from pathlib import Path

import torch

from lora_sd.errors import ConfigError


def check_pairs(values, items, option, what="model"):
    """ConfigError unless there is one of `values` per item: lists paired by position (a LoRA and its
    ratio, ...) would otherwise be cut to the shorter one by `zip`, dropping a LoRA without a word."""
    if len(values) != len(items):
        raise ConfigError(f"{option}: {len(values)} value(s) for {len(items)} {what}(s); give one per {what}")


def parse_ratios(models, ratios, option="--ratios") -> list[float]:
    """One float per model; none given means 1.0 each. ConfigError on a count or value problem."""
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(models)
    check_pairs(ratios, models, option)
    values = []
    for r in ratios:
        try:
            values.append(float(r))
        except (TypeError, ValueError):
            raise ConfigError(f"{option}: {r!r} is not a number") from None
        if not math.isfinite(values[-1]):
            raise ConfigError(f"{option}: {r!r} is not a finite number")
    return values


def resolve_device(device: str | None) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:N' / 'mps' as a torch.device; ConfigError for any other device type (meta, xla,
    ...: torch names them, but nothing here runs there) and for one that is not on this machine."""
    device = device or "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {device!r} is not a device (use cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0; use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: no Apple MPS device is available here; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: not supported; use cpu, cuda, cuda:N or mps")
    return dev


def check_rank(value, option) -> int:
    if value is None or int(value) != value or value <= 0:
        raise ConfigError(f"{option}: must be a positive whole number, got {value!r}")
    return int(value)




def check_model_config(models, model_config, option="--model_config"):
    """ConfigError when `model_config` is given but no model is a single file: diffusers folders (and hub ids)
    carry their own configs, so it would be ignored without a word."""
    if model_config is not None and not any(Path(m).is_file() for m in models):
        raise ConfigError(f"{option} {model_config}: only used for single-file models, but "
                          f"{' and '.join(str(m) for m in models)} {'is a folder' if len(models) == 1 else 'are folders'}"
                          " holding the model's own configs; drop it")
