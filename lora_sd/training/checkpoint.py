"""Saving LoRA files during and after training, and the training state for resume.

LoRA files: `<output_name>.safetensors` at the end, `<output_name>-<epoch:06d>`
every n epochs and `<output_name>-step<step:08d>` every n steps (sd-scripts'
names); kohya `.safetensors`/`.ckpt`, a diffusers folder
(`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(folder)`
reads) or PEFT adapter folders. Only the main process writes; writes are atomic.

Training state (`save_state`): accelerate's `save_state` (LoRA weights only,
optimizer, schedule, RNG of every process) plus our progress counters
(step, epoch, batches done in the epoch), written to `<name>-state` folders through a temporary folder.
The resolved config (`config_toml`) is written beside the outputs.
"""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from lora_sd.config import OPTION_NAMES
from lora_sd.errors import ConfigError
from lora_sd.formats import save_lora
from lora_sd.io import atomic_path, replace
from lora_sd.lora_weights import LoraWeights

logger = logging.getLogger(__name__)


def _stem(cfg, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{cfg.output_name}-step{step:08d}"
    if epoch is not None:
        return f"{cfg.output_name}-{epoch:06d}"
    return cfg.output_name


def lora_file_name(cfg, epoch: int | None = None, step: int | None = None) -> str:
    """`<output_name>[-<epoch>|-step<step>]` plus `.safetensors`/`.ckpt`; folders (diffusers, peft) have none."""
    stem = _stem(cfg, epoch, step)
    return stem if cfg.save_model_as in ("diffusers", "peft") else f"{stem}.{cfg.save_model_as}"


def state_dir_name(cfg, epoch=None, step=None) -> str:
    return _stem(cfg, epoch, step) + "-state"


def trained_lora(accelerator, unet, text_encoder, cfg) -> LoraWeights:
    """The LoRA being trained, read from the (unwrapped) PEFT-adapted models."""
    models = {}
    if cfg.train_unet:
        models["unet"] = accelerator.unwrap_model(unet)
    if cfg.train_text_encoder:
        models["text_encoder"] = accelerator.unwrap_model(text_encoder)
    return LoraWeights.from_peft_models(**models)


def write_lora(lora: LoraWeights, path: Path, cfg, *, version: str) -> Path:
    """Write one LoRA file or folder in cfg.save_model_as, atomically."""
    precision = cfg.save_precision or "float"
    if cfg.save_model_as in ("safetensors", "ckpt", "pt"):
        return save_lora(lora, path, "kohya", precision, version=version,
                         v_parameterization=cfg.v_parameterization, title=cfg.output_name)
    if cfg.save_model_as == "peft":
        return save_lora(lora, path, "peft", precision)
    with atomic_path(path) as tmp:  # diffusers: a folder that load_lora_weights(folder) reads
        tmp.mkdir()
        save_lora(lora, tmp / "pytorch_lora_weights.safetensors", "diffusers", precision)
    return path


def save_lora_file(accelerator, unet, text_encoder, cfg, metadata: dict, *, version: str,
                   epoch=None, step=None) -> Path | None:
    """Save the current LoRA (main process only); returns its path."""
    accelerator.wait_for_everyone()
    path = Path(cfg.output_dir) / lora_file_name(cfg, epoch, step)
    if accelerator.is_main_process:
        lora = trained_lora(accelerator, unet, text_encoder, cfg)
        lora.metadata = dict(metadata)
        write_lora(lora, path, cfg, version=version)
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


class Progress:
    """Where the run is: optimizer steps done, epoch, batches done in that epoch (saved with the state)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    @property
    def epochs_begun(self) -> int:
        """Epochs done plus the one in progress: what ss_epoch and the summary report."""
        return self.epoch + (self.batches_in_epoch > 0)

    def state_dict(self):
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state):
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def only_lora_weights(models, weights, output_dir):
    """accelerate save-state hook: keep the LoRA tensors of each model, not the frozen base."""
    for i, state in enumerate(weights):
        weights[i] = {k: v for k, v in state.items() if "lora_" in k}


def save_training_state(accelerator, folder: Path):
    """accelerate.save_state into `folder`, through `.<name>.tmp` so that a crash leaves no half state."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace(tmp, folder)  # an older state of that name is moved aside, never left half-deleted
        logger.info("saved training state %s", folder)
    accelerator.wait_for_everyone()


def load_training_state(accelerator, folder):
    folder = Path(folder)
    if not (folder / "custom_checkpoint_0.pkl").is_file():
        raise ConfigError(f"`resume` {folder}: not a training state folder written by save_state")
    try:
        accelerator.load_state(str(folder), strict=False)  # the state holds only the LoRA weights
    except (RuntimeError, ValueError, KeyError) as e:
        msg = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:300] or type(e).__name__
        raise ConfigError(f"`resume` {folder}: the saved state does not fit this run (network_dim, "
                          f"network_args, optimizer or trained parts changed?): {msg}") from None
    logger.info("resumed from %s", folder)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def config_toml(cfg) -> str:
    """A TOML that load_config reads back into the same options and datasets."""
    lines = [f"# resolved config of a lora-sd training run (from {cfg.source or 'the command line'})"]
    for name in OPTION_NAMES:
        value = getattr(cfg, name)
        if name in ("dataset_config", "train_data_dir", "reg_data_dir") or value is None:
            continue
        lines.append(f"{name} = {_toml_value(value)}")
    for ds in cfg.datasets:
        lines.append("\n[[datasets]]")
        for k, v in dataclasses.asdict(ds).items():
            if k != "subsets" and v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        for sub in ds.subsets:
            lines.append("  [[datasets.subsets]]")
            lines += [f"  {k} = {_toml_value(v)}" for k, v in dataclasses.asdict(sub).items() if v is not None]
    return "\n".join(lines) + "\n"

