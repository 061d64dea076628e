"""Checks of the recipes' arguments, shared by merge, SVD merge, extraction and generation.

Each returns the checked value or raises a one-line ConfigError naming the
option; they run before any file is read, so a bad argument costs nothing.
"""

import math
from pathlib import Path

import torch

from lora_sd.errors import ConfigError
from lora_sd.io import check_writable_folder, refuse_overwriting_inputs


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
    """'cpu' / 'cuda' / 'cuda:N' as a torch.device; ConfigError when CUDA is asked for and absent."""
    device = device or "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {device!r} is not a device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def check_rank(value, option) -> int:
    if value is None or int(value) != value or value <= 0:
        raise ConfigError(f"{option}: must be a positive whole number, got {value!r}")
    return int(value)


def check_output(output, inputs, option="--save_to"):
    """Before any work: `output` must not be (in, or hold) one of `inputs`, and its folder must be
    creatable and writable. The write itself can still fail (a full disk): the recipes report that
    as one line too, and `io.atomic_path` leaves nothing behind."""
    refuse_overwriting_inputs(output, inputs, option)
    check_writable_folder(Path(output).absolute().parent, f"{option} {output}")
