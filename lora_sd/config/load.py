"""load_config: a TOML file (or none) plus command-line overrides -> a checked TrainConfig; writes nothing.

Accepted TOML shapes: our flat configs (configs/*.toml); sd-scripts'
`--config_file` TOMLs, whose tables ([model_arguments], [training_arguments],
...) are flattened; the dataset tables `[general]` / `[[datasets]]` inline,
or `dataset_config = "file.toml"`, or `train_data_dir` (DreamBooth folders).
"""

import dataclasses
from pathlib import Path

from lora_sd.config.coerce import CoercionError, coerce
from lora_sd.config.options import FIELDS, SD_SCRIPTS_ACCEPTED, TYPES, TrainConfig
from lora_sd.config.validate import check_values
from lora_sd.errors import ConfigErrors
from lora_sd.io import read_toml

DATASET_TABLES = ("general", "datasets")


def _flatten(raw: dict, errors: ConfigErrors) -> tuple[dict, dict]:
    """(options, dataset tables): sd-scripts' config_file tables are flattened into options."""
    flat, dataset = {}, {}
    for key, value in raw.items():
        if key in DATASET_TABLES:
            dataset[key] = value
        elif isinstance(value, dict) and key not in FIELDS:
            for k, v in value.items():
                if k in flat:
                    errors.add(k, f"is set twice (in [{key}] and before)")
                flat[k] = v
        else:
            if key in flat:
                errors.add(key, "is set twice")
            flat[key] = value
    return flat, dataset


def _check_accepted(key, value, from_cli: bool, errors: ConfigErrors, log_to_tensorboard: bool):
    """An sd-scripts option we do not implement: fine only at a value that changes nothing."""
    typ, allowed = SD_SCRIPTS_ACCEPTED[key]
    try:
        value = coerce(value, typ, from_cli)
    except CoercionError:
        value = dataclasses.MISSING
    if value not in allowed:
        errors.add(key, "is an sd-scripts option lora-sd does not implement; remove it")
    elif key == "log_with" and value == "tensorboard" and not log_to_tensorboard:
        errors.add(key, "= \"tensorboard\" needs `logging_dir` (as in sd-scripts)")


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (or none) plus overrides {option: value}.

    Override values may be typed or command-line strings. Every unknown key,
    wrong type and impossible value is reported in one ConfigError.
    """
    errors = ConfigErrors(str(path) if path else "command line")
    raw = read_toml(path) if path else {}
    flat, dataset_tables = _flatten(raw, errors)
    values, accepted = {}, []
    for table, from_cli in ((flat, False), (overrides or {}, True)):
        for key, value in table.items():
            if key in SD_SCRIPTS_ACCEPTED:
                accepted.append((key, value, from_cli))
            elif key not in FIELDS:
                errors.unknown(key, FIELDS, what="option")
            else:
                try:
                    values[key] = coerce(value, TYPES[key], from_cli)
                except CoercionError as e:
                    errors.add(key, str(e))
    cfg = TrainConfig(**values)
    cfg.source = str(path or "")
    for key, value, from_cli in accepted:
        _check_accepted(key, value, from_cli, errors, log_to_tensorboard=bool(cfg.logging_dir))
    check_values(cfg, errors, bool(dataset_tables))
    errors.raise_if_any()
    cfg.datasets = _datasets(cfg, dataset_tables, path)
    return cfg


def _datasets(cfg: TrainConfig, tables: dict, path) -> list:
    """The DatasetConfigs, with the options of the same names as the lowest-priority defaults (as sd-scripts)."""
    # imported here: the dataset schema imports this package's coercer
    from lora_sd.data.dataset_config import (DatasetConfig, SubsetConfig, dreambooth_dataset_config,
                                             load_dataset_config)

    # network_multiplier is not a dataset default: training multiplies the option by the dataset's own value
    shared = [f.name for c in (DatasetConfig, SubsetConfig) for f in dataclasses.fields(c)
              if f.name in FIELDS and f.name != "network_multiplier"]
    defaults = {k: getattr(cfg, k) for k in shared if getattr(cfg, k) is not None}
    defaults["batch_size"] = cfg.train_batch_size
    if cfg.train_data_dir:
        return dreambooth_dataset_config(cfg.train_data_dir, cfg.reg_data_dir, **defaults)
    if cfg.dataset_config:
        source = Path(cfg.dataset_config)
        if path and not source.is_absolute() and not source.exists() and (Path(path).parent / source).exists():
            source = Path(path).parent / source
        return load_dataset_config(source, defaults=defaults)
    return load_dataset_config(tables, path_for_errors=f"{path} (inline [[datasets]])", defaults=defaults)
