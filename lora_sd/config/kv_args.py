"""The `key=value` list options: `network_args` and `optimizer_args`, parsed here so config load checks them.

lora_sd.training.network and lora_sd.training.optim use these parsers, so
what the config accepts is what training gets. Numbers must be finite and
alphas not negative (sd-scripts reads alpha 0 as alpha = rank).
"""

import ast
import math

from lora_sd.errors import ConfigError

NETWORK_ARGS = ("conv_dim", "conv_alpha")
LYCORIS = "lycoris.kohya"
ALGOS = ("lora", "locon", "loha", "lokr")  # lora and locon are the same network (LoCon: with conv_dim)
PRESETS = ("full",)  # the networks.lora target set (lora_sd.targets); LyCORIS' other presets are not built
# lycoris.kohya's network_args -> (type, the algos it fits; None: all)
LYCORIS_ARGS = {
    "algo": (str, None), "preset": (str, None), "conv_dim": (int, None), "conv_alpha": (float, None),
    "factor": (int, ("lokr",)), "decompose_both": (bool, ("lokr",)), "use_tucker": (bool, ("loha", "lokr")),
    "dora_wd": (bool, ("lora", "locon")), "wd_on_output": (bool, ("lora", "locon")),
    "dropout": (float, None), "rank_dropout": (float, ("loha", "lokr")), "module_dropout": (float, ("loha", "lokr")),
}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_network_args(items: list[str], network_module: str = "networks.lora") -> dict:
    """["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": 4, "conv_alpha": 1.0}; ConfigError naming the key.

    With `network_module = "lycoris.kohya"`, LyCORIS' args too (LYCORIS_ARGS): the result always has
    "algo" ("lora" by default, as LyCORIS), and each option is checked against the algorithm.
    """
    lycoris = network_module == LYCORIS
    allowed = LYCORIS_ARGS if lycoris else dict.fromkeys(NETWORK_ARGS)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if sep and not lycoris and key in LYCORIS_ARGS and key not in NETWORK_ARGS:
            raise ConfigError(f"{key} is a LyCORIS option: set `network_module = \"{LYCORIS}\"` for "
                              f"algo=lora|locon|loha|lokr (networks.lora takes conv_dim, conv_alpha)")
        if not sep or key not in allowed:
            supported = ", ".join(f"{k}=N" for k in NETWORK_ARGS) if not lycoris else ", ".join(LYCORIS_ARGS)
            raise ConfigError(f"got {item!r}; supported: {supported}")
        out[key] = _value(key, value, LYCORIS_ARGS[key][0] if lycoris else (int if key == "conv_dim" else float))
    if lycoris:
        _check_lycoris(out)
    return out


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
        raise ConfigError("dropout is not supported with lycoris.kohya (PEFT's layers have no such dropout); use "
                          "rank_dropout / module_dropout with algo=loha or lokr, or remove it")
    for key in ("rank_dropout", "module_dropout"):
        if args.get(key, 0) >= 1:
            raise ConfigError(f"{key} must be below 1, got {args[key]}")
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
