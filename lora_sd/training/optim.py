"""Optimizers and learning-rate schedules by their sd-scripts names.

`optimizer_args` are sd-scripts' `key=value` strings: values are Python
literals, a comma makes a tuple (`betas=0.9,0.99`). Schedules come from
diffusers' `get_scheduler`; accelerate steps a prepared scheduler once per
process per optimizer step, so total steps are multiplied by the number of
processes (as sd-scripts does) and so are warmup steps (sd-scripts does not,
which makes its warmup num_processes times shorter than asked).
"""

import importlib
import logging

import torch

# OPTIMIZERS: name -> (module, class, pip package, default kwargs)
from lora_sd.config.choices import OPTIMIZERS, optimizer_named
from lora_sd.config.kv_args import parse_optimizer_args
from lora_sd.errors import ConfigError
from lora_sd.training.precision import fused_adamw, params_device_type

logger = logging.getLogger(__name__)


def canonical_optimizer(name: str) -> str:
    """The OPTIMIZERS key of `name` (case-insensitive, as sd-scripts); ConfigError for an unknown one."""
    known = optimizer_named(name)
    if known is not None:
        return known
    raise ConfigError(f"`optimizer_type` must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def _optimizer_class(name):
    module, cls, package, _ = OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ConfigError(f"`optimizer_type = \"{name}\"` needs the `{package}` package, which is not installed "
                          f"or cannot load here ({e}); `pip install {package}`, or use AdamW") from None


def build_optimizer(name: str, param_groups: list[dict], learning_rate: float, optimizer_args: list[str]):
    """(optimizer, description for ss_optimizer). param_groups carry their own `lr`."""
    name = canonical_optimizer(name)
    kwargs = {**OPTIMIZERS[name][3], **parse_optimizer_args(optimizer_args)}
    kwargs = fused_adamw(name, kwargs, params_device_type(param_groups))  # fused=True on CUDA unless chosen
    group_lrs = {g.get("lr", learning_rate) for g in param_groups} - {0.0}
    if name in ("Prodigy", "DAdaptAdam") and len(group_lrs) > 1:
        raise ConfigError(f"{name} needs one learning rate for all parameter groups: set `unet_lr` and "
                          f"`text_encoder_lr` equal (or leave both unset), without LoRA+ ratios or block lr "
                          f"weights; got {sorted(group_lrs)}")
    cls = _optimizer_class(name)  # after the cheap checks: a refusal needs no package
    if name in ("Prodigy", "DAdaptAdam") and learning_rate < 0.1:
        logger.warning("%s adapts the step size itself: sd-scripts advises learning_rate = 1.0 (got %g)",
                       name, learning_rate)
    try:
        optimizer = cls(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`optimizer_args` for {name}: {e}") from None
    description = f"{cls.__module__}.{cls.__name__}"
    if optimizer_args:
        description += "(" + ",".join(optimizer_args) + ")"
    return optimizer, description


def build_scheduler(name: str, optimizer, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                    power: float = 1.0, num_processes: int = 1):
    """A LambdaLR for one of sd-scripts' schedule names (constant, cosine, ...)."""
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps:
        logger.warning("`lr_warmup_steps` is ignored by the `constant` schedule; use constant_with_warmup")
    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, **kwargs)


def part_learning_rates(cfg, parts: list[str]) -> dict[str, float]:
    """{part: learning rate}: `unet_lr` and `text_encoder_lr`, else `learning_rate`. `text_encoder_lr` is one
    value for every text encoder, or two (te1, te2) for SDXL's (as sd-scripts' list)."""
    te_lrs = cfg.text_encoder_lr if isinstance(cfg.text_encoder_lr, list) else [cfg.text_encoder_lr] * 2
    if len(te_lrs) == 2 and te_lrs[0] != te_lrs[1] and "text_encoder" in parts and "text_encoder_2" not in parts:
        raise ConfigError(f"`text_encoder_lr` {cfg.text_encoder_lr}: two values are for SDXL's two text encoders; "
                          "this model has one: give one value")
    given = {"unet": cfg.unet_lr, "text_encoder": te_lrs[0], "text_encoder_2": te_lrs[1]}
    return {p: cfg.learning_rate if given[p] is None else given[p] for p in parts}


LABELS = {"unet": "unet", "text_encoder": "textencoder", "text_encoder_2": "textencoder2"}


def loraplus_ratio(cfg, part: str, args: dict) -> float | None:
    """LoRA+'s up/down learning-rate ratio of a part: its own (loraplus_unet_lr_ratio /
    loraplus_text_encoder_lr_ratio), else loraplus_lr_ratio; top-level option or network_args alike."""
    own = "loraplus_unet_lr_ratio" if part == "unet" else "loraplus_text_encoder_lr_ratio"
    for key in (own, "loraplus_lr_ratio"):
        value = getattr(cfg, key) if getattr(cfg, key) is not None else args.get(key)
        if value is not None:
            return value
    return None


def param_groups(cfg, trained: dict) -> tuple[list[dict], list[str]]:
    """The optimizer's parameter groups over the LoRA parameters of `trained` ({part: model}) and their names
    (the `lr/...` logs), as sd-scripts' prepare_optimizer_params: per part its learning rate; with block lr
    weights one group per U-Net block (`unet_block3`) at lr x its weight; with LoRA+ the up matrices (PEFT's
    lora_B) of each in a group of their own (`... plus`) at lr x the ratio. Empty groups are left out."""
    from lora_sd.targets import unet_blocks
    from lora_sd.training.network import network_args, network_spec

    lrs, args, spec = part_learning_rates(cfg, list(trained)), network_args(cfg), network_spec(cfg)
    groups, names = [], []
    for part, model in trained.items():
        ratio = loraplus_ratio(cfg, part, args)
        blocks = unet_blocks(model, spec) if part == "unet" else None
        buckets = {}
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            block = _block_of(pname, model) if blocks is not None and blocks.lr_weight is not None else None
            buckets.setdefault((block, ratio is not None and ".lora_B." in pname), []).append(p)
        for (block, plus), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
            lr = lrs[part] * (blocks.weight(block) if block is not None else 1.0) * (ratio if plus else 1.0)
            groups.append({"params": params, "lr": lr})
            names.append(LABELS[part] + (f"_block{block}" if block is not None else "") + (" plus" if plus else ""))
    return groups, names


def _block_of(param_name: str, unet) -> int:
    from lora_sd.blocks import block_index

    module = param_name.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0]
    return block_index(module, unet)


def current_lrs(optimizer) -> list[float]:
    """The learning rate of each group (D-Adaptation/Prodigy: d * lr, as sd-scripts logs it)."""
    out = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        if "d" in group:
            lr = group["d"] * lr
        out.append(float(lr))
    return out


def clip_grad_norm(accelerator, params, max_norm: float):
    """accelerate's clip_grad_norm_ for the runs lora-sd makes (one process or DDP, never FSDP, DeepSpeed or XLA):
    the fp16 scaler's unscale, then torch's clip over the global norm. accelerate's own first checks for those
    setups and for DTensors on every call, about half a millisecond a step on CPU (a tenth of the overhead over the
    bare loop that `benchmarks/train_speed.py --compare-floor` measured on the tiny model)."""
    accelerator.unscale_gradients()
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
