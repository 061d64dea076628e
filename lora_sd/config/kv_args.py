"""The `key=value` list options: `network_args` and `optimizer_args`, parsed here so config load checks them.

lora_sd.training.network and lora_sd.training.optim use these parsers, so
what the config accepts is what training gets. Numbers must be finite and
alphas not negative (sd-scripts reads alpha 0 as alpha = rank).
"""

import ast
import math

from lora_sd.errors import ConfigError

NETWORK_ARGS = ("conv_dim", "conv_alpha")


def parse_network_args(items: list[str]) -> dict:
    """["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": 4, "conv_alpha": 1.0}; ConfigError naming the key."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in NETWORK_ARGS:
            raise ConfigError(f"got {item!r}; supported: " + ", ".join(f"{k}=N" for k in NETWORK_ARGS))
        try:
            out[key] = int(value) if key == "conv_dim" else float(value)
        except ValueError:
            what = "an integer" if key == "conv_dim" else "a number"
            raise ConfigError(f"{key} must be {what}, got {value!r}") from None
        if not math.isfinite(out[key]):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if out[key] < 0:  # conv_dim 0: no 3x3 conv LoRA, as sd-scripts; conv_alpha 0: alpha = conv_dim
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return out


def parse_optimizer_args(items: list[str]) -> dict:
    """["weight_decay=0.01", "betas=0.9,0.99"] -> {"weight_decay": 0.01, "betas": (0.9, 0.99)}.

    Values are Python literals; a comma makes a tuple; anything else stays a
    string, as sd-scripts keeps it. A non-finite number (`1e999`, `inf`, `nan`)
    is a ConfigError naming the key.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"`optimizer_args`: {item!r} is not key=value")
        parts = [v.strip() for v in value.split(",")]
        try:
            parsed = [ast.literal_eval(p) if p not in ("", "None") else None for p in parts]
        except (ValueError, SyntaxError):
            parsed = parts  # plain strings, as sd-scripts keeps them
        for p in parsed:
            if _non_finite(p):
                raise ConfigError(f"`optimizer_args`: {key} must be finite, got {value!r}")
        out[key] = tuple(parsed) if len(parsed) > 1 else parsed[0]
    return out


def _non_finite(value) -> bool:
    if isinstance(value, str):  # "inf", "nan", "-Infinity": not literals, but float() would read them
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, (int, float, complex)) and not math.isfinite(abs(value))
