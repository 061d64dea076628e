"""LoRA training: `train(cfg)` with a TrainConfig from lora_sd.config.load_config."""


def train(cfg):
    """Train a LoRA as `cfg` says; returns a TrainResult (see lora_sd.training.loop)."""
    from lora_sd.training.loop import train as _train

    return _train(cfg)
