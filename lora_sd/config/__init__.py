"""Training configuration: kohya option names and defaults, TOML and command line, every problem reported at once.

Layers, each importing only those before it (and lora_sd.errors / io / demo);
nothing here imports training, generation or data code at import time, and
loading a config writes nothing:

- coerce: one value -> its field's type (shared with the dataset config), finite numbers
- choices: the names options take (samplers, optimizers, schedules, ...), used by generate and training too
- kv_args: `network_args` / `optimizer_args` parsers, used by training too
- options: the TrainConfig schema, one help line per option
- validate: value checks; load: load_config; flags: the command-line flags
"""

from lora_sd.config.choices import CHOICES
from lora_sd.config.flags import add_config_arguments, check_unknown_flags, overrides_from_args
from lora_sd.config.load import load_config
from lora_sd.config.options import OPTION_NAMES, TrainConfig

__all__ = ["CHOICES", "OPTION_NAMES", "TrainConfig", "add_config_arguments", "check_unknown_flags", "load_config",
           "overrides_from_args"]
