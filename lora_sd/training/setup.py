"""What a run sets up before its loop: the accelerator, the seed, and the base model with its LoRA adapters."""

import logging
import random
import time
from pathlib import Path

import torch

from lora_sd.config.kv_args import parse_network_args
from lora_sd.demo import resolve_demo_path
from lora_sd.errors import ConfigError
from lora_sd.training.compile import check_compile
from lora_sd.training.fused_backward import check_processes
from lora_sd.training.memory_format import use_channels_last
from lora_sd.training.network import (add_network, enable_gradient_checkpointing, set_attention, store_base_in_fp8,
                                      text_encoders)
from lora_sd.training.precision import configure_run

logger = logging.getLogger(__name__)


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    has_cuda = torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and not has_cuda:
        raise ConfigError('`mixed_precision = "fp16"` needs a CUDA GPU; on CPU use "bf16" or "no"')
    check_compile(cfg, "cuda" if has_cuda else "cpu")
    kwargs = {}
    if cfg.logging_dir:
        run = (cfg.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")
        kwargs = dict(log_with="tensorboard",
                      project_config=ProjectConfiguration(project_dir=str(Path(cfg.logging_dir) / run)))
    AcceleratorState._reset_state()  # a second run in one Python process may use another precision
    if cfg.train_text_encoder or parse_network_args(cfg.network_args, cfg.network_module).get("module_dropout"):
        # with clip_skip, and on SDXL (penultimate layers), a text encoder's last layers do not reach the U-Net;
        # module_dropout skips whole modules for a step: DDP must expect LoRA weights without gradients (the
        # model family is not known before it loads)
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    # cpu=True on a GPU-less machine makes `accelerate launch --multi_gpu` run DDP over gloo (see DESIGN.md)
    accelerator = Accelerator(cpu=not has_cuda, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, **kwargs)
    configure_run(cfg, accelerator)  # TF32, full_fp16's GradScaler
    check_processes(cfg, accelerator.num_processes)
    return accelerator


def load_model(cfg, device):
    """(SDModel, weight dtype): the base model on `device`, frozen, the LoRA adapters added.

    The U-Net and text encoder(s) are cast to the mixed-precision dtype (`fp8_base`: their Linear/Conv
    weights stored in float8); the VAE only encodes and stays float32 (sd-scripts' no_half_vae; SDXL's
    VAE overflows in fp16); LoRA weights are float32 (bf16/fp16 with full_bf16/full_fp16).
    """
    from lora_sd.models.load import load_base

    model = load_base(resolve_demo_path(cfg.pretrained_model_name_or_path), v2=cfg.v2,
                      v_parameterization=cfg.v_parameterization, model_config=cfg.model_config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if model.version == "sdxl" and cfg.clip_skip:  # as sd-scripts: SDXL always takes the penultimate layers
        logger.warning("clip_skip is ignored for SDXL (both text encoders' penultimate layers are used, as in "
                       "sd-scripts)")
    for m in (model.unet, model.vae, *text_encoders(model).values()):
        m.requires_grad_(False)
        m.to(device, dtype=torch.float32 if m is model.vae else weight_dtype)
    set_attention(model.unet, cfg)
    add_network(model, cfg)
    use_channels_last(model.unet, cfg.channels_last, device)  # after the adapters: their convolutions follow
    if cfg.fp8_base:
        store_base_in_fp8([model.unet, *text_encoders(model).values()])
    enable_gradient_checkpointing(model, cfg)
    return model, weight_dtype


def seed_everything(cfg, accelerator):
    """Seed python, numpy and torch (accelerate's set_seed); no seed given: a random one, the same on every process,
    recorded in cfg (and so in the outputs)."""
    if cfg.seed is None:
        from accelerate.utils import broadcast_object_list

        cfg.seed = broadcast_object_list([random.randint(0, 2**31 - 1)])[0]
        logger.info("seed not given: using %d", cfg.seed)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
