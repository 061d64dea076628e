"""`channels_last`: the U-Net's convolutions and the latents fed to it in torch.channels_last (NHWC) memory
format.

NVIDIA's tensor cores convolve NHWC natively, so on CUDA in fp16/bf16 the
layout saves the transposes cuDNN otherwise does around each convolution
(PyTorch's memory-format tutorial). On CPU, or in float32, it rarely helps.
Only the layout changes: the values and the loss are the same, and the saved
LoRA too (the adapters keep their layout). sd-scripts has no such option;
`channels_last` is the name other PyTorch trainers use for it.
"""

import logging

import torch

from lora_sd.training.network import is_adapter_param

logger = logging.getLogger(__name__)


def use_channels_last(unet, enabled: bool, device) -> bool:
    """With `enabled`, put the base convolution weights of `unet` in channels_last and convert its `sample` input
    on each call. The adapters keep the layout PEFT gave them: their convolutions are rank-sized, and PEFT's DoRA
    `view`s its conv weights, which a channels_last tensor refuses. Returns `enabled`."""
    if not enabled:
        return False
    if torch.device(device).type != "cuda":
        logger.info("channels_last on %s: it mostly pays off on CUDA GPUs in fp16/bf16", torch.device(device).type)
    for name, param in unet.named_parameters():
        if param.ndim == 4 and not is_adapter_param(name):
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    unet.register_forward_pre_hook(_sample_channels_last, with_kwargs=True)
    return True


def _sample_channels_last(module, args, kwargs):
    """The U-Net's `sample` (positional or keyword) in channels_last, so that the first convolution needs no
    layout change."""
    if args and _is_image(args[0]):
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    if _is_image(kwargs.get("sample")):
        return args, {**kwargs, "sample": kwargs["sample"].contiguous(memory_format=torch.channels_last)}
    return None


def _is_image(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4
