"""Put the LoRA network on the base model: PEFT adapters with sd-scripts' targets.

Fresh adapters follow `network_dim`/`network_alpha` (+ `conv_dim`/`conv_alpha`);
`network_weights` loads a LoRA file (any format) as the starting point, with
the file's ranks and alphas (`dim_from_weights`) or checked against the
configured ones. The base weights stay frozen (and may be cast to fp16/bf16);
the LoRA parameters are always float32.
"""

import importlib.util
import logging

import torch

from lora_sd.errors import ConfigError
from lora_sd.targets import NetworkSpec, lora_configs

logger = logging.getLogger(__name__)
NETWORK_ARGS = ("conv_dim", "conv_alpha")


def network_args(cfg) -> dict:
    """`network_args` ["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": 4, "conv_alpha": 1.0}."""
    out = {}
    for item in cfg.network_args:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in NETWORK_ARGS:
            raise ConfigError(f"got {item!r}; supported: " + ", ".join(f"{k}=N" for k in NETWORK_ARGS))
        try:
            out[key] = int(value) if key == "conv_dim" else float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    return out


def network_spec(cfg) -> NetworkSpec:
    args = network_args(cfg)
    return NetworkSpec(cfg.network_dim, cfg.network_alpha, args.get("conv_dim"), args.get("conv_alpha", 1.0))


def check_attention(cfg):
    """Refuse xformers where it cannot run, before anything is loaded."""
    if not cfg.xformers:
        return
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError("`xformers = true`, but the xformers package is not installed: `pip install xformers` "
                          "(a build matching your torch), or remove the option (PyTorch SDPA is the default)")
    if not torch.cuda.is_available():
        raise ConfigError("`xformers = true` needs a CUDA GPU; on CPU remove the option (SDPA is used)")


def set_attention(unet, cfg):
    """SDPA (diffusers' default processor) unless xformers is asked for (checked by check_attention)."""
    if cfg.xformers:
        unet.enable_xformers_memory_efficient_attention()


def add_network(unet, text_encoder, cfg):
    """Add the trained adapter ("default") to the parts being trained; returns the NetworkSpec used.

    A part that `network_weights` holds starts from the file; any other starts fresh.
    """
    from diffusers.training_utils import cast_training_params

    spec = network_spec(cfg)
    models = {"unet": unet, "text_encoder": text_encoder}
    configs = lora_configs(unet, text_encoder, spec, cfg.train_unet, cfg.train_text_encoder)
    start = _network_weights(cfg, spec, wanted=list(configs)) if cfg.network_weights else {}
    for name, config in configs.items():
        if name in start:
            start[name].apply_to(**{name: models[name]})
        else:
            models[name].add_adapter(config)
        for pname, p in models[name].named_parameters():
            p.requires_grad_("lora_" in pname)
        cast_training_params(models[name], torch.float32)  # the LoRA weights train in float32 under any precision
    return spec


def _network_weights(cfg, spec, wanted) -> dict:
    """{part: LoraWeights} of the parts in `wanted` that the `network_weights` file holds."""
    from lora_sd.formats import load_lora
    from lora_sd.lora_weights import LoraWeights

    lora = load_lora(cfg.network_weights)
    ignored = [c for c in lora.components if c not in wanted]
    if ignored:
        logger.warning("network_weights %s: its %s modules are not trained in this run and are ignored",
                       cfg.network_weights, " and ".join(ignored))
    parts = {}
    for name in wanted:
        part = LoraWeights({k: m for k, m in lora.modules.items() if k.startswith(name + ".")})
        if not part.modules:
            logger.info("network_weights has no %s modules: starting them fresh", name)
            continue
        if not cfg.dim_from_weights:
            _check_ranks(part, spec, cfg.network_weights)
        parts[name] = part
    return parts


def _check_ranks(lora, spec, path):
    for key, m in lora.modules.items():
        want = spec.conv_dim if m.is_3x3 else spec.network_dim
        if m.rank != want:
            what = "conv_dim" if m.is_3x3 else "network_dim"
            raise ConfigError(f"`network_weights` {path}: {key} has rank {m.rank}, but `{what}` is {want}; "
                              f"set `{what} = {m.rank}` or `dim_from_weights = true`")


def enable_gradient_checkpointing(unet, text_encoder, cfg):
    if not cfg.gradient_checkpointing:
        return
    unet.enable_gradient_checkpointing()
    if cfg.train_text_encoder:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
