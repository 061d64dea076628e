"""Precision and speed switches of a run: the LoRA in half precision, fused AdamW on CUDA, TF32 matmuls.

`full_bf16` / `full_fp16` (sd-scripts' names): the LoRA parameters, and so their gradients and the optimizer
state, are bfloat16 / float16 instead of float32 (half the memory of the trained weights and of the state),
for every adapter kind (LoRA, DoRA's magnitude, LoHa, LoKr: whatever the optimizer trains). The checks that need
only the config are in lora_sd.config.validate (sd-scripts': full_bf16 needs mixed_precision bf16, full_fp16
fp16; ours: not both, and no optimizer that cannot step float16 weights); what needs the run is here. The EMA keeps its
float32 shadow (ema.py); states save and resume the weights and the optimizer state in their dtype; a file
without `save_precision` is written in the weights' dtype, as sd-scripts writes it (it casts only when
save_precision is given).

Fused AdamW: on CUDA, torch's AdamW steps every parameter in one kernel (`fused=True`), computing in float32
whatever the weights' dtype, unless `optimizer_args` chose `fused` or `foreach`. `allow_tf32`: float32 matmuls
and cuDNN convolutions on TF32 tensor cores (Ampere and later); off, torch's defaults stay, as sd-scripts
leaves them.
"""

import logging

import torch

logger = logging.getLogger(__name__)


def lora_dtype(cfg) -> torch.dtype:
    """The dtype the LoRA parameters train in: bfloat16 (full_bf16), float16 (full_fp16), else float32."""
    if cfg.full_bf16:
        return torch.bfloat16
    if cfg.full_fp16:
        return torch.float16
    return torch.float32


def file_precision(cfg) -> str:
    """The precision LoRA files are written in: `save_precision`, else the weights' own (float, or bf16/fp16 with
    full_bf16/full_fp16: as sd-scripts, whose save casts only when save_precision is given)."""
    return cfg.save_precision or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(lora_dtype(cfg), "float")


def configure_run(cfg, accelerator):
    """What the precision options change once the accelerator exists: TF32, and the GradScaler of full_fp16."""
    set_tf32(cfg.allow_tf32, accelerator.device.type)
    if cfg.full_fp16:
        allow_fp16_unscale(accelerator)
    if cfg.full_bf16 or cfg.full_fp16:
        logger.info("%s: the LoRA weights and the optimizer state are %s (an update below about 1/%d of a "
                    "weight is lost: raise the learning rate if training stalls)",
                    "full_bf16" if cfg.full_bf16 else "full_fp16", lora_dtype(cfg), 256 if cfg.full_bf16 else 2048)


def allow_fp16_unscale(accelerator):
    """Let accelerate's GradScaler unscale float16 gradients (sd-scripts' patch_accelerator_for_fp16_training).

    torch's GradScaler.unscale_ refuses float16 gradients ("Attempting to unscale FP16 gradients"), a guard for
    runs meant to keep float32 master weights; with full_fp16 the weights themselves are float16. Gradient
    clipping unscales (optim.clip_grad_norm), so without this the first step fails. torch has no public
    switch: the scaler's private `_unscale_grads_` is wrapped on this instance only, with allow_fp16 forced on.
    """
    scaler = accelerator.scaler
    if scaler is None:  # no float16 mixed precision: nothing is scaled
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def params_device_type(param_groups: list[dict]) -> str:
    """The device type ("cuda", "cpu", ...) of the first parameter of an optimizer's groups."""
    return next((p.device.type for g in param_groups for p in g["params"]), "cpu")


def fused_adamw(optimizer_name: str, kwargs: dict, device_type: str) -> dict:
    """The optimizer kwargs with `fused=True` for torch's AdamW on CUDA, unless `optimizer_args` set `fused` or
    `foreach` (the user's choice stands). One kernel for all parameters instead of several ops per tensor; it
    computes in float32 for float16/bfloat16 weights too, and takes the GradScaler's scale and inf flag itself."""
    if optimizer_name != "AdamW" or device_type != "cuda" or {"fused", "foreach"} & kwargs.keys():
        return kwargs
    logger.info("AdamW: fused=True on CUDA (set fused=False in optimizer_args to use the foreach one)")
    return {**kwargs, "fused": True}


def set_tf32(allow: bool, device_type: str) -> bool:
    """`allow_tf32` on a CUDA device: float32 matmuls and cuDNN convolutions may use TF32 tensor cores (inputs
    rounded to a 10-bit mantissa; Ampere and later, ignored by older GPUs). Returns whether it set them. Off, or
    without CUDA, nothing is touched: torch's defaults stay. The flags are the ones accelerate itself sets
    (torch.backends.cuda.matmul.allow_tf32): torch >= 2.9 refuses reads that mix them with its newer
    fp32_precision settings."""
    if not allow:
        return False
    if device_type != "cuda":
        logger.info("allow_tf32 is ignored: TF32 is a CUDA (Ampere and later) feature")
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logger.info("allow_tf32: float32 matmuls and convolutions may use TF32 tensor cores")
    return True
