"""The resolved config of a run, written beside its outputs (`<output_name>-config.toml`) so that it can be repeated."""

import dataclasses

from lora_sd.config import OPTION_NAMES


def _toml_string(value: str) -> str:
    """A TOML basic string. toml 0.10.2's own writer breaks on backslashes before `x` (`C:\\xl\\...` is
    written as an invalid `\\x` escape) and on DEL: JSON's escapes are TOML's, plus DEL."""
    import json

    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def config_toml(cfg) -> str:
    """A TOML that load_config reads back into the same options and datasets (written with the toml package)."""
    import toml

    encoder = toml.TomlEncoder()
    encoder.dump_funcs[str] = _toml_string
    options = {name: getattr(cfg, name) for name in OPTION_NAMES
               if name not in ("dataset_config", "train_data_dir", "reg_data_dir") and getattr(cfg, name) is not None}
    options["datasets"] = [dataclasses.asdict(ds) for ds in cfg.datasets]  # toml leaves out None values
    source = " ".join(str(cfg.source).splitlines()) or "the command line"  # a comment is one line
    return f"# resolved config of a lora-sd training run (from {source})\n" + toml.dumps(options, encoder=encoder)
