"""Command-line flags generated from TrainConfig's fields: `--network_dim 8`, `--xformers`, `--network_args a=1 b=2`."""

import argparse

from lora_sd.config.coerce import NUMBER_OR_PAIR, base_type
from lora_sd.config.options import FIELDS, SD_SCRIPTS_ACCEPTED, TYPES
from lora_sd.errors import ConfigError, ConfigErrors


def add_config_arguments(parser: argparse.ArgumentParser):
    """One flag per TrainConfig field, with its help.

    Only flags actually given end up in the namespace (default SUPPRESS), so
    they override the TOML and nothing else does.
    """
    group = parser.add_argument_group("training options (override the config file)")
    for name, f in FIELDS.items():
        typ, _ = base_type(TYPES[name])
        kw = dict(default=argparse.SUPPRESS, help=f.metadata["help"])
        if typ is bool:
            group.add_argument(f"--{name}", nargs="?", const="true", metavar="BOOL", **kw)
        elif typ == list[str]:
            group.add_argument(f"--{name}", nargs="*", metavar="ARG", **kw)
        elif typ == NUMBER_OR_PAIR:
            group.add_argument(f"--{name}", nargs="+", metavar="FLOAT", **kw)
        else:
            group.add_argument(f"--{name}", metavar=typ.__name__.upper() if typ in (int, float, str) else "W,H", **kw)
    for name, (typ, _) in SD_SCRIPTS_ACCEPTED.items():  # sd-scripts' store_true flags take no value there
        extra = dict(nargs="?", const="true") if typ is bool else {}
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **extra)


def check_unknown_flags(unknown: list[str]):
    """parse_known_args leftovers -> one ConfigError naming each flag and the closest option."""
    flags = [u for u in unknown if u.startswith("--")]
    if not unknown:
        return
    if not flags:
        raise ConfigError(f"command line: unexpected argument(s) {' '.join(unknown)}")
    errors = ConfigErrors("command line")
    known = [f"--{name}" for name in (*FIELDS, "config")]
    for flag in flags:
        errors.unknown(flag.split("=", 1)[0], known, what="option")
    errors.raise_if_any()


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = set(FIELDS) | set(SD_SCRIPTS_ACCEPTED)
    return {k: v for k, v in vars(args).items() if k in names}
