"""The `key=value` list options: `network_args` and `optimizer_args`, parsed here so config load checks them.

lora_sd.training.network and lora_sd.training.optim use these parsers, so
what the config accepts is what training gets. Numbers must be finite and
alphas not negative (sd-scripts reads alpha 0 as alpha = rank).
"""

import ast
import math

from lora_sd.errors import ConfigError

# networks.lora's network_args -> type: "ints"/"floats" are comma lists (block_dims=2,4,...), "lr_weights" a comma list
# or one of sd-scripts' shapes (cosine, sine, linear, reverse_linear, zeros; "+0.5" adds a base)
NETWORK_ARGS = {
    "conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float,
    "loraplus_lr_ratio": float, "loraplus_unet_lr_ratio": float, "loraplus_text_encoder_lr_ratio": float,
    "down_lr_weight": "lr_weights", "mid_lr_weight": "floats", "up_lr_weight": "lr_weights",
    "block_lr_zero_threshold": float, "block_dims": "ints", "block_alphas": "floats", "conv_block_dims": "ints",
    "conv_block_alphas": "floats",
}
LR_WEIGHT_SHAPES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# list lengths: (SD 1.x/2.x, SDXL), as sd-scripts' networks.lora
LIST_LENGTHS = {"down_lr_weight": (12, 9), "up_lr_weight": (12, 9), "mid_lr_weight": (1, 3), "block_dims": (25, 23),
                "block_alphas": (25, 23), "conv_block_dims": (25, 23), "conv_block_alphas": (25, 23)}
LYCORIS = "lycoris.kohya"
ALGOS = ("lora", "locon", "loha", "lokr")  # lora and locon are the same network (LoCon: with conv_dim)
PRESETS = ("full",)  # the networks.lora target set (lora_sd.targets); LyCORIS' other presets are not built
# lycoris.kohya's network_args -> (type, the algos it fits; None: all)
LYCORIS_ARGS = {
    "algo": (str, None), "preset": (str, None), "conv_dim": (int, None), "conv_alpha": (float, None),
    "factor": (int, ("lokr",)), "decompose_both": (bool, ("lokr",)), "use_tucker": (bool, ("loha", "lokr")),
    "dora_wd": (bool, ("lora", "locon")), "wd_on_output": (bool, ("lora", "locon")),
    "dropout": (float, None),
    **{key: (typ, None) for key, typ in NETWORK_ARGS.items() if key not in ("conv_dim", "conv_alpha")},
}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_network_args(items: list[str], network_module: str = "networks.lora") -> dict:
    """["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": 4, "conv_alpha": 1.0}; ConfigError naming the key.

    With `network_module = "lycoris.kohya"`, LyCORIS' args too (LYCORIS_ARGS): the result always has
    "algo" ("lora" by default, as LyCORIS), and each option is checked against the algorithm.
    """
    lycoris = network_module == LYCORIS
    allowed = LYCORIS_ARGS if lycoris else NETWORK_ARGS
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if sep and not lycoris and key in LYCORIS_ARGS and key not in NETWORK_ARGS:
            raise ConfigError(f"{key} is a LyCORIS option: set `network_module = \"{LYCORIS}\"` for "
                              f"algo=lora|locon|loha|lokr (networks.lora takes {', '.join(NETWORK_ARGS)})")
        if not sep or key not in allowed:
            raise ConfigError(f"got {item!r}; supported: {', '.join(allowed)}")
        typ = LYCORIS_ARGS[key][0] if lycoris else NETWORK_ARGS[key]
        out[key] = _list(key, value, typ) if isinstance(typ, str) else _value(key, value, typ)
    for key in ("rank_dropout", "module_dropout"):
        if out.get(key, 0) >= 1:
            raise ConfigError(f"{key} must be below 1 (a probability), got {out[key]}")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if out.get(key, 1) <= 0:
            raise ConfigError(f"{key} must be > 0 (the up matrices' learning rate over the down ones'), got {out[key]}")
    if lycoris:
        _check_lycoris(out)
    return out


def _list(key, value, typ):
    """A comma list of numbers (sd-scripts reads an empty lr weight as 0), or an lr-weight shape name ("cosine+0.5")
    kept as a string for lora_sd.blocks, which knows the block count."""
    if typ == "lr_weights" and "," not in value:
        name, _, base = value.partition("+")
        if name.strip() not in LR_WEIGHT_SHAPES:
            raise ConfigError(f"{key} must be comma-separated numbers or one of {', '.join(LR_WEIGHT_SHAPES)} "
                              f"(+ a base, e.g. cosine+0.5); got {value!r}")
        if base:
            _value(key, base, float)
        return value.strip()
    items = [v.strip() for v in value.split(",")]
    if typ == "floats" or typ == "lr_weights":
        numbers = tuple(_value(key, v, float) if v else 0.0 for v in items)
    else:
        numbers = tuple(_value(key, v, int) for v in items)
    lengths = LIST_LENGTHS[key]
    if len(numbers) not in lengths:
        raise ConfigError(f"{key} must have {lengths[0]} values (SD 1.x/2.x) or {lengths[1]} (SDXL), one per block; "
                          f"got {len(numbers)}")
    return numbers


def _value(key, value, typ):
    if typ is bool:
        if value.lower() not in TRUE + FALSE:
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value.lower() in TRUE
    if typ is str:
        return value.lower()
    try:
        number = typ(value)
    except ValueError:
        what = "an integer" if typ is int else "a number"
        raise ConfigError(f"{key} must be {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if number < 0 and key != "factor":  # conv_dim 0: no 3x3 conv LoRA, as sd-scripts; conv_alpha 0: alpha = conv_dim
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return number


def _check_lycoris(args: dict):
    """The LyCORIS options that do not fit the algorithm, or that PEFT's layers cannot train."""
    algo = args.setdefault("algo", "lora")
    if algo not in ALGOS:
        raise ConfigError(f"algo must be one of {', '.join(ALGOS)}; got {algo!r}")
    for key, (_, algos) in LYCORIS_ARGS.items():
        if key in args and algos and algo not in algos and args[key] not in (False, 0):
            raise ConfigError(f"{key} does not apply to algo={algo} (it applies to {', '.join(algos)})")
    if args.get("preset", "full") not in PRESETS:
        raise ConfigError(f"preset {args['preset']!r} is not supported; supported: {', '.join(PRESETS)} (the "
                          "networks.lora targets: attention/MLP layers, and resnets/samplers with conv_dim)")
    if args.get("factor", -1) == 0 or args.get("factor", -1) < -1:
        raise ConfigError(f"factor must be -1 (the most square split) or >= 1, got {args['factor']}")
    if args.get("wd_on_output") is False:
        raise ConfigError("wd_on_output=false (DoRA's magnitude per input column) is not supported: PEFT's DoRA "
                          "keeps it per output row (wd_on_output=true)")
    if args.get("dropout"):
        raise ConfigError("dropout is not supported with lycoris.kohya; use `network_dropout` (algo=lora/locon), "
                          "rank_dropout / module_dropout, or remove it")
    if args.get("use_tucker") and not args.get("conv_dim"):
        raise ConfigError("use_tucker applies to 3x3 convs only: set conv_dim (and conv_alpha) too")


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
