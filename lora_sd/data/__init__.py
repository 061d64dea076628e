"""Training data the sd-scripts way: dataset TOML, buckets, captions, latent cache, DataLoader.

Names are imported on first use, so that `lora_sd.data.resize` (the resize
recipe) does not pay for importing torch and datasets.
"""

import importlib

_EXPORTS = {
    "DatasetConfig": "lora_sd.data.dataset_config",
    "SubsetConfig": "lora_sd.data.dataset_config",
    "dreambooth_dataset_config": "lora_sd.data.dataset_config",
    "load_dataset_config": "lora_sd.data.dataset_config",
    "TrainData": "lora_sd.data.loader",
    "build_train_data": "lora_sd.data.loader",
    "pinned_transfers": "lora_sd.data.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
