"""One coercer for the training and the dataset configs: a TOML or command-line value to its field's type.

TrainConfig (lora_sd.config.options) and the dataset tables
(lora_sd.data.dataset_config) both call `coerce`, so a value such as
`resolution = "768,512"` means the same in either file. Numbers must be
finite: TOML has `inf`/`nan` literals and the command line "inf"/"nan"
strings, and a non-finite learning rate would only show as NaN weights after
the model has loaded. Integers must fit in 64 bits: torch, numpy and the data
loader take them as int64 and overflow with a traceback.
"""

import math
import types
import typing


class CoercionError(ValueError):
    """The value does not fit its field; str() says what it must be (`must be an integer, got 'x'`)."""


NUMBER_OR_PAIR = float | list[float]  # text_encoder_lr: one value, or (te1, te2) for SDXL


def base_type(typ):
    """(type, optional) of an `int | None` style annotation (`float | list[float] | None`: NUMBER_OR_PAIR)."""
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else NUMBER_OR_PAIR), True
    return typ, False


def type_name(typ) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            list[str]: "a list of strings", NUMBER_OR_PAIR: "a finite number or a list of two (te1, te2)",
            tuple[int, int]: "a positive size S or W,H (TOML: S or [W, H])"}.get(typ, str(typ))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MIN_SIDE, MAX_SIDE = 8, 8192  # 8: the VAE halves a side three times


def parse_resolution(value) -> tuple[int, int]:
    """512, "512", "768,512", [768, 512] -> (width, height): sd-scripts' `--resolution` and dataset `resolution`.

    A one-number list is refused, as sd-scripts' dataset schema (a scalar or a pair) does.
    """
    if isinstance(value, str):
        try:
            numbers = [int(part) for part in value.split(",")]
        except ValueError:
            raise CoercionError(f"must be {type_name(tuple[int, int])}, got {value!r}") from None
        value = numbers[0] if len(numbers) == 1 else numbers
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)):
        raise CoercionError(f"must be {type_name(tuple[int, int])}, got {value!r}")
    if not all(MIN_SIDE <= v <= MAX_SIDE for v in value):
        # below: the VAE's convolutions have nothing left to slide over (a traceback mid-run);
        # above: every image is resized to that size in memory before anything else happens
        raise CoercionError(f"must have sides from {MIN_SIDE} to {MAX_SIDE} pixels, got {value!r}")
    return tuple(value)


INT64_MAX = 2**63 - 1


def int64(value: int) -> int:
    if not -INT64_MAX <= value <= INT64_MAX:
        raise CoercionError(f"must be an integer of at most {INT64_MAX}, got {value}")
    return value


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise CoercionError(f"must be a finite number, got {value!r}")
    return value


def coerce(value, typ, from_cli: bool = False):
    """`value` as `typ` (bool, int, float, str, list[str], tuple[int, int], or one of them `| None`).

    `from_cli`: `value` is a command-line string ("8", "true", "none", "inf").
    Raises CoercionError.
    """
    typ, optional = base_type(typ)
    if from_cli and not isinstance(value, str):
        from_cli = False  # an already typed override (Python API)
    if value is None or (from_cli and optional and value.lower() in ("none", "")):
        if optional:
            return None
        raise CoercionError(f"must be {type_name(typ)}, got nothing")
    got = f"must be {type_name(typ)}, got {value!r}"
    if typ is bool:
        if from_cli and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif typ is int:
        if from_cli:
            try:
                value = int(value)
            except ValueError:
                raise CoercionError(got) from None
        if is_int(value):
            return int64(value)
    elif typ is float:
        if from_cli:
            try:
                value = float(value)
            except ValueError:
                raise CoercionError(got) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return finite(float(value))
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ == list[str]:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                           for v in items):
            return [str(v) for v in items]
    elif typ == tuple[int, int]:
        return parse_resolution(value)
    elif typ == NUMBER_OR_PAIR:
        items = value if isinstance(value, list) else [value]
        try:
            numbers = [coerce(v, float, from_cli or isinstance(v, str)) for v in items]
        except CoercionError:
            raise CoercionError(got) from None
        if len(numbers) == 1:
            return numbers[0]
        if len(numbers) == 2:
            return numbers
    else:
        raise TypeError(f"no coercion for {typ}")  # a field of a type this module does not know: a bug
    raise CoercionError(got)
